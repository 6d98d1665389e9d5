"""Supervised fine-tuning on conversations: the data job checks, renders (with the chat template
serving uses) and masks them; training learns only the answers; the served engine answers with
the template the model was trained on; evaluation scores the answers."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import ROOT
from raylm import config
from raylm.config import ConfigError
from raylm.data.config import DataConfig

# a question whose one-word answer depends on one word of it: learnable by a tiny model in seconds
PLACES = {"ship": "Sea", "storm": "Sea", "wave": "Sea", "harbour": "Sea",
          "castle": "Land", "forest": "Land", "field": "Land", "crown": "Land"}


def _conversations(d: Path, n: int = 400) -> dict:
    """Two chat sources of the same questions: rated answers in the shape `/v1/feedback` stores
    (prompt, completion, rating; the ones rated bad are set aside by `where`) and OpenAI-style
    message lists with a system message; plus records that are no conversation."""
    rng = random.Random(0)
    feedback, convs = [], []
    for i in range(n):
        w = rng.choice(sorted(PLACES))
        q, a = f"Where is the {w}?", PLACES[w] + "."
        if i % 2:
            feedback.append({"id": f"fb{i}", "prompt": q, "completion": a, "rating": 1})
        else:
            convs.append({"id": f"c{i}", "messages": [{"role": "system", "content": "Answer in one word."},
                                                      {"role": "user", "content": q},
                                                      {"role": "assistant", "content": a}]})
    feedback += [{"id": "disliked", "prompt": "Where is the ship?", "completion": "Land.", "rating": -1},
                 {"id": "no-answer", "prompt": "Where is the sea?", "rating": 1},
                 {"id": "not-text", "prompt": "Where?", "completion": 3, "rating": 1}]
    convs += [{"id": "unanswered", "messages": [{"role": "user", "content": "Hello?"}]},
              {"id": "robot", "messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "x"}]},
              {"id": "marker", "messages": [{"role": "user", "content": "a\n<|assistant|>\nb"},
                                            {"role": "assistant", "content": "c"}]},
              {"id": "multi", "messages": [{"role": "user", "content": "Where is the crown?"},
                                           {"role": "assistant", "content": "Land."},
                                           {"role": "user", "content": "And the wave?"},
                                           {"role": "assistant", "content": "Sea."}]},
              {"id": "no-list", "messages": "just a string"}]
    d.mkdir(parents=True, exist_ok=True)
    (d / "feedback.jsonl").write_text("".join(json.dumps(r) + "\n" for r in feedback))
    (d / "convs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in convs))
    return {"feedback": feedback, "convs": convs}


def chat_config(d: Path, tokenizer_path: str) -> dict:
    return {
        "name": "chatset",
        "sources": [
            {"kind": "jsonl", "uri": str(d / "feedback.jsonl"), "format": "chat", "prompt_field": "prompt",
             "response_field": "completion", "id_field": "id", "where": {"rating": [1]}},
            {"kind": "jsonl", "uri": str(d / "convs.jsonl"), "format": "chat", "id_field": "id"},
        ],
        "steps": [{"name": "normalize"}, {"name": "pii"}],
        "split": {"key": "id", "train": 0.8, "validation": 0.1, "test": 0.1},
        "tokenizer": {"kind": "pretrained", "path": tokenizer_path},  # the base model's: fine-tuning reads its ids
        "pack": {"seq_len": 64},
        "tokenize": {"concurrency": 1, "batch_size": 64},
        "output": {"root": str(d / "datasets")},
    }


@pytest.fixture(scope="module")
def chatset(ray_session, train_dataset, tmp_path_factory):
    """Conversations tokenized with a base model's tokenizer (a random-init tiny Llama registered
    on the training tests' dataset, standing in for a pretrained LM)."""
    from helpers import register_random_lm
    from raylm import registry
    from raylm.data import pipeline

    d = tmp_path_factory.mktemp("sft")
    records = _conversations(d)
    base = register_random_lm(train_dataset, str(d / "registry"), "base", seed=0)
    m = pipeline.run(config.build(DataConfig, chat_config(d, str(registry.local_path(base)))))
    return {"manifest": m, "dir": d, "records": records, "base": str(registry.local_path(base))}


@pytest.fixture(scope="module")
def sft_model(chatset):
    from raylm import registry
    from raylm.train.config import TrainConfig
    from raylm.train.job import run

    d = chatset["dir"]
    cfg = config.load(TrainConfig, ROOT / "tests" / "data" / "train_tiny.yaml", [
        "name=sft", "data.dataset=chatset", f"model.path={chatset['base']}", f"data.root={d / 'datasets'}",
        f"output.storage={d / 'runs'}",
        f"output.registry={d / 'registry'}", "train.num_workers=1", "train.batch_size=8", "train.max_steps=100",
        "train.lr=5e-3", "train.warmup_steps=10", "train.log_every=10", "train.eval_every=40",
        "train.checkpoint_every=100"])
    out = run(cfg)
    return registry.resolve(out["model"], str(d / "registry"))


def test_a_dataset_is_conversations_or_documents_and_chat_refuses_steps_that_cut_role_lines(tmp_path):
    chat = {"kind": "jsonl", "uri": str(tmp_path), "format": "chat"}
    text = {"kind": "jsonl", "uri": str(tmp_path)}

    def build(**kw):
        return config.build(DataConfig, {"name": "x", **kw})

    with pytest.raises(ConfigError, match="holds one kind of record"):
        build(sources=[chat, text])
    with pytest.raises(ConfigError, match="boilerplate, augment would cut or perturb"):
        build(sources=[chat], steps=[{"name": "boilerplate"}, {"name": "augment"}])
    with pytest.raises(ConfigError, match="prompt_field and response_field together"):
        build(sources=[{**chat, "prompt_field": "q"}])
    with pytest.raises(ConfigError, match="only for format chat, preference or rated"):
        build(sources=[{**text, "response_field": "a"}])
    rated = {**chat, "format": "rated"}
    with pytest.raises(ConfigError, match="rating_field: only for format rated"):
        build(sources=[{**chat, "rating_field": "stars"}])
    with pytest.raises(ConfigError, match="response_field: format rated has completion_field and rating_field"):
        build(sources=[{**rated, "response_field": "a"}])
    with pytest.raises(ConfigError, match="dedup_near would take two answers to one prompt rated alike"):
        build(sources=[rated], steps=[{"name": "dedup_near"}])
    with pytest.raises(ConfigError, match="rated answers are padded one answer a block"):
        build(sources=[rated], pack={"conversations": "pack"})
    with pytest.raises(ConfigError, match="tokenizer.chat_template is for chat datasets"):
        build(sources=[text], tokenizer={"chat_template": "{{ messages }}"})
    assert build(sources=[chat]).chat and not build(sources=[text]).chat


def test_a_template_that_does_not_render_is_a_config_error_before_anything_runs(tmp_path):
    from raylm.data import pipeline

    cfg = config.build(DataConfig, {"name": "x", "sources": [{"kind": "jsonl", "uri": str(tmp_path), "format": "chat"}],
                                    "tokenizer": {"chat_template": "{% for m in messages %}{{ m.content }"}})
    with pytest.raises(ConfigError, match="tokenizer.chat_template: template_error"):
        pipeline.chat_spec(cfg)


