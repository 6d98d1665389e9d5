"""The data report of a dataset version: `report/index.html` with PNG plots beside it.

Plots: document length (characters) and token length histograms, rows dropped per reason per
step, duplicate cluster sizes, language mix, PII found per type, the most frequent tokens.
Everything comes from the manifest plus two small arrays the pipeline collects (per-document
lengths and token counts), so the report never re-reads the data.
"""

from __future__ import annotations

import html
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from raylm import storage


def _bar(ax, labels: list[str], values: list[float], title: str, color: str = "#4C72B0") -> None:
    y = np.arange(len(labels))
    ax.barh(y, values, color=color)
    ax.set_yticks(y, labels=labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=10)
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:g}", va="center", fontsize=7)


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


def plots(manifest: dict[str, Any], lengths: dict[str, np.ndarray], top_tokens: list[tuple[str, int]],
          out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: dict[str, str] = {}
    for key, title, xlabel in (("chars", "Document length", "characters"),
                               ("tokens", "Document length", "tokens")):
        values = lengths.get(key)
        if values is None or not len(values):
            continue
        fig, ax = plt.subplots(figsize=(6, 3))
        bins = np.logspace(np.log10(max(1, values.min())), np.log10(max(2, values.max()) + 1), 30)
        ax.hist(values, bins=bins, color="#4C72B0")
        ax.set_xscale("log")
        ax.set_xlabel(f"{xlabel} per document (log scale)")
        ax.set_ylabel("documents")
        ax.set_title(f"{title} ({xlabel})", fontsize=10)
        files[f"length_{key}"] = _save(fig, out / f"length_{key}.png")

    drops = [(f"{r['step']}: {reason}", n) for r in manifest["steps"]
             for what in ("dropped", "quarantined") for reason, n in (r.get(what) or {}).items()]
    fig, ax = plt.subplots(figsize=(6, max(1.5, 0.3 * len(drops) + 1)))
    if drops:
        _bar(ax, [d[0] for d in drops], [d[1] for d in drops], "Rows dropped or quarantined, per step and reason",
             "#C44E52")
    else:
        ax.text(0.5, 0.5, "no row was dropped or quarantined", ha="center", va="center")
        ax.set_axis_off()
    files["drops"] = _save(fig, out / "drops.png")

    clusters = {r["step"]: r["clusters"] for r in manifest["steps"] if r.get("clusters") is not None}
    if clusters:
        fig, ax = plt.subplots(figsize=(6, 2.5))
        width = 0.8 / len(clusters)
        for k, (step, sizes) in enumerate(clusters.items()):
            xs = [int(s) for s in sizes]
            ax.bar(np.array(xs) + k * width, list(sizes.values()), width=width, label=step)
        ax.set_xlabel("documents per duplicate cluster")
        ax.set_ylabel("clusters")
        ax.set_title("Duplicate cluster sizes", fontsize=10)
        if not any(sizes for sizes in clusters.values()):
            ax.text(0.5, 0.5, "no duplicates found", ha="center", va="center", transform=ax.transAxes)
        ax.legend(fontsize=8)
        files["clusters"] = _save(fig, out / "clusters.png")

    for key, title, field in (("languages", "Language mix (documents)", "languages"),
                              ("pii", "PII and secrets redacted", "found")):
        rows = [r for r in manifest["steps"] if r.get(field) is not None]
        if not rows:
            continue
        counts = rows[-1][field]
        fig, ax = plt.subplots(figsize=(6, max(1.5, 0.3 * len(counts) + 1)))
        items = sorted(counts.items(), key=lambda kv: -kv[1])
        _bar(ax, [k for k, _ in items], [v for _, v in items], title, "#55A868")
        files[key] = _save(fig, out / f"{key}.png")

    if top_tokens:
        fig, ax = plt.subplots(figsize=(6, 0.22 * len(top_tokens) + 1))
        _bar(ax, [repr(t)[1:-1] or "(empty)" for t, _ in top_tokens], [n for _, n in top_tokens],
             f"Top {len(top_tokens)} tokens", "#8172B2")
        files["tokens"] = _save(fig, out / "top_tokens.png")
    return files


def _table(rows: list[list[Any]], head: list[str]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def render(manifest: dict[str, Any], files: dict[str, str]) -> str:
    m = manifest
    step_rows = [[r["step"], r.get("rows_in", ""), r.get("rows_out", ""),
                  ", ".join(f"{k} {v}" for k, v in (r.get("dropped") or {}).items()),
                  ", ".join(f"{k} {v}" for k, v in (r.get("quarantined") or {}).items()),
                  r.get("rows_changed", ""), r.get("bytes_delta", ""), r.get("rows_added", "")]
                 for r in m["steps"] if "rows_in" in r]
    parts = [f"<h1>Dataset {html.escape(m['id'])}</h1>",
             f"<p>{m['counts']['records_read']} records read, {m['counts']['documents']} documents kept, "
             f"{m['counts']['tokens']} tokens; quarantined {m['quarantine']['count']}; created {m['created']}.</p>",
             "<h2>Steps</h2>",
             _table(step_rows, ["step", "rows in", "rows out", "dropped", "quarantined", "rows changed",
                                "bytes changed", "rows added"])]
    for r in m["steps"]:
        if r.get("step", "").startswith("boilerplate"):
            parts.append(f"<h2>Boilerplate removed ({r.get('lines_removed', 0)} lines)</h2>")
            parts.append(f"<p>Windows of lines held by at least {r.get('min_docs')} of {r.get('documents')} "
                         "documents. Most common removed blocks:</p>")
            if r.get("blocks"):
                parts += [f"<details open><summary>in {b['documents']} documents</summary><pre>"
                          f"{html.escape(b['sample'])}</pre></details>" for b in r["blocks"]]
            else:
                parts.append("<p>None found: no block of lines repeats across that many documents.</p>")
        if r.get("removed_sample") is not None:
            parts.append(f"<h2>{html.escape(r['step'])}: removed (sample)</h2>")
            parts.append(_table([[x["id"], x["kept"]] for x in r["removed_sample"]], ["removed", "kept instead"])
                         if r["removed_sample"] else "<p>No duplicates found.</p>")
    parts.append("<h2>Splits</h2>")
    parts.append(_table([[k, v["documents"], v["tokens"], v["blocks"]] for k, v in m["splits"].items()],
                        ["split", "documents", "tokens", "blocks"]))
    titles = {"length_chars": "Document length (characters)", "length_tokens": "Document length (tokens)",
              "drops": "Drops per reason", "clusters": "Duplicate clusters", "languages": "Languages",
              "pii": "PII", "tokens": "Top tokens"}
    parts.append("<h2>Plots</h2>")
    parts += [f'<figure><img src="{html.escape(f)}" alt="{html.escape(titles.get(k, k))}"></figure>'
              for k, f in files.items()]
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #ccc;padding:2px 6px}"
             "pre{background:#f6f6f6;padding:.5em;white-space:pre-wrap}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(m['id'])} data report"
            f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>")


def write(manifest: dict[str, Any], lengths: dict[str, np.ndarray], top_tokens: list[tuple[str, int]],
          uri: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        files = plots(manifest, lengths, top_tokens, Path(d))
        (Path(d) / "index.html").write_text(render(manifest, files), encoding="utf-8")
        storage.upload_dir(d, uri)
