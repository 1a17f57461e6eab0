"""Command-line options generated from the library's config dataclasses: one home for each
option's name, type, default and help text.

A config field declares its help (and, where needed, its flag, choices or a comma-separated
list type) with `option(...)`; the CLI calls `add_options(parser, Config)` and builds the
config with `from_args(Config, args)`. The library itself only ever receives configs, never
an argparse Namespace.

    @dataclass
    class ProfileConfig:
        positions: str = option("prompt", "tokens counted", choices=POSITIONS)
        group_by: list[str] = option(["language"], "record fields to group by", csv=True)
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

_META = "ssn_option"
REQUIRED = dataclasses.MISSING  # option(REQUIRED, ...): a field (and option) without a default


def option(default: Any, help: str, *, flag: str | None = None, aliases: tuple[str, ...] = (), choices=None,
           csv: bool = False, kv: bool = False, metavar: str | None = None, cli: bool = True):
    """A dataclass field with its command-line description. Mutable defaults (lists, dicts)
    are copied per instance. `csv`: a comma-separated list; `kv`: comma-separated KEY=NUMBER
    pairs (a dict of floats). `aliases`: further flags for the same option. `cli=False` keeps
    a field out of the command line. `default=REQUIRED`: no default, a required option."""
    meta = {_META: {"help": help, "flag": flag, "aliases": aliases, "choices": choices, "csv": csv, "kv": kv,
                    "metavar": metavar, "cli": cli}}
    if default is REQUIRED:
        return dataclasses.field(metadata=meta)
    if isinstance(default, list | dict | set):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _base_type(tp):
    """(base type, optional) of an annotation such as `int | None` or `list[str]`."""
    args = typing.get_args(tp)
    optional = type(None) in args
    if optional:
        rest = [a for a in args if a is not type(None)]
        tp = rest[0] if len(rest) == 1 else tp
    return tp, optional


def _csv(kind):
    def parse(text: str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        try:
            return [kind(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None
    return parse


def _kv(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in (t.strip() for t in text.split(",") if t.strip()):
        key, sep, value = part.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = None
        if not sep or not key.strip() or number is None or key.strip() in out:
            raise argparse.ArgumentTypeError(f"expected distinct KEY=NUMBER pairs, got {part!r}")
        out[key.strip()] = number
    return out


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def add_options(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """Add one option per described field of the dataclass `cls` (its help text, type, default)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(_META)
        if meta is None or not meta["cli"] or f.name in skip:
            continue
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        tp, _ = _base_type(hints[f.name])
        default = _default(f)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "required": required}
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        help_text = meta["help"] + (f" (default: {shown})" if shown not in (None, "", False) else "")
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            origin = typing.get_origin(tp)
            if meta.get("kv"):
                kw["type"] = _kv
            elif meta["csv"] or origin is list:
                inner = typing.get_args(tp)[0] if typing.get_args(tp) else str
                kw["type"] = _csv(inner)
            elif tp in (int, float, str):
                kw["type"] = tp
            if meta["choices"] is not None:
                kw["choices"] = meta["choices"]
            if meta["metavar"]:
                kw["metavar"] = meta["metavar"]
        parser.add_argument(flag, *meta["aliases"], help=help_text, **kw)


def from_args(cls, args: argparse.Namespace, **overrides):
    """The config built from the options `add_options` added (defaults where not given)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    given.update(overrides)
    return cls(**given)


def describe(cls) -> dict[str, str]:
    """Field name -> help text (for docs and tests)."""
    return {f.name: f.metadata[_META]["help"] for f in dataclasses.fields(cls) if _META in f.metadata}
