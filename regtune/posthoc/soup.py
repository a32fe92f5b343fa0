"""`regtune soup`: a greedy model soup of finished runs, written as a run directory of its own.

Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy without increasing
inference time", ICML 2022, arXiv 2203.05482, greedy soup (their Recipe 1): rank the ingredients (fine-tuned runs of
one pretrained model) by validation accuracy; start the soup with the best; for each next one, keep it if the
uniform weight average of the soup and it does not lose validation accuracy. The soup is tested once, at the end.

The ingredients must share the backbone, the task, the preprocessing, the split (``split.json``: the validation
images that choose the members must be held out by every ingredient) and the architecture (the same state-dict keys
and shapes). The output directory is a finished run directory (``config.yaml``, ``split.json``,
``model.safetensors``, ``metrics.json``) that `RunDir` reads like any run, plus
``soup.json``: every ingredient in greedy order with its validation accuracy, and each candidate's soup accuracy and
whether it was kept. ``soup.json`` is rewritten after every evaluation, so the same command continues an interrupted
soup.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from regtune._io import atomic_write_bytes, atomic_write_json, atomic_write_text
from regtune.analysis.imbalance import imbalance_metrics
from regtune.data.subset import read_manifest
from regtune.data.transforms import TransformedSubset, build_transforms
from regtune.models import forward_parts
from regtune.train.averaging import average_states, check_same_layout
from regtune.train.config import FitConfig, save_config
from regtune.train.fit import train_class_counts
from regtune.train.rundir import RunDir, RunDirError, find_runs, library_versions, run_preprocessing

__all__ = ["SOUP_FILE", "Score", "SoupResult", "SoupStep", "greedy_soup", "make_soup", "rank_ingredients"]

_log = logging.getLogger(__name__)

SOUP_FILE = "soup.json"

SELECTION_NOTE = ("greedy model soup (Wortsman et al., ICML 2022): the runs ranked by validation accuracy, each "
                  "added to the uniform weight average if the soup's validation accuracy does not drop")


@dataclass(frozen=True)
class Score:
    """Validation accuracy and mean cross-entropy of a model (an ingredient, or a soup)."""

    acc: float
    loss: float


@dataclass(frozen=True)
class SoupStep:
    """One candidate of the greedy pass: the soup's score with it, and whether it stays."""

    candidate: int
    score: Score
    kept: bool


@dataclass(frozen=True)
class SoupResult:
    """What `make_soup` made."""

    run_dir: Path
    members: list[Path]
    val_acc: float
    test_acc: float
    metrics: dict[str, Any]


