"""Training losses: the model's own cross-entropy, class-weighted cross-entropy for
classification, and knowledge distillation from a registry teacher:

    loss = alpha * KL(softmax(teacher / T) || softmax(student / T)) * T^2 + (1 - alpha) * CE

The teacher is loaded on every worker (replicated, frozen, eval mode): fine for teachers that
fit one device, which is what distilling into a smaller student is for.

Preference tuning (DPO, Rafailov et al. 2023) on pairs of answers to one prompt: with r(y) =
beta * (log p(y | x) - log p_ref(y | x)) summed over the answer's tokens,

    sigmoid: loss = -log sigmoid(r(chosen) - r(rejected))   (label smoothing: conservative DPO)
    ipo:     loss = ((r(chosen) - r(rejected)) / beta - 1 / (2 * beta))^2

and ORPO (Hong et al. 2024), with no reference: with m(y) the answer's mean token log-probability
and odds(y) = e^m / (1 - e^m), loss = CE(chosen) - beta * log sigmoid(log odds(chosen) - log
odds(rejected)); its "rewards" are beta * m(y) (as TRL reports them). SimPO (Meng et al. 2024),
with no reference either: loss = -log sigmoid(beta * (m(chosen) - m(rejected)) - gamma).

KTO (Ethayarajh et al. 2024) on answers rated one at a time (a dataset of format rated): with
r(y) = log p(y | x) - log p_ref(y | x) and z = max(0, mean r(y') over the batch's mismatched
answers y' (another record's answer after this prompt: the data job's second block), detached),
the policy's KL from the reference as the reference point,

    good: loss = desirable_weight * (1 - sigmoid(beta * (r(y) - z)))
    bad:  loss = undesirable_weight * (1 - sigmoid(beta * (z - r(y))))

averaged over the batch's answers; in training z is averaged over the workers' batches (as TRL
gathers it), in evaluation each worker's own.

The reference is the model as it starts (model.path): either a frozen copy on every worker, like
a teacher (`preference.reference_logps: live`), or its log-probabilities of every pair computed once
before training and carried in the dataset's columns (`precomputed`: train/reference.py).
A batch holds the pairs' chosen conversations, then their rejected ones (`loop.host_batch`;
`ref_logps` with them when precomputed).
"""

from __future__ import annotations

