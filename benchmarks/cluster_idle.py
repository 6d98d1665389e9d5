"""What an aging local cluster costs while idle: the CPU of Ray's dashboard agent and log monitor
after many short-lived worker processes, with raylm's event-scan interval (`raylm up` sets
SCAN_EVENT_DIR_INTERVAL_SECONDS=10) and with Ray's default (2 s), measured in the same run.

    python benchmarks/cluster_idle.py --actors 300 --window 30   # ~6 minutes on 2 cores

Each setting gets a fresh `raylm up --num-cpus 2` in a temporary RAYLM_HOME (stop any other
local Ray first: two clusters on one small machine disturb each other). The actors are started
and killed 10 at a time, as Ray Train, Tune and Serve start and end theirs; then the cluster is
left alone for `--window` seconds and the two processes' CPU time is read from /proc. Prints one
JSON line: percent of one core for each process and setting.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))


def _cpu_s(pattern: str) -> float:
    import psutil

    total = 0.0
    for p in psutil.process_iter(["cmdline", "name"]):
        try:
            if pattern in " ".join(p.info["cmdline"] or []) or pattern in (p.info["name"] or ""):
                t = p.cpu_times()
                total += t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def churn(actors: int) -> None:
    """In its own process (Ray reads the cluster's token once per process): start and kill
    `actors` short-lived actors, 10 at a time."""
    import ray

    ray.init(address=os.environ["RAYLM_BENCH_GCS"], log_to_driver=False, logging_level="ERROR")

    @ray.remote(num_cpus=0)
    class Short:
        def ping(self) -> int:
            print("a line for the log monitor")
            return os.getpid()

    t0 = time.time()
    for i in range(0, actors, 10):
        batch = [Short.remote() for _ in range(min(10, actors - i))]
        ray.get([a.ping.remote() for a in batch])
        for a in batch:
            ray.kill(a)
        if i and i % 100 == 0:
            print(f"[idle] {i}/{actors} actors ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    ray.shutdown()


def measure(scan_s: str, actors: int, window: float) -> dict[str, float]:
    from raylm import cluster

    home = Path(tempfile.mkdtemp(prefix="raylm-idle-"))
    os.environ["SCAN_EVENT_DIR_INTERVAL_SECONDS"] = scan_s
    state = cluster.up(state_dir=home, num_cpus=2, port=cluster.free_port(), dashboard_port=cluster.free_port())
    try:
        print(f"[idle] SCAN_EVENT_DIR_INTERVAL_SECONDS={scan_s}: {actors} short-lived actors", file=sys.stderr,
              flush=True)
        env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=state.token_path,
                   RAYLM_BENCH_GCS=state.gcs_address)
        subprocess.run([sys.executable, __file__, "--churn", str(actors)], env=env, check=True)
        time.sleep(5)  # the last actors' exit
        before = {"agent": _cpu_s("ray::DashboardAgent"), "log_monitor": _cpu_s("log_monitor.py")}
        time.sleep(window)
        after = {"agent": _cpu_s("ray::DashboardAgent"), "log_monitor": _cpu_s("log_monitor.py")}
        return {k: round(100 * (after[k] - before[k]) / window, 2) for k in before}
    finally:
        cluster.down(home)
        shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--actors", type=int, default=300, help="short-lived actors started and killed first")
    ap.add_argument("--window", type=float, default=30, help="seconds the idle cluster is measured")
    ap.add_argument("--churn", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.churn is not None:
        churn(args.churn)
        return
    raylm = measure("10", args.actors, args.window)
    ray_default = measure("2", args.actors, args.window)
    print(json.dumps({
        "bench": "cluster_idle", "dead_workers": args.actors, "window_s": args.window,
        "agent_cpu_pct": raylm["agent"], "baseline_agent_cpu_pct_ray_default_2s": ray_default["agent"],
        "log_monitor_cpu_pct": raylm["log_monitor"], "baseline_log_monitor_cpu_pct": ray_default["log_monitor"],
    }))


if __name__ == "__main__":
    main()
