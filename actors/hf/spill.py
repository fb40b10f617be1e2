"""Spill folders: where offloaded adapters and samplers wait on disk (CPU models).

- Each folder's name holds its host and process id (`adapters-<host>-<pid>-<random>`), so a
  starting backend removes the folders that processes on its host left behind when they were
  killed (a SIGKILLed actor never runs its cleanup), and never a live process's.
- NOTE: a folder of another host (a shared cache over NFS) is left to that host's next start.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)
_NAME = re.compile(r"^(adapters|samplers)-(?P<host>.+)-(?P<pid>\d+)-[^-]+$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())


def new_spill_dir(root: str | Path, kind: str) -> Path:
    """A new spill folder of this process under `root` (made if missing)."""
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{kind}-{_host()}-{os.getpid()}-", dir=root))


def remove_leftovers(root: str | Path) -> list[Path]:
    """Remove the spill folders under `root` of this host's processes that no longer run."""
    root = Path(root).expanduser()
    if not root.is_dir():
        return []
    removed = []
    for folder in root.iterdir():
        match = _NAME.match(folder.name)
        if match is None or match["host"] != _host() or _alive(int(match["pid"])):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    if removed:
        logger.info("removed %d spill folders left by processes that are gone: %s", len(removed), removed)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
