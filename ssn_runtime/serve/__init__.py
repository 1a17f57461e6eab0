"""`ssn serve`: an OpenAI-compatible server for the base model, neuron masks and patches.

Every profile is a per-row variant of the one loaded model (runtime `intervene(variants=...)`):
a mask is applied inside the fused kernels, a patch adds its gate/up row deltas and down column
deltas for the rows that use it, and a profile may hold one of each (they compose per row).
No profile copies the weights: adding a patch profile costs the patch's size. One engine
(engine.py) batches the requests of all profiles together with continuous batching; by default
it runs in a process of its own beside the HTTP front end (engine_process.py).
"""

from __future__ import annotations

import gc
from pathlib import Path

from ..core import affinity
from ..errors import SSNError
from .app import ServerConfig, create_app
from .config import ServeConfig, parse_profile_args
from .engine import STEP_ROWS_FLOOR, STEP_ROWS_PER_ROW, THREAD_ROWS, Draining, Engine, GenRequest, QueueFull
from .metrics import Metrics

__all__ = ["Draining", "Engine", "GenRequest", "Metrics", "QueueFull", "ServeConfig", "ServerConfig",
           "build_server", "create_app", "load_engine", "load_variants", "parse_profile_args", "parse_profiles",
           "profile_kind", "run", "serve_forever"]


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
    from ..core.runtime import Variant
    from ..science.masks import NeuronMask
    from ..training.patches import NeuronPatch

    return {name: Variant(mask=NeuronMask.load(f["mask"], model=model) if "mask" in f else None,
                          patch=NeuronPatch.load(f["patch"], model=model) if "patch" in f else None)
            for name, f in parse_profiles(profiles).items()}


def load_engine(model_path: str, profiles: dict[str, str], config: ServeConfig, dtype="auto",
                device: str | None = None, metrics: Metrics | None = None) -> Engine:
    """The model, its tokenizer and profiles loaded and validated, and an engine started on them."""
    from ..core.loading import load_model, load_tokenizer
    from ..core.runtime import attach

    parse_profiles(profiles)  # a bad spec fails before the model is loaded
    model = load_model(model_path, dtype=dtype, device=device)
    tok = load_tokenizer(model_path)
    variants = load_variants(profiles, model)
    return Engine(model, tok, attach(model), variants, max_batch=config.max_batch, queue_size=config.queue_size,
                  gather_ms=config.gather_ms, max_prefill_tokens=config.max_prefill_tokens,
                  prefill_steps=config.prefill_steps, step_tokens=config.step_tokens, metrics=metrics or Metrics(),
                  name="base", prefix_cache_mb=config.prefix_cache_mb,
                  small_batch_gemm=config.small_batch_gemm, layout=config.layout,
                  threads=config.threads).start()


def build_server(model_path: str, profiles: dict[str, str], config: ServeConfig | None = None, dtype="auto",
                 device: str | None = None):
    """(FastAPI app, engine): everything validated and loaded, the engine started (in a process
    of its own with `config.engine_process`)."""
    config = config or ServeConfig()
    parse_profiles(profiles)  # a bad spec fails before the model is loaded
    metrics = Metrics()
    if config.engine_process:
        from .engine_process import EngineProcess

        engine = EngineProcess(model_path, profiles, config, dtype, device, metrics)
    else:
        engine = load_engine(model_path, profiles, config, dtype, device, metrics)
    cfg = ServerConfig(base_name=config.served_name or Path(str(model_path)).name, engine=engine,
                       api_key=config.key(), request_timeout=config.request_timeout,
                       default_max_tokens=config.default_max_tokens, public_metrics=config.public_metrics)
    return create_app(cfg, metrics), engine


def small_batch_summary(engine) -> str:
    """Which small-batch form the engine's linear layers take for which row counts, and what the
    start-up timing read (core/small_batch_linear.py)."""
    n, t = engine.native_rows, engine.small_batch_rows
    parts = ([f"C++ product for 1{f'-{n}' if n > 1 else ''} row{'s' if n > 1 else ''}"] if n else []) \
        + ([f"(W @ x^T)^T for {max(n + 1, 2)}-{t} rows"] if t > n else [])
    timed = ", ".join(f"{form} at {rows}: {r:.2f}x" for (form, rows), r in engine.small_batch_ratios.items())
    return ("; ".join(parts) or "F.linear") + (f" (time over F.linear's: {timed})" if timed else "")


