"""Crash-safe files: atomic writes under per-writer temp names, loads that treat damage as absence,
stale temp files of dead writers removed, and per-item claims so two runners split work.

Every cache and record of the suite goes through these few functions, so "a file that exists is
complete" holds everywhere: a writer killed mid-write leaves only a ``*.tmp<pid>`` file, which the
next writer in that folder removes once ``pid`` is gone.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

TEMP_SUFFIX = re.compile(r"\.tmp(\d+)$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete ``*.tmp<pid>`` files in ``folder`` whose writer process no longer runs; returns them."""
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        match = TEMP_SUFFIX.search(path.name)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temp name unique to this process, then rename over ``path`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str)))


def save_tensors(path: Path, blob: Any) -> None:
    atomic_write(path, lambda tmp: torch.save(blob, tmp))


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def read_json(path: Path) -> Any | None:
    """A JSON file's content, or None when it is missing or does not parse (cut short by a crash or a
    full disk): such a file counts as absent, so whatever it recorded is computed again; a warning names it."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        warn(f"{path} is not valid JSON (truncated?); treated as missing")
        return None


def load_tensors(path: Path) -> Any | None:
    """``torch.load(path, weights_only=True)``, or None (with a warning naming the file) when the file is
    missing or damaged, so that a cache cut short is rebuilt instead of failing every later run."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001 - zip, pickle and EOF errors all mean "damaged"
        warn(f"{path} cannot be read ({type(err).__name__}: {str(err)[:120]}); rebuilding it")
        return None


def tensor_digest(*tensors: torch.Tensor) -> str:
    """SHA-256 of the tensors' bytes (content hash of a cached set)."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class Claim:
    """An exclusive claim on one unit of work (a grid cell), taken with ``O_EXCL`` so that two runners
    on one folder never compute the same cell. A claim whose owner process is gone (killed) or older
    than ``stale_seconds`` (another machine that died) is stale and may be taken over.

    Not ``filelock``: its OS locks are unreliable on the network file systems a shared grid folder
    lives on, and its soft lock keeps no owner, so a killed runner's lock could not be told from a live
    one; the claim file records host, pid and time for exactly that."""

    def __init__(self, path: Path, stale_seconds: float = 24 * 3600):
        self.path, self.stale_seconds, self.held = Path(path), stale_seconds, False

    def _stale(self) -> bool:
        try:
            info = json.loads(self.path.read_text())
        except (OSError, ValueError):  # being written this instant, or damaged
            info = None
        if info is None:
            return self.path.is_file() and time.time() - self.path.stat().st_mtime > 60
        same_host = info.get("host") == os.uname().nodename
        if same_host and not _alive(int(info.get("pid", -1))):
            return True
        return time.time() - float(info.get("time", 0)) > self.stale_seconds

    def acquire(self) -> bool:
        """True when this process now holds the claim; False when another live runner does."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if not self._stale():
                    return False
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump({"pid": os.getpid(), "host": os.uname().nodename, "time": time.time()}, fh)
            self.held = True
            return True
        return False

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
