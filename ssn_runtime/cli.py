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
