"""Say so when a job cannot start its work because the cluster's resources are held elsewhere.

Ray queues a task, an actor or a placement group that asks for more CPUs or GPUs than are free
until they come free, without a word: a data job submitted on a laptop beside a served model
(the demo's endpoint held 1.75 of 2 CPUs), or a training job asking for GPUs a Serve app holds,
sat with its progress at 0 and nothing in its log saying why. Ray Data gives up after 30
minutes with no progress; Ray Train and Tune wait for ever.

`ResourceWatch` runs in a job's driver (`runtime.init_ray` starts it). When the job has had
work waiting for resources for `RAYLM_WAIT_NOTICE_S` seconds (30) while it runs nothing that
holds any, it prints one line: what the job asks for, what is free, and who holds the rest
(each Serve app, each other job), and again every `RAYLM_WAIT_REPEAT_S` (120) while it waits;
when the work starts, it says after how long. Every 5 s it asks the GCS whether anything in the
cluster waits for resources (one call, under 1 ms); only then does it ask Ray's state API (the
dashboard) about this job. If those cannot be reached three times in a row, it stops, silently.

`ReplicaWatch` does the same for a deploy job's Serve app: its replicas are actors of the Serve
controller, not of the job, and `serve.run` waits for them without a word in the job's log
(Serve's own warning goes to the controller's log).
"""

from __future__ import annotations

import atexit
import os
import re
import threading
import time
from collections import defaultdict
from typing import Any, Optional

NOTICE_ENV, REPEAT_ENV = "RAYLM_WAIT_NOTICE_S", "RAYLM_WAIT_REPEAT_S"
SHOWN = ("CPU", "GPU")  # the resources a line names (others only when the job asks for them)
SERVE_REPLICA = re.compile(r"ServeReplica:([^:]+):")


def _fmt(amount: float) -> str:
    return f"{amount:g}"


def _wanted(resources: dict[str, float]) -> dict[str, float]:
    """The resources a request names, without Ray's bookkeeping ones (node ids, memory, bundles)."""
    return {k: v for k, v in (resources or {}).items()
            if v and not k.startswith(("node:", "memory", "object_store_memory", "bundle_group"))}


def _shape(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in sorted(_wanted(resources).items())) + "}"



def submission_ids() -> dict[str, str]:
    """Each job's submission id (what `raylm stop` takes), by its driver's job id."""
    from ray.util.state import list_jobs

    return {j.job_id: j.submission_id for j in list_jobs(raise_on_missing_output=False, timeout=10)
            if j.job_id and j.submission_id}


def job_label(job_id: str, submission: dict[str, str]) -> str:
    """'job <submission id>', or 'driver <job id> (not a submitted job)'."""
    sub = submission.get(job_id)
    return f"job {sub}" if sub else f"driver {job_id} (not a submitted job)"

