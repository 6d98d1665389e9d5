"""Concurrent writers (issue 9): two jobs producing the same dataset version, or registering
models under the same name, at once, leave complete, valid artifacts, never a mix: local
writes go aside and are renamed or linked into place; on S3 (moto over HTTP) a version is
claimed and a dataset published with conditional PUTs (`If-None-Match: *`)."""

from __future__ import annotations

import concurrent.futures as cf
import json
import subprocess
import sys

import pytest
from conftest import ROOT

from raylm import registry, storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "area")
    request.getfixturevalue("s3")
    return f"s3://raylm-test/writers-{tmp_path.name}"


def test_exclusive_create_has_exactly_one_winner(root):
    uri = storage.join(root, "claim.json")
    with cf.ThreadPoolExecutor(8) as ex:
        won = list(ex.map(lambda i: storage.create_exclusive(uri, f"writer {i}".encode()), range(8)))
    assert won.count(True) == 1
    assert storage.read_bytes(uri) == f"writer {won.index(True)}".encode()  # the winner's bytes, whole


def test_writers_registering_one_name_at_once_each_get_a_whole_version(root, tmp_path):
    """Six models registered under one name at once, each a directory whose two files carry
    its writer's number: six versions, and every version's files come from one writer."""
    def write(i: int) -> dict:
        d = tmp_path / f"model-{i}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"writer": i}))
        (d / "model.safetensors").write_bytes(bytes([i]) * 4096)
        return registry.register(d, "racer", {"task": "causal_lm", "writer": i}, root=root)

    with cf.ThreadPoolExecutor(6) as ex:
        cards = list(ex.map(write, range(6)))
    assert sorted(c["version"] for c in cards) == [1, 2, 3, 4, 5, 6]  # nobody got another's number
    for c in registry.list_models(root):
        i = c["writer"]
        base = storage.join(root, "racer", f"v{c['version']}")
        assert json.loads(storage.read_text(storage.join(base, "config.json"))) == {"writer": i}
        assert storage.read_bytes(storage.join(base, "model.safetensors")) == bytes([i]) * 4096


def test_two_jobs_building_one_dataset_version_on_s3_leave_one_whole_version(ray_session, s3, tmp_path):
    """Two data jobs (as `ray job submit` runs them) build the same version into S3 at once:
    both succeed, the version has one manifest, and it points at one attempt whose files hold
    exactly the rows the manifest counts (no rows of the other attempt mixed in)."""
    import pyarrow.parquet as pq

    from raylm.data import versions

    out = f"s3://raylm-test/race-{tmp_path.name}"
    cmd = [sys.executable, "jobs/prepare_data.py", "--config", "tests/data/tiny.yaml",
           "--set", f"sources.0.uri={ROOT / 'tests' / 'data' / 'tiny.jsonl'}", "--set", f"output.root={out}"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(x[-2000:] for x in logs)
    (m,) = [v for v in versions.list_versions(out)]
    assert m["uri"].startswith(storage.join(out, "tiny", m["version"], "_attempt-"))
    for split, counts in m["splits"].items():
        if not counts["documents"]:
            continue
        fs, path = storage.arrow_fs(storage.join(m["uri"], "docs", split))
        assert pq.read_table(path, filesystem=fs).num_rows == counts["documents"], split
        fs, path = storage.arrow_fs(storage.join(m["uri"], "packed", split))
        assert pq.read_table(path, filesystem=fs).num_rows == counts["blocks"], split
    # the later job said it used the other's version: it lost the race, or found it done
    assert sum("another job published" in x or "reusing it" in x for x in logs) == 1, logs
    attempts = [n for n in storage.listdir(storage.join(out, "tiny", m["version"])) if n.startswith("_attempt-")]
    assert attempts == [m["uri"].rsplit("/", 1)[-1]]  # the loser removed its own files


def test_an_alias_names_the_version_it_was_last_pointed_at(root, tmp_path):
    """Aliases on local disk and on S3: set, resolved wherever a model reference is, moved (its
    history kept), pointed at through another alias, removed; names that read as versions refused."""
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    for _ in range(3):
        registry.register(d, "aliased", {"task": "causal_lm"}, root=root)
    registry.set_alias("aliased@v1", "production", root, reason="first")
    assert registry.resolve("aliased@production", root)["version"] == 1
    assert registry.resolve("aliased", root)["version"] == registry.resolve("aliased@latest", root)["version"] == 3
    registry.set_alias("aliased@2", "production", root, reason="better")
    registry.set_alias("aliased@production", "staging", root)  # whatever production is now
    assert registry.aliases("aliased", root) == {"production": 2, "staging": 2}
    rec = registry.alias_of("aliased", "production", root)
    assert [(h["version"], h["reason"]) for h in rec["history"]] == [(1, "first"), (2, "better")]
    assert [c["version"] for c in registry.list_models(root)] == [1, 2, 3]  # aliases are not versions
    assert registry.remove_alias("aliased", "staging", root) and not registry.remove_alias("aliased", "staging", root)
    with pytest.raises(FileNotFoundError, match="no alias 'staging'.*its aliases: production"):
        registry.resolve("aliased@staging", root)
    with pytest.raises(FileNotFoundError, match="neither a version"):
        registry.resolve("aliased@../../x", root)  # never a path outside the model's aliases
    for bad in ("v4", "4", "latest", "-x", "a b"):
        with pytest.raises(ValueError, match="not allowed"):
            registry.set_alias("aliased@v1", bad, root)


def test_deleting_and_pruning_versions_keeps_the_aliased_ones_and_never_reuses_a_number(root, tmp_path):
    from conftest import run_cli

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"\0" * 1024)
    for _ in range(4):
        registry.register(d, "old", {"task": "causal_lm"}, root=root)
    registry.set_alias("old@v2", "production", root)
    assert registry.prune("old", 1, root, dry_run=True) == ["old@v1", "old@v3"]
    assert [c["version"] for c in registry.list_models(root)] == [1, 2, 3, 4]  # a dry run deletes nothing
    assert registry.prune("old", 1, root) == ["old@v1", "old@v3"]  # v2: aliased, v4: the newest
    assert [c["version"] for c in registry.list_models(root)] == [2, 4]
    assert storage.listdir(storage.join(root, "old", "v1")) == ["deleted.json"]  # the files are gone
    with pytest.raises(FileNotFoundError):
        registry.resolve("old@v3", root)
    registry.delete("old@v4", root)
    assert registry.register(d, "old", {"task": "causal_lm"}, root=root)["version"] == 5  # not v4 again
    with pytest.raises(ValueError, match="old@production point"):
        registry.delete("old@v2", root)
    registry.delete("old@production", root, force=True)
    assert registry.aliases("old", root) == {} and [c["id"] for c in registry.list_models(root)] == ["old@v5"]
    if root.startswith("s3://"):
        return
    r = run_cli("models", "delete", "old", "--registry", root)
    assert r.returncode == 2 and "name the version to delete: old@vN" in r.stderr
    r = run_cli("models", "prune", "old", "--keep", "1", "--registry", root)
    assert r.returncode == 0 and "deleted 0 version(s) of old" in r.stdout
    r = run_cli("models", "delete", "old@v5", "--registry", root)
    assert r.returncode == 0 and "deleted old@v5" in r.stdout and registry.list_models(root) == []


