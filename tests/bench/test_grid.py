"""`regtune bench` grids: parsing, expansion, shared splits, skipping finished runs, resuming a killed grid."""

from __future__ import annotations

import csv
import json
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from regtune.bench.aggregate import collect_grid, write_report
from regtune.bench.grid import GridError, expand, grid_from_dict, load_grid, parse_shard, run_grid
from regtune.bench.shipped import grid_description, shipped_grids
from regtune.cli import main
from regtune.train.config import ModelConfig, OptimConfig, TrainerConfig
from regtune.train.fit import fit
from tests.conftest import TINY_BACKBONE, write_imagefolder
from tests.train.test_fit import _StopAt


def tiny_grid(root: Path, out: Path, **extra: Any) -> dict[str, Any]:
    return {
        "name": "tiny",
        "out": str(out),
        "base": {"data": {"dataset": "imagefolder", "root": str(root), "img_size": 32, "val_fraction": 0.2,
                          "batch_size": 8, "num_workers": 0},
                 "model": {"backbone": TINY_BACKBONE, "pretrained": "none"},
                 "trainer": {"epochs": 2, "progress_bar": False, "channels_last": False}},
        "fractions": [0.5, 1.0],
        "seeds": [0, 1],
        "methods": {"ft": {}, "fnp": {"regularizers": [{"name": "fnp", "args": {"weight": 0.01}}]}},
        **extra,
    }


def test_expand_order_paths_and_overrides(tmp_path: Path) -> None:
    spec = tiny_grid(tmp_path / "data", tmp_path / "out", axes={"optim.lr": [0.01, 0.1]})
    spec["methods"]["ls"] = {"criterion": {"name": "ce", "args": {"label_smoothing": 0.1}}, "set": {"optim.lr": 0.5}}
    grid = grid_from_dict(spec)
    runs = list(expand(grid))
    assert len(runs) == 2 * 2 * 2 * 3  # fractions x lr x seeds x methods
    first = runs[:6]  # one cell: its seeds, each with every method
    assert [(r.method, r.seed) for r in first] == [("ft", 0), ("fnp", 0), ("ls", 0), ("ft", 1), ("fnp", 1), ("ls", 1)]
    assert {r.config.data.fraction for r in first} == {0.5} and {r.config.optim.lr for r in first if r.method != "ls"} \
        == {0.01}
    assert all(r.config.optim.lr == 0.5 for r in runs if r.method == "ls")  # a method's own 'set' wins
    assert runs[1].config.regularizers[0].args == {"weight": 0.01}
    assert runs[0].run_dir == tmp_path / "out" / "runs" / "imagefolder-f0.5-lr0.01" / "ft" / "s0"
    # the methods of one (dataset, fraction, seed) share one split manifest; seeds do not
    assert len({r.split_path for r in first if r.seed == 0}) == 1
    assert len({r.split_path for r in first}) == 2
    assert len({r.run_dir for r in runs}) == len(runs)


def test_methods_name_recipes_and_refine_them_with_set(tmp_path: Path) -> None:
    spec = tiny_grid(tmp_path / "data", tmp_path / "out")
    spec["methods"] = {"ft": {"recipes": ["ft"]},
                       "wise": {"recipes": ["wise_ft", "ema"], "set": {"trainer.ema_decay": 0.9}},
                       "lp": {"recipes": ["lp"]}}
    runs = {r.method: r.config for r in expand(grid_from_dict(spec)) if r.seed == 0 and r.config.data.fraction == 1.0}
    assert runs["wise"].model.head_init == "lp" and runs["wise"].trainer.wise_alphas[-1] == 1.0
    assert runs["wise"].trainer.ema_decay == 0.9  # the method's own `set` after its recipes
    assert runs["lp"].trainer.epochs == 0 and runs["ft"].model.head_init == "normal"


def test_where_rules_override_matching_cells_only(tmp_path: Path) -> None:
    spec = tiny_grid(tmp_path / "data", tmp_path / "out",
                     where=[{"match": {"data.fraction": 1.0}, "set": {"trainer.epochs": 1, "optim.lr": 0.3}}])
    spec["methods"]["fast"] = {"set": {"optim.lr": 0.7}}
    runs = list(expand(grid_from_dict(spec)))
    for run in runs:
        full = run.config.data.fraction == 1.0
        assert run.config.trainer.epochs == (1 if full else 2)
        expected_lr = 0.7 if run.method == "fast" else (0.3 if full else OptimConfig().lr)  # the method's own wins
        assert run.config.optim.lr == pytest.approx(expected_lr), (run.method, run.config.data.fraction)