class ResourceWatch(threading.Thread):
    asker = "this job"  # who the notice says asks
    goes_on = "the job goes on"
    starts = "It starts when they come free."
    app: Optional[str] = None  # the Serve app being deployed (ReplicaWatch)

    def __init__(self, job_id: str, notice_s: float, repeat_s: float):
        super().__init__(name="raylm-resource-watch", daemon=True)
        self.job_id, self.notice_s, self.repeat_s = job_id, notice_s, repeat_s
        self.poll_s = min(5.0, max(0.5, notice_s / 3))
        self.waiting_since: Optional[float] = None
        self.last_notice: Optional[float] = None
        self.done = threading.Event()  # set it to stop the watch

    def out(self, line: str) -> None:
        print(line, flush=True)

    def run(self) -> None:
        import ray

        failures = 0
        while failures < 3 and not self.done.wait(self.poll_s):  # 3 failures: no state API (for us)
            if not ray.is_initialized():  # the driver has shut Ray down: Ray's APIs would start a new one
                return
            try:
                self.tick(time.monotonic())
                failures = 0
            except Exception:  # noqa: BLE001 - a watch must never harm the job it watches
                failures += 1

    # -- one look ----------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        waiting, running = self._own_work()
        if not waiting or running:
            if self.last_notice is not None and self.waiting_since is not None:
                self.out(f"[raylm] the resources came free after {now - self.waiting_since:.0f} s: {self.goes_on}")
            self.waiting_since = self.last_notice = None
            return
        if self.waiting_since is None:
            self.waiting_since = now
            return
        waited = now - self.waiting_since
        due = self.notice_s if self.last_notice is None else self.last_notice - self.waiting_since + self.repeat_s
        if waited >= due:
            self.last_notice = now
            self.out(self.describe(waiting, waited))

    @staticmethod
    def _cluster_waits() -> bool:
        """One small GCS call: does anything in the whole cluster wait for resources?"""
        import ray
        from ray.autoscaler.v2.sdk import get_cluster_status

        demands = get_cluster_status(ray.get_runtime_context().gcs_address, timeout=10).resource_demands
        return bool(demands.ray_task_actor_demand or demands.placement_group_demand)

    def _own_work(self) -> tuple[list[tuple[str, dict[str, float]]], bool]:
        """(what this job waits for: (kind, resources) each; whether it runs anything that holds resources)."""
        from ray.util.state import list_actors, list_placement_groups, list_tasks

        if not self._cluster_waits():
            return [], False
        job = [("job_id", "=", self.job_id)]
        kw: dict[str, Any] = {"detail": True, "limit": 200, "raise_on_missing_output": False, "timeout": 10}
        waiting: list[tuple[str, dict[str, float]]] = []
        for t in list_tasks(filters=job + [("state", "=", "PENDING_NODE_ASSIGNMENT")], **kw):
            if _wanted(t.required_resources):
                waiting.append(("task", _wanted(t.required_resources)))
        for a in list_actors(filters=job + [("state", "=", "PENDING_CREATION")], **kw):
            if _wanted(a.required_resources) and not a.placement_group_id:
                waiting.append(("actor", _wanted(a.required_resources)))
        for pg in list_placement_groups(filters=[("creator_job_id", "=", self.job_id), ("state", "=", "PENDING")], **kw):
            bundles = [_wanted(b.get("unit_resources", {})) for b in pg.bundles or []]
            if any(bundles):
                total: dict[str, float] = defaultdict(float)
                for b in bundles:
                    for k, v in b.items():
                        total[k] += v
                waiting.append((f"placement group of {len(bundles)} x {_shape(bundles[0])}", dict(total)))
        if not waiting:
            return [], False
        running = any(_wanted(t.required_resources)
                      for t in list_tasks(filters=job + [("state", "=", "RUNNING")], **kw))
        running = running or any(_wanted(a.required_resources) or a.placement_group_id
                                 for a in list_actors(filters=job + [("state", "=", "ALIVE")], **kw))
        return waiting, running

    def describe(self, waiting: list[tuple[str, dict[str, float]]], waited: float) -> str:
        import ray

        asked: dict[str, float] = defaultdict(float)
        kinds: dict[str, int] = defaultdict(int)
        for kind, res in waiting:
            kinds[kind if kind.startswith("placement") else f"{kind} of {_shape(res)}"] += 1
            for k, v in res.items():
                asked[k] += v
        names = [k for k in asked if k not in SHOWN] + [k for k in SHOWN if k in asked or k == "CPU"]
        total, free = ray.cluster_resources(), ray.available_resources()
        what = ", ".join(f"{n} {k.replace(' of ', 's of ', 1) if n > 1 else k}" for k, n in kinds.items())
        line = (f"[raylm] waiting {waited:.0f} s for resources: {self.asker} asks for {what}; "
                f"free now: " + ", ".join(f"{_fmt(free.get(k, 0))} of {_fmt(total.get(k, 0))} {k}" for k in names))
        missing = sorted({k for _, res in waiting for k, v in res.items() if v > total.get(k, 0)})
        if missing:
            return (line + f". The cluster has too little {', '.join(missing)} for it in all (not only free now):"
                    " it waits until nodes with more join (an autoscaler adds them), or ask for less.")
        holders = self.holders(names)
        if holders:
            line += ". Held by: " + "; ".join(holders)
        return f"{line}. {self.starts}"

    def holders(self, names: list[str]) -> list[str]:
        """Who holds the resources named: each Serve app, each other job (largest first)."""
        from ray.util.state import list_actors, list_placement_groups, list_tasks

        kw: dict[str, Any] = {"detail": True, "limit": 1000, "raise_on_missing_output": False, "timeout": 10}
        held: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        submission = submission_ids()

        def add(who: str, res: dict[str, float]) -> None:
            for k in names:
                held[who][k] += (res or {}).get(k, 0)

        def job_name(job_id: str) -> str:
            return job_label(job_id, submission)

        for a in list_actors(filters=[("state", "=", "ALIVE")], **kw):
            if a.job_id == self.job_id or a.placement_group_id:
                continue
            app = SERVE_REPLICA.match(a.class_name or "")
            if app and app.group(1) == self.app:
                who = f"Serve app {self.app!r}'s replicas already running"
            elif app:
                who = f"Serve app {app.group(1)!r} (`raylm undeploy {app.group(1)}` frees it)"
            else:
                who = job_name(a.job_id)
            add(who, a.required_resources)
        for t in list_tasks(filters=[("state", "=", "RUNNING")], **kw):
            if t.job_id != self.job_id and not t.placement_group_id and t.type == "NORMAL_TASK":
                add(job_name(t.job_id), t.required_resources)
        for pg in list_placement_groups(filters=[("state", "=", "CREATED")], **kw):
            if pg.creator_job_id != self.job_id:
                for b in pg.bundles or []:
                    add(job_name(pg.creator_job_id), b.get("unit_resources", {}))
        ranked = sorted(((who, res) for who, res in held.items() if any(res.values())),
                        key=lambda item: -sum(item[1].values()))
        return [f"{who} {', '.join(f'{_fmt(v)} {k}' for k, v in res.items() if v)}" for who, res in ranked[:5]]


