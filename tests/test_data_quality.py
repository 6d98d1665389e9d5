"""Data-quality steps with known answers: each rule, each PII type, MinHash against exact
Jaccard, boilerplate found from the data, augmentation only on train, quarantine by step; then
the whole pipeline on a planted corpus on a real Ray cluster, with exact counts."""

from __future__ import annotations

import functools
import json
import math
import os
import random
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import WORDS, small_config, write_jsonl
from raylm import config
from raylm.data import pipeline
from raylm.data.augment import augment_table, perturb, rng_for, synonyms
from raylm.data.boilerplate import strip_text
from raylm.data.config import (AugmentStep, BoilerplateStep, DataConfig, FixUnicodeStep, LanguageStep,
                               PiiStep, QualityStep)
from raylm.data.dedup import lsh_params, near_duplicate_pairs, normalized_hash, signatures
from raylm.data.pii import PLACEHOLDER, redact
from raylm.data.sources import DOC_SCHEMA
from raylm.data.steps import prepare, quality_reason, run_step

ROOT = Path(__file__).resolve().parents[1]
HAMLET = ("To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer the slings "
          "and arrows of outrageous fortune, or to take arms against a sea of troubles and by opposing end them. "
          "To die, to sleep, no more; and by a sleep to say we end the heart-ache and the thousand natural shocks "
          "that flesh is heir to: 'tis a consummation devoutly to be wish'd.")


def table(texts, **cols):
    n = len(texts)
    data = {f: [None] * n for f in DOC_SCHEMA.names}
    data.update(id=[f"r{i}" for i in range(n)], text=texts, **cols)
    t = prepare(pa.Table.from_pydict(data, schema=DOC_SCHEMA), max_doc_chars=1_000_000)
    return t.append_column("split", pa.array(cols.get("split_", ["train"] * n), pa.string()))


# --- quality ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, reason", [
    ("Too short to keep.", "too_few_words"),
    (" ".join(["a"] * 60), "mean_word_length_low"),
    (" ".join(["incomprehensibilities"] * 3 + [f"w{i}" for i in range(0)] + ["extraordinarily"] * 57),
     "mean_word_length_high"),
    (HAMLET + " # # # # # # # # # # # # # # # # # # # # ...", "symbol_ratio"),
    (HAMLET + " 1234567890 9876543210 1234567890 9876543210 1234567890 9876543210 11 22 33 44 55 66 77 88 99 "
     + "1234567890" * 10, "digit_ratio"),
    ("\n".join([HAMLET] + ["Exeunt all the lords."] * 10), "duplicate_lines"),
    ("\n".join([HAMLET, HAMLET] + [f"Short line number {i} here." for i in range(10)]), "duplicate_line_chars"),
    (HAMLET + " " + " ".join(["sea of"] * 40), "top_2gram"),
    (HAMLET + " " + " ".join(f"({'-' * (i % 7 + 1)}{'*' * (i // 7 + 1)})" for i in range(60)), "alpha_word_ratio"),
])
def test_each_gopher_rule_drops_with_its_reason(text, reason):
    cfg = QualityStep(name="quality", max_digit_ratio=0.25)
    assert quality_reason(text, cfg) == reason
    assert quality_reason(HAMLET, cfg) is None  # ordinary prose passes every rule


def test_quality_rules_are_configurable_and_can_be_turned_off():
    short = "Too short to keep."
    assert quality_reason(short, QualityStep(name="quality", min_words=None)) is None
    assert quality_reason(HAMLET, QualityStep(name="quality", min_words=1000)) == "too_few_words"


# --- cleaning and language ----------------------------------------------------------------------------

def test_fix_unicode_repairs_mojibake_and_entities():
    t = table(["The Mona Lisa doesnâ€™t have eyebrows &amp; that is fine.", "clean"])
    out = run_step(t, FixUnicodeStep(name="fix_unicode"), 0, "fix_unicode")
    assert out.column("text").to_pylist() == ["The Mona Lisa doesn\u2019t have eyebrows & that is fine.", "clean"]
    assert out.column("_stat0_changed").to_pylist() == [1, 0]


def test_language_is_a_field_and_a_filter():
    german = "Der schnelle braune Fuchs springt über den faulen Hund und läuft dann schnell nach Hause zurück."
    out = run_step(table([HAMLET, german]), LanguageStep(name="language", languages=["en"]), 0, "language")
    assert out.column("language").to_pylist() == ["en", "de"]
    assert out.column("_drop").to_pylist() == [None, "language.not_in_languages"]
    assert out.column("language_score")[0].as_py() > 0.9


