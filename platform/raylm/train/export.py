"""Export: a consolidated full state dict -> one Hugging Face directory (config, safetensors,
tokenizer) that `AutoModelFor...from_pretrained` loads offline -> the model registry.

LoRA runs export either merged (a plain model directory, the default) or as the adapter alone
(`adapter_config.json` + `adapter_model.safetensors`, loaded with peft on top of `model.path`).
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import torch

from raylm import registry, storage
from raylm.train import models
from raylm.train.config import TrainConfig


def _auto(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification


@contextmanager
def _no_deepspeed_probe():
    """save_pretrained unwraps the model through accelerate, which imports deepspeed (when it is
    installed) only to ask whether the model is a DeepSpeedEngine: 1.8 s of CPU in every process
    that exports (each run's rank 0, each Tune trial, each ensemble member). A process that never
    imported deepspeed holds no DeepSpeedEngine, so there the answer is no without the import."""
    import sys

    try:
        import accelerate.utils.other as acc
    except ImportError:  # no accelerate: transformers unwraps by itself
        yield
        return
    if "deepspeed" in sys.modules or not hasattr(acc, "is_deepspeed_available"):
        yield
        return
    probe = acc.is_deepspeed_available
    acc.is_deepspeed_available = lambda: False
    try:
        yield
    finally:
        acc.is_deepspeed_available = probe


def save_hf_dir(cfg: TrainConfig, meta: dict[str, Any], state_dict: dict[str, torch.Tensor], out_dir: str,
                temperature: float = 1.0) -> str:
    """Writes the model and its tokenizer to `out_dir`; returns the export format. temperature:
    a classifier's head is divided by it (`model.calibration`: calibration.py)."""
    model = models.build(cfg.model.model_copy(update={"activation_checkpointing": False, "compile": False}),
                         meta["vocab_size"], meta["seq_len"], meta["eos_id"], meta.get("pad_id"), meta.get("labels"))
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = set(getattr(models._base(model), "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k.split("base_model.model.", 1)[-1] not in tied and "lm_head" not in k]
    if missing or unexpected:
        raise RuntimeError(f"export: state dict does not match the model (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]})")
    fmt = "full"
    if cfg.model.lora:
        if cfg.model.lora.export == "merged":
            model = model.merge_and_unload()
            fmt = "lora-merged"
        else:
            model.peft_config["default"].base_model_name_or_path = str(cfg.model.local_path())
            fmt = "lora-adapter"
    if temperature != 1.0:
        from raylm.train.calibration import scale_head

        scale_head(model, len(meta["labels"]), temperature)
    models._base(model).config.use_cache = True
    with _no_deepspeed_probe():
        model.save_pretrained(out_dir, safe_serialization=True)
    if cfg.model.task == "classification":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(cfg.model.local_path(), local_files_only=True)
        # texts are cut where training cut them, by anyone who loads the directory with truncation on
        tok.model_max_length = cfg.model.max_length
        tok.save_pretrained(out_dir)
    else:
        storage.download_dir(meta["tokenizer_uri"], out_dir)
    return fmt


def load_exported(path: str | Path, task: str, fmt: str = "full") -> torch.nn.Module:
    """The exported model, loaded the way a user would (transformers, offline; peft for adapters)."""
    if fmt == "lora-adapter":
        from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification

        auto = AutoPeftModelForCausalLM if task == "causal_lm" else AutoPeftModelForSequenceClassification
        return auto.from_pretrained(str(path), local_files_only=True, dtype=torch.float32).eval()
    return _auto(task).from_pretrained(str(path), local_files_only=True, dtype=torch.float32).eval()


def check_export(out_dir: str, task: str, fmt: str, probe: dict[str, torch.Tensor], probe_logits: torch.Tensor,
                 precision: str) -> dict[str, Any]:
    """Load the exported directory and compare its logits with the trained model's on the same
    input. A mismatch fails the export."""
    model = load_exported(out_dir, task, fmt)
    with torch.no_grad():
        logits = model(**probe).logits.float()
    diff = float((logits - probe_logits).abs().max())
    tol = 1e-3 if precision == "fp32" else 0.25 * float(probe_logits.abs().max()) + 0.1
    if not diff <= tol:
        raise RuntimeError(f"export check failed: the exported model's logits differ from the trained model's "
                           f"by {diff:.3g} (tolerance {tol:.3g} for {precision})")
    head = probe_logits[0, -1, :16] if probe_logits.dim() == 3 else probe_logits[0, :16]
    return {"probe_input_ids": probe["input_ids"][0].tolist(), "max_abs_diff": diff, "tolerance": tol,
            "last_position_logits_head": [round(float(x), 5) for x in head],
            "logits_abs_sum": float(probe_logits.abs().sum())}


def export_and_register(cfg: TrainConfig, meta: dict[str, Any], state_dict: dict[str, torch.Tensor],
                        state: dict[str, Any], last: dict[str, Any], n_params: int,
                        probe: dict[str, torch.Tensor], probe_logits: torch.Tensor,
                        calibration: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    task = cfg.model.task
    temperature = calibration["temperature"] if calibration else 1.0
    metric_keys = ("loss", "val_loss", "val_ppl", "val_accuracy", "val_balanced_accuracy", "val_macro_f1",
                   "val_reward_accuracy", "val_reward_margin")
    card = {
        "task": task,
        "base": cfg.model.path or f"{cfg.model.arch}-{cfg.model.preset} (random init)",
        "dataset": meta["dataset_id"],
        "strategy": cfg.train.strategy + (f"-zero{cfg.train.deepspeed.stage}" if cfg.train.strategy == "deepspeed"
                                          else ""),
        "parameters_non_embedding": n_params,
        "parameters_trainable": last.get("params_trainable"),
        "metrics": {k: v for k, v in {
            **{("train_loss" if k == "loss" else k): last.get(k) for k in metric_keys},
            "best_val_loss": state.get("best_val_loss"), "steps": state["step"], "tokens": state["tokens"],
            "resumed_from_step": state.get("resumed_from_step"),
        }.items() if v is not None},
        "loss_curve": state.get("loss_curve", []),
        # train.worker_env as this (rank 0) worker found it in its environment
        "worker_env": {k: os.environ.get(k) for k in cfg.train.worker_env},
        "config": cfg.model_dump(mode="json"),
        "run": cfg.name,
    }
    if task == "classification":
        card["labels"] = meta["labels"]
        card["label_counts"] = meta["label_counts"]
    if task == "causal_lm":  # chat: supervised fine-tuning, trained on conversations' answers only
        card["data_format"] = meta.get("format", "text")
    if cfg.preference:  # tuned on preference pairs: a chat model (served on the chat routes) with its objective
        card["data_format"] = "chat"
        from raylm.train.reference import reference_mode

        card["preference"] = {**cfg.preference.model_dump(mode="json"), "reference": cfg.model.path,
                              "reference_logps": reference_mode(cfg)}  # (auto resolved)
    if meta.get("mixture"):
        card["mixture"] = meta["mixture"]
    if cfg.distill:
        card["teacher"] = cfg.distill.teacher
    if calibration:
        card["calibration"] = calibration
    with tempfile.TemporaryDirectory() as d:
        card["format"] = save_hf_dir(cfg, meta, state_dict, d, temperature)
        # the trained model's logits over T: what the calibrated export must answer
        card["export_check"] = check_export(d, task, card["format"], probe, probe_logits / temperature,
                                            cfg.train.precision)
        return registry.register(d, cfg.name, card, root=cfg.output.registry)
