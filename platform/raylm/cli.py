"""`raylm`: run a local cluster, submit stage jobs, follow them; the commands on what the jobs
stored (datasets, models, feedback) are in cli_stores.py.

    raylm up [--num-cpus N] [--port 6379] [--dashboard-port 8265]
    raylm down
    raylm status
    raylm env                                  # exports for plain `ray job submit`
    raylm submit STAGE --config F [--set k=v ...] [--no-wait]
    raylm logs JOB_ID [--follow]
    raylm stop JOB_ID [--timeout 60]
    raylm datasets list [--root URI]
    raylm datasets show NAME[@VERSION] [--root URI]
    raylm datasets delete NAME@VERSION [--force] | prune NAME --keep N [--dry-run]
    raylm models list | show NAME[@vN|@ALIAS]
    raylm models alias NAME@vN ALIAS [--reason TEXT] | alias NAME ALIAS --remove
    raylm models delete NAME@vN [--force] | prune NAME --keep N [--dry-run]
    raylm keys add NAME --scopes generate,classify,feedback | list | revoke NAME
    raylm feedback stats [--app NAME | --uri URI] [--json] | pairs [--app NAME | --uri URI] --out FILE
    raylm serve-config --config deploy.yaml [--set k=v ...] [-o serve.yaml]
    raylm undeploy NAME
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from raylm import cluster, config, runtime
from raylm.jobs_api import (
    STAGES, TERMINAL, build_submission, exit_code, follow, project_root, status_of, submit_with_retry,
)
from raylm.cluster import ClusterError

def _print_err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


# --- cluster commands ------------------------------------------------------------------------

def cmd_up(a: argparse.Namespace) -> int:
    state_dir = cluster.home()
    was = cluster.ClusterState.load(state_dir)
    if cluster.is_running(was):
        if a.metrics and not was.prometheus_url:
            st = cluster.up(state_dir=state_dir, metrics=True, metrics_port=a.metrics_port,
                            metrics_interval_s=a.metrics_interval)
            print(f"raylm cluster already running: dashboard {was.dashboard_url}; Prometheus started at "
                  f"{st.prometheus_url} (the dashboard's metrics pages need `raylm down` + `raylm up --metrics`)")
            return 0
        print(f"raylm cluster already running: dashboard {was.dashboard_url} (state in {state_dir})"
              + (f"; Prometheus {was.prometheus_url}" if was.prometheus_url else ""))
        return 0
    print(f"starting a local Ray head node (state in {state_dir}) ...", flush=True)
    st = cluster.up(port=a.port, dashboard_port=a.dashboard_port, num_cpus=a.num_cpus, state_dir=state_dir,
                    metrics=a.metrics, metrics_port=a.metrics_port, metrics_interval_s=a.metrics_interval)
    prom = (f"\n  Prometheus    {st.prometheus_url}   (scrapes every node: ray_raylm_train_*, ray_raylm_serve_*, Ray's own;"
            f"\n                Grafana dashboards: cluster/monitoring/)") if st.prometheus_url else ""
    print(f"""
Ray is up, with token authentication.
  dashboard     {st.dashboard_url}   (bound to 127.0.0.1)
  token         {st.token_path}
  Ray temp dir  {st.temp_dir}{prom}

Browser: open {st.dashboard_url} and paste the token when the dashboard asks for it:
    cat {st.token_path}
Submit jobs with raylm (it uses the token for you):
    raylm submit prepare_data --config jobs/configs/shakespeare.yaml
or with plain Ray, after setting the address and the token:
    eval "$(raylm env)"
    ray job submit --working-dir . -- python jobs/prepare_data.py --config jobs/configs/shakespeare.yaml
