"""Load local Hugging Face checkpoints (safetensors only) with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import SSNError
from .adapters import adapter_for, is_moe_type, registered_model_types
from .moe import moe_model_types

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def parse_dtype(dtype) -> torch.dtype | str:
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise SSNError(f"dtype {dtype!r} is not supported; use one of auto, {', '.join(sorted(set(_DTYPES)))}")


def check_checkpoint(path: str | Path) -> dict:
    """Validate a causal-LM checkpoint folder before any weight is read; returns its config dict."""
    config = check_checkpoint_files(path)
    folder = Path(path).expanduser()
    model_type = config.get("model_type", "")
    if is_moe_type(model_type):
        raise SSNError(f"{folder}: mixture-of-experts model_type {model_type!r} is not supported yet (supported "
                       f"mixture-of-experts families: {', '.join(moe_model_types())})")
    if adapter_for(model_type) is None and model_type not in registered_model_types():
        archs = ",".join(config.get("architectures") or ["?"])
        raise SSNError(
            f"{folder}: architecture {archs} (model_type {model_type!r}) has no neuron-site adapter; supported: "
            f"{', '.join(registered_model_types())}; or register one (README, 'Adding an architecture')"
        )
    for weights in sorted(folder.glob("model*.safetensors")):
        _check_safetensors_header(weights)
    return config


def check_checkpoint_files(path: str | Path) -> dict:
    """A folder with config.json and safetensors weights (no pickle); returns the config dict."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise SSNError(f"model folder not found: {folder} (give the path of a local Hugging Face checkpoint folder)")
    if not folder.is_dir():
        raise SSNError(f"{folder} is a file; give the checkpoint folder that holds config.json and *.safetensors")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise SSNError(f"{folder} has no config.json; it is not a Hugging Face checkpoint folder")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise SSNError(f"{config_file} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(config, dict):
        raise SSNError(f"{config_file} must hold a JSON object")
    has_safetensors = any(folder.glob("*.safetensors"))
    if not has_safetensors:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise SSNError(
                f"{folder} holds only pickle weights ({', '.join(pickles[:3])}); ssn-runtime loads safetensors only, "
                "because unpickling can run arbitrary code: convert the checkpoint to safetensors first"
            )
        raise SSNError(f"{folder} has no *.safetensors weight files")
    return config


def _check_safetensors_header(path: Path) -> None:
    """Refuse a weight file that is not safetensors (e.g. a pickle renamed .safetensors)
    before transformers reads it: the header is an 8-byte little-endian length, then JSON."""
    import struct

    try:
        with path.open("rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            size = path.stat().st_size
            ok = 2 <= n <= min(size - 8, 100_000_000)
            if ok:
                header = json.loads(f.read(n))
                ok = isinstance(header, dict)
    except (OSError, ValueError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise SSNError(f"{path} is not a safetensors file (bad header); if it is a renamed pickle, convert the "
                       "checkpoint to safetensors: ssn-runtime never unpickles")


def resolve_gguf(path: str | Path) -> str | Path:
    """A `.gguf` file's converted checkpoint folder (converted into the cache on first use); other paths as given."""
    if Path(path).suffix.lower() == ".gguf" and not Path(path).expanduser().is_dir():
        from .convert import gguf_checkpoint

        return gguf_checkpoint(path)
    return path


def default_device(device: str | None = None) -> str:
    """`device`, or "cuda" when a GPU is present and "cpu" otherwise (profiling and attribution
    want the GPU; evaluation and training run where the caller says, cpu by default)."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_model(path: str | Path, dtype="auto", device: str | torch.device | None = None, device_map=None):
    """Load a local checkpoint folder as an AutoModelForCausalLM in eval mode.

    `path` may also be a `.gguf` file: it is converted once into the cache (convert.py).
    `dtype`: "auto" (the checkpoint's), "float32", "bfloat16" or "float16".
    `device`: one device ("cpu", "cuda", "cuda:1"); `device_map`: transformers'
    device map ("auto" splits layers across GPUs; needs accelerate). Not both.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_gguf(path)
    check_checkpoint(path)
    torch_dtype = parse_dtype(dtype)
    if device is not None and device_map is not None:
        raise SSNError("give device or device_map, not both")
    kwargs = {"dtype": torch_dtype, "use_safetensors": True, "local_files_only": True}
    if device_map is not None:
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise SSNError("device_map needs the accelerate package: pip install accelerate") from None
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(str(Path(path).expanduser()), **kwargs)
    except Exception as exc:  # noqa: BLE001 - any loader failure (safetensors, config, shapes) is one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise SSNError(f"could not load {path}: {type(exc).__name__}: {first}"[:400]) from None
    if device is not None:
        try:
            model = model.to(device)
        except (RuntimeError, AssertionError) as exc:
            raise SSNError(f"cannot move the model to {device!r}: {str(exc).splitlines()[0]}") from None
    return model.eval()


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    path = resolve_gguf(path)
    check_checkpoint(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(Path(path).expanduser()), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise SSNError(f"could not load a tokenizer from {path}: {str(exc).splitlines()[0]}") from None
    if getattr(tok, "clean_up_tokenization_spaces", False) and not cleans_up(tok):
        # asked for, and skipped by transformers for a BPE model, with a warning at the first decode
        # (SmolLM2's): the same text without it
        tok.clean_up_tokenization_spaces = False
    return tok


def cleans_up(tokenizer) -> bool:
    """Whether the tokenizer's decode cleans up spaces (" ." -> "."), changing the Rust
    tokenizer's text: where asked to, except for a BPE model in a transformers that skips the
    cleanup there (it strips real spaces: SmolLM2's tokenizer asks for it, and gets none)."""
    if not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return False
    force = "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return not (hasattr(tokenizer, force) and not getattr(tokenizer, force)
                and type(getattr(backend, "model", None)).__name__ == "BPE")

