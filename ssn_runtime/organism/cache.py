"""Where the organism lives: built once into the user's cache folder, then reused.

A cached organism is rebuilt when it is not what a build here would give: another recipe
(organism VERSION, pinned conditions or configuration), another torch or transformers
version (other kernels or model code give other weights), a build that missed the pinned
conditions where this machine meets them, or a model.safetensors that no longer matches
its recorded SHA-256. A build that missed them on a machine that cannot meet them (no
AVX2, no MKL) is kept, and flagged: organism.json's "deviations" lists what differed, and
the demo prints it with its results.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

from ..cache import cache_root
from ..errors import SSNError
from . import repro
from .build import FORMAT, VERSION, OrganismConfig, build


def default_path(seed: int = 0, small: bool = False, arch: str = "llama") -> Path:
    kind = ("small-" if small else "") + ("" if arch == "llama" else f"{arch}-")
    return cache_root() / f"organism-v{VERSION}-{kind}seed{seed}"


def config_for(seed: int = 0, small: bool = False, arch: str = "llama") -> OrganismConfig:
    return OrganismConfig.small(seed, arch) if small else OrganismConfig(seed=seed, arch=arch)


def can_meet_pinned() -> bool:
    """Whether a pinned build on this machine would meet the pinned conditions (AVX2 and MKL)."""
    import torch

    return repro.native_capability() in ("AVX2", "AVX512") and torch.backends.mkl.is_available()


def organism_info(path: Path) -> dict:
    """organism.json of the organism at `path`, checked where its readers rely on it."""
    from ..io import read_json
    from ..validation import check_number, check_str, fail

    where = str(Path(path) / "organism.json")
    info = read_json(Path(path) / "organism.json", "organism.json")
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise SSNError(f"{where} is not an {FORMAT} file")
    for key in ("hr", "nhr"):
        if not isinstance(info.get(key), list) or not info[key]:
            raise fail(where, key, f"expected a non-empty list of languages, got {info.get(key)!r:.60}")
        for i, v in enumerate(info[key]):
            check_str(v, where, f"{key}[{i}]", allow_empty=False)
    if len(set(info["hr"] + info["nhr"])) != len(info["hr"] + info["nhr"]):
        raise fail(where, "nhr", "a language is listed twice")
    check_str(info.get("weights_sha256"), where, "weights_sha256", allow_empty=False)
    check_number(info.get("seconds"), where, "seconds", lo=0.0)
    return info


def stale_reason(path: Path, cfg: OrganismConfig | None = None) -> str | None:
    """Why the organism at `path` should be (re)built, or None if it is current.
    `cfg`: the configuration it should have (default: not checked)."""
    import torch
    import transformers

    try:
        info = json.loads((path / "organism.json").read_text())
    except OSError:
        return "not built yet"
    except json.JSONDecodeError:
        return "its organism.json is not valid JSON"
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        return "its organism.json is not an ssn-organism file"
    if info.get("version") != VERSION or info.get("recipe") != repro.RECIPE:
        return (f"built by an older recipe (version {info.get('version')}, {info.get('recipe')}; "
                f"this is version {VERSION}, {repro.RECIPE})")
    if cfg is not None and info.get("config") != json.loads(json.dumps(asdict(cfg))):
        return "built with another configuration"
    env = info.get("environment") or {}
    for name, have in (("torch", torch.__version__), ("transformers", transformers.__version__)):
        if env.get(name) != have:
            return f"built with {name} {env.get(name)}, this is {name} {have}"
    if info.get("deviations") and can_meet_pinned():
        return f"built without the pinned conditions ({'; '.join(info['deviations'])})"
    weights = path / "model.safetensors"
    if not weights.is_file():
        return "model.safetensors is missing"
    if repro.file_sha256(weights) != info.get("weights_sha256"):
        return "model.safetensors does not match the SHA-256 in organism.json"
    return None


def is_built(path: Path) -> bool:
    return stale_reason(path) is None


def ensure(seed: int = 0, small: bool = False, rebuild: bool = False, path: Path | None = None,
           progress: bool = True, arch: str = "llama") -> Path:
    """The organism's checkpoint folder, building it (atomically: a temp folder renamed into
    place) when missing, stale (see the module docstring), or `rebuild`."""
    path = Path(path) if path else default_path(seed, small, arch)
    cfg = config_for(seed, small, arch)
    reason = "asked to rebuild" if rebuild else stale_reason(path, cfg)
    if reason is None:
        return path
    if path.exists() or rebuild:
        print(f"rebuilding the organism at {path}: {reason}", file=sys.stderr, flush=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp, cfg, progress=progress)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path
