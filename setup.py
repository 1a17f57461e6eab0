"""Builds the optional C++ CPU kernels (csrc/). Metadata lives in pyproject.toml.

A failed native build must not fail `pip install`: the runtime then falls back to
its torch backend, and `ssn info` says so.
"""

import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup


class OptionalBuildExt(build_ext):
    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler failure means "no native backend"
            print(f"warning: C++ kernels not built ({exc}); ssn-runtime will use its torch backend",
                  file=sys.stderr)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            print(f"warning: could not build {ext.name} ({exc}); using the torch backend", file=sys.stderr)


ext_modules = [
    Pybind11Extension(
        "ssn_runtime._cpu_kernels",
        ["csrc/packed_cache.cpp", "csrc/bindings.cpp", "csrc/fused_act.cpp", "csrc/gemv.cpp", "csrc/logits_scan.cpp",
         "csrc/row_patch.cpp", "csrc/transpose.cpp"],
        include_dirs=["csrc"],
        cxx_std=17,
        # -fno-trapping-math lets GCC if-convert the branch-free exp and vectorise it.
        extra_compile_args=["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"],
        extra_link_args=["-fopenmp"],
    )
]

# Every ssn_runtime subpackage is found (a hand-kept list once left `serve` and `organism` out of
# the wheel); kernels/ installs under the import name `ssn_kernels`.
packages = find_packages(include=["ssn_runtime", "ssn_runtime.*"]) + ["ssn_kernels"]

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt}, packages=packages,
      package_dir={"ssn_kernels": "kernels"})
