"""Config of the training job (`jobs/train.py`). Every field is in the README's "Train
config reference"; keep the two in step."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from raylm.config import Strict
from raylm.data.config import _check_uri


class DataRef(Strict):
    dataset: str = Field(..., description="NAME, NAME@VERSION or a dataset version URI")
    root: Optional[str] = Field(None, description="dataset root; default $RAYLM_HOME/datasets")


class ModelConfig(Strict):
    task: Literal["causal_lm"] = "causal_lm"
    arch: Literal["llama", "gpt2"] = "llama"
    preset: Literal["tiny", "small", "125m", "350m", "500m", "1b"] = "tiny"
    path: Optional[str] = Field(None, description="load weights and config from this local HF directory instead")
    overrides: dict[str, int | float | bool | str] = Field(
        default_factory=dict, description="fields of the transformers config to change, e.g. num_hidden_layers")
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    activation_checkpointing: bool = False
    compile: bool = Field(False, description="torch.compile each transformer block (GPU; the first steps compile)")


class DeepSpeedConfig(Strict):
    stage: Literal[1, 2, 3] = 2
    offload_optimizer: bool = Field(False, description="ZeRO-Offload: optimizer state on CPU")
    offload_params: bool = Field(False, description="ZeRO-3 parameter offload to CPU")


class FSDPConfig(Strict):
    cpu_offload: bool = Field(False, description="keep parameters on CPU between uses (GPU only)")
    reshard_after_forward: bool = True


class TrainLoopConfig(Strict):
    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    fsdp: FSDPConfig = FSDPConfig()
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    max_steps: int = Field(100, ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="sequences per worker per micro-batch")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(3e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decays to lr * this")
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    clip: float = Field(1.0, ge=0, description="gradient norm clipping; 0 disables")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = 0
    log_every: int = Field(10, ge=1, description="steps between metric reports and progress lines")
    eval_every: int = Field(50, ge=1)
    eval_batches: int = Field(8, ge=1, description="validation batches per worker per evaluation")
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the last checkpoint; -1: forever")
    early_stopping_patience: int = Field(0, ge=0, description="stop after this many evaluations without a "
                                         "better validation loss; 0 disables")

    @model_validator(mode="after")
    def _checks(self) -> "TrainLoopConfig":
        if self.precision == "fp16" and self.strategy != "deepspeed":
            raise ValueError("precision fp16 needs a loss scaler: use bf16, or strategy deepspeed")
        return self


class TrainOutput(Strict):
    storage: Optional[str] = Field(None, description="run storage (checkpoints); default $RAYLM_HOME/runs")
    registry: Optional[str] = Field(None, description="model registry root; default $RAYLM_HOME/registry")
    register_model: bool = Field(True, description="export and register the model at the end")

    @field_validator("storage", "registry")
    @classmethod
    def _uris(cls, v: Optional[str]) -> Optional[str]:
        return _check_uri(v, "output path", ray_visible=True)


class TrainConfig(Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                      description="run and model name: re-running the same name resumes it")
    data: DataRef
    model: ModelConfig = ModelConfig()
    train: TrainLoopConfig = TrainLoopConfig()
    output: TrainOutput = TrainOutput()
