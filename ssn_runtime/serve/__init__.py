"""`ssn serve`: an OpenAI-compatible server for the base model, neuron masks and patches.

Every profile is a per-row variant of the one loaded model (runtime `intervene(variants=...)`):
a mask is applied inside the fused kernels, a patch adds its gate/up row deltas and down column
deltas for the rows that use it, and a profile may hold one of each (they compose per row).
No profile copies the weights: adding a patch profile costs the patch's size. One engine
(engine.py) batches the requests of all profiles together with continuous batching.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import SSNError
from .app import ServerConfig, create_app
from .engine import Draining, Engine, GenRequest, QueueFull
from .metrics import Metrics

__all__ = ["Draining", "Engine", "GenRequest", "Metrics", "QueueFull", "ServerConfig", "build_server",
           "create_app", "load_variants", "parse_profiles", "profile_kind", "serve_forever"]


def profile_kind(path: str | Path) -> str:
    p = Path(path)
    if (p / "mask_config.json").is_file():
        return "mask"
    if (p / "patch_config.json").is_file():
        return "patch"
    raise SSNError(f"profile {path} is neither a neuron mask folder (mask_config.json) nor a neuron patch folder "
                   "(patch_config.json)")


def parse_profiles(profiles: dict[str, str]) -> dict[str, dict[str, str]]:
    """{name: {"mask": folder, "patch": folder}} from {name: "PATH" or "PATH,PATH"}: at most one
    mask and one patch folder per profile (they compose per row). Checked before any loading."""
    out = {}
    for name, spec in profiles.items():
        if not isinstance(name, str) or not name or ":" in name or name == "base" or not name.isprintable():
            raise SSNError(f"profile name {name!r} is not allowed (printable, no ':' and not 'base')")
        parts = str(spec).split(",")
        if not all(parts) or len(parts) > 2:
            raise SSNError(f"profile {name}: give one folder, or a mask folder and a patch folder separated by a "
                           f"comma, not {spec!r}")
        found: dict[str, str] = {}
        for path in parts:
            kind = profile_kind(path)
            if kind in found:
                raise SSNError(f"profile {name}: two {kind} folders ({found[kind]} and {path}); a profile holds at "
                               "most one mask and one patch")
            found[kind] = path
        out[name] = found
    return out


def load_variants(profiles: dict[str, str], model) -> dict:
    """{name: runtime.Variant} from {name: "PATH" or "PATH,PATH"}, each validated against `model`."""
    from ..masks import NeuronMask
    from ..patches import NeuronPatch
    from ..runtime import Variant

    return {name: Variant(mask=NeuronMask.load(f["mask"], model=model) if "mask" in f else None,
                          patch=NeuronPatch.load(f["patch"], model=model) if "patch" in f else None)
            for name, f in parse_profiles(profiles).items()}


def build_server(model_path: str, profiles: dict[str, str], served_name: str | None = None, dtype="auto",
                 device: str | None = None, api_key: str | None = None, max_batch: int = 16, queue_size: int = 64,
                 request_timeout: float = 60.0, default_max_tokens: int = 64, gather_ms: float = 5.0,
                 max_prefill_tokens: int = 4096, public_metrics: bool = False):
    """(FastAPI app, engine): everything validated and loaded, the engine started."""
    from ..loading import load_model, load_tokenizer
    from ..runtime import attach

    for flag, value in (("max-batch", max_batch), ("queue-size", queue_size),
                        ("default-max-tokens", default_max_tokens), ("max-prefill-tokens", max_prefill_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SSNError(f"--{flag} must be an integer >= 1, got {value!r}")
    for flag, value in (("request-timeout", request_timeout), ("gather-ms", gather_ms)):
        if not (value >= 0 and value < float("inf")) or (flag == "request-timeout" and value == 0):
            raise SSNError(f"--{flag} must be a finite number {'> 0' if flag == 'request-timeout' else '>= 0'}, "
                           f"got {value!r}")
    parse_profiles(profiles)  # a bad spec fails before the model is loaded
    model = load_model(model_path, dtype=dtype, device=device)
    tok = load_tokenizer(model_path)
    variants = load_variants(profiles, model)
    metrics = Metrics()
    handle = attach(model)
    engine = Engine(model, tok, handle, variants, max_batch=max_batch, queue_size=queue_size, gather_ms=gather_ms,
                    max_prefill_tokens=max_prefill_tokens, metrics=metrics, name="base").start()
    cfg = ServerConfig(base_name=served_name or Path(str(model_path)).name, engine=engine, api_key=api_key,
                       request_timeout=request_timeout, default_max_tokens=default_max_tokens,
                       public_metrics=public_metrics)
    return create_app(cfg, metrics), engine


def serve_forever(app, engine: Engine, host: str, port: int, grace_s: float = 30.0, log_level: str = "warning") -> None:
    """Run uvicorn until SIGTERM/SIGINT. Then: stop accepting (the listening socket closes and
    requests on open connections get 503), let accepted rows finish for up to `grace_s`
    seconds, cut the rest (503, or an error event on a stream), and return."""
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            engine.drain(grace_s)
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal once shut down (the process then dies of it); a drained
            # server has shut down as asked, so it exits normally (status 0) instead.
            self._captured_signals.clear()

    # uvicorn waits for open connections up to its own timeout: the grace period plus time to
    # deliver the cut rows' answers.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace_s + 2)
    try:
        _Server(config).run()
    finally:
        engine.stop()
