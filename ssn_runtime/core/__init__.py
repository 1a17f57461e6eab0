"""The core runtime: where a model's MLP neurons live (adapters, neuron space, mixture-of-experts
sites), attaching to a model with scoped interventions (runtime), and the fused activation op
with its backends (fused_act, backends, cpp_ops) and sparse patch deltas (sparse_ops).

Nothing here knows about languages, statistics files or training; masks and patches reach the
runtime as intervention arguments (`handle.intervene(mask=..., patch=...)`)."""