# --- PII ---------------------------------------------------------------------------------------------------

PLANTED = {
    "email": "jane.doe+news@example.co.uk",
    "phone": "(415) 555-2671",
    "ipv4": "192.168.10.27",
    "ipv6": "2001:db8:85a3::8a2e:370:7334",
    "credit_card": "4111 1111 1111 1111",
    "iban": "GB82 WEST 1234 5698 7654 32",
    "aws_access_key": "AKIAIOSFODNN7EXAMPLE",
    "github_token": "ghp_" + "a1B2c3D4e5" * 3 + "F6g7H8",
    "slack_token": "xoxb-123456789012-abcdefABCDEF",
    "google_api_key": "AIza" + "SyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q",
    "private_key": "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAtest\nline2\n-----END RSA PRIVATE KEY-----",
    "bearer_token": "Bearer 0123456789abcdefXYZ.token",
    "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
}
NEAR_MISSES = ["card 4111 1111 1111 1112 fails Luhn", "IBAN GB82 WEST 1234 5698 7654 33 fails mod 97",
               "999.12.3.4 is no address", "Act 3, Scene 2, line 1623, at 10:30:00", "call 555-0100"]


def test_every_pii_type_is_replaced_by_its_placeholder():
    text = "\n".join(f"{kind}: {value} end" for kind, value in PLANTED.items())
    out, counts = redact(text, set(PLACEHOLDER))
    assert dict(counts) == {k: 1 for k in PLANTED}
    for kind, value in PLANTED.items():
        assert value.split()[-1] not in out
        expected = "Bearer <BEARER_TOKEN>" if kind == "bearer_token" else PLACEHOLDER[kind]
        assert f"{kind}: {expected} end" in out


def test_pii_leaves_lookalikes_alone():
    for text in NEAR_MISSES:
        out, counts = redact(text, set(PLACEHOLDER))
        assert out == text and not counts, text


def test_pii_kinds_are_selectable_and_counted_per_row():
    t = table([f"mail {PLANTED['email']} and {PLANTED['ipv4']}", "nothing here"])
    out = run_step(t, PiiStep(name="pii", kinds=["email"]), 0, "pii")
    assert out.column("text").to_pylist() == [f"mail <EMAIL> and {PLANTED['ipv4']}", "nothing here"]
    assert out.column("_pii_email").to_pylist() == [1, 0]


# --- dedup ------------------------------------------------------------------------------------------------

def _shingles(text: str, k: int = 5) -> set:
    w = re.findall(r"\w+", text.lower())
    return {tuple(w[i:i + k]) for i in range(max(len(w) - k + 1, 1))}


def _jaccard(a: str, b: str) -> float:
    x, y = _shingles(a), _shingles(b)
    return len(x & y) / len(x | y)


def _edit(words: list[str], n: int, rng: random.Random) -> str:
    w = list(words)
    for i in rng.sample(range(len(w)), n):
        w[i] = f"zz{i}"
    return " ".join(w)


def test_minhash_estimates_jaccard_and_lsh_finds_the_planted_pairs():
    rng = random.Random(7)
    vocab = [f"w{i}" for i in range(5000)]
    base = [[rng.choice(vocab) for _ in range(400)] for _ in range(60)]
    docs = [" ".join(b) for b in base]
    near = [_edit(base[i], 4, rng) for i in range(10)]      # 4 of 400 words changed: Jaccard ~ 0.9
    far = [_edit(base[i], 40, rng) for i in range(10, 15)]  # 40 changed: Jaccard ~ 0.4
    texts = docs + near + far
    sig = signatures(texts, 128, 5, seed=1)
    for i, j in [(0, 60), (10, 70)]:
        assert abs((sig[i] == sig[j]).mean() - _jaccard(texts[i], texts[j])) < 0.1
    from raylm.data.config import DedupNearStep

    pairs, (bands, rows), _ = near_duplicate_pairs(sig, DedupNearStep(name="dedup_near", threshold=0.8))
    truth = {(i, j) for i in range(len(texts)) for j in range(i + 1, len(texts))
             if _jaccard(texts[i], texts[j]) >= 0.8}
    assert truth == {(i, 60 + i) for i in range(10)}
    assert {tuple(p) for p in pairs.tolist()} == truth
    assert bands * rows <= 128 and lsh_params(0.8, 128) == (bands, rows)


