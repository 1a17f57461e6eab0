"""`ssn serve`: an OpenAI-compatible server for the base model, neuron masks and patches.

Mask profiles share the base model's engine: each batch row picks its mask in the fused
kernels, so requests of different mask profiles are batched together. A patch profile
changes weights, which rows cannot select, so it runs as its own model instance (the
patch merged into a copy of the weights) with its own engine.
"""

from __future__ import annotations

import copy
from pathlib import Path

from ..errors import SSNError
from .app import ServerConfig, create_app
from .engine import Engine
from .metrics import Metrics


def profile_kind(path: str | Path) -> str:
    p = Path(path)
    if (p / "mask_config.json").is_file():
        return "mask"
    if (p / "patch_config.json").is_file():
        return "patch"
    raise SSNError(f"profile {path} is neither a neuron mask folder (mask_config.json) nor a neuron patch folder "
                   "(patch_config.json)")


def build_server(model_path: str, profiles: dict[str, str], served_name: str | None = None, dtype="auto",
                 device: str | None = None, api_key: str | None = None, max_batch: int = 16, queue_size: int = 64,
                 request_timeout: float = 60.0, default_max_tokens: int = 64):
    """(FastAPI app, engines): everything validated and loaded, engines started."""
    from ..loading import load_model, load_tokenizer
    from ..masks import NeuronMask
    from ..patches import NeuronPatch, merge_patch
    from ..runtime import attach

    for name in profiles:
        if not name or ":" in name or name == "base":
            raise SSNError(f"profile name {name!r} is not allowed (no ':' and not 'base')")
    kinds = {name: profile_kind(path) for name, path in profiles.items()}
    model = load_model(model_path, dtype=dtype, device=device)
    tok = load_tokenizer(model_path)
    masks = {name: NeuronMask.load(profiles[name], model=model) for name, k in kinds.items() if k == "mask"}
    patches = {name: NeuronPatch.load(profiles[name], model=model) for name, k in kinds.items() if k == "patch"}
    metrics = Metrics()
    copies = {name: copy.deepcopy(model) for name in patches}  # before attaching: plain modules copy cleanly
    handle = attach(model)
    names = handle.set_masks(masks) if masks else ["base"]
    base = Engine(model, tok, handle, names, max_batch, queue_size, metrics=metrics, name="base").start()
    engines = {"base": base, **{n: base for n in masks}}
    for name, patch in patches.items():
        merge_patch(copies[name], patch)
        engines[name] = Engine(copies[name], tok, attach(copies[name]), ["base"], max_batch, queue_size,
                               metrics=metrics, name=f"patch:{name}").start()
    cfg = ServerConfig(base_name=served_name or Path(model_path).name, api_key=api_key,
                       request_timeout=request_timeout, default_max_tokens=default_max_tokens, engines=engines)
    return create_app(cfg, metrics), engines
