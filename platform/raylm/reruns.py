"""A job submitted again under a name that already has state (a train run's checkpoints, a
search's trials): resume it only when it was started with the same config, so that a changed
config never gets the old run's results handed back as its own.

Each run keeps the config it was started with (`RUN_FILE`, dotted keys, without the fields that
never change a result: where it saves, how often it logs). On a re-run, `mode` decides:

  auto                resume when nothing changed but the `continuable` fields; otherwise stop
                      before anything starts, naming what changed
  restart             start over (the caller removes the run's state)
  restart_if_changed  resume an interrupted run of the same config, start over on any change
                      (what the pipeline does: its stage re-runs because its config changed)
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Iterator, Optional

from raylm import config, storage, tracking

RUN_FILE = "raylm_run.json"


def matches(key: str, prefixes: tuple[str, ...]) -> bool:
    """`key` is one of `prefixes`, or under one that ends in `.` or `_`."""
    return any(key == p or (p.endswith((".", "_")) and key.startswith(p)) for p in prefixes)


def identity(doc: dict[str, Any], operational: tuple[str, ...]) -> dict[str, Any]:
    """A config as dotted keys, the `operational` ones left out."""
    return {k: v for k, v in tracking.flatten(doc).items() if not matches(k, operational)}


def decide(what: str, name: str, run_uri: str, now: dict[str, Any], mode: str, has_state: bool,
           continuable: tuple[str, ...] = (), blocking: tuple[str, ...] = (), setting: str = "resume") -> bool:
    """Whether the run at `run_uri` (which has state to resume: `has_state`) starts over, given
    its config `now` (`identity`). Raises ConfigError (mode auto) when something other than the
    `continuable` fields changed, or `blocking` says why it cannot resume (`setting`: the config
    field of `mode`, for the message). Says what it decided when something changed. The caller
    removes the state on a restart, then calls `record`."""
    changes: list[str] = []
    stops = list(blocking) if has_state else []
    record_uri = storage.join(run_uri, RUN_FILE)
    unrecorded = has_state and not storage.exists(record_uri)
    if has_state and not unrecorded:
        before = storage.read_json(record_uri)
        for k in sorted(set(before) | set(now)):
            if before.get(k) != now.get(k):
                changes.append(f"{k}: {json.dumps(before.get(k))} -> {json.dumps(now.get(k))}")
                if not matches(k, continuable):
                    stops.append(changes[-1])
    restart = has_state and (mode == "restart" or (mode == "restart_if_changed" and bool(changes or stops)))
    if stops and mode == "auto":
        raise config.ConfigError(
            f"{what} {name!r} (at {run_uri}) was started with another config, and resuming would continue that "
            f"{what}, not run this one: {'; '.join(stops)}. Set {setting}=restart to start it over (its saved "
            "state is removed; the models it registered stay), or give this one another name")
    if restart:
        why = f"the config changed: {'; '.join(changes or stops)}" if mode != "restart" else f"{setting}=restart"
        print(f"[{what}] {name}: starting over ({why}); its state at {run_uri} is removed", flush=True)
    elif changes:
        print(f"[{what}] {name}: resuming with {'; '.join(changes)}", flush=True)
    elif unrecorded:  # (state written before raylm kept the record, or by something else)
        print(f"[{what}] {name}: {run_uri} holds saved state but no record of the config it was started with "
              f"({RUN_FILE}): resuming it as this config, unchecked; {setting}=restart starts it over", flush=True)
    return restart


def record(run_uri: str, now: dict[str, Any]) -> None:
    """Keep `now` as the config the run goes on with (the next re-run compares with it)."""
    storage.write_json(storage.join(run_uri, RUN_FILE), now)


# --- one job at a time per run -------------------------------------------------------------------
# The same config submitted twice (a retry, a second terminal) put two jobs on one run directory:
# the second resumed from checkpoints the first was still writing, or removed them on a restart.
# A job claims its run in the GCS's key-value store before it looks at the run's state; the claim
# names the job and goes when the job's `exclusive` block ends. A claim whose job is dead (its
# driver killed) is taken over.

CLAIMS = "raylm"  # the GCS key-value namespace


def _job_alive(job_id: str) -> bool:
    from ray._private import state

    return any(j["JobID"] == job_id and not j["IsDead"] for j in state.jobs())


def _name_of(job_id: str) -> tuple[str, Optional[str]]:
    """How the job is named ('job <submission id>', or its driver's id) and its submission id."""
    from raylm import waiting

    try:
        submission = waiting.submission_ids()
    except Exception:  # noqa: BLE001 - the name only makes the message better
        submission = {}
    return waiting.job_label(job_id, submission), submission.get(job_id)


@contextlib.contextmanager
def exclusive(what: str, name: str, run_uri: str) -> Iterator[None]:
    """Hold the run at `run_uri` for this job while the block runs; ConfigError when a running job
    holds it. Outside Ray (nothing shares the run) it holds nothing."""
    import ray

    if not ray.is_initialized():
        yield
        return
    from ray.experimental import internal_kv as kv

    key, me = f"run:{run_uri}", ray.get_runtime_context().get_job_id()
    if kv._internal_kv_put(key, me, overwrite=False, namespace=CLAIMS):  # (True: someone's claim is there)
        holder = (kv._internal_kv_get(key, namespace=CLAIMS) or b"").decode()
        if holder and holder != me and _job_alive(holder):
            who, sub = _name_of(holder)
            stop = f"`raylm stop {sub}` stops it, " if sub else ""
            raise config.ConfigError(f"{what} {name}: {who} is running it now (on {run_uri}); {stop}or give this "
                                     "run another name")
        kv._internal_kv_put(key, me, overwrite=True, namespace=CLAIMS)  # a dead job's (or our own) claim
    try:
        yield
    finally:
        if (kv._internal_kv_get(key, namespace=CLAIMS) or b"").decode() == me:
            kv._internal_kv_del(key, namespace=CLAIMS)
