"""Analysis of neuron sets: sizes, neurons per layer, overlap (Jaccard) across languages.

Writes sizes.json, overlap.{csv,json}, per_layer.{csv,json}, summary.md and two plots:
overlap.png (heatmap) and per_layer.png (bars). When the file comes from `identify`,
summary.md also sets each SS/<l> beside its chance overlap and lists the SS size under
each union/intersection reading.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..errors import SSNError
from ..io import atomic_write_text
from .neuron_sets import NeuronSetFile
from .stats import NeuronStats


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    _plt().close(fig)
    tmp.replace(path)


def analyze(sets: NeuronSetFile, out_dir: str | Path, overlap_prefix: str = "MS/") -> dict:
    out = Path(out_dir)
    names = list(sets.sets)
    langs = [n for n in names if n.startswith(overlap_prefix) and n != f"{overlap_prefix}HR"] or names
    jac = [[sets[a].jaccard(sets[b]) for b in langs] for a in langs]
    per_layer = {n: sets[n].per_layer() for n in names}
    sizes = {n: len(sets[n]) for n in names}
    total = sets.num_layers * sets.num_neurons
    result = {"sizes": sizes, "share_of_neurons": {n: v / total for n, v in sizes.items()},
              "overlap_names": langs, "jaccard": jac, "per_layer": per_layer}

    atomic_write_text(out / "sizes.json", json.dumps({"sizes": sizes, "total_neurons": total}, indent=1))
    atomic_write_text(out / "overlap.json", json.dumps({"names": langs, "jaccard": jac}, indent=1))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["", *langs])
    for a, row in zip(langs, jac, strict=True):
        w.writerow([a, *(f"{v:.4f}" for v in row)])
    atomic_write_text(out / "overlap.csv", buf.getvalue())
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["layer", *names])
    for layer in range(sets.num_layers):
        w.writerow([layer, *(per_layer[n][layer] for n in names)])
    atomic_write_text(out / "per_layer.csv", buf.getvalue())
    atomic_write_text(out / "per_layer.json", json.dumps(per_layer, indent=1))

    md = ["# Neuron sets", "", f"model: {sets.model.get('model_name')} ({sets.num_layers} layers x "
          f"{sets.num_neurons} neurons); method: {sets.method.get('name')}", "",
          "| set | neurons | share of all |", "|---|---|---|"]
    md += [f"| {n} | {sizes[n]} | {100 * sizes[n] / total:.3f}% |" for n in names]
    md += ["", "Jaccard overlap:", "", "| | " + " | ".join(langs) + " |", "|---" * (len(langs) + 1) + "|"]
    md += [f"| {a} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for a, row in zip(langs, jac, strict=True)]
    chance = sets.extra.get("chance_overlap") or {}
    if chance:  # written by identify: is SS/<l> = MS/HR & MS/<l> bigger than random sets would give?
        md += ["", "SS/<l> = MS/HR & MS/<l> against the overlap expected for random sets of those sizes "
               f"(readings: hr_combine={sets.method.get('hr_combine')}, joint={sets.method.get('joint')}):", "",
               "| set | neurons | expected by chance | ratio |", "|---|---|---|---|"]
        md += [f"| {n} | {c['observed']} | {c['expected']:.1f} | "
               f"{c['observed'] / c['expected'] if c['expected'] else float('nan'):.2f} |" for n, c in chance.items()]
        result["chance_overlap"] = chance
    if sets.extra.get("ss_variants"):
        sizes_by_reading = ", ".join(f"{k}: {v}" for k, v in sets.extra["ss_variants"].items())
        md += ["", f"SS size under each reading: {sizes_by_reading}"]
    layouts = sets.model.get("moe_layers")
    if layouts:  # MoE: how each set spreads over the shared part and the routed experts of each layer
        from ..core.neuron_space import LayerLayout

        lays = [LayerLayout(*v) for v in layouts]
        per_part = {n: {str(la): [sum(lo <= i < hi for i in sets[n].layers[la].tolist()) if la in sets[n].layers else 0
                                  for _, lo, hi in lay.segments()] for la, lay in enumerate(lays) if lay.is_moe}
                    for n in names}
        result["per_expert"] = per_part
        atomic_write_text(out / "per_expert.json", json.dumps(
            {"parts": "[shared/dense part (when present), expert 0, expert 1, ...] per MoE layer",
             "counts": per_part}, indent=1))
        md += ["", "Neurons per MoE layer: shared part (S, when present), then each routed expert "
               "(per_expert.json):", ""]
        md += [f"- {n}: " + "; ".join(f"layer {la}: " + " ".join(
            (f"S={c}" if lays[int(la)].dense and j == 0 else f"E{j - (1 if lays[int(la)].dense else 0)}={c}")
            for j, c in enumerate(v)) for la, v in per_part[n].items()) for n in names if n.startswith(("MS/", "SS"))]
    if sets.extra.get("experts"):  # identify --method routing: the whole experts chosen per language
        result["experts"] = sets.extra["experts"]
        md += ["", "Experts chosen by routing z (identify --method routing):", ""]
        md += [f"- {lang}: " + ", ".join(f"layer {la} expert {e} (z {z:+.2f})" for la, e, z in v)
               for lang, v in sets.extra["experts"].items()]
    atomic_write_text(out / "summary.md", "\n".join(md) + "\n")

    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(langs), 0.8 + 0.6 * len(langs)))
    im = ax.imshow(jac, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(langs)))
    ax.set_xticklabels([n.removeprefix(overlap_prefix) for n in langs], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(langs)))
    ax.set_yticklabels([n.removeprefix(overlap_prefix) for n in langs], fontsize=8)
    for i, row in enumerate(jac):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.6 else "k")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title("Jaccard overlap")
    fig.tight_layout()
    _save(fig, out / "overlap.png")

    shown = [n for n in names if n.startswith("SS") or n == "MS/HR"] or names[:6]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * sets.num_layers + 2), 3.5))
    width = 0.8 / max(1, len(shown))
    for i, n in enumerate(shown):
        ax.bar([layer + i * width for layer in range(sets.num_layers)], per_layer[n], width, label=n)
    ax.set_xlabel("layer")
    ax.set_ylabel("neurons")
    ax.set_title("neurons per layer")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out / "per_layer.png")
    return result


def _num(v: float) -> float | None:
    """JSON-safe: NaN (no tokens, or no such expert) becomes null."""
    return None if v != v else round(float(v), 6)


def analyze_routing(stats, out_dir: str | Path, harmful: str = "harmful", harmless: str = "harmless",
                    top: int = 5) -> dict:
    """Router statistics of a mixture-of-experts model's stats file (ssn profile): per MoE
    layer, a row (language, or group) x expert heatmap of how often each expert is selected
    (routing_heatmap.png), and when the stats hold harmful and harmless prompts of a language,
    the routing z of each expert (harmful vs harmless, scorers/routing.py; routing_z.png) and
    the `top` experts that separate them most. Numbers in routing.json, routing.csv, routing.md."""
    import torch

    from .scorers import routing

    out = Path(out_dir)
    rows = routing.row_groups(stats)
    names = list(rows)
    keys = stats.meta.get("groups_by") or []
    pooled = routing.pooled(stats, rows)
    fp = stats.fingerprint
    layers = [layer for layer in range(stats.num_layers) if fp.layout(layer).experts]
    E = stats.num_experts
    z = {}
    if "language" in keys and "label" in keys:
        li, bi = keys.index("language"), keys.index("label")
        by = {(g.split("/")[li], g.split("/")[bi]): g for g in stats.groups}
        for lang in names:
            if (lang, harmful) in by and (lang, harmless) in by:
                z[lang] = routing.routing_z(stats, by[(lang, harmful)], by[(lang, harmless)])
    metrics = ("top1_rate", "topk_rate", "mean_weight")
    result = {"rows": names, "row_kind": "language" if "language" in keys else "group", "moe_layers": layers,
              "experts": E, "tokens": {n: int(pooled["tokens"][layers[0], r]) if layers else 0
                                       for r, n in enumerate(names)},
              **{m: {str(la): [[_num(v) for v in pooled[m][la, r].tolist()] for r in range(len(names))]
                     for la in layers} for m in metrics},
              **{m: {str(la): [_num(v) for v in pooled[m][la].tolist()] for la in layers}
                 for m in ("token_entropy", "usage_entropy")},
              "routing_z": {lang: {str(la): [_num(v) for v in t[la].tolist()] for la in layers}
                            for lang, t in z.items()},
              "separating": {lang: [[la, e, _num(v)] for la, e, v in routing.top_experts(t, k=top, sign="abs")]
                             for lang, t in z.items()},
              "harmful": harmful, "harmless": harmless}
    atomic_write_text(out / "routing.json", json.dumps(result, indent=1))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["layer", result["row_kind"], "expert", *metrics, "routing_z"])
    for la in layers:
        for r, n in enumerate(names):
            for e in range(fp.layout(la).experts):
                zz = z[n][la, e] if n in z else float("nan")
                w.writerow([la, n, e, *(f"{float(pooled[m][la, r, e]):.6f}" for m in metrics), f"{float(zz):.4f}"])
    atomic_write_text(out / "routing.csv", buf.getvalue())

    md = ["# Router statistics", "", f"model: {stats.meta.get('model_name')}; MoE layers {layers}, {E} experts; "
          f"rows: {result['row_kind']}s; selection rate = share of tokens routed to the expert (top-k)", ""]
    md += ["| layer | " + " | ".join(f"{n} H_token / H_usage" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    md += [f"| {la} | " + " | ".join(f"{float(pooled['token_entropy'][la, r]):.3f} / "
                                     f"{float(pooled['usage_entropy'][la, r]):.3f}" for r in range(len(names))) + " |"
           for la in layers]
    if z:
        md += ["", f"Experts whose selection separates {harmful} from {harmless} most (routing z, |z| ranked; "
               "a ranking, not a p-value):", "", "| language | layer | expert | z |", "|---|---|---|---|"]
        md += [f"| {lang} | {la} | {e} | {v:+.2f} |" for lang, rows_ in result["separating"].items()
               for la, e, v in rows_ if v is not None]
    atomic_write_text(out / "routing.md", "\n".join(md) + "\n")

    if layers:
        _heatmaps(out / "routing_heatmap.png", [pooled["topk_rate"][la] for la in layers], layers, names,
                  "selection rate", "viridis", 0.0, None)
        if z:
            zs = [torch.stack([z[lang][la] for lang in z]) for la in layers]
            lim = max(1.0, max(float(t.nan_to_num(0).abs().max()) for t in zs))
            _heatmaps(out / "routing_z.png", zs, layers, list(z), f"routing z ({harmful} vs {harmless})", "coolwarm",
                      -lim, lim)
    return result


def analyze_files(neurons: str | None, stats: str | None, out: str, harmful: str = "harmful",
                  harmless: str = "harmless"):
    """`ssn analyze`: the report of a neuron set file and/or the router statistics of an MoE
    model's stats file, under `out`; yields its summary lines as each part is written."""
    if not (neurons or stats):
        raise SSNError("ssn analyze needs --neurons (a neuron set file) and/or --stats (an MoE model's stats)")
    loaded = NeuronStats.load(stats) if stats else None
    if loaded is not None and loaded.route_topk is None:
        raise SSNError(f"--stats {stats}: no router statistics (they come from profiling a mixture-of-experts "
                       "model); for a dense model, analyze its neuron sets (--neurons)")
    if neurons:
        res = analyze(NeuronSetFile.load(neurons), out)
        yield f"wrote {out}/ (summary.md, overlap.png, per_layer.png, CSV/JSON)"
        for n, v in res["sizes"].items():
            yield f"  {n:<10} {v:>7} neurons ({100 * res['share_of_neurons'][n]:.3f}%)"
    if loaded is not None:
        r = analyze_routing(loaded, out, harmful=harmful, harmless=harmless)
        plots = "routing_heatmap.png" + (", routing_z.png" if r["routing_z"] else "")
        yield (f"wrote {out}/ (routing.md, {plots}, routing.csv/json): router statistics of MoE layers "
               f"{r['moe_layers']}, {r['experts']} experts, {len(r['rows'])} {r['row_kind']}s")
        for lang, top in r["separating"].items():
            yield (f"  {lang:<10} most separating experts ({harmful} vs {harmless}): "
                   + ", ".join(f"L{la}/E{e} z={v:+.2f}" for la, e, v in top[:3] if v is not None))


