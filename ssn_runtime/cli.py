"""The `ssn` command line: it parses, calls the library, and prints.

    ssn info [--model PATH] [--json]   backends, versions, and a model's neuron sites
    ssn demo                           the main job on the built-in model

A command's settings are the fields of a config dataclass in the module that does the work
(options.py turns them into options; the config checks them before anything is read). The
inputs and outputs every command shares (--model, --data, --out, --dtype, --device, ...) are
declared once in FLAGS. Bad input prints one `error:` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import SSNError

# The shared inputs and outputs, one definition each: name -> (argparse keywords).
FLAGS = {
    "model": {"help": "local checkpoint folder (a .gguf file is converted once into the cache)"},
    "data": {"action": "append", "help": "prompts: JSONL, JSON, CSV or MultiJail CSV (repeatable)"},
    "lexicon": {"action": "append", "help": "extra refusal lexicon JSON; its 'canonical' gives the refusal texts "
                "(repeatable)"},
    "neurons": {"help": "neuron set file (ssn identify)"},
    "stats": {"help": "statistics file (ssn profile)"},
    "out": {"help": "output path"},
    "dtype": {"default": "auto", "help": "auto (the checkpoint's), float32, bfloat16, float16"},
    "device": {"help": "cpu, cuda, cuda:1 (default: cpu)"},
    "quiet": {"action": "store_true", "help": "no progress bars"},
}


def _flags(p, *names: str, **helps: str) -> None:
    """Add the shared FLAGS named; a trailing '!' makes one required; `helps` replaces help texts."""
    for name in names:
        key = name.rstrip("!")
        kw = {**FLAGS[key], "required": name.endswith("!")}
        kw["help"] = helps.get(key, kw["help"])
        p.add_argument("--" + key, **kw)


def _load(args, device: str | None = None, dtype: str | None = None):
    """(model, tokenizer) of --model, on `device` (default: --device) in `dtype` (default: --dtype)."""
    from .core.loading import load_model, load_tokenizer

    return (load_model(args.model, dtype=dtype or args.dtype, device=device or args.device),
            load_tokenizer(args.model))


def _note_harmless(added: list[str]) -> None:
    if added:
        print(f"note: --data holds only harmful prompts; adding the built-in harmless prompts "
              f"(ssn_runtime/resources/harmless_prompts.jsonl) for {', '.join(added)} "
              f"(--no-builtin-harmless to turn off)", file=sys.stderr)


def cmd_info(args) -> int:
    from .core.backends import describe
    from .info import info_lines, model_sites, versions

    info = {"versions": versions(), "backends": describe()}
    if args.model:
        info["model"] = model_sites(args.model)
    print(json.dumps(info, indent=2, default=str) if args.json else "\n".join(info_lines(info)))
    return 0


def cmd_convert(args) -> int:
    from .core.convert import convert_gguf, summary_lines

    rec = convert_gguf(args.gguf, args.out, dtype=args.dtype, overwrite=args.overwrite, progress=not args.quiet)
    print("\n".join(summary_lines(rec, args.out)))
    return 0


def cmd_profile(args, config) -> int:
    from .data import select_records
    from .science.profiler import distributed, is_main_rank, profile, summary_lines

    languages = [v.strip() for v in args.languages.split(",") if v.strip()] if args.languages else []
    records, added = select_records(args.data, languages, args.limit, config.group_by,
                                    "label" in config.group_by and not args.no_builtin_harmless)
    _note_harmless(added)
    with distributed(args.device) as device:
        model, tokenizer = _load(args, device=device)
        stats = profile(model, tokenizer, records, config, out=args.out, progress=not args.quiet)
    if is_main_rank():
        print("\n".join(summary_lines(stats, args.out, config.positions)))
    return 0


def cmd_identify(args, config, attribution_config) -> int:
    from .science import identify as ident
    from .science.stats import NeuronStats

    ident.check_inputs(config, bool(args.stats), bool(args.model and args.data))
    stats = NeuronStats.load(args.stats) if args.stats else None
    attribution, fingerprint = None, None
    if config.method == "attribution":
        attribution, fingerprint, counts = ident.attribution_from_checkpoint(
            args.model, args.data, args.lexicon, attribution_config, config.harmful, args.device, not args.quiet)
        print("attribution prompts per language: " + ", ".join(f"{lang} {n}" for lang, n in counts.items()))
    sets = ident.identify(stats, config, attribution, fingerprint)
    sets.save(args.out)
    warnings, lines = ident.summary_lines(sets, args.out)
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    print("\n".join(lines))
    return 0


def cmd_analyze(args) -> int:
    from .science.analysis import analyze_files

    for line in analyze_files(args.neurons, args.stats, args.out, args.harmful, args.harmless):
        print(line)
    return 0


def cmd_mask(args, config) -> int:
    from .science.neuron_sets import NeuronSetFile

    mask = config.build(NeuronSetFile.load(args.neurons), args.stats)
    mask.save(args.out)
    print(f"wrote {args.out}: {mask}")
    return 0


def cmd_eval(args, config) -> int:
    """`ssn eval` (masks beside the base) and `ssn validate` (a set suppressed and reinforced
    beside a random control): every file and setting is read and checked before the model loads."""
    from .science import evaluate, validate
    from .science.masks import NeuronMask

    masks = [(spec, NeuronMask.load(spec)) for spec in getattr(args, "mask", None) or []]
    evaluate.named_conditions(masks)
    records = None
    if args.data or args.command == "validate":
        records, added = config.prompts(args.data, f"ssn {args.command}")
        _note_harmless(added)
    ppl, mc = config.ability_data()
    judge = evaluate.model_judge(args.model, args.lexicon, config.judge, config.judge_label)
    model, tok = _load(args)
    if args.command == "validate":
        report = validate.validate_set(model, tok, records, args.neurons, judge, config, args.out, ppl, mc,
                                       progress=not args.quiet)
    else:
        report = validate.evaluate_masks(model, tok, records, masks, judge, config, args.out, ppl, mc,
                                         progress=not args.quiet)
    print("\n".join(evaluate.report_lines(report, effects=args.command == "validate")))
    print(f"wrote {args.out}/")
    return 0


def cmd_train(args, config) -> int:
    from .core.attention_neurons import load_channels
    from .data import load_many
    from .science.neuron_sets import NeuronSetFile
    from .training.train import train

    attention = load_channels(args.attention_neurons) if args.attention_neurons else None  # before the model
    records, retain, evals = load_many(args.data), load_many(args.retain), load_many(args.eval_data)
    model, tok = _load(args)
    neurons = NeuronSetFile.load(args.neurons, model=model)[args.set]
    res = train(model, tok, neurons, records, config, args.out, retain=retain, eval_records=evals,
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


def cmd_make_data(args, config) -> int:
    from .training.train import make_refusal_data

    n_train, n_held = make_refusal_data(args.data, config, args.out, args.holdout_out, args.lexicon)
    print(f"wrote {n_train} prompt/refusal pairs to {args.out}"
          + (f" and {n_held} held out to {args.holdout_out}" if args.holdout_out else ""))
    return 0


def cmd_serve(args, config) -> int:
    from .serve import run

    run(args.model, args.profile or [], config, args.dtype, args.device)
    return 0


def cmd_organism(args) -> int:
    from .organism import default_path, ensure

    if args.action == "path":
        print(args.out or default_path(args.seed, args.small))
    else:
        print(f"built {ensure(seed=args.seed, small=args.small, rebuild=True, path=args.out)}")
    return 0


def cmd_demo(args, config) -> int:
    from .demo import run_demo

    return run_demo(config)


class _Parser(argparse.ArgumentParser):
    """argparse's errors (a bad choice, a missing value) as one `error:` line and exit status 2,
    like every other bad input, instead of a usage block."""

    def error(self, message):
        raise SSNError(f"{self.prog}: {message} (see {self.prog} --help)")


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

    parser = _Parser(prog="ssn", description="ssn-runtime: neuron-level safety work on HF causal LMs")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, func, help, *configs, description=None):
        """A subcommand whose settings are `configs` (built and checked before `func` runs)."""
        p = sub.add_parser(name, help=help, description=description)
        p.set_defaults(func=func, configs=configs)  # their options follow the inputs and outputs (below)
        return p

    p = command("info", cmd_info, "backends, versions, and a model's neuron sites")
    _flags(p, "model", model="a local checkpoint folder: list its neuron sites (no weights are loaded)")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command("convert", cmd_convert, "convert a GGUF model file into a safetensors checkpoint folder",
                description="Dequantize a GGUF file (llama.cpp format) into a standard checkpoint folder "
                "(config, safetensors weights, tokenizer, chat template), checked to give the GGUF model's logits "
                "exactly. Needs: pip install 'ssn-runtime[gguf]'. --model accepts a .gguf path directly too "
                "(converted once into the cache).")
    p.add_argument("gguf", help="the .gguf file")
    p.add_argument("out", help="checkpoint folder to write")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (default float32: the dequantized values exactly)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT folder")
    _flags(p, "quiet")

    p = command("profile", cmd_profile, "per-neuron activation statistics over prompt sets, per group", ProfileConfig,
                description="Profile every MLP neuron over prompt files; statistics are computed inside the fused "
                "kernels. Resumable (re-run the same command after an interruption) and distributable "
                "(torchrun --nproc-per-node N -m ssn_runtime profile ...).")
    _flags(p, "model!", "data!", "out!", "dtype", "device", "quiet", out="output stats file (.safetensors)",
           device="cpu, cuda, cuda:1 (default: cuda when present)")
    p.add_argument("--languages", help="keep only these languages (comma-separated)")
    p.add_argument("--limit", type=int, help="at most N records per group")
    p.add_argument("--no-builtin-harmless", action="store_true",
                   help="with --group-by ...label and only harmful prompts in --data, do not add the built-in "
                   "harmless prompts (70 per MultiJail language, ssn_runtime/resources/harmless_prompts.jsonl)")

    p = command("identify", cmd_identify, "MS-Neurons per language and SS-Neurons from profiling stats",
                IdentifyConfig, AttributionConfig)
    _flags(p, "stats", "model", "data", "device", "quiet", "lexicon", "out!", out="neuron set file (.json)",
           stats="stats from ssn profile --group-by language,label (all methods but attribution)",
           model="checkpoint folder, for --method attribution", device="attribution: cpu, cuda, cuda:1 (default: "
           "cuda when present)", data="harmful prompts with a language field, for attribution (repeatable)")

    p = command("analyze", cmd_analyze, "overlap, per-layer counts and plots of a neuron set file; MoE router "
                "statistics (language x expert heatmaps) of a stats file")
    _flags(p, "neurons", "stats", "out!", out="report folder", stats="stats of a mixture-of-experts model (ssn "
           "profile --group-by language,label): router heatmaps and the experts whose selection separates harmful "
           "from harmless")
    p.add_argument("--harmful", default="harmful", help="with --stats: label of harmful prompts")
    p.add_argument("--harmless", default="harmless", help="with --stats: label of harmless prompts")

    p = command("mask", cmd_mask, "build a neuron mask from a neuron set", MaskConfig)
    _flags(p, "neurons!", "stats", "out!", stats="stats file, for patch_to", out="mask folder")

    for name, cls, help in (("eval", EvalConfig, "refusal per language (and perplexity, multiple choice), with masks"),
                            ("validate", ValidateConfig, "suppress / reinforce a neuron set beside a random control")):
        p = command(name, cmd_eval, help, cls)
        _flags(p, "model!", "data", "lexicon", "dtype", "device", "quiet", "out!", out="report folder")
    _flags(sub.choices["validate"], "neurons!")
    sub.choices["eval"].add_argument("--mask", action="append",
                                     help="mask folder to evaluate beside the base model (repeatable)")

    p = command("train", cmd_train, "fine-tune only chosen neurons; writes a neuron patch", TrainConfig)
    _flags(p, "model!", "neurons!", "data!", "out!", "dtype", "device", "quiet", out="patch folder",
           data="JSONL prompt/response or messages (repeatable)")
    p.add_argument("--set", default="SS", help="set name in the file (default SS)")
    p.add_argument("--retain", action="append", help="retention (benign) data mixed in (repeatable)")
    p.add_argument("--eval-data", action="append", help="held-out examples for eval loss")
    p.add_argument("--attention-neurons", help="JSON {layer: [o_proj input channel, ...]}: also train these "
                   "attention neurons (o_proj columns, v_proj rows via the grouped-query mapping)")

    p = command("merge", cmd_merge, "merge a neuron patch into a full checkpoint (or remove it: --unmerge)")
    _flags(p, "model!", "out!", "dtype", out="checkpoint folder to write")
    p.add_argument("--patch", required=True, help="patch folder (ssn train)")
    p.add_argument("--unmerge", action="store_true", help="subtract the patch from a merged checkpoint")

    p = command("make-data", cmd_make_data, "pair prompts (e.g. MultiJail) with refusals in their language",
                MakeDataConfig)
    _flags(p, "data!", "lexicon", "out!", out="JSONL of prompt/refusal pairs")
    p.add_argument("--holdout-out", help="where the held-out pairs go")

    command("demo", cmd_demo, "the whole safety-neuron workflow on the built-in organism", DemoConfig)

    p = command("serve", cmd_serve, "OpenAI-compatible server for the model, its masks and patches", ServeConfig)
    _flags(p, "model!", "dtype", "device")
    p.add_argument("--profile", action="append", help="NAME=PATH of a mask or patch folder, or NAME=MASK,PATCH for "
                   "both (composed per row); repeatable; every profile shares the one copy of the weights")

    p = command("organism", cmd_organism, "build or locate the built-in model organism")
    p.add_argument("action", choices=["build", "path"], help="build: train it (again) and save it; path: print "
                   "where it is kept")
    p.add_argument("--seed", type=int, default=0, help="the organism's seed (default: 0, the demo's first)")
    p.add_argument("--small", action="store_true", help="the seconds-to-build variant the tests use")
    p.add_argument("--out", help="checkpoint folder (default: the user cache)")
    for p in sub.choices.values():
        for cls in p.get_default("configs"):
            add_options(p, cls)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .options import from_args

    try:
        args = build_parser().parse_args(argv)
    except SSNError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own progress bars say what is happening
    except ImportError:
        pass
    try:
        configs = [from_args(cls, args) for cls in args.configs]  # checked before any file or model is read
        return args.func(args, *configs)
    except SSNError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