def test_conversations_are_checked_and_only_their_answers_are_trained_on(chatset):
    from transformers import AutoTokenizer

    from raylm.train.job import with_loss_mask
    from raylm.train.loop import host_batch

    m, records = chatset["manifest"], chatset["records"]
    read = next(s for s in m["steps"] if s["step"] == "read")
    assert read["quarantined"] == {"excluded_by_where": 1, "missing_prompt_or_response": 1,
                                   "prompt_or_response_not_a_string": 1, "no_final_answer": 1, "unknown_role": 1,
                                   "marker_in_content": 1, "messages_not_a_list": 1}
    assert m["format"] == "chat" and m["counts"]["documents"] == len(records["feedback"]) - 3 + len(records["convs"]) - 4
    assert any(s["step"] == "chat" for s in m["steps"])

    # the dataset's tokenizer carries the template; serving renders and encodes a prompt to the same ids
    tok = AutoTokenizer.from_pretrained(str(Path(m["uri"]) / "tokenizer"))
    assert tok.chat_template == m["chat_template"]
    docs = pa.concat_tables(pq.read_table(Path(m["uri"]) / "docs" / s) for s in ("train", "validation", "test")
                            if m["splits"][s]["documents"])
    by_id = {r["id"]: r for r in docs.to_pylist()}
    multi = by_id["multi"]
    trained = [t for t, k in zip(multi["input_ids"], multi["loss_mask"]) if k]
    assert tok.decode(trained) == "Land.<|endoftext|>\nSea.<|endoftext|>\n"  # both answers, each to its end
    messages = [{"role": "user", "content": "Where is the crown?"}]
    served_prompt = tok.encode(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                               add_special_tokens=False)  # what LMEngine.render_chat + encode give
    assert multi["input_ids"][:len(served_prompt)] == served_prompt and not any(multi["loss_mask"][:len(served_prompt)])
    for r in docs.to_pylist():  # every conversation: the trained tokens are its answers, nothing else
        answers = [line for line in r["text"].split("<|assistant|>\n")[1:]]
        got = tok.decode([t for t, k in zip(r["input_ids"], r["loss_mask"]) if k])
        assert got == "".join(f"{a.split(chr(10) + '<|')[0]}<|endoftext|>\n" for a in answers), (r["text"], got)
        assert r["num_trained_tokens"] == sum(r["loss_mask"])

    # a block per conversation (pack.conversations: pad), padded after its end with mask 0
    blocks = pq.read_table(Path(m["uri"]) / "packed" / "train")
    assert blocks.num_rows == m["splits"]["train"]["blocks"] and min(blocks.column("trained_tokens").to_pylist()) > 0
    train_docs = pq.read_table(Path(m["uri"]) / "docs" / "train").to_pylist()
    seq_len = m["config"]["pack"]["seq_len"]
    longer = sum(len(doc["input_ids"]) > seq_len for doc in train_docs)
    assert blocks.num_rows == len(train_docs) and m["splits"]["train"]["conversations_cut"] == longer
    for doc, block in zip(train_docs, blocks.to_pylist()):
        n = min(len(doc["input_ids"]), seq_len)  # a longer conversation is cut at the block's end
        assert block["input_ids"][:n] == doc["input_ids"][:n] and block["loss_mask"][:n] == doc["loss_mask"][:n]
        assert set(block["input_ids"][n:]) <= {tok.pad_token_id} and not any(block["loss_mask"][n:])
    assert 0 < m["splits"]["train"]["trained_tokens"] < m["splits"]["train"]["packed_tokens"]
    batch = host_batch(blocks.slice(0, 4), "causal_lm", pin=False)
    mask = pa.array(blocks.column("loss_mask").to_pylist()[:4]).to_pylist()
    for row, row_mask in zip(batch["labels"].tolist(), mask):
        assert [x != -100 for x in row] == [bool(k) for k in row_mask]
    # a text dataset's blocks mixed in: every token trained on
    text = pa.table({"input_ids": pa.array([[1, 2, 3], [4, 5, 6]], pa.list_(pa.int32()))})
    assert with_loss_mask(text).column("loss_mask").to_pylist() == [[1, 1, 1], [1, 1, 1]]


def test_conversations_are_padded_one_a_block_or_packed_one_after_another():
    from raylm.data.tokenize import MASK_TYPE, TOKENS_TYPE, pack, pad

    convs = pa.table({"input_ids": pa.array([[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12]], TOKENS_TYPE),
                      "loss_mask": pa.array([[0, 0, 1, 1], [0, 1], [0, 0, 0, 1, 1, 1]], MASK_TYPE)}).slice(1)
    assert pad(convs, 5, pad_id=0).to_pylist() == [  # the longer one cut at seq_len
        {"input_ids": [5, 6, 0, 0, 0], "loss_mask": [0, 1, 0, 0, 0], "trained_tokens": 1},
        {"input_ids": [7, 8, 9, 10, 11], "loss_mask": [0, 0, 0, 1, 1], "trained_tokens": 2}]
    # no EOS between them (the template ends each answer); positions restart at each conversation and
    # at each block (the second conversation goes on in the second block without its beginning)
    assert pack(convs, 3, eos_id=None).to_pylist() == [
        {"input_ids": [5, 6, 7], "loss_mask": [0, 1, 0], "trained_tokens": 1, "position_ids": [0, 1, 0]},
        {"input_ids": [8, 9, 10], "loss_mask": [0, 0, 1], "trained_tokens": 1, "position_ids": [0, 1, 2]}]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_packed_conversation_is_computed_as_if_it_were_alone(arch):
    """pack.conversations: pack. Three conversations in one block, read by the training loop: the
    model's logits on each are the ones it gives that conversation alone (what serving computes),
    so no conversation attends to the ones before it. Without the blocks' position_ids they are not."""
    from raylm.data.tokenize import MASK_TYPE, TOKENS_TYPE, pack
    from raylm.train import models
    from raylm.train.config import ModelConfig
    from raylm.train.loop import host_batch

    torch.manual_seed(0)
    convs = [torch.randint(3, 60, (n,)).tolist() for n in (9, 14, 9)]
    table = pa.table({"input_ids": pa.array(convs, TOKENS_TYPE),
                      "loss_mask": pa.array([[0] * (len(c) - 2) + [1, 1] for c in convs], MASK_TYPE)})
    batch = host_batch(pack(table, 32, eos_id=None), "causal_lm", pin=False)
    assert batch["input_ids"].shape == (1, 32) and batch["position_ids"][0].tolist() == [
        *range(9), *range(14), *range(9)]
    model = models.build(ModelConfig(arch=arch, preset="tiny"), 64, 32, 1, 0).eval()
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        unmasked = model(input_ids=batch["input_ids"]).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([c])).logits[0] for c in convs])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(unmasked[9:], alone[9:], atol=1e-3)  # the later ones saw the first


