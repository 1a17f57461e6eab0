"""GGUF import: a llama.cpp model file becomes a standard safetensors checkpoint folder.

    ssn convert MODEL.gguf OUT/                  # config.json, model.safetensors, tokenizer, chat template
    load_model("MODEL.gguf")                     # the same, converted once into the cache, keyed by the file's hash

transformers reads GGUF and dequantizes every tensor to float32, but refuses to save a
model it loaded that way ("quantized with GGUF"), so the weights are copied into a fresh
model of the same config without `quantization_config` and that one is saved. The
written folder is then loaded back and its logits compared with the GGUF-loaded model's
on a fixed chat prompt: bit-equal in float32, or the conversion fails. Everything is
written to a temporary sibling folder renamed into place, so a reader (or a concurrent
conversion of the same file) never sees a half-written checkpoint.

Needs the optional extra `gguf` (the `gguf` and `accelerate` packages):
`pip install 'ssn-runtime[gguf]'`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import time
from pathlib import Path

import torch

from ..errors import SSNError
from ..io import atomic_folder, atomic_write_text

EXTRA_HINT = "pip install 'ssn-runtime[gguf]' (the gguf and accelerate packages)"
PROVENANCE = "ssn_convert.json"
FORMAT = "ssn-gguf-conversion"
VERSION = 1
_MAGIC = b"GGUF"
# A fixed prompt for the logit check, in several scripts so the whole tokenizer path is exercised.
_SPECIAL = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown", "pad_token": "padding"}
_CHECK_TEXT = "Hello! Ciao, xin chào, 你好, مرحبا, 안녕하세요, สวัสดี, হ্যালো, habari, sugeng enjing."


def require_extra() -> None:
    """Raise one line naming the extra when `gguf` or `accelerate` is missing."""
    missing = []
    for mod in ("gguf", "accelerate"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise SSNError(f"reading GGUF files needs {' and '.join(missing)}: {EXTRA_HINT}")


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _check_file(path: Path) -> None:
    if not path.exists():
        raise SSNError(f"GGUF file not found: {path}")
    if not path.is_file():
        raise SSNError(f"{path} is not a file; give the path of a .gguf model file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != _MAGIC:
        raise SSNError(f"{path} is not a GGUF file (it starts with {magic!r}, not {_MAGIC!r})")


def supported_quant_types() -> set[str]:
    """GGML tensor types gguf-py can dequantize (float types plus the quantized ones it implements)."""
    from gguf import quants

    return {"F32", "F16"} | {t.name for t in quants._type_traits}


def inspect_gguf(path: str | Path) -> dict:
    """Architecture, transformers model_type, tensor types and counts of a GGUF file; raises
    one line for a file this project cannot convert (architecture, quantization type, adapter).
    Reads only the header and tensor index, not the weights."""
    from .adapters import registered_model_types

    path = Path(path).expanduser()
    _check_file(path)
    require_extra()
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES, load_gguf_checkpoint

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - gguf raises ValueError/struct.error/IndexError on bad files
        raise SSNError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {str(exc)[:120]})") from None
    field = reader.fields.get("general.architecture")
    if field is None:
        raise SSNError(f"{path}: GGUF metadata has no general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
    special = {}
    for name, key in _SPECIAL.items():
        f = reader.fields.get(f"tokenizer.ggml.{key}_token_id")
        if f is not None:
            special[name] = int(f.contents())
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    bad = sorted(set(types) - supported_quant_types())
    if bad:
        raise SSNError(f"{path}: tensor type(s) {', '.join(bad)} cannot be dequantized by gguf "
                       f"{_version('gguf')}; supported: {', '.join(sorted(supported_quant_types()))}")
    try:
        cfg = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    except ValueError as exc:
        if "not supported" in str(exc):
            raise SSNError(f"{path}: GGUF architecture {arch!r} is not supported by transformers "
                           f"{_version('transformers')} (supported: {', '.join(GGUF_SUPPORTED_ARCHITECTURES)})"
                           ) from None
        raise SSNError(f"{path}: cannot read the GGUF metadata ({str(exc).splitlines()[0][:160]})") from None
    except Exception as exc:  # noqa: BLE001 - transformers' GGUF parser raises assorted errors on odd files
        raise SSNError(f"{path}: cannot read the GGUF metadata ({type(exc).__name__}: {str(exc)[:120]})") from None
    model_type = cfg.get("model_type", arch)
    if model_type not in registered_model_types():
        raise SSNError(f"{path}: GGUF architecture {arch!r} (model_type {model_type!r}) has no neuron-site adapter; "
                       f"supported: {', '.join(registered_model_types())}")
    return {"architecture": arch, "model_type": model_type, "tensor_types": dict(sorted(types.items())),
            "tensors": len(reader.tensors), "special_token_ids": special}


def _version(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except (ImportError, AttributeError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version(mod)
        except PackageNotFoundError:
            return "?"


def _check_logits(model_a, model_b, tok) -> float:
    """Max |logit difference| of two models on the fixed chat prompt."""
    from ..data import Record, encode_prompt

    ids = torch.tensor([encode_prompt(Record(_CHECK_TEXT, None), tok, True)])
    with torch.no_grad():
        a = model_a(ids).logits.float()
        b = model_b(ids).logits.float()
    return float((a - b).abs().max())


def summary_lines(rec: dict, out) -> list[str]:
    """What `convert_gguf` wrote to `out`, as `ssn convert` prints it (from its returned record)."""
    types = ", ".join(f"{k} x{v}" for k, v in rec["tensor_types"].items())
    lines = [f"wrote {out}: {rec['model_type']} ({rec['tensors']} tensors: {types}) as {rec['dtype']}, "
             f"max |logit diff| {rec['check']['max_abs_logit_diff']:g} vs the GGUF model, {rec['seconds']} s"]
    return lines + [f"  {name}: {old!r} -> {new!r} (as the GGUF metadata says)"
                    for name, (old, new) in rec["special_tokens_fixed"].items()]


def convert_gguf(path: str | Path, out: str | Path, dtype: str = "float32", overwrite: bool = False,
                 progress: bool = True) -> dict:
    """Convert a GGUF file into the checkpoint folder `out`; returns the provenance record
    (also written as `out/ssn_convert.json`). `dtype`: float32 (default: the dequantized
    values exactly), bfloat16 or float16 (half the size, rounded)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .loading import parse_dtype

    t0 = time.perf_counter()
    path, out = Path(path).expanduser().resolve(), Path(out).expanduser()
    target = parse_dtype(dtype)
    if target not in (torch.float32, torch.bfloat16, torch.float16):
        raise SSNError(f"--dtype must be float32, bfloat16 or float16 for a conversion, not {dtype!r}")
    if out.exists() and not out.is_dir():
        raise SSNError(f"{out} exists and is a file; give a folder for the checkpoint")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SSNError(f"{out} exists and is not empty; remove it or pass --overwrite")
    info = inspect_gguf(path)
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    kw = {"gguf_file": path.name, "local_files_only": True}
    # transformers' GGUF reader draws its own tqdm bar, which its progress switch does not reach
    quiet = contextlib.redirect_stderr(io.StringIO()) if not progress else contextlib.nullcontext()
    try:
        with quiet:
            tok = AutoTokenizer.from_pretrained(str(path.parent), **kw)
            src = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kw).eval()
    except (OSError, ValueError, KeyError, NotImplementedError) as exc:
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise SSNError(f"could not load {path} with transformers {transformers.__version__}: {msg}") from None
    fixed = _fix_special_tokens(tok, info["special_token_ids"])
    config = src.config.__class__.from_dict(src.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain floats now; this is what blocks saving
    dst = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    if unexpected or [k for k in missing if k not in _tied_keys(dst)]:
        raise SSNError(f"{path}: converted weights do not match the {type(dst).__name__} layout (missing "
                       f"{missing[:3]}, unexpected {unexpected[:3]})")
    dst.tie_weights()
    dst.generation_config = src.generation_config
    with atomic_folder(out) as tmp:
        if target != torch.float32:
            dst = dst.to(target)
        dst.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        back = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32, local_files_only=True).eval()
        back_tok = AutoTokenizer.from_pretrained(str(tmp), local_files_only=True)
        if not back_tok.chat_template and tok.chat_template:
            raise SSNError(f"{path}: the chat template was lost in conversion")
        for name, i in info["special_token_ids"].items():
            if 0 <= i < len(back_tok) and getattr(back_tok, f"{name}_id") != i:
                raise SSNError(f"{path}: the converted tokenizer's {name} is id {getattr(back_tok, f'{name}_id')}, "
                               f"the GGUF file says {i}")
        _match_modes(tmp)
        diff = _check_logits(src, back, back_tok)
        if target == torch.float32 and diff != 0.0:
            raise SSNError(f"{path}: the converted checkpoint's logits differ from the GGUF model's by {diff:g}")
        record = {"format": FORMAT, "version": VERSION, "source": path.name, "sha256": file_sha256(path),
                  "bytes": path.stat().st_size, **info, "dtype": str(target).replace("torch.", ""),
                  "check": {"prompt": _CHECK_TEXT, "max_abs_logit_diff": diff},
                  "chat_template": bool(back_tok.chat_template), "special_tokens_fixed": fixed,
                  "vocab_size": int(config.vocab_size),
                  "versions": {"transformers": transformers.__version__, "gguf": _version("gguf"),
                               "torch": torch.__version__},
                  "seconds": round(time.perf_counter() - t0, 1)}
        atomic_write_text(tmp / PROVENANCE, json.dumps(record, indent=1, ensure_ascii=False))
    return record