def step_summary(engine) -> str:
    """How many token rows a step computes while rows decode (Engine's step_tokens)."""
    if engine.layout != "packed":
        return "joins prefill in steps of their own (padded layout)"
    if engine.step_tokens is None:
        return "a step's prompt tokens bounded by --max-prefill-tokens alone"
    if engine.step_tokens == "auto":
        return f"a step computes at most {STEP_ROWS_PER_ROW:g} x its decoding rows (counted as at least " \
            f"{STEP_ROWS_FLOOR}) token rows while rows decode"
    return f"a step computes at most {engine.step_tokens} token rows while rows decode"


def place_front_end(engine) -> str:
    """Keep this process (the front end) on the cores the engine process left it (--engine-cores;
    core/affinity.py), and say where each runs. Called by `ssn serve` only: a program that
    builds a server inside its own process keeps its cores."""
    placement = getattr(engine, "placement", None) or {"cores": None, "why": "the engine is a thread of this process"}
    if placement["cores"] is None:
        return f"engine and front end on the scheduler's cores ({placement['why']})"
    where = f"engine on cores {affinity.format_cpu_list(placement['cores'])}; front end on "
    if not placement["front"]:
        return where + "the same cores (the list leaves none)"
    front = affinity.format_cpu_list(placement["front"])
    try:
        affinity.pin_process(placement["front"])
    except OSError as exc:
        return where + f"the scheduler's cores (the kernel refused {front}: {exc})"
    return where + front


def threads_summary(engine) -> str:
    """The worker's intra-op threads and, where timed ("auto"), each count's forward time over the
    fastest's (core/threads.py)."""
    times = engine.thread_times
    if not times:
        return str(engine.threads)
    best = min(times.values())
    timed = ", ".join(f"{n}: {t / best:.2f}x" for n, t in times.items())
    return f"{engine.threads} (a {min(THREAD_ROWS, engine.max_batch)}-row forward's time over the fastest count's: " \
        f"{timed})"


def run(model_path: str, profile_specs: list[str], config: ServeConfig, dtype="auto",
        device: str | None = None) -> None:
    """`ssn serve`: load, say where it serves, serve until SIGTERM/SIGINT (then drain)."""
    profiles = parse_profile_args(profile_specs)
    app, engine = build_server(model_path, profiles, config, dtype, device)
    names = ", ".join(["base", *profiles])
    print(f"serving {config.served_name or model_path} ({names}) on http://{config.host}:{config.port}/v1"
          + (" (API key required)" if config.key() else "") + f"; HTTP: {http_stack()}", flush=True)
    print(f"small-batch linear layers: {small_batch_summary(engine)} (--small-batch-gemm {config.small_batch_gemm}); "
          f"KV layout: {engine.layout}; {step_summary(engine)} (--step-tokens {config.step_tokens})", flush=True)
    print(f"decode worker threads: {threads_summary(engine)} (--threads {config.threads})"
          + (f"; engine in a process of its own (pid {engine.pid}); {place_front_end(engine)}"
             if config.engine_process else "; engine in the front end's process"), flush=True)
    # Everything loaded so far (the model, tokenizer, tables: hundreds of thousands of objects)
    # lives as long as the server: out of the collector's sight, a full collection scans only
    # what requests create, instead of stalling every stream at once while it walks them all.
    gc.collect()
    gc.freeze()
    serve_forever(app, engine, config.host, config.port, config.shutdown_grace)


def http_stack() -> str:
    """What uvicorn's "auto" settings take here: its C HTTP parser and libuv event loop where
    installed (dependencies of this package), else its pure-Python parser and asyncio's loop."""
    from importlib.util import find_spec

    return (f"{'httptools' if find_spec('httptools') else 'h11'} parser, "
            f"{'uvloop' if find_spec('uvloop') else 'asyncio'} event loop")


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