def test_the_fine_tuned_model_answers_with_the_template_it_was_trained_with(sft_model):
    from raylm import registry
    from raylm.serve.engine import GenRequest, LMEngine

    curve = [loss for _, loss in sft_model["loss_curve"]]
    assert sft_model["data_format"] == "chat" and curve[-1] < curve[0] / 10, curve
    engine = LMEngine(registry.local_path(sft_model))  # the serving engine, as a deployment loads it
    reqs, asked = [], []
    for w in PLACES:
        asked.append([{"role": "system", "content": "Answer in one word."},
                      {"role": "user", "content": f"Where is the {w}?"}])
        reqs.append(GenRequest(prompt_ids=engine.encode(engine.render_chat(asked[-1])), max_tokens=8, temperature=0))
    text, reason = [""] * len(reqs), [None] * len(reqs)

    def emit(events: dict[int, dict]) -> None:  # per decoding step: each row's new text, and why it ended
        for i, e in events.items():
            text[i] += e["text"]
            reason[i] = e["finish_reason"] or reason[i]

    engine.generate(reqs, emit)
    answers = {w: (text[i], reason[i]) for i, w in enumerate(PLACES)}
    # every answer right, and the model stops itself at the end of its answer (EOS), as trained
    assert answers == {w: (f"{a}.", "stop") for w, a in PLACES.items()}
    # an answer stored as the conversation's next message (what /v1/feedback keeps) renders back to
    # exactly what the model saw and said: rated answers train on the model's own text
    full = engine.tok.apply_chat_template(asked[0] + [{"role": "assistant", "content": text[0]}],
                                          chat_template=engine.chat_template, tokenize=False)
    assert full.startswith(engine.render_chat(asked[0]) + text[0] + engine.tok.eos_token)


def test_a_text_dataset_mixed_with_conversations_is_trained_on_every_token(chatset):
    """A mixture of the chat dataset and a text dataset on the same tokenizer and block length:
    the batches the training loop reads hold both, the conversations' prompts masked, the text
    blocks' every token trained on."""
    from helpers import documents, small_config, write_jsonl
    from raylm.data import pipeline
    from raylm.train.config import TrainConfig
    from raylm.train.job import dataset_meta, read_tables
    from raylm.train.loop import host_batch

    d = chatset["dir"]
    src = write_jsonl(d / "text" / "docs.jsonl", documents(20, seed=5))
    prose = small_config(d / "datasets", [{"kind": "jsonl", "uri": str(src), "text_field": "body"}], name="prose",
                         tokenizer={"kind": "pretrained", "path": chatset["base"]}, pack={"seq_len": 64})
    pipeline.run(config.build(DataConfig, prose))
    mixture = [{"dataset": "chatset", "weight": 1}, {"dataset": "prose", "weight": 1}]
    cfg = config.build(TrainConfig, {"name": "x", "model": {"path": chatset["base"]},
                                     "data": {"root": str(d / "datasets"), "mixture": mixture}})
    meta = dataset_meta(cfg)
    assert meta["format"] == "chat" and meta["tokenizer_uri"].startswith(chatset["manifest"]["uri"])
    train = read_tables(cfg, meta)["train"]
    batch = host_batch(train, "causal_lm", pin=False)
    labels = batch["labels"]
    masked = (labels == -100).sum(1)
    assert (batch["position_ids"] == torch.arange(64)).all()  # a block is one sequence (padded conversations, text)
    blocks = {x["dataset"].split("@")[0]: x["blocks_per_epoch"] for x in meta["mixture"]}
    assert (masked == 0).sum() == blocks["prose"] and (masked > 0).sum() == blocks["chatset"]


def test_a_base_model_with_another_tokenizer_is_refused_before_training(chatset):
    from raylm.train.config import TrainConfig
    from raylm.train.job import check_base_model, dataset_meta

    d = chatset["dir"]
    cfg = config.build(TrainConfig, {"name": "x", "data": {"dataset": "chatset", "root": str(d / "datasets")},
                                     "model": {"path": chatset["base"]}})
    meta = dataset_meta(cfg)
    check_base_model(cfg, meta)  # the dataset was tokenized with the base model's tokenizer
    other = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": "builtin:all-MiniLM-L6-v2"})})
    with pytest.raises(ConfigError, match="was trained with another tokenizer than the dataset's"):
        check_base_model(other, meta)
    with pytest.raises(ConfigError, match="holds conversations, which train a causal LM"):
        dataset_meta(cfg.model_copy(update={"model": cfg.model.model_copy(
            update={"task": "classification", "path": "builtin:all-MiniLM-L6-v2"})}))
    bigger = meta["vocab_size"] + 1000
    with pytest.raises(ConfigError, match=rf"has a vocabulary of \d+, the dataset's tokenizer {bigger} "):
        check_base_model(cfg, {**meta, "vocab_size": bigger})


def test_evaluation_scores_a_chat_models_answers_only(chatset, sft_model):
    from raylm.evaluate.config import EvaluateConfig
    from raylm.evaluate.job import run

    m, d = chatset["manifest"], chatset["dir"]
    cfg = config.build(EvaluateConfig, {
        "model": sft_model["id"], "registry": str(d / "registry"),
        "data": {"dataset": "chatset", "root": str(d / "datasets"), "split": "test"},
        "robustness": {"ops": ["typo"], "strengths": [0.3]}, "baselines": {"ngram": 2, "previous_versions": 0}})
    rep = run(cfg)
    test_docs = pq.read_table(Path(m["uri"]) / "docs" / "test")
    answers = sum(test_docs.column("num_trained_tokens").to_pylist())
    assert rep["metrics"]["tokens"] == answers  # the answers' tokens (the first one of each has context)
    assert rep["metrics"]["next_token_accuracy"] > 0.95 and rep["metrics"]["perplexity"] < 1.2
    # typos go into the questions only: the same answers are scored
    assert rep["robustness"]["ops"]["typo"][0]["metrics"]["tokens"] == answers
    assert rep["baselines"] == {}  # the n-gram baseline scores whole texts: skipped for conversations


def test_what_int8_costs_a_chat_model_is_measured_on_its_answers(chatset, sft_model):
    """The deploy job's compression measurement scores a chat model's validation blocks as its
    training did: the answers only (a loss over the prompts too would be the questions' perplexity,
    not what the model learned), so the loss before compression is the run's own val_loss."""
    from raylm.serve.config import Compression
    from raylm.serve.job import measure_compression

    q = measure_compression(sft_model, Compression(quantize="int8", eval_batches=2))
    val_loss = sft_model["metrics"]["val_loss"]
    assert q["measured"] and q["split_blocks"] > 0
    assert q["val_loss_before"] == pytest.approx(val_loss, rel=0.5, abs=0.02), (q, val_loss)
    assert q["val_loss_before"] < 0.2 and math.isfinite(q["val_loss_after"]), q


def test_deploying_a_fine_tuned_model_with_another_template_is_warned_about():
    from raylm.serve.config import DeployConfig
    from raylm.serve.job import template_overrides

    cfg = config.build(DeployConfig, {"name": "x", "models": [
        {"name": "sft", "model": "sft@v1", "chat_template": "{{ messages }}"},
        {"name": "base", "model": "base@v1", "chat_template": "{{ messages }}"},
        {"name": "own", "model": "sft@v1"}]})
    cards = {"sft": {"id": "sft@v1", "data_format": "chat"}, "base": {"id": "base@v1", "data_format": "text"},
             "own": {"id": "sft@v1", "data_format": "chat"}}
    (warning,) = template_overrides(cfg.models, cards)
    assert warning.startswith("models.sft.chat_template: sft@v1 was fine-tuned on conversations")


