"""End-to-end runs on a tiny ImageFolder with timm's tiny EfficientNet: outputs, determinism, resume, errors."""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import time
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import lightning.pytorch as pl
import pytest
import torch

from regtune.regularizers import Regularizer, TrainStep, register_regularizer
from regtune.regularizers import base as reg_base
from regtune.train import callbacks as callbacks_module
from regtune.train.callbacks import read_epoch_log
from regtune.train.config import (
    DataConfig,
    FitConfig,
    ModelConfig,
    OptimConfig,
    TermSpec,
    TrainerConfig,
    apply_overrides,
)
from regtune.train.fit import RunDirError, fit
from regtune.train.module import FiniteGuard, NonFiniteLossError
from regtune.train.rundir import RunDir
from tests.conftest import TINY_BACKBONE, write_imagefolder

COMPARED = ("test_acc", "test_loss", "selected_epoch", "best_val")


def tiny_config(root: Path, epochs: int = 3, **trainer: object) -> FitConfig:
    """Plain fine-tuning from a random head (``--recipe ft``) of the tiny model: what most tests of the loop need
    (the default LP-FT is tested in test_baselines.py)."""
    return FitConfig(
        data=DataConfig(dataset="imagefolder", root=str(root), fraction=None, val_fraction=0.2, img_size=32,
                        batch_size=8, eval_batch_size=16, num_workers=0),
        model=ModelConfig(backbone=TINY_BACKBONE, pretrained="none", head_init="normal", lp_select="best",
                          freeze_bn_stats=False),
        optim=OptimConfig(lr=0.05, head_lr_mult=10.0, warmup_epochs=0.5),
        trainer=TrainerConfig(epochs=epochs, progress_bar=False, accelerator="cpu", **{"wise_alphas": (), **trainer}),
    )


@pytest.fixture
def toy_terms(monkeypatch: pytest.MonkeyPatch) -> type:
    """Registers 'toy_norm' (a feature-norm term that counts its setup calls) and 'toy_nan' for one test."""
    monkeypatch.setattr(reg_base, "_REGULARIZERS", dict(reg_base._REGULARIZERS))

    @register_regularizer("toy_norm")
    class ToyNorm(Regularizer):
        needs_setup_pass = True
        setups: ClassVar[list[int]] = []

        def __init__(self, weight: float = 0.01) -> None:
            super().__init__()
            self.weight = weight
            self.register_buffer("seen", torch.zeros((), dtype=torch.long))
            self.register_buffer("last", torch.zeros(()))

        def setup(self, model: torch.nn.Module, loader: object) -> None:
            ToyNorm.setups.append(sum(len(labels) for _, labels in loader))

        def forward(self, step: TrainStep) -> torch.Tensor:
            self.seen += step.labels.numel()
            value = step.features.pow(2).sum(1).mean()
            self.last.copy_(value.detach())
            return self.weight * value

        def stats(self) -> dict[str, float | torch.Tensor]:
            # The buffer itself, which the next step overwrites: against the contract (a new tensor), so that the
            # tests see the trainer keep each step's value even then.
            return {"norm2": self.last}

    @register_regularizer("toy_nan")
    class ToyNaN(Regularizer):
        def __init__(self, at_step: int = 3) -> None:
            super().__init__()
            self.at_step = at_step

        def forward(self, step: TrainStep) -> torch.Tensor:
            zero = step.features.sum() * 0
            return zero + float("nan") if step.global_step >= self.at_step else zero

    ToyNorm.setups = []
    return ToyNorm


