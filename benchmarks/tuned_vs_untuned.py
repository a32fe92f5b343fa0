"""Each method tuned against itself untuned, paired by seed: what equal-budget tuning changed (issue 19).

    python benchmarks/tuned_vs_untuned.py \
        --tuned benchmarks/results/tuned_fmnist1/report/results.csv \
        --untuned benchmarks/results/fmnist_grid1/results.csv benchmarks/results/baselines_fmnist1/results.csv \
        --cell "fashion_mnist 1%" --out benchmarks/results/tuned_fmnist1/vs_untuned

Reads the ``results.csv`` of the tuned finals and of one or more untuned grids (``regtune bench`` / ``regtune tune``
reports), keeps the methods present in both (an untuned name may be mapped: ``--alias head_l1=head_l1``), pairs their
runs by seed, and writes ``vs_untuned.md`` (per method: untuned and tuned mean ± std, the paired difference with its
95 % t interval) and ``vs_untuned.png`` (one line per method from untuned to tuned). The first untuned file that has
a method is used.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from regtune.bench.stats import mean_std, paired_difference


def _read(path: Path, cell: str, metric: str) -> dict[str, dict[int, float]]:
    """``{method: {seed: metric}}`` of one results.csv, restricted to ``cell``."""
    out: dict[str, dict[int, float]] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            if row["cell"] == cell and row.get(metric):
                out.setdefault(row["method"], {})[int(row["seed"])] = 100.0 * float(row[metric])
    return out


def compare(tuned: dict[str, dict[int, float]], untuned: list[dict[str, dict[int, float]]],
            alias: dict[str, str]) -> list[dict]:
    """One row per tuned method that an untuned file also has, in the tuned file's order."""
    rows = []
    for method, by_seed in tuned.items():
        name = alias.get(method, method)
        source = next((u[name] for u in untuned if name in u), None)
        if source is None:
            continue
        seeds = sorted(set(by_seed) & set(source))
        t, u = [by_seed[s] for s in seeds], [source[s] for s in seeds]
        rows.append({"method": method, "untuned_as": name, "seeds": seeds, "untuned": mean_std(u),
                     "tuned": mean_std(t), "diff": paired_difference(t, u)})
    if not rows:
        raise SystemExit("no method is in both the tuned and an untuned results.csv: check --cell and --alias")
    return rows


def _signed(x: float) -> str:
    return f"{x:+.2f}".replace("-", "\u2212")


def write(rows: list[dict], out: Path, metric: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"| method (untuned as) | seeds | untuned {metric} (%) | tuned (%) | tuned − untuned, 95 % CI | p |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        d = r["diff"]
        lines.append(f"| {r['method']} ({r['untuned_as']}) | {','.join(map(str, r['seeds']))} "
                     f"| {r['untuned'][0]:.2f} ± {r['untuned'][1]:.2f} | {r['tuned'][0]:.2f} ± {r['tuned'][1]:.2f} "
                     f"| {_signed(d.mean)} [{_signed(d.low)}, {_signed(d.high)}] | {d.p:.2g} |")
    (out / "vs_untuned.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(rows) + 1.2))
    for i, r in enumerate(rows):
        u, t = r["untuned"][0], r["tuned"][0]
        ax.plot([u, t], [i, i], color="0.6", zorder=1)
        ax.scatter([u], [i], color="tab:gray", label="untuned" if i == 0 else None, zorder=2)
        ax.scatter([t], [i], color="tab:blue", label="tuned" if i == 0 else None, zorder=2)
    ax.set_yticks(range(len(rows)), [r["method"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel(f"{metric} (%), mean over seeds {','.join(map(str, rows[0]['seeds']))}")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(out / "vs_untuned.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tuned", type=Path, required=True)
    parser.add_argument("--untuned", type=Path, nargs="+", required=True)
    parser.add_argument("--cell", default="fashion_mnist 1%")
    parser.add_argument("--metric", default="test_acc")
    parser.add_argument("--alias", nargs="*", default=[], metavar="TUNED=UNTUNED")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    alias = dict(a.split("=", 1) for a in args.alias)
    rows = compare(_read(args.tuned, args.cell, args.metric),
                   [_read(p, args.cell, args.metric) for p in args.untuned], alias)
    write(rows, args.out, args.metric)
    print((args.out / "vs_untuned.md").read_text(), end="")


if __name__ == "__main__":
    main()
