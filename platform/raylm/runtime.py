"""Connecting a job's driver to Ray.

Ray reads RAY_AUTH_MODE when it is imported, so `prepare_env()` runs first in every
jobs/*.py script, before anything imports Ray; `init_ray()` then connects.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

from raylm import cluster


def prepare_env() -> Optional[str]:
    """Pick the cluster this process joins and set its auth environment. Returns the GCS
    address to join, or None (inside `ray job submit`, or to start a local Ray)."""
    address = os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith(("http://", "https://")):
        os.environ.pop("RAY_ADDRESS")  # a dashboard URL is for the Jobs API, not for ray.init
        address = None
    if address is None:
        state = cluster.ClusterState.load(cluster.home())
        if cluster.is_running(state):
            os.environ["RAY_AUTH_MODE"] = "token"
            os.environ["RAY_AUTH_TOKEN_PATH"] = state.token_path
            return state.gcs_address
    return address


def init_ray() -> None:
    """Connect to the cluster this process belongs to.

    - Inside `ray job submit` (RAY_ADDRESS is the GCS address): that cluster.
    - Else, when `raylm up` is running here: that cluster, with its token.
    - Else: a local Ray started just for this process.
    raylm's own package is shipped to the workers (`py_modules`), so the code a job's tasks
    run is the code its driver runs, whatever version the cluster has installed.
    """
    already_imported = "ray" in sys.modules
    address = prepare_env()
    import ray

    if ray.is_initialized():
        return
    if already_imported and os.environ.get("RAY_AUTH_MODE") == "token":
        from ray._raylet import Config  # Ray cached the auth mode at import: refresh it

        Config.initialize("")
    if address and not os.environ.get("RAY_JOB_ID"):
        print(f"[raylm] joining the cluster at {address}", flush=True)
    elif not address:
        print("[raylm] no cluster found (no RAY_ADDRESS, no `raylm up`): starting a local Ray for this run",
              flush=True)
        for k, v in cluster.RAY_DEFAULTS.items():  # the local Ray's daemons read them: as `raylm up` sets them
            os.environ.setdefault(k, v)
    import raylm

    ray.init(address=address, runtime_env={"py_modules": [str(Path(raylm.__file__).parent)]},
             log_to_driver=True)
