"""The `raylm` CLI against the session's cluster, which `raylm up` started with token auth:
the Jobs API refuses requests without the token; `raylm submit` and plain `ray job submit`
with the token run the data job; exit codes follow the job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import requests

from conftest import ROOT, run_cli
from helpers import hold_free_cpus, job_end, submit_with_wait_notice
from raylm import cluster


def no_token_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["RAY_AUTH_MODE"] = "disabled"
    return env


def test_up_binds_dashboard_to_loopback_with_token_auth(raylm_cluster):
    assert raylm_cluster.dashboard_url.startswith("http://127.0.0.1:")
    token_file = Path(raylm_cluster.token_path)
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    assert not (Path(os.environ["HOME"]) / ".ray" / "auth_token").exists()  # nothing written to ~/.ray
    assert requests.get(f"{raylm_cluster.dashboard_url}/api/authentication_mode", timeout=10).json() == {
        "authentication_mode": "token"}


def test_jobs_api_refuses_requests_without_the_right_token(raylm_cluster):
    url = f"{raylm_cluster.dashboard_url}/api/jobs/"
    body = {"entrypoint": "echo pwned"}
    assert requests.post(url, json=body, timeout=10).status_code == 401
    assert requests.post(url, json=body, headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 403
    # and the real `ray job submit` without a token is refused
    proc = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "submit", "--address",
                           raylm_cluster.dashboard_url, "--no-wait", "--", "echo", "pwned"],
                          capture_output=True, text=True, timeout=120, env=no_token_env(), cwd=ROOT)
    assert proc.returncode != 0
    assert "Unauthorized" in proc.stderr + proc.stdout or "Authentication" in proc.stderr + proc.stdout
    jobs = requests.get(url, headers={"Authorization": f"Bearer {cluster.read_token(raylm_cluster.token_path)}"},
                        timeout=10).json()
    assert not any("pwned" in (j.get("entrypoint") or "") for j in jobs)


def test_raylm_submit_runs_prepare_data_and_lists_the_dataset(raylm_cluster):
    """Submitted without waiting (the CLI finds the token in the state dir by itself), followed
    with `raylm logs --follow`, seen in `raylm status`, then listed and shown."""
    proc = run_cli("submit", "prepare_data", "--config", "tests/data/tiny.yaml", "--set", "pack.seq_len=16",
                   "--no-wait", env=no_token_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    job_id = proc.stdout.strip().splitlines()[-1]
    assert job_id.startswith("raylm-prepare_data-")
    logs = run_cli("logs", job_id, "--follow")
    assert logs.returncode == 0, logs.stderr
    assert "dataset version: tiny@v" in logs.stdout
    # the log holds raylm's step lines, not Ray Data's lines for each of its ~15 short executions
    assert "[data] step read " in logs.stdout and "[data] tokenizing " in logs.stdout
    for ray_data_line in ("Running Dataset", "Starting execution of Dataset", "execution finished in", "Total Progress",
                          "Progress will be logged"):
        assert ray_data_line not in logs.stdout, logs.stdout[-3000:]
    status = run_cli("status")
    assert status.returncode == 0 and job_id in status.stdout and "SUCCEEDED" in status.stdout
    assert "Autoscaler status" in status.stdout and "/2.0 CPU" in status.stdout  # nodes and resources (the dashboard's)
    result = json.loads(logs.stdout.split("RAYLM_RESULT ", 1)[1].splitlines()[0])
    assert result["dataset"].startswith("tiny@v")
    manifest = json.loads((Path(result["uri"]) / "manifest.json").read_text())
    assert manifest["counts"]["documents"] == 30 and manifest["counts"]["quarantined"] == 1
    assert manifest["config"]["pack"]["seq_len"] == 16  # the --set reached the job
    listed = run_cli("datasets", "list")
    assert listed.returncode == 0 and result["dataset"] in listed.stdout
    shown = run_cli("datasets", "show", "--json", result["dataset"])
    assert json.loads(shown.stdout)["version"] == manifest["version"]
    human = run_cli("datasets", "show", result["dataset"]).stdout
    assert f"dataset version: {result['dataset']}" in human and "report/index.html" in human
    # the job spec the Jobs API hands to anyone who can list jobs holds no token
    token = cluster.read_token(raylm_cluster.token_path)
    jobs = requests.get(f"{raylm_cluster.dashboard_url}/api/jobs/", headers={"Authorization": f"Bearer {token}"},
                        timeout=10).text
    assert "raylm-prepare_data" in jobs and token not in jobs


def test_a_job_whose_work_cannot_start_says_what_holds_the_cluster(raylm_cluster):
    """A data job submitted while another driver holds the cluster's CPUs says in its log, after
    RAYLM_WAIT_NOTICE_S, what it waits for, what is free and who holds the rest; once they are
    freed it says so and completes."""
    import ray

    from raylm.jobs_api import build_submission

    client = cluster.job_client(cluster.resolve_target())
    sub = build_submission("prepare_data", str(ROOT / "tests" / "data" / "tiny.yaml"), ["pack.seq_len=12"], ROOT)
    holder, free = hold_free_cpus()
    try:
        assert free >= 1, ray.available_resources()
        job_id, notice = submit_with_wait_notice(client, sub, timeout=180)
        assert "this job asks for 1 task of {CPU: 1}" in notice, notice
        assert f"free now: 0 of {ray.cluster_resources()['CPU']:g} CPU" in notice, notice
        assert f"Held by: driver {ray.get_runtime_context().get_job_id()} (not a submitted job) {free:g} CPU" in notice
    finally:
        ray.kill(holder)
    status, logs = job_end(client, job_id)
    assert status == "SUCCEEDED", logs[-3000:]
    assert "[raylm] the resources came free after " in logs and "dataset version: tiny@v" in logs
    # Ray Data's own "will hang" warning (every CPU busy as an execution starts) is left to the line
    # above; the tokenize step uses Ray Data's current API (no `concurrency` deprecation warning)
    assert "will hang" not in logs and "is deprecated" not in logs, logs[-3000:]


def test_the_wait_watch_never_brings_ray_back_after_the_driver_shut_it_down(raylm_cluster):
    """The watch looks at the cluster every few seconds from a thread of the driver. A look after
    the driver has shut Ray down used to start Ray again (every public Ray API connects or starts
    one when none is connected): a job on its own local Ray started a whole second one as it
    exited. Here a driver starts the watch, looks a few times, shuts Ray down and waits."""
    script = f"""
