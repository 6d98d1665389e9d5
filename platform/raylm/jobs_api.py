"""Stage jobs through Ray's Jobs API: which stages there are, the request that submits one (its
config validated here first), following a job's log to its end, and its exit code. `raylm
submit / logs / stop` (cli.py) and `make demo` (demo.py) use it."""

from __future__ import annotations

import asyncio
import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import Sequence

from raylm import config
from raylm.cluster import ClusterError

# stage name -> the config model its job validates (imported lazily: "module:Class")
STAGES = {
    "prepare_data": "raylm.data.config:DataConfig",
    "train": "raylm.train.config:TrainConfig",
    "deploy": "raylm.serve.config:DeployConfig",
    "evaluate": "raylm.evaluate.config:EvaluateConfig",
    "tune": "raylm.tune.config:TuneConfig",
    "ensemble": "raylm.tune.config:EnsembleConfig",
    "pipeline": "raylm.pipeline:PipelineConfig",
}

# Never uploaded with a job: environments, caches, local state, VCS.
UPLOAD_EXCLUDES = [".venv/", "venv/", ".raylm/", ".cache/", ".git/", "**/__pycache__/", "*.egg-info/",
                   ".pytest_cache/", ".device/", "build/", "dist/", "*.pyc",
                   # secrets never travel with a job: anyone who may run jobs can read its working_dir
                   ".env", ".env.*", "*.pem", "*.key", "**/keys.json"]

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}



def project_root() -> Path:
    """The directory uploaded as a job's working_dir: the nearest parent of the current
    directory with jobs/ in it, else the checkout raylm was installed from."""
    for d in [Path.cwd(), *Path.cwd().parents]:
        if (d / "jobs").is_dir() and (d / "platform" / "raylm").is_dir():
            return d
    src = Path(__file__).resolve().parents[2]
    if (src / "jobs").is_dir():
        return src
    raise ClusterError("cannot find the raylm project (a directory with jobs/ and platform/raylm/); run from inside it")


def model_for(stage: str):
    module, cls = STAGES[stage].split(":")
    return getattr(__import__(module, fromlist=[cls]), cls)


def build_submission(stage: str, config_path: str, overrides: Sequence[str], root: Path) -> dict:
    """Validate the config here (fast, clear errors) and build the Jobs API request."""
    if stage not in STAGES:
        raise config.ConfigError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    script = root / "jobs" / f"{stage}.py"
    if not script.is_file():
        raise config.ConfigError(f"{script} does not exist")
    cfg_file = Path(config_path).expanduser().resolve()
    cfg = config.load(model_for(stage), cfg_file, overrides)
    if stage == "pipeline":
        from raylm.pipeline import check

        check(cfg, str(cfg_file))  # every stage's config too
    try:
        rel = cfg_file.relative_to(root)
    except ValueError:
        raise config.ConfigError(f"the config {cfg_file} must be inside the project ({root}): the project "
                                 "directory is what is uploaded as the job's working_dir") from None
    args = [f"jobs/{stage}.py", "--config", str(rel)]
    for o in overrides:
        args += ["--set", o]
    return {
        "entrypoint": "python " + shlex.join(args),
        "runtime_env": {"working_dir": str(root), "excludes": UPLOAD_EXCLUDES},
        "submission_id": f"raylm-{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
        "metadata": {"raylm_stage": stage, "raylm_config": str(rel)},
    }


def status_of(info) -> str:
    return info.status.value if hasattr(info.status, "value") else str(info.status)


def exit_code(info) -> int:
    status = status_of(info)
    if status == "SUCCEEDED":
        return 0
    code = getattr(info, "driver_exit_code", None)
    if status == "STOPPED":
        return 130
    return code if isinstance(code, int) and code != 0 else 1


def follow(client, job_id: str, poll_s: float = 0.5) -> int:
    """Stream the job's log until it ends; return its exit code. Ray's log stream notices the end
    of a job 2-3 s late (the dashboard re-reads the log and the job state once a second at
    several layers), so the job's state is polled alongside: once it is final, the stream is
    dropped and the rest of the log (what the stream had not sent yet) is printed from the
    stored log."""
    sent = 0

    async def tail() -> None:
        nonlocal sent
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()
            sent += len(chunk)

    async def watch() -> bool:
        """True when the job ended before the stream did."""
        stream = asyncio.ensure_future(tail())
        try:
            while not stream.done():
                if status_of(await asyncio.to_thread(client.get_job_info, job_id)) in TERMINAL:
                    return True
                await asyncio.wait([stream], timeout=poll_s)
            stream.result()  # its error, if it failed
            return False
        finally:
            stream.cancel()

    try:
        ended_first = asyncio.run(watch())
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on. `raylm logs {job_id} --follow` resumes, "
              f"`raylm stop {job_id}` stops it.", file=sys.stderr)
        return 130
    if ended_first:
        rest = client.get_job_logs(job_id)[sent:]
        if rest:
            sys.stdout.write(rest)
            sys.stdout.flush()
    while True:
        info = client.get_job_info(job_id)
        status = status_of(info)
        if status in TERMINAL:
            break
        time.sleep(poll_s)
    code = exit_code(info)
    print(f"\njob {job_id}: {status}" + (f" (exit code {code})" if code else "")
          + (f": {info.message}" if code and info.message else ""), file=sys.stderr)
    return code


def submit_with_retry(client, sub: dict, wait: float = 90) -> str:
    """Submit; a cluster that has just started answers "No available agent" until its job agent
    registers, so wait for it (up to `wait` seconds) instead of failing."""
    deadline = time.time() + wait
    while True:
        try:
            return client.submit_job(**sub)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise ClusterError(f"the Jobs API refused the submission: {str(e).splitlines()[-1]}") from None
            time.sleep(2)
