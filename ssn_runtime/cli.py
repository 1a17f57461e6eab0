"""The `ssn` command line.

    ssn info [--model PATH] [--json]   backends, versions, and a model's neuron sites
    ssn demo                           the main job on the built-in model

Bad input prints one `error:` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import SSNError


def _versions() -> dict:
    import torch
    import transformers

    out = {"ssn_runtime": __import__("ssn_runtime").__version__, "torch": torch.__version__,
           "transformers": transformers.__version__, "python": sys.version.split()[0]}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def _model_sites(path: str) -> dict:
    """Neuron sites of a checkpoint, built on the meta device: no weights are read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .adapters import find_sites
    from .loading import check_checkpoint

    check_checkpoint(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    sites = find_sites(model)
    return {
        "path": path, "class": type(model).__name__, "model_type": config.model_type,
        "layers": len(sites), "neurons_per_layer": sorted({s.num_neurons for s in sites}),
        "total_neurons": sum(s.num_neurons for s in sites), "hidden_size": sites[0].hidden_size if sites else None,
        "mlp_kind": sites[0].style.kind if sites else None, "activation": sites[0].act if sites else None,
        "first_site": sites[0].name if sites else None,
    }


def cmd_info(args) -> int:
    from .backends import describe

    info = {"versions": _versions(), "backends": describe()}
    if args.model:
        info["model"] = _model_sites(args.model)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    v = info["versions"]
    print("ssn-runtime " + v["ssn_runtime"] + "  (" + ", ".join(f"{k} {v[k]}" for k in v if k != "ssn_runtime") + ")")
    b = info["backends"]
    forced = f" (forced: SSN_BACKEND={b['forced']})" if b["forced"] else ""
    print(f"backends{forced}:")
    for name in ("triton", "cpp", "torch"):
        mark = "yes" if b[name]["available"] else "no "
        print(f"  {name:<7} {mark}  {b[name]['detail']}")
    print(f"  cuda    {'yes' if b['cuda']['available'] else 'no '}  {b['cuda']['device'] or 'no CUDA device'}")
    print("active backend per tensor kind:")
    for kind, (backend, why) in b["active"].items():
        print(f"  {kind:<14} -> {backend:<7} {why}")
    if "model" in info:
        m = info["model"]
        print(f"model {m['path']}: {m['class']} ({m['model_type']}), {m['layers']} layers x "
              f"{'/'.join(map(str, m['neurons_per_layer']))} neurons = {m['total_neurons']}, "
              f"{m['mlp_kind']} MLP, activation {m['activation'] or 'model-defined (torch backend)'}")
    return 0


def _csv_list(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def _init_distributed(device: str | None) -> str | None:
    """torchrun sets WORLD_SIZE/RANK: join the group (gloo on CPU, nccl on CUDA); returns the device."""
    import os

    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if cuda:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        device = "cpu"
    torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    return device


def cmd_profile(args) -> int:
    import torch

    from .data import filter_records, load_records
    from .loading import load_model, load_tokenizer
    from .profiler import ProfileConfig, profile

    group_by = _csv_list(args.group_by)
    config = ProfileConfig(
        group_by=group_by, positions=args.positions, threshold=args.threshold, gate_stats=args.gate_stats,
        topk=args.topk, max_tokens_per_batch=args.max_tokens_per_batch, max_batch_size=args.max_batch_size,
        max_new_tokens=args.max_new_tokens, chat_template=not args.no_chat_template, max_length=args.max_length,
        checkpoint_every=args.checkpoint_every,
    )
    records = [r for path in args.data for r in load_records(path)]
    where = {"language": _csv_list(args.languages)} if args.languages else None
    records = filter_records(records, where, args.limit, group_by)
    if not records:
        raise SSNError("no records left after --languages/--limit")
    device = _init_distributed(args.device)
    model = load_model(args.model, dtype=args.dtype, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = load_tokenizer(args.model)
    try:
        stats = profile(model, tokenizer, records, config, out=args.out, progress=not args.quiet)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        print(f"wrote {args.out}: {stats.num_layers} layers x {stats.num_neurons} neurons, "
              f"{len(stats.groups)} groups, {stats.tokens_seen} tokens ({config.positions})")
        for i, g in enumerate(stats.groups):
            print(f"  {g:<24} {int(stats.count[0, i]):>10} tokens")
    return 0


def cmd_identify(args) -> int:
    from .identify import IdentifyConfig, identify
    from .stats import NeuronStats

    if args.method == "attribution" and not (args.model and args.data):
        raise SSNError("--method attribution needs --model and --data (harmful prompts with a language field)")
    if args.method != "attribution" and not args.stats:
        raise SSNError(f"--method {args.method} needs --stats (from ssn profile)")
    stats = NeuronStats.load(args.stats) if args.stats else None
    cfg = IdentifyConfig(method=args.method, harmful=args.harmful, harmless=args.harmless, k=args.k,
                         fraction=None if args.k is not None else args.fraction, per_layer=args.per_layer,
                         threshold=args.threshold, sign=args.sign, rho=args.rho,
                         hr=_csv_list(args.hr), nhr=_csv_list(args.nhr), hr_combine=args.hr_combine,
                         joint=args.joint)
    attribution, info = None, None
    if args.method == "attribution":
        attribution, info = _attribution_scores(args)
    sets = identify(stats, cfg, attribution, info)
    sets.save(args.out)
    print(f"wrote {args.out}:")
    for name, ns in sets.sets.items():
        print(f"  {name:<10} {len(ns):>7} neurons")
    return 0


def _attribution_scores(args):
    """Per language: activation x gradient of the refusal's log-probability on its harmful prompts."""
    from .data import load_records
    from .fingerprint import model_fingerprint
    from .loading import load_model, load_tokenizer
    from .scorers import attribution_scores

    model = load_model(args.model, dtype="float32")
    tok = load_tokenizer(args.model)
    refusals = _judge(args, args.model).canonical  # built-in + the model's + --lexicon "canonical" texts
    records = [r for path in args.data for r in load_records(path) if r.fields.get("label", "harmful") == args.harmful]
    by_lang: dict[str, list] = {}
    for r in records:
        by_lang.setdefault(r.fields.get("language"), []).append(r)
    scores = {}
    for lang, rs in sorted(by_lang.items(), key=lambda kv: str(kv[0])):
        if lang not in refusals:
            raise SSNError(f"no refusal text for language {lang!r}: add it to a --lexicon 'canonical' entry")
        scores[lang] = attribution_scores(model, tok, [(r, refusals[lang]) for r in rs[: args.attribution_prompts]],
                                          chat_template=not args.no_chat_template)
        print(f"  attribution for {lang}: {min(len(rs), args.attribution_prompts)} prompts")
    return scores, model_fingerprint(model)


def cmd_analyze(args) -> int:
    from .analysis import analyze
    from .neuron_sets import NeuronSetFile

    res = analyze(NeuronSetFile.load(args.neurons), args.out)
    print(f"wrote {args.out}/ (summary.md, overlap.png, per_layer.png, CSV/JSON)")
    for n, v in res["sizes"].items():
        print(f"  {n:<10} {v:>7} neurons ({100 * res['share_of_neurons'][n]:.3f}%)")
    return 0


def cmd_mask(args) -> int:
    from .masks import NeuronMask
    from .neuron_sets import NeuronSetFile
    from .stats import NeuronStats

    sets = NeuronSetFile.load(args.neurons)
    neurons = sets[args.set]
    op, _, value = args.op.partition(":")
    if op == "suppress":
        mask = NeuronMask.suppress(neurons, sets.model, name=f"{args.set}:suppress")
    elif op == "scale":
        try:
            alpha = float(value)
        except ValueError:
            raise SSNError(f"--op scale:ALPHA needs a number, got {value!r}") from None
        mask = NeuronMask.scale(neurons, sets.model, alpha, name=f"{args.set}:scale{alpha:g}")
    elif op == "patch_to":
        if not args.stats or not value:
            raise SSNError("--op patch_to:GROUP needs --stats and a group name")
        mask = NeuronMask.patch_to(neurons, sets.model, NeuronStats.load(args.stats), value)
    else:
        raise SSNError(f"--op must be suppress, scale:ALPHA or patch_to:GROUP, not {args.op!r}")
    mask.save(args.out)
    print(f"wrote {args.out}: {mask}")
    return 0


def _eval_records(args):
    from .data import filter_records, load_records

    records = [r for path in args.data for r in load_records(path)]
    where = {"language": _csv_list(args.languages)} if args.languages else None
    records = filter_records(records, where, args.limit, ["language", "label"])
    if not records:
        raise SSNError("no records left after --languages/--limit")
    return records


def _judge(args, model_path):
    from pathlib import Path

    from .judges import make_judge

    lexicons = list(args.lexicon or [])
    own = Path(model_path) / "refusal_lexicon.json"
    if own.is_file():
        lexicons.append(own)  # a model may ship the refusal phrases of its own languages
    return make_judge(getattr(args, "judge", "lexicon"), lexicons, getattr(args, "judge_label", "refusal"))


def cmd_eval(args) -> int:
    import json
    from pathlib import Path

    from .evaluate import load_mc, multiple_choice_accuracy, perplexity, write_report
    from .io import atomic_write_text
    from .loading import load_model, load_tokenizer
    from .masks import NeuronMask
    from .validate import evaluate_conditions

    masks = [(spec, NeuronMask.load(spec)) for spec in args.mask or []]  # bad files fail before the model loads
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    tok = load_tokenizer(args.model)
    judge = _judge(args, args.model)
    conditions = {"base": None}
    for spec, mask in masks:
        from .neuron_sets import check_model_match

        check_model_match(mask.model, model, f"mask {spec}")
        conditions[mask.name or Path(spec).name] = mask
    report = {"rows": []}
    if args.data:
        report = evaluate_conditions(model, tok, _eval_records(args), conditions, judge, args.max_new_tokens,
                                     chat_template=not args.no_chat_template, progress=not args.quiet)
    extra = {}
    if args.ppl:
        from .runtime import attach

        for name, m in conditions.items():
            with attach(model) as h:
                h.set_mask(m)
                extra.setdefault("perplexity", {})[name] = perplexity(model, tok, Path(args.ppl).read_text())
    if args.mc:
        from .runtime import attach

        items = load_mc(args.mc)
        for name, m in conditions.items():
            with attach(model) as h:
                h.set_mask(m)
                extra.setdefault("multiple_choice", {})[name] = multiple_choice_accuracy(
                    model, tok, items, chat_template=not args.no_chat_template)
    report.update(extra)
    out = Path(args.out)
    if report["rows"]:
        write_report(report, out, "Refusal per language")
        answers = report.pop("answers", {})
        atomic_write_text(out / "answers.json", json.dumps(answers, ensure_ascii=False, indent=1))
    else:
        atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    for r in report["rows"]:
        lo, hi = r["refusal_ci"]
        print(f"  {r['condition']:<18} {r['language']:<6} {r['label']:<9} refusal {100 * r['refusal_rate']:5.1f}% "
              f"[{100 * lo:.0f}-{100 * hi:.0f}]  n={r['n']}")
    for key, val in extra.items():
        print(f"  {key}: {json.dumps(val)}")
    print(f"wrote {out}/")
    return 0


def cmd_validate(args) -> int:
    import json
    from pathlib import Path

    from .evaluate import write_report
    from .io import atomic_write_text
    from .loading import load_model, load_tokenizer
    from .neuron_sets import NeuronSetFile
    from .validate import causal_validation

    model = load_model(args.model, dtype=args.dtype, device=args.device)
    tok = load_tokenizer(args.model)
    sets = NeuronSetFile.load(args.neurons, model=model)
    report = causal_validation(model, tok, _eval_records(args), sets[args.set], _judge(args, args.model),
                               alpha=args.alpha, seed=args.seed, set_name=args.set,
                               max_new_tokens=args.max_new_tokens, chat_template=not args.no_chat_template,
                               progress=not args.quiet)
    out = Path(args.out)
    answers = report.pop("answers")
    write_report(report, out, f"Causal validation of {args.set} ({report['set_size']} neurons)")
    atomic_write_text(out / "answers.json", json.dumps(answers, ensure_ascii=False, indent=1))
    for r in report["rows"]:
        print(f"  {r['condition']:<22} {r['language']:<6} {r['label']:<9} refusal {100 * r['refusal_rate']:5.1f}% "
              f"({100 * r['delta_vs_base']:+.1f})")
    print(f"wrote {out}/")
    return 0


def _kv_floats(value: str | None) -> dict[str, float] | None:
    if not value:
        return None
    out = {}
    for part in _csv_list(value):
        k, _, v = part.partition("=")
        try:
            out[k.strip()] = float(v)
        except ValueError:
            raise SSNError(f"expected LANG=WEIGHT pairs, got {part!r}") from None
    return out


def cmd_train(args) -> int:
    from .data import load_records
    from .loading import load_model, load_tokenizer
    from .neuron_sets import NeuronSetFile
    from .train import TrainConfig, train

    cfg = TrainConfig(lr=args.lr, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                      schedule=args.schedule, warmup=args.warmup, clip=args.clip, weight_decay=args.weight_decay,
                      seed=args.seed, save_every=args.save_every, eval_every=args.eval_every,
                      modules=_csv_list(args.modules), hr=_csv_list(args.hr), nhr_weight=args.nhr_weight,
                      language_weights=_kv_floats(args.language_weights), retain_weight=args.retain_weight,
                      max_length=args.max_length, chat_template=not args.no_chat_template)
    records = [r for path in args.data for r in load_records(path)]
    retain = [r for path in args.retain or [] for r in load_records(path)]
    evals = [r for path in args.eval_data or [] for r in load_records(path)]
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    tok = load_tokenizer(args.model)
    neurons = NeuronSetFile.load(args.neurons, model=model)[args.set]
    attention = None
    if args.attention_neurons:
        import json
        from pathlib import Path

        try:
            data = json.loads(Path(args.attention_neurons).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SSNError(f"cannot read --attention-neurons {args.attention_neurons}: {exc}") from None
        data = data.get("layers", data) if isinstance(data, dict) else None
        if not isinstance(data, dict):
            raise SSNError("--attention-neurons takes JSON {layer: [channel, ...]} (or {\"layers\": {...}})")
        attention = data
    res = train(model, tok, neurons, records, cfg, args.out, retain=retain, eval_records=evals,
                progress=not args.quiet, attention=attention)
    last = res["log"][-1] if res["log"] else {}
    print(f"wrote {args.out}: {len(neurons)} neurons, {res['trainable_params']} trainable parameters, "
          f"final loss {last.get('loss', float('nan')):.4f}")
    return 0


def cmd_merge(args) -> int:
    from .loading import load_model, load_tokenizer
    from .patches import NeuronPatch, merge_patch, unmerge_patch

    patch = NeuronPatch.load(args.patch)
    model = load_model(args.model, dtype=args.dtype)
    (unmerge_patch if args.unmerge else merge_patch)(model, NeuronPatch.load(args.patch, model=model))
    model.save_pretrained(args.out, safe_serialization=True)
    load_tokenizer(args.model).save_pretrained(args.out)
    print(f"wrote {args.out}: {'base (patch removed)' if args.unmerge else 'merged'} checkpoint "
          f"({len(patch.neurons())} neurons changed)")
    return 0


def cmd_make_data(args) -> int:
    import json
    import random

    from .data import filter_records, load_records
    from .io import atomic_write_text
    from .judges import builtin_lexicon, load_lexicon
    from .train import refusal_pairs

    canonical = dict(builtin_lexicon()["canonical"])
    for path in args.lexicon or []:
        canonical.update(load_lexicon(path).get("canonical", {}))
    records = [r for path in args.data for r in load_records(path)]
    where = {"language": _csv_list(args.languages)} if args.languages else None
    records = filter_records(records, where)
    pairs = refusal_pairs(records, canonical)
    random.Random(args.seed).shuffle(pairs)
    n_hold = int(len(pairs) * args.holdout)
    held, train_set = pairs[:n_hold], pairs[n_hold:]

    def dump(rs):
        return "".join(json.dumps({"prompt": r.text, "response": r.response, **r.fields}, ensure_ascii=False) + "\n"
                       for r in rs)

    atomic_write_text(args.out, dump(train_set))
    if args.holdout_out:
        atomic_write_text(args.holdout_out, dump(held))
    print(f"wrote {len(train_set)} prompt/refusal pairs to {args.out}"
          + (f" and {len(held)} held out to {args.holdout_out}" if args.holdout_out else ""))
    return 0


def _add_eval_args(p) -> None:
    p.add_argument("--model", required=True, help="local checkpoint folder")
    p.add_argument("--data", action="append", help="prompts: MultiJail CSV, JSONL or CSV (repeatable)")
    p.add_argument("--languages", help="comma-separated languages to keep")
    p.add_argument("--limit", type=int, help="at most N prompts per language and label")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--judge", default="lexicon", help="lexicon (default) or classifier:PATH")
    p.add_argument("--judge-label", default="refusal", help="the classifier's refusal label")
    p.add_argument("--lexicon", action="append", help="extra refusal lexicon JSON (repeatable)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device")
    p.add_argument("--no-chat-template", action="store_true")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--quiet", action="store_true")


def cmd_serve(args) -> int:
    import os

    from .serve import build_server

    profiles = {}
    for spec in args.profile or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SSNError(f"--profile takes NAME=PATH, got {spec!r}")
        if name in profiles:
            raise SSNError(f"profile {name!r} given twice")
        profiles[name] = path
    api_key = args.api_key or os.environ.get("SSN_API_KEY") or None
    app, engines = build_server(args.model, profiles, args.served_name, args.dtype, args.device, api_key,
                                args.max_batch, args.queue_size, args.request_timeout, args.default_max_tokens)
    import uvicorn

    names = ", ".join(["base", *profiles])
    print(f"serving {args.served_name or args.model} ({names}) on http://{args.host}:{args.port}/v1"
          + (" (API key required)" if api_key else ""), flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        for e in set(engines.values()):
            e.stop()
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
    from .demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssn", description="ssn-runtime: neuron-level safety work on HF causal LMs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="backends, versions, and a model's neuron sites")
    p.add_argument("--model", help="a local checkpoint folder: list its neuron sites (no weights are loaded)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("profile", help="per-neuron activation statistics over prompt sets, per group",
                       description="Profile every MLP neuron over prompt files; statistics are computed inside "
                       "the fused kernels. Resumable (re-run the same command after an interruption) and "
                       "distributable (torchrun --nproc-per-node N -m ssn_runtime profile ...).")
    p.add_argument("--model", required=True, help="local checkpoint folder")
    p.add_argument("--data", required=True, action="append", help="JSONL/JSON/CSV or MultiJail CSV (repeatable)")
    p.add_argument("--group-by", default="language", help="comma-separated record fields (default: language)")
    p.add_argument("--positions", choices=["prompt", "last", "generated"], default="prompt",
                   help="tokens counted: every prompt token, the last prompt token, or generated tokens")
    p.add_argument("--out", required=True, help="output stats file (.safetensors)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when present)")
    p.add_argument("--threshold", type=float, default=0.0, help="activation threshold for frequencies (LAPE: 0)")
    p.add_argument("--gate-stats", action="store_true", help="also count act(gate) > threshold (gated MLPs)")
    p.add_argument("--topk", type=int, help="count per-sequence layer top-k membership (PLND/SN-Tune)")
    p.add_argument("--max-tokens-per-batch", type=int, default=8192)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=32, help="with --positions generated")
    p.add_argument("--max-length", type=int, help="truncate prompts to their last N tokens")
    p.add_argument("--no-chat-template", action="store_true", help="encode raw text even if the model has a template")
    p.add_argument("--languages", help="keep only these languages (comma-separated)")
    p.add_argument("--limit", type=int, help="at most N records per group")
    p.add_argument("--checkpoint-every", type=int, default=20, help="batches between checkpoints (default 20)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("identify", help="MS-Neurons per language and SS-Neurons from profiling stats")
    p.add_argument("--stats", help="stats from ssn profile --group-by language,label (all methods but attribution)")
    p.add_argument("--method", default="cohens_d",
                   choices=["cohens_d", "mean_diff", "freq_diff", "consistent", "lape", "attribution"],
                   help="attribution: activation x gradient of a refusal's log-probability (needs --model, --data)")
    p.add_argument("--model", help="checkpoint folder, for --method attribution")
    p.add_argument("--data", action="append", help="harmful prompts with a language field, for attribution")
    p.add_argument("--attribution-prompts", type=int, default=24, help="prompts per language for attribution")
    p.add_argument("--lexicon", action="append", help="lexicon JSON whose 'canonical' gives refusal texts")
    p.add_argument("--no-chat-template", action="store_true")
    p.add_argument("--out", required=True, help="neuron set file (.json)")
    p.add_argument("--harmful", default="harmful", help="label of harmful prompts")
    p.add_argument("--harmless", default="harmless", help="label of harmless prompts")
    p.add_argument("--k", type=int, help="neurons per language (or per layer with --per-layer)")
    p.add_argument("--fraction", type=float, default=0.01, help="share of neurons when --k is not given")
    p.add_argument("--per-layer", action="store_true", help="select within each layer")
    p.add_argument("--threshold", type=float, help="keep only scores above this")
    p.add_argument("--sign", default="positive", choices=["positive", "negative", "abs"])
    p.add_argument("--rho", type=float, default=0.9, help="consistent: share of sequences")
    p.add_argument("--hr", default="en,zh,it,vi", help="high-resource languages")
    p.add_argument("--nhr", default="ar,ko,th,bn,sw,jv", help="non-high-resource languages")
    p.add_argument("--hr-combine", default="union", choices=["union", "intersection"])
    p.add_argument("--joint", default="union", choices=["union", "intersection"])
    p.set_defaults(func=cmd_identify)

    p = sub.add_parser("analyze", help="overlap, per-layer counts and plots of a neuron set file")
    p.add_argument("--neurons", required=True)
    p.add_argument("--out", required=True, help="report folder")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("mask", help="build a neuron mask from a neuron set")
    p.add_argument("--neurons", required=True)
    p.add_argument("--set", required=True, help="set name, e.g. SS or MS/sw")
    p.add_argument("--op", default="suppress", help="suppress | scale:ALPHA | patch_to:GROUP")
    p.add_argument("--stats", help="stats file, for patch_to")
    p.add_argument("--out", required=True, help="mask folder")
    p.set_defaults(func=cmd_mask)

    p = sub.add_parser("eval", help="refusal per language (and perplexity, multiple choice), with masks")
    _add_eval_args(p)
    p.add_argument("--mask", action="append", help="mask folder to evaluate beside the base model (repeatable)")
    p.add_argument("--ppl", help="text file: report perplexity")
    p.add_argument("--mc", help="JSONL {question, choices, answer}: report multiple-choice accuracy")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("validate", help="suppress / reinforce a neuron set beside a random control")
    _add_eval_args(p)
    p.add_argument("--neurons", required=True)
    p.add_argument("--set", default="SS")
    p.add_argument("--alpha", type=float, default=2.0, help="reinforcement scale")
    p.add_argument("--seed", type=int, default=0, help="random control seed")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("train", help="fine-tune only chosen neurons; writes a neuron patch")
    p.add_argument("--model", required=True)
    p.add_argument("--neurons", required=True, help="neuron set file (ssn identify)")
    p.add_argument("--set", default="SS", help="set name in the file (default SS)")
    p.add_argument("--data", required=True, action="append", help="JSONL prompt/response or messages (repeatable)")
    p.add_argument("--retain", action="append", help="retention (benign) data mixed in (repeatable)")
    p.add_argument("--eval-data", action="append", help="held-out examples for eval loss")
    p.add_argument("--out", required=True, help="patch folder")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant"])
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clip (0: none)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--save-every", type=int, default=25, help="steps between checkpoints")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--modules", default="gate,up,down", help="which neuron slices to train")
    p.add_argument("--attention-neurons", help="JSON {layer: [o_proj input channel, ...]}: also train these "
                   "attention neurons (o_proj columns, v_proj rows via the grouped-query mapping)")
    p.add_argument("--hr", default="en,zh,it,vi", help="high-resource languages")
    p.add_argument("--nhr-weight", type=float, default=3.0, help="sampling weight of other languages' examples")
    p.add_argument("--language-weights", help="explicit LANG=WEIGHT pairs, e.g. sw=4,th=2")
    p.add_argument("--retain-weight", type=float, default=1.0)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device")
    p.add_argument("--no-chat-template", action="store_true")
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
    p.add_argument("--languages")
    p.add_argument("--lexicon", action="append", help="extra lexicon JSON with 'canonical' refusals")
    p.add_argument("--holdout", type=float, default=0.0, help="share of pairs held out")
    p.add_argument("--holdout-out", help="where the held-out pairs go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_make_data)

    p = sub.add_parser("demo", help="the whole safety-neuron workflow on the built-in organism")
    p.add_argument("--out", default="out/demo", help="report folder (default: out/demo)")
    p.add_argument("--seeds", default="0", help="organism seeds, e.g. 0,1,2 (default 0)")
    p.add_argument("--small", action="store_true", help="the seconds-to-build test organism")
    p.add_argument("--rebuild", action="store_true", help="retrain the organism even if cached")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="OpenAI-compatible server for the model, its masks and patches")
    p.add_argument("--model", required=True)
    p.add_argument("--profile", action="append", help="NAME=PATH of a mask or patch folder (repeatable)")
    p.add_argument("--served-name", help="the base model's id in the API (default: the folder name)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require this Bearer token (or set SSN_API_KEY)")
    p.add_argument("--max-batch", type=int, default=16, help="rows per generation batch")
    p.add_argument("--queue-size", type=int, default=64, help="waiting requests before answering 429")
    p.add_argument("--request-timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--default-max-tokens", type=int, default=64)
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
