"""The training loop each Ray Train worker runs: one readable function with explicit setup.

Data comes from the dataset version: each worker its slice of the tables the driver read
(small datasets) or its `ray.train.get_dataset_shard` stream. Metrics go to Ray (`ray.train.report`) and Prometheus (`raylm_train_*`);
the same loop also runs in one plain process (a one-worker Tune trial: `session.LocalSession`);
checkpoints every `checkpoint_every` steps hold model, optimizer, schedule, step and data
position, so a re-run of the same run name (or a restart after a failure) continues there.
At the end every rank helps consolidate the model; rank 0 writes one Hugging Face directory
and registers it.
"""

from __future__ import annotations

import contextlib
import math
import resource
import tempfile
import time
from typing import Any, Callable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as dist

from raylm.train.config import TrainConfig
from raylm.train import losses, models, reference, strategies


COLUMNS = {"causal_lm": ("input_ids",), "classification": ("input_ids", "attention_mask", "labels")}


def _flat(col: pa.Array) -> np.ndarray:
    return pc.list_flatten(col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col).to_numpy(
        zero_copy_only=False).astype(np.int64)


def host_batch(batch: pa.Table, task: str, pin: bool, draw: Optional[np.random.Generator] = None,
                all_windows: bool = False) -> dict[str, torch.Tensor]:
    """A pyarrow batch of a dataset version -> the model's keyword arguments, as training reads
    it (its validation, and the deploy job's measurement of what compression costs, read the same):
    packed token blocks (the labels are the inputs: the model
    shifts them; -100, which its loss ignores, where a conversation's `loss_mask` is 0), or
    tokenized texts with their attention mask and label ids.
    Texts read in windows (`window_ids` in the rows: `model.long_texts: windows`): with `draw`,
    each text gives one of its windows, drawn with its share of the text's tokens (every part of
    a long text is trained on over the epochs); with `all_windows`, every window, with
    `window_row` (the row each belongs to) and `window_tokens` (its tokens, its weight in the
    text's mean: as the serving engine reads the text)."""
    if task == "classification" and "window_ids" in batch.column_names and (draw is not None or all_windows):
        return _window_batch(batch, pin, draw)
    out = {}
    for name in COLUMNS[task]:
        col = batch.column(name).combine_chunks()
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            t = torch.from_numpy(_flat(col).reshape(len(col), -1))
        else:
            t = torch.from_numpy(col.to_numpy(zero_copy_only=False).astype(np.int64))
        out[name] = t.pin_memory() if pin else t
    if task == "causal_lm":
        if "rejected_ids" in batch.column_names:  # preference pairs: the chosen sides, then the rejected ones
            return _pair_batch(batch, pin)
        out["labels"] = out["input_ids"]
        if "loss_mask" in batch.column_names:  # conversations: only the answers' tokens are trained on
            mask = torch.from_numpy(_flat(batch.column("loss_mask")).reshape(batch.num_rows, -1))
            labels = out["input_ids"].masked_fill(mask == 0, -100)  # ignored by the model's loss
            out["labels"] = labels.pin_memory() if pin else labels
        if "position_ids" in batch.column_names:  # packed conversations: each attends within itself only
            positions = torch.from_numpy(_flat(batch.column("position_ids")).reshape(batch.num_rows, -1))
            out["position_ids"] = positions.pin_memory() if pin else positions
    return out


