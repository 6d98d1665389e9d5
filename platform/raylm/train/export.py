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


def check_export(out_dir: str, probe_ids: torch.Tensor, probe_logits: torch.Tensor, precision: str) -> dict[str, Any]:
    """Load the exported directory the way a user would (transformers, offline) and compare its
    logits with the trained model's on the same input. A mismatch fails the export."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out_dir, local_files_only=True, torch_dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=probe_ids).logits.float()
    diff = float((logits - probe_logits).abs().max())
    tol = 1e-3 if precision == "fp32" else 0.25 * float(probe_logits.abs().max()) + 0.1
    if not diff <= tol:
        raise RuntimeError(f"export check failed: the exported model's logits differ from the trained model's "
                           f"by {diff:.3g} (tolerance {tol:.3g} for {precision})")
    return {"probe_input_ids": probe_ids[0].tolist(), "max_abs_diff": diff, "tolerance": tol,
            "last_position_logits_head": [round(float(x), 5) for x in probe_logits[0, -1, :16]],
            "logits_abs_sum": float(probe_logits.abs().sum())}


def export_and_register(cfg: TrainConfig, meta: dict[str, Any], state_dict: dict[str, torch.Tensor],
                        state: dict[str, Any], last: dict[str, Any], n_params: int,
                        probe_ids: torch.Tensor, probe_logits: torch.Tensor) -> dict[str, Any]:
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
            "resumed_from_step": state.get("resumed_from_step"),
        }.items() if v is not None},
        "loss_curve": state.get("loss_curve", []),
        "config": cfg.model_dump(mode="json"),
        "run": cfg.name,
    }
    with tempfile.TemporaryDirectory() as d:
        save_hf_dir(cfg, meta, state_dict, d)
        card["export_check"] = check_export(d, probe_ids, probe_logits, cfg.train.precision)
        return registry.register(d, cfg.name, card, root=cfg.output.registry)
