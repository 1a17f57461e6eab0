"""ssn_kernels: the Triton kernels of ssn-runtime (source folder `kernels/`).

Installed under the import name `ssn_kernels`, never `kernels`: a PyPI package of that
name exists and transformers probes for it. Each kernel module holds the kernels and
their launchers; `reference` holds the float64 torch formulas they are tested against;
`args` the typed argument contracts (MaskArgs, StatsTarget) every backend consumes;
`aot` ahead-of-time builds for sm_80/sm_90. Importing a kernel module needs triton;
`reference`, `args` and `common` do not.
"""