def test_exact_hash_ignores_case_punctuation_and_spacing():
    from raylm.data.config import DedupExactStep

    cfg = DedupExactStep(name="dedup_exact")
    assert normalized_hash("To be, or not to be!", cfg) == normalized_hash("to  be or NOT to be", cfg)
    assert normalized_hash("To be, or not to be!", cfg) != normalized_hash("to be or not to bee", cfg)


# --- boilerplate, augmentation, quarantine ---------------------------------------------------------------------

def test_boilerplate_runs_are_cut_and_short_matches_are_kept():
    from raylm.data.boilerplate import _windows

    header = ["*** START OF THE PROJECT GUTENBERG EBOOK ***", "Produced by volunteers.", "Release date: 1998."]
    doc = "\n".join(header + ["", "ACT I.", "Enter Hamlet.", "To be or not to be.", "Exeunt."])
    hashes = {h for _, h in _windows(header + ["", "ignored"], 3)}
    out, blocks = strip_text(doc, hashes, BoilerplateStep(name="boilerplate"))
    assert out == "ACT I.\nEnter Hamlet.\nTo be or not to be.\nExeunt."
    assert blocks == ["\n".join(header)]
    # a two-line run is below min_block_lines (3): kept
    out2, blocks2 = strip_text("\n".join(header[:2] + ["body"]), hashes, BoilerplateStep(name="boilerplate",
                                                                                           window=2))
    assert blocks2 == [] and out2.endswith("body")


def test_augmentation_adds_marked_copies_of_train_rows_only():
    t = table([HAMLET, HAMLET, HAMLET], label=["a", "b", None], split_=["train", "test", "train"])
    out = run_step(t, AugmentStep(name="augment", ratio=1.0, ops=["swap", "typo"]), 0, "augment")
    assert out.num_rows == 4  # one copy of the one labeled train row
    new = out.slice(3).to_pylist()[0]
    assert new["id"] == "r0#aug1" and new["augmented"] is True and new["label"] == "a" and new["text"] != HAMLET
    assert out.column("_stat0_added").to_pylist() == [0, 0, 0, 1]
    again = run_step(t, AugmentStep(name="augment", ratio=1.0, ops=["swap", "typo"]), 0, "augment")
    assert again.column("text").to_pylist() == out.column("text").to_pylist()  # deterministic
    # a dataset labelled by another column (`label: author`, as the authors dataset is) has no
    # `label` until it is written: the step reads that column (as the pipeline binds it), and
    # copies the rows whose author is known
    by_author = table([HAMLET, HAMLET], author=["shakespeare", None])
    crop = AugmentStep(name="augment", ratio=1.0, ops=["crop"], strength=0.9)
    assert run_step(by_author, crop, 0, "augment").num_rows == 2  # `label` is empty: nothing to copy
    out = run_step(by_author, crop, 0, "augment", fn=functools.partial(augment_table, label_field="author"))
    assert out.num_rows == 3 and out.slice(2).to_pylist()[0]["author"] == "shakespeare"
    assert len(out.column("text")[2].as_py().split()) == math.ceil(0.1 * len(HAMLET.split()))


def test_a_crop_is_one_run_of_the_texts_own_words_at_its_length():
    """crop at strength s keeps ceil((1 - s) x n) consecutive words of the n, with the whitespace
    between them (line breaks too), from a start that differs from row to row."""
    text = "Now is the winter of our discontent\nMade glorious summer by this sun of York;\nAnd all the clouds"
    words = text.split()
    starts = set()
    for key in "abcdefgh":
        out = perturb(text, "crop", 0.75, rng_for(key, 0))
        assert len(out.split()) == 5 and out in text and out == out.strip(), out  # ceil(0.25 x 19)
        starts.add(out.split()[0])
    assert len(starts) > 2
    assert perturb(text, "crop", 0.5, rng_for("a", 0)).count("\n") >= 1  # 9 consecutive words span a line end
    assert len(perturb(text, "crop", 1.0, rng_for("a", 0)).split()) == 1  # never empty
    assert perturb(text, "crop", 0.01, rng_for("a", 0)) == text.strip() and len(words) == 19
    assert perturb("", "crop", 0.9, rng_for("a", 0)) == ""


@pytest.mark.parametrize("op", ["swap", "insert", "delete", "typo", "synonym"])
def test_each_perturbation_changes_text_at_its_strength(op):
    out = perturb(HAMLET, op, 0.3, rng_for("x", 0))
    assert out != HAMLET
    if op in ("swap", "typo", "synonym"):
        assert abs(len(out.split()) - len(HAMLET.split())) <= 2
    if op == "delete":
        assert len(out.split()) < len(HAMLET.split())