def test_run_directory_contents(imagefolder: Path, tmp_path: Path) -> None:
    result = fit(tiny_config(imagefolder), run_dir=tmp_path / "run")
    run = result.run_dir
    for name in ("config.yaml", "split.json", "epochs.csv", "metrics.json", "curves.png",
                 "checkpoints/last.ckpt", "checkpoints/best.ckpt"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics == result.metrics
    assert metrics["num_train"] == 24 and metrics["num_val"] == 6 and metrics["num_test"] == 12
    assert 0.0 <= metrics["test_acc"] <= 1.0 and metrics["selection"] == "val_acc"
    rows = read_epoch_log(run / "epochs.csv")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "lr/backbone", "lr/head"} <= set(rows[0])
    assert rows[0]["lr/head"] == pytest.approx(10 * rows[0]["lr/backbone"])
    split = json.loads((run / "split.json").read_text())
    assert len(split["train"]) == 24 and split["train"][0].startswith("train/class_")


def test_same_seed_same_numbers_and_config_reproduces(imagefolder: Path, tmp_path: Path) -> None:
    first = fit(tiny_config(imagefolder), run_dir=tmp_path / "a")
    from regtune.train.config import load_config

    again = fit(load_config(first.run_dir / "config.yaml"), run_dir=tmp_path / "b")
    assert {k: first.metrics[k] for k in COMPARED} == {k: again.metrics[k] for k in COMPARED}
    rows_a, rows_b = (read_epoch_log(r.run_dir / "epochs.csv") for r in (first, again))
    assert [r["train/loss"] for r in rows_a] == [r["train/loss"] for r in rows_b]
    other = fit(tiny_config(imagefolder, seed=1), run_dir=tmp_path / "c")
    assert [r["train/loss"] for r in read_epoch_log(other.run_dir / "epochs.csv")] != [r["train/loss"]
                                                                                        for r in rows_a]


