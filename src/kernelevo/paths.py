"""Where kernelevo keeps its files: the only place that reads the environment.

KERNELEVO_DATA_DIR (tuned heuristics) and KERNELEVO_CACHE_DIR (the tuning database)
override the platform's user directories, for tests and for shared machines.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def data_dir() -> Path:
    return Path(os.environ.get("KERNELEVO_DATA_DIR") or platformdirs.user_data_dir("kernelevo"))


def cache_dir() -> Path:
    return Path(os.environ.get("KERNELEVO_CACHE_DIR") or platformdirs.user_cache_dir("kernelevo"))


def tuned_heuristics_path(chip_id: str) -> Path:
    return data_dir() / "heuristics" / f"{chip_id}.kevo"


def database_path() -> Path:
    return cache_dir() / "tuning.sqlite"


def check_writable(path: Path) -> None:
    """Raises the OSError that writing the file `path` would meet (a read-only folder or
    file system, a full disk), before the work whose result goes there: makes its folder
    and a probe file in it, removed at once."""
    folder = Path(path).parent
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".{Path(path).name}.{os.getpid()}.probe"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, b"kernelevo")
    finally:
        os.close(fd)
        os.unlink(probe)


def shipped_heuristics_dir() -> Path:
    return Path(__file__).resolve().parent / "heuristics"
