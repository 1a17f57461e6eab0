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


# ----- the ssn commands' options come from their configs -----
def _commands():
    from ssn_runtime.demo import DemoConfig
    from ssn_runtime.science.evaluate import EvalConfig
    from ssn_runtime.science.identify import AttributionConfig, IdentifyConfig
    from ssn_runtime.science.masks import MaskConfig
    from ssn_runtime.science.profiler import ProfileConfig
    from ssn_runtime.science.validate import ValidateConfig
    from ssn_runtime.serve.config import ServeConfig
    from ssn_runtime.training.train import MakeDataConfig, TrainConfig

    return {"identify": [IdentifyConfig, AttributionConfig], "mask": [MaskConfig], "eval": [EvalConfig],
            "validate": [ValidateConfig], "make-data": [MakeDataConfig], "demo": [DemoConfig],
            "profile": [ProfileConfig], "train": [TrainConfig], "serve": [ServeConfig]}


@pytest.mark.parametrize("command", ["identify", "mask", "eval", "validate", "make-data", "demo", "profile", "train",
                                     "serve"])
def test_every_config_field_is_an_option_of_its_command(command):
    import dataclasses

    from ssn_runtime.cli import build_parser

    parser = build_parser()._subparsers._group_actions[0].choices[command]
    flags = {f for a in parser._actions for f in a.option_strings}
    text = parser.format_help()
    for cls in _commands()[command]:
        for f in dataclasses.fields(cls):
            flag = f.metadata["ssn_option"]["flag"] or "--" + f.name.replace("_", "-")
            assert flag in flags and flag in text, (command, flag)
        assert cls() if command != "mask" else cls(set_name="SS")  # the defaults are valid


# Paths below do not exist: a bad option must be reported before any file or model is read.
BAD_OPTIONS = [
    (["eval", "--model", "none", "--data", "none.jsonl", "--out", "o", "--max-new-tokens", "-1"],
     "max_new_tokens: -1 is out of range"),
    (["eval", "--model", "none", "--data", "none.jsonl", "--out", "o", "--max-new-tokens", "0", "--no-margins"],
     "nothing to do: give max_new_tokens > 0"),
    (["eval", "--model", "none", "--out", "o", "--max-batch-size", "0"],
     "max batch size must be a positive integer, got 0"),
    (["validate", "--model", "none", "--neurons", "n", "--data", "none.jsonl", "--out", "o", "--alpha", "nan"],
     "alpha: must be finite"),
    (["validate", "--model", "none", "--neurons", "n", "--data", "none.jsonl", "--out", "o", "--max-new-tokens",
      "-1"], "max_new_tokens: -1 is out of range"),
    (["identify", "--stats", "none.safetensors", "--out", "o", "--fraction", "2"], "fraction: 2.0 is out of range"),
    (["identify", "--stats", "none.safetensors", "--out", "o", "--k", "0"], "k: 0 is out of range"),
    (["identify", "--stats", "none.safetensors", "--out", "o", "--rho", "1.5"], "rho: 1.5 is out of range"),
    (["identify", "--stats", "none.safetensors", "--out", "o", "--lape-top-rate", "-0.1"],
     "lape_top_rate: -0.1 is out of range"),
    (["identify", "--method", "attribution", "--model", "none", "--data", "none.jsonl", "--out", "o",
      "--batch-size", "0"], "batch size must be a positive integer, got 0"),
    (["mask", "--neurons", "none.json", "--set", "SS", "--out", "o", "--op", "scale:x"],
     "--op scale:ALPHA needs a number, got 'x'"),
    (["mask", "--neurons", "none.json", "--set", "SS", "--out", "o", "--op", "flip"],
     "--op must be suppress, scale:ALPHA or patch_to:GROUP, not 'flip'"),
    (["make-data", "--data", "none.jsonl", "--out", "o", "--holdout", "1.5"], "holdout: 1.5 is out of range"),
    (["demo", "--seeds", "0,x", "--out", "o"], "--seeds: 'x' is not a non-negative integer"),
    (["serve", "--model", "none", "--max-batch", "0"], "max_batch: 0 is out of range"),
    (["serve", "--model", "none", "--prefix-cache-mb", "-1"], "prefix_cache_mb: -1.0 is out of range"),
    (["serve", "--model", "none", "--shutdown-grace", "inf"], "shutdown_grace: must be finite"),
    (["serve", "--model", "none", "--engine-cores", "0-99999"], "engine_cores"),
    (["serve", "--model", "none", "--engine-cores", "0-99999,0-99999"], "core 0 is named twice"),
    (["serve", "--model", "none", "--engine-cores", "0", "--no-engine-process"],
     "needs the engine in a process of its own"),
    (["profile", "--model", "none", "--data", "none.jsonl", "--out", "o", "--positions", "all"],
     "invalid choice: 'all'"),  # argparse's own errors are one line too
    (["serve", "--port", "80"], "the following arguments are required: --model"),
    (["serve", "--model", "none", "--small-batch-gemm", "fast"], "invalid choice: 'fast'"),
    (["serve", "--model", "none", "--layout", "paged"], "invalid choice: 'paged'"),
    (["serve", "--model", "none", "--max-prefill-tokens", "0"], "max_prefill_tokens: 0 is out of range"),
    (["serve", "--model", "none", "--prefill-steps", "0"], "prefill_steps: 0 is out of range"),
    (["serve", "--model", "none", "--prefill-steps", "2.5"], "prefill-steps"),
    (["serve", "--model", "none", "--step-tokens", "0"],
     "step_tokens must be auto, off or an integer in [16 (max_batch), 999999], got '0'"),
    (["serve", "--model", "none", "--max-batch", "8", "--step-tokens", "7"], "in [8 (max_batch), 999999], got 7"),
    (["serve", "--model", "none", "--step-tokens", "24.0"], "step_tokens must be auto, off or an integer"),
    (["serve", "--model", "none", "--step-tokens", "-3"], "step_tokens must be auto, off or an integer"),
    (["serve", "--model", "none", "--step-tokens", "1000000"], "step_tokens must be auto, off or an integer"),
    (["serve", "--model", "none", "--step-tokens", "٢٤"], "step_tokens must be auto, off or an integer"),
    (["serve", "--model", "none", "--request-timeout", "0"], "request_timeout: 0.0 is out of range"),
    (["serve", "--model", "none", "--port", "70000"], "port: 70000 is out of range"),
    (["serve", "--model", "none", "--profile", "nopath"], "--profile takes NAME=PATH"),
    (["serve", "--model", "none", "--profile", "a=x", "--profile", "a=y"], "profile 'a' given twice"),
    (["serve", "--model", "none", "--profile", "base=x"], "profile name 'base' is not allowed"),
]


@pytest.mark.parametrize("argv,message", BAD_OPTIONS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD_OPTIONS])
def test_bad_options_are_one_error_line_before_anything_loads(argv, message, capsys, monkeypatch, tmp_path):
    from ssn_runtime import data
    from ssn_runtime.cli import main
    from ssn_runtime.core import loading

    def never(*a, **k):
        raise AssertionError("read before the options were checked")

    monkeypatch.setattr(loading, "load_model", never)
    monkeypatch.setattr(data, "load_records", never)
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not list(tmp_path.iterdir())  # nothing written


def test_library_configs_take_no_namespace():
    """run_demo takes a DemoConfig (the library never sees an argparse Namespace)."""
    import inspect

    from ssn_runtime import demo

    assert inspect.signature(demo.run_demo).parameters["config"].annotation in ("DemoConfig", demo.DemoConfig)