class _StopAt(pl.Callback):
    """Simulates Ctrl-C at the start of an epoch (after the previous epoch's checkpoint was written)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise KeyboardInterrupt


def test_resume_equals_uninterrupted(imagefolder: Path, tmp_path: Path, toy_terms: type) -> None:
    config = tiny_config(imagefolder, epochs=4)
    config = FitConfig(data=config.data, model=config.model, optim=config.optim, trainer=config.trainer,
                       regularizers=(TermSpec("toy_norm"),))
    whole = fit(config, run_dir=tmp_path / "whole")
    stopped = fit(config, run_dir=tmp_path / "cut", callbacks=[_StopAt(2)])
    assert stopped.interrupted and not (stopped.run_dir / "metrics.json").exists()
    assert [r["epoch"] for r in read_epoch_log(stopped.run_dir / "epochs.csv")] == [1, 2]
    resumed = fit(run_dir=tmp_path / "cut", resume=True)
    assert {k: whole.metrics[k] for k in COMPARED} == {k: resumed.metrics[k] for k in COMPARED}
    assert resumed.metrics["resumed"] is True
    rows_whole = read_epoch_log(whole.run_dir / "epochs.csv")
    rows_resumed = read_epoch_log(resumed.run_dir / "epochs.csv")
    assert [r["epoch"] for r in rows_resumed] == [1, 2, 3, 4]
    for a, b in zip(rows_whole, rows_resumed):
        assert a["train/loss"] == b["train/loss"] and a["val/acc"] == b["val/acc"]
    # setup ran once per run (whole, cut), not again on resume, over the 24 training images
    assert toy_terms.setups == [24, 24]
    # the regularizer's buffer was restored from the checkpoint and kept counting
    state = torch.load(resumed.run_dir / "checkpoints/last.ckpt", weights_only=False)["state_dict"]
    assert int(state["regularizers.toy_norm.seen"]) == 4 * 3 * 8  # epochs x steps x batch
    assert "train/toy_norm" in rows_resumed[0] and "train/toy_norm/norm2" in rows_resumed[0]
    # the per-step log holds every step exactly once, also across the interruption
    steps = read_epoch_log(resumed.run_dir / "steps.csv")
    assert [r["step"] for r in steps] == list(range(1, 13))
    whole_steps = read_epoch_log(whole.run_dir / "steps.csv")
    assert [r["train/toy_norm"] for r in steps] == [r["train/toy_norm"] for r in whole_steps]


def test_a_regularizer_stat_tensor_reaches_steps_csv_for_every_step(imagefolder: Path, tmp_path: Path,
                                                                    toy_terms: type) -> None:
    config = dataclasses.replace(tiny_config(imagefolder, epochs=2), regularizers=(TermSpec("toy_norm"),))
    steps = read_epoch_log(fit(config, run_dir=tmp_path / "run").run_dir / "steps.csv")
    assert [r["step"] for r in steps] == list(range(1, 7))  # 2 epochs x 3 batches
    for row in steps:  # each step's own value (the term's loss is 0.01 of it), not the epoch's last
        assert type(row["train/toy_norm/norm2"]) is float and math.isfinite(row["train/toy_norm/norm2"]), row
        assert row["train/toy_norm/norm2"] == pytest.approx(row["train/toy_norm"] / 0.01, rel=1e-5), row
    assert len({r["train/toy_norm/norm2"] for r in steps}) == len(steps)


def test_finished_run_is_not_overwritten(imagefolder: Path, tmp_path: Path) -> None:
    config = tiny_config(imagefolder, epochs=1)
    fit(config, run_dir=tmp_path / "run")
    before = (tmp_path / "run/metrics.json").read_text()
    with pytest.raises(RunDirError, match="already holds a finished run.*--overwrite"):
        fit(config, run_dir=tmp_path / "run")
    assert (tmp_path / "run/metrics.json").read_text() == before
    with pytest.raises(RunDirError, match="nothing to resume"):
        fit(run_dir=tmp_path / "run", resume=True)
    fit(config, run_dir=tmp_path / "run", overwrite=True)


def test_nan_loss_stops_and_keeps_last_checkpoint(imagefolder: Path, tmp_path: Path, toy_terms: type) -> None:
    config = tiny_config(imagefolder, epochs=3)
    config = FitConfig(data=config.data, model=config.model, optim=config.optim, trainer=config.trainer,
                       regularizers=(TermSpec("toy_nan", {"at_step": 4}),))
    with pytest.raises(NonFiniteLossError, match=r"step 4 \(epoch 2.*toy_nan=nan.*last good checkpoint"):
        fit(config, run_dir=tmp_path / "run")
    last = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=False)
    assert last["epoch"] == 0 and last["global_step"] == 3
    assert not (tmp_path / "run/metrics.json").exists()


@pytest.mark.parametrize("at_step", [4, 5])  # mid-epoch; the epoch's last step (validation and checkpoint follow)
def test_a_deferred_finite_check_names_the_step_and_saves_no_bad_weights(imagefolder: Path, tmp_path: Path,
                                                                         toy_terms: type, at_step: int,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # On a GPU the check of step k is read at step k + 1 or before any checkpoint or validation; forced on here.
    init = FiniteGuard.__init__
    monkeypatch.setattr(FiniteGuard, "__init__", lambda self, defer=None: init(self, defer=True))
    config = tiny_config(imagefolder, epochs=3)
    config = FitConfig(data=config.data, model=config.model, optim=config.optim, trainer=config.trainer,
                       regularizers=(TermSpec("toy_nan", {"at_step": at_step}),))
    with pytest.raises(NonFiniteLossError, match=rf"step {at_step} \(epoch 2, batch {at_step - 3}\).*toy_nan=nan"):
        fit(config, run_dir=tmp_path / "run")
    last = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=False)
    assert last["epoch"] == 0 and last["global_step"] == 3  # the bad update reached no checkpoint
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_every_training_step_runs_its_terms_with_labels_checked_on_the_cpu(imagefolder: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # The batch's labels are range-checked before the transfer, so the terms (here LM-Softmax) need not read them
    # back from a GPU; every training step must run inside labels_verified for the model's classes.
    from regtune.train import module as module_module

    entered: list[int] = []
    real = module_module.labels_verified

    def spy(classes: int) -> object:  # a context manager, as the real one
        entered.append(classes)
        return real(classes)

    monkeypatch.setattr(module_module, "labels_verified", spy)
    config = apply_overrides(tiny_config(imagefolder, epochs=2), {"criterion": "lm_softmax"})
    fit(config, run_dir=tmp_path / "run")
    steps = read_epoch_log(tmp_path / "run/steps.csv")
    assert len(entered) == len(steps) > 0 and set(entered) == {3}


def test_finite_guard_defers_to_the_next_watch_or_resolve() -> None:
    guard = FiniteGuard(defer=True)
    terms = {"ce": torch.tensor(0.5), "bad": torch.tensor(float("inf"))}
    guard.watch(torch.tensor(1.0), {"ce": torch.tensor(1.0)}, "step 0")
    guard.watch(torch.tensor(float("inf")), terms, "step 1")  # step 0 was finite: nothing raised
    with pytest.raises(NonFiniteLossError, match=r"at step 1: ce=0\.5, bad=inf"):
        guard.resolve()
    guard.resolve()  # read once
    guard.watch(torch.tensor(float("nan")), terms, "step 2")
    with pytest.raises(NonFiniteLossError, match="at step 2"):
        guard.watch(torch.tensor(1.0), terms, "step 3")
    with pytest.raises(NonFiniteLossError, match="at step 4"):  # undeferred: at once
        FiniteGuard(defer=False).watch(torch.tensor(float("nan")), terms, "step 4")


def test_paper_selection_is_labelled(imagefolder: Path, tmp_path: Path) -> None:
    config = tiny_config(imagefolder, epochs=2, select="test_acc")
    metrics = fit(config, run_dir=tmp_path / "run").metrics
    assert metrics["selection"] == "test_acc" and "TEST" in metrics["selection_note"]
    assert metrics["best_val"] == pytest.approx(metrics["test_acc"])  # the test set chose the checkpoint


def test_empty_validation_split_is_an_error_not_a_silent_fallback(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path / "data", classes=2, train_per_class=4, test_per_class=2)
    config = apply_overrides(tiny_config(root, epochs=1), {"data.val_fraction": 0.2})  # floor(0.2 x 4) = 0 per class
    with pytest.raises(ValueError, match="needs a validation split"):
        fit(config, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert fit(apply_overrides(config, {"trainer.select": "last"}), run_dir=tmp_path / "run").metrics["selection"] \
        == "last"


def test_train_fraction_shortens_every_epoch_and_the_schedule(imagefolder: Path, tmp_path: Path) -> None:
    # 24 training images, batch 8: 3 batches per epoch; a fraction of 2/3 runs 2 of them, for every epoch
    result = fit(tiny_config(imagefolder, epochs=2, train_fraction=2 / 3), run_dir=tmp_path / "run")
    rows = read_epoch_log(result.run_dir / "epochs.csv")
    assert [r["step"] for r in rows] == [2, 4]
    assert rows[-1]["lr/backbone"] == pytest.approx(0.0, abs=1e-12)  # the cosine schedule ends with the last step
    with pytest.raises(ValueError, match="train_fraction"):
        tiny_config(imagefolder, train_fraction=0.0)


class _SigtermAt(pl.Callback):
    """Sends the process SIGTERM at the end of one training batch (what a cluster does before preemption)."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.at = (epoch, batch)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: object, batch: object,
                           batch_idx: int) -> None:
        if (trainer.current_epoch, batch_idx) == self.at:
            import signal

            signal.raise_signal(signal.SIGTERM)


