"""Declared file formats: one home for reading and writing the JSON part of every
ssn-runtime artefact (neuron sets, masks, patches, statistics), in the manner of PEFT's
config mixin.

A `FileFormat` names its format, the newest version this code writes and reads, and its
declared fields, each with a checker and a default. Loading checks the format name, refuses
a file from a newer ssn-runtime with a clear line (instead of misreading it), validates every
declared field at the boundary, and keeps unknown keys as metadata, so files written by a
newer minor version or annotated by a user round-trip.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SSNError
from .io import read_json
from .validation import check_int, fail

REQUIRED = object()
RESERVED = ("format", "version")


@dataclass(frozen=True)
class Field:
    """A declared field: `check(value, where, key)` returns the validated value."""

    check: Callable[[Any, str, str], Any]
    default: Any = REQUIRED
    doc: str = ""


@dataclass(frozen=True)
class FileFormat:
    name: str  # the "format" value, e.g. "ssn-neuron-mask"
    version: int  # the version written; files up to it are read
    what: str  # for messages, e.g. "neuron mask"
    fields: dict[str, Field] = field(default_factory=dict)

    def to_dict(self, values: dict, meta: dict | None = None) -> dict:
        """The JSON object to write: header, metadata, then the declared fields (which win)."""
        out = {"format": self.name, "version": self.version}
        out.update({k: v for k, v in (meta or {}).items() if k not in RESERVED and k not in self.fields})
        out.update({k: values[k] for k in self.fields if k in values})
        return out

    def check_header(self, data, where: str) -> int:
        if not isinstance(data, dict):
            raise SSNError(f"{where} is not an ssn-runtime {self.what} (expected a JSON object)")
        if data.get("format") != self.name:
            raise SSNError(f"{where} is not an ssn-runtime {self.what} (format {data.get('format')!r}, "
                           f"expected {self.name!r})")
        version = check_int(data.get("version"), where, "version", 1)
        if version > self.version:
            raise SSNError(f"{where} was written by a newer ssn-runtime ({self.what} format version {version}; "
                           f"this one reads up to {self.version}): upgrade ssn-runtime to read it")
        return version

    def from_dict(self, data, where: str) -> tuple[dict, dict]:
        """(declared field values, metadata) of a parsed JSON object, validated."""
        self.check_header(data, where)
        values = {}
        for key, f in self.fields.items():
            if key in data and data[key] is not None:
                values[key] = f.check(data[key], where, key)
            elif f.default is REQUIRED:
                raise fail(where, key, "is missing")
            else:
                values[key] = f.default() if callable(f.default) else f.default
        meta = {k: v for k, v in data.items() if k not in self.fields and k not in RESERVED}
        return values, meta

    def read(self, path: str | Path, missing: str | None = None) -> tuple[dict, dict]:
        path = Path(path)
        return self.from_dict(read_json(path, self.what, missing), str(path))


# ----- field checkers shared by several formats -----
def any_value(value, where, key):
    return value


def a_string(value, where, key):
    if not isinstance(value, str):
        raise fail(where, key, f"expected a string, got {value!r:.60}")
    return value


def a_bool(value, where, key):
    if not isinstance(value, bool):
        raise fail(where, key, f"expected true or false, got {value!r:.60}")
    return value


def an_object(value, where, key):
    if not isinstance(value, dict):
        raise fail(where, key, f"expected a JSON object, got {value!r:.60}")
    return value


def string_list(value, where, key):
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise fail(where, key, f"expected a list of strings, got {value!r:.60}")
    if len(set(value)) != len(value):
        raise fail(where, key, f"names an entry twice: {value!r:.80}")
    return list(value)


def nonneg_int(value, where, key):
    return check_int(value, where, key, 0)
