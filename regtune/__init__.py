"""regtune: regularized fine-tuning of pretrained image backbones on small, fine-grained datasets."""

__version__ = "0.1.0"
