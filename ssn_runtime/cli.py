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

    p = sub.add_parser("demo", help="run the main job on the built-in model")
    p.add_argument("--out", default="out/demo", help="report folder (default: out/demo)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
