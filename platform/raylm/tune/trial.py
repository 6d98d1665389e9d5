"""One trial of a search (or one ensemble member): a train config plus a choice of rows.

The dataset version is read and tokenized once, in the driver, into pyarrow tables in the
object store; every trial picks its rows from them (all, one cross-validation fold, a
bootstrap sample, or a weighted resample for boosting) and trains:

- in its own process when it has one worker with `ddp` (no worker group to start: a Ray
  Train run costs ~20 s of start-up on a laptop, a trial here a few seconds);
- as a Ray Train run inside the trial otherwise (Train inside Tune, the Ray 2.5x way: the trial
  function builds a TorchTrainer and calls `fit()`; Train's reports reach Tune through
  `TuneReportCallback`).
"""

from __future__ import annotations

import atexit
import copy
import os
import threading
import time
import weakref
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from raylm import config


def set_path(data: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """`data` with `a.b.c` set to `value` (sections created as needed)."""
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return data


def train_dict(base: dict[str, Any], params: dict[str, Any], **fixed: Any) -> dict[str, Any]:
    """The base train config with a trial's values (dotted keys) and `fixed` dotted keys set."""
    out = copy.deepcopy(base)
    for k, v in {**params, **fixed}.items():
        set_path(out, k, v.item() if isinstance(v, np.generic) else v)
    return out


def select_rows(tables: dict[str, pa.Table], rows: Optional[dict[str, Any]], shuffle_seed: Optional[int]
                ) -> dict[str, pa.Table]:
    """A trial's train / validation tables.

    rows: None (all), {"fold": i, "folds": k, "seed": s} (validate on fold i of the train split,
    train on the rest), {"bootstrap": s} (n rows drawn with replacement), {"weights": [...]} with
    "seed" (n rows drawn with these probabilities: boosting by resampling).
    shuffle_seed: shuffle both (seeded) unless None."""
    train = tables["train"]
    out = dict(tables)
    n = train.num_rows
    if rows and "fold" in rows:
        perm = np.random.default_rng(rows.get("seed", 0)).permutation(n)
        parts = np.array_split(perm, rows["folds"])
        out["validation"] = train.take(np.sort(parts[rows["fold"]]))
        out["train"] = train.take(np.sort(np.concatenate([p for i, p in enumerate(parts) if i != rows["fold"]])))
    elif rows and "bootstrap" in rows:
        out["train"] = train.take(np.random.default_rng(rows["bootstrap"]).integers(0, n, n))
    elif rows and "weights" in rows:
        w = np.asarray(rows["weights"], dtype=np.float64)
        out["train"] = train.take(np.random.default_rng(rows.get("seed", 0)).choice(n, n, p=w / w.sum()))
    if shuffle_seed is not None:
        rng = np.random.default_rng(shuffle_seed)
        out = {k: t.take(rng.permutation(t.num_rows)) for k, t in out.items()}
    return out


def runs_in_process(train_cfg) -> bool:
    t = train_cfg.train
    return t.num_workers == 1 and t.strategy == "ddp"


def resources(train_cfg) -> dict[str, float]:
    """What one trial asks Tune for: a process's CPUs (and GPU), or nothing to speak of when a
    Ray Train run inside it asks for its workers' resources itself (one byte of memory: Tune
    refuses an empty request, and a fraction of a CPU would keep 2 one-CPU workers off 2 CPUs)."""
    t = train_cfg.train
    if not runs_in_process(train_cfg):
        return {"memory": 1}
    return t.worker_resource_request()


_TRIAL_THREADS: "weakref.WeakSet[threading.Thread]" = weakref.WeakSet()
EXIT_WAIT_S = 10.0


@atexit.register  # imported after Ray, so it runs before Ray's own atexit shutdown
def _join_trial_threads(timeout_s: float = EXIT_WAIT_S) -> None:
    """atexit: wait (at most `timeout_s` in all) for the leaving trial threads of this process."""
    deadline = time.monotonic() + timeout_s
    for thread in list(_TRIAL_THREADS):
        thread.join(max(0.0, deadline - time.monotonic()))


def finish_before_exit() -> None:
    """Make this process wait for the calling thread (a trial's, on its way out) before it finalizes.

    Tune runs a function trial in a daemon thread and stops it (an early stop by ASHA, a trial
    at the scheduler's last step) by raising SystemExit at its next report, then ends the actor
    without waiting for the thread. If the process starts finalizing while that thread still
    frees the trial's tensors (the exception's frames hold them until Ray's thread wrapper drops
    it), CPython ends the thread inside torch's C++ destructor and the whole process aborts
    (SIGABRT, ~55 lines of stack in the job log; seen in the demo's tune stage). atexit handlers
    run before the interpreter starts finalizing, so joining the thread there lets it finish
    first; at most EXIT_WAIT_S, and only threads that are leaving (see run_trial) are joined."""
    _TRIAL_THREADS.add(threading.current_thread())


def run_trial(config_: dict[str, Any], *, base: dict[str, Any], meta: dict[str, Any], tables: dict[str, Any],
              name: str, registry: str, runs: str) -> None:
    """The Tune trainable (a function): train one configuration on its rows. `config_` holds
    `params` (dotted train fields) and `rows` (see select_rows), at the top level (a search) or
    under `member` (an ensemble member)."""
    try:
        _train(config_, base=base, meta=meta, tables=tables, name=name, registry=registry, runs=runs)
    except BaseException:  # Tune's stop (SystemExit) or an error: the frames it holds are freed after this
        finish_before_exit()
        raise


def _train(config_: dict[str, Any], *, base: dict[str, Any], meta: dict[str, Any], tables: dict[str, Any],
           name: str, registry: str, runs: str) -> None:
    import ray
    import torch
    from ray import tune

    from raylm.train.config import TrainConfig
    from raylm.train.loop import train_loop
    from raylm.train.reference import has_reference_logps, reference_mode
    from raylm.train.session import LocalSession

    trial_id = tune.get_context().get_trial_id()
    run_name = f"{name[:40]}-{trial_id}"
    fixed = {"name": run_name, "output.registry": registry, "output.storage": runs, "output.register_model": True}
    spec = config_.get("member") or config_
    cfg = config.build(TrainConfig, train_dict(base, spec.get("params") or {}, **fixed), f"trial {trial_id}")
    tables = {k: ray.get(v) if isinstance(v, ray.ObjectRef) else v for k, v in tables.items()}
    tables = select_rows(tables, spec.get("rows"), cfg.train.seed if cfg.train.shuffle else None)
    meta = dict(meta, has_validation="validation" in tables and tables["validation"].num_rows > 0)
    label = f"trial {trial_id}"  # on the loop's lines: trials run side by side in one job's log
    loop_config = {"train_config": cfg.model_dump(mode="json"), "dataset": meta, "log_label": label}
    if runs_in_process(cfg):
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
        device = torch.device("cuda") if cfg.train.use_gpu else torch.device("cpu")
        if cfg.preference is not None and reference_mode(cfg) == "precomputed" and not has_reference_logps(tables):
            from raylm.train.reference import reference_tables  # (its own reference: the search varies model.path)

            tables = reference_tables(cfg.model_dump(mode="json"), meta, tables)
        train_loop(loop_config, LocalSession(tables, device))
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    from raylm.train.job import build_trainer

    build_trainer(cfg, meta, tables={k: t for k, t in tables.items() if t.num_rows},
                  callbacks=[TuneReportCallback()], log_label=label).fit()


def describe(config_: dict[str, Any]) -> str:
    """A trial's config in one short line: its params by their dotted train keys, then its rows
    choice (a list, such as boosting's weights, by its length only)."""
    def flat(d: dict[str, Any], prefix: str = ""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    parts = []
    for key, v in flat(config_):
        key = key.removeprefix("member.").removeprefix("params.")
        shown = f"[{len(v)} values]" if isinstance(v, (list, tuple)) else f"{v:.4g}" if isinstance(v, float) else v
        parts.append(f"{key}={shown}")
    return " ".join(parts) or "defaults"


def fit(tuner: Any, prefix: str, where: str) -> Any:
    """`tuner.fit()` with Tune's own output off: at verbose=0 Tune's default output engine still
    prints a 9-line box per Tuner (search algorithm, scheduler and sample count, which the job's
    first line gives, where results go, and a TensorBoard hint); its legacy engine prints
    nothing at verbose=0, and `trial_log` says what happens. Says where the results go."""
    print(f"[{prefix}] trial results and checkpoints under {where}", flush=True)
    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # read by Tune in fit(), in this process only
    try:
        return tuner.fit()
    finally:
        if before is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = before


def trial_log(prefix: str, metric: Optional[str] = None, mode: str = "max", max_steps: Optional[int] = None,
              best: bool = True):
    """A Tune callback that prints one line as each trial starts and one as it ends (its step,
    seconds, metric and, for a search (`best`), the best so far), in place of Tune's own output
    (run with verbose=0): Tune's trial boxes and status tables were 234 of the demo's 492 log
    lines."""
    from ray.tune import Callback

    class TrialLog(Callback):
        def __init__(self):
            self.ended = 0
            self.best: Optional[tuple[float, str]] = None

        def on_trial_start(self, iteration, trials, trial, **info):
            print(f"[{prefix}] trial {trial.trial_id} started: {describe(trial.config)}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.ended += 1
            r = trial.last_result or {}
            step = r.get("step")
            line = f"[{prefix}] trial {trial.trial_id} ended"
            if step is not None:
                line += f" at step {step}" + (f" of {max_steps}" if max_steps else "")
            if r.get("time_total_s") is not None:
                line += f" after {r['time_total_s']:.0f} s"
            value = r.get(metric) if metric else None
            if isinstance(value, (int, float)):
                line += f": {metric} {value:.4f}"
            if isinstance(value, (int, float)) and best:
                better = self.best is None or (value > self.best[0] if mode == "max" else value < self.best[0])
                if better:
                    self.best = (float(value), trial.trial_id)
                line += f" (best so far {self.best[0]:.4f}, trial {self.best[1]})"
            print(f"{line}; {self.ended} trial(s) ended", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.ended += 1
            error = str(trial.get_error() or "").strip().splitlines()
            print(f"[{prefix}] trial {trial.trial_id} FAILED: {error[-1][:300] if error else 'see its error file'} "
                  f"({trial.error_file or 'no error file'}); {self.ended} trial(s) ended", flush=True)

    return TrialLog()