def rank_ingredients(scores: Sequence[Score]) -> list[int]:
    """Indices of ``scores`` by validation accuracy, highest first; ties: the lower loss, then the earlier index."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i].acc, scores[i].loss, i))


def greedy_soup(
        scores: Sequence[Score],
        evaluate: Callable[[list[int]], Score],
        done: Sequence[SoupStep] = (),
        on_step: Callable[[list[SoupStep]], None] | None = None,
        names: Sequence[str] | None = None,
) -> tuple[list[int], list[SoupStep]]:
    """The greedy soup's members (Wortsman et al. 2022, Recipe 1), with its I/O left to callables.

    The ingredients are ranked by `rank_ingredients`; the soup starts as the best one (with its own score);
    each next candidate c is kept iff ``evaluate(members + [c]).acc`` >= the current soup's accuracy.

    Args:
        scores: Each ingredient's own validation score.
        evaluate: The validation score of the uniform average of the ingredients it is given (indices into
            ``scores``, in the order added).
        done: Steps of an earlier, interrupted pass, reused instead of evaluated again (they must follow the
            ranking).
        on_step: Called with the steps so far after each newly evaluated candidate (to save progress).
        names: Ingredient names for the log (default: their indices).

    Returns:
        ``(members in the order added, one step per candidate)``.

    Raises:
        ValueError: no ingredient, or ``done`` does not follow the ranking of ``scores``.
    """
    if not scores:
        raise ValueError("a soup needs at least one ingredient")
    order = rank_ingredients(scores)
    if len(done) > len(order) - 1 or [s.candidate for s in done] != order[1:len(done) + 1]:
        raise ValueError(f"the recorded steps (candidates {[s.candidate for s in done]}) do not follow the ranking "
                         f"of the ingredients {order}")
    members, current = [order[0]], scores[order[0]]
    steps: list[SoupStep] = []
    for position, candidate in enumerate(order[1:], start=1):
        step = done[position - 1] if position <= len(done) else None
        if step is None:
            score = evaluate([*members, candidate])
            step = SoupStep(candidate, score, score.acc >= current.acc)
            name = names[candidate] if names is not None else str(candidate)
            _log.info("soup candidate %d/%d (%s): validation accuracy %.4f with it, %.4f without: %s", position,
                      len(order) - 1, name, score.acc, current.acc, "kept" if step.kept else "left out")
        steps.append(step)
        if step.kept:
            members.append(candidate)
            current = step.score
        if position > len(done) and on_step is not None:
            on_step(list(steps))
    return members, steps


# -- ingredients ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ingredient:
    """A finished run and what the checks read from it."""

    run: RunDir
    config: FitConfig
    metrics: dict[str, Any]
    split: dict[str, Any]  # split.json

    @property
    def name(self) -> str:
        return str(self.run.path)


_SHARED: dict[str, Callable[[_Ingredient], Any]] = {  # what every ingredient must share -> how to read it
    "backbone (model.backbone)": lambda i: i.config.model.backbone,
    "dataset (data.dataset)": lambda i: i.config.data.dataset,
    "number of classes": lambda i: i.metrics.get("num_classes"),
    "input size (data.img_size)": lambda i: i.config.data.img_size,
    "evaluation crop (data.crop_pct)": lambda i: i.config.data.crop_pct,
}


def _read_ingredients(paths: Sequence[str | Path]) -> list[_Ingredient]:
    """The finished runs among ``paths`` (each once, in the order found)."""
    runs, seen = [], set()
    for run in find_runs(paths):
        key = run.path.resolve()
        if key not in seen:
            seen.add(key)
            runs.append(RunDir(key))
    if not runs:
        raise FileNotFoundError(f"no finished run (metrics.json) under {', '.join(map(str, paths))}: a soup is made of "
                                "finished runs (give run directories or folders holding them)")
    return [_Ingredient(run, run.config(), run.metrics(), read_manifest(run.split_path)) for run in runs]


def _check_compatible(ingredients: Sequence[_Ingredient]) -> None:
    """Refuse ingredients that do not share backbone, task, preprocessing and split, or have no validation split."""
    first = ingredients[0]
    for other in ingredients[1:]:
        for what, read in _SHARED.items():
            if read(other) != read(first):
                raise ValueError(f"{other.name} differs from {first.name} in its {what}: {read(other)!r} vs "
                                 f"{read(first)!r}; a soup averages runs of one backbone, task and preprocessing")
        for part in ("train", "val"):
            if sorted(other.split[part]) != sorted(first.split[part]):
                raise ValueError(
                    f"{other.name} and {first.name} were trained on different splits (their split.json {part} ids "
                    "differ); a soup's members are chosen on validation images that every ingredient held out, so "
                    "they must share one split: runs of one seed in a grid do; train the others with "
                    f"--split-manifest {first.run.split_path}")
    if not first.split["val"]:
        raise ValueError(f"the runs have no validation split ({first.run.split_path} holds no val id): a greedy soup "
                         "chooses its members on validation images; train the runs with data.val_fraction > 0")


def _load_models(ingredients: Sequence[_Ingredient]) -> tuple[list[torch.nn.Module], dict[str, Any]]:
    """Each ingredient's model as it was tested (CPU, eval mode), checked to share one architecture and
    preprocessing; and that preprocessing."""
    num_classes = int(ingredients[0].metrics["num_classes"])
    models, preprocessing = [], None
    for ingredient in ingredients:
        model, _, _ = ingredient.run.load_model(num_classes, config=ingredient.config)
        models.append(model)
        own = run_preprocessing(model, ingredient.config)
        if preprocessing is None:
            preprocessing = own
            continue
        first = ingredients[0].name
        if own != preprocessing:
            raise ValueError(f"{ingredient.name} preprocesses its images differently from {first} ({own} vs "
                             f"{preprocessing}); a soup is evaluated with one preprocessing")
        try:
            check_same_layout(models[0].state_dict(), model.state_dict(), (first, ingredient.name))
            modules = [(n, type(m).__name__) for n, m in model.named_modules()]
            reference = [(n, type(m).__name__) for n, m in models[0].named_modules()]
            if modules != reference:
                where = next((a for a, b in zip(modules, reference) if a != b), None)
                raise ValueError(f"module {where[0]!r} is a {where[1]} in {ingredient.name} but not in {first}"
                                 if where else f"{ingredient.name} and {first} have different numbers of modules")
        except ValueError as err:
            raise ValueError(f"{err}. The ingredients of a soup must share one architecture: runs whose criterion or "
                             "regularizers change the model (LM-Softmax's cosine head, StochNorm's layers) cannot be "
                             "mixed with runs that do not") from err
    return models, preprocessing


# -- the output directory and its progress ----------------------------------------------------------------------------


def _previous_progress(out: Path, inputs: list[str], overwrite: bool) -> dict[str, Any] | None:
    """``soup.json`` of an interrupted soup of the same runs in ``out`` (to continue), or ``None`` for a new soup.

    Raises:
        ValueError: ``out`` is one of the runs or holds them.
        RunDirError: ``out`` holds a finished run or soup, another soup, or other files, and ``overwrite`` is off.
    """
    for run in map(Path, inputs):
        if run == out or out in run.parents:
            raise ValueError(f"--out {out} is or holds the ingredient run {run}; choose a new folder")
    if overwrite or not out.exists() or not any(out.iterdir()):
        return None
    soup_json = out / SOUP_FILE
    if RunDir(out).finished:
        raise RunDirError(f"{out} already holds a finished {'soup' if soup_json.is_file() else 'run'}; choose "
                          "another --out, or pass --overwrite")
    if not soup_json.is_file():
        raise RunDirError(f"{out} holds files but no {SOUP_FILE} (not a soup in progress); choose another --out, or "
                          "pass --overwrite to replace them")
    record = json.loads(soup_json.read_text())
    if record.get("inputs") != inputs:
        raise RunDirError(f"{out} holds an unfinished soup of other runs ({len(record.get('inputs', []))} inputs, "
                          f"see its {SOUP_FILE}); give the same runs to continue it, another --out, or --overwrite")
    _log.info("continuing the soup in %s", out)
    return record


def _record(inputs: list[str], scores: list[Score | None], steps: Sequence[SoupStep],
            test: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``soup.json`` holds: the ingredients in greedy order (in input order until all are scored), each with
    its validation score, the soup's score with it and whether it was kept (``null`` until evaluated)."""
    entries = [{"run": inputs[i], "val_acc": s.acc, "val_loss": s.loss, "soup_val_acc": None, "soup_val_loss": None,
                "kept": None} for i, s in enumerate(scores) if s is not None]
    record: dict[str, Any] = {"inputs": inputs, "selection_note": SELECTION_NOTE, "ingredients": entries}
    if any(s is None for s in scores):
        return record
    order = rank_ingredients(scores)
    entries = [entries[i] for i in order]
    entries[0].update(soup_val_acc=scores[order[0]].acc, soup_val_loss=scores[order[0]].loss, kept=True)
    members, current = [inputs[order[0]]], scores[order[0]]
    for entry, step in zip(entries[1:], steps):
        entry.update(soup_val_acc=step.score.acc, soup_val_loss=step.score.loss, kept=step.kept)
        if step.kept:
            members.append(entry["run"])
            current = step.score
    record.update(ingredients=entries, members=members, soup_val_acc=current.acc, soup_val_loss=current.loss,
                  finished=len(steps) == len(scores) - 1 and test is not None)
    if test is not None:
        record["test"] = test
    return record


