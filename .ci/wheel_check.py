"""Checks an installed ssn-runtime wheel from outside the source tree (run by `make wheel-check`).

An editable install hides what a wheel leaves out (a hand-kept package list once shipped
neither `ssn_runtime.serve` nor `ssn_runtime.organism`): import every module of the
installed package, check that its C++ kernels were built, find its resources, and run the
console script's main commands.
"""

import importlib
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import ssn_runtime

src = Path(__file__).resolve().parents[1]
installed = Path(ssn_runtime.__file__).resolve().parent
# The check's venv lives under build/ in the checkout: what matters is that the package comes
# from the venv's site-packages, not from the source folder.
assert installed != src / "ssn_runtime" and "site-packages" in installed.parts, \
    f"ssn_runtime was imported from the source tree ({installed}), not the wheel"

modules = [m.name for m in pkgutil.walk_packages(ssn_runtime.__path__, "ssn_runtime.")]
for name in ("ssn_runtime.core", "ssn_runtime.science", "ssn_runtime.science.scorers", "ssn_runtime.training",
             "ssn_runtime.serve", "ssn_runtime.organism"):
    assert name in modules, f"{name} is missing from the wheel"
for name in modules:
    if name.endswith("__main__"):
        continue
    importlib.import_module(name)
import ssn_kernels.args  # noqa: E402,F401  (kernels/ installs as ssn_kernels)
import ssn_kernels.reference  # noqa: E402,F401

# The C++ kernels build optionally (no compiler: the torch backend), so a build that fails for
# want of a file (a header the sdist left out) fails silently; CI has a compiler, so it must build.
from ssn_runtime.core import cpp_ops  # noqa: E402

assert cpp_ops.available(), f"the C++ kernels were not built into the wheel: {cpp_ops.IMPORT_ERROR}"

resources = installed / "resources"
assert (resources / "refusal_lexicon.json").is_file(), "resources/refusal_lexicon.json is missing from the wheel"

ssn = shutil.which("ssn", path=str(Path(sys.executable).parent))
assert ssn, "the `ssn` console script was not installed"
for args in (["info"], ["demo", "--help"], ["serve", "--help"], ["profile", "--help"]):
    r = subprocess.run([ssn, *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"ssn {' '.join(args)} failed: {r.stderr[-2000:]}"
print(f"wheel check: {len(modules)} modules import from {installed}; C++ kernels built; "
      "ssn info/demo/serve/profile --help run")
