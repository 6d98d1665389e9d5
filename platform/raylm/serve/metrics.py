"""Serving metrics through `ray.util.metrics` (Prometheus via Ray's metrics agent), one set
per ingress process."""

from typing import Any

_METRICS: dict[str, Any] = {}


def metrics() -> dict[str, Any]:
    if not _METRICS:
        from ray.util import metrics as m

        _METRICS.update(
            requests=m.Counter("raylm_serve_requests_total", "HTTP requests by route, status, model and the "
                               "registry version that answered (a canary's or the model's)",
                               tag_keys=("route", "status", "model", "version")),
            latency=m.Histogram("raylm_serve_request_latency_seconds", "request latency (to the last byte)",
                                boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60],
                                tag_keys=("route", "model")),
            ttft=m.Histogram("raylm_serve_time_to_first_token_seconds", "time to the first generated text",
                             boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
                             tag_keys=("model",)),
            tokens=m.Counter("raylm_serve_tokens_generated_total", "completion tokens generated",
                             tag_keys=("model",)),
        )
    return _METRICS
