"""`jobs/prepare_data.py`: build (or reuse) a dataset version from a data config."""

from __future__ import annotations

import json
from typing import Optional, Sequence

from raylm import config
from raylm.data.config import DataConfig


def summary(m: dict) -> str:
    lines = [f"dataset version: {m['id']}" + ("  (reused: already built)" if m.get("reused") else ""),
             f"written to:      {m['uri']}"]
    for split, s in m["splits"].items():
        lines.append(f"  {split:<10} {s['documents']:>6} documents  {s['tokens']:>10} tokens  {s['blocks']:>7} blocks"
                     + (f"  {s['trained_tokens']:>8} answer tokens" if "trained_tokens" in s else ""))
    c = m["counts"]
    lines.append(f"records read {c['records_read']}" + (f", augmented {c['augmented']}" if c.get("augmented") else "")
                 + f", quarantined {c['quarantined']}, dropped "
                 f"{sum(c['dropped'].values())}; tokenizer {m['tokenizer']['kind']} "
                 f"(vocab {m['tokenizer']['vocab_size']})")
    if m["quarantine"]["count"]:
        lines.append(f"quarantine:      {m['quarantine']['uri']}")
    return "\n".join(lines)


def steps_table(m: dict) -> str:
    """One line per step: rows in and out, and what it dropped, quarantined, changed or added."""
    lines = ["steps:"]
    for r in m["steps"]:
        if "rows_in" not in r or r["step"] in ("tokenize",):
            continue
        what = [f"{k} {sum(r[k].values())}" for k in ("dropped", "quarantined") if sum((r.get(k) or {}).values())]
        what += [f"{k.replace('rows_', '')} {r[k]}" for k in ("rows_changed", "rows_added") if r.get(k)]
        if r.get("found") is not None:
            what.append("found " + (", ".join(f"{k} {v}" for k, v in r["found"].items() if v) or "none"))
        if r.get("lines_removed"):
            what.append(f"{r['lines_removed']} boilerplate lines removed")
        lines.append(f"  {r['step']:<14} {r['rows_in']:>7} -> {r['rows_out']:<7} {'; '.join(what)}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = config.job_argparser("Prepare a dataset version (raylm data job).").parse_args(argv)
    cfg = config.load(DataConfig, args.config, args.overrides)
    from raylm.data import pipeline, sources
    from raylm.runtime import init_ray

    for src in cfg.sources:  # a missing input is a user error: say so before starting Ray
        sources.fingerprint(src)
    init_ray(config=cfg)  # on several nodes: every local path it names must be shared
    manifest = pipeline.run(cfg)
    print(summary(manifest), flush=True)
    print(steps_table(manifest), flush=True)
    if (manifest.get("files") or {}).get("report"):
        print(f"data report:     {manifest['uri']}/{manifest['files']['report']}", flush=True)
    print("RAYLM_RESULT " + json.dumps({"dataset": manifest["id"], "uri": manifest["uri"],
                                        "reused": bool(manifest.get("reused"))}), flush=True)
    return 0