def test_the_shipped_fine_tuning_configs_load_and_their_conversations_read():
    from raylm.data.sources import parse_file
    from raylm.evaluate.config import EvaluateConfig
    from raylm.serve.config import DeployConfig
    from raylm.train.config import TrainConfig

    configs = ROOT / "jobs" / "configs"
    data = config.load(DataConfig, configs / "places_chat.yaml")
    train = config.load(TrainConfig, configs / "sft_places.yaml")
    deploy = config.load(DeployConfig, configs / "deploy_places.yaml")
    evaluate = config.load(EvaluateConfig, configs / "evaluate_places.yaml")
    assert data.chat and train.data.dataset == data.name and evaluate.data.dataset == data.name
    assert deploy.models[0].model == evaluate.model == train.name and deploy.models[0].chat_template is None
    src = data.sources[0].model_copy(update={"uri": str(ROOT / data.sources[0].uri)})
    records = parse_file(src, "places", src.uri, (ROOT / data.sources[0].uri).read_bytes())
    assert len(records) == 360 and not [r for r in records if r["_error"]]
    assert sum("<|user|>" in r["text"] and r["text"].count("<|assistant|>") == 2 for r in records) == 60

    prefs = config.load(DataConfig, configs / "places_prefs.yaml")
    dpo = config.load(TrainConfig, configs / "dpo_places.yaml")
    evaluate_prefs = config.load(EvaluateConfig, configs / "evaluate_places_prefs.yaml")
    assert prefs.preference and dpo.preference and dpo.data.dataset == evaluate_prefs.data.dataset == prefs.name
    assert evaluate_prefs.model == dpo.name and dpo.model.path == prefs.tokenizer.path  # the model to tune's tokenizer
    src = prefs.sources[0].model_copy(update={"uri": str(ROOT / prefs.sources[0].uri)})
    pairs = parse_file(src, "prefs", src.uri, (ROOT / prefs.sources[0].uri).read_bytes())
    assert len(pairs) == 96 and not [r for r in pairs if r["_error"]] and all("<|rejected|>" in r["text"] for r in pairs)

    rated = config.load(DataConfig, configs / "places_ratings.yaml")
    kto = config.load(TrainConfig, configs / "kto_places.yaml")
    evaluate_rated = config.load(EvaluateConfig, configs / "evaluate_places_ratings.yaml")
    assert rated.rated and kto.preference.loss == "kto" and kto.data.dataset == evaluate_rated.data.dataset == rated.name
    assert evaluate_rated.model == kto.name and kto.model.path == rated.tokenizer.path
    src = rated.sources[0].model_copy(update={"uri": str(ROOT / rated.sources[0].uri)})
    answers = parse_file(src, "ratings", src.uri, (ROOT / rated.sources[0].uri).read_bytes())
    assert len(answers) == 144 and not [r for r in answers if r["_error"]]
    assert sum(r["text"].endswith("<|rated|>\ngood") for r in answers) == 48  # weighed 2 to 1 in kto_places.yaml


# --- preference tuning (DPO) -------------------------------------------------------------------

SENTENCES = {"Sea": "At sea.", "Land": "On land."}  # the answer users come to prefer over one word


def _greedy_answers(card: dict) -> dict[str, str]:
    """What the served engine answers, greedily, to "Where is the W?" for every place W."""
    from raylm import registry
    from raylm.serve.engine import GenRequest, LMEngine

    engine = LMEngine(registry.local_path(card))
    reqs = [GenRequest(prompt_ids=engine.encode(engine.render_chat([
        {"role": "system", "content": "Answer in one word."}, {"role": "user", "content": f"Where is the {w}?"}])),
        max_tokens=8, temperature=0) for w in PLACES]
    text = [""] * len(reqs)

    def emit(events: dict[int, dict]) -> None:
        for i, e in events.items():
            text[i] += e["text"]

    engine.generate(reqs, emit)
    return dict(zip(PLACES, text))


def _rated_feedback(d: Path) -> Path:
    """What `/v1/feedback` stores for chat answers: the same questions answered three times, the
    one-word answer (what the fine-tuned model says) and the wrong sentence rated bad, the right
    sentence rated good; plus ratings that make no pair (one side only, plain completions, not JSON)."""
    records = []
    for w, a in PLACES.items():
        for q in (f"Where is the {w}?", f"Where would I find the {w}?", f"Is the {w} on land or at sea?",
                  f"Land or sea: the {w}?"):
            asked = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": q}]
            wrong = SENTENCES["Land" if a == "Sea" else "Sea"]
            for answer, rating in ((f"{a}.", -1), (wrong, -1), (SENTENCES[a], 1)):
                records.append({"id": f"r{len(records)}", "model": "sft", "model_version": "sft@v1", "rating": rating,
                                "messages": [*asked, {"role": "assistant", "content": answer}]})
    records += [{"id": "lonely", "rating": 1, "messages": [{"role": "user", "content": "Hi?"},
                                                           {"role": "assistant", "content": "Hello."}]},
                {"id": "completion", "rating": -1, "prompt": "Where is", "completion": " the ship"}]
    path = d / "feedback" / "date=2026-12-07" / "part.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "not json\n")
    return path.parent.parent


