"""Ray Train overhead: raylm's own training job code (Ray Train workers, data through
`get_dataset_shard`) against the same model, strategy objects and data in a plain
`torch.distributed` loop without Ray (one process per worker), measured in the same run.

    # one GPU (issue 10): 500M Llama, bf16, seq 2048
    python benchmarks/train_overhead.py --preset 500m --seq-len 2048 --batch-size 8 --steps 30 \
        --strategies fsdp,zero2,zero3
    # CPU, 2 workers, gloo (issue 4); baselines at niceness 0 (as users start a script) and 15 (Ray's workers')
    python benchmarks/train_overhead.py --device cpu --workers 2 --preset small --seq-len 256 \
        --batch-size 4 --steps 50 --vocab 8192 --strategies ddp,fsdp --rounds 4 --plain-nice 0,15

`--steady-after N` leaves the first N steps out of both sides' steady-state tokens/s (default 5, at
most a quarter of --steps): a Ray worker's first ~20 steps on CPU run slower than its later ones
(benchmarks/RESULTS.md, "Step by step"), so `--steps 80 --steady-after 20` measures the steps after.

Prints one JSON line per strategy: steady-state tokens/s (and MFU and peak memory on a GPU)
through Ray Train, the plain loop's in the same run, and the Ray overhead in percent. The data
is a synthetic dataset version (uniform random tokens): throughput does not depend on what the
tokens say. On the lent H100 see ../shared/device/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

STRATEGY_SETS = {
    "ddp": ["train.strategy=ddp"],
    "fsdp": ["train.strategy=fsdp"],
    "zero2": ["train.strategy=deepspeed", "train.deepspeed.stage=2"],
    "zero3": ["train.strategy=deepspeed", "train.deepspeed.stage=3"],
}


def synthetic_dataset(root: Path, vocab: int, seq_len: int, blocks: int, seed: int = 0) -> str:
    """A dataset version with only packed train blocks of random tokens."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    uri = root / "synthetic" / "vbench"
    (uri / "packed" / "train").mkdir(parents=True, exist_ok=True)
    ids = np.random.default_rng(seed).integers(1, vocab, size=(blocks, seq_len), dtype=np.int32)
    offsets = np.arange(0, blocks * seq_len + 1, seq_len, dtype=np.int32)
    col = pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids.reshape(-1)))
    pq.write_table(pa.table({"input_ids": col}), uri / "packed" / "train" / "part-0.parquet")
    manifest = {
        "id": "synthetic@vbench", "name": "synthetic", "version": "vbench", "uri": str(uri),
        "created": "1970-01-01T00:00:00+00:00", "config": {"pack": {"seq_len": seq_len}},
        "counts": {"documents": blocks, "tokens": blocks * seq_len, "quarantined": 0, "dropped": {}},
        "splits": {"train": {"documents": blocks, "tokens": blocks * seq_len, "blocks": blocks},
                   "validation": {"documents": 0, "tokens": 0, "blocks": 0},
                   "test": {"documents": 0, "tokens": 0, "blocks": 0}},
        "tokenizer": {"kind": "none", "path": "tokenizer", "vocab_size": vocab, "eos_id": 0},
        "sources": [{"kind": "synthetic"}],
    }
    (uri / "manifest.json").write_text(json.dumps(manifest))
    return str(root)


def train_config(args, data_root: str, key: str, storage: str):
    from raylm import config
    from raylm.train.config import TrainConfig

    sets = STRATEGY_SETS[key] + [
        f"name=bench-{key}", "data.dataset=synthetic", f"data.root={data_root}",
        f"model.preset={args.preset}", "model.arch=llama", f"model.activation_checkpointing={args.act_ckpt}", f"model.compile={args.compile}",
        f"train.num_workers={args.workers}", f"train.use_gpu={args.device == 'cuda'}",
        f"train.cpus_per_worker={4 if args.device == 'cuda' else 1}",
        f"train.precision={'bf16' if args.device == 'cuda' else 'fp32'}",
        f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}", "train.warmup_steps=2",
        f"train.log_every={max(1, args.steps // 3)}", f"train.eval_every={10 * args.steps}",
        f"train.checkpoint_every={10 * args.steps}", "train.keep_checkpoints=1",
        f"output.storage={storage}", "output.register_model=false",
        f"train.steady_warmup_steps={args.steady_after}",
        *args.set,  # the user's own overrides come last
    ]
    return config.build(TrainConfig, config.apply_overrides({}, sets))