def _read_record(record: dict[str, Any] | None, inputs: list[str]) -> tuple[list[Score | None], list[SoupStep]]:
    """The scores and the steps an earlier ``soup.json`` holds."""
    scores: list[Score | None] = [None] * len(inputs)
    steps: list[SoupStep] = []
    if record is None:
        return scores, steps
    index = {run: i for i, run in enumerate(inputs)}
    for entry in record["ingredients"]:
        scores[index[entry["run"]]] = Score(entry["val_acc"], entry["val_loss"])
    if all(s is not None for s in scores):
        for entry in record["ingredients"][1:]:
            if entry["kept"] is None:
                break
            steps.append(SoupStep(index[entry["run"]], Score(entry["soup_val_acc"], entry["soup_val_loss"]),
                                  entry["kept"]))
    return scores, steps


# -- evaluation -------------------------------------------------------------------------------------------------------


def _autocast(precision: str, device: str) -> contextlib.AbstractContextManager:
    """The forward passes at a run's precision (``trainer.precision``), as Lightning runs them in ``fit``."""
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype else contextlib.nullcontext()


@torch.no_grad()
def _evaluate(model: torch.nn.Module, batches: Iterable[Sequence[torch.Tensor]], num_classes: int,
              device: str, precision: str = "32-true") -> dict[str, Any]:
    """Accuracy, mean cross-entropy, per-class and mean per-class accuracy, as ``fit`` tests (sums in float64)."""
    model.to(device).eval()
    loss = torch.zeros((), dtype=torch.float64)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long)
    try:
        for images, labels, *_ in batches:
            with _autocast(precision, device):
                logits = forward_parts(model, images.to(device))[2]
            logits = logits.float().cpu()
            loss += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").double()
            confusion += torch.bincount(labels * num_classes + logits.argmax(-1), minlength=num_classes ** 2)
    finally:
        model.to("cpu")
    confusion = confusion.view(num_classes, num_classes)  # [true class, predicted class]
    counts, hits = confusion.sum(1), confusion.diagonal()
    total = int(counts.sum())
    if total == 0:
        raise ValueError("no image to evaluate on")
    present = counts > 0
    return {"acc": float(hits.sum()) / total, "loss": float(loss) / total,
            "mean_class_acc": float((hits[present].double() / counts[present].double()).mean()),
            "class_acc": [float(h) / float(c) if c > 0 else None for h, c in zip(hits.tolist(), counts.tolist())],
            "confusion": confusion.tolist()}


