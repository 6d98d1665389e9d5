"""Export: a consolidated full state dict -> one Hugging Face directory (config, safetensors,
tokenizer) that `AutoModelForCausalLM.from_pretrained` loads offline -> the model registry."""

from __future__ import annotations

import tempfile
from typing import Any

import torch

from raylm import registry, storage
from raylm.train import models
from raylm.train.config import TrainConfig


def save_hf_dir(cfg: TrainConfig, meta: dict[str, Any], state_dict: dict[str, torch.Tensor], out_dir: str) -> None:
    model = models.build(cfg.model.model_copy(update={"activation_checkpointing": False}),
                         meta["vocab_size"], meta["seq_len"], meta["eos_id"], meta.get("pad_id"))
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and "lm_head" not in k]
    if missing or unexpected:
        raise RuntimeError(f"export: state dict does not match the model (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]})")
    model.config.use_cache = True
    model.save_pretrained(out_dir, safe_serialization=True)
    storage.download_dir(meta["tokenizer_uri"], out_dir)


def export_and_register(cfg: TrainConfig, meta: dict[str, Any], state_dict: dict[str, torch.Tensor],
                        state: dict[str, Any], last: dict[str, Any], n_params: int) -> dict[str, Any]:
    card = {
        "task": cfg.model.task,
        "base": cfg.model.path or f"{cfg.model.arch}-{cfg.model.preset} (random init)",
        "dataset": meta["dataset_id"],
        "strategy": cfg.train.strategy + (f"-zero{cfg.train.deepspeed.stage}" if cfg.train.strategy == "deepspeed"
                                          else ""),
        "parameters_non_embedding": n_params,
        "metrics": {k: v for k, v in {
            "train_loss": last.get("loss"), "val_loss": last.get("val_loss"), "val_ppl": last.get("val_ppl"),
            "best_val_loss": state.get("best_val_loss"), "steps": state["step"], "tokens": state["tokens"],
        }.items() if v is not None},
        "config": cfg.model_dump(mode="json"),
        "run": cfg.name,
    }
    with tempfile.TemporaryDirectory() as d:
        save_hf_dir(cfg, meta, state_dict, d)
        return registry.register(d, cfg.name, card, root=cfg.output.registry)
