"""Training losses: the model's own cross-entropy, class-weighted cross-entropy for
classification, and knowledge distillation from a registry teacher:

    loss = alpha * KL(softmax(teacher / T) || softmax(student / T)) * T^2 + (1 - alpha) * CE

The teacher is loaded on every worker (replicated, frozen, eval mode): fine for teachers that
fit one device, which is what distilling into a smaller student is for.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from raylm import registry
from raylm.train.config import TrainConfig
from raylm.train.strategies import Batch, LossFn, model_loss


def _logits_and_targets(logits: torch.Tensor, batch: Batch, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) logits and (N,) targets: next-token positions of a causal LM, or one row per text."""
    if task == "causal_lm":
        return logits[:, :-1].reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1)
    return logits, batch["labels"]


def _inputs(batch: Batch) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


def load_teacher(cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    """The frozen teacher on this worker (the job checked it fits the student: `check_teacher`)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    d = cfg.distill
    card = registry.resolve(d.teacher, d.registry or cfg.output.registry)
    auto = AutoModelForCausalLM if cfg.model.task == "causal_lm" else AutoModelForSequenceClassification
    teacher = auto.from_pretrained(str(registry.local_path(card)), local_files_only=True, dtype=torch.float32)
    teacher.requires_grad_(False)
    return teacher.to(device).eval()


def make_loss(cfg: TrainConfig, meta: dict[str, Any], device: torch.device) -> tuple[LossFn, Optional[str]]:
    """The training loss and, for distillation, the teacher's id."""
    weight = None
    if cfg.model.task == "classification" and cfg.train.class_weights == "balanced":
        counts = torch.tensor([meta["label_counts"][label] for label in meta["labels"]], dtype=torch.float32)
        weight = (counts.sum() / (len(counts) * counts.clamp(min=1))).to(device)
    if cfg.distill is None:
        if weight is None:
            return model_loss, None

        def weighted(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
            logits = model(**_inputs(batch)).logits
            return F.cross_entropy(logits.float(), batch["labels"], weight=weight)

        return weighted, None

    teacher = load_teacher(cfg, device)
    alpha, temp, task = cfg.distill.alpha, cfg.distill.temperature, cfg.model.task

    def distill(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        inputs = _inputs(batch)
        student, targets = _logits_and_targets(model(**inputs).logits.float(), batch, task)
        with torch.no_grad():
            teacher_logits, _ = _logits_and_targets(teacher(**inputs).logits.float(), batch, task)
        if task == "causal_lm" and bool((targets == -100).any()):  # conversations: the answers' positions only
            keep = targets != -100
            student, teacher_logits, targets = student[keep], teacher_logits[keep], targets[keep]
        kl = F.kl_div(F.log_softmax(student / temp, -1), F.log_softmax(teacher_logits / temp, -1),
                      log_target=True, reduction="batchmean") * temp ** 2
        ce = F.cross_entropy(student, targets, weight=weight)
        return alpha * kl + (1 - alpha) * ce

    return distill, cfg.distill.teacher