class _SlowBatchAt(pl.Callback):
    """A batch that takes ``seconds`` longer, on a clock that the test moves forward (no real sleep, so the epoch
    times compared below do not depend on how busy the machine is)."""

    def __init__(self, epoch: int, batch: int, seconds: float, clock: dict[str, float]) -> None:
        self.at, self.seconds, self.clock = (epoch, batch), seconds, clock

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: object, batch: object,
                           batch_idx: int) -> None:
        if (trainer.current_epoch, batch_idx) == self.at:
            self.clock["offset"] += self.seconds


def test_sigterm_mid_epoch_saves_and_resumes_bit_identical(imagefolder: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM after batch 2 of epoch 2 (of 3 per epoch): a checkpoint of that batch, and a resume whose every step,
    epoch mean and final number equals the uninterrupted run's. Dropout and AdaRand (which draws random features
    every step) make the model consume the global generators, so this also checks their restored state."""
    config = apply_overrides(tiny_config(imagefolder, epochs=3),
                             {"model.drop_rate": 0.3, "regularizers": [{"name": "adarand"}]})
    # a slow first batch of the interrupted epoch (100 s on the epoch log's clock): its time must count in that
    # epoch's time after the resume, and not in the next epoch's
    clock = {"offset": 0.0}
    real_clock = time.perf_counter
    monkeypatch.setattr(callbacks_module, "time", SimpleNamespace(perf_counter=lambda: real_clock() + clock["offset"]))
    stopped = fit(config, run_dir=tmp_path / "cut", callbacks=[_SlowBatchAt(1, 0, 100.0, clock), _SigtermAt(1, 1)])
    assert stopped.interrupted and not (stopped.run_dir / "metrics.json").exists()
    checkpoint = torch.load(stopped.run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["global_step"] == 3 + 2  # one epoch of 3 batches, then 2
    assert checkpoint["callbacks"]["MidEpochResume"]["rng"]["torch"].dtype == torch.uint8
    resumed = fit(run_dir=tmp_path / "cut", resume=True)
    whole = fit(config, run_dir=tmp_path / "whole")
    assert {k: whole.metrics[k] for k in COMPARED} == {k: resumed.metrics[k] for k in COMPARED}
    assert read_epoch_log(whole.run_dir / "steps.csv") == read_epoch_log(resumed.run_dir / "steps.csv")
    for a, b in zip(read_epoch_log(whole.run_dir / "epochs.csv"), read_epoch_log(resumed.run_dir / "epochs.csv"),
                    strict=True):
        assert {k: v for k, v in a.items() if k != "time_s"} == {k: v for k, v in b.items() if k != "time_s"}
    times = [r["time_s"] for r in read_epoch_log(resumed.run_dir / "epochs.csv")]
    assert times[1] >= 100.0 and times[2] < 100.0  # the resumed epoch holds its slow batch; the next starts afresh
    final = [torch.load(r.run_dir / "checkpoints/last.ckpt", weights_only=True)["state_dict"] for r in (whole, resumed)]
    assert final[0].keys() == final[1].keys()
    torch.testing.assert_close(final[0], final[1], rtol=0, atol=0)


def test_same_numbers_with_and_without_data_workers(imagefolder: Path, tmp_path: Path) -> None:
    """Each sample's augmentation is seeded from (seed, epoch, index), so the loading processes do not matter."""
    config = tiny_config(imagefolder, epochs=2)
    main = fit(config, run_dir=tmp_path / "main")
    workers = fit(apply_overrides(config, {"data.num_workers": 2}), run_dir=tmp_path / "workers")
    assert {k: main.metrics[k] for k in COMPARED} == {k: workers.metrics[k] for k in COMPARED}
    assert read_epoch_log(main.run_dir / "steps.csv") == read_epoch_log(workers.run_dir / "steps.csv")


