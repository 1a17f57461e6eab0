"""Command-line options generated from config dataclasses (ssn_runtime.options)."""

import argparse
from dataclasses import dataclass

import pytest

from ssn_runtime.options import add_options, describe, from_args, option


@dataclass
class Cfg:
    positions: str = option("prompt", "tokens counted", choices=["prompt", "last"])
    group_by: list[str] = option(["language"], "fields to group by", csv=True)
    topk: int | None = option(None, "top-k per sequence")
    threshold: float = option(0.0, "activation threshold")
    gate_stats: bool = option(False, "count act(gate) > threshold")
    secret: int = option(3, "not on the command line", cli=False)


def parse(*argv):
    p = argparse.ArgumentParser()
    add_options(p, Cfg)
    return from_args(Cfg, p.parse_args(list(argv)))


def test_defaults_and_types():
    assert parse() == Cfg()
    c = parse("--positions", "last", "--group-by", "language,label", "--topk", "5", "--threshold", "0.5",
              "--gate-stats")
    assert c == Cfg("last", ["language", "label"], 5, 0.5, True, 3)
    assert parse("--no-gate-stats").gate_stats is False
    assert Cfg().group_by is not Cfg().group_by  # mutable defaults are per instance


def test_bad_values_are_argparse_errors(capsys):
    for argv, says in ((["--positions", "all"], "invalid choice"), (["--topk", "1.5"], "invalid int value"),
                       (["--secret", "4"], "unrecognized arguments")):
        with pytest.raises(SystemExit) as e:
            parse(*argv)
        assert e.value.code == 2 and says in capsys.readouterr().err


def test_help_text_comes_from_the_config():
    p = argparse.ArgumentParser()
    add_options(p, Cfg)
    text = p.format_help()
    assert "tokens counted (default: prompt)" in text and "--group-by" in text and "--secret" not in text
    assert describe(Cfg)["topk"] == "top-k per sequence"
