"""What `ssn info` reports: versions, kernel backends, and a checkpoint's neuron sites (read
from its config on the meta device, so no weights are loaded)."""

from __future__ import annotations

import sys


def versions() -> dict:
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


def model_sites(path: str) -> dict:
    """Neuron sites of a checkpoint, built on the meta device: no weights are read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .core.adapters import find_sites
    from .core.loading import check_checkpoint
    from .core.moe import activation_name, describe_sites

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
        "activation": activation_name(sites[0]) if sites else None,
        "first_site": sites[0].name if sites else None,
        **({"moe": moe} if (moe := describe_sites(sites)) else {}),
    }


def info_lines(info: dict) -> list[str]:
    """`ssn info` as text: versions, backends (and which one each tensor kind gets), the model's sites."""
    out = []
    v = info["versions"]
    others = ", ".join(f"{k} {v[k]}" for k in v if k != "ssn_runtime")
    out.append(f"ssn-runtime {v['ssn_runtime']}  ({others})")
    b = info["backends"]
    forced = f" (forced: SSN_BACKEND={b['forced']})" if b["forced"] else ""
    out.append(f"backends{forced}:")
    for name in ("triton", "cpp", "torch"):
        mark = "yes" if b[name]["available"] else "no "
        out.append(f"  {name:<7} {mark}  {b[name]['detail']}")
    out.append(f"  cuda    {'yes' if b['cuda']['available'] else 'no '}  {b['cuda']['device'] or 'no CUDA device'}")
    out.append("active backend per tensor kind:")
    for kind, (backend, why) in b["active"].items():
        out.append(f"  {kind:<14} -> {backend:<7} {why}")
    if "model" in info:
        m = info["model"]
        out.append(f"model {m['path']}: {m['class']} ({m['model_type']}), {m['layers']} layers x "
              f"{'/'.join(map(str, m['neurons_per_layer']))} neurons = {m['total_neurons']}, "
              f"{m['mlp_kind']} MLP, activation {m['activation'] or 'model-defined (torch backend)'}")
        if "moe" in m:
            e = m["moe"]
            shared = f"shared expert(s) of {e['shared_neurons']} neurons" if e["shared_neurons"] else "no shared expert"
            dense = f"; dense MLP layers {e['dense_layers']}" if e["dense_layers"] else ""
            out.append(f"  mixture of experts: {e['experts']} experts x {e['expert_size']} neurons, top-{e['top_k']} "
                  f"({e['router_probs']} router), {shared}, expert activation {e['expert_activation']}; "
                  f"MoE layers {e['moe_layers']}{dense}")
    return out