import sys, time
sys.path.insert(0, {str(ROOT / 'platform')!r})
import ray
from raylm import waiting
ray.init(address={raylm_cluster.gcs_address!r}, log_to_driver=False)
watch = waiting.start(ray.get_runtime_context().get_job_id())
time.sleep(1.5)  # three looks (every 0.5 s at this notice time)
ray.shutdown()
time.sleep(2)
print("connected after shutdown:", ray.is_initialized())
"""
    env = dict(os.environ, RAYLM_WAIT_NOTICE_S="1", RAY_ADDRESS=raylm_cluster.gcs_address)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "connected after shutdown: False" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert "SIGTERM handler is not set" not in proc.stderr  # ray.init called from the watch's thread


def test_exit_code_follows_the_job(raylm_cluster):
    proc = run_cli("submit", "prepare_data", "--config", "tests/data/tiny.yaml",
                   "--set", "sources.0.uri=tests/data/missing.jsonl")
    assert proc.returncode == 2
    assert "no such file or directory" in proc.stdout and "missing.jsonl" in proc.stdout
    assert "Traceback" not in proc.stdout


def test_bad_config_is_refused_before_submitting(raylm_cluster):
    before = len(cluster.job_client(cluster.resolve_target()).list_jobs())
    proc = run_cli("submit", "prepare_data", "--config", "tests/data/tiny.yaml", "--set", "pack.seq_lenn=8")
    assert proc.returncode == 2
    assert "unknown key `pack.seq_lenn`; did you mean `pack.seq_len`?" in proc.stderr
    assert len(cluster.job_client(cluster.resolve_target()).list_jobs()) == before


def test_plain_ray_job_submit_with_raylm_env(raylm_cluster):
    exports = run_cli("env")
    assert exports.returncode == 0
    env = no_token_env()
    for line in exports.stdout.splitlines():
        key, value = line.removeprefix("export ").split("=", 1)
        env[key] = value
    proc = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "submit", "--working-dir", ".", "--",
                           "python", "jobs/prepare_data.py", "--config", "tests/data/tiny.yaml"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "dataset version: tiny@v" in proc.stdout


def test_up_again_is_a_no_op(raylm_cluster):
    proc = run_cli("up")
    assert proc.returncode == 0 and "already running" in proc.stdout
    assert cluster.ClusterState.load(cluster.home()).session_id == raylm_cluster.session_id


def test_down_without_a_cluster_says_so(tmp_path):
    proc = run_cli("down", env={"RAYLM_HOME": str(tmp_path)})
    assert proc.returncode == 0 and "no raylm cluster to stop" in proc.stdout
    proc = run_cli("status", env={"RAYLM_HOME": str(tmp_path), "RAY_ADDRESS": ""})
    assert proc.returncode == 1 and "run `raylm up`" in proc.stderr
    proc = run_cli("undeploy", "authors", env={"RAYLM_HOME": str(tmp_path), "RAY_ADDRESS": ""})
    assert proc.returncode == 1 and "no cluster to ask" in proc.stderr and "Traceback" not in proc.stderr


def test_free_ports_are_never_handed_out_twice():
    """A cluster takes nine free ports at once; the kernel can give one free port to two binds in
    a row (here: 3 repeats in 300 plain binds), which once gave the demo's Serve fallback proxy the
    dashboard agent's port."""
    import socket

    from raylm.cluster import free_port

    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    with socket.socket() as s:  # and what it hands out is free
        s.bind(("127.0.0.1", ports[-1]))


