"""Checkpoint storage: tinker paths, tenant prefixes, atomic publication and replacement, any fsspec URI."""

import posixpath
import uuid

import pytest

from actors.checkpoint_store import CheckpointRecord, CheckpointStore, parse_tinker_path, utc_now
from configs.errors import NotFoundError, UserError

LORA = {"rank": 4, "seed": 1, "train_attn": True, "train_mlp": True, "train_unembed": False}
RUN = "s:train:0"


def record(name: str, segment: str = "weights", run: str = RUN) -> CheckpointRecord:
    return CheckpointRecord(run, segment, name, "tiny", LORA, utc_now())


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    root = str(tmp_path / "ckpt") if request.param == "local" else f"memory://thinker-{uuid.uuid4().hex}"
    return CheckpointStore(root)


def test_parse_tinker_path():
    assert parse_tinker_path("tinker://s:train:0/weights/000010") == ("s:train:0", "weights", "000010")
    bad_paths = (
        "s:train:0/weights/x",
        "tinker://run/other/x",
        "tinker://run/weights",
        "tinker://run/weights/.x",
        "tinker://../weights/x",
        "tinker://run/weights/a/../../b",
        "tinker:///etc/weights/x",
        "tinker://run/weights/nul\x00",
    )
    for bad in bad_paths:
        with pytest.raises(UserError):
            parse_tinker_path(bad)


def test_write_read_replace_delete(store):
    first = store.write("alice", record("final"), {"a.bin": b"one", "b.json": b"{}"})
    assert first.tinker_path == "tinker://s:train:0/weights/final" and first.size_bytes == 5
    store.write("alice", record("final"), {"a.bin": b"two!"})  # the same name again replaces it
    assert store.read_files("alice", RUN, "weights", "final", ["a.bin", "b.json"]) == {"a.bin": b"two!"}
    listed = store.fs.ls(posixpath.join(store.root, "alice", RUN), detail=False)
    assert [p.rstrip("/").rsplit("/", 1)[-1] for p in listed] == ["weights"]  # nothing left aside
    store.delete("alice", RUN, "weights", "final")
    with pytest.raises(NotFoundError):
        store.record("alice", RUN, "weights", "final")


def test_tenants_have_separate_prefixes(store):
    store.write("alice", record("final"), {"a.bin": b"alice's"})
    with pytest.raises(NotFoundError):
        store.read_files("bob", RUN, "weights", "final", ["a.bin"])
    assert store.folder("alice", RUN, "weights", "x").startswith(posixpath.join(store.root, "alice") + "/")


def test_no_id_or_name_reaches_outside_the_tenant_prefix(store):
    for tenant, run, name in [
        ("..", RUN, "x"),
        ("alice", "..", "x"),
        ("alice", "../bob", "x"),
        ("alice", RUN, ".."),
        ("alice", RUN, "../../bob/x"),
        ("/abs", RUN, "x"),
        ("alice", "/etc", "x"),
        ("alice", RUN, "a\x00b"),
        ("alice", RUN, "\ud800"),
    ]:
        with pytest.raises(UserError):
            store.folder(tenant, run, "weights", name)
        with pytest.raises(UserError):
            store.write(tenant, record(name, run=run), {"a.bin": b"x"})


def test_a_checkpoint_that_fails_midway_is_never_published_and_the_old_one_survives(store):
    store.write("alice", record("ckpt"), {"a.bin": b"old"})

    class FailsAfterOneFile(dict):
        def items(self):
            yield "a.bin", b"data"
            raise OSError("disk full")

    with pytest.raises(OSError):
        store.write("alice", record("ckpt"), FailsAfterOneFile())
    with pytest.raises(OSError):
        store.write("alice", record("broken"), FailsAfterOneFile())
    assert store.read_files("alice", RUN, "weights", "ckpt", ["a.bin"]) == {"a.bin": b"old"}
    with pytest.raises(NotFoundError):
        store.record("alice", RUN, "weights", "broken")
