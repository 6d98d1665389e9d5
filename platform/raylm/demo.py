"""`make demo`: start the local cluster (token auth, dashboard on 127.0.0.1) if it is not
running, make sure the demo has an API key, submit the whole pipeline
(`jobs/pipeline.py --config jobs/configs/pipeline_demo.yaml`: data -> train -> tune ->
ensemble -> evaluate -> deploy on the Shakespeare + Milton corpus) as one Ray job, then ask
the served model a question over HTTP. The cluster and the endpoint stay up afterwards; `make
down` (or `raylm down`) stops them. A second `make demo` skips every stage whose inputs did not
change."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from raylm import cli, cluster, jobs_api

PIPELINE = "jobs/configs/pipeline_demo.yaml"
KEY_NAME = "demo"


def demo_key() -> Path:
    """The demo's API key, in a file only this user can read (the key is never printed)."""
    from raylm.serve import keys

    path = cluster.home() / "demo-api-key"
    known = {k["name"] for k in keys.list_keys()}
    if path.is_file() and KEY_NAME in known:
        return path
    if KEY_NAME in known:
        keys.revoke(KEY_NAME)  # its clear text is lost: a new one
    key = keys.add(KEY_NAME, ["classify", "generate", "feedback"])
    path.write_text(key + "\n")
    os.chmod(path, 0o600)
    print(f"[demo] created the API key {KEY_NAME!r} (scopes classify, generate, feedback) in {path}", flush=True)
    return path


LINES = ["Of Man's first disobedience, and the fruit of that forbidden tree, whose mortal taste brought death "
         "into the world", "Now is the winter of our discontent made glorious summer by this sun of York"]


def held_out(dataset_uri: str) -> list[tuple[str, str]]:
    """(label, text) of the first passage of each label in the dataset's test split: passages
    the model never trained on, of the kind it learned from."""
    from raylm.data.versions import read_split, resolve

    first: dict[str, str] = {}
    for row in read_split(resolve(dataset_uri), "docs", "test", ["label", "text"]).to_pylist():
        first.setdefault(row["label"], row["text"])
    return sorted(first.items())


def ask(url: str, model: str, key_file: Path, dataset_uri: str | None = None) -> str:
    """The endpoint's answers on a held-out passage of each author (when the dataset is known)
    and on two famous single lines."""
    import requests

    key = key_file.read_text().strip()
    passages = held_out(dataset_uri) if dataset_uri else []
    texts = [text for _, text in passages] + LINES
    r = requests.post(f"{url}/v1/classify", headers={"Authorization": f"Bearer {key}"},
                      json={"model": model, "texts": texts}, timeout=60)
    if r.status_code != 200:
        return f"HTTP {r.status_code}: {r.text[:300]}"
    lines = [f"    {' '.join(text.split())[:60]!r}... -> {res['label']} ({max(res['probabilities'].values()):.2f})"
             for text, res in zip(texts, r.json()["data"])]
    out = []
    if passages:
        out.append("  held-out test passages (~1,000 characters, as the model was trained on):")
        out += [f"{line}   (written by {label})" for line, (label, _) in zip(lines, passages)]
    out.append("  single lines (much shorter than what the model learned from: harder):")
    out += lines[len(passages):]
    return "\n".join(out)


def main() -> int:
    t0 = time.time()
    if cli.main(["up"]) != 0:
        return 1
    state = cluster.ClusterState.load(cluster.home())
    key_file = demo_key()
    print(f"\n== submitting the pipeline: jobs/pipeline.py --config {PIPELINE} ==", flush=True)
    code = cli.main(["submit", "pipeline", "--config", PIPELINE])
    if code != 0:
        print(f"the pipeline failed (exit {code}); its logs are above and in the dashboard", file=sys.stderr)
        return code
    from raylm import config
    from raylm.pipeline import Ledger, PipelineConfig, ledger_uri

    ledger = Ledger(ledger_uri(config.load(PipelineConfig, PIPELINE)))
    deploy_cfg = config.load(jobs_api.model_for("deploy"), "jobs/configs/deploy_authors.yaml")
    url = f"http://{deploy_cfg.http.host}:{deploy_cfg.http.port}"
    data = (ledger.entries.get("data") or {}).get("output") or {}
    answer = ask(url, deploy_cfg.models[0].name, key_file, data.get("uri"))
    print(f"""
== demo done in {time.time() - t0:.0f}s ==
the endpoint answers (POST {url}/v1/classify):
{answer}
dashboard        {state.dashboard_url}   (token: {state.token_path})
stage ledger     {ledger.uri}
experiments      MLflow store {cluster.home() / "mlflow" / "mlflow.db"} (to browse it: pip install mlflow;
                 mlflow server --backend-store-uri sqlite:///{cluster.home() / "mlflow" / "mlflow.db"})
try it           export RAYLM_API_KEY=$(cat {key_file})
                 curl {url}/v1/classify -H "Authorization: Bearer $RAYLM_API_KEY" -H 'Content-Type: application/json' \\
                      -d '{{"model": "{deploy_cfg.models[0].name}", "texts": ["To be, or not to be"]}}'
                 open {url}/ for the playground
next             export RAYLM_HOME={cluster.home()}    # where this cluster's state lives
                 .venv/bin/raylm models list
                 .venv/bin/raylm submit pipeline --config {PIPELINE}   # again: every stage skipped
stop everything  make down""")
    last = json.loads(Path(ledger.uri).with_name("last_run.json").read_text())
    print("RAYLM_DEMO " + json.dumps({"seconds": round(time.time() - t0, 1), "pipeline_seconds": last["seconds"],
                                      "stages": {k: v["seconds"] for k, v in last["stages"].items()},
                                      "skipped": [k for k, v in last["stages"].items() if v["skipped"]]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