def test_no_process_is_given_a_port_the_cluster_was_given(raylm_cluster, tmp_path):
    """`raylm up` gives Serve ports that stay unbound until Serve starts, maybe minutes later; a
    process beside the cluster (a test run, a second `up`) must not be handed one meanwhile. The
    session's cluster recorded all eleven; then a cluster state listing 500 ports that were just
    free, and 500 free ports asked for in another process with that state: none of them (the
    kernel alone repeated 14 in a try here)."""
    import socket

    from raylm.cluster import SERVE_PORT_VARS, ClusterState, _name, _session_procs

    state = ClusterState.load(cluster.home())
    assert len(set(state.ports)) == 11, state.ports  # GCS, dashboard, 5 of Ray's agents, 4 of Serve's
    assert int(raylm_cluster.gcs_address.rsplit(":", 1)[1]) in state.ports
    assert int(raylm_cluster.dashboard_url.rsplit(":", 1)[1]) in state.ports
    raylet = next(p for p in _session_procs(raylm_cluster.session_id) if "raylet" in _name(p))
    assert {int(raylet.environ()[k]) for k in SERVE_PORT_VARS} <= set(state.ports)

    socks = []
    for _ in range(500):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    reserved = sorted(s.getsockname()[1] for s in socks)
    for s in socks:
        s.close()
    home = tmp_path / "home"
    home.mkdir()
    ClusterState(session_id=0, gcs_address="127.0.0.1:1", dashboard_url="http://127.0.0.1:2", temp_dir=str(tmp_path),
                 token_path=str(tmp_path / "t"), num_cpus=None, started_at=0.0, ports=reserved).save(home)
    script = ("import json, sys; sys.path.insert(0, sys.argv[1]); from raylm.cluster import free_port; "
              "print(json.dumps([free_port() for _ in range(500)]))")
    proc = subprocess.run([sys.executable, "-c", script, str(ROOT / "platform")], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, RAYLM_HOME=str(home)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    handed = json.loads(proc.stdout)
    assert len(handed) == 500 and not set(handed) & set(reserved)

def test_up_gives_rays_daemons_raylms_settings(raylm_cluster):
    """The daemons `raylm up` starts run with `cluster.RAY_DEFAULTS` (the log monitor lists the
    log directory once a second, the agent scans events every 10 s) unless the user set them."""
    from raylm.cluster import RAY_DEFAULTS, _name, _session_procs

    daemons = {}
    for p in _session_procs(raylm_cluster.session_id):
        for role in ("log_monitor", "gcs_server", "raylet"):
            if role in _name(p) or role in " ".join(p.cmdline()):
                daemons.setdefault(role, p)
    assert set(daemons) == {"log_monitor", "gcs_server", "raylet"}, daemons
    from raylm.cluster import SERVE_PORT_VARS, haproxy_available

    expected = {k: os.environ.get(k, v) for k, v in RAY_DEFAULTS.items()}
    if not haproxy_available():  # no HAProxy binary here (macOS): Serve keeps its own proxy
        expected["RAY_SERVE_ENABLE_HA_PROXY"] = os.environ.get("RAY_SERVE_ENABLE_HA_PROXY")
    for role, p in daemons.items():
        env = p.environ()
        assert {k: env.get(k) for k in RAY_DEFAULTS} == expected, role
    # Serve's HAProxy mode: this cluster's own ports for what Ray fixes (8404, 9101, 8500, 9500),
    # so a second cluster on the machine serves too
    env = daemons["raylet"].environ()
    ports = [int(env[k]) for k in SERVE_PORT_VARS]
    assert len(set(ports)) == 4 and not set(ports) & {8404, 9101, 8500, 9500}, ports


def test_raylms_own_log_lines_from_several_processes_are_not_merged():
    """Ray's driver merges lines of different processes that differ only in numbers (three
    trials' progress became one line "[repeated 3x across cluster]", counted up to 5 s later, after
    the job's summary). With Ray's deduplication on, as in a user's job: raylm's lines from three
    processes all come out at once; Ray's own repeated warning is still merged."""
    code = """
import json
import ray
from ray._private.ray_logging import stdout_deduplicator as d
from raylm.runtime import keep_own_lines
keep_own_lines()
out = []
for pid in (11, 12, 13):
    batch = {"ip": "10.0.0.1", "pid": pid, "job": "01", "is_err": False, "actor_name": None, "task_name": None,
             "lines": [f"[train] step 20/40 loss 0.{pid} tok/s 9{pid}", f"Warning: {pid} blocks were spilled"]}
    for b in d.deduplicate(batch):
        out += b["lines"]
print(json.dumps(out))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_DEDUP_LOGS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    lines = json.loads(out.stdout.strip().splitlines()[-1])
    assert [ln for ln in lines if ln.startswith("[train]")] == [f"[train] step 20/40 loss 0.{p} tok/s 9{p}"
                                                                for p in (11, 12, 13)]
    assert sum(ln.startswith("Warning:") for ln in lines) == 1, lines  # Ray's merging of the rest stays