@dataclass(frozen=True)
class _Data:
    """The shared validation images (transformed once, kept in memory: every soup is evaluated on them), the
    test loader, and the precision of the forward passes (the first run's ``trainer.precision``)."""

    val_batches: list[Sequence[torch.Tensor]]
    test_loader: DataLoader
    num_train: int
    precision: str
    class_names: list[str]
    train_counts: list[int]  # training images per class (the imbalance metrics' groups)


def _load_data(ingredient: _Ingredient, preprocessing: dict[str, Any], batch_size: int | None,
               num_workers: int) -> _Data:
    config = ingredient.config
    train_set = ingredient.run.dataset("train", config)
    test_set = ingredient.run.dataset("test", config)
    split = ingredient.run.split(train_set)
    _, eval_tf = build_transforms(preprocessing)  # the evaluation transform depends on the preprocessing alone
    size = batch_size or config.data.eval_batch_size
    val = DataLoader(TransformedSubset(train_set, split.val, eval_tf), batch_size=size, num_workers=num_workers)
    test = DataLoader(TransformedSubset(test_set, range(len(test_set)), eval_tf), batch_size=size,
                      num_workers=num_workers)
    return _Data(list(val), test, len(split.train), config.trainer.precision, [str(c) for c in train_set.classes],
                 train_class_counts(train_set, split))


def _check_device(device: str) -> str:
    kind = torch.device(device).type  # an unknown name raises here
    if kind == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device}, but no CUDA device is visible; use --device cpu")
    return device


# -- the soup ---------------------------------------------------------------------------------------------------------


def _metrics(best: _Ingredient, record: dict[str, Any], test: dict[str, Any], data: _Data,
             preprocessing: dict[str, Any], resumed: bool, started: float) -> dict[str, Any]:
    """``metrics.json`` of the soup: ``fit``'s keys where they mean something for a soup."""
    config = best.config
    return {
        "test_acc": test["acc"],
        "test_loss": test["loss"],
        "test_mean_class_acc": test["mean_class_acc"],
        "test_class_acc": test["class_acc"],
        # test_bal_acc, test_macro_f1, test_class_acc_by_name, test_groups: as fit writes them
        **imbalance_metrics(test["confusion"], data.train_counts, data.class_names),
        "tested": True,
        "selection": "greedy_soup",
        "selection_note": SELECTION_NOTE,
        "selected_epoch": None,
        "selected_checkpoint": None,
        "best_val": record["soup_val_acc"],
        "model_file": "model.safetensors",
        "soup": record["members"],
        "soup_size": len(record["members"]),
        "ingredients": len(record["inputs"]),
        "num_train": data.num_train,
        "train_class_counts": data.train_counts,
        "num_val": len(best.split["val"]),
        "num_test": len(data.test_loader.dataset),
        "num_classes": best.metrics["num_classes"],
        "class_names": data.class_names,
        "dataset": config.data.dataset,
        "backbone": config.model.backbone,
        "weights": best.metrics.get("weights"),
        "input_size": list(preprocessing["input_size"]),
        "preprocessing": {k: (list(v) if isinstance(v, tuple) else v) for k, v in preprocessing.items()},
        "regularizers": [r.name for r in config.regularizers],
        "criterion": config.criterion.name,
        "seed": config.trainer.seed,
        "eval_precision": data.precision,
        "wall_time_s": round(time.perf_counter() - started, 2),
        "resumed": resumed,
        "versions": library_versions(),
    }