def _pair_batch(batch: pa.Table, pin: bool) -> dict[str, torch.Tensor]:
    """Preference pairs -> one batch of 2n rows: the n chosen conversations, then the n rejected
    ones, labels -100 but on each side's last answer (`losses.Preference` splits them again). Rated
    answers (KTO) the same way: the n rated conversations, then their prompts with mismatched answers,
    and `desirable` (n booleans)."""
    n = batch.num_rows
    ids = np.concatenate([_flat(batch.column(c)).reshape(n, -1) for c in ("input_ids", "rejected_ids")])
    mask = np.concatenate([_flat(batch.column(c)).reshape(n, -1) for c in ("loss_mask", "rejected_mask")])
    out = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(np.where(mask == 0, -100, ids))}
    if all(c in batch.column_names for c in reference.REF_COLUMNS):  # the reference's, precomputed
        out["ref_logps"] = torch.from_numpy(np.concatenate(
            [batch.column(c).to_numpy().astype(np.float32) for c in reference.REF_COLUMNS]))
    if "desirable" in batch.column_names:  # rated answers (KTO): the second block is the KL side, no answer of its own
        out["desirable"] = torch.from_numpy(batch.column("desirable").to_numpy().astype(np.bool_))
    return {k: v.pin_memory() for k, v in out.items()} if pin else out


def _window_batch(batch: pa.Table, pin: bool, draw: Optional[np.random.Generator]) -> dict[str, torch.Tensor]:
    width = len(batch.column("input_ids")[0])
    ids = _flat(batch.column("window_ids")).reshape(-1, width)
    mask = _flat(batch.column("window_mask")).reshape(-1, width)
    per_row = (pc.list_value_length(batch.column("window_ids").combine_chunks()).to_numpy() // width).astype(np.int64)
    row = np.repeat(np.arange(batch.num_rows), per_row)
    tokens = mask.sum(1)
    labels = batch.column("labels").to_numpy().astype(np.int64)
    if draw is not None:  # one window a text, by its share of the text's tokens
        start = np.concatenate([[0], np.cumsum(per_row)[:-1]])
        cum = np.cumsum(tokens)
        before = np.where(start > 0, cum[start - 1], 0)
        target = before + draw.random(batch.num_rows) * (cum[start + per_row - 1] - before)
        pick = np.minimum(np.searchsorted(cum, target, side="right"), start + per_row - 1)
        out = {"input_ids": ids[pick], "attention_mask": mask[pick], "labels": labels}
    else:
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels[row], "window_row": row,
               "window_tokens": tokens, "text_labels": labels}
    out = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}
    return {k: v.pin_memory() for k, v in out.items()} if pin else out


