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

from .io import atomic_write_text
from .neuron_sets import NeuronSetFile


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