def _write_soup(out: RunDir, best: _Ingredient, state: dict[str, torch.Tensor], metrics: dict[str, Any]) -> None:
    """The soup's run directory: the best ingredient's config and the shared split, the weights, then the metrics
    (last: they mark it finished)."""
    from regtune.models.weights import weights_file_bytes

    save_config(best.config, out.config_path)
    atomic_write_text(out.split_path, best.run.split_path.read_text())
    atomic_write_bytes(out.model_path, weights_file_bytes(state, metrics["class_names"]))
    atomic_write_json(out.metrics_path, metrics)


def _score_ingredients(models: Sequence[torch.nn.Module], inputs: list[str], scores: list[Score | None],
                       data: _Data, num_classes: int, device: str, save: Callable[[], None]) -> list[Score]:
    """Each ingredient's own validation score (those an interrupted soup scored already are kept)."""
    for i, model in enumerate(models):
        if scores[i] is None:
            result = _evaluate(model, data.val_batches, num_classes, device, data.precision)
            scores[i] = Score(result["acc"], result["loss"])
            _log.info("ingredient %d/%d (%s): validation accuracy %.4f, loss %.4f", i + 1, len(models), inputs[i],
                      result["acc"], result["loss"])
            save()
    return list(scores)


def make_soup(
        paths: Sequence[str | Path],
        out: str | Path,
        overwrite: bool = False,
        device: str = "cpu",
        batch_size: int | None = None,
        num_workers: int = 0,
) -> SoupResult:
    """Make the greedy soup of the finished runs in ``paths`` and write it as a finished run directory ``out``.

    Every check (runs found and finished, shared backbone, task, preprocessing, split and architecture, a
    validation split, ``out`` free) passes before anything is written. An unfinished soup of the same runs in
    ``out`` is continued. The forward passes run at the first run's ``trainer.precision`` (``metrics.json``'s
    ``eval_precision``).

    Args:
        paths: Run directories, or folders holding them (every finished run below is an ingredient).
        out: The soup's directory.
        overwrite: Replace what ``out`` holds (a finished soup or run, another soup).
        device: Where the models are evaluated (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        batch_size: Evaluation batch size (default: the first run's ``data.eval_batch_size``).
        num_workers: DataLoader workers reading the images.

    Returns:
        The `SoupResult`.

    Raises:
        FileNotFoundError: no finished run in ``paths``.
        ValueError: runs that cannot be souped together, or no validation split.
        RunDirError: ``out`` holds something and ``overwrite`` is off.
    """
    started = time.perf_counter()
    _check_device(device)
    ingredients = _read_ingredients(paths)
    _check_compatible(ingredients)
    inputs = [i.name for i in ingredients]
    run = RunDir(Path(out).resolve())
    previous = _previous_progress(run.path, inputs, overwrite)
    models, preprocessing = _load_models(ingredients)
    data = _load_data(ingredients[0], preprocessing, batch_size, num_workers)
    num_classes = int(ingredients[0].metrics["num_classes"])
    if overwrite and run.path.exists():
        shutil.rmtree(run.path)
    run.path.mkdir(parents=True, exist_ok=True)
    scores, done = _read_record(previous, inputs)

    def save(steps: Sequence[SoupStep] = done, test: dict[str, Any] | None = None) -> dict[str, Any]:
        record = _record(inputs, scores, steps, test)
        atomic_write_json(run.path / SOUP_FILE, record)
        return record

    _score_ingredients(models, inputs, scores, data, num_classes, device, save)
    vessel = copy.deepcopy(models[rank_ingredients(scores)[0]])

    def evaluate(members: list[int]) -> Score:
        vessel.load_state_dict(average_states([models[i].state_dict() for i in members]), strict=True)
        result = _evaluate(vessel, data.val_batches, num_classes, device, data.precision)
        return Score(result["acc"], result["loss"])

    members, steps = greedy_soup(scores, evaluate, done=done, on_step=save, names=inputs)
    state = average_states([models[i].state_dict() for i in members])
    vessel.load_state_dict(state, strict=True)
    test = _evaluate(vessel, data.test_loader, num_classes, device, data.precision)  # the soup's one test
    record = save(steps, {k: test[k] for k in ("acc", "loss", "mean_class_acc")})
    metrics = _metrics(ingredients[members[0]], record, test, data, preprocessing, previous is not None, started)
    _write_soup(run, ingredients[members[0]], state, metrics)
    _log.info("soup of %d of %d runs: validation accuracy %.4f, test accuracy %.4f -> %s", len(members), len(inputs),
              record["soup_val_acc"], test["acc"], run)
    return SoupResult(run.path, [Path(inputs[i]) for i in members], record["soup_val_acc"], test["acc"], metrics)