def test_synonyms_come_from_embedding_neighbours_not_inflections():
    syn = synonyms("quickly")
    assert syn and not any(s.startswith("quick") for s in syn)
    assert {"rapidly", "swiftly"} & set(syn)


def test_a_row_a_step_cannot_process_is_quarantined_with_the_step():
    def fragile(t, cfg):
        if any("BOOM" in x for x in t.column("text").to_pylist()):
            raise ValueError("cannot parse this row")
        return t.set_column(t.schema.get_field_index("text"), "text",
                            pa.array([x.upper() for x in t.column("text").to_pylist()]))

    out = run_step(table(["one", "BOOM two", "three"]), QualityStep(name="quality"), 0, "custom", fn=fragile)
    rows = {r["id"]: r for r in out.to_pylist()}
    assert rows["r0"]["text"] == "ONE" and rows["r2"]["text"] == "THREE"
    assert rows["r1"]["_error"] == "ValueError: cannot parse this row" and rows["r1"]["_step"] == "custom"
    assert rows["r1"]["_raw"] == "BOOM two"


# --- the whole pipeline on planted data -------------------------------------------------------------------

GUTENBERG_HEADER = """The Project Gutenberg EBook of {title}, by William Shakespeare

This eBook is for the use of anyone anywhere at no cost and with
almost no restrictions whatsoever.  You may copy it, give it away or
re-use it under the terms of the Project Gutenberg License included
with this eBook or online at www.gutenberg.org

*** START OF THIS PROJECT GUTENBERG EBOOK ***"""
GUTENBERG_FOOTER = """*** END OF THIS PROJECT GUTENBERG EBOOK ***

This file should be named 1524.txt or 1524.zip
Updated editions will replace the previous one--the old editions
will be renamed.
Creating the works from public domain print editions means that no
one owns a United States copyright in these works."""


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """40 distinct documents in Gutenberg wrapping, plus planted duplicates, near-duplicates,
    PII, garbage, a German text, an oversized record and a broken line: every answer known."""
    rng = random.Random(11)
    vocab = sorted(set(re.findall(r"[a-z]+", HAMLET.lower())) | set(WORDS))
    bodies = [[rng.choice(vocab) for _ in range(300)] for _ in range(40)]
    lines = lambda words: "\n".join(" ".join(words[i:i + 12]) for i in range(0, len(words), 12))  # noqa: E731
    docs = [{"doc_id": f"d{i:02d}", "y": "comedy" if i % 2 else "tragedy",
             "body": GUTENBERG_HEADER.format(title=f"Play {i}") + "\n\n" + lines(b) + "\n\n" + GUTENBERG_FOOTER}
            for i, b in enumerate(bodies)]
    # the same text in upper case with doubled spaces: an exact duplicate after normalization
    exact = [{"doc_id": f"x{i}", "y": "comedy", "body": GUTENBERG_HEADER.format(title=f"Play {i}") + "\n\n"
              + lines(bodies[i]).upper().replace(" ", "  ") + "\n\n" + GUTENBERG_FOOTER} for i in range(3)]
    near = []
    for i, j in ((5, 0), (6, 1)):
        w = list(bodies[i])
        for k in rng.sample(range(len(w)), 3):
            w[k] = "changed"
        near.append({"doc_id": f"zn{j}", "y": "comedy", "body": lines(w)})
    pii = {"doc_id": "p0", "y": "comedy",
           "body": lines(bodies[0][:100]) + "\n" + "\n".join(f"{v} ." for v in PLANTED.values())}
    garbage = [{"doc_id": "g0", "y": "comedy", "body": " ".join(["### $$$ ..."] * 40)},
               {"doc_id": "g1", "y": "comedy", "body": "too short"}]
    german = {"doc_id": "de0", "y": "comedy", "body": " ".join(
        ["Der schnelle braune Fuchs springt über den faulen Hund und läuft dann nach Hause zurück."] * 8)}
    huge = {"doc_id": "huge", "y": "comedy", "body": "word " * 30_000}
    d = tmp_path_factory.mktemp("planted")
    src = write_jsonl(d / "docs.jsonl", docs + exact + near + [pii] + garbage + [german, huge],
                      bad_lines=['{"broken": '])
    truth = {"docs": docs, "near": near, "bodies": bodies}
    return d, src, truth


