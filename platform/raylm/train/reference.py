"""The DPO reference's log-probabilities, precomputed (`preference.reference_logps`): every pair
scored once with the model as it starts, before training, and carried in two columns
(`REF_COLUMNS`) that the batches read (`loop.host_batch` -> `ref_logps`, which
`losses.Preference` uses instead of a reference copy on every worker).

    reference_mode(cfg) -> "live" | "precomputed" | "none"   (auto resolved by the strategy; none: orpo, simpo)
    reference_logps(table, model, device) -> table with REF_COLUMNS
    with_reference_logps(cfg, meta, tables, datasets)    (the train job: a Ray task or a Ray Data actor)
    reference_tables(cfg, meta, tables)                  (in this process: a search's trial)
"""

from __future__ import annotations

import time
from typing import Any, Optional

import torch

from raylm.train.config import TrainConfig


REF_COLUMNS = ("ref_chosen_logp", "ref_rejected_logp")  # a pair table's precomputed reference log-probabilities
_SPLIT = "_reference_split"  # (streamed splits, scored together: which one a row came from)


def has_reference_logps(tables: dict[str, Any]) -> bool:
    """Whether every table of pairs carries the reference's log-probabilities already."""
    return all(all(c in tb.column_names for c in REF_COLUMNS) for tb in tables.values())


def reference_mode(cfg: TrainConfig) -> str:
    """`live`, `precomputed` or `none`: what `preference.reference_logps` means for this run (auto: precomputed
    where the strategy shards the model, because it would not fit a worker twice); `none` for a
    loss without a reference (orpo, simpo)."""
    if cfg.preference.loss in ("orpo", "simpo"):
        return "none"
    mode = cfg.preference.reference_logps
    if mode == "auto":
        t = cfg.train
        sharded = t.strategy == "fsdp" or (t.strategy == "deepspeed" and t.deepspeed.stage == 3)
        mode = "precomputed" if sharded else "live"
    return mode


def reference_logps(table, model: torch.nn.Module, device: torch.device, bf16: bool = False,
                    batch_size: int = 8):
    """A table of preference pairs with the reference's log-probability of each pair's chosen and
    rejected answer (`REF_COLUMNS`), as `Preference` computes it live."""
    import contextlib

    import pyarrow as pa

    from raylm.train.loop import host_batch
    from raylm.train.losses import sequence_logps

    table = table.drop_columns([c for c in REF_COLUMNS if c in table.column_names])
    chosen: list[float] = []
    rejected: list[float] = []
    cast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    model = model.to(device).eval()
    with torch.inference_mode(), cast:
        for i in range(0, table.num_rows, batch_size):
            b = host_batch(table.slice(i, batch_size), "causal_lm", pin=False)
            logps = sequence_logps(model(input_ids=b["input_ids"].to(device)).logits,
                                   b["labels"].to(device)).float().cpu().tolist()
            chosen += logps[:len(logps) // 2]
            rejected += logps[len(logps) // 2:]
    for name, values in zip(REF_COLUMNS, (chosen, rejected)):
        table = table.append_column(name, pa.array(values, pa.float32()))
    return table


class _ReferenceLogps:
    """Ray Data actor: the reference model, adding its log-probabilities to batches of pairs."""

    def __init__(self, cfg: dict[str, Any], meta: dict[str, Any]):
        self.cfg = TrainConfig.model_validate(cfg)
        self.model, self.device = _reference_model(self.cfg, meta)

    def __call__(self, batch):
        return reference_logps(batch, self.model, self.device, bf16=self.cfg.train.precision == "bf16")


def _tag(batch, split: str):
    import pyarrow as pa

    return batch.append_column(_SPLIT, pa.array([split] * batch.num_rows, pa.string()))


def _only(batch, split: str):
    import pyarrow.compute as pc

    return batch.filter(pc.equal(batch.column(_SPLIT), split)).drop_columns([_SPLIT])


def _reference_model(cfg: TrainConfig, meta: dict[str, Any]):
    """The reference as the training loop builds its model (model.path; LoRA adapters start at zero)."""
    from raylm.train import models

    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    device = torch.device("cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu")
    model = models.build(cfg.model, meta["vocab_size"], meta["seq_len"], meta["eos_id"], meta.get("pad_id"))
    return model, device


def reference_tables(cfg: dict[str, Any], meta: dict[str, Any], tables: dict[str, Any]) -> dict[str, Any]:
    """Tables of pairs with the reference's log-probabilities, computed in this process."""
    c = TrainConfig.model_validate(cfg)
    model, device = _reference_model(c, meta)
    return {k: reference_logps(tb, model, device, bf16=c.train.precision == "bf16") for k, tb in tables.items()}


def with_reference_logps(cfg: TrainConfig, meta: dict[str, Any], tables: Optional[dict[str, Any]],
                         datasets: Optional[dict[str, Any]]) -> tuple[Optional[dict], Optional[dict]]:
    """Preference pairs with the reference's log-probabilities (`preference.reference_logps:
    precomputed`), computed once before training with one worker's resources: the tables in one
    Ray task, the streamed datasets (every split) by one Ray Data actor, materialized: it is done
    before the workers start."""
    import ray

    if tables is not None and has_reference_logps(tables):  # (a search's trial: scored once for all)
        return tables, datasets
    t = cfg.train
    resources = {"num_cpus": t.cpus_per_worker, "num_gpus": 1 if t.use_gpu else 0}
    t0 = time.time()
    if tables is not None:
        tables = ray.get(ray.remote(**resources)(reference_tables).remote(cfg.model_dump(mode="json"), meta, tables))
        pairs = sum(tb.num_rows for tb in tables.values())
    else:
        # every split through one actor (one copy of the model loaded), tagged to be told apart after
        tagged = [ds.map_batches(_tag, fn_kwargs={"split": k}, batch_format="pyarrow", batch_size=None)
                  for k, ds in datasets.items()]
        scored = tagged[0].union(*tagged[1:]).map_batches(
            _ReferenceLogps, fn_constructor_kwargs={"cfg": cfg.model_dump(mode="json"), "meta": meta},
            compute=ray.data.ActorPoolStrategy(size=1), batch_size=64, batch_format="pyarrow",
            **resources).materialize()
        pairs = scored.count()
        # each split materialized on its own (then the union is freed): an evaluation pass reads the
        # validation pairs, not every block of the union
        datasets = {k: scored.map_batches(_only, fn_kwargs={"split": k}, batch_format="pyarrow",
                                          batch_size=None).materialize() for k in datasets}
    what = "rated answers (each beside a mismatched one)" if cfg.preference.loss == "kto" else "pairs"
    print(f"[train] {cfg.name}: the reference's log-probabilities of {pairs} {what} computed in {time.time() - t0:.1f} s "
          f"(preference.reference_logps: precomputed; the workers hold no copy of {cfg.model.path})", flush=True)
    return tables, datasets
