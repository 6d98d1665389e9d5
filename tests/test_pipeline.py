"""jobs/pipeline.py: data -> train -> tune -> evaluate -> deploy from one config on the tiny
dataset; the endpoint answers; the same pipeline again skips every stage whose inputs did not
change; a bad stage config is refused before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
import yaml
from conftest import ROOT, run_cli
from helpers import free_port, issued

from raylm import cluster, config, registry

CONFIGS = ROOT / "jobs" / "configs"


def _pipeline_file(tmp_path, **extra) -> str:
    out = tmp_path / "out"
    doc = {
        "name": "tiny-pipeline",
        "data": {"config": str(ROOT / "tests" / "data" / "tiny.yaml"),
                 "set": [f"sources.0.uri={ROOT / 'tests' / 'data' / 'tiny.jsonl'}", f"output.root={out / 'datasets'}"]},
        "train": {"config": str(CONFIGS / "train_tiny.yaml"),
                  "set": ["train.num_workers=1", "train.max_steps=6", "train.eval_every=3", "train.checkpoint_every=6",
                          f"output.storage={out / 'runs'}", f"output.registry={out / 'registry'}"]},
        "tune": {"config": str(CONFIGS / "tune_tiny.yaml"),
                 "set": ["search.num_samples=2", "search.algorithm=random", "search.scheduler=fifo",
                         "set=[train.num_workers=1,train.max_steps=4,train.eval_every=2]",
                         f"output.storage={out / 'tune'}", f"output.registry={out / 'registry'}"]},
        "evaluate": {"config": str(CONFIGS / "evaluate_tiny.yaml"), "model": "train",
                     "set": ["robustness=null", "slices.columns=[]", "baselines.ngram=null", "baselines.previous_versions=0",
                             "promote={alias: best, metric: perplexity}"]},
        "deploy": {"config": str(CONFIGS / "deploy_tiny.yaml"), "model": "tune",
                   "set": [f"auth.keys_file={out / 'keys.json'}", f"http.port={extra.pop('port', 8000)}",
                           "models.0.num_cpus=0.5", "name=tiny-pipeline"]},
        "storage": str(out / "pipelines"),
        **extra,
    }
    f = tmp_path / "pipeline.yaml"
    f.write_text(yaml.safe_dump(doc))
    return str(f)


@pytest.fixture(scope="module")
def prometheus(raylm_cluster):
    """`raylm up --metrics` on the running session cluster: it adds a real Prometheus scraping it
    (when the binary is installed: `make test` installs Debian's package when it runs as root).
    Its URL, or the CLI's message when it could not start. test_prometheus_scrapes_train_and_serve_metrics
    stops it with `raylm down --metrics` as soon as it has found its series: every scrape makes Ray's
    dashboard agent render every metric series of the session (measured: ~30% of a core at a
    5 s interval), CPU the pipeline's later runs and the rest of the suite need."""
    up = run_cli("up", "--metrics", "--metrics-interval", "5")  # (a test waits for a scrape)
    if up.returncode != 0:
        yield (up.stderr + up.stdout).strip()
        return
    state = cluster.ClusterState.load(cluster.home())
    assert state.prometheus_url and "Prometheus started at" in up.stdout, up.stdout
    yield state.prometheus_url
    if cluster.ClusterState.load(cluster.home()).prometheus_url:  # the test failed before it stopped it
        run_cli("down", "--metrics")


@pytest.fixture(scope="module")
def first_run(ray_session, prometheus, tmp_path_factory):
    """The pipeline once, from nothing: data, train, tune, evaluate, deploy."""
    from ray import serve

    from raylm.pipeline import PipelineConfig, run
    from raylm.serve import keys

    tmp_path = tmp_path_factory.mktemp("pipeline")
    key = issued(keys.add("me", ["generate"], str(tmp_path / "out" / "keys.json")))
    f = _pipeline_file(tmp_path, port=free_port())
    try:
        yield {"summary": run(config.load(PipelineConfig, f), f), "file": f, "key": key, "dir": tmp_path}
    finally:
        serve.shutdown()


def _complete(url: str, key: str) -> requests.Response:
    return requests.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {key}"},
                         json={"model": "tiny-llama", "prompt": "the king", "max_tokens": 4}, timeout=60)


