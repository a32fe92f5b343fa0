#!/usr/bin/env bash
# A GPU session's prepared work, on the device machine, from the repository root with .carry/ carried
# (benchmarks/gpu/prepare.sh): 1. regtune fit against a bare timm loop (EfficientNet-Lite0 and ResNet-50, bf16,
# 224 px), 2. the per-method overhead tables (seed and transfer methods), 3. the pending grid (GRID=<name>, default
# imbalanced_fmnist) in 8 shards until the time is spent (about 40 s per run and shard: a 120-run grid takes a
# 10-minute call of its own). Everything that comes back is under $OUT (at most 8 files): the tables, the grid's logs,
# and its finished runs without their checkpoints (results.tar.gz: unpack it under a separate folder here and report
# it with `regtune bench <grid> --report-only --out <folder>`; GPU and CPU runs are not mixed in one report).
# With SEARCH=<file>, step 3 runs that search (regtune tune, 8 workers) instead of a grid.
# Usage: [GRID=<name> | SEARCH=<file>] bash benchmarks/gpu/session.sh [SECONDS]   (default 540: the 10-minute limit,
# less a margin)
set -uo pipefail
budget="${1:-540}"
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
out="${OUT:?run this through the device tool: it sets OUT}"
export PYTHONUNBUFFERED=1 REGTUNE_FASHION_MNIST_GZ="$PWD/.carry/fmnist"
# the machine has no network: no build isolation (its setuptools builds the editable install); python3 holds torch
python3 -m pip install -q --no-deps .carry/wheels/*.whl \
  && python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
versions="import torch, timm, lightning; print(torch.__version__, timm.__version__, lightning.__version__)"
{ python3 -c "$versions"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; } \
  > "$out/env.txt" 2>&1
cat "$out/env.txt"

echo "== 1. regtune fit against a bare timm loop, bf16 ($(left) s left)"
for backbone in tf_efficientnet_lite0 resnet50; do
  timeout 120 python3 benchmarks/overhead.py --framework --device cuda --precision bf16-mixed --num-workers 8 \
    --img-size 224 --batch-size 64 --backbone "$backbone" --pretrained none --steps-per-epoch 40 --rounds 3 \
    --out "$out/framework_$backbone.md" 2>&1 | tail -8
done

echo "== 2. per-method overhead, fp32, seed then transfer methods ($(left) s left)"
# 4 rounds of 10 steps: 5 steps were too few on the first GPU (FT's own rounds ranged 21-29 ms)
for set in seed transfer; do
  timeout 150 python3 benchmarks/overhead.py --methods "$set" --device cuda --img-size 224 --batch-size 64 \
    --steps 10 --rounds 4 --out "$out/overhead_${set}_cuda.md" 2>&1 | tail -20
done

logs=$(mktemp -d)
if [ -n "${SEARCH:-}" ]; then
  # a pending search instead (SEARCH=<file or name>): 8 workers on the one GPU until the time is spent; its journal
  # and trial records come back in search.tar.gz (a killed trial is retried when the search is continued)
  echo "== 3. the search $SEARCH, 8 workers ($(left) s left)"
  remaining=$(( $(left) - 45 ))
  OMP_NUM_THREADS=2 timeout -s KILL "$remaining" regtune tune "$SEARCH" --workers 8 --out runs/tune/gpu \
    > "$logs/search.log" 2>&1
  tail -5 "$logs/search.log"
  tar -czf "$out/search.tar.gz" --exclude=checkpoints --exclude='*.safetensors' runs/tune/gpu 2>/dev/null
  tar -czf "$out/search_logs.tar.gz" -C "$logs" . 2>/dev/null
  du -h "$out"/*
  exit 0
fi
# the pending grid: GRID=<name> to change it (the imbalanced grid may have finished on the CPU by then)
name="${GRID:-imbalanced_fmnist}"
echo "== 3. the grid $name, 8 shards ($(left) s left)"
grid=runs/bench/$name
remaining=$(( $(left) - 45 ))  # keep time to pack the results
if [ "$remaining" -gt 60 ]; then
  for i in 1 2 3 4 5 6 7 8; do
    # SIGKILL: the grid goes on after a failed run, so a gentler signal would only fail the run in progress; the
    # finished runs are on disk and an unfinished one is trained again next time
    OMP_NUM_THREADS=2 timeout -s KILL "$remaining" regtune bench "$name" --shard "$i/8" \
      > "$logs/grid_shard$i.log" 2>&1 &
  done
  wait
fi
ls "$grid"/runs/*/*/*/metrics.json 2>/dev/null | wc -l | xargs echo "finished runs:"
# finished runs only, without checkpoints and weights (the report needs metrics and logs), and the shards' logs: the
# device tool brings back at most 8 files
find "$grid/runs" -name metrics.json -printf '%h\n' 2>/dev/null > /tmp/finished.txt
tar -czf "$out/results.tar.gz" --exclude=checkpoints --exclude='*.safetensors' -T /tmp/finished.txt \
  "$grid/grid.yaml" "$grid/splits" 2>/dev/null
tar -czf "$out/grid_logs.tar.gz" -C "$logs" . 2>/dev/null
du -h "$out"/*
