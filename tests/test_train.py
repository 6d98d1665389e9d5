"""Training on a real local Ray cluster (2 CPU workers, gloo): every strategy trains and its
export loads with transformers and gives the trained model's logits; ddp and fsdp follow the
same loss curve; a stopped job resumes from its last checkpoint when submitted again."""

from __future__ import annotations

import math
import re
import time

import pytest
import torch

from conftest import run_cli
from conftest import STRATEGIES, train_tiny
from raylm import cluster, registry


@pytest.fixture(scope="module")
def dataset(train_dataset):
    return train_dataset


@pytest.fixture(scope="module")
def trained(dataset):
    cache: dict[str, tuple[dict, dict]] = {}

    def train(key: str) -> tuple[dict, dict]:
        if key not in cache:
            dataset["dir"]
            cache[key] = train_tiny(dataset, f"t-{key}", STRATEGIES[key])
        return cache[key]

    return train


@pytest.mark.parametrize("key", list(STRATEGIES))
def test_strategy_trains_and_exports_a_model_transformers_loads(trained, dataset, key):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, card = trained(key)
    vocab = dataset["manifest"]["tokenizer"]["vocab_size"]
    curve = [loss for _, loss in card["loss_curve"]]
    assert curve[-1] < curve[0] - 0.3, curve  # the loss went down
    assert curve[-1] < math.log(vocab)  # below a uniform guess
    assert card["metrics"]["steps"] == 12 and card["dataset"] == dataset["manifest"]["id"]
    assert card["strategy"] == {"ddp": "ddp", "fsdp": "fsdp", "zero2": "deepspeed-zero2",
                                "zero3": "deepspeed-zero3"}[key]
    # the registered directory loads offline and answers exactly as the trained model did
    path = registry.local_path(card)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32).eval()
    check = card["export_check"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([check["probe_input_ids"]])).logits
    assert torch.allclose(logits[0, -1, :16], torch.tensor(check["last_position_logits_head"]), atol=1e-3)
    assert abs(float(logits.abs().sum()) - check["logits_abs_sum"]) < 1e-3 * check["logits_abs_sum"]
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == vocab and model.config.vocab_size == vocab


def test_gpt2_with_tied_embeddings_trains_sharded_and_exports(dataset):
    from transformers import AutoModelForCausalLM

    _, card = train_tiny(dataset, "t-gpt2", ["model.arch=gpt2", "train.strategy=fsdp", "train.max_steps=6"])
    curve = [loss for _, loss in card["loss_curve"]]
    assert curve[-1] < curve[0]
    model = AutoModelForCausalLM.from_pretrained(registry.local_path(card), local_files_only=True)
    assert model.config.model_type == "gpt2" and model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert card["export_check"]["max_abs_diff"] <= card["export_check"]["tolerance"]


def test_ddp_and_fsdp_follow_the_same_loss_curve(trained):
    ddp, fsdp = trained("ddp")[1]["loss_curve"], trained("fsdp")[1]["loss_curve"]
    assert [s for s, _ in ddp] == [s for s, _ in fsdp]
    for (_, a), (_, b) in zip(ddp, fsdp):
        assert abs(a - b) < 1e-3 * max(1.0, abs(a)), (ddp, fsdp)


def test_stopped_job_resumes_from_its_last_checkpoint(raylm_cluster):
    """Submit through the Jobs API, stop it after a checkpoint, submit it again: it continues
    from the last checkpoint step instead of starting over."""
    prep = run_cli("submit", "prepare_data", "--config", "tests/data/tiny.yaml")
    assert prep.returncode == 0, prep.stderr[-2000:]
    args = ["submit", "train", "--config", "tests/data/train_tiny.yaml", "--set", "name=resume-me",
            "--set", "train.num_workers=1", "--set", "train.checkpoint_every=5", "--set", "train.eval_every=1000"]
    first = run_cli(*args, "--set", "train.max_steps=100000", "--no-wait")
    assert first.returncode == 0, first.stderr
    job_id = first.stdout.strip().splitlines()[-1]
    client = cluster.job_client(cluster.resolve_target())
    deadline, saved = time.time() + 300, []
    while time.time() < deadline and not saved:
        saved = [int(s) for s in re.findall(r"checkpoint saved at step (\d+)", client.get_job_logs(job_id))]
        time.sleep(1)
    assert saved, client.get_job_logs(job_id)[-3000:]
    client.stop_job(job_id)
    while str(client.get_job_status(job_id)) not in ("JobStatus.STOPPED", "STOPPED", "JobStatus.FAILED"):
        time.sleep(0.5)
    last_seen = max(saved)
    again = run_cli(*args, "--set", f"train.max_steps={last_seen + 40}")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    resumed = [int(s) for s in re.findall(r"resumed from the checkpoint at step (\d+)", again.stdout)]
    assert resumed and resumed[0] >= last_seen, again.stdout[-3000:]
    assert f"step {last_seen + 40}/{last_seen + 40}" in again.stdout
    assert "step 1/" not in again.stdout  # it did not start over
