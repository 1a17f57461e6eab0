"""GGUF import on a tiny Llama GGUF written here (quantized Q8_0/Q4_1 tensors, a byte-level BPE
tokenizer with a chat template): the converted safetensors folder gives exactly the logits of
the model transformers loads from the GGUF, the same token ids and chat prompt, and the
GGUF's special tokens; load_model/load_tokenizer take the .gguf path (cached by hash); and
unsupported files fail with one line. The real SmolLM2 GGUF is covered in test_real_model.py."""

import json
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("accelerate")

import gguf  # noqa: E402

from ssn_runtime import SSNError, load_model, load_tokenizer  # noqa: E402
from ssn_runtime.core.convert import PROVENANCE, convert_gguf, gguf_checkpoint, inspect_gguf  # noqa: E402
from ssn_runtime.data import Record, encode_prompt  # noqa: E402

H, FF, LAYERS, HEADS, KV = 64, 96, 2, 4, 2


def _tokenizer():
    from ssn_runtime.tokenizer_builder import byte_bpe_tokenizer

    corpus = ["Hello there, how are you?", "Ciao, come stai?", "你好，世界", "Habari ya asubuhi", "สวัสดีครับ"] * 4
    return byte_bpe_tokenizer(corpus, vocab_size=320)


def write_tiny_gguf(path, arch="llama", quant=gguf.GGMLQuantizationType.Q8_0, seed=0, raw_type=None):
    """A 2-layer Llama in GGUF, with the tokenizer (gpt2-style BPE) and chat template inside."""
    tok = _tokenizer()
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    special = {t.content for t in tok.backend_tokenizer.get_added_tokens_decoder().values()}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(256)
    w.add_embedding_length(H)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(H // HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)

    def add(name, shape, quantize=True):
        x = rng.normal(0, 0.1, size=shape).astype(np.float32)
        if raw_type is not None and quantize:
            qs = gguf.GGML_QUANT_SIZES[raw_type]
            w.add_tensor(name, np.zeros((shape[0], shape[1] // qs[0] * qs[1]), np.uint8), raw_dtype=raw_type)
        elif quantize and quant != gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, gguf.quants.quantize(x, quant), raw_dtype=quant)
        else:
            w.add_tensor(name, x if len(shape) > 1 else np.ones(shape, np.float32))

    add("token_embd.weight", (len(tokens), H))
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", (H,), False)
        add(f"blk.{i}.attn_q.weight", (H, H))
        add(f"blk.{i}.attn_k.weight", (H * KV // HEADS, H))
        add(f"blk.{i}.attn_v.weight", (H * KV // HEADS, H))
        add(f"blk.{i}.attn_output.weight", (H, H))
        add(f"blk.{i}.ffn_norm.weight", (H,), False)
        add(f"blk.{i}.ffn_gate.weight", (FF, H))
        add(f"blk.{i}.ffn_up.weight", (FF, H))
        add(f"blk.{i}.ffn_down.weight", (H, FF))
    add("output_norm.weight", (H,), False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.Q8_0.gguf")


def test_converted_checkpoint_equals_the_gguf_model(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rec = convert_gguf(tiny_gguf, tmp_path / "ckpt", progress=False)
    assert rec["tensor_types"]["Q8_0"] > 0 and rec["check"]["max_abs_logit_diff"] == 0.0
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", PROVENANCE} <= files
    assert "quantization_config" not in json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert oct((tmp_path / "ckpt" / "model.safetensors").stat().st_mode & 0o077) != "0o0"  # not private 0600

    ref_tok = AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name).eval()
    model, tok = load_model(tmp_path / "ckpt"), load_tokenizer(tmp_path / "ckpt")
    for text in ("Hello there, how are you?", "你好，世界 habari"):
        rec_ = Record(text, None)
        ids = encode_prompt(rec_, tok)
        assert ids == encode_prompt(rec_, ref_tok)  # same tokens and chat template
        x = torch.tensor([ids])
        with torch.no_grad():
            assert torch.equal(model(x).logits, ref(x).logits)
    assert tok.eos_token == "</s>" and tok.pad_token == "<pad>"  # the GGUF's ids, not transformers' guess
    assert tok.chat_template == ref_tok.chat_template


def test_load_model_takes_a_gguf_path_and_caches_by_hash(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("SSN_CACHE", str(tmp_path / "cache"))
    folder = gguf_checkpoint(tiny_gguf, progress=False)
    assert folder.parent == tmp_path / "cache" / "ssn-runtime" / "gguf"
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    model = load_model(tiny_gguf)  # reuses the cached conversion
    tok = load_tokenizer(tiny_gguf)
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert model.config.num_hidden_layers == LAYERS and tok.eos_token == "</s>"
    other = write_tiny_gguf(tmp_path / "other.gguf", seed=1)  # other weights: another hash, another folder
    assert gguf_checkpoint(other, progress=False) != folder
    (folder / PROVENANCE).unlink()  # a broken cache entry is converted again, not trusted
    assert gguf_checkpoint(tiny_gguf, progress=False) == folder and (folder / PROVENANCE).is_file()


def test_unsupported_files_fail_with_one_line(tmp_path):
    with pytest.raises(SSNError, match="GGUF file not found"):
        inspect_gguf(tmp_path / "missing.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(SSNError, match="is not a GGUF file"):
        inspect_gguf(tmp_path / "bad.gguf")
    with pytest.raises(SSNError, match="architecture 'mamba'.*no neuron-site adapter"):
        inspect_gguf(write_tiny_gguf(tmp_path / "mamba.gguf", arch="mamba"))
    with pytest.raises(SSNError, match="architecture 'rwkv7' is not supported by transformers"):
        inspect_gguf(write_tiny_gguf(tmp_path / "rwkv.gguf", arch="rwkv7"))
    with pytest.raises(SSNError, match="tensor type.*Q8_1 cannot be dequantized"):
        inspect_gguf(write_tiny_gguf(tmp_path / "q81.gguf", raw_type=gguf.GGMLQuantizationType.Q8_1))


def test_cli_convert_and_missing_extra(tiny_gguf, tmp_path, capsys, monkeypatch):
    from ssn_runtime.cli import main

    assert main(["convert", str(tiny_gguf), str(tmp_path / "out"), "--quiet"]) == 0
    assert "max |logit diff| 0 vs the GGUF model" in capsys.readouterr().out
    assert main(["convert", str(tiny_gguf), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--overwrite" in err
    monkeypatch.setitem(sys.modules, "gguf", None)  # the extra not installed: the error names it
    assert main(["convert", str(tiny_gguf), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "ssn-runtime[gguf]" in err and len(err.strip().splitlines()) == 1
