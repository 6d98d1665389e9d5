"""The search report: `results.parquet` / `results.csv` (a row per trial) and `report.html`
with PNG plots (the metric of every trial over steps, the metric against each searched field,
training-loss curves of the top trials), written under the search's storage."""

from __future__ import annotations

import html
import json
import tempfile
from pathlib import Path
from typing import Any

from raylm import storage
from raylm.data.report import _save
from raylm.evaluate.report import _table


def _plots(cfg, rows: list[dict[str, Any]], out: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    metric = cfg.metric
    curves = [(r["trial"], json.loads(r["curve"])) for r in rows if r.get("curve")]
    if curves:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for name, pts in curves:
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, lw=1, label=name[-5:])
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} of every trial over training", fontsize=10)
        if len(curves) <= 12:
            ax.legend(fontsize=6, ncol=2)
        files.append((f"{metric} per trial over time", _save(fig, out / "trials.png")))
    for key in cfg.space:
        pts = [(r.get(f"param:{key}"), r.get(metric)) for r in rows if isinstance(r.get(metric), float)]
        pts = [(x, y) for x, y in pts if x is not None]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        xs = [x for x, _ in pts]
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs):
            ax.scatter(xs, [y for _, y in pts])
            if cfg.space[key].kind == "loguniform":
                ax.set_xscale("log")
        else:
            cats = sorted({str(x) for x in xs})
            ax.scatter([cats.index(str(x)) for x in xs], [y for _, y in pts])
            ax.set_xticks(range(len(cats)), labels=cats, fontsize=8)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} vs {key}", fontsize=10)
        files.append((f"{metric} vs {key}", _save(fig, out / f"param_{key.replace('.', '_')}.png")))
    ranked = sorted([r for r in rows if isinstance(r.get(metric), float) and r.get("loss_curve")],
                    key=lambda r: r[metric], reverse=cfg.resolved_mode == "max")[:5]
    if ranked:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for r in ranked:
            pts = json.loads(r["loss_curve"])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, lw=1,
                    label=f"{r['trial'][-5:]} ({metric} {r[metric]:.4g})")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title("Learning curves of the top trials", fontsize=10)
        ax.legend(fontsize=7)
        files.append(("Learning curves of the top trials", _save(fig, out / "top_curves.png")))
    return files


def write(cfg, rows: list[dict[str, Any]], summary: dict[str, Any], uri: str) -> str:
    """Writes the results table and the HTML report under `uri`; returns the HTML's URI."""
    import pandas as pd

    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        df = pd.DataFrame(rows)
        df.to_parquet(out / "results.parquet", index=False)
        df.drop(columns=[c for c in ("curve", "loss_curve") if c in df], errors="ignore").to_csv(
            out / "results.csv", index=False)
        files = _plots(cfg, rows, out)
        metric = cfg.metric
        params = [k for k in cfg.space]
        ranked = sorted(rows, key=lambda r: (not isinstance(r.get(metric), float),
                                             (r.get(metric) or 0) * (1 if cfg.resolved_mode == "min" else -1)))
        table = [[r["trial"], r["status"], r.get("steps") or 0]
                 + ([r.get("fold")] if cfg.cv else [])
                 + [r.get(f"param:{k}", "-") for k in params]
                 + [r.get(metric) if isinstance(r.get(metric), float) else "-"] for r in ranked]
        best = summary.get("best")
        parts = [
            "<!doctype html><html><head><meta charset='utf-8'><title>raylm search: "
            f"{html.escape(cfg.name)}</title><style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}"
            "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
            "text-align:right}th{background:#eee}td:first-child{text-align:left}</style></head><body>",
            f"<h1>Search {html.escape(cfg.name)}</h1>",
            f"<p>{html.escape(summary['algorithm'])} search with the {html.escape(summary['scheduler'])} scheduler "
            f"on <b>{html.escape(summary['dataset'])}</b>: {summary['trials']} trials ({summary['errors']} failed), "
            f"{summary['trial_steps']} trial-steps, {summary['seconds']:.0f} s; optimizing {html.escape(metric)} "
            f"({summary['mode']}).</p>",
        ]
        if best:
            parts.append(f"<p><b>Best</b>: {html.escape(metric)} {best[metric]:.5g} with "
                         + html.escape(", ".join(f"{k}={v}" for k, v in best["params"].items()))
                         + (f" (trial {html.escape(best['trial'])})" if best.get("trial") else "")
                         + (f"; registered as <b>{html.escape(best['model'])}</b>" if best.get("model") else "")
                         + ".</p>")
        if summary.get("default"):
            parts.append(f"<p>The base config's own values: {html.escape(metric)} "
                         f"{summary['default'][metric]:.5g}.</p>")
        if summary.get("cv"):
            rows_cv = [[json.dumps(e["params"]), e["folds"]]
                       + [f"{e[m]['mean']:.4f} ± {e[m]['std']:.4f}" if m in e else "-"
                          for m in (metric, "val_loss")] for e in summary["cv"]]
            parts += [f"<h2>Cross-validation ({cfg.cv.folds} folds)</h2>",
                      _table(rows_cv, ["params", "folds", f"{metric} mean ± std", "val_loss mean ± std"])]
        parts += ["<h2>Trials</h2>", _table(table, ["trial", "status", "steps"] + (["fold"] if cfg.cv else [])
                                            + params + [metric])]
        parts += [f"<h2>{html.escape(t)}</h2><img src='{f}' alt='{html.escape(t)}'>" for t, f in files]
        parts.append("<p>Every trial is in results.parquet / results.csv; the summary in summary.json.</p>"
                     "</body></html>")
        (out / "report.html").write_text("\n".join(parts))
        storage.upload_dir(out, uri)
    return storage.join(uri, "report.html")
