"""`regtune fit` on 2 CPU processes (Lightning's DDP, gloo): one run directory, disjoint shares of every epoch, and
evaluation numbers over the whole split."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from regtune.data.datasets import build_dataset
from regtune.data.transforms import TransformedSubset, build_transforms
from regtune.models import data_config
from regtune.train.callbacks import read_epoch_log
from regtune.train.config import apply_overrides, save_config
from tests.conftest import TINY_BACKBONE, write_imagefolder
from tests.train.test_fit import tiny_config


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("launcher", ["lightning", "torchrun"])
def test_two_process_fit_end_to_end(tmp_path: Path, launcher: str) -> None:
    """Lightning launches the second process itself (``--devices 2``); torchrun starts both at once."""
    root = write_imagefolder(tmp_path / "images", train_per_class=12)  # 36 images: 30 train, 6 val
    weights = tmp_path / "weights.pth"  # "pretrained" weights with a 1000-class source head, for LwF
    torch.manual_seed(0)
    torch.save(timm.create_model(TINY_BACKBONE, pretrained=False).state_dict(), weights)
    config = apply_overrides(tiny_config(root, epochs=2), {
        "trainer.devices": 2, "data.batch_size": 4, "model.pretrained": str(weights),
        # stateful terms with set-up passes and per-item state: AdaRand (class statistics, its own prior update) and
        # LwF (cached teacher outputs looked up by training index)
        "regularizers": [{"name": "adarand"}, {"name": "lwf"}],
    })
    save_config(config, tmp_path / "config.yaml")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("REGTUNE_RUN_DIR", None)
    launch = [] if launcher == "lightning" else ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run([sys.executable, *launch, "-m", "regtune.cli", "fit", "--config",
                           str(tmp_path / "config.yaml"), "--run-dir", str(tmp_path / "run")], capture_output=True,
                          text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "GLOBAL_RANK: 1" in done.stdout + done.stderr  # two processes did run
    assert done.stdout.count("test accuracy:") == 1  # process 1 reports nothing
    # one run directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "images", "run", "weights.pth"]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # each process trains on its 15 of the 30 images per epoch: 3 full batches of 4, so 3 steps per epoch
    rows = read_epoch_log(tmp_path / "run" / "epochs.csv")
    assert [r["epoch"] for r in rows] == [1, 2] and [r["step"] for r in rows] == [3, 6]
    # the test numbers are those of the selected checkpoint on all 12 test images, not on one process's share
    assert metrics["num_test"] == 12
    state = torch.load(tmp_path / "run" / metrics["selected_checkpoint"], map_location="cpu", weights_only=True)
    from regtune.models import create_backbone

    model = create_backbone(config.model.backbone, 3, pretrained=str(weights)).model
    model.load_state_dict({k.removeprefix("model."): v for k, v in state["state_dict"].items()
                           if k.startswith("model.")})
    model.eval()
    test_set = build_dataset("imagefolder", str(root), "test")
    _, eval_tf = build_transforms({**data_config(model, 32), "crop_pct": config.data.crop_pct})
    with torch.no_grad():
        ((logits, labels),) = [(model(x), y) for x, y in DataLoader(TransformedSubset(test_set, range(12), eval_tf),
                                                                    batch_size=12)]
    predicted = logits.argmax(-1)
    assert metrics["test_acc"] == pytest.approx(float((predicted == labels).float().mean()), abs=1e-9)
    # the loss tells the whole split from one process's half even when a weak model predicts one class everywhere
    whole = float(torch.nn.functional.cross_entropy(logits, labels))
    halves = [float(torch.nn.functional.cross_entropy(logits[r::2], labels[r::2])) for r in range(2)]
    assert metrics["test_loss"] == pytest.approx(whole, rel=1e-4)
    assert all(h != pytest.approx(whole, rel=1e-4) for h in halves)
    per_class = [float((predicted[labels == c] == c).float().mean()) for c in range(3)]
    assert metrics["test_class_acc"] == pytest.approx(per_class, abs=1e-9)


def test_launcher_without_run_dir_is_refused_before_anything_is_written(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun / srun every process would make its own timestamped run directory: --run-dir is required."""
    from regtune.train.fit import RunDirError, fit

    root = write_imagefolder(tmp_path / "images")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("REGTUNE_RUN_DIR", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RunDirError, match="pass --run-dir"):
        fit(tiny_config(root, epochs=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]