def test_first_ctrl_c_stops_after_the_batch_a_second_at_once(tmp_path: Path) -> None:
    """Ctrl-C during training becomes Lightning's SIGTERM stop (end of the batch, checkpoint); a second Ctrl-C, or one
    when no trainer listens for SIGTERM, interrupts at once."""
    import signal

    from regtune.train.callbacks import Preemption

    received: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        preemption = Preemption(tmp_path / "last.ckpt")
        preemption.sigint_handler(signal.SIGINT, None)
        assert received == [signal.SIGTERM]
        with pytest.raises(KeyboardInterrupt):
            preemption.sigint_handler(signal.SIGINT, None)
        assert received == [signal.SIGTERM]
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # no trainer running: nothing would stop after a batch
        with pytest.raises(KeyboardInterrupt):
            Preemption(tmp_path / "last.ckpt").sigint_handler(signal.SIGINT, None)
    finally:
        signal.signal(signal.SIGTERM, previous)


class _SigtermInValidation(pl.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: object, **kwargs: object) -> None:
        if trainer.current_epoch == self.epoch and not trainer.sanity_checking:
            import signal

            signal.raise_signal(signal.SIGTERM)


def test_sigterm_during_validation_finishes_the_epoch_and_resumes_identically(imagefolder: Path,
                                                                             tmp_path: Path) -> None:
    """A stop while epoch 2 validates: Lightning finishes that epoch (validation, logs, its checkpoint) and stops
    there; the resume starts epoch 3 and ends with the uninterrupted run's numbers."""
    config = tiny_config(imagefolder, epochs=3)
    stopped = fit(config, run_dir=tmp_path / "cut", callbacks=[_SigtermInValidation(1)])
    assert stopped.interrupted
    checkpoint = torch.load(stopped.run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["global_step"] == 6  # two whole epochs of 3 batches
    assert [r["epoch"] for r in read_epoch_log(stopped.run_dir / "epochs.csv")] == [1, 2]
    resumed = fit(run_dir=tmp_path / "cut", resume=True)
    whole = fit(config, run_dir=tmp_path / "whole")
    assert {k: whole.metrics[k] for k in COMPARED} == {k: resumed.metrics[k] for k in COMPARED}
    assert read_epoch_log(whole.run_dir / "steps.csv") == read_epoch_log(resumed.run_dir / "steps.csv")


class _RunsCodeOnLoad:
    """Unpickling this touches a file: what a checkpoint from someone else could do if loaded with pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_checkpoints_that_would_run_code_on_load_are_refused(imagefolder: Path, tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    stopped = fit(tiny_config(imagefolder, epochs=3), run_dir=tmp_path / "cut", callbacks=[_StopAt(1)])
    assert stopped.interrupted
    torch.save({"state_dict": {}, "payload": _RunsCodeOnLoad(marker)}, stopped.run_dir / "checkpoints" / "last.ckpt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        fit(run_dir=tmp_path / "cut", resume=True)  # --resume
    finished = fit(tiny_config(imagefolder, epochs=1), run_dir=tmp_path / "done")
    selected = finished.run_dir / "checkpoints" / "best.ckpt"
    torch.save({"state_dict": {}, "payload": _RunsCodeOnLoad(marker)}, selected)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        RunDir(finished.run_dir).load_model(finished.metrics["num_classes"])  # analyze, cam, reports
    assert not marker.exists()


def test_every_run_names_its_classes(tmp_path: Path) -> None:
    from regtune.models.weights import read_class_names

    root = write_imagefolder(tmp_path / "data", classes=3)
    for folder, name in (("class_0", "sneaker"), ("class_1", "ankle boot"), ("class_2", "bag")):
        for split in ("train", "test"):
            (root / split / folder).rename(root / split / name)
    result = fit(tiny_config(root, epochs=1), run_dir=tmp_path / "run")
    names = ["ankle boot", "bag", "sneaker"]  # ImageFolder's sorted order, the head's output order
    assert result.metrics["class_names"] == names and len(result.metrics["test_class_acc"]) == 3
    for checkpoint in ("last.ckpt", "best.ckpt"):
        state = torch.load(result.run_dir / "checkpoints" / checkpoint, weights_only=True)
        assert state["regtune_class_names"] == names
    wise = fit(dataclasses.replace(tiny_config(root, epochs=1), model=ModelConfig(
        backbone=TINY_BACKBONE, pretrained="none", head_init="lp"), trainer=TrainerConfig(
        epochs=1, progress_bar=False, accelerator="cpu", wise_alphas=(0.0, 1.0))), run_dir=tmp_path / "wise")
    assert read_class_names(wise.run_dir / "checkpoints" / "start.safetensors") == names
    assert read_class_names(wise.run_dir / wise.metrics["model_file"]) == names  # the tested mix
