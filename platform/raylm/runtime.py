"""Connecting a job's driver to Ray.

Ray reads RAY_AUTH_MODE when it is imported, so `prepare_env()` runs first in every
jobs/*.py script, before anything imports Ray; `init_ray()` then connects.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import sys
import threading
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


def init_ray(job: bool = True) -> None:
    """Connect to the cluster this process belongs to.

    - Inside `ray job submit` (RAY_ADDRESS is the GCS address): that cluster.
    - Else, when `raylm up` is running here: that cluster, with its token.
    - Else: a local Ray started just for this process.
    raylm's own package is shipped to the workers (`py_modules`), so the code a job's tasks
    run is the code its driver runs, whatever version the cluster has installed.

    `job=False` is for a command that only asks the cluster something (`raylm undeploy`): no
    package upload, no resource watch, and neither Ray's INFO lines nor the logs of the
    cluster's actors (Serve's controller's) in its output.
    """
    already_imported = "ray" in sys.modules
    address = prepare_env()
    import ray

    if ray.is_initialized():
        return
    if already_imported and os.environ.get("RAY_AUTH_MODE") == "token":
        from ray._raylet import Config  # Ray cached the auth mode at import: refresh it

        Config.initialize("")
    if not job:
        if not address:
            raise cluster.ClusterError("no cluster to ask (no RAY_ADDRESS, no `raylm up` here): start one with "
                                       "`raylm up`, or point RAY_ADDRESS at yours")

        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        return
    if address and not os.environ.get("RAY_JOB_ID"):
        print(f"[raylm] joining the cluster at {address}", flush=True)
    elif not address:
        print("[raylm] no cluster found (no RAY_ADDRESS, no `raylm up`): starting a local Ray for this run",
              flush=True)
        haproxy_dir = cluster.private_haproxy_dir()
        atexit.register(shutil.rmtree, haproxy_dir, ignore_errors=True)  # after Ray's own shutdown (registered later)
        for k, v in cluster.one_machine_defaults(haproxy_dir).items():  # its daemons read them: as `raylm up` sets them
            os.environ.setdefault(k, v)
    import raylm

    runtime_env: dict = {"py_modules": [str(Path(raylm.__file__).parent)]}
    env_vars = quiet_hf_progress_bars()
    if env_vars:
        runtime_env["env_vars"] = env_vars
    quiet_ray_packaging()
    ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    quiet_ray_data_progress()
    from raylm import waiting

    waiting.start(ray.get_runtime_context().get_job_id())  # says so when the job's work cannot start


# --- what a job's log shows -------------------------------------------------------------------
# A job's output is a log file, not a terminal, and the libraries a job uses print progress
# meant for one. `make demo`'s log held 888 lines, 238 of them Ray Data's and 80 transformers'
# progress bars, around raylm's own ~150 lines of progress (each stage says what it does,
# how far it is and how long it has left). What is left out here is left out of the job's
# output only: Ray Data's full log (`ray-data.log` in the session's logs) keeps every line.

HF_PROGRESS_BARS_ENV = "HF_HUB_DISABLE_PROGRESS_BARS"


class _Drop(logging.Filter):
    def __init__(self, words: str) -> None:
        super().__init__()
        self.words = words

    def filter(self, record: logging.LogRecord) -> bool:
        return self.words not in record.getMessage()


def _drop(logger_name: str, words: str) -> None:
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _Drop) and f.words == words for f in logger.filters):
        logger.addFilter(_Drop(words))


def quiet_ray_packaging() -> None:
    """Ray lists, each time it packs a working_dir or py_module for the cluster, every .gitignore
    file it honours, and warns that it no longer packs .git/ and .venv/ (which raylm never
    uploads: jobs_api.UPLOAD_EXCLUDES): 12 lines at every `raylm submit` from a checkout, around the
    lines that matter (the package's size as it is pushed, the job's id). Those are dropped here;
    Ray's other warnings about what it packs stay."""
    _drop("ray._private.runtime_env.packaging", "Ignoring upload to cluster for these files")
    _drop("ray._private.runtime_env.working_dir", "is now ignored by default when packaging")