def plain_loop(args, data_root: str, key: str) -> dict:
    """The same model, strategy object and data in plain processes (torch.distributed, one
    process per worker, this one is rank `args.rank`)."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    import torch.distributed as dist

    from raylm.train import losses, models, strategies
    from raylm.train.loop import cpu_now, cpu_per_step, steady_warmup

    rank, world = args.rank, args.workers
    if int(args.plain_nice):
        os.nice(int(args.plain_nice))  # Ray starts its workers at niceness 15 (raylet's `worker_niceness`)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    cfg = train_config(args, data_root, key, storage="/tmp/unused")
    cuda = args.device == "cuda"
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(int(cfg.train.cpus_per_worker))  # as Ray Train does (OMP_NUM_THREADS)
    if key not in ("zero2", "zero3"):  # DeepSpeed initializes the process group itself
        dist.init_process_group("nccl" if cuda else "gloo", **({"device_id": device} if cuda else {}))
    table = pq.read_table(Path(data_root) / "synthetic" / "vbench" / "packed" / "train")
    col = table.column("input_ids").combine_chunks()
    data = torch.from_numpy(np.asarray(col.values).astype(np.int64).reshape(len(col), -1))[rank::world]
    if cuda:
        data = data.pin_memory()
    torch.manual_seed(0)
    model = models.build(cfg.model, args.vocab, args.seq_len, 0, None)
    n_params = models.num_params(model)
    strat = strategies.setup(model, cfg.train, device, losses.model_loss)  # the loop's causal-LM loss
    bs = cfg.train.batch_size
    warm = steady_warmup(args.steady_after, args.steps)  # as the Ray Train loop leaves out

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()
        if dist.is_initialized():
            dist.barrier()

    for step in range(args.steps):
        if step == warm:
            sync()
            t0, cpu0 = time.time(), cpu_now()
        i = (step * bs) % (len(data) - bs)
        ids = data[i:i + bs].to(device, non_blocking=True)
        strat.micro_step({"input_ids": ids, "labels": ids}, last=True)  # the loop's batch: labels = inputs
        strat.optimizer_step()
    sync()
    tok_s = (args.steps - warm) * bs * args.seq_len * world / (time.time() - t0)
    out = {"tokens_per_second": tok_s, **cpu_per_step(cpu0, args.steps - warm)}
    if cuda:
        flops = models.flops_per_token(model.config, n_params, args.seq_len)
        out.update(mfu=tok_s / world * flops / models.peak_flops(device),
                   peak_memory_gb=torch.cuda.max_memory_allocated(device) / 2**30)
    return out


def run_plain(args, data_root: str, key: str, nice: int = 0) -> dict | None:
    """Start one plain process per worker at niceness `nice`; rank 0's figures come back."""
    # the environment raylm gives its training workers (train.worker_env)
    worker_env = train_config(args, data_root, key, storage="/tmp/unused").train.worker_env
    env = {**os.environ, **worker_env,
           "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), os.environ.get("PYTHONPATH", "")])}
    port = 29500 + os.getpid() % 1000
    common = ["--data-root", data_root, "--preset", args.preset, "--seq-len", str(args.seq_len), "--batch-size",
              str(args.batch_size), "--steps", str(args.steps), "--vocab", str(args.vocab), "--act-ckpt",
              args.act_ckpt, "--compile", args.compile, "--device", args.device, "--workers", str(args.workers),
              "--port", str(port), "--plain-nice", str(nice), "--steady-after", str(args.steady_after),
              *(f"--set={s}" for s in args.set)]
    procs = [subprocess.Popen([sys.executable, __file__, "--plain", key, "--rank", str(r), *common],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in range(args.workers)]
    outs = [p.communicate() for p in procs]
    line = [x for x in outs[0][0].splitlines() if x.startswith("PLAIN ")]
    if not line:
        print(json.dumps({"benchmark": "train_overhead", "strategy": key, "error": "plain loop failed",
                          "stderr": outs[0][1][-1500:]}), flush=True)
        return None
    return json.loads(line[0][6:])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="500m")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--act-ckpt", default="false")
    p.add_argument("--compile", default="false", help="torch.compile each transformer block")
    p.add_argument("--strategies", default="fsdp,zero2,zero3")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers = plain processes")
    p.add_argument("--rounds", type=int, default=1,
                   help="plain, Ray, plain, Ray, ...: medians of this many of each (a noisy machine drifts)")
    p.add_argument("--plain-nice", default="0",
                   help="niceness of the plain processes; a list (0,15) runs one baseline per niceness each round. Ray "
                        "runs its workers at 15, so they yield to every other process (Ray's daemons included): 15 "
                        "compares like for like, 0 is a plain loop as users start it")
    p.add_argument("--steady-after", type=int, default=5,
                   help="warm-up steps both sides leave out of their steady-state tokens/s (at most a quarter of "
                        "--steps; train.steady_warmup_steps)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a training config override for both sides, as `raylm submit --set` takes it (repeatable), "
                        "e.g. --set 'train.worker_env={MALLOC_ARENA_MAX: \"1\"}'; the plain processes get "
                        "train.worker_env too")
    p.add_argument("--plain", help=argparse.SUPPRESS)  # internal: run the plain loop for one strategy
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=29500, help=argparse.SUPPRESS)
    p.add_argument("--data-root", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.plain:
        result = plain_loop(args, args.data_root, args.plain)
        if args.rank == 0:
            print("PLAIN " + json.dumps(result), flush=True)
        return 0

    work = Path(tempfile.mkdtemp(prefix="raylm-bench-"))
    blocks = args.batch_size * args.workers * (args.steps + 2)
    data_root = synthetic_dataset(work / "datasets", args.vocab, args.seq_len, blocks)
    from raylm.runtime import init_ray
    from raylm.train.job import dataset_meta, build_trainer
    from raylm.train.loop import steady_warmup

    init_ray()
    import statistics

    nices = [int(n) for n in str(args.plain_nice).split(",")]
    for key in args.strategies.split(","):
        plain_runs: dict[int, list] = {n: [] for n in nices}
        ray_runs = []
        for _ in range(args.rounds):  # interleaved, so a drift in the machine's speed hits both alike
            bases = {n: run_plain(args, data_root, key, n) for n in nices}  # first, in their own processes
            if any(b is None for b in bases.values()):
                break
            storage = str(work / "runs")
            cfg = train_config(args, data_root, key, storage)
            try:
                m = build_trainer(cfg, dataset_meta(cfg)).fit().metrics
            except Exception as e:  # noqa: BLE001 - report and go on to the next strategy
                print(json.dumps({"benchmark": "train_overhead", "strategy": key, "error": repr(e)[-1500:]}), flush=True)
                break
            finally:
                shutil.rmtree(storage, ignore_errors=True)
            for n in nices:
                plain_runs[n].append(bases[n])
            ray_runs.append(m)
        if not ray_runs:
            continue
        ray_tok = statistics.median(r["steady_tokens_per_second"] for r in ray_runs)
        plain_tok = {n: statistics.median(b["tokens_per_second"] for b in plain_runs[n]) for n in nices}
        m, base = ray_runs[-1], plain_runs[nices[0]][-1]
        row = {
            "benchmark": "train_overhead", "device": args.device, "workers": args.workers, "strategy": key,
            "model": f"llama-{args.preset}", "params_non_embedding": m.get("params_non_embedding"),
            "seq_len": args.seq_len, "batch_size": args.batch_size, "steps": args.steps,
            "precision": "bf16" if args.device == "cuda" else "fp32", "activation_checkpointing": args.act_ckpt,
            "compile": args.compile, "plain_niceness": nices[0], "rounds": len(ray_runs),
            "steady_after_steps": steady_warmup(args.steady_after, args.steps),
            **({"set": args.set} if args.set else {}),
            "ray_tokens_per_s": round(ray_tok, 1),
            "baseline_plain_tokens_per_s": round(plain_tok[nices[0]], 1),
            "ray_overhead_pct": round(100 * (1 - ray_tok / plain_tok[nices[0]]), 2),
            "per_round_overhead_pct": [round(100 * (1 - r["steady_tokens_per_second"] / b["tokens_per_second"]), 1)
                                       for r, b in zip(ray_runs, plain_runs[nices[0]])],
        }
        # CPU seconds a step, rank 0 of each side (process: every thread; thread: the loop's own):
        # more CPU a step is work Ray adds, a slower step at the same CPU is waiting
        for what in ("cpu", "thread_cpu", "thread_page_faults"):
            k = f"steady_{what}_per_step" if what.endswith("faults") else f"steady_{what}_s_per_step"
            if all(k in r for r in ray_runs):
                ray_v = statistics.median(r[k] for r in ray_runs)
                plain_v = statistics.median(b[k] for b in plain_runs[nices[0]])
                row[k.replace("steady_", "ray_")] = round(ray_v, 4)
                row[k.replace("steady_", "baseline_plain_")] = round(plain_v, 4)
                if plain_v:  # (faults can be 0: glibc tunables that keep freed memory)
                    row[f"ray_extra_{what}_pct"] = round(100 * (ray_v / plain_v - 1), 2)
                    row[f"per_round_extra_{what}_pct"] = [round(100 * (r[k] / b[k] - 1), 1) if b[k] else None
                                                         for r, b in zip(ray_runs, plain_runs[nices[0]])]
        if len(nices) > 1:  # the same figures against each niceness of the plain loop
            row["by_plain_niceness"] = {
                str(n): {"baseline_plain_tokens_per_s": round(plain_tok[n], 1),
                         "ray_overhead_pct": round(100 * (1 - ray_tok / plain_tok[n]), 2),
                         "per_round_overhead_pct": [
                             round(100 * (1 - r["steady_tokens_per_second"] / b["tokens_per_second"]), 1)
                             for r, b in zip(ray_runs, plain_runs[n])]} for n in nices}
        if args.device == "cuda":
            row.update(ray_mfu=round(m.get("steady_mfu", 0), 4), ray_peak_memory_gb=round(m.get("peak_memory_gb", 0), 2),
                       baseline_plain_mfu=round(base["mfu"], 4),
                       baseline_plain_peak_memory_gb=round(base["peak_memory_gb"], 2))
        print(json.dumps(row), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
