"""The Serve application graph of a deploy config: each model's registry card resolved, one
deployment per model (one per member for an ensemble) with its replicas, autoscaling and
resources, and the FastAPI ingress (serve/app.py) bound to their handles.

    resolve(cfg) -> (cfg with defaults filled in, {model name: card, "NAME@canary": its canary's card})
    build(cfg) -> serve.Application          (the deploy job and the benchmarks run it;
                                              `raylm.serve.app:app_builder` wraps it for Serve configs)

Every deployment carries a version (`serve_version`): a digest of what its replicas are built from.
Serve replaces a deployment's replicas when its version changes and only then, so a redeploy of an
unchanged config keeps every replica, and a rolling update replaces only the deployments whose
model, settings or code changed. The settings Serve applies to running replicas (replica counts,
autoscaling, queue limits, health checks, the access log, and batching through each replica's
`reconfigure`: `SERVE_APPLIED`) stay out of the versions: changing only those keeps every replica
and applies them in place.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional

from raylm.serve.app import Ingress
from raylm.serve.recent import RECENT_RESPONSES, SharedResponses
from raylm.serve.config import DeployConfig


def resolve(cfg: DeployConfig) -> tuple[DeployConfig, dict[str, dict]]:
    """Fill every default that depends on where this runs (paths under $RAYLM_HOME) and look
    up each model's registry card. Raises FileNotFoundError for an unknown model."""
    from raylm import registry, storage
    from raylm.cluster import home
    from raylm.serve.keys import default_keys_file

    cfg = cfg.model_copy(deep=True)
    cfg.registry = storage.normalize(cfg.registry or registry.default_root())
    cfg.auth.keys_file = storage.normalize(cfg.auth.keys_file or default_keys_file())
    cfg.feedback_uri = storage.normalize(cfg.feedback_uri or str(home() / "feedback" / cfg.name))
    cards = {}
    for m in cfg.models:
        for key, ref in [(m.name, m.model)] + ([(canary_key(m.name), m.canary.model)] if m.canary else []):
            card = registry.resolve(ref, cfg.registry)
            if card.get("task") not in ("causal_lm", "classification"):
                raise ValueError(f"model {card.get('id')} has task {card.get('task')!r}; raylm serves causal_lm and "
                                 "classification models")
            cards[key] = card
        if m.canary and cards[canary_key(m.name)]["task"] != cards[m.name]["task"]:
            raise ValueError(f"{m.name}: the canary {cards[canary_key(m.name)]['id']} is a "
                             f"{cards[canary_key(m.name)]['task']} model, {cards[m.name]['id']} a "
                             f"{cards[m.name]['task']} one")
    return cfg, cards


@functools.cache
def _code_digest() -> str:
    """What every replica runs: raylm's own files (the playground page included) and the versions
    of the libraries that load and run the models."""
    import raylm

    h, root = hashlib.sha256(), Path(raylm.__file__).parent
    for f in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h.update(f"{f.relative_to(root)}\0".encode())
        h.update(f.read_bytes())
    for lib in ("ray", "torch", "transformers", "tokenizers"):
        h.update(f"{lib}=={metadata.version(lib)}\0".encode())
    return h.hexdigest()


def serve_version(*built_from: Any) -> str:
    """A deployment's Serve version: a digest of its constructor's arguments (`built_from`, as JSON)
    and of the code. Without one, `serve.run` gives every deployment a new random version, and
    every redeploy, even of an unchanged config, replaced every replica."""
    doc = json.dumps(built_from, sort_keys=True, default=str)
    return hashlib.sha256(f"{_code_digest()}\0{doc}".encode()).hexdigest()[:16]


def _options(deployment, version: Optional[str], **options: Any):
    """`deployment.options(**options)` with `version` set (None: Ray's default, a random one).
    Ray 2.5x took `version` out of the public options (imperative `serve.run` gives every deployment
    a random one) but its own declarative deploys still set it through `_internal`; without it, a
    redeploy replaces every replica. tests/test_serve.py (the rolling update) fails if a Ray upgrade
    stops honouring it."""
    if version is None:
        return deployment.options(**options)
    return deployment.options(**options, version=version, _internal=True)


# A model entry's fields that Serve applies to running replicas (num_replicas and
# max_queued_requests lightweight, the others by reconfiguring each replica in place; batching
# as the replicas' user_config, which their `reconfigure` applies after the constructor and on
# every change). Nothing else reads them, so they are left out of the versions.
SERVE_APPLIED = ("num_replicas", "autoscaling", "max_ongoing_requests", "max_queued_requests", "health_check_period_s",
                 "batching")  # (batching: the replicas' user_config, which their `reconfigure` applies)
SERVE_APPLIED_INGRESS = ("max_ongoing_requests", "health_check_period_s")  # (num_replicas: the ingress reads it)


def _replica_facing(entry: dict[str, Any], canary: bool = True) -> dict[str, Any]:
    """A model entry without what Serve alone applies (`SERVE_APPLIED`); its canary as the ingress
    reads it (the model and its weight: its replicas' count and CPUs are the canary deployment's
    own), or none for the model's own deployment (`canary=False`: only the ingress routes by it)."""
    out = {k: v for k, v in entry.items() if k not in SERVE_APPLIED and (canary or k != "canary")}
    if out.get("canary"):
        out["canary"] = {k: v for k, v in out["canary"].items() if k not in ("num_replicas", "num_cpus")}
    return out


def _ingress_facing(spec: dict[str, Any]) -> dict[str, Any]:
    """The deploy config as the ingress's version sees it: without what Serve alone applies."""
    return {**{k: v for k, v in spec.items() if k != "access_log"},
            "models": [_replica_facing(m) for m in spec["models"]],
            "ingress": {k: v for k, v in spec["ingress"].items() if k not in SERVE_APPLIED_INGRESS}}


