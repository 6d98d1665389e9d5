"""Serving benchmarks, each against its baseline in the same run (one JSON line each):

- overhead:  p50/p99 latency of a completion through the whole serving path (HTTP proxy,
             API-key check, ingress, DeploymentHandle, batching) vs the same engine called
             in-process on the same thread budget, request by request in turn (each request
             through Serve, then in-process), so both see the same moment of a machine whose
             speed drifts. The line names Serve's mode (`serve_mode`: raylm's clusters run
             HAProxy + throughput-optimized; `defaults` is Serve's own proxy). goal: overhead p50 <= 5 ms
- batching:  generated tokens/s at 16 concurrent clients with `@serve.batch` (max 16) vs the
             same model deployed with batches of 1.                   goal: >= 3x
- quantize:  in-process generation latency of int8 dynamic quantization vs fp32, and the
             validation-loss change (measured on the model's own validation split when the
             model has one: pass --model NAME from the registry).
- redeploy:  the same config deployed again onto the running app: seconds until `serve.run`
             returns and replicas replaced, with raylm's deployment versions (a digest of what
             each replica is built from: nothing to replace) vs Ray's default (a random version
             per deploy: every replica replaced).
- gpu:       on CUDA: tokens/s and p50 latency at 1 and 16 concurrent clients through Serve vs
             direct HF generate in-process (batch 1 and batch 16).

    python benchmarks/serve_bench.py                          # CPU: overhead, batching, quantize
    python benchmarks/serve_bench.py --model tiny-llama       # a registry model (quality on its data)
    python benchmarks/serve_bench.py --device cuda --preset 500m --experiments gpu
    python benchmarks/serve_bench.py --experiments redeploy

Load comes from a bounded client (a fixed number of threads, a fixed number of requests) on
loopback. Joins the `raylm up` cluster when one runs here, else starts a local Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from raylm.runtime import prepare_env  # noqa: E402

prepare_env()

import requests  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def random_model(out: Path, preset: str, vocab: int, context: int) -> dict:
    """A random-init Llama with a byte-level BPE trained on generated text, registered in a
    throwaway registry (latency does not depend on what the weights say)."""
    import random

    from raylm import registry
    from raylm.data.config import TokenizerConfig
    from raylm.data.tokenize import to_hf, train_bpe
    from raylm.train import models
    from raylm.train.config import ModelConfig

    rng = random.Random(0)
    words = [("".join(rng.choice("etaoinshrdlucmfwyp") for _ in range(rng.randint(2, 9)))) for _ in range(3000)]
    texts = [" ".join(rng.choice(words) for _ in range(200)) for _ in range(300)]
    tc = TokenizerConfig(vocab_size=vocab)
    tok = to_hf(train_bpe(texts, tc), tc)
    model = models.build(ModelConfig(arch="llama", preset=preset), len(tok), context, tok.eos_token_id,
                         tok.pad_token_id)
    model.config.use_cache = True
    d = out / "model"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return registry.register(d, f"bench-{preset}", {"task": "causal_lm", "base": f"llama-{preset} (random init)"},
                             root=str(out / "registry"))


PROMPTS = ["the king and the queen went out", "a ship at sea in a storm", "night falls on the castle",
           "the fool sings a song of wine", "love and death and honour", "the ghost walks the field at night",
           "a letter from the duke to the lady", "heaven and earth and the sea"]


class Client:
    """Bounded load: `clients` threads share `total` requests."""

    def __init__(self, base: str, key: str):
        self.base, self.key = base, key

    def run(self, bodies: list[dict], clients: int) -> tuple[list[float], int, float, int]:
        lat: list[float] = []
        tokens = [0]
        errors = [0]
        lock = threading.Lock()
        it = iter(bodies)

        def worker():
            s = requests.Session()
            while True:
                with lock:
                    body = next(it, None)
                if body is None:
                    return
                t0 = time.perf_counter()
                r = s.post(self.base + "/v1/completions", json=body, timeout=600,
                           headers={"Authorization": f"Bearer {self.key}"})
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200:
                        lat.append(dt)
                        tokens[0] += r.json()["usage"]["completion_tokens"]
                    else:
                        errors[0] += 1

        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return lat, tokens[0], time.perf_counter() - t0, errors[0]

    def paired(self, bodies: list[dict], engine, warmup: int = 5) -> tuple[list[float], list[float], int]:
        """Each request through Serve, then the same request in-process, alternately on one
        connection: both sides see the same moment of a machine whose speed drifts."""
        s = requests.Session()
        served, direct, errors = [], [], 0
        for k, body in enumerate(bodies[:warmup] + bodies):
            t0 = time.perf_counter()
            r = s.post(self.base + "/v1/completions", json=body, timeout=600,
                       headers={"Authorization": f"Bearer {self.key}"})
            dt = time.perf_counter() - t0
            d = direct_latencies(engine, [body])[0]
            if k < warmup:
                continue
            if r.status_code == 200:
                served.append(dt)
                direct.append(d)
            else:
                errors += 1
        return served, direct, errors


def serve_mode() -> str:
    """Ray Serve's ingress and data-plane settings as the cluster's workers see them (the
    cluster may be a `raylm up` one this process only joined)."""
    import ray

    keys = ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_THROUGHPUT_OPTIMIZED")
    env = ray.get(ray.remote(num_cpus=0)(lambda: {k: os.environ.get(k) for k in keys}).remote())
    return "+".join(k for k in keys if env[k] == "1") or "defaults"


def direct_latencies(engine, bodies: list[dict]) -> list[float]:
    from raylm.serve.engine import GenRequest

    out = []
    for b in bodies:
        t0 = time.perf_counter()
        req = GenRequest(engine.encode(b["prompt"]), max_tokens=b["max_tokens"], temperature=b["temperature"])
        engine.check(req)
        engine.generate([req], lambda ev: None)
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="registry reference (default: a random-init model of --preset)")
    p.add_argument("--registry", help="registry root for --model")
    p.add_argument("--preset", default="small")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--experiments", default="overhead,batching,quantize")
    p.add_argument("--requests", type=int, default=60, help="requests per measurement")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--batch-wait", type=float, default=0.1,
                   help="batch_wait_timeout_s of the batched deployment: long enough for 16 clients' requests "
                        "to meet in one batch")
    a = p.parse_args()
    experiments = set(a.experiments.split(","))

    import torch

    from raylm import registry
    from raylm.runtime import init_ray
    from raylm.serve import keys
    from raylm.serve.config import DeployConfig
    from raylm.serve.engine import LMEngine

    work = Path(tempfile.mkdtemp(prefix="raylm-serve-bench-"))
    card = registry.resolve(a.model, a.registry) if a.model else random_model(work, a.preset, a.vocab, 2048)
    model_dir = registry.local_path(card)
    init_ray()
    import ray
    from ray import serve

    gpu = a.device == "cuda"
    # the cores this process (and the Ray it started, which inherits its affinity) may run on:
    # `taskset -c 0,1 python benchmarks/serve_bench.py` measures on 2 cores of a bigger machine
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = 1 if not gpu else 4  # the replica's torch threads; the in-process baseline uses the same
    torch.set_num_threads(threads)
    kf = str(work / "keys.json")
    key = keys.add("bench", ["generate"], kf, rate_limit_per_minute=10**6)
    port = int(os.environ.get("BENCH_PORT", "8011"))
    common = {"model": card["uri"], "num_cpus": threads if not gpu else 1, "num_gpus": 1 if gpu else 0,
              "max_tokens_cap": 4096, "max_ongoing_requests": 64, "max_queued_requests": -1}
    models = [{"name": "batched", **common, "batching": {"max_batch_size": 16, "batch_wait_timeout_s": a.batch_wait}}]
    if "batching" in experiments or "overhead" in experiments:
        models.append({"name": "unbatched", **common, "batching": {"max_batch_size": 1, "batch_wait_timeout_s": 0}})
    if gpu:
        for m in models:
            m["num_gpus"] = 1 / len(models)
    cfg = DeployConfig.model_validate({"name": "bench", "route_prefix": "/bench", "models": models,
                                       "http": {"port": port}, "auth": {"keys_file": kf},
                                       "ingress": {"num_cpus": 0}, "limits": {"rate_limit_per_minute": 10**6}})
    from raylm.serve.graph import build, resolve

    cfg, cards = resolve(cfg)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(cfg, cards), name="bench", route_prefix="/bench")
    client = Client(f"http://127.0.0.1:{port}/bench", key)
    device = torch.cuda.get_device_name(0) if gpu else f"cpu ({ncpu} cores)"
    base = {"device": device, "model": card["id"], "preset": a.preset if not a.model else None,
            "batch_wait_timeout_s": a.batch_wait,
            "date": time.strftime("%Y-%m-%d")}
    engine = LMEngine(model_dir, num_gpus=1 if gpu else 0)
    try:
        def bodies(n: int, max_tokens: int, temperature: float, model: str) -> list[dict]:
            return [{"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                     "temperature": temperature} for i in range(n)]

        if "overhead" in experiments:
            b = bodies(a.requests, a.max_tokens, 0.0, "unbatched")
            served, direct, errors = client.paired(b, engine)
            print(json.dumps({"benchmark": "serve_overhead", **base, "serve_mode": serve_mode(),
                              "requests": len(b), "max_tokens": a.max_tokens,
                              "errors": errors, "serve_p50_ms": round(1000 * statistics.median(served), 2),
                              "serve_p99_ms": round(1000 * pct(served, 99), 2),
                              "direct_p50_ms": round(1000 * statistics.median(direct), 2),
                              "direct_p99_ms": round(1000 * pct(direct, 99), 2),
                              "overhead_p50_ms": round(1000 * (statistics.median(served) - statistics.median(direct)), 2),
                              "goal_overhead_p50_ms": 5}), flush=True)
        if "batching" in experiments:
            out = {}
            for name in ("batched", "unbatched"):
                b = bodies(a.requests, 32, 1.0, name)
                client.run(b[:a.clients], a.clients)  # warm-up
                lat, tokens, wall, errors = client.run(b, a.clients)
                out[name] = {"tokens_per_s": round(tokens / wall, 1), "p50_ms": round(1000 * statistics.median(lat), 1),
                             "errors": errors}
            print(json.dumps({"benchmark": "serve_batching", **base, "clients": a.clients, "requests": a.requests,
                              "max_tokens": 32, "batched": out["batched"], "unbatched": out["unbatched"],
                              "speedup": round(out["batched"]["tokens_per_s"] / out["unbatched"]["tokens_per_s"], 2),
                              "goal_speedup": 3}), flush=True)
        if "quantize" in experiments and not gpu:
            from raylm.serve.config import Compression
            from raylm.serve.job import measure_compression

            b = bodies(max(20, a.requests // 3), 32, 0.0, "-")
            q_engine = LMEngine(model_dir, quantize="int8")
            direct_latencies(engine, b[:3])
            direct_latencies(q_engine, b[:3])
            fp32 = direct_latencies(engine, b)
            int8 = direct_latencies(q_engine, b)
            quality = measure_compression(card, Compression(quantize="int8")) if card.get("dataset") else {
                "measured": False, "reason": "a random-init model has no validation split: pass --model NAME"}
            print(json.dumps({"benchmark": "serve_int8", **base, "requests": len(b), "max_tokens": 32,
                              "fp32_p50_ms": round(1000 * statistics.median(fp32), 1),
                              "int8_p50_ms": round(1000 * statistics.median(int8), 1),
                              "speedup": round(statistics.median(fp32) / statistics.median(int8), 2),
                              "quality": {k: quality.get(k) for k in ("measured", "reason", "split_blocks",
                                                                      "val_loss_before", "val_loss_after",
                                                                      "val_loss_delta") if k in quality}}),
                  flush=True)
        if "redeploy" in experiments:
            from raylm.serve.job import running_replicas

            out = {}
            for name, versioned in (("raylm_versions", True), ("ray_default", False)):  # (deployed versioned above)
                before = running_replicas("bench")
                t0 = time.perf_counter()
                serve.run(build(cfg, cards, versioned=versioned), name="bench", route_prefix="/bench")
                seconds = time.perf_counter() - t0
                after = running_replicas("bench")
                lat, _, _, errors = client.run(bodies(1, 1, 0.0, "batched"), 1)  # the first request after it
                out[name] = {"seconds": round(seconds, 2), "replicas": sum(map(len, after.values())),
                             "replicas_replaced": sum(len(ids - before.get(d, set())) for d, ids in after.items()),
                             "first_request_ms": round(1000 * lat[0], 1) if lat else None, "errors": errors}
            print(json.dumps({"benchmark": "serve_redeploy", **base, "same_config": True, **out}), flush=True)
        if "gpu" in experiments:
            out = {}
            for clients in (1, a.clients):
                b = bodies(max(a.requests, 2 * clients), a.max_tokens, 1.0, "batched")
                client.run(b[:clients], clients)
                lat, tokens, wall, errors = client.run(b, clients)
                # direct: plain HF `generate` (sampling, KV cache) over a batch of `clients` prompts
                tok = engine.tok
                enc = tok([x["prompt"] for x in b[:clients]], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(engine.device)

                def hf_generate():
                    engine.model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                          max_new_tokens=a.max_tokens, min_new_tokens=a.max_tokens,
                                          pad_token_id=tok.pad_token_id)
                    torch.cuda.synchronize()

                hf_generate()
                rounds, d_lat = max(3, len(b) // clients), []
                t0 = time.perf_counter()
                for _ in range(rounds):
                    t1 = time.perf_counter()
                    hf_generate()
                    d_lat.append(time.perf_counter() - t1)
                d_wall = time.perf_counter() - t0
                # raylm's engine in-process on the same batch (what a replica runs, without Serve)
                from raylm.serve.engine import GenRequest

                reqs = [GenRequest(engine.encode(x["prompt"]), max_tokens=a.max_tokens, temperature=1.0)
                        for x in b[:clients]]
                engine.generate(reqs, lambda ev: None)
                torch.cuda.synchronize()
                t1 = time.perf_counter()
                for _ in range(rounds):
                    engine.generate([GenRequest(r.prompt_ids, r.max_tokens, 1.0) for r in reqs], lambda ev: None)
                torch.cuda.synchronize()
                e_wall = time.perf_counter() - t1
                out[str(clients)] = {"serve_tokens_per_s": round(tokens / wall, 1),
                                     "serve_p50_ms": round(1000 * statistics.median(lat), 1), "errors": errors,
                                     "direct_tokens_per_s": round(rounds * clients * a.max_tokens / d_wall, 1),
                                     "direct_p50_ms": round(1000 * statistics.median(d_lat), 1),
                                     "engine_tokens_per_s": round(rounds * clients * a.max_tokens / e_wall, 1)}
            print(json.dumps({"benchmark": "serve_gpu", **base, "max_tokens": a.max_tokens,
                              "concurrency": out}), flush=True)
    finally:
        serve.delete("bench")
        shutil.rmtree(work, ignore_errors=True)  # the random-init model and the keys file
    return 0

if __name__ == "__main__":
    sys.exit(main())
