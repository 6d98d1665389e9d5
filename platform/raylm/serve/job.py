"""`jobs/deploy.py`: serve registry models as one Ray Serve application.

Validates the config, checks the API keys and the models before touching Serve, measures
what compression (int8 / pruning) costs in validation loss, then `serve.run`s the app (a
rolling update when an app of that name is already running: no request is dropped; only the
deployments whose model, settings or code changed get new replicas, see serve/graph.py) and
prints the endpoint and a curl line. The app keeps running after the job ends.
"""

from __future__ import annotations

import copy
import ipaddress
import math
import os
import time
from typing import Any, Optional, Sequence

from raylm import config, registry, storage
from raylm.serve.config import Compression, DeployConfig


def _validation_blocks(card: dict[str, Any], n: int):
    """The first `n` packed blocks of the model's validation split (train when it has none), with
    what the training loop reads of them: a chat dataset's loss masks and positions, a preference
    dataset's rejected side."""
    import pyarrow.dataset as pads

    from raylm.data import versions

    root = ((card.get("config") or {}).get("data") or {}).get("root")
    m = versions.resolve(card["dataset"], root)
    split = "validation" if m["splits"]["validation"]["blocks"] else "train"
    fs, path = storage.arrow_fs(storage.join(m["uri"], "packed", split))
    ds = pads.dataset(path, filesystem=fs, format="parquet")
    wanted = ("input_ids", "loss_mask", "position_ids", "rejected_ids", "rejected_mask")
    return ds.head(n, columns=[c for c in wanted if c in ds.schema.names])


def loopback_across_machines(host: str, node_ips: Sequence[str], haproxy: bool) -> Optional[str]:
    """Why an app on a loopback `http.host` fails on a cluster of several machines in Serve's
    HAProxy mode (raylm's default): each machine's HAProxy sends requests to the ingress replicas
    of the others at their own address, where a replica listening on loopback refuses them. (Ray
    says so only in the Serve controller's log.) None when this does not apply."""
    machines = len(set(node_ips))
    if not haproxy or machines < 2:
        return None
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: its address is the user's business
        return None
    if not loopback:
        return None
    return (f"http.host is {host} on a cluster of {machines} machines: in Serve's HAProxy mode the HAProxy of "
            f"each machine forwards requests to ingress replicas on the others at their own address, which a "
            f"replica listening on {host} refuses, so requests routed there fail. Set http.host=0.0.0.0 and keep "
            f"the port behind a firewall or a Kubernetes Service, or serve from one machine.")


def template_overrides(models: Sequence[Any], cards: dict[str, dict[str, Any]]) -> list[str]:
    """Warnings for models fine-tuned on conversations (`data_format: chat` on the card) that the
    deploy config serves with a chat template of its own: the model learned its answers after
    prompts rendered with its tokenizer's template, and another one feeds it prompts it never saw."""
    out = []
    for m in models:
        card = cards.get(m.name) or {}
        if m.chat_template and card.get("data_format") == "chat":
            out.append(f"models.{m.name}.chat_template: {card.get('id', m.name)} was fine-tuned on conversations "
                       "rendered with the chat template its tokenizer carries; serving it with another template "
                       "gives it prompts it was not trained on (leave chat_template out to use the model's own)")
    return out


