"""Strategies: one small object per way of spreading a model over workers (torchtune style:
composition, not a class hierarchy). Each wraps the model and its optimizer and knows how to

  micro_step(batch) -> loss          forward + backward of one micro-batch (a dict of tensors)
  optimizer_step() -> grad_norm      clip, step optimizer and LR schedule, zero grads
  evaluate(batch) -> (loss, logits)  forward without gradients
  save(dir, client_state) / load(dir) -> client_state      all ranks call both
  full_state_dict() -> dict | None   all ranks call; rank 0 gets the whole fp32 model on CPU

The same code runs on CPU (gloo) and GPU (nccl): Ray Train sets up the process group.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import nullcontext
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from raylm.train.config import TrainLoopConfig
from raylm.train.models import blocks
from raylm.train.session import CLIENT_STATE

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]


def model_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The model's own loss (causal LM: next-token cross-entropy; classifier: cross-entropy)."""
    return model(**batch).loss


def lr_lambda(cfg: TrainLoopConfig) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to `min_lr_ratio` at `max_steps`."""

    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: TrainLoopConfig, device: torch.device) -> torch.optim.Optimizer:
    kwargs: dict[str, Any] = {"lr": cfg.lr, "betas": (0.9, 0.95), "eps": 1e-8}
    if device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), **kwargs)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _write_client_state(path: str, state: dict) -> None:
    if _rank() == 0:
        with open(os.path.join(path, CLIENT_STATE), "w") as f:
            json.dump(state, f)


def _read_client_state(path: str) -> dict:
    with open(os.path.join(path, CLIENT_STATE)) as f:
        return json.load(f)


class DDP:
    """Replicated model, gradients all-reduced (torch DistributedDataParallel)."""

    def __init__(self, model: torch.nn.Module, cfg: TrainLoopConfig, device: torch.device,
                 loss_fn: Optional[LossFn] = None):
        self.cfg, self.device, self.loss_fn = cfg, device, loss_fn or model_loss
        model.to(device)
        self.module = model
        if _world() > 1:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        self.model = model
        self.opt = make_optimizer(self.module, cfg, device)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))

    def _autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def micro_step(self, batch: Batch, last: bool) -> torch.Tensor:
        sync = nullcontext() if (last or not hasattr(self.model, "no_sync")) else self.model.no_sync()
        with sync:
            with self._autocast():
                loss = self.loss_fn(self.model, batch)
            (loss / self.cfg.grad_accum).backward()
        return loss.detach()

    def optimizer_step(self) -> float:
        params = [p for p in self.module.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.clip or float("inf"))
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return float(norm)

    @torch.no_grad()
    def evaluate(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        self.model.eval()
        with self._autocast():
            out = self.model(**batch)
        self.model.train()
        return out.loss.detach(), out.logits.detach()

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def save(self, path: str, client_state: dict) -> None:
        if _rank() == 0:
            torch.save({"model": self.module.state_dict(), "optim": self.opt.state_dict(),
                        "sched": self.sched.state_dict()}, os.path.join(path, "state.pt"))
        _write_client_state(path, client_state)

    def load(self, path: str) -> dict:
        state = torch.load(os.path.join(path, "state.pt"), map_location=self.device, weights_only=False)
        self.module.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optim"])
        self.sched.load_state_dict(state["sched"])
        return _read_client_state(path)

    def full_state_dict(self) -> dict | None:
        if _rank() != 0:
            return None
        return {k: v.detach().to("cpu", torch.float32) for k, v in self.module.state_dict().items()}


class FSDP(DDP):
    """FSDP2: every transformer block and then the root sharded with `fully_shard` over a
    1-D device mesh; checkpoints with torch.distributed.checkpoint (each rank its shards)."""

    def __init__(self, model: torch.nn.Module, cfg: TrainLoopConfig, device: torch.device,
                 loss_fn: Optional[LossFn] = None):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        self.cfg, self.device, self.loss_fn = cfg, device, loss_fn or model_loss
        if device.type == "cuda" and not cfg.fsdp.cpu_offload:
            model.to(device)
        mesh = init_device_mesh(device.type, (_world(),))
        kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": cfg.fsdp.reshard_after_forward}
        if cfg.precision == "bf16":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        kwargs["offload_policy"] = CPUOffloadPolicy() if (cfg.fsdp.cpu_offload and device.type == "cuda") \
            else OffloadPolicy()
        for block in blocks(model):
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        self.model = self.module = model
        self.opt = make_optimizer(model, cfg, device)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))

    def _autocast(self):
        return nullcontext()  # the mixed-precision policy casts

    def micro_step(self, batch: Batch, last: bool) -> torch.Tensor:
        self.model.set_requires_gradient_sync(last)
        loss = self.loss_fn(self.model, batch)
        (loss / self.cfg.grad_accum).backward()
        return loss.detach()

    def save(self, path: str, client_state: dict) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
        if _rank() == 0:
            torch.save(self.sched.state_dict(), os.path.join(path, "sched.pt"))
        _write_client_state(path, client_state)

    def load(self, path: str) -> dict:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(self.model, self.opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.sched.load_state_dict(torch.load(os.path.join(path, "sched.pt"), weights_only=False))
        return _read_client_state(path)

    def full_state_dict(self) -> dict | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if _rank() != 0:
            return None
        return {k: v.to(torch.float32) for k, v in sd.items()}


class DeepSpeed:
    """DeepSpeed ZeRO stage 1/2/3 with a torch AdamW as the client optimizer; DeepSpeed's own
    checkpoints (every rank writes its partition)."""

    def __init__(self, model: torch.nn.Module, cfg: TrainLoopConfig, device: torch.device,
                 loss_fn: Optional[LossFn] = None):
        import deepspeed

        self.cfg, self.device, self.loss_fn = cfg, device, loss_fn or model_loss
        if device.type == "cpu" and os.environ.get("RAYLM_DEEPSPEED_SHM", "0") != "1":
            # DeepSpeed's CPU backend compiles a shared-memory all-reduce op (60-90 s, once per
            # machine) before the first step; plain gloo collectives do the same job for the CPU
            # runs this is for (laptops, tests). RAYLM_DEEPSPEED_SHM=1 builds and uses it.
            import importlib

            # (the module, not `deepspeed.comm.torch`: that attribute is the torch package)
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        ds = cfg.deepspeed
        zero: dict[str, Any] = {"stage": ds.stage}
        if ds.stage == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = True
        if ds.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
        if ds.offload_params:
            if ds.stage != 3:
                raise ValueError("train.deepspeed.offload_params needs stage 3")
            zero["offload_param"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
        ds_config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": cfg.batch_size,
            "gradient_accumulation_steps": cfg.grad_accum,
            "gradient_clipping": cfg.clip,
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        if cfg.precision == "bf16":
            ds_config["bf16"] = {"enabled": True}
        elif cfg.precision == "fp16":
            ds_config["fp16"] = {"enabled": True, "initial_scale_power": 16}
        if ds.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
        else:
            optimizer = make_optimizer(model, cfg, device)
        self.engine, self.opt, _, self.sched = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)),
        )
        self.model = self.engine

    def micro_step(self, batch: Batch, last: bool) -> torch.Tensor:
        loss = self.loss_fn(self.engine, batch)
        self.engine.backward(loss)
        self.engine.step()  # DeepSpeed steps the optimizer itself at accumulation boundaries
        return loss.detach()

    def optimizer_step(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @torch.no_grad()
    def evaluate(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        self.engine.eval()
        out = self.engine(**batch)
        self.engine.train()
        return out.loss.detach(), out.logits.detach()

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def save(self, path: str, client_state: dict) -> None:
        self.engine.save_checkpoint(path, tag="state", client_state={"raylm": client_state})
        _write_client_state(path, client_state)

    def load(self, path: str) -> dict:
        self.engine.load_checkpoint(path, tag="state")
        return _read_client_state(path)

    def full_state_dict(self) -> dict | None:
        if self.cfg.deepspeed.stage == 3:
            sd = self.engine._zero3_consolidated_16bit_state_dict()  # a collective: every rank calls it
        else:
            sd = self.engine.module.state_dict() if _rank() == 0 else None
        if _rank() != 0 or sd is None:
            return None
        return {k: v.detach().to("cpu", torch.float32) for k, v in sd.items()}


STRATEGIES = {"ddp": DDP, "fsdp": FSDP, "deepspeed": DeepSpeed}


def setup(model: torch.nn.Module, cfg: TrainLoopConfig, device: torch.device, loss_fn: Optional[LossFn] = None):
    return STRATEGIES[cfg.strategy](model, cfg, device, loss_fn)