def test_prometheus_scrapes_train_and_serve_metrics(first_run, prometheus):
    """`raylm up --metrics`'s Prometheus, on the session's cluster: after the pipeline's training
    and a few requests, it holds raylm_train_* and raylm_serve_* series. (Before the test of the
    pipeline's later runs: it stops Prometheus, see the fixture.)"""
    import os
    import time

    if not prometheus.startswith("http://"):
        if os.environ.get("CI"):
            pytest.fail(prometheus)
        pytest.skip(prometheus)
    url = first_run["summary"]["stages"]["deploy"]["url"]
    ok_requests = 'sum(ray_raylm_serve_requests_total{route="/v1/completions",status="200"})'
    deadline, names, served = time.time() + 90, set(), []
    while time.time() < deadline:
        _complete(url, first_run["key"])
        r = requests.get(f"{prometheus}/api/v1/label/__name__/values", timeout=10)
        names = {n for n in r.json()["data"] if n.startswith("ray_raylm_")}  # Ray prefixes them with ray_
        # the name alone can come from an earlier test's app: wait for this app's 200s to be scraped too
        served = requests.get(f"{prometheus}/api/v1/query", timeout=10, params={"query": ok_requests}).json()["data"]["result"]
        if any(n.startswith("ray_raylm_train_") for n in names) and served:
            break
        time.sleep(2)
    assert {"ray_raylm_serve_requests_total", "ray_raylm_serve_request_latency_seconds_bucket"} <= names, names
    assert {"ray_raylm_train_loss", "ray_raylm_train_step"} <= names, names
    assert served and float(served[0]["value"][1]) >= 1, served
    # `raylm down --metrics` stops Prometheus and leaves the cluster running
    down = run_cli("down", "--metrics")
    assert down.returncode == 0 and "stopped Prometheus" in down.stdout, down.stdout + down.stderr
    assert cluster.is_running(cluster.ClusterState.load(cluster.home()))
    assert not cluster.ClusterState.load(cluster.home()).prometheus_url


