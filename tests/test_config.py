"""Config loading: YAML + --set overrides -> validated models; user errors are one clear
message naming the field, and a job exits 2 before it touches Ray."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from raylm import config
from raylm.config import ConfigError
from raylm.data.config import DataConfig

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "jobs" / "configs" / "shakespeare.yaml"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_shipped_config_loads_with_typed_overrides():
    cfg = config.load(DataConfig, SHAKESPEARE, ["tokenizer.vocab_size=4096", "pack.seq_len=256",
                                               "sources.0.editions=[folio]", "output.rebuild=true"])
    assert cfg.tokenizer.vocab_size == 4096 and isinstance(cfg.tokenizer.vocab_size, int)
    assert cfg.pack.seq_len == 256
    assert cfg.sources[0].editions == ["folio"]
    assert cfg.output.rebuild is True
    assert cfg.label == "genre"


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError) as e:
        config.load(DataConfig, SHAKESPEARE, ["tokenizer.vocab_sise=4096"])
    msg = str(e.value)
    assert "unknown key `tokenizer.vocab_sise`" in msg
    assert "did you mean `tokenizer.vocab_size`" in msg


def test_wrong_type_names_the_field_and_the_value():
    with pytest.raises(ConfigError) as e:
        config.load(DataConfig, SHAKESPEARE, ["pack.seq_len=long"])
    assert "`pack.seq_len`" in str(e.value) and "'long'" in str(e.value)


def test_unknown_top_level_key_in_file(tmp_path):
    p = write(tmp_path, "name: x\nsources: [{kind: shakespeare}]\nsplitt: {train: 1}\n")
    with pytest.raises(ConfigError, match=r"unknown key `splitt`; did you mean `split`"):
        config.load(DataConfig, p)


def test_missing_required_field(tmp_path):
    p = write(tmp_path, "sources: [{kind: shakespeare}]\n")
    with pytest.raises(ConfigError, match=r"`name` is required"):
        config.load(DataConfig, p)


def test_discriminated_source_kinds(tmp_path):
    p = write(tmp_path, "name: x\nsources: [{kind: jsonl, uri: /data/a.jsonl, text_field: body}]\n")
    cfg = config.load(DataConfig, p)
    assert cfg.sources[0].kind == "jsonl" and cfg.sources[0].text_field == "body"
    with pytest.raises(ConfigError, match=r"sources\.0"):
        config.load(DataConfig, write(tmp_path, "name: x\nsources: [{kind: jsonl}]\n"))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(DataConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"not valid YAML \(line 3"):
        config.load(DataConfig, write(tmp_path, "name: x\nsources: [\n  - : :\n"))
    with pytest.raises(ConfigError, match="mapping"):
        config.load(DataConfig, write(tmp_path, "- a\n- b\n"))


def test_semantic_checks():
    with pytest.raises(ConfigError, match="must add up to 1"):
        config.load(DataConfig, SHAKESPEARE, ["split.train=0.5"])
    with pytest.raises(ConfigError, match="tokenizer.path is required"):
        config.load(DataConfig, SHAKESPEARE, ["tokenizer.kind=pretrained"])
    with pytest.raises(ConfigError, match="memory://"):
        config.load(DataConfig, SHAKESPEARE, ["output.root=memory://x"])
    with pytest.raises(ConfigError, match="unsupported storage URI"):
        config.load(DataConfig, SHAKESPEARE, ["output.root=ftp://host/x"])
    # a config written for the former tokenizer actor pool says what replaced it
    with pytest.raises(ConfigError, match="tokenize.min_actors and tokenize.max_actors are gone.*tokenize.concurrency"):
        config.load(DataConfig, SHAKESPEARE, ["tokenize.max_actors=2"])
    # robustness strengths of one op: only an op the evaluation runs, each in (0, 1]
    from raylm.evaluate.config import EvaluateConfig

    authors = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "evaluate_authors.yaml"
    ok = config.load(EvaluateConfig, authors, ["robustness.op_strengths={crop: [0.8, 0.95]}"])
    assert ok.robustness.strengths_of("crop") == [0.8, 0.95] and ok.robustness.strengths_of("typo") == [0.1, 0.3]
    with pytest.raises(ConfigError, match="op_strengths names crop, not in robustness.ops"):
        config.load(EvaluateConfig, authors, ["robustness.ops=[typo]"])
    with pytest.raises(ConfigError, match=r"op_strengths.crop must be a list of strengths in \(0, 1\]"):
        config.load(EvaluateConfig, authors, ["robustness.ops=[crop]", "robustness.op_strengths={crop: [1.5]}"])


@pytest.mark.parametrize("item,expected", [
    ("a.b=3", {"a": {"b": 3}}),
    ("a.b=true", {"a": {"b": True}}),
    ("a.b=[x, y]", {"a": {"b": ["x", "y"]}}),
    ("a.b='3'", {"a": {"b": "3"}}),
    ("a.b=", {"a": {"b": ""}}),
    ("a.b=null", {"a": {"b": None}}),
    ("a.b=s3://bucket/k=v", {"a": {"b": "s3://bucket/k=v"}}),
])
def test_override_values_are_typed_like_yaml(item, expected):
    assert config.apply_overrides({}, [item]) == expected


@pytest.mark.parametrize("item,fragment", [
    ("novalue", "expected KEY=VALUE"),
    ("a..b=1", "dotted path"),
    ("name.x=1", "is a value, not a section"),
    ("sources.3.uri=x", "is a list of 1"),
])
def test_bad_overrides(item, fragment):
    with pytest.raises(ConfigError, match=fragment):
        config.apply_overrides({"name": "n", "sources": [{}]}, [item])


def test_job_exits_2_with_one_message_before_starting_ray(tmp_path):
    """A bad key reaches the user as one line on stderr and exit code 2; no Ray is started."""
    env_home = tmp_path / "h"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "prepare_data.py"), "--config", str(SHAKESPEARE),
         "--set", "tokenizer.vocab_sise=10"],
        capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin", "HOME": str(env_home), "RAYLM_HOME": str(env_home / "r"),
             "RAY_AUTH_MODE": "disabled"},
    )
    assert proc.returncode == 2
    assert "unknown key `tokenizer.vocab_sise`" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "ray" not in proc.stdout.lower()  # nothing about starting or joining a cluster
    assert not (env_home / "r" / "ray").exists()


def test_job_missing_source_file_exits_2(tmp_path):
    cfg = write(tmp_path, f"name: x\nsources: [{{kind: jsonl, uri: {tmp_path / 'missing.jsonl'}}}]\n")
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "prepare_data.py"), "--config", str(cfg)],
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "RAY_AUTH_MODE": "disabled"})
    assert proc.returncode == 2, proc.stderr
    assert "no such file or directory" in proc.stderr and "missing.jsonl" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_train_job_unknown_dataset_exits_2_before_starting_ray(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), "--config",
                           str(ROOT / "tests" / "data" / "train_tiny.yaml"), "--set", "data.dataset=nope"],
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "RAYLM_HOME": str(tmp_path / "r"),
                               "RAY_AUTH_MODE": "disabled"})
    assert proc.returncode == 2, proc.stderr
    assert "data.dataset: no dataset 'nope'" in proc.stderr and "Traceback" not in proc.stderr


def test_train_config_errors_name_the_field():
    from raylm.train.config import TrainConfig

    with pytest.raises(ConfigError, match=r"unknown key `train.strategyy`; did you mean `train.strategy`"):
        config.load(TrainConfig, ROOT / "tests" / "data" / "train_tiny.yaml", ["train.strategyy=ddp"])
    with pytest.raises(ConfigError, match=r"`train.strategy`: Input should be 'ddp', 'fsdp' or 'deepspeed'"):
        config.load(TrainConfig, ROOT / "tests" / "data" / "train_tiny.yaml", ["train.strategy=horovod"])
    with pytest.raises(ConfigError, match="fp16 needs a loss scaler"):
        config.load(TrainConfig, ROOT / "tests" / "data" / "train_tiny.yaml", ["train.precision=fp16"])
    with pytest.raises(ConfigError, match="worker_resources cannot set GPU: use train.cpus_per_worker and train.use_gpu"):
        config.load(TrainConfig, ROOT / "tests" / "data" / "train_tiny.yaml", ["train.worker_resources={gpu: 1}"])
    with pytest.raises(ConfigError, match=r"model.calibration is for classification"):
        config.load(TrainConfig, ROOT / "tests" / "data" / "train_tiny.yaml", ["model.calibration=temperature"])
    with pytest.raises(ConfigError, match=r"an adapter export does not hold: use model.lora.export: merged"):
        config.load(TrainConfig, ROOT / "jobs" / "configs" / "train_authors.yaml",
                    ["model.calibration=temperature", "model.lora.export=adapter"])
    ok = config.load(TrainConfig, ROOT / "tests" / "data" / "train_tiny.yaml", ["train.worker_resources={trainer: 1}"])
    assert ok.train.worker_resource_request() == {"trainer": 1, "CPU": 1}


def test_worker_env_reaches_the_trainer_whole():
    from raylm.train.config import TrainConfig

    def env(*sets: str) -> dict:
        return config.load(TrainConfig, ROOT / "tests" / "data" / "train_tiny.yaml", list(sets)).train.worker_env

    assert env() == {"RAYLM_TEST_WORKER_ENV": "tiny"}
    assert env("train.worker_env={NCCL_DEBUG: INFO}") == {"NCCL_DEBUG": "INFO"}
    with pytest.raises(ConfigError, match="train.worker_env"):
        env("train.worker_env=[1, 2]")


# --- property tests: any input gives a valid config or one clear ConfigError --------------------

def _config_kinds():
    from raylm.evaluate.config import EvaluateConfig
    from raylm.pipeline import PipelineConfig
    from raylm.serve.config import DeployConfig
    from raylm.train.config import TrainConfig
    from raylm.tune.config import EnsembleConfig, TuneConfig

    c = ROOT / "jobs" / "configs"
    return [(DataConfig, SHAKESPEARE), (TrainConfig, c / "train_tiny.yaml"), (TuneConfig, c / "tune_authors_cv.yaml"),
            (EnsembleConfig, c / "ensemble_authors.yaml"), (EvaluateConfig, c / "evaluate_authors.yaml"),
            (DeployConfig, c / "deploy_authors.yaml"), (PipelineConfig, c / "pipeline_demo.yaml")]


def _leaf_paths(node, prefix=()):
    if isinstance(node, dict):
        for k, v in node.items():
            if "." not in str(k):  # a dotted key (a search space's `train.lr`) is one leaf of its parent
                yield from _leaf_paths(v, (*prefix, str(k)))
    elif isinstance(node, list) and node:
        for i, v in enumerate(node):
            yield from _leaf_paths(v, (*prefix, str(i)))
    if prefix:
        yield ".".join(prefix)


def _load_or_clear_error(model, path, overrides):
    """The contract: a model instance, or a ConfigError with a message a user can act on."""
    try:
        out = config.load(model, path, overrides)
    except ConfigError as e:
        msg = str(e)
        assert msg.strip() and "Traceback" not in msg and len(msg) < 5000, msg
        return None
    assert isinstance(out, model)
    return out


def _scalars():
    from hypothesis import strategies as st

    return (st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True, allow_infinity=True)
            | st.text(max_size=30))


def test_any_set_override_on_a_shipped_config_gives_a_config_or_one_clear_error():
    """`--set KEY=VALUE` with KEY a real path, a near miss or noise and VALUE any YAML scalar,
    list, mapping or plain garbage, on every shipped config kind."""
    import yaml
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    def current(doc, key):  # a leaf's own value, as `--set` text: always valid
        for part in key.split("."):
            doc = doc[int(part)] if isinstance(doc, list) else doc[part]
        return f"{key}={yaml.safe_dump(doc, default_flow_style=True).strip().removesuffix('...').strip()}"

    kinds = []
    for m, p in _config_kinds():
        doc = config.read_yaml(p)
        leaves = sorted(set(_leaf_paths(doc)))
        kinds.append((m, p, leaves, [current(doc, k) for k in leaves]))
    values = st.one_of(_scalars().map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()),
                       st.text(max_size=40), st.sampled_from(["[", "{a: 1", "- x", ": :", "!!python/object:os.system ls",
                                                              "*alias", "&a [1]", "1e999", "-1", "0", "''", "~"]))
    outcomes = {"valid": 0, "refused": 0}

    @settings(max_examples=200, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(kind=st.sampled_from(kinds), data=st.data())
    def check(kind, data):
        model, path, leaves, same = kind
        keys = st.sampled_from(leaves) | st.sampled_from(leaves).map(lambda k: k + "x") | st.text(max_size=20)
        overrides = data.draw(st.lists(st.tuples(keys, values).map(lambda kv: f"{kv[0]}={kv[1]}")
                                       | st.text(max_size=30) | st.sampled_from(same), min_size=1, max_size=3))
        outcomes["valid" if _load_or_clear_error(model, path, overrides) else "refused"] += 1

    check()
    assert outcomes["valid"] >= 5 and outcomes["refused"] > 100, outcomes  # both sides were reached


def test_any_yaml_file_gives_a_config_or_one_clear_error(tmp_path):
    """Whole files: random text, random YAML documents, and shipped configs with one value
    replaced by anything."""
    import random

    import yaml
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    kinds = _config_kinds()
    docs = st.recursive(_scalars(), lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=12), c, max_size=4),
                        max_leaves=10)
    f = tmp_path / "c.yaml"
    outcomes = {"valid": 0, "refused": 0}

    @settings(max_examples=200, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(kind=st.sampled_from(kinds), how=st.sampled_from(["text", "bytes", "doc", "mutate", "same"]), data=st.data())
    def check(kind, how, data):
        model, shipped = kind
        if how == "text":
            f.write_text(data.draw(st.text(max_size=200)))
        elif how == "bytes":
            f.write_bytes(data.draw(st.binary(max_size=200)))
        elif how == "doc":
            f.write_text(yaml.safe_dump(data.draw(docs)))
        elif how == "same":  # the shipped file through a YAML round trip: must stay valid
            f.write_text(yaml.safe_dump(config.read_yaml(shipped)))
        else:
            d = config.read_yaml(shipped)
            leaves = sorted(_leaf_paths(d))
            parts = data.draw(st.sampled_from(leaves)).split(".")
            node = d
            for p in parts[:-1]:
                node = node[int(p)] if isinstance(node, list) else node[p]
            last = int(parts[-1]) if isinstance(node, list) else parts[-1]
            node[last] = data.draw(docs)
            if data.draw(st.booleans()):  # and sometimes a key nobody knows
                d[random.Random(len(leaves)).choice(["extra", "Name", "sources_", "train "])] = 1
            f.write_text(yaml.safe_dump(d))
        outcomes["valid" if _load_or_clear_error(model, f, []) else "refused"] += 1

    check()
    assert outcomes["valid"] >= 5 and outcomes["refused"] > 100, outcomes  # both sides were reached


def test_a_grid_search_trains_each_combination_once_unless_told_to_repeat(tmp_path):
    """Tune repeats a grid num_samples times, and a repeat (same train.seed) trains the same model
    again: a grid left at the default runs each combination once; sampling searches keep 8."""
    from raylm.tune.config import TuneConfig

    f = tmp_path / "tune.yaml"
    f.write_text(f"name: g\ntrain: {ROOT / 'jobs' / 'configs' / 'train_tiny.yaml'}\n"
                 "space: {train.lr: {grid: [0.001, 0.002, 0.003]}}\n")
    assert config.load(TuneConfig, f, ["search.algorithm=grid"]).search.num_samples == 1
    assert config.load(TuneConfig, f, ["search.algorithm=grid", "search.num_samples=2"]).search.num_samples == 2
    assert config.load(TuneConfig, f, []).search.num_samples == 8  # random
