"""Where the organism lives: built once into the user's cache folder, then reused."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .build import FORMAT, VERSION, OrganismConfig, build


def cache_root() -> Path:
    base = os.environ.get("SSN_CACHE") or os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ssn-runtime"


def default_path(seed: int = 0, small: bool = False) -> Path:
    return cache_root() / f"organism-v{VERSION}-{'small-' if small else ''}seed{seed}"


def is_built(path: Path) -> bool:
    try:
        info = json.loads((path / "organism.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return info.get("format") == FORMAT and info.get("version") == VERSION and (path / "model.safetensors").is_file()


def ensure(seed: int = 0, small: bool = False, rebuild: bool = False, path: Path | None = None,
           progress: bool = True) -> Path:
    """The organism's checkpoint folder, building it (atomically: a temp folder renamed into
    place) when missing, stale, or `rebuild`."""
    path = Path(path) if path else default_path(seed, small)
    if is_built(path) and not rebuild:
        return path
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    cfg = OrganismConfig.small(seed) if small else OrganismConfig(seed=seed)
    build(tmp, cfg, progress=progress)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path
