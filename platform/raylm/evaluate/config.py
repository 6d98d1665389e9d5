"""Config of the evaluation job (`jobs/evaluate.py`). Every field is in the README's
"Evaluate config reference"; keep the two in step."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from raylm.config import Strict
from raylm.data.config import _check_uri
from raylm.tracking import TrackingConfig


class EvalData(Strict):
    dataset: str = Field(..., description="NAME, NAME@VERSION or a dataset version URI")
    root: Optional[str] = Field(None, description="dataset root; default $RAYLM_HOME/datasets")
    split: Literal["test", "validation", "train"] = "test"
    limit: Optional[int] = Field(None, ge=1, description="evaluate at most this many documents (the first ones)")


class Compute(Strict):
    actors: int = Field(1, ge=1, description="model replicas in the Ray Data actor pool")
    num_cpus: float = Field(1, gt=0, description="CPUs per replica")
    num_gpus: float = Field(0, ge=0, description="GPUs per replica")
    batch_size: int = Field(16, ge=1, description="documents per inference batch")
    local_max_docs: int = Field(2000, ge=0, description="CPU evaluations (num_gpus 0) of at most this many "
                                "documents score in the job's own process, one model load shared by every pass, "
                                "instead of starting an actor pool per pass; 0: always the actor pool")


class Slices(Strict):
    columns: list[str] = Field(default_factory=list, description="group columns of the docs view, e.g. [genre]")
    max_gap: float = Field(0.1, ge=0, description="flag a slice column when the best and worst group differ by "
                           "more than this on `metric`")
    metric: Optional[str] = Field(None, description="the gap metric; default accuracy (classification) or "
                                  "bits_per_byte (causal LM)")
    min_size: int = Field(5, ge=1, description="groups with fewer documents are listed but not compared")


RobustnessOp = Literal["swap", "insert", "delete", "typo", "crop"]  # the data augment ops (data/augment.py)


class Robustness(Strict):
    ops: list[RobustnessOp] = Field(
        default_factory=lambda: ["typo", "delete", "swap"], description="perturbations (the data augment ops)")
    strengths: list[float] = Field(default_factory=lambda: [0.05, 0.15], description="fraction of words touched")
    op_strengths: dict[RobustnessOp, list[float]] = Field(
        default_factory=dict, description="strengths for one op in place of `strengths`, e.g. {crop: [0.9, 0.95]}: "
        "a crop at 0.9 keeps a tenth of each text's words")
    seed: int = 0

    @field_validator("strengths")
    @classmethod
    def _strengths(cls, v: list[float]) -> list[float]:
        if any(not 0 < s <= 1 for s in v):
            raise ValueError("robustness.strengths must be in (0, 1]")
        return v

    @field_validator("op_strengths")
    @classmethod
    def _op_strengths(cls, v: dict) -> dict:
        for op, strengths in v.items():
            if not strengths or any(not 0 < s <= 1 for s in strengths):
                raise ValueError(f"robustness.op_strengths.{op} must be a list of strengths in (0, 1]")
        return v

    @model_validator(mode="after")
    def _op_strengths_name_ops(self) -> "Robustness":
        extra = sorted(set(self.op_strengths) - set(self.ops))
        if extra:
            raise ValueError(f"robustness.op_strengths names {', '.join(extra)}, not in robustness.ops {self.ops}")
        return self

    def strengths_of(self, op: str) -> list[float]:
        return self.op_strengths.get(op, self.strengths)


class Baselines(Strict):
    tfidf: bool = Field(True, description="classification: TF-IDF + logistic regression fit on the train split")
    ngram: Optional[int] = Field(3, ge=1, le=5, description="causal LM: order of the interpolated n-gram model fit "
                                 "on the train split's tokens; null: none")
    previous_versions: int = Field(1, ge=0, description="also evaluate this many earlier registry versions")


HIGHER_IS_BETTER = {"accuracy", "f1_macro", "f1_micro", "roc_auc_ovr", "next_token_accuracy", "preference_accuracy", "rating_auc"}
LOWER_IS_BETTER = {"ece", "perplexity", "bits_per_byte", "loss"}


class Promote(Strict):
    alias: str = Field(..., description="the registry alias to move to the evaluated model (e.g. production): "
                       "deploy configs name it as NAME@ALIAS")
    metric: Optional[str] = Field(None, description="the metric that decides; default accuracy (classification) or "
                                  "bits_per_byte (causal LM). Higher is better for accuracy, f1_macro, f1_micro, "
                                  "roc_auc_ovr, next_token_accuracy; lower for ece, perplexity, bits_per_byte, loss")
    min_delta: float = Field(0.0, ge=0, description="the evaluated model must beat the alias's current model by at "
                             "least this much (0: at least as good); both are scored on the same documents in this "
                             "job. An alias that points nowhere yet is set without a comparison")

    @field_validator("alias")
    @classmethod
    def _alias(cls, v: str) -> str:
        from raylm.registry import check_alias

        return check_alias(v)

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and v not in HIGHER_IS_BETTER | LOWER_IS_BETTER:
            raise ValueError(f"promote.metric {v!r} is not one of {', '.join(sorted(HIGHER_IS_BETTER | LOWER_IS_BETTER))}")
        return v


class EvaluateConfig(Strict):
    model: str = Field(..., description="registry model: NAME, NAME@vN or a model directory URI")
    registry: Optional[str] = Field(None, description="registry root; default $RAYLM_HOME/registry")
    data: EvalData
    compute: Compute = Compute()
    max_length: Optional[int] = Field(None, ge=8, description="tokens per text (classification) or window "
                                      "(causal LM); default: what the model was trained with")
    max_tokens_per_doc: int = Field(8192, ge=16, description="causal LM: score at most this many tokens of a document")
    calibration_bins: int = Field(10, ge=2, le=100)
    slices: Slices = Slices()
    robustness: Optional[Robustness] = Field(default_factory=Robustness, description="null: skip")
    baselines: Baselines = Baselines()
    promote: Optional[Promote] = Field(None, description="after scoring, move a registry alias to this model "
                                       "when it scores at least as well as the alias's current model; null: never")
    tracking: TrackingConfig = Field(TrackingConfig(), description="MLflow / Comet (raylm/tracking.py)")
    output: Optional[str] = Field(None, description="report directory; default beside the model: "
                                  "<model>/eval/<dataset>-<version>-<split>")

    @field_validator("registry", "output")
    @classmethod
    def _uris(cls, v: Optional[str]) -> Optional[str]:
        return _check_uri(v, "path", ray_visible=True)
