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
    from .moe import describe_sites

    check_checkpoint(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    sites = find_sites(model)
    return {
        "path": path, "class": type(model).__name__, "model_type": config.model_type,
        "layers": len(sites), "neurons_per_layer": sorted({s.num_neurons for s in sites}),
        "total_neurons": sum(s.num_neurons for s in sites), "hidden_size": sites[0].hidden_size if sites else None,
        "mlp_kind": ("mixture-of-experts" if describe_sites(sites) else sites[0].style.kind) if sites else None,
        "activation": sites[0].act if sites else None,
        "first_site": sites[0].name if sites else None,
        **({"moe": moe} if (moe := describe_sites(sites)) else {}),
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
        if "moe" in m:
            e = m["moe"]
            shared = f"shared expert(s) of {e['shared_neurons']} neurons" if e["shared_neurons"] else "no shared expert"
            dense = f"; dense MLP layers {e['dense_layers']}" if e["dense_layers"] else ""
            print(f"  mixture of experts: {e['experts']} experts x {e['expert_size']} neurons, top-{e['top_k']} "
                  f"({e['router_probs']} router), {shared}, expert activation {e['expert_activation']}; "
                  f"MoE layers {e['moe_layers']}{dense}")
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


def cmd_convert(args) -> int:
    from .convert import convert_gguf

    rec = convert_gguf(args.gguf, args.out, dtype=args.dtype, overwrite=args.overwrite, progress=not args.quiet)
    types = ", ".join(f"{k} x{v}" for k, v in rec["tensor_types"].items())
    print(f"wrote {args.out}: {rec['model_type']} ({rec['tensors']} tensors: {types}) as {rec['dtype']}, "
          f"max |logit diff| {rec['check']['max_abs_logit_diff']:g} vs the GGUF model, {rec['seconds']} s")
    for name, (old, new) in rec["special_tokens_fixed"].items():
        print(f"  {name}: {old!r} -> {new!r} (as the GGUF metadata says)")
    return 0


def cmd_profile(args) -> int:
    import torch

    from .data import filter_records, load_records, with_builtin_harmless
    from .loading import load_model, load_tokenizer
    from .options import from_args
    from .profiler import ProfileConfig, profile

    config = from_args(ProfileConfig, args)
    group_by = config.group_by
    records = [r for path in args.data for r in load_records(path)]
    where = {"language": _csv_list(args.languages)} if args.languages else None
    records = filter_records(records, where)
    if "label" in group_by and not args.no_builtin_harmless:
        records, added = with_builtin_harmless(records)
        if added:  # recorded too: the stats' "sources" list the built-in file
            print(f"note: --data holds only harmful prompts; adding the built-in harmless prompts "
                  f"(ssn_runtime/resources/harmless_prompts.jsonl) for {', '.join(added)} "
                  f"(--no-builtin-harmless to turn off)", file=sys.stderr)
    records = filter_records(records, None, args.limit, group_by)
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
        how = "ssn profile --gate-stats" if args.method == "lape" else "ssn profile --group-by language,label"
        raise SSNError(f"--method {args.method} needs --stats (from {how})")
    stats = NeuronStats.load(args.stats) if args.stats else None
    cfg = IdentifyConfig(method=args.method, harmful=args.harmful, harmless=args.harmless, k=args.k,
                         fraction=None if args.k is not None else args.fraction, per_layer=args.per_layer,
                         threshold=args.threshold, sign=args.sign, rho=args.rho,
                         hr=_csv_list(args.hr), nhr=_csv_list(args.nhr), hr_combine=args.hr_combine,
                         joint=args.joint, lape_top_rate=args.lape_top_rate, lape_filter_rate=args.lape_filter_rate,
                         lape_activation_bar=args.lape_activation_bar, lape_variant=args.lape_variant,
                         skip_incomplete=args.skip_incomplete, per_expert=args.per_expert)
    attribution, info = None, None
    if args.method == "attribution":
        from collections import Counter

        import torch

        from .data import load_records
        from .fingerprint import model_fingerprint
        from .identify import attribution_by_language
        from .loading import load_model, load_tokenizer

        records = [r for path in args.data for r in load_records(path)]
        model = load_model(args.model, dtype="float32",
                           device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        refusals = _judge(args, args.model).canonical  # built-in + the model's + --lexicon "canonical" texts
        attribution = attribution_by_language(model, load_tokenizer(args.model), records, refusals,
                                              languages=_csv_list(args.languages) or None, limit=args.limit,
                                              batch_size=args.batch_size, progress=not args.quiet,
                                              chat_template=not args.no_chat_template, harmful=args.harmful)
        info = model_fingerprint(model)
        counts = {lang: min(args.limit, n) for lang, n in Counter(
            r.fields.get("language") for r in records if r.fields.get("label", args.harmful) == args.harmful).items()}
        print("attribution prompts per language: " + ", ".join(f"{lang} {counts[lang]}" for lang in attribution))
    sets = identify(stats, cfg, attribution, info)
    sets.save(args.out)
    for lang, why in sets.extra.get("skipped_languages", {}).items():
        print(f"warning: skipped language {lang}: {why} (recorded in {args.out})", file=sys.stderr)
    if "ss_missing" in sets.extra:
        print(f"warning: {sets.extra['ss_missing']}", file=sys.stderr)
    print(f"wrote {args.out}:")
    chance = sets.extra.get("chance_overlap", {})
    for name, ns in sets.sets.items():
        note = f"   (chance overlap {chance[name]['expected']:.1f})" if name in chance else ""
        print(f"  {name:<10} {len(ns):>7} neurons{note}")
    if "ss_variants" in sets.extra:
        print("  SS under each reading: " + ", ".join(f"{k}: {v}" for k, v in sets.extra["ss_variants"].items()))
    if "lape" in sets.extra:
        i = sets.extra["lape"]
        print(f"  LAPE ({i['variant']}, counting {i['activation']}): {i['selected']} selected of {i['kept']} kept")
    return 0


def cmd_analyze(args) -> int:
    from .analysis import analyze, analyze_routing
    from .neuron_sets import NeuronSetFile
    from .stats import NeuronStats

    if not (args.neurons or args.stats):
        raise SSNError("ssn analyze needs --neurons (a neuron set file) and/or --stats (an MoE model's stats)")
    stats = NeuronStats.load(args.stats) if args.stats else None
    if stats is not None and stats.route_topk is None:
        raise SSNError(f"--stats {args.stats}: no router statistics (they come from profiling a mixture-of-experts "
                       "model); for a dense model, analyze its neuron sets (--neurons)")
    if args.neurons:
        res = analyze(NeuronSetFile.load(args.neurons), args.out)
        print(f"wrote {args.out}/ (summary.md, overlap.png, per_layer.png, CSV/JSON)")
        for n, v in res["sizes"].items():
            print(f"  {n:<10} {v:>7} neurons ({100 * res['share_of_neurons'][n]:.3f}%)")
    if stats is not None:
        r = analyze_routing(stats, args.out, harmful=args.harmful, harmless=args.harmless)
        plots = "routing_heatmap.png" + (", routing_z.png" if r["routing_z"] else "")
        print(f"wrote {args.out}/ (routing.md, {plots}, routing.csv/json): router statistics of MoE layers "
              f"{r['moe_layers']}, {r['experts']} experts, {len(r['rows'])} {r['row_kind']}s")
        for lang, top in r["separating"].items():
            print(f"  {lang:<10} most separating experts ({args.harmful} vs {args.harmless}): "
                  + ", ".join(f"L{la}/E{e} z={v:+.2f}" for la, e, v in top[:3] if v is not None))
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
    from .data import filter_records, load_records, with_builtin_harmless

    if not args.data:
        raise SSNError(f"ssn {args.command}: --data is required (prompts: MultiJail CSV, JSONL or CSV)")
    records = [r for path in args.data for r in load_records(path)]
    where = {"language": _csv_list(args.languages)} if args.languages else None
    records = filter_records(records, where)
    if not args.no_builtin_harmless:
        # Harmless prompts under the same masks show over-refusal and lost helpfulness: a mask
        # that removes refusal by breaking the model shows there too (as in ssn profile).
        records, added = with_builtin_harmless(records)
        if added:
            print(f"note: --data holds only harmful prompts; adding the built-in harmless prompts "
                  f"(ssn_runtime/resources/harmless_prompts.jsonl) for {', '.join(added)} "
                  f"(--no-builtin-harmless to turn off)", file=sys.stderr)
    records = filter_records(records, None, args.limit, ["language", "label"])
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

    from .evaluate import (
        ability_checks,
        ability_lines,
        ability_rows,
        load_heldout_texts,
        load_mc,
        named_conditions,
        write_report,
    )
    from .io import atomic_write_text
    from .loading import load_model, load_tokenizer
    from .masks import NeuronMask
    from .neuron_sets import check_model_match
    from .validate import evaluate_conditions

    # Bad files fail before the model loads.
    conditions = named_conditions([(spec, NeuronMask.load(spec)) for spec in args.mask or []])
    records = _eval_records(args) if args.data else None
    ppl = load_heldout_texts(args.ppl, _csv_list(args.languages)) if args.ppl else None
    mc = load_mc(args.mc) if args.mc else None
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    tok = load_tokenizer(args.model)
    judge = _judge(args, args.model)
    for mask, spec in zip(list(conditions.values())[1:], args.mask or [], strict=True):
        check_model_match(mask.model, model, f"mask {spec}")
    batching = {"max_tokens_per_batch": args.max_tokens_per_batch, "max_batch_size": args.max_batch_size}
    if records:
        report = evaluate_conditions(model, tok, records, conditions, judge, args.max_new_tokens,
                                     chat_template=not args.no_chat_template, progress=not args.quiet,
                                     margins=not args.no_margins, ppl=ppl, mc=mc, **batching)
    else:
        report = {"rows": [], **ability_checks(model, tok, conditions, ppl, mc, not args.no_chat_template, **batching)}
        report["ability"] = ability_rows(report)
    out = Path(args.out)
    if report["rows"]:
        write_report(report, out, "Refusal per language")  # also answers.json, one record per answer
    else:
        atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    _print_rows(report)
    for line in ability_lines(report):
        print(line)
    print(f"wrote {out}/")
    return 0


def _print_rows(report: dict, effects: bool = False) -> None:
    """Verdict rates (and the mean margin) per condition and language; with `effects`, the
    paired margin effects of the set against its random control."""
    margins = {(r["condition"], r["language"], r["label"]): r for r in report.get("margin_rows", [])}
    for r in report["rows"]:
        lo, hi = r["refusal_ci"]
        m = margins.get((r["condition"], r["language"], r["label"]))
        margin = f"  margin {m['margin_mean']:+.2f}" if m and m["margin_mean"] is not None else ""
        delta = f" ({100 * r['delta_vs_base']:+.1f})" if "delta_vs_base" in r else ""
        print(f"  {r['condition']:<22} {r['language']:<6} {r['label']:<9} refusal {100 * r['refusal_rate']:5.1f}%"
              f"{delta} [{100 * lo:.0f}-{100 * hi:.0f}]  compliance {100 * r['compliance_rate']:5.1f}%  "
              f"unintelligible {100 * r['unintelligible_rate']:5.1f}%{margin}  n={r['n']}")
    if effects:
        for e in report.get("margin_effects", []):
            if " - random" in e["comparison"] and e["mean"] is not None:
                ci = e["ci"]
                span = f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci[0] is not None else ""
                print(f"  margin effect {e['comparison']:<40} {e['language']:<6} {e['label']:<9} "
                      f"{e['mean']:+.3f}{span}  n={e['n']}")


def cmd_validate(args) -> int:
    from pathlib import Path

    from .evaluate import ability_lines, load_heldout_texts, load_mc, write_report
    from .loading import load_model, load_tokenizer
    from .neuron_sets import NeuronSetFile
    from .validate import causal_validation

    records = _eval_records(args)  # bad files fail before the model loads
    ppl = load_heldout_texts(args.ppl, _csv_list(args.languages)) if args.ppl else None
    mc = load_mc(args.mc) if args.mc else None
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    tok = load_tokenizer(args.model)
    sets = NeuronSetFile.load(args.neurons, model=model)
    report = causal_validation(model, tok, records, sets[args.set], _judge(args, args.model),
                               alpha=args.alpha, seed=args.seed, set_name=args.set,
                               max_new_tokens=args.max_new_tokens, chat_template=not args.no_chat_template,
                               progress=not args.quiet, max_tokens_per_batch=args.max_tokens_per_batch,
                               max_batch_size=args.max_batch_size, margins=not args.no_margins, ppl=ppl, mc=mc)
    out = Path(args.out)
    write_report(report, out, f"Causal validation of {args.set} ({report['set_size']} neurons)")
    _print_rows(report, effects=True)
    for line in ability_lines(report):
        print(line)
    print(f"wrote {out}/")
    return 0


def cmd_train(args) -> int:
    from .attention_neurons import load_channels
    from .data import load_records
    from .loading import load_model, load_tokenizer
    from .neuron_sets import NeuronSetFile
    from .options import from_args
    from .train import TrainConfig, train

    cfg = from_args(TrainConfig, args)
    attention = load_channels(args.attention_neurons) if args.attention_neurons else None  # before the model
    records = [r for path in args.data for r in load_records(path)]
    retain = [r for path in args.retain or [] for r in load_records(path)]
    evals = [r for path in args.eval_data or [] for r in load_records(path)]
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    tok = load_tokenizer(args.model)
    neurons = NeuronSetFile.load(args.neurons, model=model)[args.set]
    res = train(model, tok, neurons, records, cfg, args.out, retain=retain, eval_records=evals,
                progress=not args.quiet, attention=attention)
    last = res["log"][-1] if res["log"] else {}
    print(f"wrote {args.out}: {len(neurons)} neurons, {res['trainable_params']} trainable parameters, "
          f"final loss {last.get('loss', float('nan')):.4f}")
    return 0


def cmd_merge(args) -> int:
    from pathlib import Path

    from .io import atomic_folder
    from .loading import load_model, load_tokenizer
    from .patches import MERGE_RECORD, NeuronPatch, merge_patch, unmerge_record

    model = load_model(args.model, dtype=args.dtype)
    patch = NeuronPatch.load(args.patch, model=model)
    record = None
    if args.unmerge:
        unmerge_record(model, patch, Path(args.model) / MERGE_RECORD)
    else:
        record = merge_patch(model, patch).record()
    with atomic_folder(args.out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(args.model).save_pretrained(tmp)
        if record is not None:  # what the merge replaced: `ssn merge --unmerge` restores it bit for bit
            (tmp / MERGE_RECORD).write_bytes(record)
    print(f"wrote {args.out}: {'base (patch removed, bit-exact)' if args.unmerge else 'merged'} checkpoint "
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
    p.add_argument("--no-builtin-harmless", action="store_true",
                   help="when --data holds only harmful prompts, do not add the built-in harmless prompts of its "
                   "languages (helpfulness and over-refusal under every condition)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-tokens-per-batch", type=int, default=8192,
                   help="padded tokens per batch (prompt + new tokens), as in ssn profile")
    p.add_argument("--max-batch-size", type=int, default=64, help="rows per batch (one row per prompt x condition)")
    p.add_argument("--no-margins", action="store_true",
                   help="skip the refusal-vs-compliance margins (teacher-forced log P of the lexicon's canonical "
                   "refusal minus its compliance opening, per prompt, with 95%% t intervals)")
    p.add_argument("--judge", default="lexicon", help="lexicon (default) or classifier:PATH; both give refusal, "
                   "compliance or unintelligible (empty, garbage, echo, repetition, wrong script/language)")
    p.add_argument("--judge-label", default="refusal", help="the classifier's refusal label")
    p.add_argument("--lexicon", action="append", help="extra refusal lexicon JSON (repeatable)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device")
    p.add_argument("--no-chat-template", action="store_true")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--ppl", help="held-out text for perplexity under every condition: .txt (one text) or "
                   "JSONL/JSON/CSV records (per language)")
    p.add_argument("--mc", help="JSONL {question, choices, answer}: multiple-choice accuracy per condition")


def cmd_serve(args) -> int:
    import os

    from .serve import build_server, serve_forever

    profiles = {}
    for spec in args.profile or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SSNError(f"--profile takes NAME=PATH (or NAME=MASK,PATCH), got {spec!r}")
        if name in profiles:
            raise SSNError(f"profile {name!r} given twice")
        profiles[name] = path
    if not 0 <= args.shutdown_grace < float("inf"):
        raise SSNError(f"--shutdown-grace must be a finite number of seconds >= 0, got {args.shutdown_grace}")
    api_key = args.api_key or os.environ.get("SSN_API_KEY") or None
    app, engine = build_server(args.model, profiles, args.served_name, args.dtype, args.device, api_key,
                               args.max_batch, args.queue_size, args.request_timeout, args.default_max_tokens,
                               args.gather_ms, args.max_prefill_tokens, args.public_metrics)
    names = ", ".join(["base", *profiles])
    print(f"serving {args.served_name or args.model} ({names}) on http://{args.host}:{args.port}/v1"
          + (" (API key required)" if api_key else ""), flush=True)
    serve_forever(app, engine, args.host, args.port, args.shutdown_grace)
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
    from .options import add_options
    from .organism.build import ARCHS
    from .profiler import ProfileConfig
    from .train import TrainConfig

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
    p.add_argument("--method", default="cohens_d",
                   choices=["cohens_d", "mean_diff", "freq_diff", "consistent", "lape", "attribution", "routing"],
                   help="attribution: activation x gradient of a refusal's log-probability (needs --model, --data); "
                   "lape: language-specific neurons (LAPE/<lang>), needs --stats from ssn profile --gate-stats "
                   "(gated MLPs); routing (MoE): every neuron of the experts whose selection separates harmful from "
                   "harmless most (--k/--fraction count experts); the others need harmful and harmless prompts in "
                   "every language")
    p.add_argument("--model", help="checkpoint folder, for --method attribution")
    p.add_argument("--data", action="append", help="harmful prompts with a language field, for attribution")
    p.add_argument("--languages", help="attribution: only these languages (comma-separated; default: all in --data)")
    p.add_argument("--limit", "--attribution-prompts", dest="limit", type=int, default=24,
                   help="attribution: the first N harmful prompts per language (default 24)")
    p.add_argument("--batch-size", type=int, default=8, help="attribution: prompts per forward/backward (default 8)")
    p.add_argument("--device", help="attribution: cpu, cuda, cuda:1 (default: cuda when present)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--lexicon", action="append", help="lexicon JSON whose 'canonical' gives refusal texts")
    p.add_argument("--no-chat-template", action="store_true")
    p.add_argument("--out", required=True, help="neuron set file (.json)")
    p.add_argument("--harmful", default="harmful", help="label of harmful prompts")
    p.add_argument("--harmless", default="harmless", help="label of harmless prompts")
    p.add_argument("--k", type=int, help="neurons per language (or per layer with --per-layer)")
    p.add_argument("--fraction", type=float, default=0.01, help="share of neurons when --k is not given")
    p.add_argument("--per-layer", action="store_true", help="select within each layer")
    p.add_argument("--per-expert", action="store_true",
                   help="MoE: --k/--fraction within each routed expert (and the shared/dense part) of each layer")
    p.add_argument("--threshold", type=float, help="keep only scores above this")
    p.add_argument("--sign", default="positive", choices=["positive", "negative", "abs"])
    p.add_argument("--rho", type=float, default=0.9, help="consistent: share of sequences")
    p.add_argument("--hr", default="en,zh,it,vi", help="high-resource languages")
    p.add_argument("--nhr", default="ar,ko,th,bn,sw,jv", help="non-high-resource languages")
    p.add_argument("--hr-combine", default="union", choices=["union", "intersection"],
                   help="MS/HR = neurons of ANY HR language's MS set (union, default: generous) or of EVERY one")
    p.add_argument("--joint", default="union", choices=["union", "intersection"],
                   help="SS = neurons HR shares with AT LEAST ONE NHR language (union, default) or with EVERY one; "
                   "the file records each SS/<l>'s chance overlap and the SS size under all four readings")
    p.add_argument("--skip-incomplete", action="store_true",
                   help="leave out languages that have harmful but no harmless prompts (or the reverse), recording "
                   "them in the output, instead of failing")
    p.add_argument("--lape-variant", default="published", choices=["published", "product_kept"],
                   help="lape: 'published' (Tang et al. 2024: act(gate) > 0, needs stats from ssn profile "
                   "--gate-stats on gated MLPs) or this project's earlier 'product_kept'")
    p.add_argument("--lape-top-rate", type=float, default=0.01, help="lape: share of all neurons selected")
    p.add_argument("--lape-filter-rate", type=float, default=0.95, help="lape: activation-probability filter quantile")
    p.add_argument("--lape-activation-bar", type=float, default=0.95,
                   help="lape: quantile a language's probability must exceed to claim a neuron")
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
    p.add_argument("--set", required=True, help="set name, e.g. SS or MS/sw")
    p.add_argument("--op", default="suppress", help="suppress | scale:ALPHA | patch_to:GROUP")
    p.add_argument("--stats", help="stats file, for patch_to")
    p.add_argument("--out", required=True, help="mask folder")
    p.set_defaults(func=cmd_mask)

    p = sub.add_parser("eval", help="refusal per language (and perplexity, multiple choice), with masks")
    _add_eval_args(p)
    p.add_argument("--mask", action="append", help="mask folder to evaluate beside the base model (repeatable)")
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
    p.add_argument("--languages")
    p.add_argument("--lexicon", action="append", help="extra lexicon JSON with 'canonical' refusals")
    p.add_argument("--holdout", type=float, default=0.0, help="share of pairs held out")
    p.add_argument("--holdout-out", help="where the held-out pairs go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_make_data)

    p = sub.add_parser("demo", help="the whole safety-neuron workflow on the built-in organism")
    p.add_argument("--out", default="out/demo", help="report folder (default: out/demo)")
    p.add_argument("--seeds", default="0", help="organism seeds, e.g. 0,1,2,3,4 (default 0); with several, each "
                   "target's minimum margin across seeds (summary.json/.md)")
    p.add_argument("--small", action="store_true", help="the seconds-to-build test organism")
    p.add_argument("--arch", default="llama", choices=ARCHS, help="the organism's architecture: llama (default), "
                   "gpt2, or qwen3_moe (a mixture of experts; the report adds router statistics per language)")
    p.add_argument("--rebuild", action="store_true", help="retrain the organism even if cached")
    p.add_argument("--reuse", action="store_true", help="keep a seed's results.json under --out when it was "
                   "computed on the organism now cached for that seed (resume, or gather seeds run in parallel)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="OpenAI-compatible server for the model, its masks and patches")
    p.add_argument("--model", required=True)
    p.add_argument("--profile", action="append", help="NAME=PATH of a mask or patch folder, or NAME=MASK,PATCH for "
                   "both (composed per row); repeatable; every profile shares the one copy of the weights")
    p.add_argument("--served-name", help="the base model's id in the API (default: the folder name)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require this Bearer token (or set SSN_API_KEY)")
    p.add_argument("--max-batch", type=int, default=16, help="rows decoded together (continuous batching)")
    p.add_argument("--queue-size", type=int, default=64, help="waiting requests before answering 429")
    p.add_argument("--request-timeout", type=float, default=60.0, help="seconds per request (then 408)")
    p.add_argument("--default-max-tokens", type=int, default=64, help="answer budget when a request gives none")
    p.add_argument("--gather-ms", type=float, default=5.0,
                   help="when idle, how long the first request waits for others before its prefill")
    p.add_argument("--max-prefill-tokens", type=int, default=4096,
                   help="prompt tokens admitted per step (bounds how long joining rows stall running ones)")
    p.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="on SIGTERM: seconds in-flight rows may run on before they are cut (503)")
    p.add_argument("--public-metrics", action="store_true", help="serve /metrics without the API key")
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
