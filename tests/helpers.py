"""Small real inputs for tests: text files, JSON lines, CSV and parquet written to disk."""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

WORDS = ("the king queen crown sword night day love death honour battle field ship sea storm "
         "fool jest wine song letter ring forest duke lord lady ghost castle heaven earth").split()


def sentence(rng: random.Random, n: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def documents(n: int, seed: int = 0, sentences: int = 8) -> list[dict]:
    rng = random.Random(seed)
    return [{"doc_id": f"d{i:03d}", "body": " ".join(sentence(rng) for _ in range(sentences)),
             "y": rng.choice(["comedy", "tragedy"])} for i in range(n)]


def write_jsonl(path: Path, docs: list[dict], bad_lines: list[str] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(d) for d in docs]
    for i, bad in enumerate(bad_lines):
        lines.insert(1 + 2 * i, bad)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_parquet(path: Path, docs: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(docs), path)
    return path


def small_config(data_root: Path, sources: list[dict], **extra) -> dict:
    cfg = {
        "name": "tiny",
        "sources": sources,
        "split": {"key": "id", "train": 0.8, "validation": 0.1, "test": 0.1},
        "tokenizer": {"vocab_size": 300, "min_frequency": 1},
        "pack": {"seq_len": 32},
        "tokenize": {"min_actors": 1, "max_actors": 1, "batch_size": 8},
        "output": {"root": str(data_root)},
    }
    cfg.update(extra)
    return cfg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SECRETS: list[str] = []  # every API key a test issued: tests/test_security.py looks for them in logs


def issued(secret: str) -> str:
    """Record a secret a test created (an API key) and return it."""
    SECRETS.append(secret)
    return secret
