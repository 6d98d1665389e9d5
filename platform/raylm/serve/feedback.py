"""What users said about each served version: the ratings `/v1/feedback` stored, by model and
registry version (`raylm feedback stats`). With a canary beside its model, the two versions'
shares of good ratings side by side, each with its 95% (Wilson) interval.

    stats(uri) -> {"files", "records", "skipped", "versions": [{model, version, n, good, neutral, bad,
                   good_share, good_share_95}]}
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Any

from raylm import storage


def stats(uri: str) -> dict[str, Any]:
    """Counts the ratings of every feedback record under `uri` (the app's `feedback_uri`). Lines
    that are not feedback records are counted as skipped, not fatal."""
    from scipy.stats import binomtest

    counts: dict[tuple[str, str], Counter] = defaultdict(Counter)
    files = storage.glob_files(uri)
    records = skipped = 0
    for f in files:
        for line in storage.read_text(f).splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                rating = int(rec["rating"])
                key = (str(rec.get("model") or "?"), str(rec.get("model_version") or "unknown"))
            except (ValueError, TypeError, KeyError):
                skipped += 1
                continue
            if rating not in (-1, 0, 1):
                skipped += 1
                continue
            counts[key][rating] += 1
            records += 1
    versions = []
    for (model, version), c in sorted(counts.items()):
        n = sum(c.values())
        ci = binomtest(c[1], n).proportion_ci(method="wilson")
        versions.append({"model": model, "version": version, "n": n, "good": c[1], "neutral": c[0], "bad": c[-1],
                         "good_share": c[1] / n, "good_share_95": [float(ci.low), float(ci.high)]})
    return {"uri": uri, "files": len(files), "records": records, "skipped": skipped, "versions": versions}