def quiet_hf_progress_bars() -> dict:
    """transformers draws a progress bar for every model it loads ("Loading weights") and saves
    ("Writing model shards"): two lines each in a log, in every Train worker, trial, replica and
    driver (a model is loaded in milliseconds to seconds; raylm says what it loads). They are
    off in this process and, through the returned env vars for the job's runtime_env, in the
    job's workers, unless HF_HUB_DISABLE_PROGRESS_BARS is set already (by the user's shell or the
    submitted job's runtime_env, which then reaches the workers itself)."""
    if HF_PROGRESS_BARS_ENV in os.environ:
        return {}
    os.environ[HF_PROGRESS_BARS_ENV] = "1"  # read when huggingface_hub is imported
    if "huggingface_hub" in sys.modules:  # imported before: tell it, and transformers, directly
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return {HF_PROGRESS_BARS_ENV: "1"}


class RayDataProgressFilter(logging.Filter):
    """Hides, from the console only, Ray Data's progress lines for executions that end soon.

    In a log, Ray Data writes, for every execution of a dataset: two lines as it starts (its id,
    its plan), a block of progress lines at once and then every 10 s
    (RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL), and one line as it ends. A data job runs ~15
    executions, most of them under a second, whose lines said nothing raylm's own step lines do
    not. This hides the start lines and the first progress block of each execution, and its end
    line unless a later block was shown: an execution that runs past the interval shows its
    progress every interval, as before, and its end. A failed execution's line always shows.

    It marks records the way Ray Data's own console filter reads (`hide`), so Ray Data's log file
    keeps them; it matches Ray Data's messages, so a release that words them otherwise shows them
    all again (tests/test_cli.py checks a data job's log)."""

    BLOCK_START = re.compile(r"=+ Running Dataset: (\S+) =+$")
    BLOCK_END = re.compile(r"=+$")
    START = re.compile(r"(Starting execution of|Execution plan of) Dataset \S+")
    FINISHED = re.compile(r"Dataset (\S+) execution finished in ")

    def __init__(self) -> None:
        super().__init__()
        self._blocks_seen: set[str] = set()
        self._blocks_shown: set[str] = set()
        self._in_hidden_block = threading.local()  # a block's lines come from one thread

    def filter(self, record: logging.LogRecord) -> bool:
        if self._hide(record.getMessage()):
            record.hide = True
        return True

    def _hide(self, msg: str) -> bool:
        if getattr(self._in_hidden_block, "on", False):
            if self.BLOCK_END.match(msg):
                self._in_hidden_block.on = False
            return True
        block = self.BLOCK_START.match(msg)
        if block:
            dataset = block.group(1)
            if dataset in self._blocks_seen:
                self._blocks_shown.add(dataset)
                return False
            self._blocks_seen.add(dataset)
            self._in_hidden_block.on = True
            return True
        if self.START.match(msg):
            return True
        finished = self.FINISHED.search(msg)
        if finished:
            dataset = finished.group(1)
            self._blocks_seen.discard(dataset)
            return dataset not in self._blocks_shown
        return False


RAY_DATA_PROGRESS_LOGGERS = ("ray.data._internal.progress.logging_progress",
                             "ray.data._internal.execution.streaming_executor")


def quiet_ray_data_progress() -> None:
    """Install `RayDataProgressFilter` on Ray Data's progress loggers in this process (once), and
    drop two of Ray Data's warnings from it:
    - "The Ray cluster currently does not have any available CPUs. The Dataset job will hang":
      written once, whenever an execution starts while every CPU is busy at that instant (the
      demo's data stage got it while its own earlier tasks still ran, and went on). Work that
      really waits gets `waiting.ResourceWatch`'s line instead, which names who holds the CPUs.
    - "Truncating long operator name to 100 characters": about the progress lines' names."""
    _drop("ray.data.dataset", "does not have any available CPUs")
    _drop("ray.data._internal.progress.utils", "Truncating long operator name")
    if any(isinstance(f, RayDataProgressFilter) for f in logging.getLogger(RAY_DATA_PROGRESS_LOGGERS[0]).filters):
        return
    flt = RayDataProgressFilter()
    for name in RAY_DATA_PROGRESS_LOGGERS:
        logging.getLogger(name).addFilter(flt)
