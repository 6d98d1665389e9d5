"""Deduplication over the whole dataset (across blocks and workers, not per batch).

Exact (`dedup_exact`): every live document's normalized text is hashed in `map_batches`;
the (hash, id) pairs are grouped by hash with Ray Data `groupby`; in each group of more than one
the smallest id survives and the others are dropped with the reason `dedup_exact.duplicate`.

Near (`dedup_near`): MinHash + LSH.
  1. signatures in `map_batches`, vectorized with numpy: words -> 64-bit word hashes -> shingle
     hashes of `shingle_size` consecutive words -> `num_perm` multiply-shift permutations ->
     the minimum per document (one array operation per batch, no Python loop per shingle);
  2. candidate pairs from band buckets: documents whose `rows` signature values agree in any of
     the `bands` bands;
  3. verification: a candidate pair is kept only if its Jaccard similarity is >= threshold:
     exactly, over the two documents' shingle hashes (one more `map_batches` pass returns them
     for candidate documents only), or estimated from the signatures (`verify: estimate`);
  4. clusters = connected components of the kept pairs (scipy); the smallest id of each
     cluster survives, the others are dropped with the reason `dedup_near.near_duplicate`.
The driver holds 4 * num_perm bytes per document for steps 2-4 (512 MB per million documents
at 128 permutations).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from raylm.data.steps import fetch_plan, shuffle_partitions
from raylm.data.steps import live as _live
from raylm.data.config import DedupExactStep, DedupNearStep

_WORDS = re.compile(r"\w+")
_MAX_WORD = 24  # characters of a word that enter its hash
SAMPLE_REMOVED = 20


# --- exact --------------------------------------------------------------------------------------

def normalized_hash(text: str, cfg: DedupExactStep) -> str:
    if cfg.lowercase:
        text = text.lower()
    text = " ".join(_WORDS.findall(text)) if cfg.ignore_punctuation else " ".join(text.split())
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def _exact_keys(t: pa.Table, cfg: DedupExactStep) -> pa.Table:
    t = t.filter(_live(t))
    hashes = [normalized_hash(x, cfg) for x in t.column("text").to_pylist()]
    return pa.table({"h": pa.array(hashes, pa.string()), "id": t.column("id")})


def _exact_groups(g: pa.Table) -> pa.Table:
    """One group of documents with the same hash -> the ids to drop (all but the smallest)."""
    ids = sorted(g.column("id").to_pylist(), key=lambda x: (x is None, x or ""))
    drop = ids[1:]
    return pa.table({"id": pa.array(drop, pa.string()), "survivor": pa.array([ids[0]] * len(drop), pa.string()),
                     "size": pa.array([len(ids)] * len(drop), pa.int64())})


def exact_plan(ds: ray.data.Dataset, cfg: DedupExactStep) -> dict[str, Any]:
    """Which ids to drop, computed across the whole dataset."""
    keys = ds.map_batches(_exact_keys, fn_kwargs={"cfg": cfg}, batch_format="pyarrow", batch_size=None)
    dups = keys.groupby("h", num_partitions=shuffle_partitions(ds)) \
        .map_groups(_exact_groups, batch_format="pyarrow").take_all()
    drop = {r["id"]: r["survivor"] for r in dups}
    sizes = Counter()
    for survivor in set(drop.values()):
        sizes[sum(1 for s in drop.values() if s == survivor) + 1] += 1
    return {"drop": drop, "reason": "duplicate", "clusters": dict(sorted(sizes.items())),
            "removed_sample": [{"id": i, "kept": s} for i, s in sorted(drop.items())[:SAMPLE_REMOVED]]}


# --- near: MinHash --------------------------------------------------------------------------------

@lru_cache(maxsize=8)
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    return a, b


def _word_hashes(words: list[str]) -> np.ndarray:
    """Stable 64-bit hashes of words (FNV-1a over UTF-32 code points), vectorized."""
    if not words:
        return np.zeros(0, np.uint64)
    codes = np.array(words, dtype=f"<U{_MAX_WORD}").view(np.uint32).reshape(len(words), _MAX_WORD)
    h = np.full(len(words), 0xCBF29CE484222325, dtype=np.uint64)
    prime = np.uint64(0x100000001B3)
    with np.errstate(over="ignore"):
        for j in range(_MAX_WORD):
            h = (h ^ codes[:, j].astype(np.uint64)) * prime
    return h


def shingle_hashes(texts: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """All documents' shingle hashes, concatenated, and each document's count of shingles.
    A shingle is `k` consecutive lower-cased words; a shorter document is one shingle."""
    words_per_doc = [_WORDS.findall(t.lower()) for t in texts]
    n_words = np.array([len(w) for w in words_per_doc], dtype=np.int64)
    wh = _word_hashes([w for ws in words_per_doc for w in ws])
    n = len(wh)
    q = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        # rolling[i] = sum_j wh[i + j] * q^j over the next min(k, n - i) words
        rolling = wh.copy()
        power = np.uint64(1)
        for j in range(1, k):
            power = power * q
            rolling[: n - j] += wh[j:] * power
    starts = np.concatenate([[0], np.cumsum(n_words)[:-1]]) if len(n_words) else np.zeros(0, np.int64)
    n_sh = np.where(n_words >= k, n_words - k + 1, np.minimum(n_words, 1))
    idx = np.repeat(starts, n_sh) + (np.arange(n_sh.sum()) - np.repeat(np.cumsum(n_sh) - n_sh, n_sh))
    out = rolling[idx]
    short = np.nonzero((n_words > 0) & (n_words < k))[0]
    if len(short):  # documents shorter than k: one shingle of all their words
        pos = np.cumsum(n_sh) - n_sh
        for d in short:
            acc = np.uint64(0)
            power = np.uint64(1)
            with np.errstate(over="ignore"):
                for j in range(int(n_words[d])):
                    acc += wh[starts[d] + j] * power
                    power = power * q
            out[pos[d]] = acc
    return out, n_sh


def signatures(texts: list[str], num_perm: int, shingle_size: int, seed: int,
               chunk: int = 1 << 14) -> np.ndarray:
    """MinHash signatures, (len(texts), num_perm) uint32; a document without words gets all
    0xFFFFFFFF (it matches nothing: such rows are left out of candidate search). Permuted
    values are laid out permutation-major so the per-document minimum runs over contiguous
    memory (`np.minimum.reduceat` along the last axis), in place, `chunk` shingles at a time."""
    a, b = permutations(num_perm, seed)
    sh, counts = shingle_hashes(texts, shingle_size)
    sig = np.full((len(texts), num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
    ends = np.cumsum(counts)
    shift = np.uint64(32)
    buf = np.empty((num_perm, chunk), dtype=np.uint64)
    doc = 0
    while doc < len(texts):
        first = doc
        lo = ends[doc] - counts[doc]
        while doc < len(texts) and (ends[doc] - lo <= chunk or doc == first):
            doc += 1
        block = sh[lo: ends[doc - 1]]
        if not len(block):
            continue
        if len(block) > buf.shape[1]:
            buf = np.empty((num_perm, len(block)), dtype=np.uint64)
        vals = buf[:, : len(block)]
        np.multiply(a[:, None], block[None, :], out=vals)
        np.add(vals, b[:, None], out=vals)
        np.right_shift(vals, shift, out=vals)
        nz = np.nonzero(counts[first:doc])[0]
        offsets = (ends[first:doc] - counts[first:doc] - lo)[nz]
        sig[first + nz] = np.minimum.reduceat(vals, offsets, axis=1).T
    return sig


@lru_cache(maxsize=64)
def lsh_params(threshold: float, num_perm: int, recall_at_threshold: float = 0.99) -> tuple[int, int]:
    """Bands and rows: the most rows per band (fewest false candidates) for which a pair exactly
    at the threshold still becomes a candidate with probability >= `recall_at_threshold`
    (1 - (1 - t^rows)^bands), using as many bands as the permutations allow. Candidates are
    verified afterwards, so a false candidate costs one comparison; a missed one is lost."""
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if bands < 1 or 1 - (1 - threshold ** rows) ** bands < recall_at_threshold:
            break
        best = (bands, rows)
    return best


def _near_keys(t: pa.Table, cfg: DedupNearStep) -> pa.Table:
    t = t.filter(_live(t))
    sig = signatures(t.column("text").to_pylist(), cfg.num_perm, cfg.shingle_size, cfg.seed)
    sig_col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(4 * cfg.num_perm), len(t),
                                                    [None, pa.py_buffer(sig.tobytes())])
    return pa.table({"id": t.column("id"), "sig": sig_col})


def band_hashes(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    out = np.zeros((len(sig), bands), dtype=np.uint64)
    q = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        for band in range(bands):
            h = np.zeros(len(sig), dtype=np.uint64)
            for r in range(rows):
                h = h * q + sig[:, band * rows + r].astype(np.uint64)
            out[:, band] = h
    return out


def candidate_pairs(sig: np.ndarray, bands: int, rows: int, all_pairs_up_to: int = 64) -> np.ndarray:
    """(i, j) pairs, i < j, of documents sharing a band bucket. Buckets up to `all_pairs_up_to`
    documents give all their pairs; bigger ones a star around the first and a chain."""
    valid = np.nonzero(sig[:, 0] != np.iinfo(np.uint32).max)[0]
    bh = band_hashes(sig[valid], bands, rows)
    pairs = []
    for band in range(bands):
        order = np.argsort(bh[:, band], kind="stable")
        sorted_h = bh[order, band]
        boundaries = np.nonzero(np.diff(sorted_h))[0] + 1
        run_starts = np.concatenate([[0], boundaries])
        run_lens = np.diff(np.concatenate([run_starts, [len(order)]]))
        for s, n in zip(run_starts[run_lens > 1], run_lens[run_lens > 1]):
            members = valid[order[s:s + n]]
            if n <= all_pairs_up_to:
                i, j = np.triu_indices(n, 1)
                pairs.append(np.stack([members[i], members[j]], 1))
            else:
                pairs.append(np.stack([np.repeat(members[0], n - 1), members[1:]], 1))
                pairs.append(np.stack([members[:-1], members[1:]], 1))
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    p = np.concatenate(pairs).astype(np.int64)
    p = np.sort(p, axis=1)
    return np.unique(p, axis=0)


def estimated_jaccard(sig: np.ndarray, pairs: np.ndarray, chunk: int = 1 << 15) -> np.ndarray:
    out = np.empty(len(pairs), dtype=np.float64)
    for lo in range(0, len(pairs), chunk):
        p = pairs[lo:lo + chunk]
        out[lo:lo + chunk] = (sig[p[:, 0]] == sig[p[:, 1]]).mean(axis=1)
    return out


def near_duplicate_pairs(sig: np.ndarray, cfg: DedupNearStep,
                         shingles: dict[int, np.ndarray] | None = None) -> tuple[np.ndarray, tuple[int, int], int]:
    """Verified duplicate pairs, the (bands, rows) used, and the number of candidates.
    `shingles` (document index -> its sorted unique shingle hashes) enables exact verification."""
    bands, rows = (cfg.bands, cfg.rows) if cfg.bands else lsh_params(cfg.threshold, cfg.num_perm)
    cands = candidate_pairs(sig, bands, rows)
    if not len(cands) or cfg.verify == "none":
        return cands, (bands, rows), len(cands)
    if cfg.verify == "exact" and shingles is not None:
        sims = np.array([exact_jaccard(shingles[i], shingles[j]) for i, j in cands.tolist()])
    else:
        sims = estimated_jaccard(sig, cands)
    return cands[sims >= cfg.threshold], (bands, rows), len(cands)


def exact_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    inter = len(np.intersect1d(a, b, assume_unique=True))
    union = len(a) + len(b) - inter
    return inter / union if union else 0.0


def _candidate_shingles(t: pa.Table, cfg: DedupNearStep, wanted_ref: Any) -> pa.Table:
    wanted = ray.get(wanted_ref) if isinstance(wanted_ref, ray.ObjectRef) else wanted_ref
    t = t.filter(_live(t))
    ids = t.column("id").to_pylist()
    keep = [i for i, x in enumerate(ids) if x in wanted]
    texts = t.column("text").to_pylist()
    out_ids, blobs = [], []
    for i in keep:
        sh, _ = shingle_hashes([texts[i]], cfg.shingle_size)
        out_ids.append(ids[i])
        blobs.append(np.unique(sh).tobytes())
    return pa.table({"id": pa.array(out_ids, pa.string()), "sh": pa.array(blobs, pa.binary())})


def candidate_shingles(ds: ray.data.Dataset, cfg: DedupNearStep, ids: list[str],
                       sig: np.ndarray) -> dict[int, np.ndarray]:
    """Sorted unique shingle hashes of the documents in any candidate pair, fetched with one
    more `map_batches` pass that returns only those documents."""
    bands, rows = (cfg.bands, cfg.rows) if cfg.bands else lsh_params(cfg.threshold, cfg.num_perm)
    cands = candidate_pairs(sig, bands, rows)
    if not len(cands):
        return {}
    wanted = {ids[i] for i in np.unique(cands.ravel())}
    ref = ray.put(wanted)
    index = {x: i for i, x in enumerate(ids)}
    out: dict[int, np.ndarray] = {}
    for row in ds.map_batches(_candidate_shingles, fn_kwargs={"cfg": cfg, "wanted_ref": ref}, batch_format="pyarrow",
                              batch_size=cfg.batch_size).iter_rows():
        out[index[row["id"]]] = np.frombuffer(row["sh"], dtype=np.uint64)
    return out


def clusters(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected-component label per document."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def near_signatures(ds: ray.data.Dataset, cfg: DedupNearStep) -> tuple[list[str], np.ndarray]:
    """Ids and MinHash signatures of the live documents, computed in `map_batches`."""
    keys = ds.map_batches(_near_keys, fn_kwargs={"cfg": cfg}, batch_format="pyarrow", batch_size=cfg.batch_size)
    ids: list[str] = []
    sigs = []
    for batch in keys.iter_batches(batch_format="pyarrow", batch_size=4096):
        ids.extend(batch.column("id").to_pylist())
        buf = batch.column("sig").combine_chunks() if isinstance(batch.column("sig"), pa.ChunkedArray) else batch.column("sig")
        sigs.append(np.frombuffer(buf.buffers()[1], dtype=np.uint32,
                                  count=len(buf) * cfg.num_perm, offset=buf.offset * 4 * cfg.num_perm)
                    .reshape(len(buf), cfg.num_perm))
    return ids, (np.concatenate(sigs) if sigs else np.zeros((0, cfg.num_perm), np.uint32))


def near_plan(ds: ray.data.Dataset, cfg: DedupNearStep) -> dict[str, Any]:
    ids, sig = near_signatures(ds, cfg)
    shingles = candidate_shingles(ds, cfg, ids, sig) if cfg.verify == "exact" else None
    pairs, (bands, rows), n_candidates = near_duplicate_pairs(sig, cfg, shingles)
    labels = clusters(len(ids), pairs) if len(ids) else np.zeros(0, np.int64)
    members: dict[int, list[int]] = {}
    for i in np.unique(pairs.ravel()) if len(pairs) else []:
        members.setdefault(int(labels[i]), []).append(int(i))
    drop: dict[str, str] = {}
    sizes: Counter = Counter()
    for group in members.values():
        names = sorted((ids[i] or "" for i in group))
        sizes[len(names)] += 1
        for other in names[1:]:
            drop[other] = names[0]
    return {"drop": drop, "reason": "near_duplicate", "bands": bands, "rows": rows, "candidates": n_candidates,
            "pairs": int(len(pairs)), "clusters": dict(sorted(sizes.items())),
            "removed_sample": [{"id": i, "kept": s} for i, s in sorted(drop.items())[:SAMPLE_REMOVED]]}


# --- applying a plan -----------------------------------------------------------------------------------

def apply_plan(table: pa.Table, cfg: Any, plan_ref: Any, reason: str) -> pa.Table:
    """Mark the rows whose id the plan drops (the plan is fetched once per worker process)."""
    drop = fetch_plan(plan_ref)
    reasons = [reason if i in drop else None for i in table.column("id").to_pylist()]
    return table.set_column(table.schema.get_field_index("_drop"), "_drop", pa.array(reasons, pa.string()))
