"""The models behind the endpoints, free of Ray: load a registry model, generate, score,
classify, compress. Serve deployments (`deployments.py`) wrap these; benchmarks call them
directly as the in-process baseline.

Generation is Hugging Face `generate` with its KV cache over a left-padded batch. Each row
keeps its own sampling parameters: a logits processor draws the row's next token (its own
temperature, top_p and seed) and hands `generate` a one-hot choice, so the greedy step
picks exactly that token; a stopping criterion does each row's bookkeeping (EOS, max_tokens,
stop strings, incremental detokenization) and reports per-row events once per step.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from raylm.chat import template_of  # the deploy config's, else the tokenizer's, else raylm's default


class RequestError(ValueError):
    """A request the model cannot take (too long, bad parameter): the client gets a 400."""


def pick_device(num_gpus: float) -> torch.device:
    return torch.device("cuda") if num_gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def compress(model: torch.nn.Module, quantize: str = "none", prune: float = 0.0) -> dict[str, Any]:
    """Magnitude pruning (global L1 over every Linear but the output head), then int8 dynamic
    quantization of Linear layers (CPU). Returns what was done."""
    done: dict[str, Any] = {}
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if prune > 0:
        from torch.nn.utils import prune as tprune

        params = [(m, "weight") for n, m in linears if not n.endswith(("lm_head", "classifier", "score"))]
        tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=prune)
        for m, name in params:
            tprune.remove(m, name)
        total = sum(m.weight.numel() for m, _ in params)
        zeros = sum(int((m.weight == 0).sum()) for m, _ in params)
        done["prune"] = {"amount": prune, "linear_weights": total, "zero_fraction": round(zeros / max(total, 1), 4)}
    if quantize == "int8":
        if next(model.parameters()).device.type != "cpu":
            raise ValueError("int8 dynamic quantization is for CPU serving: set num_gpus: 0 for this model")
        import warnings

        from torch.ao.quantization import quantize_dynamic

        # torch marks torch.ao.quantization deprecated in favour of torchao, but on CPU torchao's
        # int8 (Int8DynamicActivationInt8WeightConfig, 0.18, eager) generated 5x slower than this
        # and 1.9x slower than fp32 (125M Llama, 32 tokens: 2.57 s vs 0.51 s, fp32 1.37 s; 2026-12-07)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
            warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel")
            model = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        done["quantize"] = {"dtype": "qint8", "layers": len(linears)}
    return {"model": model, **done}


def load(auto_cls: Any, model_dir: str | Path, num_gpus: float, dtype: str, quantize: str, prune: float):
    """(device, tokenizer, model in eval mode and compressed, what compression did) from a
    local Hugging Face directory, offline."""
    from transformers import AutoTokenizer

    device = pick_device(num_gpus)
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    if (Path(model_dir) / "adapter_config.json").exists():
        # a LoRA adapter (train job, model.lora.export=adapter): load it on its base and merge,
        # so serving runs a plain model at full speed
        from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification

        peft_cls = AutoPeftModelForCausalLM if "CausalLM" in auto_cls.__name__ else AutoPeftModelForSequenceClassification
        model = peft_cls.from_pretrained(str(model_dir), local_files_only=True,
                                         dtype=pick_dtype(dtype, device)).merge_and_unload()
    else:
        model = auto_cls.from_pretrained(str(model_dir), local_files_only=True, dtype=pick_dtype(dtype, device))
    out = compress(model.to(device).eval(), quantize, prune)
    return device, tok, out.pop("model"), out


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: Optional[int] = None
    logprobs: Optional[int] = None  # top alternatives per generated token (0 = only the chosen one)


@dataclass
class _Row:
    req: GenRequest
    generator: Optional[torch.Generator]
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the decoded text already emitted
    done: bool = False
    pending: Optional[tuple[int, float, Optional[dict]]] = None  # (token, logprob, top) of this step


class LMEngine:
    def __init__(self, model_dir: str | Path, *, num_gpus: float = 0.0, dtype: str = "auto", quantize: str = "none",
                 prune: float = 0.0, chat_template: Optional[str] = None, max_prompt_tokens: Optional[int] = None):
        from transformers import AutoModelForCausalLM

        self.device, self.tok, self.model, self.compression = load(AutoModelForCausalLM, model_dir, num_gpus, dtype,
                                                                   quantize, prune)
        self.tok.padding_side = "left"
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.context = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.max_prompt_tokens = min(max_prompt_tokens or self.context, self.context)
        self.eos_id = self.tok.eos_token_id
        self.chat_template = template_of(chat_template, getattr(self.tok, "chat_template", None))

    # --- inputs ----------------------------------------------------------------------------

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return self.tok.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                            add_generation_prompt=True)

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            bad = [t for t in prompt if not (isinstance(t, int) and 0 <= t < len(self.tok))]
            if bad:
                raise RequestError(f"prompt token ids must be in [0, {len(self.tok)}); got {bad[:3]}")
            return list(prompt)
        return self.tok.encode(prompt, add_special_tokens=False)

    def check(self, req: GenRequest) -> None:
        n = len(req.prompt_ids)
        if n > self.max_prompt_tokens:
            raise RequestError(f"the prompt has {n} tokens; this model takes at most {self.max_prompt_tokens}")
        if n + req.max_tokens > self.context:
            raise RequestError(f"prompt ({n} tokens) + max_tokens ({req.max_tokens}) exceeds the model's context "
                               f"of {self.context} tokens")

    # --- generation ----------------------------------------------------------------------

    def generate(self, reqs: list[GenRequest], emit: Callable[[dict[int, dict]], None]) -> None:
        """Generate for a batch of checked requests. Blocking (run it in a thread): calls
        `emit({row: event})` once per decoding step for the rows still going, each event
        `{"text", "tokens", "logprobs", "finish_reason"}` (text is the new, safe-to-show part)."""
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        rows = []
        for r in reqs:
            g = None
            if r.temperature > 0:
                g = torch.Generator(device=self.device)
                g.manual_seed(r.seed if r.seed is not None else random.getrandbits(63))
            rows.append(_Row(r, g))
        if not any(r.req.prompt_ids for r in rows):
            raise RequestError("empty prompt")
        width = max(len(r.req.prompt_ids) for r in rows)
        pad = self.tok.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            p = r.req.prompt_ids or [self.eos_id]
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        gen_cfg = GenerationConfig(max_new_tokens=max(r.req.max_tokens for r in rows), do_sample=False,
                                   pad_token_id=pad, eos_token_id=None, use_cache=True)
        with torch.inference_mode():
            self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                generation_config=gen_cfg,
                                logits_processor=LogitsProcessorList([_Sampler(rows, self.device)]),
                                stopping_criteria=StoppingCriteriaList([_Bookkeeper(self, rows, emit)]))
        leftover = {i: self._finish(r, "length") for i, r in enumerate(rows) if not r.done}
        if leftover:
            emit(leftover)

    def _step(self, row: _Row) -> dict:
        token, logprob, top = row.pending
        row.pending = None
        if token == self.eos_id:
            return self._finish(row, "stop")
        prev = row.tokens[-1] if row.tokens else (row.req.prompt_ids[-1] if row.req.prompt_ids else None)
        row.tokens.append(token)
        if top is not None:
            top = {self.token_text(t, prev): round(lp, 6) for t, lp in top.items()}
        ev_extra = {"tokens": [token], "token_texts": [self.token_text(token, prev)], "logprobs": [logprob],
                    "top_logprobs": [top]}
        text = self.text_after(row.req.prompt_ids, row.tokens)
        for s in row.req.stop:
            at = text.find(s, max(0, row.sent - len(s)))
            if s and at >= 0:
                return self._finish(row, "stop", text[:at], ev_extra)
        if len(row.tokens) >= row.req.max_tokens:
            return self._finish(row, "length", text, ev_extra)
        hold = 1 if text.endswith("\ufffd") else 0  # an incomplete UTF-8 sequence: wait for the rest
        for s in row.req.stop:  # a tail that may become a stop string is not shown yet
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        end = max(row.sent, len(text) - hold)
        delta, row.sent = text[row.sent:end], end
        return {"text": delta, "finish_reason": None, **ev_extra}

    def _finish(self, row: _Row, reason: str, text: Optional[str] = None, extra: Optional[dict] = None) -> dict:
        if text is None:
            text = self.text_after(row.req.prompt_ids, row.tokens)
        row.done = True
        delta = text[row.sent:]
        row.sent = len(text)
        return {"text": delta, "finish_reason": reason,
                **(extra or {"tokens": [], "token_texts": [], "logprobs": [], "top_logprobs": []})}

    # --- scoring (echo / logprobs) --------------------------------------------------------

    def score(self, prompts: list[list[int]], top: int = 0) -> list[dict[str, list]]:
        """Log-probability of each prompt token given the ones before it (the first has none),
        with the `top` most likely alternatives at each position."""
        out = []
        with torch.inference_mode():
            for ids in prompts:
                x = torch.tensor([ids], device=self.device)
                logp = torch.log_softmax(self.model(input_ids=x).logits[0].float(), dim=-1)
                chosen = logp[:-1].gather(1, x[0, 1:, None])[:, 0].tolist()
                tops: list[Optional[dict]] = [None]
                if top > 0:
                    v, i = logp[:-1].topk(top, dim=-1)
                    tops += [{self.token_text(t, prev): round(float(p), 6) for t, p in zip(ti.tolist(), vi.tolist())}
                             for prev, ti, vi in zip(ids, i, v)]
                else:
                    tops += [None] * (len(ids) - 1)
                out.append({"tokens": list(ids), "logprobs": [None] + chosen, "top_logprobs": tops})
        return out

    # --- text ------------------------------------------------------------------------------
    # Decoding tokens on their own loses what the first one means after the text before it:
    # WordPiece and SentencePiece tokenizers (BERT; Llama, Mistral, T5) drop the space before a
    # text's first word, so "the king and" went on as "lady lady" instead of " lady lady", and
    # logprobs' token strings and text offsets lost their spaces. So text is decoded after the
    # last few tokens before it, and that context's own text is cut off. Byte-level BPE (GPT-2's,
    # the data job's) keeps its spaces in the tokens and gives the same text either way.

    CONTEXT_TOKENS = 4

    def text_after(self, context: list[int], tokens: list[int], skip_special: bool = True) -> str:
        """The text `tokens` add after `context` (token ids before them, e.g. the prompt)."""
        tail = list(context[-self.CONTEXT_TOKENS:])
        if tail:
            before = self.tok.decode(tail, skip_special_tokens=skip_special)
            whole = self.tok.decode(tail + list(tokens), skip_special_tokens=skip_special)
            if whole.startswith(before):
                return whole[len(before):]
        return self.tok.decode(tokens, skip_special_tokens=skip_special)

    def token_text(self, token: int, prev: Optional[int] = None) -> str:
        """One token's text after the token before it (None: at the start of a text)."""
        return self.text_after([] if prev is None else [prev], [token], skip_special=False)

    def token_texts(self, tokens: list[int]) -> list[str]:
        """Each token's text after the one before it: they join into the text of all of them."""
        return [self.token_text(t, tokens[k - 1] if k else None) for k, t in enumerate(tokens)]


