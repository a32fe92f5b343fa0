#!/usr/bin/env bash
# The practitioner's path, end to end, on a folder of photos as a user has them (non-square RGB JPEGs, grey and RGBA
# PNGs; made from Fashion-MNIST's confusable upper-body garments, 20 training and 10 test photos per class):
# a corrupt photo refused before training, then fit, predict, export (checked), plain timm loading, interpret.
# Usage: bash benchmarks/practitioner/run.sh [OUT_DIR]   (about 3 minutes on 2 CPU cores)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-runs/practitioner}"
if [ -e "$out" ]; then echo "$out exists: remove it or name another folder" >&2; exit 2; fi
mkdir -p "$out" && cd "$out"
python3 "$here/make_photos.py" photos
fit=(regtune fit --dataset imagefolder --data-root photos --fraction 1 --img-size 96 --epochs 8 --seed 0 --run-dir run)

echo "== a corrupt photo: named before training, nothing written"
echo "not a png" > photos/train/coat/broken.png
if "${fit[@]}" 2> fit_corrupt.err; then echo "the corrupt photo was not refused" >&2; exit 1; fi
cat fit_corrupt.err; test ! -e run
echo "== the error's advice followed: the same command again"
rm photos/train/coat/broken.png
"${fit[@]}" > fit.out 2> fit.err
python3 -c "import json; m = json.load(open('run/metrics.json')); print('test accuracy', m['test_acc'], m['class_names'])"

echo "== predict on the test folder"
regtune predict run photos/test --out preds.csv --topk 2
python3 - <<'PY'
import csv, json
rows = list(csv.DictReader(open("preds.csv")))
right = sum(r["path"].split("/")[-2] == r["class1"] for r in rows)
print(f"predict: {right}/{len(rows)} right; the run's test accuracy: {json.load(open('run/metrics.json'))['test_acc']:.4f}")
PY

echo "== export, checked against PyTorch; plain timm loads it strictly"
regtune export run --out export --format safetensors,onnx,pt2
python3 - <<'PY'
import json, timm
cfg = json.load(open("export/config.json"))
model = timm.create_model(cfg["architecture"], num_classes=cfg["num_classes"], checkpoint_path="export/model.safetensors")
print("plain timm:", cfg["architecture"], cfg["label_names"], "loaded strictly;", cfg["regtune"]["checked"])
PY

echo "== interpret"
regtune interpret run --out interpret
