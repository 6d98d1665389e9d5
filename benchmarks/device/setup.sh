# Source on the lent GPU machine, from the project root, after the bundles are built here:
#   ../shared/device/pack.sh .device            # Ray, DeepSpeed, pydantic    -> .device/site.tar.xz
#   benchmarks/device/pack_serve.sh .device     # Serve's HTTP stack, HAProxy -> .device/serve.tar.xz
#   benchmarks/device/pack_extra.sh .device    # the dashboard's and data steps' imports -> .device/wheels
# Then, in the device command (carry: [".device"]):   . benchmarks/device/setup.sh
# It unpacks everything into /tmp/site, puts a `ray` command on PATH (the bundle has no console
# scripts; `raylm up` runs `ray start`), and exports PYTHONPATH for python3 and its subprocesses.
mkdir -p /tmp/site /tmp/bin
tar xJf .device/site.tar.xz -C /tmp/site
[ -f .device/serve.tar.xz ] && tar xJf .device/serve.tar.xz -C /tmp/site
# unpacked over the bundles, not `pip install --target`: that replaces a whole top-level folder
# (opentelemetry/ of opentelemetry-api) with the one of the wheel it installs (opentelemetry-sdk)
python3 -c "import glob, zipfile; [zipfile.ZipFile(w).extractall('/tmp/site') for w in glob.glob('.device/wheels/*.whl')]"
printf '#!/bin/sh\nexec %s -m ray.scripts.scripts "$@"\n' "$(command -v python3)" > /tmp/bin/ray
chmod +x /tmp/bin/ray
export PYTHONPATH=/tmp/site:$PWD/platform PATH=/tmp/bin:$PATH PYTHONUNBUFFERED=1
