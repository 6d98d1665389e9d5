#!/usr/bin/env bash
# What else raylm needs on the offline GPU machine, beside ../shared/device/pack.sh (Ray, DeepSpeed,
# pydantic) and pack_serve.sh (Serve's HTTP stack): the Ray dashboard's imports (without them
# `raylm up`'s `ray start` fails: its dashboard and agent import opencensus and opentelemetry's SDK),
# and the data steps' ftfy, py3langid and phonenumbers (the tests' datasets). Wheels for Python 3.12
# x86-64 at the versions of this machine's environment, into DEST/wheels; benchmarks/device/setup.sh
# unpacks them there. Usage (from the project root, with the project's venv active):
#   benchmarks/device/pack_extra.sh .device
set -euo pipefail
dest=${1:-.device}
names=(aiohttp-cors colorful opencensus opencensus-context google-api-core google-auth
       googleapis-common-protos proto-plus cachetools pyasn1 pyasn1-modules py-spy smart-open
       opentelemetry-exporter-prometheus opentelemetry-proto opentelemetry-sdk
       opentelemetry-semantic-conventions ftfy wcwidth py3langid phonenumbers)
pins=()
for n in "${names[@]}"; do  # the version installed here, so the two machines run the same code
  v=$(python3 -m pip show "$n" 2>/dev/null | sed -n 's/^Version: //p')
  pins+=("$n${v:+==$v}")
done
mkdir -p "$dest/wheels"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d "$dest/wheels" "${pins[@]}"
du -sh "$dest/wheels"