def canary_key(name: str) -> str:
    """The key of a model's canary among the cards (`resolve`)."""
    return f"{name}@canary"


def _bind(options: dict[str, Any], name: str, card: dict, spec_options: dict,
          version: Callable[..., Optional[str]]) -> tuple[Any, dict[str, Any]]:
    """One model's deployment(s) bound (each with `version(its constructor's argument)`), and what
    the ingress needs to know of it."""
    from raylm import storage
    from raylm.serve.deployments import ClassifierDeployment, LMDeployment

    c = spec_options.get("compression") or {}
    # the measured quality change (card's `serving`) only where this entry compresses: the replica logs
    # it, and a measurement made for another entry of the same model must not change this one's version
    keep = ("id", "name", "version", "uri", "task") + (("serving",) if c.get("quantize", "none") != "none"
                                                       or c.get("prune", 0) else ())
    spec = {"name": name, "card": {k: card.get(k) for k in keep}, "options": spec_options}
    ensemble = None

    def built_from(s: dict[str, Any]) -> dict[str, Any]:  # what a replica's version digests
        return {**s, "options": _replica_facing(s["options"], canary=False)}

    if card.get("format") == "ensemble":  # one deployment per member; the ingress combines them
        ensemble = storage.read_json(storage.join(card["uri"], "ensemble.json"))
        members = [{**spec, "name": f"{name}-m{i}", "card": {
            "id": f"{card['id']}/m{i}", "name": f"{card['name']}-v{card['version']}-m{i}", "version": i,
            "uri": storage.join(card["uri"], "members", str(i)), "task": "classification"}}
            for i in range(len(ensemble["members"]))]
        handle = [_options(ClassifierDeployment, version(built_from(member)), **{**options, "name": f"{options['name']}-m{i}"})
                  .bind(member) for i, member in enumerate(members)]
    else:
        cls = LMDeployment if card["task"] == "causal_lm" else ClassifierDeployment
        handle = _options(cls, version(built_from(spec)), **options).bind(spec)
    labels = None
    if card["task"] == "classification":
        labels = card.get("labels") or (card.get("config") or {}).get("labels")
    return handle, {"task": card["task"], "registry_id": card["id"], "uri": card["uri"], "labels": labels,
                    "ensemble": ensemble, "chat": card.get("data_format") == "chat",
                    "created": int(dt.datetime.fromisoformat(card["created"]).timestamp())
                    if card.get("created") else None}


def build(cfg: DeployConfig, cards: Optional[dict[str, dict]] = None, versioned: bool = True):
    """The app; `versioned=False` leaves each deployment's version to Ray (a random one: every
    redeploy replaces every replica), the baseline of `benchmarks/serve_bench.py --experiments redeploy`."""
    if cards is None:
        cfg, cards = resolve(cfg)
    version = serve_version if versioned else (lambda *built_from: None)
    handles, meta = {}, {}
    for m in cfg.models:
        card = cards[m.name]
        options: dict[str, Any] = {
            "name": f"model-{m.name}", "max_ongoing_requests": m.max_ongoing_requests,
            "max_queued_requests": m.max_queued_requests, "health_check_period_s": m.health_check_period_s,
            "ray_actor_options": {"num_cpus": m.num_cpus, "num_gpus": m.num_gpus},
            "logging_config": {"enable_access_log": cfg.access_log},
            "user_config": {"batching": m.batching.model_dump(mode="json")},
        }
        if m.autoscaling:
            a = m.autoscaling
            options["autoscaling_config"] = {
                "min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                "initial_replicas": a.initial_replicas if a.initial_replicas is not None else a.min_replicas,
                "target_ongoing_requests": a.target_ongoing_requests, "upscale_delay_s": a.upscale_delay_s,
                "downscale_delay_s": a.downscale_delay_s, "look_back_period_s": a.look_back_period_s}
        else:
            options["num_replicas"] = m.num_replicas
        handles[m.name], meta[m.name] = _bind(options, m.name, card, m.model_dump(mode="json"), version)
        if m.canary:
            c, c_options = m.canary, {**options, "name": f"model-{m.name}-canary"}
            spec_options = m.model_dump(mode="json")
            if c.num_replicas is not None:  # its own fixed count instead of the entry's count or autoscaling
                c_options.pop("autoscaling_config", None)
                c_options["num_replicas"] = c.num_replicas
            if c.num_cpus is not None:
                c_options["ray_actor_options"] = {**options["ray_actor_options"], "num_cpus": c.num_cpus}
                spec_options["num_cpus"] = c.num_cpus  # (its torch threads)
            handles[canary_key(m.name)], c_meta = _bind(c_options, f"{m.name}-canary", cards[canary_key(m.name)],
                                                        spec_options, version)
            meta[m.name]["canary"] = {**c_meta, "weight": m.canary.weight}
    shared = None
    if cfg.ingress.num_replicas > 1:  # feedback may reach another replica than the one that answered
        size = RECENT_RESPONSES * cfg.ingress.num_replicas
        shared = _options(SharedResponses, version(size), name="shared-responses",
                          logging_config={"enable_access_log": cfg.access_log}).bind(size)
    spec = cfg.model_dump(mode="json")
    return _options(Ingress, version(_ingress_facing(spec), meta, sorted(handles), shared is not None), name="ingress",
                    num_replicas=cfg.ingress.num_replicas, max_ongoing_requests=cfg.ingress.max_ongoing_requests,
                    health_check_period_s=cfg.ingress.health_check_period_s,
                    ray_actor_options={"num_cpus": cfg.ingress.num_cpus},
                    logging_config={"enable_access_log": cfg.access_log}).bind(spec, meta, handles, shared)
