"""Which .kevo file is in force for a backend and chip, loaded and ready to select.

Order: the tuned file for this chip (written by `kernelevo tune`), then the shipped file
whose `chips` line matches this chip most specifically, then the backend's generic file
(with a warning). The .kevo files beside this module are the shipped ones.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..chips import Chip
from ..dsl import DSLError, parse
from ..dsl.select import CompiledProgram
from ..paths import shipped_heuristics_dir, tuned_heuristics_path


@dataclass(frozen=True)
class Source:
    path: Path
    origin: str  # tuned | shipped | generic | file | seed
    reason: str


@dataclass(frozen=True)
class Active:
    source: Source
    program: CompiledProgram


def load_file(path: Path | str, chip: Chip) -> CompiledProgram:
    """Parses and checks a .kevo file for this chip; raises DSLError on any error."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    return CompiledProgram(parse(text, str(path)), text, str(path), chip)


def _specificity(pattern: str) -> int:
    literal = sum(ch not in "*?[]" for ch in pattern)
    exact = not any(ch in "*?[" for ch in pattern)
    return literal + (10_000 if exact else 0)


def shipped_sources(backend: str) -> list[tuple[Path, tuple[str, ...]]]:
    """(path, chip patterns) of the shipped files for a backend."""
    found = []
    for path in sorted(shipped_heuristics_dir().glob("*.kevo")):
        program = parse(path.read_text(encoding="utf-8"), str(path))
        if program.target == backend:
            found.append((path, program.chips or ("*",)))
    return found


def find_source(backend: str, chip: Chip, include_tuned: bool = True) -> Source:
    tuned = tuned_heuristics_path(chip.id)
    if include_tuned and tuned.is_file():
        return Source(tuned, "tuned", f"tuned for {chip.id} by `kernelevo tune`")
    best: tuple[int, Path, str] | None = None
    for path, patterns in shipped_sources(backend):
        for pattern in patterns:
            if chip.matches(pattern):
                score = _specificity(pattern)
                if best is None or score > best[0]:
                    best = (score, path, pattern)
    if best is None:
        raise FileNotFoundError(f"no shipped {backend} heuristics (the installation is incomplete)")
    score, path, pattern = best
    if pattern == "*":
        return Source(path, "generic", f"no heuristics name {chip.id}; generic {backend} rules")
    return Source(path, "shipped", f"shipped for chips matching {pattern}")


def seed_source(backend: str, chip: Chip) -> Source:
    """The program `kernelevo tune` and `kernelevo evolve` start their search from.

    On a Mac the shipped apple-*.kevo send every call to MLX (kernelevo's Metal kernels are
    untimed there); the seeds/ folder beside them keeps MLX's own tile choices restated with
    kernelevo's kernels, matched to the chip as the shipped files are (origin "seed").
    Elsewhere, and for a chip no seed names, the seed is the shipped program. Speedups are
    still measured against the shipped program (`find_source(..., include_tuned=False)`)."""
    best: tuple[int, Path, str] | None = None
    for path in sorted((shipped_heuristics_dir() / "seeds").glob("*.kevo")):
        program = parse(path.read_text(encoding="utf-8"), str(path))
        if program.target != backend:
            continue
        for pattern in program.chips or ("*",):
            if chip.matches(pattern) and (best is None or _specificity(pattern) > best[0]):
                best = (_specificity(pattern), path, pattern)
    if best is None:
        return find_source(backend, chip, include_tuned=False)
    return Source(best[1], "seed", f"seed for chips matching {best[2]}")


def seed_program(backend: str, chip: Chip) -> CompiledProgram:
    """The seed program (seed_source) for this chip, loaded and checked."""
    return load_file(seed_source(backend, chip).path, chip)


class _Registry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: dict[tuple[str, str], Active] = {}

    def get(self, backend: str, chip: Chip) -> Active:
        key = (backend, chip.id)
        active = self._active.get(key)
        if active is None:
            with self._lock:
                active = self._active.get(key) or self._load(backend, chip)
                self._active[key] = active
        return active

    def _load(self, backend: str, chip: Chip) -> Active:
        source = find_source(backend, chip)
        if source.origin == "tuned":
            try:
                return Active(source, load_file(source.path, chip))
            except (DSLError, OSError, UnicodeDecodeError) as err:
                warnings.warn(f"ignoring tuned heuristics {source.path}: {err}", stacklevel=3)
                source = find_source(backend, chip, include_tuned=False)
        if source.origin == "generic":
            warnings.warn(f"kernelevo has no {backend} heuristics for chip {chip.id}; using "
                          f"the generic ones ({source.path.name})", stacklevel=3)
        return Active(source, load_file(source.path, chip))

    def invalidate(self) -> None:
        with self._lock:
            self._active.clear()


registry = _Registry()


def active(backend: str, chip: Chip) -> Active:
    return registry.get(backend, chip)


def invalidate() -> None:
    """Forget loaded heuristics (after `kernelevo tune` wrote new ones)."""
    registry.invalidate()