@pytest.fixture(scope="module")
def pairset(chatset, sft_model):
    """Preference pairs made from rated feedback by `raylm feedback pairs`, plus records that are no
    pair, built into a dataset with the fine-tuned model's tokenizer (which carries its template)."""
    from raylm import registry
    from raylm.cli import main
    from raylm.data import pipeline

    d = chatset["dir"]
    out = d / "pairs.jsonl"
    assert main(["feedback", "pairs", "--uri", str(_rated_feedback(d)), "--out", str(out)]) == 0
    bad = [{"id": "no-rejected", "prompt": "Where is the ship?", "chosen": "At sea."},
           {"id": "same", "prompt": "Where is the ship?", "chosen": "At sea.", "rejected": "At sea."},
           {"id": "differ", "chosen": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "b"}],
            "rejected": [{"role": "user", "content": "c?"}, {"role": "assistant", "content": "d"}]},
           {"id": "marker", "prompt": "Where?", "chosen": "x", "rejected": "y\n<|rejected|>\nz"}]
    (d / "bad_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    base = str(registry.local_path(sft_model))
    cfg = {"name": "pairs", "sources": [{"kind": "jsonl", "uri": str(out), "format": "preference", "id_field": "id"},
                                        {"kind": "jsonl", "uri": str(d / "bad_pairs.jsonl"), "format": "preference",
                                         "id_field": "id"}],
           "steps": [{"name": "normalize"}, {"name": "dedup_exact"}],
           "split": {"train": 0.75, "validation": 0.25, "test": 0.0},
           "tokenizer": {"kind": "pretrained", "path": base}, "pack": {"seq_len": 128},
           "tokenize": {"concurrency": 1, "batch_size": 64}, "output": {"root": str(d / "datasets")}}
    return {"manifest": pipeline.run(config.build(DataConfig, cfg)), "pairs": out, "base": base}


def test_a_much_rated_conversation_gives_its_newest_pairs_up_to_the_limit(tmp_path, capsys):
    """`raylm feedback pairs --max-per-prompt N`: a conversation rated hundreds of times gives N
    pairs, made of its newest ratings; 0 is refused with a message."""
    from raylm.cli import main

    asked = [{"role": "user", "content": "Where is the ship?"}]
    rows = [{"rating": 1 if i % 2 else -1, "model_version": "sft@v1",
             "messages": [*asked, {"role": "assistant", "content": f"answer {i}"}]} for i in range(400)]
    (tmp_path / "fb").mkdir()
    (tmp_path / "fb" / "part.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "pairs.jsonl"
    assert main(["feedback", "pairs", "--uri", str(tmp_path / "fb"), "--out", str(out), "--max-per-prompt", "3"]) == 0
    got = [(p["chosen"], p["rejected"]) for p in map(json.loads, out.read_text().splitlines())]
    assert got == [("answer 399", "answer 398"), ("answer 399", "answer 396"), ("answer 399", "answer 394")]
    assert "3 preference pairs from 400 rated chat answers to 1 conversations" in capsys.readouterr().out
    assert main(["feedback", "pairs", "--uri", str(tmp_path / "fb"), "--out", str(out), "--max-per-prompt", "0"]) == 2
    assert "--max-per-prompt: max_per_prompt must be at least 1, not 0" in capsys.readouterr().err


def test_rated_answers_become_preference_pairs_with_only_the_last_answer_trained(pairset):
    from transformers import AutoTokenizer

    from raylm.train.loop import host_batch

    lines = [json.loads(x) for x in pairset["pairs"].read_text().splitlines()]
    def right(pair: dict) -> str:  # the sentence that answers the pair's question
        return SENTENCES[next(a for w, a in PLACES.items() if f"the {w}" in pair["prompt"][-1]["content"])]

    assert len(lines) == 64 and all(p["chosen"] == right(p) for p in lines)
    m = pairset["manifest"]
    read = next(s for s in m["steps"] if s["step"] == "read")
    assert read["quarantined"] == {"missing_chosen_or_rejected": 1, "chosen_equals_rejected": 1,
                                   "prompts_differ": 1, "marker_in_content": 1}
    assert m["format"] == "preference" and m["counts"]["documents"] == 64
    assert m["splits"]["train"]["conversations_cut"] == 0
    tok = AutoTokenizer.from_pretrained(str(Path(m["uri"]) / "tokenizer"))
    blocks = pq.read_table(Path(m["uri"]) / "packed" / "train")
    assert blocks.num_rows == m["splits"]["train"]["blocks"] > 0
    for row in blocks.to_pylist():  # each side: the same prompt, then its own answer, trained on alone
        chosen = tok.decode([t for t, k in zip(row["input_ids"], row["loss_mask"]) if k])
        rejected = tok.decode([t for t, k in zip(row["rejected_ids"], row["rejected_mask"]) if k])
        assert chosen.removesuffix(f"{tok.eos_token}\n") in SENTENCES.values(), chosen
        assert rejected.removesuffix(f"{tok.eos_token}\n") in ("Sea.", "Land.", *SENTENCES.values()), rejected
        n = row["loss_mask"].index(1)
        assert row["input_ids"][:n] == row["rejected_ids"][:n] and row["rejected_mask"].index(1) == n
    batch = host_batch(blocks.slice(0, 3), "causal_lm", pin=False)  # 3 pairs: 3 chosen rows, then 3 rejected
    assert batch["input_ids"].shape[0] == 6
    assert batch["input_ids"][3].tolist() == blocks.column("rejected_ids")[0].as_py()


def test_preference_tuning_moves_the_model_to_the_answers_users_preferred(chatset, pairset, capsys):
    from raylm import registry
    from raylm.train.config import TrainConfig
    from raylm.train.job import run

    d = chatset["dir"]
    overrides = [
        "name=dpo", "data.dataset=pairs", f"model.path={pairset['base']}", f"data.root={d / 'datasets'}",
        f"output.storage={d / 'runs'}", f"output.registry={d / 'registry'}", "train.num_workers=1",
        # (150 steps: at 100 the greedy answers' least likely token led its runner-up by 1.3 to 2.4 logits over
        # seeds 1-4, and another machine's arithmetic once said "Aea."; at 150 by 3.4 to 5.8)
        "train.batch_size=4", "train.max_steps=150", "train.lr=2e-3", "train.warmup_steps=3", "train.log_every=10",
        "train.eval_every=50", "train.checkpoint_every=150", "preference.beta=0.1",
        # DPO alone raises every pair's margin here but leaves the greedy answers as they were (the chosen
        # sentences start far down the fine-tuned model's likelihood); with the chosen answers' NLL it says them
        "preference.sft_weight=1.0",
        # the reference's log-probabilities computed once before training (live: a copy on each worker,
        # checked against it below)
        "preference.reference_logps=precomputed"]
    cfg = config.load(TrainConfig, ROOT / "tests" / "data" / "train_tiny.yaml", overrides)
    card = registry.resolve(run(cfg)["model"], str(d / "registry"))
    assert card["data_format"] == "chat" and card["preference"]["reference"] == pairset["base"]
    assert card["preference"]["reference_logps"] == "precomputed"
    assert re.search(r"the reference's log-probabilities of \d+ pairs computed in [\d.]+ s", capsys.readouterr().out)
    curve = [loss for _, loss in card["loss_curve"]]
    assert curve[-1] < curve[0] / 4, curve
    # (a pair's rewards are equal where the model is its reference: accuracy 0, margin 0 at the start; the
    # held-out prompts are phrasings the model was not tuned on, so a tiny model may miss one)
    assert card["metrics"]["val_reward_accuracy"] >= 0.75 and card["metrics"]["val_reward_margin"] > 1
    # the loss on the validation pairs: log 2 for the model it started from (policy = reference), ~0 now
    from transformers import AutoModelForCausalLM

    from raylm.train.config import PreferenceConfig
    from raylm.train.losses import Preference
    from raylm.train.reference import reference_logps
    from raylm.train.loop import host_batch

    val_table = pq.read_table(Path(pairset["manifest"]["uri"]) / "packed" / "validation")
    val = host_batch(val_table, "causal_lm", False)
    base, tuned = (AutoModelForCausalLM.from_pretrained(p).eval() for p in (pairset["base"], registry.local_path(card)))
    dpo = Preference(PreferenceConfig(beta=0.1), reference=base)
    # the same loss from the reference's precomputed log-probabilities (no reference model)
    ref_table = reference_logps(val_table, base, torch.device("cpu"))
    precomputed = host_batch(ref_table, "causal_lm", False)
    assert set(precomputed) == {"input_ids", "labels", "ref_logps"}
    with torch.no_grad():
        assert float(dpo(base, val)) == pytest.approx(math.log(2), abs=1e-5)
        assert float(dpo(tuned, val)) < math.log(2) / 2
        assert float(Preference(PreferenceConfig(beta=0.1), None)(tuned, precomputed)) == pytest.approx(
            float(dpo(tuned, val)), abs=1e-5)
    # streamed splits (train.ingest=stream) are scored before training by one Ray Data actor, every
    # split through it: the same figures, each split its own rows
    from raylm.train.job import build_trainer, dataset_meta
    from raylm.train.reference import REF_COLUMNS

    streamed = config.load(TrainConfig, ROOT / "tests" / "data" / "train_tiny.yaml",
                           overrides + ["train.ingest=stream", "train.shuffle=false"])
    meta = dataset_meta(streamed)
    datasets = build_trainer(streamed, meta).datasets
    assert re.search(r"the reference's log-probabilities of \d+ pairs computed", capsys.readouterr().out)
    got = datasets["validation"].to_pandas()
    assert list(got.columns) == [*val_table.column_names, *REF_COLUMNS]
    for c in REF_COLUMNS:
        assert sorted(got[c]) == pytest.approx(sorted(ref_table.column(c).to_pylist()), abs=1e-4)
    assert datasets["train"].count() == meta["train_blocks"]
    # the fine-tuned model said "Sea." / "Land."; tuned on what users preferred, it answers in a sentence
    assert _greedy_answers(card) == {w: SENTENCES[a] for w, a in PLACES.items()}

    # the evaluation job on held-out pairs: the tuned model finds (nearly) every chosen answer likelier than
    # the rejected one; the model it was tuned from (scored beside it) at most half: it said one word
    from raylm.evaluate.config import EvaluateConfig
    from raylm.evaluate.job import run as evaluate

    rep = evaluate(config.build(EvaluateConfig, {
        "model": card["id"], "registry": str(d / "registry"), "baselines": {"ngram": None, "previous_versions": 0},
        "robustness": {"ops": ["typo"], "strengths": [0.3]},
        "data": {"dataset": "pairs", "root": str(d / "datasets"), "split": "validation"}}))
    before = rep["baselines"][f"reference {pairset['base']}"]["metrics"]["preference_accuracy"]
    assert rep["headline_metric"] == "preference_accuracy" and rep["metrics"]["preference_accuracy"] >= 0.75
    assert before <= 0.5 and rep["metrics"]["preference_accuracy"] - before >= 0.4
    assert rep["robustness"]["metric"] == "bits_per_byte" and rep["robustness"]["ops"]


def test_a_search_over_preference_tuning_scores_the_pairs_with_the_reference_once(chatset, pairset, tmp_path,
                                                                                  capsys):
    """A Tune search of preference-tuning runs (DPO, ORPO and SimPO, two learning rates) ranks them by
    a preference metric; the driver scores every pair with the reference once for the DPO trials, no
    trial holds a copy of it, and ORPO and SimPO, which have no reference, learn too."""
    import pandas as pd

    from raylm import registry
    from raylm.tune.config import TuneConfig
    from raylm.tune.job import run

    d = chatset["dir"]
    cfg = config.build(TuneConfig, {
        "name": "dpo-search", "train": str(ROOT / "tests" / "data" / "train_tiny.yaml"),
        "set": ["data.dataset=pairs", f"data.root={d / 'datasets'}", f"model.path={pairset['base']}",
                "train.num_workers=1", "train.max_steps=20", "train.eval_every=10", "train.log_every=10",
                "train.batch_size=4", "train.warmup_steps=2", "preference.beta=0.1", "preference.sft_weight=1.0"],
        "space": {"train.lr": {"grid": [1e-6, 2e-3]}, "preference.loss": {"grid": ["sigmoid", "orpo", "simpo"]}},
        "metric": "val_reward_margin", "search": {"algorithm": "grid", "max_concurrent": 2},
        "output": {"storage": str(tmp_path / "tune"), "registry": str(d / "registry")}})
    summary = run(cfg)
    out = capsys.readouterr().out
    assert len(re.findall(r"the reference's log-probabilities of \d+ pairs computed", out)) == 1, out[-3000:]
    assert summary["errors"] == 0 and summary["trials"] == 6 and summary["mode"] == "max", (summary, out[-4000:])
    rows = pd.read_parquet(Path(summary["storage"]) / "results.parquet").set_index(
        ["param:train.lr", "param:preference.loss"])
    # 20 steps at lr 1e-6 leave the model where it started; at 2e-3 DPO prefers the chosen answers, and
    # ORPO and SimPO (their rewards: the answers' mean token log-probabilities) learn them and move them
    # up against the rejected ones (the fine-tuned model gives its own one-word answers the higher
    # mean: 20 steps only start that; README "Preference tuning" has a longer ORPO run)
    assert summary["best"]["params"] == {"train.lr": 2e-3, "preference.loss": "sigmoid"}, summary
    assert rows.loc[(2e-3, "sigmoid"), "val_reward_accuracy"] > 0.5
    for loss in ("orpo", "simpo"):
        assert rows.loc[(2e-3, loss), "val_reward_margin"] > rows.loc[(1e-6, loss), "val_reward_margin"], loss
        assert rows.loc[(2e-3, loss), "val_loss"] < rows.loc[(1e-6, loss), "val_loss"] / 2, loss
    for loss in ("sigmoid", "orpo", "simpo"):
        card = registry.resolve(rows.loc[(2e-3, loss), "model"], str(Path(summary["storage"]) / "models"))
        assert card["preference"]["loss"] == loss
        assert card["preference"]["reference_logps"] == ("precomputed" if loss == "sigmoid" else "none")
    with pytest.raises(ConfigError, match="'val_ppl' is not reported by preference training"):
        run(cfg.model_copy(update={"metric": "val_ppl"}))


def test_preference_tuning_is_refused_where_it_cannot_work(chatset, pairset, tmp_path):
    from raylm.train.config import TrainConfig
    from raylm.train.job import dataset_meta

    d = chatset["dir"]
    with pytest.raises(ConfigError, match="set model.path to the model to tune"):
        config.build(TrainConfig, {"name": "x", "data": {"dataset": "pairs"}, "preference": {}})
    with pytest.raises(ConfigError, match="choose one training objective"):
        config.build(TrainConfig, {"name": "x", "data": {"dataset": "pairs"}, "model": {"path": str(tmp_path)},
                                   "preference": {}, "distill": {"teacher": "t"}})
    root = {"dataset": "pairs", "root": str(d / "datasets")}
    with pytest.raises(ConfigError, match="holds preference pairs: add a `preference:` section"):
        dataset_meta(config.build(TrainConfig, {"name": "x", "data": root, "model": {"path": pairset["base"]}}))
    with pytest.raises(ConfigError, match="preference tuning needs a dataset of preference pairs"):
        dataset_meta(config.build(TrainConfig, {"name": "x", "data": {**root, "dataset": "chatset"},
                                                "model": {"path": pairset["base"]}, "preference": {}}))
    with pytest.raises(ConfigError, match="dedup_near would take two pairs of one prompt"):
        config.build(DataConfig, {"name": "x", "sources": [{"kind": "jsonl", "uri": str(tmp_path),
                                                            "format": "preference"}],
                                  "steps": [{"name": "dedup_near"}]})
    with pytest.raises(ConfigError, match="preference pairs are padded one pair a block"):
        config.build(DataConfig, {"name": "x", "sources": [{"kind": "jsonl", "uri": str(tmp_path),
                                                            "format": "preference"}],
                                  "pack": {"conversations": "pack"}})


@pytest.fixture(scope="module")
def ratedset(chatset, pairset):
    """Every chat answer users rated, one record each (`raylm feedback ratings`, from the same feedback
    the pairs came from), plus records that are no rated answer and an answer rated twice each way,
    built into a rated dataset (KTO) with the fine-tuned model's tokenizer."""
    from raylm.cli import main
    from raylm.data import pipeline

    d = chatset["dir"]
    out = d / "ratings.jsonl"
    assert main(["feedback", "ratings", "--uri", str(d / "feedback"), "--out", str(out)]) == 0
    asked = [{"role": "user", "content": "Is the castle at sea?"}]
    extra = [{"id": "no-rating", "prompt": "Where is the ship?", "completion": "At sea."},
             {"id": "neutral", "prompt": "Where is the ship?", "completion": "At sea.", "label": 0},
             {"id": "maybe", "prompt": "Where is the ship?", "completion": "At sea.", "label": "maybe"},
             {"id": "no-completion", "prompt": "Where is the ship?", "label": True},
             {"id": "not-a-question", "prompt": [{"role": "assistant", "content": "Hi."}], "completion": "x",
              "label": True},
             {"id": "marker", "prompt": "Where?", "completion": "y\n<|rated|>\ngood", "label": False},
             # rated good twice (kept once by dedup_exact) and bad once (kept: another record)
             {"id": "twice-1", "prompt": asked, "completion": "On land.", "label": True},
             {"id": "twice-2", "prompt": asked, "completion": "On land.", "label": 1},
             {"id": "twice-3", "prompt": asked, "completion": [*asked, {"role": "assistant", "content": "On land."}],
              "label": "bad"}]
    (d / "more_ratings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in extra))
    cfg = {"name": "ratings", "sources": [{"kind": "jsonl", "uri": str(out), "format": "rated", "id_field": "id"},
                                          {"kind": "jsonl", "uri": str(d / "more_ratings.jsonl"), "format": "rated",
                                           "id_field": "id"}],
           "steps": [{"name": "normalize"}, {"name": "dedup_exact"}],
           "split": {"train": 0.75, "validation": 0.25, "test": 0.0},
           "tokenizer": {"kind": "pretrained", "path": pairset["base"]}, "pack": {"seq_len": 128},
           "tokenize": {"concurrency": 1, "batch_size": 64}, "output": {"root": str(d / "datasets")}}
    return {"manifest": pipeline.run(config.build(DataConfig, cfg)), "ratings": out, "base": pairset["base"]}


def test_rated_answers_are_kept_one_by_one_each_beside_another_answer_to_its_prompt(ratedset, capsys):
    """`raylm feedback ratings` keeps every chat answer rated good or bad (no second answer to the same
    conversation needed); the data job reads them (format: rated), sets aside what is no rated answer,
    keeps an answer rated both ways twice, and puts beside each conversation its prompt followed by
    another record's answer: the side KTO estimates the model's drift from the reference on."""
    from transformers import AutoTokenizer

    from raylm.train.loop import host_batch

    from raylm.cli import main

    lines = [json.loads(x) for x in ratedset["ratings"].read_text().splitlines()]
    assert len(lines) == 97 and sum(x["label"] for x in lines) == 33  # 32 questions x 3 answers + "lonely"
    again = ratedset["ratings"].with_name("again.jsonl")
    assert main(["feedback", "ratings", "--uri", str(ratedset["ratings"].parent / "feedback"), "--out", str(again)]) == 0
    said = capsys.readouterr().out
    assert "97 rated chat answers (33 good, 64 bad)" in said and "2 records skipped" in said, said
    assert "preference.desirable_weight=1.94" in said and again.read_text() == ratedset["ratings"].read_text()
    # --version: only the answers one registry version gave (the two records of none are left out)
    assert main(["feedback", "ratings", "--uri", str(ratedset["ratings"].parent / "feedback"), "--out", str(again),
                 "--version", "sft@v1"]) == 0
    said = capsys.readouterr().out
    assert "96 rated chat answers (32 good, 64 bad)" in said and "2 records of versions other than sft@v1 left out" in said
    assert main(["feedback", "ratings", "--uri", str(ratedset["ratings"].parent / "feedback"), "--out", str(again),
                 "--version", "sft@v9"]) == 0
    assert "0 rated chat answers" in capsys.readouterr().out and again.read_text() == ""
    assert {x["completion"] for x in lines if x["label"]} == {*SENTENCES.values(), "Hello."}
    m = ratedset["manifest"]
    read = next(s for s in m["steps"] if s["step"] == "read")
    assert read["quarantined"] == {"missing_rating": 1, "neutral_rating": 1, "rating_not_good_or_bad": 1,
                                   "missing_completion": 1, "prompt_not_a_question": 1, "marker_in_content": 1}
    dedup = next(s for s in m["steps"] if s["step"] == "dedup_exact")
    assert sum(dedup["dropped"].values()) == 1  # "twice-2": "twice-1" again; "twice-3" is rated the other way
    assert m["format"] == "rated" and m["counts"]["documents"] == 99
    tr, va = m["splits"]["train"], m["splits"]["validation"]
    assert tr["desirable"] + va["desirable"] == 34 and tr["undesirable"] + va["undesirable"] == 65
    assert tr["blocks"] == tr["desirable"] + tr["undesirable"] and tr["conversations_cut"] == 0
    tok = AutoTokenizer.from_pretrained(str(Path(m["uri"]) / "tokenizer"))
    blocks = pq.read_table(Path(m["uri"]) / "packed" / "train")
    rows = blocks.to_pylist()
    answers = [tok.decode([t for t, k in zip(r["input_ids"], r["loss_mask"]) if k]) for r in rows]
    beside = [tok.decode([t for t, k in zip(r["rejected_ids"], r["rejected_mask"]) if k]) for r in rows]
    for r, answer, other in zip(rows, answers, beside):  # the same prompt; another row's answer after it
        n = r["loss_mask"].index(1)
        assert r["input_ids"][:n] == r["rejected_ids"][:n] and r["rejected_mask"].index(1) == n
        assert other in answers
    one_word = [a.removesuffix(f"{tok.eos_token}\n") in ("Sea.", "Land.") for a in answers]  # all rated bad
    assert any(one_word) and not any(r["desirable"] for r, w in zip(rows, one_word) if w)
    assert sum(r["desirable"] for r in rows) == tr["desirable"] > 0
    assert sorted(beside) == sorted(answers) and beside != answers  # every answer once, none beside itself
    batch = host_batch(blocks.slice(0, 3), "causal_lm", pin=False)
    assert batch["input_ids"].shape[0] == 6 and batch["desirable"].tolist() == [bool(r["desirable"]) for r in rows[:3]]


def test_kto_on_rated_answers_moves_the_model_to_the_answers_rated_good(chatset, ratedset, capsys):
    """KTO from the fine-tuned model on every rated answer (two bad to one good, weighed 2 to 1): the
    model learns to give the answers rated good (in a sentence) where it said one word; the evaluation
    job's rating_auc (how well an answer's likelihood tells good from bad) rises from the model it
    started from; a pair dataset is refused for KTO and the rated one for DPO."""
    from transformers import AutoModelForCausalLM

    from raylm import registry
    from raylm.train.config import PreferenceConfig, TrainConfig
    from raylm.train.job import dataset_meta, run
    from raylm.train.loop import host_batch
    from raylm.train.losses import Preference
    from raylm.train.reference import reference_logps

    d = chatset["dir"]
    overrides = [
        "name=kto", "data.dataset=ratings", f"model.path={ratedset['base']}", f"data.root={d / 'datasets'}",
        f"output.storage={d / 'runs'}", f"output.registry={d / 'registry'}", "train.num_workers=1",
        # (150 steps, as the DPO test's: at 100 one greedy answer of eight came out garbled, "Ond.")
        "train.batch_size=8", "train.max_steps=150", "train.lr=2e-3", "train.warmup_steps=3", "train.log_every=10",
        "train.eval_every=50", "train.eval_batches=4", "train.checkpoint_every=150", "preference.loss=kto", "preference.beta=0.1",
        "preference.desirable_weight=2", "preference.sft_weight=1.0"]
    cfg = config.load(TrainConfig, ROOT / "tests" / "data" / "train_tiny.yaml", overrides)
    card = registry.resolve(run(cfg)["model"], str(d / "registry"))
    out = capsys.readouterr().out
    assert re.search(r"KTO on \d+ answers rated good and \d+ rated bad \(the train split\); desirable_weight x good "
                     r"/ \(undesirable_weight x bad\) = 1\.\d\d", out), out[-3000:]
    assert card["data_format"] == "chat" and card["preference"]["loss"] == "kto"
    assert card["preference"]["reference_logps"] == "live"
    curve = [loss for _, loss in card["loss_curve"]]
    assert curve[-1] < curve[0] / 2, curve
    # (0 where the model is its reference; with 8 held-out answers scored, 0.625 to 1.0 over four runs: each
    # run's base model, tokenizer and fine-tuned model differ a little, and an answer near the reference point
    # may fall either side; every held-out answer is scored here)
    assert card["metrics"]["val_reward_accuracy"] > 0.5 and card["metrics"]["val_reward_margin"] > 0.5, card["metrics"]

    # the loss: half of each answer's weight where the model is its reference (reward 0 at the reference
    # point 0), less for the tuned model; the same from the reference's precomputed log-probabilities
    val_table = pq.read_table(Path(ratedset["manifest"]["uri"]) / "packed" / "validation")
    val = host_batch(val_table, "causal_lm", False)
    base, tuned = (AutoModelForCausalLM.from_pretrained(p).eval() for p in (ratedset["base"], registry.local_path(card)))
    kto = PreferenceConfig(loss="kto", beta=0.1, desirable_weight=2)
    good = val["desirable"].float()
    with torch.no_grad():
        assert float(Preference(kto, base)(base, val)) == pytest.approx(float((0.5 * (1 + good)).mean()), abs=1e-5)
        assert float(Preference(kto, base)(tuned, val)) < float(Preference(kto, base)(base, val)) / 2
        precomputed = host_batch(reference_logps(val_table, base, torch.device("cpu")), "causal_lm", False)
        assert float(Preference(kto, None)(tuned, precomputed)) == pytest.approx(
            float(Preference(kto, base)(tuned, val)), abs=1e-5)

    # the fine-tuned model said "Sea." / "Land."; tuned on the ratings, it answers in the sentences rated good.
    # (one answer of eight came out garbled, "On lael lan", in 1 of 9 runs of this config: five test runs and
    # four over two test upstreams and two seeds, RESULTS "KTO"; never the one word rated bad)
    answers = _greedy_answers(card)
    assert sum(answers[w] == SENTENCES[a] for w, a in PLACES.items()) >= 7, answers
    assert not {"Sea.", "Land."} & set(answers.values()), answers

    from raylm.evaluate.config import EvaluateConfig
    from raylm.evaluate.job import run as evaluate

    rep = evaluate(config.build(EvaluateConfig, {
        "model": card["id"], "registry": str(d / "registry"), "baselines": {"ngram": None, "previous_versions": 0},
        "robustness": None, "data": {"dataset": "ratings", "root": str(d / "datasets"), "split": "validation"}}))
    before = rep["baselines"][f"reference {ratedset['base']}"]["metrics"]["rating_auc"]
    assert rep["headline_metric"] == "rating_auc" and rep["metrics"]["rating_auc"] >= 0.9, rep["metrics"]
    assert before < 0.5, before  # the fine-tuned model finds its own one-word answers (rated bad) likelier

    root = {"dataset": "ratings", "root": str(d / "datasets")}
    with pytest.raises(ConfigError, match="holds rated answers, one answer each: preference.loss kto"):
        dataset_meta(cfg.model_copy(update={"preference": PreferenceConfig()}))
    with pytest.raises(ConfigError, match="kto trains on answers rated one at a time"):
        dataset_meta(cfg.model_copy(update={"data": cfg.data.model_copy(update={"dataset": "pairs"})}))
    with pytest.raises(ConfigError, match="holds rated answers: add a `preference:` section with loss: kto"):
        dataset_meta(config.build(TrainConfig, {"name": "x", "data": root, "model": {"path": ratedset["base"]}}))


def _kto_rank(rank: int, port: int, out) -> None:
    """One of two gloo ranks: its KTO losses with the reference point from both ranks' batches."""
    import torch.distributed as dist

    from raylm.train.config import PreferenceConfig
    from raylm.train.losses import Preference

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        kto = Preference(PreferenceConfig(loss="kto", beta=0.5), None)
        rated = torch.tensor([0.5, -0.5]) * 0.5  # beta * log-ratio
        mismatched = torch.tensor([0.2, 0.4]) if rank == 0 else torch.tensor([1.0, 1.2])  # KL 0.3 and 1.1: mean 0.7
        good = torch.tensor([True, False])
        out.put((rank, kto.kto(rated, mismatched * 0.5, good, across_workers=True)[0].tolist(),
                 kto.kto(rated, mismatched * 0.5, good)[0].tolist()))
    finally:
        dist.destroy_process_group()


def test_ktos_reference_point_is_averaged_over_the_workers_in_training():
    """In training, each worker's KL estimate (its batch's mismatched answers) is averaged over the
    workers before the losses use it, as TRL does; evaluation keeps each worker's own."""
    import multiprocessing as mp

    from raylm.cluster import free_port

    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_kto_rank, args=(r, port, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = {r: (across, own) for r, across, own in (out.get(timeout=60) for _ in procs)}
    for p in procs:
        p.join(30)

    def expected(z: float) -> list[float]:  # good: 1 - sigmoid(beta (r - z)); bad: 1 - sigmoid(beta (z - r))
        return [1 - 1 / (1 + math.exp(-0.5 * (0.5 - z))), 1 - 1 / (1 + math.exp(-0.5 * (z + 0.5)))]

    for r, own_z in ((0, 0.3), (1, 1.1)):
        assert got[r][0] == pytest.approx(expected(0.7), abs=1e-6)
        assert got[r][1] == pytest.approx(expected(own_z), abs=1e-6)
