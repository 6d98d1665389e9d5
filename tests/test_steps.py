"""Pure functions of the data job: normalization, splitting, packing (no Ray needed)."""

from __future__ import annotations

import pyarrow as pa

from raylm.data.config import NormalizeStep, SplitConfig
from raylm.data.sources import DOC_SCHEMA, _work_key, parse_file
from raylm.data.config import FileSource
from raylm.data.steps import mark_empty, prepare, run_step
from raylm.data.tokenize import pack, split_of


def table(texts, errors=None):
    n = len(texts)
    cols = {f: [None] * n for f in DOC_SCHEMA.names}
    cols.update(id=[str(i) for i in range(n)], text=texts, _error=errors or [None] * n)
    return prepare(pa.Table.from_pydict(cols, schema=DOC_SCHEMA), max_doc_chars=1_000_000)


def test_normalize_cleans_and_counts_changes():
    raw = ["Cafe\u0301 au lait\r\nline two   \r\n\n\n\n\n\nend\x07",  # NFD accent, CRLF, trailing, blank run, BEL
           "already clean",
           None]
    out = run_step(table(raw, errors=[None, None, "invalid_json"]), NormalizeStep(name="normalize"), 0, "normalize")
    text = out.column("text").to_pylist()
    assert text[0] == "Caf\u00e9 au lait\nline two\n\n\nend"
    assert text[1] == "already clean"
    assert text[2] is None  # quarantined rows are left alone
    assert out.column("_stat0_changed").to_pylist() == [1, 0, None]
    assert out.column("_stat0_bytes").to_pylist()[0] == len(text[0].encode()) - len(raw[0].encode())


def test_normalize_keeps_verse_indentation_unless_asked():
    t = table(["  Fran. Nay answer me:  Stand"])
    assert run_step(t, NormalizeStep(name="normalize"), 0, "normalize").column("text")[0].as_py() == "Fran. Nay answer me:  Stand"
    collapsed = run_step(t, NormalizeStep(name="normalize", collapse_spaces=True), 0, "normalize")
    assert collapsed.column("text")[0].as_py() == "Fran. Nay answer me: Stand"


def test_empty_documents_are_dropped_with_a_reason():
    out = mark_empty(table(["x", "", None], errors=[None, None, "bad"]))
    assert out.column("_drop").to_pylist() == [None, "empty_text", None]


def test_split_is_a_pure_function_of_the_key():
    cfg = SplitConfig(train=0.8, validation=0.1, test=0.1)
    splits = [split_of(f"doc{i}", cfg) for i in range(2000)]
    assert splits == [split_of(f"doc{i}", cfg) for i in range(2000)]
    share = splits.count("train") / len(splits)
    assert 0.76 < share < 0.84
    assert {"validation", "test"} <= set(splits)
    other = SplitConfig(train=0.8, validation=0.1, test=0.1, salt="b")
    assert splits != [split_of(f"doc{i}", other) for i in range(2000)]


def test_pack_puts_eos_after_every_document_and_cuts_full_blocks():
    t = pa.table({"input_ids": pa.array([[1, 2, 3], [4, 5], [], [6, 7, 8, 9]], pa.list_(pa.int32()))})
    blocks = pack(t, seq_len=4, eos_id=0).column("input_ids").to_pylist()
    # stream: 1 2 3 E 4 5 E E 6 7 8 9 E -> 3 full blocks, the last EOS is the dropped tail
    assert blocks == [[1, 2, 3, 0], [4, 5, 0, 0], [6, 7, 8, 9]]


def test_folio_spellings_map_to_one_work():
    assert _work_key("twelfe-night_gut_f") == ("twelfth_night", "folio")
    assert _work_key("twelfth_night_gut") == ("twelfth_night", "gutenberg")
    assert _work_key("anthonie_and_cleopatra_gut_f")[0] == _work_key("antony_and_cleopatra_gut")[0]


def test_parse_file_quarantines_each_bad_record_with_its_reason():
    src = FileSource(kind="jsonl", uri="/x.jsonl", text_field="body", id_field="doc_id", label_field="y")
    data = b'{"body": "good", "doc_id": 7, "y": "a"}\n{bad json\n[1, 2]\n{"other": 1}\n{"body": 5}\n\n\xff\xfe\n'
    rows = parse_file(src, "jsonl", "/x.jsonl", data)
    assert [r["_error"] for r in rows] == [None, "invalid_json", "not_an_object", "missing_text_field",
                                           "text_not_a_string", "undecodable_bytes"]
    assert rows[0]["id"] == "7" and rows[0]["label"] == "a" and rows[0]["text"] == "good"
    assert rows[1]["id"] == "/x.jsonl:2" and rows[1]["_raw"] == "{bad json"


def test_passages_cover_the_document_at_line_ends():
    import pyarrow as pa

    from raylm.data.config import PassageConfig
    from raylm.data.sources import DOC_SCHEMA, _passages, cut_passages

    text = "".join(f"line {i} " + "word " * (i % 7) + "\n" for i in range(400))
    parts = cut_passages(text, 500)
    assert "".join(parts) == text  # nothing lost, nothing repeated
    assert all(p.endswith("\n") for p in parts) and all(len(p) >= 500 for p in parts[:-1])
    assert len(parts[-1]) >= 500 // 4  # a short tail joins the last passage
    row = dict.fromkeys(DOC_SCHEMA.names) | {"id": "a/doc", "text": text, "label": "x", "work": "w"}
    out = _passages(pa.Table.from_pylist([row], schema=DOC_SCHEMA), PassageConfig(chars=500, per_document=5))
    ids = out.column("id").to_pylist()
    assert len(parts) > 5 and len(ids) == 5 and ids[0] == "a/doc#p0"
    assert set(out.column("label").to_pylist()) == {"x"} and set(out.column("work").to_pylist()) == {"w"}
    spread = [int(i.rsplit("#p", 1)[1]) for i in ids]
    assert spread == sorted(spread) and spread[-1] >= len(parts) // 2  # spread over the document, not its start