import copy
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


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the log-probability of its label tokens (those not -100) after the ones before them."""
    targets = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100, reduction="none")
    return -nll.sum(-1)


class Preference:
    """The DPO loss (`PreferenceConfig`) against a frozen reference model, or (reference None) the
    reference's log-probabilities the batches carry (`ref_logps`: precomputed)."""

    def __init__(self, cfg, reference: Optional[torch.nn.Module]):
        self.cfg, self.reference = cfg, reference

    def rewards(self, policy_logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The implicit rewards beta * (log p - log p_ref) of each pair's chosen and rejected answer,
        and the chosen answers' mean token cross-entropy. KTO: the rated answers' and the mismatched
        answers' (the KL side), and the good answers' mean token cross-entropy."""
        policy = sequence_logps(policy_logits, batch["labels"])
        n = policy.shape[0] // 2
        tokens = (batch["labels"][:, 1:] != -100).sum(-1).clamp(min=1)
        if self.cfg.loss == "kto":
            good = batch["desirable"].to(policy.device)
            chosen_nll = -(policy[:n] * good).sum() / (tokens[:n] * good).sum().clamp(min=1)
        else:
            chosen_nll = -policy[:n].sum() / tokens[:n].sum()
        if self.cfg.loss in ("orpo", "simpo"):  # no reference: the answers' mean token log-probabilities
            mean = self.cfg.beta * policy / tokens
            return mean[:n], mean[n:], chosen_nll
        if "ref_logps" in batch:
            ref = batch["ref_logps"].to(policy.dtype)
        elif self.reference is None:
            raise ValueError("preference.reference_logps is precomputed but the batch has no reference "
                             "log-probabilities (reference.REF_COLUMNS)")
        else:
            with torch.no_grad():
                ref = sequence_logps(self.reference(input_ids=batch["input_ids"]).logits, batch["labels"])
        diff = self.cfg.beta * (policy - ref)
        return diff[:n], diff[n:], chosen_nll

    def kto(self, rated: torch.Tensor, mismatched: torch.Tensor, good: torch.Tensor, across_workers: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """KTO's per-answer losses and each answer's reward over the reference point z (positive: on the
        side its rating asks for) from the rated answers' and the mismatched answers' rewards.
        across_workers: z from every worker's batch (training: every rank computes the loss the same
        number of times, so the collective cannot wait on a rank that skipped it)."""
        import torch.distributed as dist

        beta = self.cfg.beta
        z = (mismatched / beta).mean().detach()  # the KL estimate (rewards carry beta)
        if across_workers and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(z)
            z = z / dist.get_world_size()
        z = z.clamp(min=0)
        over = rated / beta - z
        losses = torch.where(good, self.cfg.desirable_weight * (1 - torch.sigmoid(beta * over)),
                             self.cfg.undesirable_weight * (1 - torch.sigmoid(-beta * over)))
        return losses, beta * torch.where(good, over, -over)

    def loss(self, chosen: torch.Tensor, rejected: torch.Tensor, chosen_nll: torch.Tensor,
             good: Optional[torch.Tensor] = None, training: bool = False) -> torch.Tensor:
        if self.cfg.loss == "kto":
            loss = self.kto(chosen, rejected, good, across_workers=training)[0].mean()
            return loss + self.cfg.sft_weight * chosen_nll if self.cfg.sft_weight else loss
        z = chosen - rejected
        if self.cfg.loss == "orpo":
            beta = self.cfg.beta
            c, r = chosen / beta, rejected / beta  # mean token log-probabilities (< 0)

            def log_odds(m: torch.Tensor) -> torch.Tensor:
                return m - torch.log1p(-torch.exp(m).clamp(max=1 - 1e-6))

            loss = chosen_nll - beta * F.logsigmoid(log_odds(c) - log_odds(r)).mean()
            return loss + self.cfg.sft_weight * chosen_nll if self.cfg.sft_weight else loss
        if self.cfg.loss == "simpo":
            z = z - self.cfg.simpo_gamma
        if self.cfg.loss == "ipo":
            beta = self.cfg.beta
            loss = ((z / beta - 1 / (2 * beta)) ** 2).mean()
        else:
            ls = self.cfg.label_smoothing
            loss = (-(1 - ls) * F.logsigmoid(z) - ls * F.logsigmoid(-z)).mean()
        return loss + self.cfg.sft_weight * chosen_nll if self.cfg.sft_weight else loss

    def __call__(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return self.loss(*self.rewards(model(input_ids=batch["input_ids"]).logits, batch), batch.get("desirable"),
                         training=True)

    @torch.no_grad()
    def stats(self, policy_logits: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """An evaluation batch's loss, the share of pairs whose chosen answer gets the higher reward,
        and the mean reward margin. KTO: the share of rated answers whose reward is on their rating's
        side of the reference point (above it for good ones, below for bad), and the mean distance
        to it on that side."""
        chosen, rejected, nll = self.rewards(policy_logits, batch)
        if self.cfg.loss == "kto":
            good = batch["desirable"].to(chosen.device)
            losses, margin = self.kto(chosen, rejected, good)
            loss = losses.mean() + (self.cfg.sft_weight * nll if self.cfg.sft_weight else 0)
            return {"val_loss": loss, "val_reward_accuracy": (margin > 0).float().mean(),
                    "val_reward_margin": margin.mean()}
        return {"val_loss": self.loss(chosen, rejected, nll), "val_reward_accuracy": (chosen > rejected).float().mean(),
                "val_reward_margin": (chosen - rejected).mean()}


def make_loss(cfg: TrainConfig, meta: dict[str, Any], device: torch.device,
              model: Optional[torch.nn.Module] = None) -> tuple[LossFn, Optional[str]]:
    """The training loss and, for distillation, the teacher's id. Preference tuning: a `Preference`
    whose reference is a frozen copy of `model` (the model as built, before any training step), or
    none when the batches carry its log-probabilities (`reference.reference_mode` precomputed)."""
    from raylm.train.reference import reference_mode

    if cfg.preference is not None:
        if reference_mode(cfg) in ("precomputed", "none"):  # (the batches carry its figures; orpo and simpo have none)
            return Preference(cfg.preference, None), None
        if model is None:
            raise ValueError("preference tuning needs the model to copy as its reference")
        reference = copy.deepcopy(model).requires_grad_(False).to(device).eval()
        return Preference(cfg.preference, reference), None
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
