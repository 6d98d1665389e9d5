"""The evaluation report: `report.json` and `report.html` with PNG plots (confusion matrix,
reliability diagram, per-slice bars, robustness curves), written beside the model."""

from __future__ import annotations

import html
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from raylm import storage
from raylm.data.report import _bar, _save


def _plots(rep: dict[str, Any], out: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: list[tuple[str, str]] = []
    m = rep["metrics"]
    if rep["task"] == "classification":
        labels = rep["labels"]
        fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2.5, 1.0 * len(labels) + 2))
        cm = np.array(m["confusion"])
        ax.imshow(cm, cmap="Blues")
        ax.set_xticks(range(len(labels)), labels=labels, rotation=30, fontsize=8)
        ax.set_yticks(range(len(labels)), labels=labels, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
        ax.set_title("Confusion matrix", fontsize=10)
        files.append(("Confusion matrix", _save(fig, out / "confusion.png")))

        fig, ax = plt.subplots(figsize=(4.5, 4))
        rows = [b for b in m["reliability"] if b["count"]]
        ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
        ax.bar([(b["lo"] + b["hi"]) / 2 for b in rows], [b["accuracy"] for b in rows],
               width=1 / len(m["reliability"]) * 0.9, alpha=0.7, label="accuracy per bin")
        ax.plot([b["confidence"] for b in rows], [b["accuracy"] for b in rows], "o-", color="#C44E52")
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(f"Reliability diagram (ECE {m['ece']:.3f})", fontsize=10)
        ax.legend(fontsize=7)
        files.append(("Reliability diagram", _save(fig, out / "reliability.png")))
    for col, s in rep.get("slices", {}).items():
        groups = list(s["groups"])
        fig, ax = plt.subplots(figsize=(6, 0.35 * len(groups) + 1.2))
        _bar(ax, [f"{g} (n={s['groups'][g]['n']})" for g in groups],
             [round(s["groups"][g].get(s["metric"]) or 0, 4) for g in groups],
             f"{s['metric']} by {col}" + (" (FLAGGED)" if s["flagged"] else ""),
             color="#C44E52" if s["flagged"] else "#4C72B0")
        files.append((f"Slices by {col}", _save(fig, out / f"slices_{col}.png")))
    rob = rep.get("robustness")
    if rob:
        key = rob.get("metric") or rep["headline_metric"]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for op, points in rob["ops"].items():
            xs = [0.0] + [p["strength"] for p in points]
            ax.plot(xs, [m[key]] + [p["metrics"][key] for p in points], "o-", label=op)
        ax.set_xlabel("strength (fraction of words)")
        ax.set_ylabel(key)
        ax.set_title(f"Robustness: {key} under perturbation", fontsize=10)
        ax.legend(fontsize=8)
        files.append(("Robustness", _save(fig, out / "robustness.png")))
    return files


def _table(rows: list[list[Any]], head: list[str]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))

    return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows) + "</table>")


def write(rep: dict[str, Any], uri: str) -> str:
    """Writes report.json, report.html and the PNGs under `uri`; returns the HTML's URI."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        files = _plots(rep, out)
        keys = rep["compare_metrics"]
        compare = [[name] + [c["metrics"].get(k) if c["metrics"].get(k) is not None else "-" for k in keys]
                   for name, c in [("this model", {"metrics": rep["metrics"]})] + list(rep["baselines"].items())]
        slices = [[col, s["metric"], s["best"], s["worst"], s["gap"] if s["gap"] is not None else "-",
                   "yes" if s["flagged"] else "no"] for col, s in rep.get("slices", {}).items()]
        parts = [
            "<!doctype html><html><head><meta charset='utf-8'><title>raylm evaluation: "
            f"{html.escape(rep['model'])}</title><style>body{{font-family:sans-serif;margin:2em;max-width:1000px}}"
            "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
            "text-align:right}th{background:#eee}td:first-child{text-align:left}.flag{color:#C44E52}</style>"
            "</head><body>",
            f"<h1>Evaluation of {html.escape(rep['model'])}</h1>",
            f"<p>{html.escape(rep['task'])} on <b>{html.escape(rep['dataset'])}</b> split "
            f"<b>{html.escape(rep['split'])}</b>: {rep['metrics'].get('n')} documents, {rep['seconds']:.1f} s"
            + ({"windows": f"; texts read whole, in windows of {rep['window']} tokens",
                "truncate": f"; texts cut at {rep['window']} tokens"}.get(rep.get("long_texts"), ""))
            + (f"; probabilities calibrated in training (temperature {rep['temperature']:.3f})"
               if rep.get("temperature") is not None else "") + ".</p>",
            "<h2>Model vs baselines</h2>", _table(compare, ["model"] + keys),
        ]
        if rep.get("promotion"):
            pr = rep["promotion"]
            parts.append(f"<p><b>{'Promoted' if pr['promoted'] else 'Not promoted'}</b> to alias "
                         f"<code>{html.escape(pr['alias'])}</code>: {html.escape(pr['reason'])}</p>")
        if slices:
            parts += ["<h2>Slices</h2>", _table(slices, ["column", "metric", "best", "worst", "gap", "flagged"])]
        if rep.get("robustness"):
            k = rep["robustness"].get("metric") or rep["headline_metric"]
            rows = [[op, p["strength"], p["metrics"][k], p["metrics"][k] - rep["metrics"][k]]
                    for op, pts in rep["robustness"]["ops"].items() for p in pts]
            parts += ["<h2>Robustness</h2>", _table(rows, ["perturbation", "strength", k, "change"])]
        parts += [f"<h2>{html.escape(t)}</h2><img src='{f}' alt='{html.escape(t)}'>" for t, f in files]
        parts.append("<p>Every figure is in report.json.</p></body></html>")
        (out / "report.html").write_text("\n".join(parts))
        (out / "report.json").write_text(json.dumps(rep, indent=2, default=float))
        storage.upload_dir(out, uri)
    return storage.join(uri, "report.html")
