"""A folder of 'photos' as a user has them, made from Fashion-MNIST: ``OUT/{train,test}/<class>/``, 4 confusable
classes (T-shirt, pullover, coat, shirt), 20 training and 10 test images per class, upscaled to non-square sizes and
saved as RGB JPEGs (slightly tinted) and grey or RGBA PNGs.

Usage: python3 benchmarks/practitioner/make_photos.py OUT   (reads Debian's /usr/share/datasets/fashion-mnist)
"""

import gzip
import sys
from pathlib import Path

import numpy as np
from PIL import Image

RAW = Path("/usr/share/datasets/fashion-mnist")
CLASSES = {0: "tshirt", 2: "pullover", 4: "coat", 6: "shirt"}  # Fashion-MNIST's upper-body garments
LOOKS = (("RGB", (300, 200)), ("L", (160, 240)), ("RGBA", (220, 220)), ("RGB", (180, 320)))  # mode, (width, height)


def _idx(name: str) -> np.ndarray:
    return np.frombuffer(gzip.open(RAW / name).read(), np.uint8)


def main(out: Path) -> None:
    images = _idx("train-images-idx3-ubyte.gz")[16:].reshape(-1, 28, 28)
    labels = _idx("train-labels-idx1-ubyte.gz")[8:]
    rng = np.random.default_rng(0)
    for label, name in CLASSES.items():
        for i, k in enumerate(rng.choice(np.flatnonzero(labels == label), 30, replace=False)):
            mode, size = LOOKS[i % len(LOOKS)]
            tint = np.array([1.0, 0.9, 0.8]) if mode != "L" else np.ones(3)
            image = Image.fromarray((images[k][..., None] * tint).astype(np.uint8)).resize(size, Image.BICUBIC)
            if mode == "RGBA":
                image.putalpha(255)
            folder = out / ("train" if i < 20 else "test") / name
            folder.mkdir(parents=True, exist_ok=True)
            image.convert(mode).save(folder / f"{i:02d}.{'jpg' if mode == 'RGB' else 'png'}")
    print(f"{sum(1 for p in out.rglob('*') if p.is_file())} photos in {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