Stop it with: raylm down""")
    return 0


def cmd_down(a: argparse.Namespace) -> int:
    state_dir = cluster.home()
    if cluster.ClusterState.load(state_dir) is None:
        print(f"no raylm cluster to stop (nothing started from {state_dir})")
        return 0
    if a.metrics:
        n = cluster.stop_metrics(state_dir)
        print(f"stopped Prometheus ({n} processes); the cluster keeps running" if n else
              "no Prometheus to stop (`raylm up --metrics` starts one)")
        return 0
    n = cluster.down(state_dir)
    print(f"stopped the raylm cluster ({n} processes)")
    return 0


def cmd_env(a: argparse.Namespace) -> int:
    st = cluster.ClusterState.load(cluster.home())
    if not cluster.is_running(st):
        _print_err("no raylm cluster is running here: `raylm up` first")
        return 1
    sys.stdout.write(cluster.env_exports(st))
    return 0


def cmd_status(a: argparse.Namespace) -> int:
    state_dir = cluster.home()
    st = cluster.ClusterState.load(state_dir)
    local = cluster.is_running(st)
    if st and not local:
        print(f"the raylm cluster recorded in {state_dir} is not running (stale state; `raylm up` restarts it)")
    if local:
        print(f"local raylm cluster: running since {dt.datetime.fromtimestamp(st.started_at):%Y-%m-%d %H:%M:%S}")
        print(f"  dashboard {st.dashboard_url}, GCS {st.gcs_address}, token {st.token_path}")
    target = cluster.resolve_target(a.address)
    client = cluster.job_client(target)
    print(_cluster_status(target))
    for line in _serve_status(target):
        print(line)
    jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0, reverse=True)[:10]
    print(f"\njobs at {target.dashboard_url} (newest first):" if jobs else f"\nno jobs yet at {target.dashboard_url}")
    for j in jobs:
        started = dt.datetime.fromtimestamp((j.start_time or 0) / 1000).strftime("%H:%M:%S")
        print(f"  {j.submission_id or j.job_id:<44} {j.status.value if hasattr(j.status, 'value') else j.status:<10}"
              f" {started}  {(j.entrypoint or '')[:70]}")
    return 0


def _cluster_status(target: cluster.Target) -> str:
    """`ray status`'s report (nodes, resources in use, pending demands), from the dashboard: one
    request (the `ray status` command took 1.7 s to start here) that also reaches a remote
    cluster's dashboard through `--address`."""
    import requests

    try:
        r = requests.get(f"{target.dashboard_url}/api/cluster_status", params={"format": "1"},
                         headers=target.headers, timeout=30)
        r.raise_for_status()
        text = (r.json().get("data") or {}).get("clusterStatus")
    except (requests.RequestException, ValueError) as e:
        return f"  (cluster status unavailable: {(str(e).splitlines() or [type(e).__name__])[0][:200]})"
    return text.rstrip() if text else "  (no cluster status yet: the autoscaler reports a few seconds after start)"