def _fix_special_tokens(tok, ids: dict[str, int]) -> dict[str, list[str]]:
    """Set bos/eos/unk/pad to the ids the GGUF metadata names, where the tokenizer transformers
    built says otherwise (transformers 5.17 gives GPT-2-style GGUF tokenizers the bos token as
    eos: SmolLM2 would end answers at <|im_start|> and train towards it). Returns what changed."""
    fixed = {}
    vocab = len(tok)
    for name, i in ids.items():
        if not 0 <= i < vocab:
            continue  # an id outside the vocabulary (e.g. unused padding id): leave the tokenizer's own
        want = tok.convert_ids_to_tokens(i)
        have = getattr(tok, name, None)
        if have != want:
            setattr(tok, name, want)
            fixed[name] = [have, want]
    return fixed


def _match_modes(folder: Path) -> None:
    """Give every file the permissions an ordinary write gets (0666 minus the umask, as
    config.json has): the safetensors writer leaves model.safetensors private (0600)."""
    mode = (folder / "config.json").stat().st_mode & 0o666
    for f in folder.iterdir():
        if f.is_file():
            f.chmod(mode)


def _tied_keys(model) -> set[str]:
    """Parameter names that tie to another (e.g. lm_head.weight with tied embeddings)."""
    return set(getattr(model, "_tied_weights_keys", None) or ())


def cache_folder(sha256: str) -> Path:
    from ..cache import cache_root

    return cache_root() / "gguf" / sha256[:32]


def gguf_checkpoint(path: str | Path, progress: bool = True) -> Path:
    """The checkpoint folder of a GGUF file: converted once into the cache (`$SSN_CACHE` or
    ~/.cache/ssn-runtime, under gguf/<sha256>), then reused while the file's hash is the same."""
    path = Path(path).expanduser()
    _check_file(path)
    digest = file_sha256(path)
    folder = cache_folder(digest)
    if _is_converted(folder, digest):
        return folder
    # A stale or broken entry is replaced; two processes converting at once each swap in a
    # complete, identical folder.
    convert_gguf(path, folder, overwrite=True, progress=progress)
    return folder


def _is_converted(folder: Path, digest: str) -> bool:
    try:
        rec = json.loads((folder / PROVENANCE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return rec.get("format") == FORMAT and rec.get("version") == VERSION and rec.get("sha256") == digest
