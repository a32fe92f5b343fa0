#!/usr/bin/env bash
# A short GPU check after a change to fit's step loop: regtune fit against the bare loop, bf16, both backbones, fewer
# rounds than session.sh (for a session's last minutes of device time). Usage: bash benchmarks/gpu/verify_framework.sh
set -uo pipefail
out="${OUT:?run this through the device tool: it sets OUT}"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps .carry/wheels/*.whl && python3 -m pip install -q --no-deps --no-build-isolation -e . \
  || exit 1
for backbone in tf_efficientnet_lite0 resnet50; do
  timeout 60 python3 benchmarks/overhead.py --framework --device cuda --precision bf16-mixed --num-workers 8 \
    --img-size 224 --batch-size 64 --backbone "$backbone" --pretrained none --steps-per-epoch 25 --rounds 2 \
    --out "$out/framework_$backbone.md" 2>&1 | grep -v "^\[overhead\] epoch"
done
# the deferred non-finite check on a real GPU (pinned copy behind an event)
python3 - <<'PY'
import torch
from regtune.train.module import FiniteGuard, NonFiniteLossError
guard, x = FiniteGuard(), torch.ones((), device="cuda")
guard.watch(x, {"ce": x}, "step 0")
guard.watch(x * float("nan"), {"ce": x * float("nan")}, "step 1")
try:
    guard.resolve()
    print("FiniteGuard on CUDA: FAILED, no error")
except NonFiniteLossError as err:
    print("FiniteGuard on CUDA: ok:", err)
PY
