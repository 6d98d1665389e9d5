"""Config of the deploy job (`jobs/deploy.py`): which registry models to serve and how. Every
field is in the README's "Deploy config reference"; keep the two in step."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from raylm.config import Strict


SERVE_METRICS_INTERVAL_S = 10.0  # ray.serve.config.AutoscalingConfig.metrics_interval_s's default


class Autoscaling(Strict):
    """Ray Serve autoscaling for one model's replicas (replaces `num_replicas`)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    initial_replicas: Optional[int] = Field(None, ge=0, description="replicas at deploy time; default min_replicas")
    target_ongoing_requests: float = Field(2.0, gt=0, description="requests in flight per replica to aim for")
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)
    look_back_period_s: float = Field(30.0, description="window the load is averaged over (Serve's default); "
                                      "shorter reacts faster, but above 10 s (Serve's metrics interval). "
                                      "Replicas push their load every "
                                      "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S (10 s; cluster env)")

    @field_validator("look_back_period_s")
    @classmethod
    def _look_back(cls, v: float) -> float:
        # Ray Serve 2.60 warns (FutureWarning) when the window is not longer than its autoscaling
        # config's metrics_interval_s (10 s, a deprecated field) and says later releases will refuse it
        if v <= SERVE_METRICS_INTERVAL_S:
            raise ValueError(f"must be above {SERVE_METRICS_INTERVAL_S:g} s, Ray Serve's metrics interval "
                             "(Serve warns about shorter windows and later releases refuse them)")
        return v

    @model_validator(mode="after")
    def _order(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        return self


class Batching(Strict):
    """`@serve.batch`: requests that arrive together run as one forward pass."""

    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.05, ge=0, description="how long a batch waits to fill: under load, "
                                                                 "long enough for concurrent requests to meet")
    stream_interval_s: float = Field(0.05, ge=0, description="streamed text is sent at most this often after the "
                                                             "first tokens (0: every token)")


class Compression(Strict):
    """Lighter CPU serving. The quality change is measured on the model's validation split at
    deploy time, printed in the deploy job's log and written to the model card."""

    quantize: Literal["none", "int8"] = Field("none", description="int8: dynamic quantization of Linear layers")
    prune: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of Linear weights zeroed by magnitude (global L1)")
    eval_batches: int = Field(8, ge=1, description="validation blocks used to measure the quality change")


class Canary(Strict):
    model: str = Field(..., description="registry reference of the version on trial (NAME@vN, NAME@ALIAS...)")
    weight: float = Field(..., gt=0, lt=1, description="share of this model's requests it answers (0.1: one in ten)")
    num_replicas: Optional[int] = Field(None, ge=1, description="fixed replicas of the canary; default the entry's "
                                        "(its num_replicas, or its autoscaling)")
    num_cpus: Optional[float] = Field(None, ge=0, description="CPUs per canary replica; default the entry's "
                                      "num_cpus (a canary on a share of the traffic may need less)")


class ModelDeployment(Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="the model id clients send (`model` field)")
    model: str = Field(..., description="registry reference: NAME, NAME@vN, NAME@ALIAS, or a model directory URI")
    num_replicas: int = Field(1, ge=1, description="fixed replica count (ignored when autoscaling is set)")
    autoscaling: Optional[Autoscaling] = None
    max_ongoing_requests: int = Field(16, ge=1, description="requests one replica works on at once")
    max_queued_requests: int = Field(64, ge=-1, description="queued at the router before 503 (-1: unbounded)")
    health_check_period_s: float = Field(2.0, gt=0, description="how often Serve checks that each replica is "
                                         "alive; a dead one is replaced after its check fails (Serve's default 10 s)")
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on GPU, float32 on CPU")
    batching: Batching = Batching()
    compression: Compression = Compression()
    max_prompt_tokens: Optional[int] = Field(None, ge=1, description="default: the model's context length")
    max_tokens_cap: int = Field(512, ge=1, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(16, ge=1, description="max_tokens when a request leaves it out (OpenAI: 16)")
    chat_template: Optional[str] = Field(None, description="Jinja chat template; default: the tokenizer's, "
                                                           "else a plain `role: content` template")
    canary: Optional[Canary] = Field(None, description="another version answering a share of this name's "
                                     "requests (its own deployment, with this entry's options); responses name the "
                                     "version that answered (`system_fingerprint`, header x-raylm-model-version)")


class Auth(Strict):
    required: bool = Field(True, description="false only for a private laptop: then no key is asked for")
    keys_file: Optional[str] = Field(None, description="URI of the hashed API keys (`raylm keys add` writes it); "
                                                       "default $RAYLM_HOME/serve/keys.json")


class Limits(Strict):
    max_body_bytes: int = Field(1_000_000, ge=1024, description="larger request bodies get 413")
    rate_limit_per_minute: int = Field(600, ge=1, description="per API key (a key may set its own)")


class HTTP(Strict):
    host: str = Field("127.0.0.1", description="bind address of Serve's HTTP proxy; 0.0.0.0 exposes it")
    port: int = Field(8000, ge=1, le=65535)


class Ingress(Strict):
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.25, ge=0)
    max_ongoing_requests: int = Field(256, ge=1)
    health_check_period_s: float = Field(2.0, gt=0, description="as models.N.health_check_period_s")


class DeployConfig(Strict):
    name: str = Field("raylm", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Serve application name")
    route_prefix: str = "/"
    registry: Optional[str] = Field(None, description="registry root URI; default $RAYLM_HOME/registry")
    models: list[ModelDeployment] = Field(..., min_length=1)
    http: HTTP = HTTP()
    auth: Auth = Auth()
    limits: Limits = Limits()
    ingress: Ingress = Ingress()
    feedback_uri: Optional[str] = Field(None, description="where /v1/feedback appends JSONL; "
                                                          "default $RAYLM_HOME/feedback/<app name>")
    access_log: bool = Field(True, description="Ray Serve's access log line per request in each replica's log "
                                               "(the ingress's and every model's); off saves each request a "
                                               "log write in every replica it passes (raylm_serve_* metrics "
                                               "still count every request)")

    @field_validator("route_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("route_prefix must start with /")
        return v

    @model_validator(mode="after")
    def _unique(self):
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"model names must be unique; repeated: {', '.join(dup)}")
        return self
