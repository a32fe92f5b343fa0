#!/usr/bin/env bash
# Issue 20's committed reports from the imbalanced grid's finished runs (regtune/grids/imbalanced_fmnist.yaml):
# balanced accuracy, the many / medium / few-shot groups, macro-F1 and plain accuracy, each paired with FT, and
# zero-centroid paired with LM-Softmax alone (benchmarks/imbalanced_zc.yaml), and the default recipe alone and with cRT
# (benchmarks/imbalanced_default.yaml, in default_recipe/). Trains nothing.
# Usage: bash benchmarks/imbalanced_reports.sh [DEST]   (default benchmarks/results/imbalanced_fmnist)
set -euo pipefail
cd "$(dirname "$0")/.."
grid=runs/bench/imbalanced_fmnist
dest="${1:-benchmarks/results/imbalanced_fmnist}"
for metric in test_bal_acc test_many_acc test_medium_acc test_few_acc test_macro_f1 test_acc; do
  regtune bench imbalanced_fmnist --report-only --metric "$metric" --out "$grid" | tail -1
  mkdir -p "$dest/$metric"
  cp "$grid"/report/{summary.md,summary.csv,accuracy.png,paired_differences.png} "$dest/$metric/"
done
cp "$grid/report/results.csv" "$dest/results.csv"  # one row per run, every metric
zc=runs/bench/imbalanced_fmnist_zc
mkdir -p "$zc"
ln -sfn ../imbalanced_fmnist/runs "$zc/runs"
ln -sfn ../imbalanced_fmnist/splits "$zc/splits"
for metric in test_bal_acc test_few_acc; do
  regtune bench benchmarks/imbalanced_zc.yaml --report-only --metric "$metric" --out "$zc" | tail -1
  mkdir -p "$dest/zero_centroid_vs_lm_softmax/$metric"
  cp "$zc"/report/{summary.md,summary.csv,paired_differences.png} "$dest/zero_centroid_vs_lm_softmax/$metric/"
done
# The default recipe (WiSE-FT) alone and with cRT, paired with the grid's FT (benchmarks/imbalanced_default.yaml)
dflt=runs/bench/imbalanced_default
mkdir -p "$dflt"
ln -sfn ../imbalanced_fmnist/runs "$dflt/runs"
ln -sfn ../imbalanced_fmnist/splits "$dflt/splits"
for metric in test_bal_acc test_many_acc test_medium_acc test_few_acc; do
  regtune bench benchmarks/imbalanced_default.yaml --report-only --metric "$metric" --out "$dflt" | tail -1
  mkdir -p "$dest/default_recipe/$metric"
  cp "$dflt"/report/{summary.md,summary.csv,paired_differences.png} "$dest/default_recipe/$metric/"
done
cp "$dflt/report/results.csv" "$dest/default_recipe/results.csv"
lt100="$grid/runs/fashion_mnist-f0.05-imbalance_ratio100"  # cRT on the default, and on FT's recipe, against the default
regtune report wise_ft="$lt100/wise_ft" wise_ft+crt="$lt100/wise_ft+crt" crt="$lt100/crt" --baseline wise_ft \
  --metric test_bal_acc --out "$dflt/vs_wise_ft" | tail -1
cp "$dflt/vs_wise_ft/summary.md" "$dest/default_recipe/crt_on_wise_ft.md"
du -sh "$dest"
