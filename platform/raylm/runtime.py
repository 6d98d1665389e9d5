"""Connecting a job's driver to Ray.

Ray reads RAY_AUTH_MODE when it is imported, so `prepare_env()` runs first in every
jobs/*.py script, before anything imports Ray; `init_ray()` then connects.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import re
import shutil
import sys
import threading
from pathlib import Path
from typing import Any, Optional

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


def init_ray(job: bool = True, config: Any = None) -> None:
    """Connect to the cluster this process belongs to.

    - Inside `ray job submit` (RAY_ADDRESS is the GCS address): that cluster.
    - Else, when `raylm up` is running here: that cluster, with its token.
    - Else: a local Ray started just for this process.
    raylm's own package is shipped to the workers (`py_modules`), so the code a job's tasks
    run is the code its driver runs, whatever version the cluster has installed.

    `job=False` is for a command that only asks the cluster something (`raylm undeploy`): no
    package upload, no resource watch, and neither Ray's INFO lines nor the logs of the
    cluster's actors (Serve's controller's) in its output.

    `config`: the job's config. On a cluster of several nodes, its local paths and RAYLM_HOME
    must be on storage every node sees (`check_paths_shared`).
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
    if WORKER_SETUP_HOOK_ENV not in os.environ:  # (a job submitted with a hook of its own keeps it)
        runtime_env["worker_process_setup_hook"] = WORKER_SETUP_HOOK
    env_vars = quiet_hf_progress_bars()
    if env_vars:
        runtime_env["env_vars"] = env_vars
    quiet_ray_packaging()
    keep_own_lines()
    ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    quiet_ray_data_progress()
    from raylm import waiting

    waiting.start(ray.get_runtime_context().get_job_id())  # says so when the job's work cannot start
    if config is not None:
        check_paths_shared(config)


# --- local paths on a cluster of several nodes ------------------------------------------------
# A job's tasks, Train workers, trials and replicas run on any node, and each reads and writes
# the job's paths where it runs. A local path (the defaults under RAYLM_HOME included) on a
# cluster of several nodes is each node's own disk unless a shared filesystem is mounted there:
# a data job's shards, a model a Train worker exports, feedback an ingress replica writes would
# land on whichever node did the work, and the next job would not find them (or find part).
# Ray Train checks its own run storage this way; raylm checks every path a job names, at start.

PATH_FIELDS = frozenset({"root", "registry", "storage", "uri", "keys_file", "feedback_uri", "output"})
# path fields whose default (when left out) is under RAYLM_HOME; distill.registry defaults to output.registry
HOME_DEFAULTS = frozenset({"root", "registry", "storage", "keys_file", "feedback_uri"})
SHARED_CHECK_TIMEOUT_S = 60.0
SKIP_SHARED_CHECK_ENV = "RAYLM_SKIP_SHARED_CHECK"