class _Sampler:
    """Logits processor: draws every live row's next token with its own temperature, top_p and
    seed in one batched step (Gumbel-max: argmax(logits / T - log(E)), E ~ Exp(1) drawn from
    the row's own generator), records the chosen token's log-probability, and returns a
    one-hot choice so that `generate`'s greedy step takes exactly that token."""

    def __init__(self, rows: list[_Row], device: torch.device):
        self.rows = rows
        self.temps = torch.tensor([r.req.temperature for r in rows], device=device, dtype=torch.float32)
        self.top_p = torch.tensor([r.req.top_p if r.req.top_p < 1 else 2.0 for r in rows], device=device,
                                  dtype=torch.float32)  # 2.0: never drop (rounding can push the sum to 1)
        self.sampled = [i for i, r in enumerate(rows) if r.req.temperature > 0]
        self.any_top_p = any(r.req.top_p < 1.0 and r.req.temperature > 0 for r in rows)
        self.top_rows = [i for i, r in enumerate(rows) if r.req.logprobs]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float()
        logp = torch.log_softmax(logits, dim=-1)
        choice = logits.argmax(dim=-1)
        if self.sampled:
            x = logits / self.temps.clamp_min(1e-6)[:, None]
            if self.any_top_p:  # keep the smallest set of tokens whose probability reaches top_p
                sp, si = torch.softmax(x, dim=-1).sort(dim=-1, descending=True)
                drop_sorted = (sp.cumsum(dim=-1) - sp) >= self.top_p[:, None]
                drop = torch.zeros_like(drop_sorted).scatter(1, si, drop_sorted)
                x = x.masked_fill(drop, -math.inf)
            noise = torch.empty_like(x)
            for i in self.sampled:
                noise[i].exponential_(generator=self.rows[i].generator)
            drawn = (x - noise.log()).argmax(dim=-1)
            idx = torch.tensor(self.sampled, device=logits.device)
            choice[idx] = drawn[idx]
        chosen_lp = logp.gather(1, choice[:, None])[:, 0]
        tokens, lps = choice.tolist(), chosen_lp.tolist()  # the one host sync of the step
        tops: dict[int, dict] = {}
        for i in self.top_rows:
            v, ix = logp[i].topk(self.rows[i].req.logprobs)
            tops[i] = dict(zip(ix.tolist(), v.tolist()))
        for i, row in enumerate(self.rows):
            if not row.done:
                row.pending = (tokens[i], lps[i], tops.get(i))
        out = torch.full_like(scores, -math.inf)
        out.scatter_(1, choice[:, None], 0.0)
        return out


