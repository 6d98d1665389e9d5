"""Small real inputs for tests: text files, JSON lines, CSV and parquet written to disk."""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

WORDS = ("the king queen crown sword night day love death honour battle field ship sea storm "
         "fool jest wine song letter ring forest duke lord lady ghost castle heaven earth").split()


def sentence(rng: random.Random, n: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def documents(n: int, seed: int = 0, sentences: int = 8) -> list[dict]:
    rng = random.Random(seed)
    return [{"doc_id": f"d{i:03d}", "body": " ".join(sentence(rng) for _ in range(sentences)),
             "y": rng.choice(["comedy", "tragedy"])} for i in range(n)]


def write_jsonl(path: Path, docs: list[dict], bad_lines: list[str] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(d) for d in docs]
    for i, bad in enumerate(bad_lines):
        lines.insert(1 + 2 * i, bad)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_parquet(path: Path, docs: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(docs), path)
    return path


def small_config(data_root: Path, sources: list[dict], **extra) -> dict:
    cfg = {
        "name": "tiny",
        "sources": sources,
        "split": {"key": "id", "train": 0.8, "validation": 0.1, "test": 0.1},
        "tokenizer": {"vocab_size": 300, "min_frequency": 1},
        "pack": {"seq_len": 32},
        "tokenize": {"concurrency": 1, "batch_size": 8},
        "output": {"root": str(data_root)},
    }
    cfg.update(extra)
    return cfg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SECRETS: list[str] = []  # every API key a test issued: tests/test_security.py looks for them in logs


def issued(secret: str) -> str:
    """Record a secret a test created (an API key) and return it."""
    SECRETS.append(secret)
    return secret


def add_node(gcs_address: str, temp_dir: str, num_cpus: int, resources: dict | None = None):
    """A second Ray node on this machine joined to the running cluster, started the way
    `ray.cluster_utils.Cluster.add_node` starts its worker nodes (its own raylet and object
    store); returns the node once the cluster lists it alive."""
    import time

    import ray
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    before = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    params = RayParams(gcs_address=gcs_address, temp_dir=temp_dir, num_cpus=num_cpus, num_gpus=0,
                       resources=resources or {}, object_store_memory=200 * 1024 * 1024,
                       min_worker_port=0, max_worker_port=0, include_log_monitor=False, node_manager_port=0)
    params.dashboard_agent_listen_port = None
    node = Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        if {n["NodeID"] for n in ray.nodes() if n["Alive"]} - before:
            return node
        time.sleep(0.2)
    raise TimeoutError("the added node did not join the cluster")


def lose_node(node) -> None:
    """The node goes away at once, as a machine that dies: every process of it killed, no drain."""
    node.kill_all_processes(check_alive=False, allow_graceful=False, wait=True)


def serve_access_lines(temp_dir: str, app: str) -> list[str]:
    """Ray Serve's access-log lines (` -- POST /v1/... 200 12.3ms`, ` -- CALL generate OK ...`)
    in the replica logs of `app` on this machine's session of the cluster in `temp_dir`."""
    import re

    logs = Path(temp_dir) / "session_latest" / "logs" / "serve"
    pattern = re.compile(r" -- (GET|POST|CALL) ")
    files = list(logs.glob(f"replica_{app}_*.log"))
    assert files, f"no replica logs of app {app!r} in {logs}"
    return [line for f in files for line in f.read_text(errors="replace").splitlines() if pattern.search(line)]
