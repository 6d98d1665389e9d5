"""Batch inference with Ray Data: `map_batches` on an actor pool of model replicas (each loads
the registry model once; GPUs per replica from config), or in the job's own process for small
CPU evaluations (`compute.local_max_docs`), and the perturbations for the robustness runs (the
data job's augmentation ops, seeded per document)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch


def _load_lm(model_dir: str, num_gpus: float):
    from transformers import AutoModelForCausalLM

    from raylm.serve import engine  # one loader for serving and evaluation (adapters, devices)

    device, tok, model, _ = engine.load(AutoModelForCausalLM, model_dir, num_gpus, "float32", "none", 0.0)
    return device, tok, model


class ClassifierScorer:
    """text -> `probs` (class probabilities, the model's label order): the serving engine's
    classifier, with texts cut where the model was trained to cut them."""

    def __init__(self, model_dir: str, max_length: int, num_gpus: float = 0):
        from raylm.serve.engine import ClassifierEngine
        from raylm.tune.ensemble import EnsembleClassifier, read_spec

        if read_spec(model_dir) is not None:  # an ensemble: its members, combined
            self.engine = EnsembleClassifier(model_dir, num_gpus=num_gpus)
        else:
            self.engine = ClassifierEngine(model_dir, num_gpus=num_gpus, dtype="float32")
        self.max_length = max_length

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = [t or "" for t in batch.column("text").to_pylist()]
        probs = self.engine.probabilities(texts, self.max_length).numpy().astype(np.float64)
        return batch.append_column("probs", pa.array(list(probs), pa.list_(pa.float64())))


class LMScorer:
    """text -> per-document sums: `nll` (nats), `tokens` predicted, `correct` next-token
    guesses, `bytes` (UTF-8 bytes of the predicted text, for bits per byte). Each document is
    tokenized with the model's tokenizer, cut to `max_tokens`, and scored in non-overlapping
    windows of `window` tokens (the first token of a window is context only)."""

    def __init__(self, model_dir: str, window: int, max_tokens: int, num_gpus: float = 0, windows_per_call: int = 8):
        self.device, self.tok, self.model = _load_lm(model_dir, num_gpus)
        self.window, self.max_tokens, self.per_call = window, max_tokens, windows_per_call

    @torch.no_grad()
    def _score(self, windows: list[list[int]]) -> list[tuple[float, int, int]]:
        out = []
        for i in range(0, len(windows), self.per_call):
            chunk = windows[i:i + self.per_call]
            width = max(len(w) for w in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for j, w in enumerate(chunk):
                ids[j, :len(w)] = torch.tensor(w)
                mask[j, :len(w)] = 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits.float()
            logp = torch.log_softmax(logits[:, :-1], -1)
            target = ids[:, 1:].to(self.device)
            valid = mask[:, 1:].to(self.device).bool()
            nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            hit = logp.argmax(-1) == target
            for j in range(len(chunk)):
                v = valid[j]
                out.append((float(nll[j][v].sum()), int(v.sum()), int(hit[j][v].sum())))
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        docs, windows = [], []
        for text in batch.column("text").to_pylist():
            ids = self.tok(text or "", add_special_tokens=False)["input_ids"][: self.max_tokens]
            mine = [ids[k:k + self.window] for k in range(0, len(ids), self.window)]
            mine = [w for w in mine if len(w) >= 2]
            docs.append((len(windows), len(mine), mine))
            windows.extend(mine)
        scores = self._score(windows) if windows else []
        cols: dict[str, list] = {"nll": [], "tokens": [], "correct": [], "bytes": []}
        for start, n, mine in docs:
            part = scores[start:start + n]
            cols["nll"].append(sum(s[0] for s in part))
            cols["tokens"].append(sum(s[1] for s in part))
            cols["correct"].append(sum(s[2] for s in part))
            cols["bytes"].append(sum(len(self.tok.decode(w[1:]).encode("utf-8")) for w in mine))
        for name, values in cols.items():
            batch = batch.append_column(name, pa.array(values, pa.float64() if name == "nll" else pa.int64()))
        return batch


def perturb_batch(batch: pa.Table, op: str, strength: float, seed: int) -> pa.Table:
    """The text with one augmentation op applied at `strength`, seeded per document id."""
    from raylm.data.augment import perturb, rng_for

    texts = [perturb(t or "", op, strength, rng_for(f"{i}|{op}|{strength}", seed))
             for i, t in zip(batch.column("id").to_pylist(), batch.column("text").to_pylist())]
    return batch.set_column(batch.schema.get_field_index("text"), "text", pa.array(texts, pa.string()))


_LOCAL: dict[tuple, Any] = {}  # scorers loaded in this process: (class, kwargs) -> scorer


def _local_scorer(cls: type, kwargs: dict[str, Any]) -> Any:
    """One loaded model per (scorer, arguments) in this process, shared by every pass (the
    plain pass and each robustness pass); the two most recent are kept."""
    key = (cls.__name__, tuple(sorted(kwargs.items())))
    if key not in _LOCAL:
        if len(_LOCAL) >= 2:
            _LOCAL.pop(next(iter(_LOCAL)))
        _LOCAL[key] = cls(**kwargs)
    return _LOCAL[key]


def run_inference(ds, task: str, model_dir: str, max_length: int, cfg: Any, local: bool = False) -> Any:
    """The documents with the scorer's columns added (something with `.to_pandas()`): through
    an actor pool of replicas, or, for a small evaluation (`local`), in this process with the
    same scorer: no replica start-up (seconds each) for a few hundred documents."""
    from ray.data import ActorPoolStrategy

    c = cfg.compute
    if task == "classification":
        cls, kwargs = ClassifierScorer, {"model_dir": model_dir, "max_length": max_length, "num_gpus": c.num_gpus}
    else:
        cls, kwargs = LMScorer, {"model_dir": model_dir, "window": max_length, "max_tokens": cfg.max_tokens_per_doc,
                                 "num_gpus": c.num_gpus}
    if local:
        scorer = _local_scorer(cls, kwargs)
        tables = [scorer(b) for b in ds.iter_batches(batch_size=c.batch_size, batch_format="pyarrow")]
        if tables:
            return pa.concat_tables(tables)
    return ds.map_batches(cls, fn_constructor_kwargs=kwargs, batch_size=c.batch_size, batch_format="pyarrow",
                          compute=ActorPoolStrategy(size=c.actors), num_cpus=c.num_cpus,
                          num_gpus=c.num_gpus or None)