@pytest.mark.parametrize(("change", "message"), [
    ({"where": [{"match": {"optim.lr": 0.1}, "set": {"trainer.epochs": 1}}]}, "not an axis"),
    ({"where": [{"match": {"data.fraction": 1.0}}]}, "where\\[0\\] must be"),
    ({"where": {"match": {}}}, "must be a list"),
    ({"where": [{"match": {"data.fraction": 1.0}, "set": {"trainer.epochz": 1}}]}, "unknown config key"),
    ({"methods": {}}, "needs 'methods'"),
    ({"seedz": [0]}, "unknown grid key"),
    ({"baseline": "nope"}, "baseline 'nope'"),
    ({"per_class": [5]}, "not both"),
    ({"axes": {"optim.lrr": [0.1]}}, "unknown config key"),
    ({"methods": {"ft": {}, "bad": {"regularizers": [{"name": "fnp"}], "optim": {"lr": -1}}}}, "optim.lr"),
    ({"methods": {"ft": {}, "bad": {"recipes": ["lpft"]}}}, "method 'bad': unknown recipe 'lpft'"),
    ({"methods": {"ft": {}, "mixed": {"recipes": ["mix"], "regularizers": ["adarand"]}}},
     "adarand does not accept mixed"),
])
def test_bad_grids_are_refused_before_running(tmp_path: Path, change: dict, message: str) -> None:
    spec = {**tiny_grid(tmp_path, tmp_path / "out"), **change}
    with pytest.raises(GridError, match=message):
        grid_from_dict(spec)
    assert not (tmp_path / "out").exists()


def test_killed_grid_reruns_only_the_missing_runs(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path / "data", classes=2, train_per_class=10, test_per_class=2)
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(tiny_grid(root, tmp_path / "out")))
    grid = load_grid(grid_file)
    runs = list(expand(grid))
    assert len(runs) == 8
    calls: list[tuple[str, bool]] = []

    def killed(kill_at: int, inside: bool):
        def fit_fn(config=None, run_dir=None, resume=False, overwrite=False):
            calls.append((str(Path(run_dir).relative_to(grid.out)), resume))
            if len(calls) == kill_at:
                if not inside:
                    raise KeyboardInterrupt  # killed between two runs
                return fit(config, run_dir=run_dir, overwrite=overwrite, callbacks=[_StopAt(1)])  # during epoch 2
            return fit(config, run_dir=run_dir, resume=resume, overwrite=overwrite)
        return fit_fn

    with pytest.raises(KeyboardInterrupt):
        run_grid(grid, fit_fn=killed(3, inside=False))
    assert len(calls) == 3 and [(runs[i].run_dir / "metrics.json").is_file() for i in range(3)] == [True, True, False]
    finished = {r.run_dir: (r.run_dir / "metrics.json").stat().st_mtime_ns for r in runs[:2]}

    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        run_grid(grid, fit_fn=killed(2, inside=True))  # third run completes, the fourth is stopped inside
    assert [c[0] for c in calls] == [str(r.run_dir.relative_to(grid.out)) for r in runs[2:4]]
    assert (runs[3].run_dir / "checkpoints" / "last.ckpt").is_file() and not (runs[3].run_dir / "metrics.json").exists()

    calls.clear()
    counts = run_grid(grid, fit_fn=killed(0, inside=False))
    assert counts == {"total": 8, "other_shards": 0, "done_before": 3, "ran": 4, "resumed": 1, "failed": 0}
    assert calls[0] == (str(runs[3].run_dir.relative_to(grid.out)), True)  # the interrupted run is resumed
    assert [c[0] for c in calls[1:]] == [str(r.run_dir.relative_to(grid.out)) for r in runs[4:]]
    for run_dir, mtime in finished.items():  # finished runs were not touched
        assert (run_dir / "metrics.json").stat().st_mtime_ns == mtime

    # every method of a cell trained on the same images: the shared manifest
    for run in runs:
        config = yaml.safe_load((run.run_dir / "config.yaml").read_text())
        assert Path(config["data"]["split_manifest"]) == run.split_path.absolute()
    assert len(list((grid.out / "splits").glob("*.json"))) == 4  # 2 fractions x 2 seeds

    # a third call has nothing left to do
    calls.clear()
    assert run_grid(grid, fit_fn=killed(0, inside=False))["done_before"] == 8 and calls == []

    records = collect_grid(grid)
    assert len(records) == 8
    paths = write_report(records, tmp_path / "report", baseline="ft")
    text = paths["summary_md"].read_text()
    assert "imagefolder 50%" in text and "imagefolder 100%" in text and "| fnp |" in text


