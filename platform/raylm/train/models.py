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


def build(cfg: ModelConfig, vocab_size: int, seq_len: int, eos_id: int, pad_id: int | None) -> torch.nn.Module:
    """A causal LM on the CPU in fp32 (strategies move and cast it)."""
    from transformers import AutoModelForCausalLM

    if cfg.path:
        p = Path(cfg.path).expanduser()
        model = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True, torch_dtype=torch.float32,
                                                     attn_implementation=cfg.attn_implementation)
    else:
        model = AutoModelForCausalLM.from_config(hf_config(cfg, vocab_size, seq_len, eos_id, pad_id),
                                                 torch_dtype=torch.float32,
                                                 attn_implementation=cfg.attn_implementation)
    model.config.use_cache = False
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.compile:
        for block in blocks(model):
            block.compile()  # in place: parameter names (checkpoints, export) stay the same
    return model


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks (what FSDP shards one by one)."""
    base = getattr(model, "model", None) or getattr(model, "transformer", None)
    layers = getattr(base, "layers", None) or getattr(base, "h", None)
    if layers is None:
        raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}")
    return list(layers)


def num_params(model: torch.nn.Module, exclude_embeddings: bool = True) -> int:
    n = sum(p.numel() for p in model.parameters())
    if exclude_embeddings:
        emb = model.get_input_embeddings()
        n -= emb.weight.numel() if emb is not None else 0
    return n


def flops_per_token(conf: Any, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the dense layers plus attention scores (PaLM appendix B)."""
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