def test_planted_corpus_gives_exact_counts(ray_session, planted, data_root):
    d, src, truth = planted
    cfg = small_config(data_root, [{"kind": "jsonl", "uri": str(src), "text_field": "body", "id_field": "doc_id",
                                    "label_field": "y"}],
                       steps=[{"name": "fix_unicode"}, {"name": "normalize"},
                              {"name": "boilerplate", "min_docs": 10, "min_doc_fraction": 0.2},
                              {"name": "pii"},
                              {"name": "quality", "max_top_ngram_fraction": {}, "max_mean_word_length": 12},
                              {"name": "language", "languages": ["en"]},
                              {"name": "dedup_exact"}, {"name": "dedup_near", "threshold": 0.8},
                              {"name": "augment", "ratio": 1.0, "ops": ["swap"]}],
                       limits={"max_doc_chars": 100_000},
                       split={"key": "id", "train": 0.5, "validation": 0.25, "test": 0.25})
    m = pipeline.run(config.build(DataConfig, cfg))
    steps = {s["step"]: s for s in m["steps"]}
    # read: the broken line; limits: the oversized record
    assert steps["read"]["quarantined"] == {"invalid_json": 1, "too_large": 1}
    # boilerplate: the Gutenberg header and footer found from the data, cut from every copy
    bp = steps["boilerplate"]
    assert bp["rows_changed"] == 40 + 3 and bp["min_docs"] == 10
    assert {b["documents"] for b in bp["blocks"]} == {43}
    # pii: each planted type once
    assert steps["pii"]["found"] == {k: 1 for k in PLANTED}
    assert steps["quality"]["dropped"] == {"symbol_ratio": 1, "too_few_words": 1}
    assert steps["language"]["dropped"] == {"not_in_languages": 1}
    assert steps["dedup_exact"]["dropped"] == {"duplicate": 3} and steps["dedup_exact"]["clusters"] == {2: 3}
    assert steps["dedup_near"]["dropped"] == {"near_duplicate": 2}
    assert sorted(x["id"] for x in steps["dedup_near"]["removed_sample"]) == ["zn0", "zn1"]
    # rows in = rows out + dropped + quarantined, step by step and overall
    for s in m["steps"]:
        if "rows_out" in s and s["step"] not in ("tokenize",):
            assert s["rows_out"] == s["rows_in"] + s.get("rows_added", 0) - sum(s.get("dropped", {}).values()) \
                - sum(s.get("quarantined", {}).values()), s
    c = m["counts"]
    assert c["records_read"] == 40 + 3 + 2 + 1 + 2 + 1 + 1 + 1
    assert c["records_read"] + c["augmented"] == c["documents"] + c["quarantined"] + sum(c["dropped"].values())
    # nothing else was removed: the 40 originals and the PII document survive, plus augmented copies
    kept = [r for split in ("train", "validation", "test")
            for r in pq.read_table(os.path.join(m["uri"], "docs", split)).to_pylist()]
    originals = sorted(r["id"] for r in kept if not r["augmented"])
    assert originals == sorted([f"d{i:02d}" for i in range(40)] + ["p0"])
    aug = [r for r in kept if r["augmented"]]
    assert aug and all(r["split"] == "train" and r["id"].endswith("#aug1") for r in aug)
    assert len(aug) == c["augmented"] == sum(1 for r in kept if r["split"] == "train" and not r["augmented"])
    by_id = {r["id"]: r for r in kept}
    for doc in ("d00", "d07"):
        first, rest = by_id[doc]["text"].split("\n", 1)
        # the title line is unique to each book, so it stays; every repeated line is gone
        assert first == f"The Project Gutenberg EBook of Play {int(doc[1:])}, by William Shakespeare"
        assert "Gutenberg" not in rest and "START OF" not in rest and "copyright" not in rest
        assert rest.split() == truth["bodies"][int(doc[1:])]  # the body is untouched
    assert "<EMAIL>" in by_id["p0"]["text"] and PLANTED["email"] not in by_id["p0"]["text"]
    assert by_id["d00"]["language"] is not None
    # quarantine file: each record with its step
    qrows = [json.loads(x) for f in Path(m["quarantine"]["uri"]).iterdir() for x in f.read_text().splitlines()]
    assert sorted((r["step"], r["reason"].split(" (")[0]) for r in qrows) == [("limits", "too_large"),
                                                                              ("read", "invalid_json")]
    # the report exists with its plots
    report = Path(m["uri"]) / "report"
    assert (report / "index.html").exists() and {"drops.png", "clusters.png", "pii.png", "top_tokens.png",
                                                 "length_tokens.png"} <= {p.name for p in report.iterdir()}
    html = (report / "index.html").read_text()
    assert "START OF THIS PROJECT GUTENBERG EBOOK" in html and "zn0" in html
