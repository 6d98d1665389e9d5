"""Connecting a job's driver to Ray."""

from __future__ import annotations

import os
from pathlib import Path

import ray

import raylm
from raylm import cluster


def init_ray() -> None:
    """Connect to the cluster this process belongs to.

    - Inside `ray job submit` (RAY_ADDRESS is the GCS address): that cluster.
    - Else, when `raylm up` is running here: that cluster, with its token.
    - Else: a local Ray started just for this process.
    raylm's own package is shipped to the workers (`py_modules`), so the code a job's tasks
    run is the code its driver runs, whatever version the cluster has installed.
    """
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith(("http://", "https://")):
        address = None  # a dashboard URL is for the Jobs API, not for ray.init
    if address is None:
        state = cluster.ClusterState.load(cluster.home())
        if cluster.is_running(state):
            address = state.gcs_address
            os.environ["RAY_AUTH_MODE"] = "token"
            os.environ["RAY_AUTH_TOKEN_PATH"] = state.token_path
            print(f"[raylm] connecting to the local raylm cluster at {address}", flush=True)
        else:
            print("[raylm] no cluster found (no RAY_ADDRESS, no `raylm up`): starting a local Ray for this run",
                  flush=True)
    if address is None:
        os.environ.pop("RAY_ADDRESS", None)
    ray.init(address=address, runtime_env={"py_modules": [str(Path(raylm.__file__).parent)]},
             log_to_driver=True)