def test_pruning_dataset_versions_keeps_the_newest_and_those_models_were_trained_on(root, tmp_path):
    """Four versions of a dataset (their manifests and a data file each), one of them a registered
    model's training data (in a mixture): pruning to the newest one deletes the other two, files and
    all; deleting the used one is refused unless forced."""
    from conftest import run_cli

    from raylm.data import versions

    data, reg = storage.join(root, "datasets"), storage.join(root, "registry")
    for i in range(4):
        vid = f"v{i:012x}"
        base = storage.join(data, "docs", vid)
        storage.write_bytes(storage.join(base, "docs", "train", "part-0.parquet"), b"rows" * 100)
        storage.write_json(storage.join(base, "manifest.json"), {
            "id": f"docs@{vid}", "name": "docs", "version": vid, "uri": base, "created": f"2026-12-0{i + 1}T00:00:00"})
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    registry.register(d, "user", {"task": "causal_lm", "dataset": "docs@v000000000001 (60%) + other@v1 (40%)"},
                      root=reg)
    assert versions.prune("docs", 1, data, reg, dry_run=True) == ["docs@v000000000002", "docs@v000000000000"]
    assert len(versions.list_versions(data)) == 4
    assert versions.prune("docs", 1, data, reg) == ["docs@v000000000002", "docs@v000000000000"]
    assert [m["id"] for m in versions.list_versions(data)] == ["docs@v000000000003", "docs@v000000000001"]
    assert storage.listdir(storage.join(data, "docs")) == ["v000000000001", "v000000000003"]  # files and all
    with pytest.raises(ValueError, match="training data of user@v1"):
        versions.delete("docs@v000000000001", data, reg)
    if root.startswith("s3://"):
        return
    r = run_cli("datasets", "delete", "docs@v000000000001", "--root", data, "--registry", reg)
    assert r.returncode == 1 and "training data of user@v1" in r.stderr
    r = run_cli("datasets", "delete", "docs@v000000000001", "--root", data, "--registry", reg, "--force")
    assert r.returncode == 0 and "deleted docs@v000000000001" in r.stdout
    r = run_cli("datasets", "prune", "docs", "--keep", "1", "--root", data, "--registry", reg)
    assert r.returncode == 0 and "deleted 0 version(s) of docs" in r.stdout
