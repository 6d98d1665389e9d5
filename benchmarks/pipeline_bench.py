"""The demo pipeline's time, stage by stage: `make demo` (python -m raylm.demo) on a fresh state
dir (new cluster, corpus fetched, nothing built), then again on the same state (every stage
whose inputs did not change is skipped: the baseline of what the ledger saves). One JSON line:
the cold run's seconds per stage and in total against the goal (<= 900 s on 2 CPU cores), and
the warm run's total.

Usage: python benchmarks/pipeline_bench.py      (stops the cluster it started at the end)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL_S = 900


def demo(env: dict) -> tuple[dict, float]:
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "raylm.demo"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=3600)
    seconds = time.time() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-3000:])
        raise SystemExit(f"the demo failed (exit {proc.returncode})")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RAYLM_DEMO "))
    return json.loads(line.split(" ", 1)[1]), seconds


def main() -> int:
    home = tempfile.mkdtemp(prefix="raylm-demo-bench-")
    env = {**os.environ, "RAYLM_HOME": home}
    env.pop("RAY_ADDRESS", None)
    try:
        cold, cold_s = demo(env)
        warm, warm_s = demo(env)
    finally:
        subprocess.run([sys.executable, "-m", "raylm.cli", "down"], cwd=ROOT, env=env, capture_output=True)
    print(json.dumps({
        "benchmark": "demo_pipeline", "config": "jobs/configs/pipeline_demo.yaml", "cpus": os.cpu_count(),
        "cold_seconds": round(cold_s, 1), "cold_pipeline_seconds": cold["pipeline_seconds"],
        "stage_seconds": cold["stages"], "warm_seconds": round(warm_s, 1),
        "warm_pipeline_seconds": warm["pipeline_seconds"], "skipped_when_warm": warm["skipped"],
        "goal_seconds": GOAL_S, "within_goal": cold_s <= GOAL_S,
        "cluster_start_included": True, "install_included": False}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