def _heatmaps(path: Path, mats: list, layers: list[int], rows: list[str], label: str, cmap: str, vmin, vmax) -> None:
    """One row x expert heatmap per MoE layer, side by side."""
    plt = _plt()
    cols = min(4, len(mats))
    nrows = -(-len(mats) // cols)
    E = mats[0].shape[1]
    fig, axes = plt.subplots(nrows, cols, squeeze=False, layout="constrained",
                             figsize=(1.5 + cols * (1.5 + min(0.25 * E, 8.0)),
                                      0.6 + nrows * (1.2 + min(0.3 * len(rows), 6.0))))
    top = vmax if vmax is not None else max(float(m.nan_to_num(0).max()) for m in mats) or 1.0
    for ax, m, la in zip(axes.flat, mats, layers, strict=False):
        im = ax.imshow(m.float().numpy(), vmin=vmin, vmax=top, cmap=cmap, aspect="auto")
        ax.set_title(f"layer {la}", fontsize=8)
        ax.set_xlabel("expert", fontsize=7)
        ax.set_xticks(range(E) if E <= 16 else range(0, E, max(1, E // 8)))
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(rows, fontsize=6)
        ax.tick_params(axis="x", labelsize=6)
    for ax in list(axes.flat)[len(mats):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.05, label=label)
    fig.suptitle(f"{label}: rows x experts, per MoE layer", fontsize=9)
    _save(fig, path)
