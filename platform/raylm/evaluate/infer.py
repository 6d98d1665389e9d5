"""Batch inference with Ray Data: `map_batches` on an actor pool of model replicas (each loads
the registry model once; GPUs per replica from config), or in the job's own process for small
CPU evaluations (`compute.local_max_docs`), and the perturbations for the robustness runs (the
data job's augmentation ops, seeded per document)."""

from __future__ import annotations

from typing import Any, Optional

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
    windows of `window` tokens (the first token of a window is context only).

    chat: the documents are conversations (a chat dataset): each is rendered with the model's chat
    template as the serving engine renders it (raylm.chat.encode) and only the answers' tokens are
    scored (what supervised fine-tuning trains); `scored` is False for a conversation the model's
    template cannot render."""

    def __init__(self, model_dir: str, window: int, max_tokens: int, num_gpus: float = 0, windows_per_call: int = 8,
                 chat: bool = False):
        self.device, self.tok, self.model = _load_lm(model_dir, num_gpus)
        self.window, self.max_tokens, self.per_call = window, max_tokens, windows_per_call
        self.render = None
        if chat:
            from raylm.chat import renderer, template_of

            template = template_of(None, getattr(self.tok, "chat_template", None))  # as LMEngine picks it
            self.render = renderer(template, dict(self.tok.special_tokens_map))

    def _encode(self, text: str) -> tuple[list[int], Optional[list[int]], bool]:
        """(ids, trained-token mask or None, could be scored), cut to max_tokens."""
        if self.render is None:
            return self.tok(text or "", add_special_tokens=False)["input_ids"][: self.max_tokens], None, True
        from raylm import chat

        try:
            ids, mask = chat.encode(chat.parse(text), self.render,
                                    lambda t: self.tok.encode(t, add_special_tokens=False))
        except chat.ConversationError:
            return [], [], False
        return ids[: self.max_tokens], mask[: self.max_tokens], True

    @torch.no_grad()
    def _score(self, windows: list[list[int]], targets: Optional[list[list[int]]] = None
               ) -> list[tuple[float, int, int]]:
        """targets: per window, 1 where the token is scored (default: every token after the first)."""
        out = []
        for i in range(0, len(windows), self.per_call):
            chunk = windows[i:i + self.per_call]
            width = max(len(w) for w in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            scored = torch.zeros(len(chunk), width, dtype=torch.bool)
            for j, w in enumerate(chunk):
                ids[j, :len(w)] = torch.tensor(w)
                mask[j, :len(w)] = 1
                scored[j, :len(w)] = True if targets is None else torch.tensor(targets[i + j], dtype=torch.bool)
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits.float()
            logp = torch.log_softmax(logits[:, :-1], -1)
            target = ids[:, 1:].to(self.device)
            valid = scored[:, 1:].to(self.device)
            nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            hit = logp.argmax(-1) == target
            for j in range(len(chunk)):
                v = valid[j]
                out.append((float(nll[j][v].sum()), int(v.sum()), int(hit[j][v].sum())))
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        docs, windows, targets, ok = [], [], [], []
        for text in batch.column("text").to_pylist():
            ids, mask, could = self._encode(text)
            ok.append(could)
            cuts = [k for k in range(0, len(ids), self.window) if len(ids[k:k + self.window]) >= 2]
            mine = [ids[k:k + self.window] for k in cuts]
            docs.append((len(windows), len(mine), mine, [mask[k:k + self.window] for k in cuts] if mask else None))
            windows.extend(mine)
            targets.extend(docs[-1][3] or [[1] * len(w) for w in mine])
        scores = self._score(windows, targets) if windows else []
        cols: dict[str, list] = {"nll": [], "tokens": [], "correct": [], "bytes": []}
        for start, n, mine, masks in docs:
            part = scores[start:start + n]
            cols["nll"].append(sum(s[0] for s in part))
            cols["tokens"].append(sum(s[1] for s in part))
            cols["correct"].append(sum(s[2] for s in part))
            predicted = [w[1:] for w in mine] if masks is None else \
                [[t for t, keep in zip(w[1:], m[1:]) if keep] for w, m in zip(mine, masks)]
            cols["bytes"].append(sum(len(self.tok.decode(p).encode("utf-8")) for p in predicted))
        for name, values in cols.items():
            batch = batch.append_column(name, pa.array(values, pa.float64() if name == "nll" else pa.int64()))
        if self.render is not None:
            batch = batch.append_column("scored", pa.array(ok, pa.bool_()))
        return batch


def perturb_batch(batch: pa.Table, op: str, strength: float, seed: int, chat: bool = False) -> pa.Table:
    """The text with one augmentation op applied at `strength`, seeded per document id. chat:
    the conversation's prompts (user and system messages) are perturbed, not its answers (what
    is scored) nor its role lines."""
    from raylm.data.augment import perturb, rng_for

    def noisy(doc_id: str, text: str) -> str:
        rng = rng_for(f"{doc_id}|{op}|{strength}", seed)
        if not chat:
            return perturb(text or "", op, strength, rng)
        from raylm import chat as conv

        try:
            messages = conv.parse(text)
        except conv.ConversationError:
            return text  # left as it is (the scorer says it could not score it)
        return conv.to_text([m if m["role"] == "assistant" else
                             {**m, "content": perturb(m["content"], op, strength, rng)} for m in messages])

    texts = [noisy(i, t) for i, t in zip(batch.column("id").to_pylist(), batch.column("text").to_pylist())]
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


def run_inference(ds, task: str, model_dir: str, max_length: int, cfg: Any, local: bool = False,
                  chat: bool = False) -> Any:
    """The documents with the scorer's columns added (something with `.to_pandas()`): through
    an actor pool of replicas, or, for a small evaluation (`local`), in this process with the
    same scorer: no replica start-up (seconds each) for a few hundred documents."""
    from ray.data import ActorPoolStrategy

    c = cfg.compute
    if task == "classification":
        cls, kwargs = ClassifierScorer, {"model_dir": model_dir, "max_length": max_length, "num_gpus": c.num_gpus}
    else:
        cls, kwargs = LMScorer, {"model_dir": model_dir, "window": max_length, "max_tokens": cfg.max_tokens_per_doc,
                                 "num_gpus": c.num_gpus, "chat": chat}
    if local:
        scorer = _local_scorer(cls, kwargs)
        tables = [scorer(b) for b in ds.iter_batches(batch_size=c.batch_size, batch_format="pyarrow")]
        if tables:
            return pa.concat_tables(tables)
    return ds.map_batches(cls, fn_constructor_kwargs=kwargs, batch_size=c.batch_size, batch_format="pyarrow",
                          compute=ActorPoolStrategy(size=c.actors), num_cpus=c.num_cpus,
                          num_gpus=c.num_gpus or None)