def test_other_grid_in_same_folder_is_refused(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path / "data", classes=2, train_per_class=5, test_per_class=2)
    spec = tiny_grid(root, tmp_path / "out", seeds=[0], fractions=[1.0])
    spec["methods"] = {"ft": {}}
    counts = run_grid(grid_from_dict(spec))
    assert counts["ran"] == 1
    spec["seeds"] = [0, 1]
    with pytest.raises(GridError, match="different grid"):
        run_grid(grid_from_dict(spec))


def test_failed_run_is_recorded_and_the_grid_goes_on(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path / "data", classes=2, train_per_class=5, test_per_class=2)
    spec = tiny_grid(root, tmp_path / "out", seeds=[0], fractions=[1.0])
    grid = grid_from_dict(spec)

    def fit_fn(config=None, run_dir=None, resume=False, overwrite=False):
        if "fnp" in str(run_dir):
            raise FloatingPointError("non-finite training loss at step 1")
        return fit(config, run_dir=run_dir, overwrite=overwrite)

    counts = run_grid(grid, fit_fn=fit_fn)
    assert counts["failed"] == 1 and counts["ran"] == 1
    failures = json.loads((grid.out / "failures.json").read_text())
    assert list(failures) == ["runs/imagefolder-f1.0/fnp/s0"]
    assert "non-finite" in failures["runs/imagefolder-f1.0/fnp/s0"]["error"]


@pytest.mark.parametrize("text", ["0/2", "3/2", "1", "a/b", "1/2/3"])
def test_bad_shard_is_refused(text: str) -> None:
    with pytest.raises(GridError, match="--shard"):
        parse_shard(text)


