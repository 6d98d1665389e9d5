"""Security (issue 9): API keys hashed at rest, no secret in what a job submission carries
(the Jobs API shows a job's runtime_env to anyone who can list jobs), Serve on loopback unless
asked, and, after everything else in the session ran, no API key or cluster token in any log
or file the cluster wrote. (Token auth on the Jobs API and the dashboard on loopback:
tests/test_cli.py; key scopes, rate limits, prompt and body limits: tests/test_serve.py.)"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from conftest import ROOT
from helpers import SECRETS

from raylm import cluster


def test_api_keys_are_stored_only_as_hashes(tmp_path):
    from raylm.serve import keys

    f = str(tmp_path / "keys.json")
    key = keys.add("alice", ["generate"], f, rate_limit_per_minute=5)
    text = Path(f).read_text()
    assert key not in text and key.split("-", 1)[-1] not in text
    (entry,) = json.loads(text)["keys"]
    assert entry["sha256"] == hashlib.sha256(key.encode()).hexdigest()
    store = keys.KeyStore(f)
    assert store.lookup(key).allows("generate") and not store.lookup(key).allows("admin")
    assert store.lookup(key[:-1] + ("A" if key[-1] != "A" else "B")) is None  # one character off: refused
    assert keys.revoke("alice", f) and keys.KeyStore(f).lookup(key) is None


def test_a_job_submission_carries_no_secret_from_the_shell(monkeypatch):
    """`raylm submit` with cloud, tracking and cluster secrets in the submitting shell: the
    request (entrypoint, runtime_env, metadata) holds none of them, and the uploaded working
    directory leaves out the state dir (tokens), env files and key files."""
    from raylm.jobs_api import UPLOAD_EXCLUDES, build_submission

    secrets = {"AWS_SECRET_ACCESS_KEY": "aws-secret-6f1e", "RAY_AUTH_TOKEN": "ray-token-77aa",
               "COMET_API_KEY": "comet-key-19b2", "HF_TOKEN": "hf_token_c0de", "MLFLOW_TRACKING_PASSWORD": "mlf-pw-4e4e"}
    for k, v in secrets.items():
        monkeypatch.setenv(k, v)
    sub = build_submission("train", str(ROOT / "jobs" / "configs" / "train_tiny.yaml"),
                           ["train.max_steps=2"], ROOT)
    text = json.dumps(sub)
    assert not [v for v in secrets.values() if v in text], text
    assert set(sub["runtime_env"]) == {"working_dir", "excludes"}  # no env_vars at all
    assert {".raylm/", ".env", ".env.*", "*.pem"} <= set(UPLOAD_EXCLUDES)


def test_the_jobs_api_lists_no_secret(raylm_cluster):
    """What anyone with the cluster token can list about every job submitted in this session
    holds neither the token itself nor an API key."""
    client = cluster.job_client(cluster.resolve_target())
    jobs = client.list_jobs()
    text = json.dumps([j.model_dump() if hasattr(j, "model_dump") else vars(j) for j in jobs], default=str)
    token = Path(raylm_cluster.token_path).read_text().strip()
    assert token and token not in text
    assert not [s for s in SECRETS if s in text]


def test_serve_binds_to_loopback_unless_asked():
    from raylm import config
    from raylm.serve.config import DeployConfig

    cfg = config.load(DeployConfig, ROOT / "jobs" / "configs" / "deploy_tiny.yaml")
    assert cfg.http.host == "127.0.0.1"
    assert config.load(DeployConfig, ROOT / "jobs" / "configs" / "deploy_tiny.yaml",
                       ["http.host=0.0.0.0"]).http.host == "0.0.0.0"


def _files(root: Path):
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            if p.is_file() and not p.is_symlink():
                yield p


@pytest.mark.last
def test_no_log_or_file_of_the_session_holds_a_key_or_the_token(raylm_cluster, request):
    """Runs after every other test: every file under the cluster's Ray temp dir (the logs of the
    GCS, raylets, workers, drivers, jobs, Serve and its replicas) and under RAYLM_HOME except
    the token file itself, searched for the cluster token and every API key the session's
    tests issued and sent (the serving tests, the pipeline's endpoint)."""
    if not any("test_serve.py" in item.nodeid for item in request.session.items):
        pytest.skip("the serving tests (which issue and send the keys) are not part of this run")
    token = Path(raylm_cluster.token_path).read_text().strip()
    needles = [s.encode() for s in {token, *SECRETS} if s]
    assert len(needles) >= 5, "the serving and pipeline tests did not run: nothing to look for"
    found, scanned = [], 0
    token_files = {Path(raylm_cluster.token_path).resolve()}
    for root in {Path(raylm_cluster.temp_dir), cluster.home()}:
        for p in _files(root):
            if p.resolve() in token_files or p.suffix in (".sock", ".db", ".db-journal"):
                continue
            try:
                data = p.read_bytes()
            except OSError:
                continue
            scanned += 1
            found += [f"{p}: {n[:12].decode()}..." for n in needles if n in data]
    assert scanned > 50, scanned
    assert not found, found