def measure_compression(card: dict[str, Any], c: Compression) -> dict[str, Any]:
    """Validation loss (and CPU latency per block) of the model as trained vs compressed, the
    loss as training computes it: on a chat dataset's answers only (each packed conversation on
    its own positions), on both sides' last answers of preference pairs."""
    import torch
    from transformers import AutoModelForCausalLM

    from raylm.serve.engine import compress
    from raylm.train.loop import host_batch

    if card.get("task") != "causal_lm":
        return {"measured": False, "reason": "quality is measured for causal LMs (validation loss)"}
    blocks = _validation_blocks(card, c.eval_batches * 4)
    if not blocks.num_rows:
        return {"measured": False, "reason": "the model's dataset has no packed blocks to measure on"}
    model = AutoModelForCausalLM.from_pretrained(str(registry.local_path(card)), local_files_only=True,
                                                 dtype=torch.float32).eval()

    def evaluate(m: torch.nn.Module) -> tuple[float, float]:
        losses, t0 = [], time.perf_counter()
        with torch.inference_mode():
            for i in range(0, blocks.num_rows, 4):
                losses.append(float(m(**host_batch(blocks.slice(i, 4), "causal_lm", pin=False)).loss))
        return sum(losses) / len(losses), (time.perf_counter() - t0) / blocks.num_rows

    base_loss, base_s = evaluate(model)
    out = compress(copy.deepcopy(model), c.quantize, c.prune)
    loss, s = evaluate(out.pop("model"))
    return {"measured": True, "split_blocks": blocks.num_rows, "quantize": c.quantize, "prune": c.prune,
            "eval_batches": c.eval_batches, "applied": out,
            "val_loss_before": round(base_loss, 5), "val_loss_after": round(loss, 5),
            "val_loss_delta": round(loss - base_loss, 5),
            "val_ppl_before": round(math.exp(min(base_loss, 50)), 3), "val_ppl_after": round(math.exp(min(loss, 50)), 3),
            "cpu_ms_per_block_before": round(1000 * base_s, 2), "cpu_ms_per_block_after": round(1000 * s, 2)}


def record_compression(card: dict[str, Any], result: dict[str, Any]) -> None:
    """Add the measurement to the model card (`serving.compression`)."""
    current = storage.read_json(storage.join(card["uri"], registry.CARD))
    current.setdefault("serving", {})["compression"] = result
    storage.write_json(storage.join(card["uri"], registry.CARD), current)
    card.update(current)


def _serve_details() -> dict[str, Any]:
    """The Serve controller's details of this cluster ({} when they cannot be had: they only tell
    the deploy job what to print)."""
    try:
        from ray.serve.context import _get_global_client

        return _get_global_client().get_serve_details() or {}
    except Exception:  # noqa: BLE001 - only used for what the job prints
        return {}


def _running_http_options() -> dict[str, Any]:
    return dict(_serve_details().get("http_options") or {})


def running_replicas(app: str) -> dict[str, dict[str, Any]]:
    """Deployment -> {"replicas": ids of its RUNNING replicas, "config": its deployment options as
    Serve runs them}, for an app on the cluster ({} when it does not run)."""
    deps = ((_serve_details().get("applications") or {}).get(app) or {}).get("deployments") or {}
    return {name: {"replicas": {r["replica_id"] for r in d.get("replicas") or [] if r.get("state") == "RUNNING"},
                   "config": d.get("deployment_config") or {}} for name, d in deps.items()}


def _changed(before: dict[str, Any], after: dict[str, Any], prefix: str = "") -> list[str]:
    """`key old -> new` for each deployment option that changed, nested ones by their path (e.g.
    `autoscaling_config.max_replicas 2 -> 3`, `user_config.batching.batch_wait_timeout_s 0.0 -> 0.01`)."""
    out = []
    for k in sorted(set(before) | set(after)):
        a, b = before.get(k), after.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed(a, b, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k} {a} -> {b}")
    return out


