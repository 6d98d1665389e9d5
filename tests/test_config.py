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
