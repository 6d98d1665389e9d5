"""Models built from a config (random init, Llama- or GPT-2-style via transformers) or loaded
from a local Hugging Face directory, plus the numbers the metrics need (parameters, FLOPs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from raylm.train.config import ModelConfig

# Llama-style sizes (hidden, layers, heads, kv heads, intermediate).
LLAMA_PRESETS: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (64, 2, 4, 4, 172),
    "small": (256, 4, 8, 8, 688),
    "125m": (768, 12, 12, 12, 2048),
    "350m": (1024, 24, 16, 16, 2816),
    "500m": (1536, 16, 12, 4, 4096),
    "1b": (2048, 16, 32, 8, 5632),
}
# GPT-2-style sizes (n_embd, n_layer, n_head).
GPT2_PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (64, 2, 4),
    "small": (256, 4, 8),
    "125m": (768, 12, 12),
    "350m": (1024, 24, 16),
    "500m": (1280, 24, 20),
    "1b": (1600, 32, 25),
}


def hf_config(cfg: ModelConfig, vocab_size: int, seq_len: int, eos_id: int, pad_id: int | None):
    from transformers import GPT2Config, LlamaConfig

    if cfg.arch == "llama":
        h, n, heads, kv, inter = LLAMA_PRESETS[cfg.preset]
        conf = LlamaConfig(vocab_size=vocab_size, hidden_size=h, num_hidden_layers=n, num_attention_heads=heads,
                           num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=seq_len,
                           bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id,
                           tie_word_embeddings=False, rope_theta=10000.0)
    else:
        h, n, heads = GPT2_PRESETS[cfg.preset]
        conf = GPT2Config(vocab_size=vocab_size, n_embd=h, n_layer=n, n_head=heads, n_positions=seq_len,
                          bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    for key, value in cfg.overrides.items():
        if not hasattr(conf, key):
            raise ValueError(f"model.overrides: the {cfg.arch} config has no field {key!r}")
        setattr(conf, key, value)
    return conf


def pretrained_overrides(cfg: ModelConfig, path: str) -> dict:
    """`model.overrides` for a pretrained model: config fields it has (e.g. num_hidden_layers=2
    keeps the first 2 blocks of the pretrained weights)."""
    if not cfg.overrides:
        return {}
    from transformers import AutoConfig

    conf = AutoConfig.from_pretrained(str(Path(path).expanduser()), local_files_only=True)
    for key in cfg.overrides:
        if not hasattr(conf, key):
            raise ValueError(f"model.overrides: the {conf.model_type} config at {path} has no field {key!r}")
    return dict(cfg.overrides)


def build(cfg: ModelConfig, vocab_size: int, seq_len: int, eos_id: int, pad_id: int | None,
          labels: list[str] | None = None) -> torch.nn.Module:
    """The model on the CPU in fp32 (strategies move and cast it): a causal LM (from a config or
    `path`) or a sequence classifier on the pretrained encoder at `path` with a new head for
    `labels`; frozen parts and LoRA adapters as configured."""
    from transformers import AutoModelForCausalLM

    path = cfg.local_path()
    if cfg.task == "classification":
        if not labels:
            raise ValueError("classification needs the dataset's labels")
        model = pretrained_classifier(
            str(Path(path).expanduser()), local_files_only=True, dtype=torch.float32, num_labels=len(labels),
            id2label=dict(enumerate(labels)), label2id={k: i for i, k in enumerate(labels)},
            attn_implementation=cfg.attn_implementation, ignore_mismatched_sizes=True,
            **pretrained_overrides(cfg, path))
    elif path:
        model = AutoModelForCausalLM.from_pretrained(str(Path(path).expanduser()), local_files_only=True,
                                                     dtype=torch.float32,
                                                     attn_implementation=cfg.attn_implementation,
                                                     **pretrained_overrides(cfg, path))
    else:
        model = AutoModelForCausalLM.from_config(hf_config(cfg, vocab_size, seq_len, eos_id, pad_id),
                                                 dtype=torch.float32,
                                                 attn_implementation=cfg.attn_implementation)
    model.config.use_cache = False
    freeze(model, cfg)
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora:
        model = add_lora(model, cfg)
    if cfg.compile:
        for block in blocks(model):
            block.compile()  # in place: parameter names (checkpoints, export) stay the same
    return model


def pretrained_classifier(path: str, **kwargs: Any) -> torch.nn.Module:
    """AutoModelForSequenceClassification on a pretrained encoder. Its new head is missing from
    the encoder's checkpoint by design, and transformers logs a "LOAD REPORT" table about it
    (8 lines in every worker and trial); raylm drops that report and warns, in one line, only
    about encoder weights that were not loaded (missing or of another shape: left at random
    init). Checkpoint weights the model has no place for (a `model.overrides` with fewer
    layers) are left out without a word, as asked."""
    import logging

    from transformers import AutoModelForSequenceClassification

    # (modeling_utils runs a tensor-parallel check, which warns about every layer, when its
    # logger's level is WARNING or above: quiet that one too)
    quiet = [logging.getLogger(f"transformers.{m}") for m in ("modeling_utils", "distributed.tensor_parallel")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True, **kwargs)
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    encoder = f"{model.base_model_prefix}."
    off = {kind: sorted(k for k in (str(x[0] if isinstance(x, tuple) else x) for x in info.get(kind) or ())
                        if k.startswith(encoder))
           for kind in ("missing_keys", "mismatched_keys")}
    if any(off.values()):
        print(f"[train] warning: the encoder at {path} did not load as saved: "
              + "; ".join(f"{kind.replace('_', ' ')}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                          for kind, keys in off.items() if keys), flush=True)
    return model


def freeze(model: torch.nn.Module, cfg: ModelConfig) -> None:
    if cfg.freeze_embeddings:
        for p in _base(model).get_input_embeddings().parameters():
            p.requires_grad_(False)
        for name, module in _base(model).named_modules():  # BERT also has position / type embeddings
            if name.endswith("embeddings"):
                for p in module.parameters():
                    p.requires_grad_(False)
    if cfg.freeze_layers:
        layers = blocks(model)
        if cfg.freeze_layers > len(layers):
            raise ValueError(f"model.freeze_layers={cfg.freeze_layers} but the model has {len(layers)} blocks")
        for block in layers[:cfg.freeze_layers]:
            for p in block.parameters():
                p.requires_grad_(False)


def add_lora(model: torch.nn.Module, cfg: ModelConfig) -> torch.nn.Module:
    """LoRA adapters through peft; the classifier head stays fully trainable."""
    from peft import LoraConfig, TaskType, get_peft_model

    lcfg = cfg.lora
    targets = lcfg.target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    conf = LoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout, target_modules=targets,
                      task_type=TaskType.SEQ_CLS if cfg.task == "classification" else TaskType.CAUSAL_LM)
    if targets is None and getattr(model.config, "model_type", "") == "bert":
        conf.target_modules = ["query", "value"]  # peft has no default for BERT encoders
    try:
        return get_peft_model(model, conf)
    except ValueError as e:
        raise ValueError(f"model.lora: {e}") from None


def _base(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks (what FSDP shards one by one)."""
    model = _base(model)
    for attr in ("model", "transformer", "bert", "roberta", "distilbert"):
        base = getattr(model, attr, None)
        if base is None:
            continue
        holder = getattr(base, "encoder", None) or getattr(base, "transformer", None) or base
        for name in ("layers", "h", "layer"):
            layers = getattr(holder, name, None)
            if layers is not None:
                return list(layers)
    raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}")


def num_params(model: torch.nn.Module, exclude_embeddings: bool = True) -> int:
    n = sum(p.numel() for p in model.parameters())
    if exclude_embeddings:
        emb = model.get_input_embeddings()
        n -= emb.weight.numel() if emb is not None else 0
    return n


def flops_per_token(conf: Any, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the dense layers plus attention scores (PaLM appendix B)
    (an upper bound with frozen layers or LoRA, which skip some weight gradients)."""
    layers = getattr(conf, "num_hidden_layers", None) or conf.n_layer
    hidden = getattr(conf, "hidden_size", None) or conf.n_embd
    return 6.0 * n_params + 12.0 * layers * hidden * seq_len


# Dense bf16 peak FLOP/s by device name fragment (no sparsity).
PEAK_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L4": 121e12, "A10G": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)
