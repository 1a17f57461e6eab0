"""An independent reference for the profiler: forward hooks on the *unpatched* Hugging Face
model, one sequence at a time (no padding), statistics computed in float64 from the
captured activations."""

import torch

from ssn_runtime.core.adapters import find_sites
from ssn_runtime.data import encode_prompt


def _capture(model, sites):
    h_rows, a_rows, hooks = {}, {}, []
    for s in sites:
        down = s.sub(s.style.down)
        hooks.append(down.register_forward_pre_hook(
            lambda m, args, layer=s.layer: h_rows.__setitem__(layer, args[0].detach().double().reshape(
                -1, args[0].shape[-1]))))
        hooks.append(s.act_module.register_forward_hook(
            lambda m, args, out, layer=s.layer: a_rows.__setitem__(layer, out.detach().double().reshape(
                -1, out.shape[-1]))))
    return h_rows, a_rows, hooks


def reference_stats(model, tokenizer, records, group_by, positions, threshold=0.0, topk=None,
                    max_new_tokens=8, eos=None):
    sites = find_sites(model)
    L, N = len(sites), sites[0].num_neurons
    groups = sorted({r.key(group_by) for r in records})
    rows = {(l_, g): [] for l_ in range(L) for g in range(len(groups))}
    arows = {(l_, g): [] for l_ in range(L) for g in range(len(groups))}
    topk_count = torch.zeros(L, len(groups), N, dtype=torch.int64)
    seq_count = torch.zeros(L, len(groups), dtype=torch.int64)
    col_norm = [s.down_cols().detach().float().norm(dim=0) for s in sites]
    h_rows, a_rows, hooks = _capture(model, sites)
    try:
        for r in records:
            g = groups.index(r.key(group_by))
            ids = encode_prompt(r, tokenizer)
            if positions == "generated":
                with torch.no_grad():
                    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                         pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
                cont = out[0, len(ids):].tolist()
                n = next((i + 1 for i, t in enumerate(cont) if t == eos), len(cont))
                full = ids + cont[:n]
                sel = list(range(len(ids) - 1, len(ids) - 1 + n))
            else:
                full = ids
                sel = list(range(len(ids))) if positions == "prompt" else [len(ids) - 1]
            with torch.no_grad():
                model(torch.tensor([full]))
            for layer in range(L):
                h = h_rows[layer][sel]
                rows[(layer, g)].append(h)
                arows[(layer, g)].append(a_rows[layer][sel])
                if topk:
                    score = h.abs().mean(0).float() * col_norm[layer]
                    topk_count[layer, g, score.topk(topk).indices] += 1
                    seq_count[layer, g] += 1
    finally:
        for hk in hooks:
            hk.remove()
    out = {k: torch.zeros(L, len(groups), N, dtype=torch.float64) for k in ("sum", "m2", "abs_sum", "active",
                                                                          "gate_active")}
    count = torch.zeros(L, len(groups), dtype=torch.int64)
    for (layer, g), parts in rows.items():
        if not parts:
            continue
        h = torch.cat(parts)
        a = torch.cat(arows[(layer, g)])
        count[layer, g] = h.shape[0]
        out["sum"][layer, g] = h.sum(0)
        out["m2"][layer, g] = ((h - h.mean(0)) ** 2).sum(0)
        out["abs_sum"][layer, g] = h.abs().sum(0)
        out["active"][layer, g] = (h > threshold).double().sum(0)
        out["gate_active"][layer, g] = (a > threshold).double().sum(0)
    return groups, count, out, topk_count, seq_count
