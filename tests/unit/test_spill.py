"""Spill folders left by killed processes are removed at the next start; live ones are kept."""

import subprocess
import sys

from actors.hf.spill import _host, new_spill_dir, remove_leftovers


def test_leftovers_of_dead_processes_on_this_host_are_removed_and_nothing_else(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    left = tmp_path / f"adapters-{_host()}-{dead_pid}-abc123"
    (left / "sub").mkdir(parents=True)
    (left / "m.safetensors").write_bytes(b"x")
    left_samplers = tmp_path / f"samplers-{_host()}-{dead_pid}-zz"
    left_samplers.mkdir()
    mine = new_spill_dir(tmp_path, "adapters")
    other_host = tmp_path / f"samplers-another.host-{dead_pid}-q1"
    other_host.mkdir()
    unrelated = tmp_path / "notes"
    unrelated.mkdir()

    assert sorted(remove_leftovers(tmp_path)) == sorted([left, left_samplers])
    assert not left.exists() and not left_samplers.exists()
    assert mine.is_dir() and other_host.is_dir() and unrelated.is_dir()
    assert remove_leftovers(tmp_path / "missing") == []
