"""Config of the search job (`jobs/tune.py`). Every field is in the README's "Tune config
reference"; keep the two in step."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from raylm.config import Strict
from raylm.data.config import _check_uri
from raylm.tracking import TrackingConfig


# Fields a search may not change: they decide what the data are (tokenized once, in the driver).
FIXED_FIELDS = ("name", "data", "model.task", "model.path", "model.max_length", "output")


class Param(Strict):
    """One dimension of the search space: exactly one of these keys."""

    choice: Optional[list[Any]] = Field(None, min_length=1, description="one of these values (sampled)")
    grid: Optional[list[Any]] = Field(None, min_length=1, description="every one of these values (grid search)")
    uniform: Optional[tuple[float, float]] = Field(None, description="[low, high]")
    loguniform: Optional[tuple[float, float]] = Field(None, description="[low, high], both > 0")
    randint: Optional[tuple[int, int]] = Field(None, description="[low, high], high included")

    @model_validator(mode="after")
    def _one(self) -> "Param":
        given = [k for k in ("choice", "grid", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of choice, grid, uniform, loguniform, randint")
        low_high = self.uniform or self.loguniform or self.randint
        if low_high is not None and not low_high[0] < low_high[1]:
            raise ValueError(f"{given[0]}: low must be below high, got {list(low_high)}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform: low must be > 0")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("choice", "grid", "uniform", "loguniform", "randint") if getattr(self, k) is not None)

    def values(self) -> Any:
        return getattr(self, self.kind)



class SearchConfig(Strict):
    algorithm: Literal["grid", "random", "tpe", "gp", "cmaes"] = Field(
        "random", description="grid: every combination of the grid / choice values; random: sampled; tpe: "
        "Optuna TPE (Bayesian); gp: Optuna's Gaussian-process sampler (Bayesian); cmaes: CMA-ES (evolutionary, "
        "Optuna's CmaEsSampler)")
    scheduler: Literal["fifo", "asha", "hyperband", "pbt"] = Field(
        "fifo", description="fifo: every trial runs to max_steps; asha: stop the worse trials early; hyperband: "
        "asynchronous HyperBand (ASHA over up to 3 brackets of grace_period x reduction_factor^0,1,2; only the "
        "brackets whose first rung comes before max_steps); pbt: population-based training")
    num_samples: int = Field(8, ge=1, description="trials; default 8, and 1 with grid (every combination once: a "
                             "larger number repeats the whole grid, same seeds included)")
    max_concurrent: int = Field(2, ge=1, description="trials running at once")
    seed: int = Field(0, description="seed of the searcher (the trials keep their own train.seed)")
    grace_period: int = Field(10, ge=1, description="asha / hyperband: steps every trial gets before it can be "
                              "stopped")
    reduction_factor: float = Field(3, gt=1, description="asha / hyperband: keep 1 in this many at each rung")
    perturbation_interval: int = Field(20, ge=1, description="pbt: steps between exploit / explore rounds "
                                       "(trials checkpoint at this interval)")
    time_budget_s: Optional[float] = Field(None, gt=0, description="stop starting trials after this long")
    state_save_s: float = Field(2.0, gt=0, description="seconds between saves of the search's state (which trials "
                                "finished): a search killed between two saves runs the trials that finished since "
                                "again when it resumes (Ray Tune's TUNE_GLOBAL_CHECKPOINT_S; its default is 10 s or "
                                "more)")

    @model_validator(mode="before")
    @classmethod
    def _grid_once(cls, data: Any) -> Any:
        """Tune repeats a grid num_samples times; with each trial's own train.seed a repeat trains the same
        model again, so a grid left at the default runs once (a 3-value grid: 3 trials, not 24)."""
        if isinstance(data, dict) and data.get("num_samples") is None and data.get("algorithm") == "grid":
            data = {**data, "num_samples": 1}
        return data


class CVConfig(Strict):
    folds: int = Field(..., ge=2, le=20, description="k: each configuration trains k times, validating on one "
                       "fold of the train split each time (the dataset's validation split is not used)")
    seed: int = Field(0, description="seed of the assignment of rows to folds")


class TuneOutput(Strict):
    storage: Optional[str] = Field(None, description="where trials, checkpoints and the report go; default "
                                   "$RAYLM_HOME/tune")
    registry: Optional[str] = Field(None, description="model registry for the best model; default "
                                    "$RAYLM_HOME/registry")
    register_best: bool = Field(True, description="copy the best trial's model into the registry as `name`")

    @field_validator("storage", "registry")
    @classmethod
    def _uris(cls, v: Optional[str]) -> Optional[str]:
        return _check_uri(v, "output path", ray_visible=True)


class TuneConfig(Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                      description="search name: submitting the same name again resumes the search")
    train: Union[str, dict[str, Any]] = Field(..., description="the base train config: a YAML path (relative to "
                                              "this file) or the config itself")
    set: list[str] = Field(default_factory=list, description="`key=value` overrides of the base train config")
    space: dict[str, Param] = Field(default_factory=dict, description="dotted train-config field -> dimension")
    metric: str = Field("val_loss", description="what the search optimizes (a metric the training reports: "
                        "val_loss, val_ppl, val_accuracy, val_balanced_accuracy, val_macro_f1; preference "
                        "tuning: val_loss, val_reward_accuracy, val_reward_margin)")
    mode: Optional[Literal["min", "max"]] = Field(None, description="default: min for loss / ppl, else max")
    search: SearchConfig = SearchConfig()
    cv: Optional[CVConfig] = Field(None, description="k-fold cross-validation of every configuration")
    output: TuneOutput = TuneOutput()
    tracking: TrackingConfig = Field(TrackingConfig(), description="MLflow / Comet (raylm/tracking.py)")
    resume: Literal["auto", "restart", "restart_if_changed"] = Field(
        "auto", description="a search name that already has trials: auto resumes it when it was started with this "
        "config (output, tracking, max_concurrent and state_save_s may change) and otherwise stops before anything "
        "starts, naming what changed; restart removes its trials and runs and starts over (the models it "
        "registered stay); restart_if_changed resumes an interrupted search of the same config and restarts one "
        "of any other (what the pipeline does)")

    @field_validator("space")
    @classmethod
    def _fields(cls, v: dict[str, Param]) -> dict[str, Param]:
        for key in v:
            if any(key == f or key.startswith(f + ".") for f in FIXED_FIELDS):
                raise ValueError(f"{key}: a search cannot change {', '.join(FIXED_FIELDS)} (they decide the data "
                                 "every trial reads); run one search per dataset or model")
        return v

    @model_validator(mode="after")
    def _checks(self) -> "TuneConfig":
        kinds = {k: p.kind for k, p in self.space.items()}
        algo, sched = self.search.algorithm, self.search.scheduler
        if algo == "grid" and any(k not in ("grid", "choice") for k in kinds.values()):
            bad = [k for k, kind in kinds.items() if kind not in ("grid", "choice")]
            raise ValueError(f"search.algorithm grid needs grid or choice values; {', '.join(bad)} are ranges")
        if algo in ("tpe", "gp", "cmaes") and "grid" in kinds.values():
            raise ValueError(f"search.algorithm {algo} samples its own points: write `choice` instead of `grid`")
        if self.cv and algo not in ("grid", "random"):
            raise ValueError("cv works with search.algorithm grid or random (each configuration runs once per "
                             "fold)")
        if self.cv and sched != "fifo":
            raise ValueError("cv needs search.scheduler fifo: every fold must train to the end")
        if sched == "pbt" and algo != "random":
            raise ValueError("search.scheduler pbt mutates its own population: use search.algorithm random")
        return self

    @property
    def resolved_mode(self) -> str:
        return self.mode or ("min" if self.metric.endswith(("loss", "ppl")) else "max")


class MembersConfig(Strict):
    source: Literal["seeds", "bagging", "folds", "boosting", "search", "models"] = Field(
        "seeds", description="seeds: the base config with train.seed = seed, seed+1, ...; bagging: bootstrap "
        "samples of the train split; folds: the k folds of the train split (each member validates on its own "
        "fold: out-of-fold predictions for stacking); boosting: rounds trained on reweighted rows (AdaBoost-SAMME; "
        "combiner boosting); search: the top-n trials of a finished search; models: registry models")
    n: int = Field(3, ge=2, le=32, description="members (folds: k; boosting: rounds)")
    search: Optional[str] = Field(None, description="source search: the search's name")
    search_storage: Optional[str] = Field(None, description="source search: its output.storage; default "
                                          "$RAYLM_HOME/tune")
    models: Optional[list[str]] = Field(None, min_length=2, description="source models: registry refs "
                                        "(NAME, NAME@vN, NAME@ALIAS)")

    @model_validator(mode="after")
    def _checks(self) -> "MembersConfig":
        if self.source == "search" and not self.search:
            raise ValueError("members.source search needs members.search (the search's name)")
        if self.source == "models" and not self.models:
            raise ValueError("members.source models needs members.models")
        return self


class EnsembleConfig(Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="registry name of the ensemble")
    train: Optional[Union[str, dict[str, Any]]] = Field(
        None, description="the members' train config (a classification config; YAML path relative to this file, "
        "or inline); needed unless members come from a search or the registry")
    set: list[str] = Field(default_factory=list, description="`key=value` overrides of the train config")
    members: MembersConfig = MembersConfig()
    combiner: Literal["mean", "weighted", "logit_mean", "stacking", "boosting", "soup"] = Field(
        "weighted", description="mean: equal-weight probabilities; weighted: weights learned on held-out rows; "
        "logit_mean: mean log-probabilities; stacking: logistic regression on the members' probabilities; "
        "boosting: AdaBoost-SAMME votes (members.source boosting); soup: one model, the mean of the members' "
        "weights (same architecture and initialization)")
    max_concurrent: int = Field(2, ge=1, description="members trained at once")
    registry: Optional[str] = Field(None, description="registry of source models / search models' copies; "
                                    "default output.registry")
    output: TuneOutput = TuneOutput()
    tracking: TrackingConfig = Field(TrackingConfig(), description="MLflow / Comet (raylm/tracking.py)")

    @model_validator(mode="after")
    def _checks(self) -> "EnsembleConfig":
        trains = self.members.source in ("seeds", "bagging", "folds", "boosting")
        if trains and self.train is None:
            raise ValueError(f"members.source {self.members.source} trains its members: give `train`")
        if (self.combiner == "boosting") != (self.members.source == "boosting"):
            raise ValueError("combiner boosting goes with members.source boosting (each round is trained on "
                             "rows reweighted by the previous rounds' mistakes), and only with it")
        return self
