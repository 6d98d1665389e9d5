"""Storage URIs against real filesystems: local disk, fsspec memory, and S3 served by moto's
server over real HTTP (the one stand-in allowed: S3 cannot run here)."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylm import storage
from raylm.storage import StorageError



def test_local_forms_normalize_to_one_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.normalize("a/b") == str(tmp_path / "a" / "b")
    assert storage.normalize(f"file://{tmp_path}/a") == str(tmp_path / "a")
    assert storage.normalize("~/x") == os.path.join(os.environ["HOME"], "x")
    assert storage.join("s3://bucket/root/", "v1", "manifest.json") == "s3://bucket/root/v1/manifest.json"


def test_bad_uris_are_user_errors():
    with pytest.raises(StorageError, match="unsupported"):
        storage.normalize("gs://bucket/x")
    with pytest.raises(StorageError, match="no bucket"):
        storage.normalize("s3:///x")
    with pytest.raises(StorageError, match="no such file"):
        storage.glob_files("/definitely/not/here")


@pytest.mark.parametrize("scheme", ["local", "memory"])
def test_round_trip_side_files(tmp_path, scheme):
    root = str(tmp_path / "r") if scheme == "local" else f"memory://t-{tmp_path.name}"
    uri = storage.join(root, "a", "m.json")
    storage.write_json(uri, {"x": 1})
    assert storage.read_json(uri) == {"x": 1}
    assert storage.listdir(storage.join(root, "a")) == ["m.json"]
    assert storage.glob_files(root) == [uri if scheme == "local" else uri]
    storage.remove(storage.join(root, "a"))
    assert not storage.exists(uri)


def test_local_write_is_atomic_rename(tmp_path):
    uri = str(tmp_path / "f.bin")
    storage.write_bytes(uri, b"one")
    storage.write_bytes(uri, b"two")
    assert (tmp_path / "f.bin").read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no temp files left


def test_arrow_fs_local_and_memory(tmp_path):
    fs, path = storage.arrow_fs(str(tmp_path / "t.parquet"))
    pq.write_table(pa.table({"a": [1, 2]}), path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).column("a").to_pylist() == [1, 2]
    fs, path = storage.arrow_fs("memory://arrow/t.parquet")
    pq.write_table(pa.table({"a": [3]}), path, filesystem=fs)
    assert storage.exists("memory://arrow/t.parquet")


def test_s3_side_files_and_arrow(s3):
    storage.write_json("s3://raylm-test/side/m.json", {"ok": True})
    assert storage.read_json("s3://raylm-test/side/m.json") == {"ok": True}
    assert storage.exists("s3://raylm-test/side/m.json")
    assert storage.glob_files("s3://raylm-test/side") == ["s3://raylm-test/side/m.json"]
    fs, path = storage.arrow_fs("s3://raylm-test/arrow/t.parquet")
    pq.write_table(pa.table({"a": [1, 2, 3]}), path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).num_rows == 3
    # the object really is in the bucket, seen by a different client
    import boto3

    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3).list_objects_v2(Bucket="raylm-test")["Contents"]]
    assert "arrow/t.parquet" in keys and "side/m.json" in keys