def redeploy_summary(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> Optional[str]:
    """What a redeploy did to a running app's deployments (`running_replicas` before and after):
    which got new replicas, which kept theirs with settings Serve applied in place (replica counts,
    autoscaling, queue limits, batching: `graph.SERVE_APPLIED`), which kept theirs unchanged, which were removed. None for a first deploy."""
    if not before:
        return None
    kept = sorted(d for d, s in after.items() if s["replicas"] & before.get(d, {}).get("replicas", set()))
    new = sorted(d for d in after if d not in kept)
    gone = sorted(d for d in before if d not in after)
    in_place = {d: c for d in kept if (c := _changed(before[d]["config"], after[d]["config"]))}
    unchanged = [d for d in kept if d not in in_place]
    if not new and not in_place and not gone:
        return f"nothing changed: all {sum(len(after[d]['replicas']) for d in kept)} replicas go on serving, none restarted"
    parts = [f"new replicas for {', '.join(new)}"] if new else []
    if in_place:
        parts.append("applied in place, replicas kept: " + "; ".join(f"{d} {', '.join(c)}" for d, c in in_place.items()))
    if unchanged:
        parts.append(f"kept the running ones of {', '.join(unchanged)} (unchanged)")
    if gone:
        parts.append(f"removed {', '.join(gone)}")
    return "; ".join(parts)


class ServedUnknown(RuntimeError):
    """A raylm app on the cluster did not say what it serves."""


def served_versions(timeout_s: float = 30.0) -> Optional[dict[str, list[str]]]:
    """Model directories (URIs) the raylm apps on the cluster serve -> where, e.g. `app 'raylm'
    as 'authors'`; None when there is no cluster to ask (no `raylm up`, no RAY_ADDRESS). Every app
    is asked at once (one `timeout_s` for all); a raylm app (its `ingress` deployment) that does
    not answer raises ServedUnknown, naming it: what it serves cannot be told, so nothing it might
    serve may be deleted. Apps that are not raylm's have nothing to say and are passed over."""
    import logging
    import time

    from raylm import cluster
    from raylm.runtime import init_ray

    try:
        init_ray(job=False)
    except cluster.ClusterError:
        return None
    from ray import serve

    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    asked = {}
    for name, app in serve.status().applications.items():
        if "ingress" not in app.deployments:  # not a raylm app: nothing to ask
            continue
        try:
            asked[name] = serve.get_app_handle(name).served.remote()
        except Exception as e:  # noqa: BLE001 - e.g. an app being deleted
            asked[name] = e
    out: dict[str, list[str]] = {}
    silent: list[str] = []
    deadline = time.monotonic() + timeout_s
    for name, call in asked.items():
        try:
            if isinstance(call, Exception):
                raise call
            rows = call.result(timeout_s=max(0.1, deadline - time.monotonic()))
        except Exception as e:  # noqa: BLE001 - not running, wedged, or an app of the same shape that is not raylm's
            silent.append(f"{name!r} ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})")
            continue
        for r in rows:
            out.setdefault(storage.normalize(r["uri"]), []).append(f"app {name!r} as {r['model']!r}")
    if silent:
        raise ServedUnknown(f"Serve app(s) {', '.join(silent)} did not say what they serve within {timeout_s:.0f} s")
    return out


def undeploy(name: str) -> bool:
    """Delete a running Serve application (its replicas stop after their in-flight requests)."""
    from ray import serve

    if name not in serve.status().applications:
        return False
    serve.delete(name)
    return True


def run(cfg: DeployConfig) -> dict[str, Any]:
    from raylm import waiting
    from raylm.runtime import init_ray
    from raylm.serve import keys
    from raylm.serve.graph import build, canary_key, resolve

    try:
        cfg, cards = resolve(cfg)
    except (FileNotFoundError, ValueError) as e:
        raise config.ConfigError(f"models: {e}") from None
    if cfg.auth.required and not keys.list_keys(cfg.auth.keys_file):
        raise config.ConfigError(f"auth: no API keys in {cfg.auth.keys_file}; create one first:\n"
                                 f"    raylm keys add NAME --scopes generate,classify,feedback\n"
                                 "(or set auth.required=false for a private laptop)")
    init_ray(config=cfg)  # on several nodes: every local path it names must be shared
    import ray
    from ray import serve

    for m in cfg.models:
        c = m.compression
        if c.quantize == "none" and c.prune == 0:
            continue
        if c.quantize == "int8" and m.num_gpus > 0:
            raise config.ConfigError(f"models.{m.name}.compression.quantize=int8 is for CPU serving; set num_gpus: 0")
        for key in [m.name] + ([canary_key(m.name)] if m.canary else []):  # a canary is served compressed too
            before = (cards[key].get("serving") or {}).get("compression") or {}
            if before.get("measured") and (before.get("quantize"), before.get("prune"), before.get("eval_batches")) \
                    == (c.quantize, c.prune, c.eval_batches):  # a redeploy: the card has it
                print(f"[deploy] {key}: measured at an earlier deploy (model card): {before}", flush=True)
                continue
            print(f"[deploy] measuring {cards[key]['id']} with quantize={c.quantize} prune={c.prune} on its "
                  f"validation split ...", flush=True)
            # with the CPUs its replica will have (asking for a whole one waited forever, silently, on a
            # cluster whose other apps hold all but a fraction of its CPUs)
            ref = ray.remote(num_cpus=m.num_cpus)(measure_compression).remote(cards[key], c)
            waited = 0
            while not ray.wait([ref], timeout=30)[0]:
                waited += 30
                print(f"[deploy] {key}: still measuring after {waited} s (it asked for {m.num_cpus:g} CPU; "
                      f"free now: {ray.available_resources().get('CPU', 0):g} of "
                      f"{ray.cluster_resources().get('CPU', 0):g})", flush=True)
            result = ray.get(ref)
            print(f"[deploy] {key}: {result}", flush=True)
            if result.get("measured"):
                record_compression(cards[key], result)

    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
    actual = _running_http_options()
    if actual and (actual.get("host"), actual.get("port")) != (cfg.http.host, cfg.http.port):
        print(f"[deploy] note: Serve already runs on this cluster with HTTP {actual.get('host')}:{actual.get('port')}; "
              f"http options apply only when Serve starts (`serve shutdown` first to change them)", flush=True)
        cfg = cfg.model_copy(update={"http": cfg.http.model_copy(update={k: actual[k] for k in ("host", "port")
                                                                         if k in actual})})
    spread = loopback_across_machines(cfg.http.host, [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]],
                                      os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1")
    if spread:
        print(f"[deploy] warning: {spread}", flush=True)
    for warning in template_overrides(cfg.models, cards):
        print(f"[deploy] warning: {warning}", flush=True)
    print(f"[deploy] deploying {cfg.name!r}: " + ", ".join(f"{m.name}={cards[m.name]['id']}" for m in cfg.models),
          flush=True)
    t0 = time.time()
    # serve.run waits for every replica; one that cannot be placed would wait without a word here
    watch = waiting.start(ray.get_runtime_context().get_job_id(), app=cfg.name)
    before = running_replicas(cfg.name)
    try:
        serve.run(build(cfg, cards), name=cfg.name, route_prefix=cfg.route_prefix)
    finally:
        if watch is not None:
            watch.done.set()
    redeployed = redeploy_summary(before, running_replicas(cfg.name))
    if redeployed:
        print(f"[deploy] {cfg.name!r} was running: {redeployed}", flush=True)
    host = "127.0.0.1" if cfg.http.host in ("0.0.0.0", "::") else cfg.http.host
    base = f"http://{host}:{cfg.http.port}{cfg.route_prefix.rstrip('/')}"
    lm = next((m.name for m in cfg.models if cards[m.name]["task"] == "causal_lm"), None)
    print(f"[deploy] {cfg.name!r} is RUNNING after {time.time() - t0:.0f} s at {base}/  "
          f"(playground: {base}/, OpenAPI: {base}/docs)", flush=True)
    if lm and cards[lm].get("data_format") == "chat":  # fine-tuned on conversations: ask it a question
        print(f"""[deploy] try it:
    curl {base}/v1/chat/completions -H "Authorization: Bearer $RAYLM_API_KEY" \\
         -H 'Content-Type: application/json' \\
         -d '{{"model": "{lm}", "messages": [{{"role": "user", "content": "Hello"}}], "max_tokens": 32}}'""", flush=True)
    elif lm:
        print(f"""[deploy] try it:
    curl {base}/v1/completions -H "Authorization: Bearer $RAYLM_API_KEY" \\
         -H 'Content-Type: application/json' -d '{{"model": "{lm}", "prompt": "To be", "max_tokens": 32}}'""",
              flush=True)
    return {"app": cfg.name, "url": base, "models": {m.name: cards[m.name]["id"] for m in cfg.models},
            "tasks": {m.name: cards[m.name].get("task", "causal_lm") for m in cfg.models}, "redeployed": redeployed}


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = config.job_argparser("Serve registry models on Ray Serve (OpenAI-compatible HTTP)").parse_args(argv)
    run(config.load(DeployConfig, a.config, a.overrides))
    return 0