def steady_warmup(wanted: int, steps: int) -> int:
    """The first steps the steady-state figures leave out: `wanted`, at most a quarter of the run."""
    return max(1, min(wanted, steps // 4))


def cpu_now() -> tuple[float, float, Optional[int]]:
    """CPU seconds (user + system) so far, this whole process's and this thread's alone, and this
    thread's minor page faults (None where the OS does not count them per thread: macOS)."""
    faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt if hasattr(resource, "RUSAGE_THREAD") else None
    return time.process_time(), time.thread_time(), faults


def cpu_per_step(since: tuple[float, float, Optional[int]], steps: int) -> dict[str, float]:
    """Per step since `since` (`cpu_now()`): CPU seconds of the process (the loop, the collectives'
    threads and, in a Ray Train worker, Ray's own threads) and of the loop's thread alone, and the
    loop thread's minor page faults. Set beside the steady tokens/s, they tell work from waiting:
    a slower run that spends no more CPU a step waited (for another rank, the data, other processes
    on its cores); faults are the memory the allocator gave back to the OS and took again."""
    process, thread, faults = cpu_now()
    out = {"steady_cpu_s_per_step": (process - since[0]) / steps,
           "steady_thread_cpu_s_per_step": (thread - since[1]) / steps}
    if faults is not None:
        out["steady_thread_page_faults_per_step"] = (faults - since[2]) / steps
    return out


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_batches(shard, batch_size: int, task: str, device: torch.device, skip: int,
                  seed: tuple[int, ...] = (0,)) -> Iterator[dict]:
    """Micro-batches on `device`, forever (epoch after epoch), skipping the first `skip`
    (resume). On a GPU each batch is pinned and its copy issued one step ahead, so fetching
    the next batch overlaps the current step instead of stalling the GPU. `seed` (with the
    micro-batch's number) draws the windows of texts read in windows: a resumed run draws what
    the uninterrupted one would have."""
    pin = device.type == "cuda"
    pending: list[tuple[dict, dict]] = []  # (host tensors kept alive, device copies)
    for host in _host_batches(shard, batch_size, task, pin, skip, seed):
        pending.append((host, _to_device(host, device)))
        if len(pending) == 2:
            yield pending.pop(0)[1]


def _host_batches(shard, batch_size: int, task: str, pin: bool, skip: int, seed: tuple[int, ...]) -> Iterator[dict]:
    number = 0
    while True:
        seen = 0
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="pyarrow", drop_last=True):
            seen += 1
            number += 1
            if skip > 0:
                skip -= 1
                continue
            draw = np.random.default_rng([*seed, number]) if "window_ids" in batch.column_names else None
            yield host_batch(batch, task, pin, draw=draw)
        if seen == 0:
            raise ValueError(f"this worker's train shard has fewer than train.batch_size={batch_size} rows: "
                             "lower batch_size or num_workers, or use more data")


def _all_mean(values: list[float], device: torch.device) -> float:
    return _all_mean_any(values, False, device)[0]


def _all_mean_any(values: list[float], flag: bool, device: torch.device) -> tuple[float, bool]:
    """The mean of every rank's values, and whether any rank's flag is set (one all-reduce)."""
    t = torch.tensor([sum(values), len(values), float(flag)], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return (float(t[0] / t[1]) if t[1] > 0 else float("nan")), bool(t[2] > 0)


def classification_metrics(confusion: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro F1 from a confusion matrix (rows: true labels)."""
    total = confusion.sum()
    tp = np.diag(confusion).astype(np.float64)
    support, predicted = confusion.sum(1), confusion.sum(0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=precision + recall > 0)
    present = support > 0
    return {"val_accuracy": float(tp.sum() / total) if total else float("nan"),
            "val_balanced_accuracy": float(recall[present].mean()) if present.any() else float("nan"),
            "val_macro_f1": float(f1[present].mean()) if present.any() else float("nan")}


def evaluate(strat, shard, batch_size: int, max_batches: int, task: str, num_labels: int,
             device: torch.device, keep: Optional[list] = None, preference=None) -> dict[str, float]:
    """Validation loss (and perplexity, or classification metrics) over `max_batches` batches of
    every rank's shard. keep: a list that gets each batch's logits, labels (per text) and, for
    texts read in windows, the windows' rows and tokens (what calibration fits on).
    preference (`losses.Preference`): the DPO loss, reward accuracy and margin instead."""
    if shard is None:
        return {}
    losses = []
    pref: dict[str, list[float]] = {}
    confusion = torch.zeros(num_labels, num_labels, dtype=torch.float64, device=device)
    for i, batch in enumerate(shard.iter_batches(batch_size=batch_size, batch_format="pyarrow", drop_last=False)):
        if i >= max_batches:
            break
        host = host_batch(batch, task, pin=False, all_windows=True)
        windows = {k: host.pop(k) for k in ("window_row", "window_tokens", "text_labels") if k in host}
        aside = {k: host.pop(k).to(device) for k in ("ref_logps", "desirable") if k in host}  # (not model inputs)
        b = _to_device(host, device)
        loss, logits = strat.evaluate(b)
        if preference is not None:
            for k, v in preference.stats(logits, {**b, **aside}).items():
                pref.setdefault(k, []).append(float(v))
            continue
        strat_logits, labels = logits, b.get("labels")
        if windows:  # a text read in windows: its windows' probabilities, weighted by their tokens
            logits, labels = _text_log_probs(logits, windows, device), windows["text_labels"].to(device)
            loss = torch.nn.functional.nll_loss(logits, labels)
        losses.append(float(loss))
        if keep is not None and task == "classification":  # labels: the texts' (windows: one a text)
            keep.append({"logits": strat_logits.float().cpu(), "labels": labels.cpu(),
                         **{k: v for k, v in windows.items() if k != "text_labels"}})
        if task == "classification":
            idx = labels * num_labels + logits.argmax(-1)
            confusion += torch.bincount(idx, minlength=num_labels ** 2).view(num_labels, num_labels).to(confusion)
    if preference is not None:
        means = {k: _all_mean(pref.get(k, []), device) for k in ("val_loss", "val_reward_accuracy", "val_reward_margin")}
        return {} if math.isnan(means["val_loss"]) else means
    loss = _all_mean(losses, device)
    if math.isnan(loss):
        return {}
    if task == "classification":
        if dist.is_initialized():
            dist.all_reduce(confusion)
        return {"val_loss": loss, **classification_metrics(confusion.cpu().numpy())}
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50))}


def _text_log_probs(logits: torch.Tensor, windows: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """Per text, the log of its windows' class probabilities pooled as serving pools them."""
    from raylm.serve.engine import pool_windows

    probs = pool_windows(torch.softmax(logits.float(), -1), windows["window_row"].to(device),
                         windows["window_tokens"].to(device), len(windows["text_labels"]))
    return torch.log(probs.clamp(min=1e-12))


@torch.no_grad()
def probe(strat, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of the model as trained (a collective for sharded strategies: every rank calls)."""
    strat.model.eval()
    logits = strat.model(**batch).logits.float().cpu()
    strat.model.train()
    return logits


def probe_batch(task: str, meta: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """A fixed input to compare the exported model with the trained one."""
    n = min(32, meta["seq_len"])
    ids = (torch.arange(n, device=device) * 7919 % meta["vocab_size"]).unsqueeze(0)
    if task == "classification":
        ids[0, 0] = meta["cls_id"]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {"input_ids": ids}


def set_base_lr(strat, lr: float) -> None:
    """Make the LR schedule peak at `lr` from the current step on (a checkpoint restores the
    schedule with the lr it was saved with)."""
    sched = strat.sched
    if all(abs(b - lr) <= 1e-12 * max(1.0, lr) for b in sched.base_lrs):
        return
    sched.base_lrs = [lr] * len(sched.base_lrs)
    for group, fn in zip(sched.optimizer.param_groups, sched.lr_lambdas):
        group["lr"] = lr * fn(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]


class Metrics:
    """Prometheus gauges through ray.util.metrics (exported by Ray, prefix raylm_train_)."""

    def __init__(self, run: str):
        from ray.util.metrics import Counter, Gauge

        tags = ("run",)
        self.tags = {"run": run}
        self.g = {name: Gauge(f"raylm_train_{name}", description=desc, tag_keys=tags) for name, desc in {
            "loss": "training loss (mean over the last log interval)",
            "val_loss": "validation loss",
            "tokens_per_second": "training tokens per second, all workers (time in evaluation and checkpoints left out)",
            "samples_per_second": "training sequences per second, all workers",
            "mfu": "model FLOPs utilization estimate (0-1), GPU only",
            "learning_rate": "current learning rate",
            "step": "optimizer step",
        }.items()}
        self.tokens = Counter("raylm_train_tokens_total", description="tokens trained on", tag_keys=tags)

    def record(self, values: dict[str, float], new_tokens: int) -> None:
        for k, v in values.items():
            if k in self.g and v is not None and not (isinstance(v, float) and math.isnan(v)):
                self.g[k].set(float(v), tags=self.tags)
        if new_tokens:
            self.tokens.inc(new_tokens, tags=self.tags)


def _calibrate(val_outputs: list, rank: int, device: torch.device, tag: str = "[train] ") -> Optional[dict[str, Any]]:
    """`model.calibration: temperature`: T fitted on the last evaluation's outputs of every rank
    (a collective), or None (with a line saying why) when there were none."""
    from raylm.train import calibration

    if dist.is_initialized():  # every rank must join the gather, whatever it holds
        seen = torch.tensor([float(len(val_outputs))], device=device)  # (nccl reduces device tensors)
        dist.all_reduce(seen)
        empty = seen.item() == 0
    else:
        empty = not val_outputs
    if empty:
        if rank == 0:
            print(f"{tag}model.calibration: no validation outputs to fit a temperature on (no validation split, "
                  "or no evaluation in this job): exported uncalibrated", flush=True)
        return None
    data = calibration.gather(val_outputs)
    fit = calibration.fit_temperature(data["logits"], data["labels"], data.get("rows"), data.get("tokens"))
    if rank == 0:
        print(f"{tag}calibrated: temperature {fit['temperature']:.3f} on {fit['texts']} validation texts: "
              f"NLL {fit['val_nll'][0]:.4f} -> {fit['val_nll'][1]:.4f}, ECE {fit['val_ece'][0]:.4f} -> "
              f"{fit['val_ece'][1]:.4f}, accuracy {fit['val_accuracy'][0]:.4f} -> {fit['val_accuracy'][1]:.4f}",
              flush=True)
    return fit


class Window:
    """The training time since the last progress line: evaluation and checkpoints (run inside
    `pause()`) are left out, so tokens/s, samples/s and MFU are the training's own and do not dip
    after every checkpoint (a tiny model's window after one read ~10x low: ~1,100 against ~14,000)."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.start, self.paused = clock(), 0.0

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        t = self.clock()
        try:
            yield
        finally:
            self.paused += self.clock() - t

    def seconds(self) -> float:
        return max(self.clock() - self.start - self.paused, 1e-9)

    def reset(self) -> None:
        self.start, self.paused = self.clock(), 0.0


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def train_loop(config: dict[str, Any], session=None) -> None:
    """The loop. `session` (train/session.py) is where it runs: a Ray Train worker by default,
    or one local process (a one-worker Tune trial)."""
    from raylm.train.session import TrainSession

    cfg = TrainConfig.model_validate(config["train_config"])
    meta = config["dataset"]  # vocab, eos, seq_len, tokenizer location, dataset id
    t = cfg.train
    session = session or TrainSession(config.get("shards"), config.get("run_uri"))
    rank, world, device = session.rank, session.world, session.device
    # a search's or an ensemble's trials run side by side: their lines say which trial they are
    tag = f"[train] {config['log_label']}: " if config.get("log_label") else "[train] "
    torch.manual_seed(t.seed)  # identical initial weights on every rank
    np.random.seed(t.seed)
    seq_len = meta["seq_len"]

    task = cfg.model.task
    model = models.build(cfg.model, meta["vocab_size"], seq_len, meta["eos_id"], meta.get("pad_id"),
                         meta.get("labels"))
    n_params = models.num_params(model)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flops_tok = models.flops_per_token(model.config, n_params, seq_len)
    peak = models.peak_flops(device)
    loss_fn, teacher = losses.make_loss(cfg, meta, device, model)  # (preference: the reference copies the model)
    preference = loss_fn if isinstance(loss_fn, losses.Preference) else None
    strat = strategies.setup(model, t, device, loss_fn)
    if rank == 0 and (n_trainable < models.num_params(model, exclude_embeddings=False) or teacher):
        print(f"{tag}trainable parameters: {n_trainable:,}" + (f"; distilling from {teacher}" if teacher
                                                                 else ""), flush=True)
    higher_is_better = t.early_stopping_metric != "val_loss"
    calibrate = cfg.model.calibration == "temperature" and meta.get("has_validation")
    val_outputs: list = []

    state: dict[str, Any] = {"step": 0, "micro_batches": 0, "tokens": 0, "best_val_loss": None, "best": None,
                             "evals_without_improvement": 0, "registered": None, "resumed_from_step": None,
                             "loss_curve": []}
    with session.resume_dir() as d:
        if d:
            state.update(strat.load(d))
            set_base_lr(strat, t.lr)  # a resumed run (or a PBT exploit) may come with another lr
    if state["step"]:
        state["resumed_from_step"] = state["step"]
        if state["step"] < t.max_steps:
            state["registered"] = None  # more steps to train: the result is a new model version
        if rank == 0:
            print(f"{tag}resumed from the checkpoint at step {state['step']}", flush=True)

    metrics = Metrics(cfg.name) if rank == 0 else None
    train_shard = session.shard("train")
    val_shard = session.shard("validation") if meta.get("has_validation") else None
    batches = train_batches(train_shard, t.batch_size, task, device, skip=state["micro_batches"], seed=(t.seed, rank))
    tokens_per_step = t.batch_size * seq_len * t.grad_accum * world * (2 if preference else 1)  # (a pair: 2 rows)

    last_report_t = float("-inf")  # the first progress step always reports: trackers and Tune see it at once

    def checkpoint(extra: dict[str, Any], name: str) -> None:
        nonlocal last_report_t
        with tempfile.TemporaryDirectory() as d:
            strat.save(d, state)
            session.report({**extra, "step": state["step"]}, d, name)
        last_report_t = time.time()

    start_step, t0, window_loss, window = state["step"], time.time(), [], Window()
    last: dict[str, Any] = dict(state.get("last") or {})  # a run resumed at its end still reports them
    warm_steps = steady_warmup(t.steady_warmup_steps, t.max_steps - start_step)
    steady_t0 = None
    stop_early = False
    while state["step"] < t.max_steps and not stop_early:
        for micro in range(t.grad_accum):
            loss = strat.micro_step(next(batches), last=micro == t.grad_accum - 1)
            window_loss.append(loss)  # a device tensor: no host sync per step
            state["micro_batches"] += 1
        grad_norm = strat.optimizer_step()
        state["step"] += 1
        if state["step"] - start_step == warm_steps:  # steady-state throughput excludes warm-up steps
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            steady_t0, steady_cpu0 = time.time(), cpu_now()
        state["tokens"] += tokens_per_step
        step = state["step"]

        evaluated = {}
        if step % t.eval_every == 0 or step == t.max_steps:
            kept = [] if calibrate else None  # the latest evaluation's outputs: what calibration fits on
            with window.pause():
                evaluated = evaluate(strat, val_shard, t.batch_size, t.eval_batches, task,
                                     len(meta.get("labels") or []), device, keep=kept, preference=preference)
            if kept is not None:
                val_outputs = kept
            if evaluated:
                if state["best_val_loss"] is None or evaluated["val_loss"] < state["best_val_loss"]:
                    state["best_val_loss"] = evaluated["val_loss"]
                value, best = evaluated[t.early_stopping_metric], state["best"]
                delta = t.early_stopping_min_delta
                if best is None or (value > best + delta if higher_is_better else value < best - delta):
                    state["best"], state["evals_without_improvement"] = value, 0
                else:
                    state["evals_without_improvement"] += 1
                stop_early = bool(t.early_stopping_patience) and \
                    state["evals_without_improvement"] >= t.early_stopping_patience

        if step % t.log_every == 0 or evaluated or step == t.max_steps:
            steps_in_window = max(1, len(window_loss) // t.grad_accum)
            tok_s = steps_in_window * tokens_per_step / window.seconds()
            # Ray takes one metrics-only report per poll: the ranks agree (in the loss's all-reduce)
            # to send one when any of them has waited a poll interval since the last
            mean_loss, report_due = _all_mean_any(torch.stack(window_loss).float().tolist(),
                                             time.time() - last_report_t >= session.min_report_interval_s, device)
            last = {
                "loss": mean_loss,
                "learning_rate": strat.lr(), "grad_norm": grad_norm,
                "tokens_per_second": tok_s, "samples_per_second": tok_s / seq_len,
                "mfu": (tok_s / world * flops_tok / peak) if peak else None,
                "tokens": state["tokens"], **evaluated,
            }
            state["loss_curve"].append([step, round(last["loss"], 6)])
            if rank == 0:
                metrics.record({**last, "step": step}, new_tokens=steps_in_window * tokens_per_step)
                done = step - start_step
                eta = (time.time() - t0) / max(done, 1) * (t.max_steps - step)
                mfu = f" mfu {last['mfu']:.1%}" if last["mfu"] else ""
                val = ""
                if evaluated:
                    val = f" val_loss {evaluated['val_loss']:.4f}" + (
                        f" ppl {evaluated['val_ppl']:.1f}" if "val_ppl" in evaluated else
                        f" reward_acc {evaluated['val_reward_accuracy']:.3f} margin "
                        f"{evaluated['val_reward_margin']:.3f}" if "val_reward_accuracy" in evaluated else
                        f" acc {evaluated['val_accuracy']:.3f} macro_f1 {evaluated['val_macro_f1']:.3f}")
                print(f"{tag}step {step}/{t.max_steps} loss {last['loss']:.4f}{val} lr {last['learning_rate']:.2e} "
                      f"tok/s {tok_s:,.0f}{mfu} eta {_fmt_eta(eta)}", flush=True)
            window_loss = []
            window.reset()
            state["last"] = {k: v for k, v in last.items() if isinstance(v, (int, float))}
            if step % t.checkpoint_every != 0 and step != t.max_steps and (report_due or evaluated):
                session.report({k: v for k, v in last.items() if v is not None} | {"step": step})
                last_report_t = time.time()  # (the last step reports with the model; checkpoints always)

        if step % t.checkpoint_every == 0 and step != t.max_steps:  # the last step's checkpoint is the final one
            with window.pause():
                checkpoint({k: v for k, v in last.items() if v is not None}, f"step-{step:08d}")
            if rank == 0:
                print(f"{tag}checkpoint saved at step {step}", flush=True)

    if steady_t0 is not None and state["step"] - start_step > warm_steps:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        steady = (state["step"] - start_step - warm_steps) * tokens_per_step / (time.time() - steady_t0)
        last["steady_tokens_per_second"] = steady
        last.update(cpu_per_step(steady_cpu0, state["step"] - start_step - warm_steps))
        if peak:
            last["steady_mfu"] = steady / world * flops_tok / peak
    if device.type == "cuda":
        last["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    last["params_non_embedding"] = n_params
    last["params_trainable"] = n_trainable

    if stop_early and rank == 0:
        print(f"{tag}early stop at step {state['step']}: no better {t.early_stopping_metric} in "
              f"{t.early_stopping_patience} evaluations", flush=True)

    # Export: one consolidated Hugging Face directory, whatever the strategy.
    export = cfg.output.register_model and state["registered"] is None
    calibration = None
    if export and cfg.model.calibration == "temperature":
        calibration = _calibrate(val_outputs, rank, device, tag)
    if export:
        probe_in = probe_batch(task, meta, device)
        probe_logits = probe(strat, probe_in)  # the trained model's own answer, to check the export against
    full = strat.full_state_dict() if export else None  # a collective for fsdp / zero-3
    if rank == 0 and export:
        from raylm.train.export import export_and_register

        card = export_and_register(cfg, meta, full, state, last, n_params,
                                   {k: v.cpu() for k, v in probe_in.items()}, probe_logits, calibration)
        state["registered"] = card["id"]
        print(f"{tag}registered {card['id']} at {card['uri']}", flush=True)
    if dist.is_initialized():
        holder = [state["registered"]]
        dist.broadcast_object_list(holder, src=0)
        state["registered"] = holder[0]
    final = {k: v for k, v in last.items() if v is not None}
    checkpoint({**final, "model": state["registered"] or ""}, f"step-{state['step']:08d}-final")