def _serve_status(target: cluster.Target) -> list[str]:
    """The Serve applications, each deployment's replicas and what its running ones hold: what
    a job waiting for CPUs waits behind (from the dashboard's Serve API)."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    try:
        details = ServeSubmissionClient(target.dashboard_url, headers=target.headers).get_serve_details()
    except Exception as e:  # noqa: BLE001 - status must print what it can
        return [f"\nServe: details unavailable ({(str(e).splitlines() or [type(e).__name__])[0][:200]})"]
    apps = details.get("applications") or {}
    if not apps:
        return ["\nno Serve applications"]
    http = details.get("http_options") or {}
    lines = [f"\nServe applications (HTTP {http.get('host', '?')}:{http.get('port', '?')}):"]
    for name, app in sorted(apps.items()):
        held: dict[str, float] = {}
        lines.append(f"  {name:<20} {app.get('status', '?'):<14} route {app.get('route_prefix') or '-'}")
        for dep_name, dep in sorted((app.get("deployments") or {}).items()):
            states: dict[str, int] = {}
            for r in dep.get("replicas") or []:
                states[r.get("state", "?")] = states.get(r.get("state", "?"), 0) + 1
            need = {k: v for k, v in (dep.get("required_resources") or {}).items() if v}
            for k, v in need.items():
                held[k] = held.get(k, 0) + v * states.get("RUNNING", 0)
            scaling = (dep.get("deployment_config") or {}).get("autoscaling_config")
            target_n = dep.get("target_num_replicas")
            plan = (f"target {target_n} ({scaling['min_replicas']}-{scaling['max_replicas']}, autoscaling)"
                    if scaling else f"target {target_n}")
            each = ", ".join(f"{v:g} {k}" for k, v in need.items()) or "no CPU"
            lines.append(f"    {dep_name:<18} {dep.get('status', '?'):<14} "
                         f"{', '.join(f'{n} {st.lower()}' for st, n in sorted(states.items())) or 'no replicas'}; "
                         f"{plan}; {each} each")
            if dep.get("message"):
                lines.append(f"      {dep['message'][:300]}")
        holds = ", ".join(f"{v:g} {k}" for k, v in held.items() if v) or "nothing"
        lines.append(f"    holds {holds}; `raylm undeploy {name}` frees it")
    return lines


# --- jobs --------------------------------------------------------------------------------------

def cmd_submit(a: argparse.Namespace) -> int:
    root = project_root()
    sub = build_submission(a.stage, a.config, a.overrides, root)
    target = cluster.resolve_target(a.address)
    client = cluster.job_client(target)
    runtime.quiet_ray_packaging()
    job_id = submit_with_retry(client, sub)
    print(f"submitted {job_id} to {target.dashboard_url}  (dashboard: {target.dashboard_url}/#/jobs/{job_id})",
          flush=True)
    if a.no_wait:
        print(job_id)
        return 0
    return follow(client, job_id)


def _job(a: argparse.Namespace):
    """(the Jobs API client, the job's info), or (client, None) with the error printed."""
    client = cluster.job_client(cluster.resolve_target(a.address))
    try:
        return client, client.get_job_info(a.job_id)
    except Exception:  # noqa: BLE001 - unknown job ids are a user error
        _print_err(f"no job {a.job_id!r} on this cluster (`raylm status` lists jobs)")
        return client, None


def cmd_logs(a: argparse.Namespace) -> int:
    client, info = _job(a)
    if info is None:
        return 1
    if a.follow:
        return follow(client, a.job_id)
    sys.stdout.write(client.get_job_logs(a.job_id))
    return exit_code(info) if status_of(info) in TERMINAL else 0


def cmd_stop(a: argparse.Namespace) -> int:
    """Stop a job and wait until Ray says it stopped (its driver and the work it started end)."""
    client, info = _job(a)
    if info is None:
        return 1
    if status_of(info) in TERMINAL:
        print(f"job {a.job_id} already ended: {status_of(info)}")
        return 0
    client.stop_job(a.job_id)
    deadline = time.time() + a.timeout
    while status_of(info := client.get_job_info(a.job_id)) not in TERMINAL:
        if time.time() > deadline:
            _print_err(f"job {a.job_id} is still {status_of(info)} {a.timeout:g} s after the stop request; "
                       f"`raylm status` shows it when it ends")
            return 1
        time.sleep(0.5)
    print(f"job {a.job_id}: {status_of(info)}"
          + (" (submitting the same train or tune config again resumes from its last checkpoint)"
             if status_of(info) == "STOPPED" else ""))
    return 0


# --- API keys and Serve configs ---------------------------------------------------------------

def cmd_keys_add(a: argparse.Namespace) -> int:
    from raylm.serve import keys

    scopes = [s.strip() for s in a.scopes.split(",") if s.strip()]
    try:
        key = keys.add(a.name, scopes, a.file, a.rate_limit)
    except ValueError as e:
        _print_err(str(e))
        return 2
    print(f"created key {a.name!r} with scopes {', '.join(sorted(set(scopes)))} in {a.file or keys.default_keys_file()}"
          "\nThe key is shown only now (only its SHA-256 is stored):", file=sys.stderr)
    print(key)
    return 0


def cmd_keys_list(a: argparse.Namespace) -> int:
    from raylm.serve import keys

    entries = keys.list_keys(a.file)
    if not entries:
        print(f"no keys in {a.file or keys.default_keys_file()} (`raylm keys add NAME --scopes ...`)")
    for k in entries:
        print(f"{k['name']:<20} {','.join(k['scopes']):<32} {k.get('rate_limit_per_minute', 'default')!s:<8} "
              f"{k['created']}  sha256:{k['sha256'][:12]}...")
    return 0


def cmd_keys_revoke(a: argparse.Namespace) -> int:
    from raylm.serve import keys

    if not keys.revoke(a.name, a.file):
        _print_err(f"no key named {a.name!r}")
        return 1
    print(f"revoked {a.name!r} (running apps stop accepting it within seconds)")
    return 0


def cmd_undeploy(a: argparse.Namespace) -> int:
    from raylm.runtime import init_ray

    init_ray(job=False)
    import logging

    from ray import serve  # its import sets Serve's logger to INFO ("Deleting app ..."): not for this command

    from raylm.serve.job import undeploy

    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    if not undeploy(a.name):
        _print_err(f"no Serve application {a.name!r} on this cluster; running: "
                   f"{', '.join(serve.status().applications) or 'none'}")
        return 1
    print(f"deleted the Serve application {a.name!r}")
    return 0


def cmd_serve_config(a: argparse.Namespace) -> int:
    import yaml

    from raylm.serve.config import DeployConfig
    from raylm.serve.schema import serve_config

    cfg = config.load(DeployConfig, a.config, a.overrides)
    if a.pin:  # NAME and NAME@ALIAS -> the version they name now (Serve rebuilds an app only when its config changes)
        from raylm import registry

        for m in [*cfg.models, *(x.canary for x in cfg.models if x.canary)]:
            if "://" not in m.model and not m.model.startswith(("/", ".", "~")):
                try:
                    m.model = registry.resolve(m.model, cfg.registry)["id"]
                except FileNotFoundError as e:
                    _print_err(f"--pin: {e}")
                    return 1
    text = yaml.safe_dump(serve_config(cfg, working_dir=a.working_dir), sort_keys=False)
    if a.output:
        Path(a.output).write_text(text, encoding="utf-8")
        print(f"wrote {a.output} (validated against Ray Serve's schema); deploy it with: serve deploy {a.output}",
              file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


# --- entry point -------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raylm", description="raylm: language models on one Ray cluster")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("up", help="start a local Ray head node with token auth and the dashboard on 127.0.0.1")
    s.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may use (default: all)")
    s.add_argument("--metrics", action="store_true",
                   help="also start Prometheus (the `prometheus` binary) scraping the cluster, on 127.0.0.1")
    s.add_argument("--metrics-port", type=int, default=None, help="Prometheus port (default: a free one)")
    s.add_argument("--metrics-interval", type=float, default=cluster.DEFAULT_SCRAPE_INTERVAL_S, metavar="SECONDS",
                   help="how often Prometheus scrapes the nodes (default %(default)s; each scrape costs every "
                        "node's dashboard agent CPU in proportion to its metric series)")
    s.add_argument("--port", type=int, default=6379, help="GCS port")
    s.add_argument("--dashboard-port", type=int, default=8265)
    s.set_defaults(fn=cmd_up)

    s = sub.add_parser("down", help="stop the processes `raylm up` started (and no other Ray)")
    s.add_argument("--metrics", action="store_true", help="stop only the Prometheus `raylm up --metrics` started")
    s.set_defaults(fn=cmd_down)

    s = sub.add_parser("status", help="the local cluster, its resources, Serve applications and recent jobs")
    s.add_argument("--address", help="dashboard URL (default: RAY_ADDRESS or the local cluster)")
    s.set_defaults(fn=cmd_status)

    s = sub.add_parser("env", help="print the exports that let plain `ray job submit` reach the local cluster")
    s.set_defaults(fn=cmd_env)

    s = sub.add_parser("submit", help="submit a stage's job (the project is uploaded as working_dir)")
    s.add_argument("stage", help=f"one of: {', '.join(STAGES)}")
    s.add_argument("--config", required=True)
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    s.add_argument("--address", help="dashboard URL (default: RAY_ADDRESS or the local cluster)")
    s.set_defaults(fn=cmd_submit)

    s = sub.add_parser("logs", help="print a job's logs")
    s.add_argument("job_id")
    s.add_argument("--follow", "-f", action="store_true")
    s.add_argument("--address")
    s.set_defaults(fn=cmd_logs)

    s = sub.add_parser("stop", help="stop a job and wait until it has stopped")
    s.add_argument("job_id")
    s.add_argument("--timeout", type=float, default=60, help="seconds to wait for it to stop (default 60)")
    s.add_argument("--address")
    s.set_defaults(fn=cmd_stop)

    from raylm.cli_stores import add_parsers  # datasets, models, feedback

    add_parsers(sub)

    ks = sub.add_parser("keys", help="API keys of served models (stored hashed)").add_subparsers(
        dest="keys_command", required=True)
    s = ks.add_parser("add", help="create a key; it is printed once")
    s.add_argument("name")
    s.add_argument("--scopes", default="generate,classify,feedback",
                   help="comma-separated: generate, classify, feedback, admin (default: the first three)")
    s.add_argument("--rate-limit", type=int, default=None, help="requests per minute for this key")
    s.add_argument("--file", help="keys file URI (default $RAYLM_HOME/serve/keys.json)")
    s.set_defaults(fn=cmd_keys_add)
    s = ks.add_parser("list", help="key names, scopes and hash prefixes")
    s.add_argument("--file")
    s.set_defaults(fn=cmd_keys_list)
    s = ks.add_parser("revoke", help="remove a key")
    s.add_argument("name")
    s.add_argument("--file")
    s.set_defaults(fn=cmd_keys_revoke)

    s = sub.add_parser("undeploy", help="delete a Serve application that `raylm submit deploy` started")
    s.add_argument("name", help="the deploy config's `name` (default raylm)")
    s.set_defaults(fn=cmd_undeploy)

    s = sub.add_parser("serve-config", help="write the Ray Serve config (serve deploy / KubeRay RayService) "
                                            "of a deploy config")
    s.add_argument("--config", required=True)
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--working-dir", help="runtime_env working_dir URI for clusters without raylm installed")
    s.add_argument("--pin", action="store_true", help="write each model as the registry version its reference "
                   "(NAME, NAME@ALIAS) names now, so applying the config rolls the app to it")
    s.add_argument("--output", "-o")
    s.set_defaults(fn=cmd_serve_config)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parser().parse_args(argv)
    try:
        return a.fn(a)
    except config.ConfigError as e:
        _print_err(str(e))
        return config.EXIT_CONFIG_ERROR
    except (ClusterError, OSError) as e:
        _print_err(str(e))
        return 1


if __name__ == "__main__":
    sys.exit(main())
