"""The one folder ssn-runtime caches things in (the organism, converted GGUF checkpoints,
models fetched from the package index): `$SSN_CACHE/ssn-runtime`, else
`$XDG_CACHE_HOME/ssn-runtime`, else `~/.cache/ssn-runtime`.

It lives here, outside any feature, so that importing it pulls in nothing else (the
organism's builder, torch)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    base = os.environ.get("SSN_CACHE") or os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ssn-runtime"