def test_shards_split_the_grid_without_overlap_and_share_failures(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path / "data", classes=2, train_per_class=10, test_per_class=2)
    grid = grid_from_dict(tiny_grid(root, tmp_path / "out"))
    runs = [r.run_dir for r in expand(grid)]
    calls: dict[int, list[Path]] = {1: [], 2: []}
    both_failing = threading.Barrier(2, timeout=30)

    def fit_fn_of(shard: int):
        def fit_fn(config=None, run_dir=None, resume=False, overwrite=False):
            run_dir = Path(run_dir)
            calls[shard].append(run_dir)
            if run_dir in runs[:2]:  # the first run of each shard fails, both at the same moment
                both_failing.wait()
                raise FloatingPointError(f"non-finite loss in {run_dir.name}")
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "metrics.json").write_text(json.dumps({"test_acc": 0.5}))
        return fit_fn

    counts: dict[int, dict[str, int]] = {}
    threads = [threading.Thread(target=lambda k=k: counts.update({k: run_grid(grid, fit_fn=fit_fn_of(k),
                                                                             shard=(k, 2))}))
               for k in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls[1] == runs[0::2] and calls[2] == runs[1::2]  # disjoint, together the whole grid, each once
    assert counts[1] == counts[2] == {"total": 8, "other_shards": 4, "done_before": 0, "ran": 3, "resumed": 0,
                                      "failed": 1}
    failures = json.loads((grid.out / "failures.json").read_text())
    assert sorted(failures) == sorted(str(r.relative_to(grid.out)) for r in runs[:2])  # neither write was lost
    assert not list(grid.out.rglob("*.tmp"))

    # rerunning one shard retries only its own failed run; its success clears that entry and keeps the other
    calls[1].clear()
    counts1 = run_grid(grid, fit_fn=lambda config=None, run_dir=None, resume=False, overwrite=False: (
        calls[1].append(Path(run_dir)), Path(run_dir).mkdir(parents=True, exist_ok=True),
        (Path(run_dir) / "metrics.json").write_text("{}")), shard=(1, 2))
    assert calls[1] == [runs[0]] and counts1["done_before"] == 3 and counts1["ran"] == 1
    assert list(json.loads((grid.out / "failures.json").read_text())) == [str(runs[1].relative_to(grid.out))]


def test_cli_bench_dry_run_and_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = write_imagefolder(tmp_path / "data", classes=2, train_per_class=5, test_per_class=2)
    grid_file = tmp_path / "g.yaml"
    grid_file.write_text(yaml.safe_dump(tiny_grid(root, tmp_path / "out", seeds=[0], fractions=[1.0])))
    assert main(["bench", str(grid_file), "--dry-run"]) == 0
    assert "2 runs: 0 finished before, 0 ran" in capsys.readouterr().out
    assert not (tmp_path / "out" / "runs").exists()
    assert main(["bench", str(grid_file)]) == 0
    out = capsys.readouterr().out
    assert "2 runs: 0 finished before, 2 ran" in out and "Paired difference to ft" in out
    assert main(["report", str(tmp_path / "out" / "runs"), "--out", str(tmp_path / "rep")]) == 0
    assert "fnp(weight=0.01)" in (tmp_path / "rep" / "summary.md").read_text()


def test_cli_bench_shard_runs_its_share_and_says_what_is_missing(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    root = write_imagefolder(tmp_path / "data", classes=2, train_per_class=5, test_per_class=2)
    grid_file = tmp_path / "g.yaml"
    grid_file.write_text(yaml.safe_dump(tiny_grid(root, tmp_path / "out", seeds=[0], fractions=[1.0])))
    first, second = (r.run_dir for r in expand(load_grid(grid_file)))
    assert main(["bench", str(grid_file), "--shard", "2/2"]) == 0
    out = capsys.readouterr().out
    assert "2 runs: 0 finished before, 1 ran, 0 resumed, 0 failed, 1 left to the other shards" in out
    assert "1 are not finished" in out
    assert (second / "metrics.json").is_file() and not first.exists()
    assert main(["bench", str(grid_file), "--shard", "3/2"]) == 2
    assert "I must be between 1 and N" in capsys.readouterr().err


def test_shipped_grids_parse_and_cover_the_methods() -> None:
    shipped = shipped_grids()
    assert "quick" in shipped, "regtune/grids/quick.yaml missing"
    for path in shipped.values():
        grid = load_grid(path.stem)
        runs = list(expand(grid))
        assert grid_description(path).endswith(f"({len(runs)} runs)"), (path.name, len(runs))  # `regtune list grids`
        names = {t.name for r in runs for t in r.config.regularizers} | {r.config.criterion.name for r in runs}
        if path.stem == "quick":  # the README's comparison: the default against LP, FT, FMR and AdaRand on it
            configs = {r.method: r.config for r in runs}
            default = configs["default"]  # the defaults' model, optimizer and WiSE-FT, whatever they are
            assert grid.baseline == "default" and (default.model, default.optim) == (ModelConfig(), OptimConfig())
            assert default.trainer.wise_alphas == TrainerConfig().wise_alphas and configs["ft"].optim.lr == 0.02
            assert {"fmr", "adarand"} <= names and {"lp", "ft"} <= set(grid.methods)
            assert len(grid.axes["trainer.seed"]) >= 3
            continue
        assert grid.baseline == "ft" and runs
        if path.stem == "baselines":  # the strong baselines, each by its recipe, and the best regularizers on them
            configs = {r.method: r.config for r in runs}
            assert configs["ft"].model.head_init == "normal" and configs["ft"].optim.lr == 0.02
            assert configs["lp"].trainer.epochs == 0 and configs["wise_ft"].trainer.wise_alphas
            assert {"head_l1", "lwf", "co_tuning"} <= names
            continue
        if path.stem.endswith("_tuning"):  # variants of a few terms, selected on validation
            tuned = {"zero_centroid"} if path.stem.startswith("zero_centroid") else {"fmr", "adarand"}
            assert tuned <= names and "ft" in grid.methods
            continue
        if path.stem.endswith("_recipe"):  # FT's own recipe varied (no regularizer), selected on validation
            assert names == {"ce"} and all(m == "ft" or m.startswith("ft-") for m in grid.methods)
            assert len({(r.config.optim.lr, r.config.optim.warmup_epochs) for r in runs}) == len(grid.methods)
            continue
        if path.stem.startswith("imbalanced"):  # long-tailed cells: the imbalance methods against FT
            assert {r.config.data.imbalance_ratio for r in runs} == {10, 100}
            assert {"logit_adjusted", "balanced_softmax", "lm_softmax", "zero_centroid"} <= names
            assert {"crt", "posthoc_la"} <= set(grid.methods)
            assert all(r.config.trainer.select == "val_bal_acc" for r in runs)
            continue
        if path.stem.endswith("_confirm"):  # one pre-chosen comparison on fresh seeds
            assert set(grid.methods) == {"ft", "head_l1-w0.01"} and min(grid.axes["trainer.seed"]) >= 5
            continue
        # every family of regtune is compared (the grids may leave out variants such as head_l2 or zero_centroid)
        assert {"fmr", "adarand", "randreg", "fnp", "maxent", "l2_sp", "delta", "bss", "co_tuning", "lwf",
                "stochnorm", "lm_softmax"} <= names, (path.name, names)


def _fake_run(run_dir: Path, seed: int, acc: float, lr: float = 0.02) -> Path:
    """A finished run as `regtune report` reads it: the config fields it names a run by, and test accuracy."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({
        "data": {"dataset": "fashion_mnist", "fraction": 0.05}, "trainer": {"seed": seed}, "optim": {"lr": lr},
        "criterion": {"name": "ce"}, "regularizers": []}))
    (run_dir / "metrics.json").write_text(json.dumps({"test_acc": acc}))
    return run_dir


def test_report_names_runs_that_configs_cannot_tell_apart(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # FT at two learning rates is "ft" twice by its config: unnamed, the report refuses the ambiguous pairing
    for seed, (a, b) in enumerate([(0.70, 0.74), (0.72, 0.75), (0.71, 0.77)]):
        _fake_run(tmp_path / "base" / f"s{seed}", seed, a)
        _fake_run(tmp_path / "gentle" / f"s{seed}", seed, b, lr=0.005)
    assert main(["report", str(tmp_path / "base"), str(tmp_path / "gentle"), "--out", str(tmp_path / "r0")]) == 2
    assert "two runs of ft" in capsys.readouterr().err
    # NAME=DIR names every run under DIR; the paired difference is then taken per seed: (4 + 3 + 6) / 3 = 4.33
    assert main(["report", str(tmp_path / "base"), f"ft-lr0.005={tmp_path / 'gentle'}",
                 "--out", str(tmp_path / "r1")]) == 0
    with open(tmp_path / "r1" / "summary.csv", newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"ft", "ft-lr0.005"}
    assert float(rows["ft-lr0.005"]["diff_mean"]) == pytest.approx(13 / 3, abs=1e-4)
    assert float(rows["ft-lr0.005"]["mean"]) == pytest.approx(75.333333, abs=1e-4)
    # a NAME=DIR whose folder is missing says so instead of reporting nothing
    assert main(["report", f"x={tmp_path / 'nowhere'}", "--out", str(tmp_path / "r2")]) == 2
    assert "nowhere: no such run directory" in capsys.readouterr().err


def test_a_typo_in_the_last_cell_fails_before_any_run_or_folder(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    root = write_imagefolder(tmp_path / "data", classes=2, train_per_class=4, test_per_class=1)
    spec = tiny_grid(root, tmp_path / "out", where=[
        {"match": {"data.fraction": 1.0}, "set": {"criterion": {"name": "ce", "args": {"label_smothing": 0.1}}}}])
    with pytest.raises(GridError, match=r"method 'ft' at .*'data.fraction': 1.0.* seed 0: criterion 'ce' has no "
                                        r"argument\(s\) label_smothing; valid: label_smoothing"):
        grid_from_dict(spec)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["bench", str(path)]) == 2
    err = capsys.readouterr().err
    assert "label_smothing" in err and "valid: label_smoothing" in err
    assert not (tmp_path / "out").exists()
    spec["where"] = []
    spec["methods"]["fnp"]["regularizers"][0]["name"] = "fnpp"  # an unknown term in every cell
    with pytest.raises(GridError, match="unknown regularizer 'fnpp'; known: .*fnp"):
        grid_from_dict(spec)
