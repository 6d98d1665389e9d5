"""Where a command's CPU goes, by process kind: runs the command (default `make test`), reads
every process's utime + stime from /proc (via psutil) once a second, and prints one JSON line:
the command's wall time, its exit code, and CPU-seconds and process counts by group (Ray Train's
controller, cleaner and synchronization actors, workers, Tune trials, Serve replicas, Ray Data, the
pytest process, Ray's daemons, job drivers). Linux only; processes that live under a second are
missed. `benchmarks/RESULTS.md` ("Suite times") quotes its groups.

    CI=true python benchmarks/suite_cpu.py                      # the whole suite
    CI=true python benchmarks/suite_cpu.py -- python -m pytest tests/test_train.py -k stopped_job
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections import defaultdict

import psutil

GROUPS = [  # first match wins: (group, pattern on the process's command lines over its life)
    ("tune_trial_actors", r"ray::ImplicitFunc"),
    ("ray_train_workers", r"ray::RayTrainWorker|_setup_torch_process_group"),
    ("ray_train_controllers", r"ray::TrainController"),
    ("ray_train_placement_group_cleaners", r"PlacementGroupCleaner"),
    ("ray_train_synchronization_actors", r"SynchronizationActor"),
    ("serve_replicas", r"ServeReplica"),
    ("serve_controller_and_proxies", r"ServeController|ProxyActor"),
    ("ray_data_helper_actors", r"_StatsActor|_UsageCollectionActor|_AutoscalingCoordinatorActor|ActorLocationTracker"),
    ("ray_data_tasks_and_pools", r"ray::(Map|ReadFiles|ListFiles|FooterReader|Read|Write|Split|HashShuffle|"
                                 r"HashAggregate|Aggregate|Sort|Limit|Project|Filter)"),
    ("dashboard_agent", r"DashboardAgent"),
    ("other_ray_workers", r"ray::|default_worker"),
    ("pytest", r"-m pytest"),
    ("ray_daemons", r"gcs_server|raylet|dashboard|log_monitor|runtime_env/agent|RuntimeEnvAgent|monitor\.py|ray start"),
    ("job_drivers_and_cli", r"jobs/|raylm\.cli|bin/raylm|bin/ray "),
]


def main(argv: list[str]) -> int:
    cmd = argv[argv.index("--") + 1:] if "--" in argv else ["make", "test"]
    seen: dict[tuple[int, float], dict] = {}  # (pid, start time) -> command lines, CPU-s
    me = psutil.Process().pid
    before = {(p.pid, p.info["create_time"]) for p in psutil.process_iter(["create_time"])}  # not the command's
    t0 = time.time()
    child = subprocess.Popen(cmd)
    while True:
        for p in psutil.process_iter(["pid", "create_time", "cmdline", "cpu_times"]):
            info = p.info
            if info["pid"] == me or info["cpu_times"] is None:
                continue
            key = (info["pid"], info["create_time"])
            if key in before:
                continue
            d = seen.setdefault(key, {"titles": set(), "cpu": 0.0})
            d["titles"].add(" ".join(info["cmdline"] or [])[:200])
            d["cpu"] = info["cpu_times"].user + info["cpu_times"].system
        if child.poll() is not None:
            break
        time.sleep(1)
    groups: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for d in seen.values():
        text = " | ".join(d["titles"])
        name = next((g for g, pat in GROUPS if re.search(pat, text)), "other")
        groups[name][0] += 1
        groups[name][1] += d["cpu"]
    print(json.dumps({"benchmark": "suite_cpu", "command": " ".join(cmd), "rc": child.returncode,
                      "wall_s": round(time.time() - t0, 1),
                      "cpu_s": round(sum(c for _, c in groups.values()), 1),
                      "groups": {g: {"processes": n, "cpu_s": round(c, 1)}
                                 for g, (n, c) in sorted(groups.items(), key=lambda x: -x[1][1])}}))
    return child.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
