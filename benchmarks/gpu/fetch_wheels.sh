#!/usr/bin/env bash
# Download, here (with network), the wheels the GPU run needs beyond the lent machine's
# image (Python 3.12, torch 2.11, triton 3.6, numpy 2.5, einops, scipy, ... already there):
# vector-quantize-pytorch, the models benchmarks.patched patches, and the dependencies that
# image lacks. They land in ./wheels
# (git-ignored); carry that folder to the GPU machine, where benchmarks/gpu/run.sh installs
# them with --no-index --no-deps beside the image's packages.
#
#   bash benchmarks/gpu/fetch_wheels.sh [DEST]       # default DEST: wheels
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
dest="${1:-wheels}"
py="${PYTHON:-python3}"
# Pinned: the versions the CPU benchmarks ran with (one version of each, or pip refuses).
packages=(
    "vector-quantize-pytorch==1.32.0"
    "einx==0.4.3"
    "loguru==0.7.3"
    "torch-einops-utils==0.2.0"
    "frozendict==2.5.1"
    # the models of benchmarks.patched (transformers, diffusers, encodec, moshi) and what
    # they import that the image may lack
    "transformers==5.25.0"
    "tokenizers==0.23.3"
    "huggingface_hub==2.4.0"
    "safetensors==0.8.0"
    "regex==2026.12.2"
    "diffusers==0.42.1"
    "moshi==0.2.13"
    # benchmarks.codecs: the codecs' own quantizers (their packages' pins are not installed)
    "descript-audio-codec==1.0.0"
    "snac==1.2.1"
    "sentencepiece==0.2.3"
)
mkdir -p "$dest"
"$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any \
    -d "$dest" "${packages[@]}"
# encodec ships only a source archive: built here into a wheel (pure Python)
"$py" -m pip wheel --quiet --no-deps -w "$dest" "encodec==0.1.1"
ls -l "$dest"
du -sh "$dest"
