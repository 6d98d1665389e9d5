"""jobs/pipeline.py: data -> train -> tune -> evaluate -> deploy from one config on the tiny
dataset; the endpoint answers; the same pipeline again skips every stage whose inputs did not
change; a bad stage config is refused before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
import yaml
from conftest import ROOT
from helpers import free_port

from raylm import config, registry

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
                     "set": ["robustness=null", "slices.columns=[]", "baselines.ngram=null", "baselines.previous_versions=0"]},
        "deploy": {"config": str(CONFIGS / "deploy_tiny.yaml"), "model": "tune",
                   "set": [f"auth.keys_file={out / 'keys.json'}", f"http.port={extra.pop('port', 8000)}",
                           "models.0.num_cpus=0.5", "name=tiny-pipeline"]},
        "storage": str(out / "pipelines"),
        **extra,
    }
    f = tmp_path / "pipeline.yaml"
    f.write_text(yaml.safe_dump(doc))
    return str(f)


def test_pipeline_runs_every_stage_then_skips_what_did_not_change(ray_session, tmp_path):
    from ray import serve

    from raylm.pipeline import PipelineConfig, run
    from raylm.serve import keys

    key = keys.add("me", ["generate"], str(tmp_path / "out" / "keys.json"))
    port = free_port()
    f = _pipeline_file(tmp_path, port=port)
    try:
        first = run(config.load(PipelineConfig, f), f)
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
        # the endpoint serves the tune stage's best model and answers with the key
        r = requests.post(f"{st['deploy']['url']}/v1/completions", headers={"Authorization": f"Bearer {key}"},
                          json={"model": "tiny-llama", "prompt": "the king", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] is not None
        assert st["deploy"]["models"] == {"tiny-llama": first["models"]["tune"]}

        # the same pipeline again: nothing to redo, the same models
        again = run(config.load(PipelineConfig, f), f)
        assert {k for k, s in again["stages"].items() if s["skipped"]} == {"data", "train", "tune", "evaluate"}
        assert again["models"] == first["models"]
        assert [m["id"] for m in registry.list_models(reg) if m["name"] == "tiny-llama"] == [first["models"]["train"]]
        # a changed train config re-trains; the stages downstream of it run again
        changed = run(config.load(PipelineConfig, f, ["train.set=[train.num_workers=1,train.max_steps=4,"
                                                      f"output.storage={tmp_path / 'out' / 'runs2'},"
                                                      f"output.registry={reg}]"]), f)
        assert not changed["stages"]["train"]["skipped"] and not changed["stages"]["evaluate"]["skipped"]
        assert changed["stages"]["tune"]["skipped"]  # its inputs did not change
        assert changed["models"]["train"] != first["models"]["train"]
        # the endpoint was taken down while the train stage re-ran (its CPUs) and is back
        r = requests.post(f"{st['deploy']['url']}/v1/completions", headers={"Authorization": f"Bearer {key}"},
                          json={"model": "tiny-llama", "prompt": "the king", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200, r.text
    finally:
        serve.shutdown()


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
