"""Where the training loop runs, behind one small interface.

`TrainSession`: a Ray Train worker (the loop's usual home: one of N ranks, data from its
slice of tables the driver read (small datasets) or from `get_dataset_shard` (streamed),
reports and checkpoints through `ray.train.report`).
`LocalSession`: one process that is not a Ray Train worker, e.g. a one-worker Ray Tune trial,
which trains in the trial's own process instead of starting a worker group for it (a Ray
Train run costs ~20 s of start-up on a laptop; a search runs dozens of trials). Its data are
pyarrow tables already in memory; reports and checkpoints go through `ray.tune.report`.

Both give the loop the same things: rank, world size, device, the checkpoint to resume from,
the train / validation data, and `report(metrics, checkpoint_dir, name)`.
"""

from __future__ import annotations

import os
import re
from contextlib import ExitStack, contextmanager
from typing import Any, Iterator, Optional

import pyarrow as pa
import torch


# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by
# default) and takes one report per worker per poll; a worker's `ray.train.report` blocks until
# the report before it was taken (a queue of one). With Ray's default, a loop that reports more
# often than every 2 s waits for the controller (a 12-step test run: 24-26 s -> 19-20 s), and
# every run ends up to 2 s after its last step. raylm polls every 0.25 s unless the variable is
# set (Ray Train hands it from the driver to the controller and the workers), and the loop sends
# Ray no more than one metrics-only report per poll (see `TrainSession.min_report_interval_s`).
# Ray Train also patches `print` in its workers to send it to its logger, which writes each
# progress line to the job's output twice (the logger and the worker's stdout): raylm turns the
# patch off unless RAY_TRAIN_ENABLE_PRINT_PATCH is set; lines still reach the worker's log files.
# Ray Train starts a `PreemptionWatcher` actor per run that polls for node drains and logs them
# for `ray.train.get_preemption_info`, which raylm's loop does not read (a lost node is handled
# by `train.max_failures` and the last checkpoint). It is one more Ray process per run (each of
# a run's actor processes took 1.6-2.2 CPU-seconds here; a 12-step test run: 21.1-23.3 s with
# the watcher, 20.6-21.3 s without, 3 runs each on 2 cores): raylm turns it off unless RAY_TRAIN_ENABLE_PREEMPTION_WATCHER is set.
POLL_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
DEFAULT_POLL_INTERVAL_S = 0.25
# in every checkpoint (each strategy writes it): the loop's step, last metrics and registered model
CLIENT_STATE = "client_state.json"


def set_ray_train_env() -> None:
    """Before a TorchTrainer is built (Ray Train hands these to its controller and workers)."""
    os.environ.setdefault(POLL_INTERVAL_ENV, str(DEFAULT_POLL_INTERVAL_S))
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def quiet_ray_train_logs() -> None:
    """Ray Train V2 logs every `ray.train.report` at INFO, from every rank, with the whole
    metrics dict ("Reporting training result 12: TrainingReport(checkpoint=None, metrics={...})
    from rank 3"), and every checkpoint's upload from every rank ("Checkpoint successfully created
    at: Checkpoint(filesystem=local, path=...)"): long lines per worker in the job's output, beside
    the loop's own progress line and its "checkpoint saved at step N". A Tune trial's checkpoints
    log the same line through Ray Train's older storage module. Their loggers (named after the
    modules' files) go to WARNING in this process."""
    import importlib
    import logging

    for name in ("ray.train.v2._internal.execution.context", "ray.train.v2._internal.execution.storage",
                 "ray.train._internal.storage"):
        try:
            importlib.import_module(name).logger.setLevel(logging.WARNING)
        except (ImportError, AttributeError):  # another Ray: nothing to quiet there
            continue


_SHARED_DIR_GONE = "does not exist, even though it should have been created by another process"


@contextmanager
def _as_dir(ckpt, tries: int = 3) -> Iterator[Optional[str]]:
    """The checkpoint to resume from as a local directory (None: start fresh).

    From remote storage, Ray downloads a checkpoint once per node into a temporary directory
    that the node's ranks share, and the last reader out deletes it. A rank that starts reading
    as the other one leaves finds it deleted under the lock it waited on, and Ray raises
    ("... does not exist, even though it should have been created by another process"): a
    two-worker run that lost its node failed so on its replacement node. Another try downloads
    the checkpoint again."""
    if ckpt is None:
        yield None
        return
    with ExitStack() as stack:
        for attempt in range(1, tries + 1):
            try:
                d = stack.enter_context(ckpt.as_directory())
                break
            except RuntimeError as e:
                if _SHARED_DIR_GONE not in str(e) or attempt == tries:
                    raise
        yield d


MANIFEST = "raylm-files-rank{rank}.json"  # in each checkpoint: the files one rank wrote, and their sizes
_STEP_DIR = re.compile(r"^step-(\d{8})(-final)?$")


