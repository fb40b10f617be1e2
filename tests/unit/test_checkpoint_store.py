"""Checkpoint storage: tinker paths, atomic publication, listing and deletion, any fsspec URI."""

import uuid

import pytest

from actors.checkpoint_store import CheckpointRecord, CheckpointStore, RunRecord, parse_tinker_path, utc_now
from configs.errors import NotFoundError, UserError

LORA = {"rank": 4, "seed": 1, "train_attn": True, "train_mlp": True, "train_unembed": False}


def record(name: str, segment: str = "weights", run: str = "s:train:0") -> CheckpointRecord:
    return CheckpointRecord(run, segment, name, "tiny", LORA, utc_now())


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    root = str(tmp_path / "ckpt") if request.param == "local" else f"memory://thinker-{uuid.uuid4().hex}"
    return CheckpointStore(root)


def test_parse_tinker_path():
    assert parse_tinker_path("tinker://s:train:0/weights/000010") == ("s:train:0", "weights", "000010")
    for bad in ("s:train:0/weights/x", "tinker://run/other/x", "tinker://run/weights", "tinker://run/weights/.x"):
        with pytest.raises(UserError):
            parse_tinker_path(bad)


def test_write_list_read_overwrite_delete(store):
    store.write_run(RunRecord("s:train:0", "tiny", LORA, utc_now(), {"renderer_name": "x"}))
    first = store.write(record("final"), {"a.bin": b"one", "b.json": b"{}"})
    assert first.tinker_path == "tinker://s:train:0/weights/final" and first.size_bytes == 5
    store.write(record("final"), {"a.bin": b"two!"})  # the same name again overwrites quietly
    assert store.read_files(first.tinker_path, ["a.bin", "b.json"]) == {"a.bin": b"two!"}
    store.write(record("s1", "sampler_weights"), {"a.bin": b"x"})
    assert [c.checkpoint_id for c in store.checkpoints("s:train:0")] == ["weights/final", "sampler_weights/s1"]
    assert store.run("s:train:0").user_metadata == {"renderer_name": "x"}
    store.delete("s:train:0", "weights/final")
    assert [c.checkpoint_id for c in store.checkpoints("s:train:0")] == ["sampler_weights/s1"]
    with pytest.raises(NotFoundError):
        store.record(first.tinker_path)


def test_a_checkpoint_that_fails_midway_is_never_listed(store):
    class FailsAfterOneFile(dict):
        def items(self):
            yield "a.bin", b"data"
            raise OSError("disk full")

    with pytest.raises(OSError):
        store.write(record("broken"), FailsAfterOneFile())
    assert store.checkpoints("s:train:0") == []
    with pytest.raises(NotFoundError):
        store.record("tinker://s:train:0/weights/broken")


def test_unknown_runs_are_not_found(store):
    with pytest.raises(NotFoundError):
        store.run("nobody")
    assert store.checkpoints("nobody") == [] and store.runs() == []