def local_dirs(config: Any) -> dict[str, str]:
    """{where it comes from: local directory} for each absolute local path in the config's path
    fields (a file's directory; a path not made yet: the directory it will be in), and RAYLM_HOME
    when a path field left out defaults there. Relative paths are left out: they name the job's
    own files, which Ray ships to every node."""
    from raylm import storage

    found: dict[str, str] = {}

    def walk(value: Any, where: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                key = f"{where}.{k}" if where else str(k)
                if k in PATH_FIELDS and isinstance(v, str):
                    found[key] = v
                elif v is None and k in HOME_DEFAULTS and not key.startswith("distill."):
                    found.setdefault("RAYLM_HOME", str(cluster.home()))
                else:
                    walk(v, key)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{where}.{i}")

    doc = config.model_dump(mode="json") if hasattr(config, "model_dump") else config
    walk(doc, "")
    if isinstance(doc, dict) and isinstance(doc.get("tracking"), dict):  # where the run's tracking writes
        from raylm.tracking import TrackingConfig, resolve

        t = resolve(TrackingConfig.model_validate(doc["tracking"]))
        found.pop("tracking.uri", None)
        if t["mlflow"] and t["uri"].startswith("sqlite:///"):  # MLflow's local store (by default in RAYLM_HOME)
            found["tracking.uri (MLflow's store)"] = t["uri"][len("sqlite:///"):]
        elif t["mlflow"] and ("://" not in t["uri"] or t["uri"].startswith("file://")):  # a file store
            found["tracking.uri (MLflow's store)"] = t["uri"]
        if t["comet"] and not t["comet"]["online"]:
            found["tracking.comet.offline_dir"] = t["comet"]["offline_dir"]
    out: dict[str, str] = {}
    for where, uri in found.items():
        if storage.scheme_of(uri) != "file":
            continue
        raw = uri[len("file://"):] if uri.startswith("file://") else uri
        if not os.path.isabs(os.path.expanduser(raw)):
            continue
        p = Path(storage.normalize(uri))
        if any(c in str(p) for c in "*?["):  # a glob: the directory above its first pattern
            d = Path(*itertools.takewhile(lambda part: not any(c in part for c in "*?["), p.parts))
        else:
            d = p if p.is_dir() else p.parent if (p.exists() or p.suffix) else p
        out.setdefault(str(d), where)
    return {where: d for d, where in out.items()}


def paths_not_seen(markers: dict[str, tuple[str, str]], timeout_s: float = SHARED_CHECK_TIMEOUT_S) -> dict[str, list[str]]:
    """{node: [what]} for each alive node that does not see a marker file ({what: (path, content)})
    as written. A node that does not answer within `timeout_s` (busy, or going away) is left out."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0, max_retries=0)
    def unseen(marks: dict[str, tuple[str, str]]) -> list[str]:
        out = []
        for what, (path, content) in marks.items():
            try:
                ok = Path(path).read_text() == content
            except OSError:
                ok = False
            if not ok:
                out.append(what)
        return out

    nodes = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes() if n["Alive"]}
    refs = {unseen.options(scheduling_strategy=NodeAffinitySchedulingStrategy(nid, soft=False)).remote(markers):
            f"{ip} ({nid[:8]})" for nid, ip in nodes.items()}
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    out: dict[str, list[str]] = {}
    for ref in ready:
        try:
            missing = ray.get(ref)
        except Exception:  # noqa: BLE001 - the node went away meanwhile: nothing to say about it
            continue
        if missing:
            out[refs[ref]] = missing
    return out


def check_paths_shared(config: Any) -> None:
    """On a cluster of several nodes: a StorageError naming each local path (RAYLM_HOME and the
    config's) that a node does not see, found by writing a marker file in each directory and
    reading it from a task on every node. Nothing to do on one node, or with s3:// everywhere."""
    import uuid

    import ray

    from raylm.storage import StorageError

    if (os.environ.get(SKIP_SHARED_CHECK_ENV) == "1" or not ray.is_initialized()
            or sum(1 for n in ray.nodes() if n["Alive"]) < 2):
        return
    token = uuid.uuid4().hex
    markers: dict[str, tuple[str, str]] = {}
    try:
        for where, d in local_dirs(config).items():
            try:
                os.makedirs(d, exist_ok=True)
                path = os.path.join(d, f".raylm-shared-check-{token}")
                Path(path).write_text(token)
            except OSError:  # not writable here: the job's own use of it will say so
                continue
            markers[f"{where} ({d})"] = (path, token)
        if not markers:
            return
        missing = paths_not_seen(markers)
    finally:
        for path, _ in markers.values():
            try:
                os.unlink(path)
            except OSError:
                pass
    if missing:
        raise StorageError(not_shared_message(missing))


def not_shared_message(missing: dict[str, list[str]]) -> str:
    lines = "; ".join(f"node {node} does not see {', '.join(what)}" for node, what in missing.items())
    return (f"this cluster has several nodes and the job's tasks run on any of them, but {lines}. Put the "
            "job's data, registry and runs on storage every node reaches: s3://... (set the config's paths, "
            "e.g. output.registry, data.root, instead of the defaults under RAYLM_HOME), or a shared filesystem "
            f"mounted at the same path on every node. ({SKIP_SHARED_CHECK_ENV}=1 skips this check.)")


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


# raylm's own log lines ("[train] step 20/40 ...", "[tune] trial ... ended", ...), which Ray's
# driver would merge across processes
OWN_LINES = r"^\[(raylm|data|train|tune|ensemble|evaluate|deploy|pipeline|tracking)\] "
DEDUP_ALLOW_ENV = "RAY_DEDUP_LOGS_ALLOW_REGEX"


def keep_own_lines() -> None:
    """Ray's driver merges log lines of different processes that differ only in numbers into one,
    with "[repeated 3x across cluster] (Ray deduplicates logs by default...)", and prints the
    count up to 5 s later: a search's or an ensemble's trials showed one trial's progress, and the
    counts came after the job's summary. raylm's own lines pass through whole and at once; Ray's
    other lines (the same warning from every worker) are still merged. A RAY_DEDUP_LOGS_ALLOW_REGEX
    of the user's wins. Ray reads it when it is imported: set here and, if Ray was imported
    already, on its two deduplicators."""
    if DEDUP_ALLOW_ENV in os.environ:
        return
    os.environ[DEDUP_ALLOW_ENV] = OWN_LINES
    logging_mod = sys.modules.get("ray._private.ray_logging")
    for name in ("stdout_deduplicator", "stderr_deduplicator"):
        dedup = getattr(logging_mod, name, None)
        if dedup is not None and hasattr(dedup, "allow_re"):  # (Ray's own default pattern is kept beside)
            dedup.allow_re = re.compile(OWN_LINES + (f"|{dedup.allow_re.pattern}" if dedup.allow_re else ""))


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


# The job's `worker_process_setup_hook`: run by every worker process the job starts, before its
# task or actor (Ray's env var that carries it to workers; a job submitted with its own keeps it).
WORKER_SETUP_HOOK = "raylm.runtime.quiet_worker"
WORKER_SETUP_HOOK_ENV = "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"


def quiet_worker() -> None:
    """In each of a job's worker processes (tasks, actors, Ray Train's controller and workers,
    Ray Data's split coordinators, Serve replicas): the driver's quieting of Ray Data's progress
    (`quiet_ray_data_progress`), and three lines Ray writes from workers that say nothing to a
    raylm user:
    - "Progress bars disabled. To enable, set ...": a training stream's split coordinator, whose
      progress raylm turns off (train/job.py: the loop's own progress line says how far it is);
    - Ray Train's controller on every resumed run: "A run snapshot was found ... If you meant to
      start a brand new training job ..., configure a new, unique `RunConfig(name)`" (raylm
      says itself that it resumes, and `train.resume: restart` starts over);
    - a RayDeprecationWarning Ray Data's own code raises in Ray Train's dataset manager
      (`ExecutionOptions.exclude_resources`)."""
    import warnings

    quiet_ray_data_progress()
    _drop("ray.data._internal.progress", "Progress bars disabled")
    _drop("ray.train.v2._internal.execution.checkpoint.checkpoint_manager", "A run snapshot was found")
    warnings.filterwarnings("ignore", message=r"`ExecutionOptions\.exclude_resources` is deprecated")


RAY_DATA_PROGRESS_LOGGERS = ("ray.data._internal.progress.logging_progress",
                             "ray.data._internal.execution.streaming_executor")


def quiet_ray_data_progress() -> None:
    """Install `RayDataProgressFilter` on Ray Data's progress loggers in this process (once), and
    drop two of Ray Data's warnings from it:
    - "The Ray cluster currently does not have any available CPUs. The Dataset job will hang":
      written once, whenever an execution starts while every CPU is busy at that instant (the
      demo's data stage got it while its own earlier tasks still ran, and went on). Work that
      really waits gets `waiting.ResourceWatch`'s line instead, which names who holds the CPUs.
    - "Truncating long operator name to 100 characters": about the progress lines' names;
    - "Progress will be logged because stdout is a non-interactive terminal": every job's log."""
    _drop("ray.data.dataset", "does not have any available CPUs")
    _drop("ray.data._internal.progress.utils", "Truncating long operator name")
    _drop("ray.data._internal.progress", "Progress will be logged because stdout is a non-interactive terminal")
    if any(isinstance(f, RayDataProgressFilter) for f in logging.getLogger(RAY_DATA_PROGRESS_LOGGERS[0]).filters):
        return
    flt = RayDataProgressFilter()
    for name in RAY_DATA_PROGRESS_LOGGERS:
        logging.getLogger(name).addFilter(flt)
