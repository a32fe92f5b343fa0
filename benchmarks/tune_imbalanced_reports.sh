#!/usr/bin/env bash
# Issue 20's tuned search at rho = 100 (benchmarks/tune_imbalanced.yaml): its committed reports. Trains nothing.
# - search/, report/: `regtune tune --report-only` (the search on validation; the finals by balanced test accuracy);
# - groups/<metric>/: the finals by many / medium / few-shot accuracy and macro-F1;
# - vs_untuned/: each method tuned against itself untuned on the same seeds 5-9, when the untuned runs of
#   benchmarks/imbalanced_untuned_fresh.yaml have finished.
# Usage: bash benchmarks/tune_imbalanced_reports.sh [DEST]   (default benchmarks/results/tune_imbalanced)
set -euo pipefail
cd "$(dirname "$0")/.."
tuned=runs/tune/tune_imbalanced
dest="${1:-benchmarks/results/tune_imbalanced}"
regtune tune benchmarks/tune_imbalanced.yaml --report-only --out "$tuned" | tail -1
mkdir -p "$dest/search" "$dest/report"
cp "$tuned"/search/{search.md,search.json,history.png,knobs.png} "$dest/search/"
cp "$tuned"/report/{summary.md,summary.csv,results.csv,accuracy.png,paired_differences.png} "$dest/report/"
finals="$tuned/finals/runs/fashion_mnist-f0.05"
for metric in test_many_acc test_medium_acc test_few_acc test_macro_f1; do
  regtune report ft="$finals/ft" crt="$finals/crt" lwf="$finals/lwf" --metric "$metric" \
    --title "tune_imbalanced finals: $metric" --out "$tuned/groups/$metric" | tail -1
  mkdir -p "$dest/groups/$metric"
  cp "$tuned/groups/$metric"/{summary.md,summary.csv,paired_differences.png} "$dest/groups/$metric/"
done
untuned=runs/bench/imbalanced_untuned_fresh
if [ -d "$untuned/runs" ]; then
  regtune bench benchmarks/imbalanced_untuned_fresh.yaml --report-only --metric test_bal_acc --out "$untuned" | tail -1
  python3 benchmarks/tuned_vs_untuned.py --metric test_bal_acc --cell "fashion_mnist 5% imbalance_ratio=100" \
    --tuned "$tuned/report/results.csv" --untuned "$untuned/report/results.csv" --out "$dest/vs_untuned"
  cp "$untuned/report/summary.md" "$dest/vs_untuned/untuned_summary.md"
fi
du -sh "$dest"