class _Bookkeeper:
    """Stopping criterion: per-row EOS / max_tokens / stop strings, and the step's events."""

    def __init__(self, engine: LMEngine, rows: list[_Row], emit: Callable[[dict[int, dict]], None]):
        self.engine, self.rows, self.emit = engine, rows, emit

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        events = {i: self.engine._step(r) for i, r in enumerate(self.rows) if not r.done and r.pending}
        if events:
            self.emit(events)
        return torch.tensor([r.done for r in self.rows], device=input_ids.device)


def trained_model_config(model_dir: str | Path) -> dict[str, Any]:
    """The `model` section of the training config in a model's card (`{}` when it has none)."""
    import json

    from raylm.registry import CARD

    p = Path(model_dir) / CARD
    if not p.is_file():
        return {}
    try:
        m = (json.loads(p.read_text()).get("config") or {}).get("model") or {}
    except (ValueError, AttributeError):
        return {}
    return m if isinstance(m, dict) else {}


def trained_max_length(model_dir: str | Path) -> Optional[int]:
    """The tokens per text a classifier was trained on (`model.max_length` in its model card), so
    that it is served as it was trained and evaluated. raylm's exports also set it as the
    tokenizer's `model_max_length`; this reads it for models exported before they did."""
    n = trained_model_config(model_dir).get("max_length")
    return int(n) if isinstance(n, int) and n > 0 else None


