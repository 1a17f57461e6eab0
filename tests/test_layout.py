"""The package layout is the architecture (docs/architecture.md): each layer imports only from
the layers below it, and no module imports another module's private name."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "ssn_runtime"
# Layers, bottom up. Top-level modules not listed under "apps" are shared foundations.
RANK = {"foundations": 0, "core": 1, "science": 2, "training": 3, "serve": 4, "organism": 4, "apps": 5}
APPS = {"cli", "demo", "walkthrough", "info", "__main__", "__init__"}
# The runtime is handed masks and patches as intervention arguments and converts them to its
# device form; it imports their classes inside the converting functions only.
ALLOWED_UP = {("ssn_runtime.core.runtime", "ssn_runtime.science.masks"),
              ("ssn_runtime.core.runtime", "ssn_runtime.training.patches")}


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in RANK:
        return parts[1]
    return "apps" if len(parts) == 1 or parts[1] in APPS else "foundations"


def _imports():
    """(importing module, imported module, names, line) for every import inside ssn_runtime."""
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_pkg else parts)
        package = module if is_pkg else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    sub = f"{target}.{alias.name}" if node.module is None else target
                    yield module, sub, alias.name, node.lineno
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ssn_runtime"):
                for alias in node.names:
                    yield module, node.module, alias.name, node.lineno


def test_layers_import_only_downwards():
    wrong = []
    for module, target, _, line in _imports():
        a, b = _layer(module), _layer(target)
        if a == "apps" and module.count(".") == 0:
            continue  # the package __init__ re-exports the main objects of every layer
        if RANK[b] > RANK[a] and (module, target) not in ALLOWED_UP:
            wrong.append(f"{module}:{line} ({a}) imports {target} ({b})")
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_another_modules_private_name():
    wrong = [f"{m}:{line} imports {name} from {t}" for m, t, name, line in _imports()
             if name.startswith("_") and not name.startswith("__") and t != m and name != "_cpu_kernels"]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("layer", ["core", "science", "training"])
def test_each_layer_is_a_documented_package(layer):
    assert (ROOT / layer / "__init__.py").read_text().startswith('"""')
    assert f"`{layer}/" in (ROOT.parent / "docs" / "architecture.md").read_text()


def test_main_objects_are_reexported_without_hiding_a_module():
    import importlib

    import ssn_runtime

    homes = {"profile": "science.profiler", "identify": "science.identify", "train": "training.train",
             "fused_act": "core.fused_act", "NeuronStats": "science.stats", "NeuronSetFile": "science.neuron_sets",
             "NeuronMask": "science.masks", "NeuronPatch": "training.patches", "attach": "core.runtime"}
    for name, home in homes.items():
        assert getattr(ssn_runtime, name) is getattr(importlib.import_module(f"ssn_runtime.{home}"), name)
        assert not (ROOT / f"{name}.py").exists()  # no top-level module of that name to hide
    assert set(ssn_runtime.__all__) <= set(dir(ssn_runtime))