class ReplicaWatch(ResourceWatch):
    """A deploy job's wait for its Serve app's replicas (named `ServeReplica:<app>:<deployment>`)."""

    goes_on = "the replicas start"
    starts = "Its replicas start when they come free."

    def __init__(self, app: str, job_id: str, notice_s: float, repeat_s: float):
        super().__init__(job_id, notice_s, repeat_s)
        self.app, self.asker = app, f"Serve app {app!r}"

    def _own_work(self) -> tuple[list[tuple[str, dict[str, float]]], bool]:
        from ray.util.state import list_actors

        if not self._cluster_waits():
            return [], False
        waiting = []
        for a in list_actors(filters=[("state", "=", "PENDING_CREATION")], detail=True, limit=1000,
                             raise_on_missing_output=False, timeout=10):
            app = SERVE_REPLICA.match(a.class_name or "")
            if app and app.group(1) == self.app and _wanted(a.required_resources):
                deployment = (a.class_name or "").split(":", 2)[2]
                waiting.append((f"{deployment!r} replica", _wanted(a.required_resources)))
        return waiting, False  # a replica that waits keeps the app from RUNNING, whatever else runs


def start(job_id: str, app: Optional[str] = None) -> Optional[ResourceWatch]:
    """Start the watch for this driver's job, or with `app` for that Serve app's replicas
    (RAYLM_WAIT_NOTICE_S=0 turns both off). Set the watch's `done` to stop it."""
    notice_s = float(os.environ.get(NOTICE_ENV, 30))
    if notice_s <= 0:
        return None
    repeat_s = float(os.environ.get(REPEAT_ENV, 120))
    watch = ResourceWatch(job_id, notice_s, repeat_s) if app is None else ReplicaWatch(app, job_id, notice_s, repeat_s)
    watch.start()
    atexit.register(_stop, watch)  # runs before Ray's own atexit shutdown (registered at import)
    return watch


def _stop(watch: ResourceWatch, timeout_s: float = 2.0) -> None:
    """Stop a watch at the driver's exit, before Ray shuts down. A look in progress then would
    call Ray after its shutdown, and `ray.get_runtime_context()` (like every public Ray API)
    starts a new Ray when none is connected: a job on its own local Ray started a second one on
    its way out."""
    watch.done.set()
    watch.join(timeout_s)
