"""What users said about each served version: the ratings `/v1/feedback` stored, by model and
registry version (`raylm feedback stats`). With a canary beside its model, the two versions'
shares of good ratings side by side, each with its 95% (Wilson) interval.

    stats(uri) -> {"files", "records", "skipped", "versions": [{model, version, n, good, neutral, bad,
                   good_share, good_share_95}]}

And what they preferred: `pairs(uri)` pairs, for each conversation users rated more than one
answer to, an answer rated good with one rated bad (`raylm feedback pairs`): the records a
`format: preference` source reads for preference tuning (DPO). `ratings(uri)` keeps every rated
chat answer on its own (`raylm feedback ratings`): the records a `format: rated` source reads for
KTO, which needs no second answer to the same conversation.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from typing import Any

from raylm import storage


def stats(uri: str) -> dict[str, Any]:
    """Counts the ratings of every feedback record under `uri` (the app's `feedback_uri`). Lines
    that are not feedback records are counted as skipped, not fatal."""
    from scipy.stats import binomtest

    counts: dict[tuple[str, str], Counter] = defaultdict(Counter)
    files, found, skipped = _records(uri)
    records = 0
    for rec in found:
        try:
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


def _of_version(records: list[dict], version: str | None) -> tuple[list[dict], int]:
    """The records about answers `version` (a registry id, NAME@vN) gave, and how many others were left out."""
    if version is None:
        return records, 0
    kept = [r for r in records if (r.get("model_version") or r.get("version")) == version]
    return kept, len(records) - len(kept)


def _records(uri: str):
    """Every JSON object line of the feedback files under `uri`; non-JSON lines counted as skipped."""
    files = storage.glob_files(uri)
    skipped = 0
    out = []
    for f in files:
        for line in storage.read_text(f).splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                skipped += 1
                continue
            if isinstance(rec, dict):
                out.append(rec)
            else:
                skipped += 1
    return files, out, skipped


def pairs(uri: str, max_per_prompt: int = 4, version: str | None = None) -> dict[str, Any]:
    """Preference pairs from the ratings under `uri`: feedback on chat answers (records with
    `messages`, the rated answer last) grouped by the conversation before the answer; each answer
    rated good (1) paired with each different answer rated bad (-1) to the same conversation, at
    most `max_per_prompt` pairs a conversation (the newest ratings first). Returns {"pairs": [{id,
    prompt, chosen, rejected, versions}], "conversations", "records", "unpaired",
    "skipped", "other_versions"}: `unpaired` counts rated chats with no opposite rating to pair with;
    `version` (NAME@vN): only the answers that version gave."""
    if max_per_prompt < 1:
        raise ValueError(f"max_per_prompt must be at least 1, not {max_per_prompt}")
    files, records, skipped = _records(uri)
    records, other_versions = _of_version(records, version)
    by_prompt: dict[str, dict[str, Any]] = {}
    rated = 0
    for rec in records:
        messages, rating = rec.get("messages"), rec.get("rating")
        if not (isinstance(messages, list) and len(messages) >= 2 and isinstance(messages[-1], dict)
                and messages[-1].get("role") == "assistant" and isinstance(messages[-1].get("content"), str)
                and rating in (-1, 0, 1)):
            skipped += 1  # feedback on plain completions (no conversation), or not a feedback record
            continue
        rated += 1
        key = json.dumps(messages[:-1], sort_keys=True)
        group = by_prompt.setdefault(key, {"prompt": messages[:-1], 1: [], -1: []})
        if rating:
            group[rating].append((messages[-1]["content"], rec.get("model_version") or rec.get("version")))
    out, unpaired = [], 0
    for key, g in by_prompt.items():
        found, seen = [], set()
        for good, good_version in reversed(g[1]):
            for bad, bad_version in reversed(g[-1]):
                if good != bad and (good, bad) not in seen:  # the same two answers rated again: one pair
                    seen.add((good, bad))
                    found.append({"chosen": good, "rejected": bad,
                                  "versions": sorted({v for v in (good_version, bad_version) if v})})
                    if len(found) == max_per_prompt:  # enough: a much-rated conversation stops here
                        break
            if len(found) == max_per_prompt:
                break
        if not found:
            unpaired += len(g[1]) + len(g[-1])
        for p in found:
            pid = hashlib.sha256(f"{key}\x00{p['chosen']}\x00{p['rejected']}".encode("utf-8")).hexdigest()[:16]
            out.append({"id": pid, "prompt": g["prompt"], **p})
    return {"uri": uri, "files": len(files), "records": rated, "conversations": len(by_prompt),
            "pairs": out, "unpaired": unpaired, "skipped": skipped, "other_versions": other_versions}


def _rated_chat(rec: dict) -> bool:
    """Feedback on a chat answer: the conversation with the rated answer last, rated -1, 0 or 1."""
    messages = rec.get("messages")
    return (isinstance(messages, list) and len(messages) >= 2 and isinstance(messages[-1], dict)
            and messages[-1].get("role") == "assistant" and isinstance(messages[-1].get("content"), str)
            and rec.get("rating") in (-1, 0, 1) and not isinstance(rec.get("rating"), bool))


def ratings(uri: str, version: str | None = None) -> dict[str, Any]:
    """Every chat answer rated good (1) or bad (-1) under `uri`, one record each in TRL's unpaired
    preference shape: {id, prompt (the conversation before the answer), completion, label (true:
    good), version}. The same answer to the same conversation rated the same way again is one
    record; rated both ways, it is two (the data job keeps both: the rating is part of the record).
    `version` (NAME@vN): only the answers that version gave (KTO and DPO learn most from the
    answers of the model they tune). Returns {"ratings", "records", "good", "bad", "neutral",
    "duplicates", "skipped", "other_versions"}: `neutral` counts ratings of 0 (left out: KTO has no
    middle), `skipped` what is no rated chat answer, `other_versions` the records of other versions."""
    files, records, skipped = _records(uri)
    records, other_versions = _of_version(records, version)
    out, seen = [], set()
    counts = Counter()
    for rec in records:
        if not _rated_chat(rec):
            skipped += 1  # feedback on plain completions (no conversation), or not a feedback record
            continue
        rating = rec["rating"]
        if rating == 0:
            counts["neutral"] += 1
            continue
        messages = rec["messages"]
        key = f"{json.dumps(messages, sort_keys=True)}\x00{rating}"
        if key in seen:
            counts["duplicates"] += 1
            continue
        seen.add(key)
        counts["good" if rating == 1 else "bad"] += 1
        out.append({"id": hashlib.sha256(key.encode("utf-8")).hexdigest()[:16], "prompt": messages[:-1],
                    "completion": messages[-1]["content"], "label": rating == 1,
                    "version": rec.get("model_version") or rec.get("version")})
    return {"uri": uri, "files": len(files), "records": len(out) + counts["neutral"] + counts["duplicates"],
            "ratings": out, "good": counts["good"], "bad": counts["bad"], "neutral": counts["neutral"],
            "duplicates": counts["duplicates"], "skipped": skipped, "other_versions": other_versions}
