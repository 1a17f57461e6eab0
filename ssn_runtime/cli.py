"""The `ssn` command line: it parses, calls the library, and prints.

    ssn info [--model PATH] [--json]   backends, versions, and a model's neuron sites
    ssn demo                           the main job on the built-in model

A command's settings are the fields of a config dataclass in the module that does the work
(options.py turns them into options; the config checks them before anything is read); file
paths, devices and --quiet stay here. Bad input prints one `error:` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import SSNError


def cmd_info(args) -> int:
    from .core.backends import describe
    from .info import info_lines, model_sites, versions

    info = {"versions": versions(), "backends": describe()}
    if args.model:
        info["model"] = model_sites(args.model)
    print(json.dumps(info, indent=2, default=str) if args.json else "\n".join(info_lines(info)))
    return 0


def _csv(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def _note_harmless(added: list[str]) -> None:
    if added:
        print(f"note: --data holds only harmful prompts; adding the built-in harmless prompts "
              f"(ssn_runtime/resources/harmless_prompts.jsonl) for {', '.join(added)} "
              f"(--no-builtin-harmless to turn off)", file=sys.stderr)


def _load(args, device: str | None = None, dtype: str | None = None):
    """(model, tokenizer) of --model, on `device` (default: --device) in `dtype` (default: --dtype)."""
    from .core.loading import load_model, load_tokenizer

    return (load_model(args.model, dtype=dtype or args.dtype, device=device or args.device),
            load_tokenizer(args.model))


def _cuda_when_present(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def cmd_convert(args) -> int:
    from .core.convert import convert_gguf

    rec = convert_gguf(args.gguf, args.out, dtype=args.dtype, overwrite=args.overwrite, progress=not args.quiet)
    types = ", ".join(f"{k} x{v}" for k, v in rec["tensor_types"].items())
    print(f"wrote {args.out}: {rec['model_type']} ({rec['tensors']} tensors: {types}) as {rec['dtype']}, "
          f"max |logit diff| {rec['check']['max_abs_logit_diff']:g} vs the GGUF model, {rec['seconds']} s")
    for name, (old, new) in rec["special_tokens_fixed"].items():
        print(f"  {name}: {old!r} -> {new!r} (as the GGUF metadata says)")
    return 0


def cmd_profile(args) -> int:
    import os

    import torch

    from .data import select_records
    from .options import from_args
    from .science.profiler import ProfileConfig, init_distributed, profile

    config = from_args(ProfileConfig, args)
    records, added = select_records(args.data, _csv(args.languages), args.limit, config.group_by,
                                    "label" in config.group_by and not args.no_builtin_harmless)
    _note_harmless(added)
    model, tokenizer = _load(args, device=_cuda_when_present(init_distributed(args.device)))
    try:
        stats = profile(model, tokenizer, records, config, out=args.out, progress=not args.quiet)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {args.out}: {stats.num_layers} layers x {stats.num_neurons} neurons, "
              f"{len(stats.groups)} groups, {stats.tokens_seen} tokens ({config.positions})")
        for i, g in enumerate(stats.groups):
            print(f"  {g:<24} {int(stats.count[0, i]):>10} tokens")
    return 0


def cmd_identify(args) -> int:
    from .options import from_args
    from .science.identify import AttributionConfig, IdentifyConfig, identify, summary_lines
    from .science.stats import NeuronStats

    cfg = from_args(IdentifyConfig, args)
    attribution_cfg = from_args(AttributionConfig, args)
    if cfg.method == "attribution" and not (args.model and args.data):
        raise SSNError("--method attribution needs --model and --data (harmful prompts with a language field)")
    if cfg.method != "attribution" and not args.stats:
        how = "ssn profile --gate-stats" if cfg.method == "lape" else "ssn profile --group-by language,label"
        raise SSNError(f"--method {cfg.method} needs --stats (from {how})")
    stats = NeuronStats.load(args.stats) if args.stats else None
    attribution, info = None, None
    if cfg.method == "attribution":
        from .core.fingerprint import model_fingerprint
        from .data import load_many
        from .science.evaluate import model_judge
        from .science.identify import attribution_prompts

        records = load_many(args.data)
        judge = model_judge(args.model, args.lexicon)
        refusals = judge.canonical  # built-in + the model's + --lexicon texts
        model, tok = _load(args, device=_cuda_when_present(args.device), dtype="float32")
        attribution, counts = attribution_prompts(model, tok, records, refusals, attribution_cfg, cfg.harmful,
                                                  progress=not args.quiet, judge=judge)
        info = model_fingerprint(model)
        print("attribution prompts per language: " + ", ".join(f"{lang} {n}" for lang, n in counts.items()))
    sets = identify(stats, cfg, attribution, info)
    sets.save(args.out)
    warnings, lines = summary_lines(sets, args.out)
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    print("\n".join(lines))
    return 0


def cmd_analyze(args) -> int:
    from .science.analysis import analyze_files

    for line in analyze_files(args.neurons, args.stats, args.out, args.harmful, args.harmless):
        print(line)
    return 0


def cmd_mask(args) -> int:
    from .options import from_args
    from .science.masks import MaskConfig
    from .science.neuron_sets import NeuronSetFile

    mask = from_args(MaskConfig, args).build(NeuronSetFile.load(args.neurons), args.stats)
    mask.save(args.out)
    print(f"wrote {args.out}: {mask}")
    return 0


def _eval_records(args, config=None):
    """The prompts of `ssn eval` / `ssn validate`, read and checked before any model loads."""
    from .data import select_records
    from .options import from_args
    from .science.evaluate import EvalConfig

    if not args.data:
        raise SSNError(f"ssn {args.command}: --data is required (prompts: MultiJail CSV, JSONL or CSV)")
    config = config or from_args(EvalConfig, args)
    # Harmless prompts under the same masks show over-refusal and lost helpfulness: a mask
    # that removes refusal by breaking the model shows there too (as in ssn profile).
    records, added = select_records(args.data, config.languages, config.limit, ["language", "label"],
                                    config.builtin_harmless)
    _note_harmless(added)
    return records


def _print_report(report: dict, out, effects: bool = False) -> None:
    from .science.evaluate import report_lines

    print("\n".join(report_lines(report, effects)))
    print(f"wrote {out}/")


def cmd_eval(args) -> int:
    from .options import from_args
    from .science.evaluate import EvalConfig, model_judge, named_conditions
    from .science.masks import NeuronMask
    from .science.validate import evaluate_masks

    config = from_args(EvalConfig, args)
    # Bad files and settings fail before the model loads.
    masks = [(spec, NeuronMask.load(spec)) for spec in args.mask or []]
    named_conditions(masks)
    records = _eval_records(args, config) if args.data else None
    ppl, mc = config.ability_data()
    judge = model_judge(args.model, args.lexicon, config.judge, config.judge_label)
    model, tok = _load(args)
    report = evaluate_masks(model, tok, records, masks, judge, config, args.out, ppl, mc, progress=not args.quiet)
    _print_report(report, args.out)
    return 0


def cmd_validate(args) -> int:
    from .options import from_args
    from .science.evaluate import model_judge
    from .science.validate import ValidateConfig, validate_set

    config = from_args(ValidateConfig, args)
    records = _eval_records(args, config)  # bad files fail before the model loads
    ppl, mc = config.ability_data()
    judge = model_judge(args.model, args.lexicon, config.judge, config.judge_label)
    model, tok = _load(args)
    report = validate_set(model, tok, records, args.neurons, judge, config, args.out, ppl, mc,
                          progress=not args.quiet)
    _print_report(report, args.out, effects=True)
    return 0


def cmd_train(args) -> int:
    from .core.attention_neurons import load_channels
    from .data import load_many
    from .options import from_args
    from .science.neuron_sets import NeuronSetFile
    from .training.train import TrainConfig, train

    cfg = from_args(TrainConfig, args)
    attention = load_channels(args.attention_neurons) if args.attention_neurons else None  # before the model
    records, retain, evals = load_many(args.data), load_many(args.retain), load_many(args.eval_data)
    model, tok = _load(args)
    neurons = NeuronSetFile.load(args.neurons, model=model)[args.set]
    res = train(model, tok, neurons, records, cfg, args.out, retain=retain, eval_records=evals,
                progress=not args.quiet, attention=attention)
    last = res["log"][-1] if res["log"] else {}
    print(f"wrote {args.out}: {len(neurons)} neurons, {res['trainable_params']} trainable parameters, "
          f"final loss {last.get('loss', float('nan')):.4f}")
    return 0


def cmd_merge(args) -> int:
    from .training.patches import merge_checkpoint

    patch = merge_checkpoint(args.model, args.patch, args.out, args.unmerge, args.dtype)
    print(f"wrote {args.out}: {'base (patch removed, bit-exact)' if args.unmerge else 'merged'} checkpoint "
          f"({len(patch.neurons())} neurons changed)")
    return 0


def cmd_make_data(args) -> int:
    from .options import from_args
    from .training.train import MakeDataConfig, make_refusal_data

    n_train, n_held = make_refusal_data(args.data, from_args(MakeDataConfig, args), args.out, args.holdout_out,
                                        args.lexicon)
    print(f"wrote {n_train} prompt/refusal pairs to {args.out}"
          + (f" and {n_held} held out to {args.holdout_out}" if args.holdout_out else ""))
    return 0


def _add_eval_args(p) -> None:
    """The inputs and outputs `ssn eval` and `ssn validate` share; their settings come from EvalConfig."""
    p.add_argument("--model", required=True, help="local checkpoint folder")
    p.add_argument("--data", action="append", help="prompts: MultiJail CSV, JSONL or CSV (repeatable)")
    p.add_argument("--lexicon", action="append", help="extra refusal lexicon JSON (repeatable)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--quiet", action="store_true")


def cmd_serve(args) -> int:
    from .options import from_args
    from .serve import ServeConfig, run

    run(args.model, args.profile or [], from_args(ServeConfig, args), args.dtype, args.device)
    return 0


def cmd_organism(args) -> int:
    from .organism import default_path, ensure

    if args.action == "path":
        print(args.out or default_path(args.seed, args.small))
        return 0
    path = ensure(seed=args.seed, small=args.small, rebuild=True, path=args.out)
    print(f"built {path}")
    return 0


def cmd_demo(args) -> int:
    from .demo import DemoConfig, run_demo
    from .options import from_args

    return run_demo(from_args(DemoConfig, args))


def build_parser() -> argparse.ArgumentParser:
    from .demo import DemoConfig
    from .options import add_options
    from .science.evaluate import EvalConfig
    from .science.identify import AttributionConfig, IdentifyConfig
    from .science.masks import MaskConfig
    from .science.profiler import ProfileConfig
    from .science.validate import ValidateConfig
    from .serve.config import ServeConfig
    from .training.train import MakeDataConfig, TrainConfig

    parser = argparse.ArgumentParser(prog="ssn", description="ssn-runtime: neuron-level safety work on HF causal LMs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="backends, versions, and a model's neuron sites")
    p.add_argument("--model", help="a local checkpoint folder: list its neuron sites (no weights are loaded)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="convert a GGUF model file into a safetensors checkpoint folder",
                       description="Dequantize a GGUF file (llama.cpp format) into a standard checkpoint folder "
                       "(config, safetensors weights, tokenizer, chat template), checked to give the GGUF "
                       "model's logits exactly. Needs: pip install 'ssn-runtime[gguf]'. --model accepts a .gguf "
                       "path directly too (converted once into the cache).")
    p.add_argument("gguf", help="the .gguf file")
    p.add_argument("out", help="checkpoint folder to write")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (default float32: the dequantized values exactly)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("profile", help="per-neuron activation statistics over prompt sets, per group",
                       description="Profile every MLP neuron over prompt files; statistics are computed inside "
                       "the fused kernels. Resumable (re-run the same command after an interruption) and "
                       "distributable (torchrun --nproc-per-node N -m ssn_runtime profile ...).")
    p.add_argument("--model", required=True, help="local checkpoint folder")
    p.add_argument("--data", required=True, action="append", help="JSONL/JSON/CSV or MultiJail CSV (repeatable)")
    p.add_argument("--out", required=True, help="output stats file (.safetensors)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when present)")
    add_options(p, ProfileConfig)
    p.add_argument("--languages", help="keep only these languages (comma-separated)")
    p.add_argument("--limit", type=int, help="at most N records per group")
    p.add_argument("--no-builtin-harmless", action="store_true",
                   help="with --group-by ...label and only harmful prompts in --data, do not add the built-in "
                   "harmless prompts (70 per MultiJail language, ssn_runtime/resources/harmless_prompts.jsonl)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("identify", help="MS-Neurons per language and SS-Neurons from profiling stats")
    p.add_argument("--stats", help="stats from ssn profile --group-by language,label (all methods but attribution)")
    p.add_argument("--model", help="checkpoint folder, for --method attribution")
    p.add_argument("--data", action="append", help="harmful prompts with a language field, for attribution")
    p.add_argument("--device", help="attribution: cpu, cuda, cuda:1 (default: cuda when present)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--lexicon", action="append", help="lexicon JSON whose 'canonical' gives refusal texts")
    p.add_argument("--out", required=True, help="neuron set file (.json)")
    add_options(p, IdentifyConfig)
    add_options(p, AttributionConfig)
    p.set_defaults(func=cmd_identify)

    p = sub.add_parser("analyze", help="overlap, per-layer counts and plots of a neuron set file; MoE router "
                       "statistics (language x expert heatmaps) of a stats file")
    p.add_argument("--neurons", help="neuron set file (ssn identify)")
    p.add_argument("--stats", help="stats of a mixture-of-experts model (ssn profile --group-by language,label): "
                   "router heatmaps and the experts whose selection separates harmful from harmless")
    p.add_argument("--harmful", default="harmful", help="with --stats: label of harmful prompts")
    p.add_argument("--harmless", default="harmless", help="with --stats: label of harmless prompts")
    p.add_argument("--out", required=True, help="report folder")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("mask", help="build a neuron mask from a neuron set")
    p.add_argument("--neurons", required=True)
    add_options(p, MaskConfig)
    p.add_argument("--stats", help="stats file, for patch_to")
    p.add_argument("--out", required=True, help="mask folder")
    p.set_defaults(func=cmd_mask)

    p = sub.add_parser("eval", help="refusal per language (and perplexity, multiple choice), with masks")
    _add_eval_args(p)
    add_options(p, EvalConfig)
    p.add_argument("--mask", action="append", help="mask folder to evaluate beside the base model (repeatable)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("validate", help="suppress / reinforce a neuron set beside a random control")
    _add_eval_args(p)
    add_options(p, ValidateConfig)
    p.add_argument("--neurons", required=True)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("train", help="fine-tune only chosen neurons; writes a neuron patch")
    p.add_argument("--model", required=True)
    p.add_argument("--neurons", required=True, help="neuron set file (ssn identify)")
    p.add_argument("--set", default="SS", help="set name in the file (default SS)")
    p.add_argument("--data", required=True, action="append", help="JSONL prompt/response or messages (repeatable)")
    p.add_argument("--retain", action="append", help="retention (benign) data mixed in (repeatable)")
    p.add_argument("--eval-data", action="append", help="held-out examples for eval loss")
    p.add_argument("--out", required=True, help="patch folder")
    p.add_argument("--attention-neurons", help="JSON {layer: [o_proj input channel, ...]}: also train these "
                   "attention neurons (o_proj columns, v_proj rows via the grouped-query mapping)")
    add_options(p, TrainConfig)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("merge", help="merge a neuron patch into a full checkpoint (or remove it: --unmerge)")
    p.add_argument("--model", required=True)
    p.add_argument("--patch", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--unmerge", action="store_true", help="subtract the patch from a merged checkpoint")
    p.add_argument("--dtype", default="auto")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("make-data", help="pair prompts (e.g. MultiJail) with refusals in their language")
    p.add_argument("--data", required=True, action="append")
    p.add_argument("--lexicon", action="append", help="extra lexicon JSON with 'canonical' refusals")
    p.add_argument("--holdout-out", help="where the held-out pairs go")
    p.add_argument("--out", required=True)
    add_options(p, MakeDataConfig)
    p.set_defaults(func=cmd_make_data)

    p = sub.add_parser("demo", help="the whole safety-neuron workflow on the built-in organism")
    add_options(p, DemoConfig)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="OpenAI-compatible server for the model, its masks and patches")
    p.add_argument("--model", required=True)
    p.add_argument("--profile", action="append", help="NAME=PATH of a mask or patch folder, or NAME=MASK,PATCH for "
                   "both (composed per row); repeatable; every profile shares the one copy of the weights")
    add_options(p, ServeConfig)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("organism", help="build or locate the built-in model organism")
    p.add_argument("action", choices=["build", "path"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--small", action="store_true")
    p.add_argument("--out", help="checkpoint folder (default: the user cache)")
    p.set_defaults(func=cmd_organism)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own progress bars say what is happening
    except ImportError:
        pass
    try:
        return args.func(args)
    except SSNError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