def pool_windows(per_window: torch.Tensor, row: torch.Tensor, tokens: torch.Tensor, n: int) -> torch.Tensor:
    """(n, C) class probabilities of n texts from their windows' (W, C) probabilities: window w
    belongs to text `row[w]` and weighs by the `tokens[w]` it read (a text's short last window
    counts for its few tokens). How a model trained with `model.long_texts: windows` reads a text
    wherever it is scored: serving, evaluation, ensembles, the run's validation, calibration."""
    tokens = tokens.to(per_window.dtype)
    total = torch.zeros(n, per_window.shape[-1], dtype=per_window.dtype, device=per_window.device)
    total.index_add_(0, row, per_window * tokens.unsqueeze(-1))
    weight = torch.zeros(n, dtype=per_window.dtype, device=per_window.device).index_add_(0, row, tokens)
    return total / weight.clamp(min=1).unsqueeze(-1)


class ClassifierEngine:
    """A sequence classifier. A text longer than the model reads is cut at `max_len` tokens, or,
    for a model trained with `model.long_texts: windows` (its card says), read whole: cut into
    consecutive windows of `max_len` tokens (at most `max_windows`), each scored, the class
    probabilities averaged per text, each window weighted by its tokens."""

    WINDOWS_PER_CALL = 64  # windows in one forward pass (a batch of long texts is split)

    def __init__(self, model_dir: str | Path, *, num_gpus: float = 0.0, dtype: str = "auto", quantize: str = "none",
                 prune: float = 0.0):
        from transformers import AutoModelForSequenceClassification

        self.device, self.tok, self.model, self.compression = load(AutoModelForSequenceClassification, model_dir,
                                                                   num_gpus, dtype, quantize, prune)
        n = self.model.config.num_labels
        id2label = self.model.config.id2label or {}
        self.labels = [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(n)]
        self.max_len = min(int(self.tok.model_max_length or 512),
                           int(getattr(self.model.config, "max_position_embeddings", 512)),
                           trained_max_length(model_dir) or 1 << 30)
        trained = trained_model_config(model_dir)
        self.max_windows = int(trained.get("max_windows") or 8) if trained.get("long_texts") == "windows" else 1
        if self.max_windows > 1 and not self.tok.is_fast:
            raise ValueError(f"{model_dir}: long_texts=windows needs a fast (Rust) tokenizer; this one is "
                             f"{type(self.tok).__name__}")

    @property
    def long_texts(self) -> str:
        return "windows" if self.max_windows > 1 else "truncate"

    def _forward(self, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.inference_mode():
            logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits.float()
        return torch.softmax(logits, -1).cpu()

    def probabilities(self, texts: list[str], max_length: Optional[int] = None) -> torch.Tensor:
        """(N, labels) class probabilities on the CPU; texts cut at `max_length` tokens (default:
        `max_len`, the length the model was trained on, else the most it takes), or read in
        windows of that length (see the class)."""
        length = max_length or self.max_len
        if self.max_windows == 1:
            return self._forward(self.tok(texts, padding=True, truncation=True, max_length=length,
                                          return_tensors="pt"))
        # the tokenizer's own overflow: every window a full input ([CLS] ... [SEP]), mapped to its text
        enc = self.tok(texts, truncation=True, max_length=length, return_overflowing_tokens=True)
        owner = enc["overflow_to_sample_mapping"]
        keep, seen = [], [0] * len(texts)
        for j, i in enumerate(owner):
            if seen[i] < self.max_windows:
                keep.append(j)
                seen[i] += 1
        names = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        probs = []
        for start in range(0, len(keep), self.WINDOWS_PER_CALL):
            part = {k: [enc[k][j] for j in keep[start:start + self.WINDOWS_PER_CALL]] for k in names}
            probs.append(self._forward(self.tok.pad(part, return_tensors="pt")))
        per_window = torch.cat(probs) if probs else torch.zeros(0, len(self.labels))
        index = torch.tensor([owner[j] for j in keep], dtype=torch.long)
        tokens = torch.tensor([float(sum(enc["attention_mask"][j])) for j in keep])
        return pool_windows(per_window, index, tokens, len(texts))

    def classify(self, texts: list[str]) -> list[dict[str, Any]]:
        out = []
        for p in self.probabilities(texts).tolist():
            best = max(range(len(p)), key=p.__getitem__)
            out.append({"label": self.labels[best], "probabilities": dict(zip(self.labels, p))})
        return out
