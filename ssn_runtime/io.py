"""Atomic file writes: a reader (or a resumed run) never sees a half-written file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def read_safetensors(path: str | Path, what: str = "file") -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file, or an SSNError naming the file."""
    from safetensors import safe_open

    from .errors import SSNError

    path = Path(path)
    if not path.is_file():
        raise SSNError(f"{what} not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise SSNError(f"{path} is not a readable safetensors file ({exc})") from None


def read_format_json(path: str | Path, fmt: str, what: str, missing: str | None = None) -> dict:
    """A JSON object whose "format" is `fmt` (an ssn-runtime file), or an SSNError naming the file.

    `missing`: the message when the file does not exist (default: "<what> not found: <path>").
    """
    import json

    from .errors import SSNError

    path = Path(path)
    if not path.is_file():
        raise SSNError(missing or f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SSNError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise SSNError(f"{path} is not an ssn-runtime {what} (expected format {fmt!r})")
    return data