def write_manifest(checkpoint_dir: str, rank: int, world: int) -> None:
    """Lists what this rank wrote into `checkpoint_dir` (before it is handed to Ray), so a copy
    on storage can be told complete (every rank's files there, at their sizes) without Ray's record."""
    import json

    files = {}
    for root, _, names in os.walk(checkpoint_dir):
        for n in names:
            full = os.path.join(root, n)
            files[os.path.relpath(full, checkpoint_dir)] = os.path.getsize(full)
    with open(os.path.join(checkpoint_dir, MANIFEST.format(rank=rank)), "w") as f:
        json.dump({"world": world, "files": files}, f)


def complete_on_storage(uri: str) -> bool:
    """Every rank's manifest is in the checkpoint directory at `uri` and every file it lists is
    there at its size (a copy cut short by a stopped job is not)."""
    from raylm import storage

    try:
        first = storage.read_json(storage.join(uri, MANIFEST.format(rank=0)))
        for rank in range(int(first["world"])):
            m = first if rank == 0 else storage.read_json(storage.join(uri, MANIFEST.format(rank=rank)))
            for rel, size in m["files"].items():
                if storage.file_info(storage.join(uri, rel))["size"] != size:
                    return False
    except (FileNotFoundError, OSError, KeyError, ValueError):
        return False
    return True


def unrecorded_checkpoint(run_uri: str, recorded_path: Optional[str]) -> Optional[str]:
    """The newest complete checkpoint directory under `run_uri` that is newer than the one Ray
    Train recorded (`recorded_path`, or none). Ray Train records a checkpoint when its controller
    takes the worker's report, up to one poll after the files are on storage; a job stopped in
    between leaves a checkpoint the log called saved and Ray Train's record does not hold."""
    from raylm import storage

    def step(name: str) -> int:
        m = _STEP_DIR.match(name)
        return int(m.group(1)) if m else -1

    recorded = step(os.path.basename(recorded_path.rstrip("/"))) if recorded_path else -1
    newer = sorted((n for n in storage.listdir(run_uri) if step(n) > recorded), key=step, reverse=True)
    for name in newer:
        if complete_on_storage(storage.join(run_uri, name)):
            return storage.join(run_uri, name)
    return None


class TrainSession:
    """shards: {split: [object ref of rank 0's rows, rank 1's, ...]} for data the driver read
    into memory (train/job.py: rank_shards); else the run's Ray Data datasets. run_uri: where
    Ray Train keeps this run's checkpoints (storage_path/name)."""

    def __init__(self, shards: Optional[dict[str, list]] = None, run_uri: Optional[str] = None):
        import ray.train
        import ray.train.torch

        quiet_ray_train_logs()
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.shards = shards
        self.run_uri = run_uri
        # a metrics-only report sooner than this after the last one would wait for the controller's poll
        self.min_report_interval_s = float(os.environ.get(POLL_INTERVAL_ENV, 2.0))

    def resume_dir(self):
        import ray.train

        ckpt = ray.train.get_checkpoint()
        newer = unrecorded_checkpoint(self.run_uri, ckpt.path if ckpt else None) if self.run_uri else None
        if newer:
            from raylm import storage

            if self.rank == 0:
                print(f"[train] {newer} is complete on storage but was not yet in Ray Train's record when "
                      "the last job stopped: resuming from it", flush=True)
            fs, path = storage.arrow_fs(newer)
            ckpt = ray.train.Checkpoint(path, filesystem=fs)
        return _as_dir(ckpt)

    def shard(self, name: str):
        import ray
        import ray.train

        if self.shards is not None:
            refs = self.shards.get(name)
            return TableShard(ray.get(refs[self.rank])) if refs else None
        return ray.train.get_dataset_shard(name)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[str] = None,
               name: Optional[str] = None) -> None:
        import ray.train

        if checkpoint_dir is None:
            ray.train.report(metrics)
        else:
            write_manifest(checkpoint_dir, self.rank, self.world)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
                             checkpoint_dir_name=name)


class TableShard:
    """A pyarrow table with the `iter_batches` of a Ray Data shard (the subset the loop uses)."""

    def __init__(self, table: pa.Table):
        self.table = table

    def iter_batches(self, batch_size: int, batch_format: str = "pyarrow", drop_last: bool = False):
        n = self.table.num_rows
        end = n - n % batch_size if drop_last else n
        for start in range(0, end, batch_size):
            yield self.table.slice(start, min(batch_size, end - start))


class LocalSession:
    """One process, data in memory, reports to Ray Tune (or nowhere, outside Tune)."""

    def __init__(self, tables: dict[str, pa.Table], device: Optional[torch.device] = None):
        self.rank, self.world = 0, 1
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tables = tables
        self.min_report_interval_s = 0.0  # ray.tune.report in the trial's own process: every report goes
        quiet_ray_train_logs()

    def resume_dir(self):
        from ray import tune

        return _as_dir(tune.get_checkpoint())

    def shard(self, name: str):
        return TableShard(self.tables[name]) if name in self.tables else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[str] = None,
               name: Optional[str] = None) -> None:
        from ray import tune

        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)
