"""Atomic file and folder writes: a reader (or a resumed run) never sees a half-written file,
and never a folder artefact (mask, patch) whose parts come from two different saves.

Files get the permissions any other tool would give them (0666 minus the user's umask),
not mkstemp's private 0600.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import os
import shutil
import tempfile
import threading
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # elsewhere: set and restore it (briefly process-wide, hence the lock)
        old = os.umask(0o022)
        os.umask(old)
    return old


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
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


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextlib.contextmanager
def atomic_folder(folder: str | Path):
    """Yield a temp folder to fill; on success it becomes `folder` in one atomic step (a reader
    sees the old folder or the new one, never a mix); on error it is removed and `folder` stays.

    The swap is a renameat2 exchange where the old folder exists (Linux); elsewhere a rename
    aside and a rename in, where a reader can briefly find no folder but never a mixed one."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if folder.is_dir() and _exchange(tmp, folder):
            shutil.rmtree(tmp)  # tmp now holds the old content
        elif folder.exists():
            old = folder.with_name(f".{folder.name}.old{os.getpid()}")
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_folder(folder: str | Path, files: dict[str, bytes]) -> Path:
    """Write `files` (name -> bytes) as the whole content of `folder`, atomically (see `atomic_folder`)."""
    with atomic_folder(folder) as tmp:
        for name, data in files.items():
            atomic_write_bytes(tmp / name, data)
    return Path(folder)


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


def read_safetensors_checked(path: str | Path, digest: str, what: str) -> dict:
    """The tensors of a folder artefact's weight file, after checking the SHA-256 its config
    recorded: a folder whose parts come from two saves, or a damaged copy, is refused."""
    from .errors import SSNError

    path = Path(path)
    if digest and path.is_file() and sha256_hex(path.read_bytes()) != digest:
        raise SSNError(f"{path} does not match the SHA-256 its config records: the folder was modified or "
                       "copied partly; save it again")
    return read_safetensors(path, what)[0]


def read_json(path: str | Path, what: str, missing: str | None = None):
    """The parsed JSON of a file, or an SSNError naming the file."""
    import json

    from .errors import SSNError

    path = Path(path)
    if not path.is_file():
        raise SSNError(missing or f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise SSNError(f"{path} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise SSNError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def read_format_json(path: str | Path, fmt: str, what: str, missing: str | None = None) -> dict:
    """A JSON object whose "format" is `fmt` (an ssn-runtime file), or an SSNError naming the file.

    `missing`: the message when the file does not exist (default: "<what> not found: <path>").
    """
    from .errors import SSNError

    data = read_json(path, what, missing)
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise SSNError(f"{path} is not an ssn-runtime {what} (expected format {fmt!r})")
    return data
