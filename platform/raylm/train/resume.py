"""Whether a training run starts, resumes, is refused or has nothing left to train: the run's
identity (its config less what never changes what it trains), the decision against the record
its directory keeps (`reruns`), and what a finished run hands back from its final checkpoint."""

from __future__ import annotations

from typing import Any, Optional

from raylm import reruns, storage
from raylm.cluster import home
from raylm.train.config import TrainConfig


def default_runs() -> str:
    return str(home() / "runs")


# Fields that never change what a run trains (where it runs, how often it saves and logs).
OPERATIONAL = ("train.max_failures", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
               "train.ingest", "train.cpus_per_worker", "train.worker_resources", "train.worker_env",
               "train.steady_warmup_steps", "train.resume", "data.root", "output.", "tracking.",
               "preference.reference_logps")  # (where the reference's log-probabilities come from, not what they are)
# Fields a user may change to go on with a run (`train.resume: auto`): more steps, another
# learning rate, another evaluation cadence or early stopping. Anything else is another run.
CONTINUABLE = ("train.max_steps", "train.lr", "train.eval_every", "train.eval_batches", "train.early_stopping_")


def run_identity(cfg: TrainConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """The run's config as dotted keys (`reruns.identity`), the dataset as the version it resolved to."""
    flat = reruns.identity(cfg.model_dump(mode="json"), OPERATIONAL)
    flat.pop("data.mixture", None)
    flat["data.dataset"] = meta["dataset_id"]  # (a mixture's: each version and its weight)
    return flat


def run_storage(cfg: TrainConfig) -> str:
    return cfg.output.storage or default_runs()


def start_or_resume(cfg: TrainConfig, meta: dict[str, Any]) -> bool:
    """Before anything starts: whether a run with checkpoints resumes (`train.resume`,
    `reruns.decide`); a restart removes the run's directory. Returns whether it starts over."""
    from raylm.train.session import _STEP_DIR

    run_uri = storage.join(run_storage(cfg), cfg.name)
    steps = [int(m.group(1)) for m in map(_STEP_DIR.match, storage.listdir(run_uri)) if m]  # its checkpoints
    now = run_identity(cfg, meta)
    below = ((f"train.max_steps {cfg.train.max_steps} is below the run's last checkpoint (step {max(steps)})",)
             if steps and cfg.train.max_steps < max(steps) else ())
    restart = reruns.decide("train", cfg.name, run_uri, now, cfg.train.resume, bool(steps), CONTINUABLE, below,
                            setting="train.resume")
    if restart:
        storage.remove(run_uri)
    elif steps and max(steps) >= cfg.train.max_steps:
        print(f"[train] {cfg.name}: the run already reached train.max_steps ({cfg.train.max_steps}): nothing to "
              "train; the job hands back the model it registered (a larger max_steps trains on, "
              "train.resume=restart starts over)", flush=True)
    reruns.record(run_uri, now)
    return restart


def finished(cfg: TrainConfig) -> Optional[dict[str, Any]]:
    """What a run that already reached `train.max_steps` hands back, read from storage: its latest
    checkpoint is its final one (`step-N-final`, written after the export, N >= max_steps), whose
    client state holds the step, the last metrics and the registered model. None when the run has
    training left, or its final checkpoint cannot say (then Ray Train runs, and the loop decides)."""
    from raylm.train.session import _STEP_DIR, CLIENT_STATE

    run_uri = storage.join(run_storage(cfg), cfg.name)
    saved = sorted((int(m.group(1)), bool(m.group(2)), n) for n in storage.listdir(run_uri) if (m := _STEP_DIR.match(n)))
    if not saved or not saved[-1][1] or saved[-1][0] < cfg.train.max_steps:
        return None
    path = storage.join(run_uri, saved[-1][2])
    try:
        state = storage.read_json(storage.join(path, CLIENT_STATE))
    except (FileNotFoundError, OSError, ValueError):
        return None
    if not isinstance(state, dict) or (cfg.output.register_model and not state.get("registered")):
        return None
    metrics = {k: v for k, v in (state.get("last") or {}).items() if v is not None}
    return {"run": cfg.name, "model": state.get("registered") or None,
            "metrics": {**metrics, "model": state.get("registered") or "", "step": state.get("step")}, "checkpoint": path}