def test_pipeline_runs_every_stage_then_skips_what_did_not_change(first_run):
    from raylm.pipeline import PipelineConfig, run

    first, f, key, tmp_path = first_run["summary"], first_run["file"], first_run["key"], first_run["dir"]
    st = first["stages"]
    assert set(st) == {"data", "train", "tune", "evaluate", "deploy"}
    assert not any(s["skipped"] for s in st.values())
    reg = str(tmp_path / "out" / "registry")
    card = registry.resolve(first["models"]["train"], reg)
    assert card["dataset"] == first["dataset"] and card["metrics"]["steps"] == 6
    assert st["tune"]["trials"] == 2 and first["models"]["tune"].startswith("tiny-search@")
    report = json.loads(Path(st["evaluate"]["report"]).with_name("report.json").read_text())
    assert st["evaluate"]["model"] == first["models"]["train"] and st["evaluate"]["metrics"]["perplexity"] > 1
    assert report["metrics"]["perplexity"] == st["evaluate"]["metrics"]["perplexity"]
    assert st["evaluate"]["promotion"] == {"alias": "best", "promoted": True, "reason": report["promotion"]["reason"]}
    assert registry.resolve("tiny-llama@best", reg)["id"] == first["models"]["train"]  # it pointed nowhere
    # the endpoint serves the tune stage's best model and answers with the key
    r = _complete(st["deploy"]["url"], key)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] is not None
    assert st["deploy"]["models"] == {"tiny-llama": first["models"]["tune"]}

    # the same pipeline again: nothing to redo, the same models
    again = run(config.load(PipelineConfig, f), f)
    assert {k for k, s in again["stages"].items() if s["skipped"]} == {"data", "train", "tune", "evaluate"}
    assert again["stages"]["deploy"]["redeployed"].startswith("nothing changed"), again["stages"]["deploy"]  # no restart
    assert again["models"] == first["models"]
    assert [m["id"] for m in registry.list_models(reg) if m["name"] == "tiny-llama"] == [first["models"]["train"]]
    # a changed train config re-trains; the stages downstream of it run again. Its evaluation moves
    # the alias `best` only if its perplexity is no worse, and a deploy of the train stage's model
    # serves what `best` points at
    # (the same run name and storage: the finished 6-step run is started over, not resumed)
    changed = run(config.load(PipelineConfig, f, ["train.set=[train.num_workers=1,train.max_steps=4,"
                                                  f"output.storage={tmp_path / 'out' / 'runs'},"
                                                  f"output.registry={reg}]", "deploy.model=train"]), f)
    assert not changed["stages"]["train"]["skipped"] and not changed["stages"]["evaluate"]["skipped"]
    assert changed["stages"]["tune"]["skipped"]  # its inputs did not change
    assert changed["models"]["train"] != first["models"]["train"]
    ppl = {m: registry.resolve(m, reg)["evaluations"][f"{first['dataset']}:test"]["metrics"]["perplexity"]
           for m in (first["models"]["train"], changed["models"]["train"])}
    better = changed["models"]["train"] if ppl[changed["models"]["train"]] <= ppl[first["models"]["train"]] \
        else first["models"]["train"]
    assert changed["stages"]["evaluate"]["promotion"]["promoted"] == (better == changed["models"]["train"]), ppl
    assert registry.resolve("tiny-llama@best", reg)["id"] == better
    assert changed["stages"]["deploy"]["models"] == {"tiny-llama": better}
    # the endpoint was taken down while the train stage re-ran (its CPUs) and is back
    r = _complete(st["deploy"]["url"], key)
    assert r.status_code == 200, r.text
    # force: [train] with nothing changed trains again from step 0 (resuming the finished run would
    # hand back the model it has)
    from raylm.serve.job import undeploy

    undeploy(changed["stages"]["deploy"]["app"])  # its CPUs: this run has no deploy stage to free them
    forced = run(config.load(PipelineConfig, f, ["train.set=[train.num_workers=1,train.max_steps=4,"
                                                 f"output.storage={tmp_path / 'out' / 'runs'},"
                                                 f"output.registry={reg}]", "force=[train]", "tune=null",
                                                 "evaluate=null", "deploy=null"]), f)
    assert not forced["stages"]["train"]["skipped"]
    assert forced["models"]["train"] not in (changed["models"]["train"], first["models"]["train"])


def test_bad_stage_config_is_refused_before_anything_runs(tmp_path):
    from raylm.pipeline import PipelineConfig, check

    f = _pipeline_file(tmp_path)
    bad = config.load(PipelineConfig, f, ["train.set=[train.max_stepz=4]"])
    with pytest.raises(config.ConfigError, match="train stage: .*max_stepz"):
        check(bad, f)
    missing = config.load(PipelineConfig, f, ["evaluate.config=nope.yaml"])
    with pytest.raises(config.ConfigError, match="evaluate stage: no config file at nope.yaml"):
        check(missing, f)
    no_tune = config.load(PipelineConfig, f, ["tune=null"])
    with pytest.raises(config.ConfigError, match="deploy stage: model 'tune'"):
        check(no_tune, f)


def test_the_demo_asks_about_a_held_out_passage_of_each_author(authors_dataset):
    """What `make demo` sends its endpoint beside two famous lines: the first test-split passage
    of each author, from the dataset version the pipeline built (never trained on)."""
    from raylm.data.versions import read_split
    from raylm.demo import held_out

    m = authors_dataset["manifest"]
    cases = held_out(m["uri"])
    assert [label for label, _ in cases] == ["milton", "shakespeare"]
    test = read_split(m, "docs", "test", ["label", "text"]).to_pylist()
    for label, text in cases:
        assert text == next(r["text"] for r in test if r["label"] == label) and len(text) > 500
    train = set(read_split(m, "docs", "train", ["text"]).column("text").to_pylist())
    assert not {text for _, text in cases} & train
