"""`jobs/train.py`: train a model on a dataset version with Ray Train and register it."""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

from raylm import config, storage
from raylm.cluster import home
from raylm.train.config import TrainConfig


MATERIALIZE_BYTES = 2 << 30  # packed datasets up to this size are read before training starts


def default_runs() -> str:
    return str(home() / "runs")


def dataset_meta(cfg: TrainConfig) -> dict[str, Any]:
    """What the workers need to know about the dataset version (a user error if it is missing)."""
    from raylm.data import versions

    try:
        m = versions.resolve(cfg.data.dataset, cfg.data.root)
    except FileNotFoundError as e:
        raise config.ConfigError(f"data.dataset: {e}") from None
    if not m["splits"]["train"]["blocks"]:
        raise config.ConfigError(f"data.dataset: {m['id']} has no packed train blocks")
    return {
        "dataset_id": m["id"], "uri": m["uri"], "seq_len": m["config"]["pack"]["seq_len"],
        "vocab_size": m["tokenizer"]["vocab_size"], "eos_id": m["tokenizer"]["eos_id"], "pad_id": None,
        "tokenizer_uri": storage.join(m["uri"], m["tokenizer"]["path"]),
        "has_validation": bool(m["splits"]["validation"]["blocks"]),
        "train_blocks": m["splits"]["train"]["blocks"],
        "validation_blocks": m["splits"]["validation"]["blocks"],
    }


def build_trainer(cfg: TrainConfig, meta: dict[str, Any]):
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from raylm.train.loop import train_loop

    ray.data.DataContext.get_current().execution_options.preserve_order = True  # same data order every run
    t = cfg.train
    # Small datasets are read into the object store before the workers take their CPUs, so
    # ingest never waits for a CPU that training holds (2 workers on a 2-CPU laptop). Larger
    # ones stream, and need a CPU left over for Ray Data.
    packed_bytes = 4 * meta["seq_len"] * (meta["train_blocks"] + meta.get("validation_blocks", 0))
    materialize = packed_bytes <= MATERIALIZE_BYTES
    if not materialize:
        spare = ray.cluster_resources().get("CPU", 0) - t.num_workers * t.cpus_per_worker
        if spare < 1:
            raise config.ConfigError(
                f"the training workers take every CPU ({t.num_workers} x {t.cpus_per_worker}) and leave none to "
                "stream the dataset: lower train.cpus_per_worker or train.num_workers")
    datasets = {}
    for split in ("train", "validation"):
        if split == "train" or meta["has_validation"]:
            fs, path = storage.arrow_fs(storage.join(meta["uri"], "packed", split))
            ds = ray.data.read_parquet(path, filesystem=fs)
            datasets[split] = ds.materialize() if materialize else ds
    runs_fs, runs_path = storage.arrow_fs(cfg.output.storage or default_runs())
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop,
        train_loop_config={"train_config": cfg.model_dump(mode="json"), "dataset": meta},
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=runs_path, storage_filesystem=runs_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(enable_shard_locality=False),
    )


def run(cfg: TrainConfig, meta: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    meta = meta or dataset_meta(cfg)
    trainer = build_trainer(cfg, meta)
    print(f"[train] {cfg.name}: {cfg.model.arch}-{cfg.model.preset} on {meta['dataset_id']}, strategy "
          f"{cfg.train.strategy}, {cfg.train.num_workers} worker(s), {cfg.train.max_steps} steps", flush=True)
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    return {"run": cfg.name, "model": metrics.get("model") or None, "metrics": metrics,
            "checkpoint": result.checkpoint.path if result.checkpoint else None}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = config.job_argparser("Train a model on a dataset version (raylm train job).").parse_args(argv)
    cfg = config.load(TrainConfig, args.config, args.overrides)
    meta = dataset_meta(cfg)  # a missing dataset fails here, before Ray starts
    from raylm.runtime import init_ray

    init_ray()
    out = run(cfg, meta)
    m = out["metrics"]
    print(f"run {out['run']}: step {m.get('step')}, loss {m.get('loss', float('nan')):.4f}"
          + (f", val_loss {m['val_loss']:.4f} (ppl {m['val_ppl']:.1f})" if "val_loss" in m else ""), flush=True)
    if out["model"]:
        print(f"registered model: {out['model']}", flush=True)
    print("RAYLM_RESULT " + json.dumps({"run": out["run"], "model": out["model"],
                                        "metrics": {k: v for k, v in m.items() if isinstance(v, (int, float))}}),
          flush=True)
    return 0
