"""`raylm serve-config`: the Ray Serve config (for `serve deploy` and a KubeRay RayService's
`serveConfigV2`) of a deploy config, validated against Ray's own Serve schema.

The application is built on the cluster by `raylm.serve.app:app_builder` from the deploy
config passed as `args`, so registry references and paths resolve where the app runs.
"""

from __future__ import annotations

from typing import Any, Optional

from raylm.config import ConfigError
from raylm.serve.config import DeployConfig

IMPORT_PATH = "raylm.serve.app:app_builder"


def serve_config(cfg: DeployConfig, working_dir: Optional[str] = None) -> dict[str, Any]:
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    app: dict[str, Any] = {"name": cfg.name, "route_prefix": cfg.route_prefix, "import_path": IMPORT_PATH,
                           "args": cfg.model_dump(mode="json", exclude_none=True)}
    if working_dir:
        app["runtime_env"] = {"working_dir": working_dir}
    doc = {"proxy_location": "EveryNode", "http_options": {"host": cfg.http.host, "port": cfg.http.port},
           "applications": [app]}
    try:
        ServeDeploySchema.model_validate(doc)
    except ValidationError as e:  # a bug of ours or an incompatible Ray: say so plainly
        raise ConfigError(f"the generated Serve config does not validate against Ray's schema: {e}") from None
    return doc
