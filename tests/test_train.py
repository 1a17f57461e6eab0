"""Neuron training: loss goes down, only the chosen slices change, resume after SIGKILL equals
an uninterrupted run, and the CLI train -> merge -> unmerge path."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from ssn_runtime import SSNError, load_model, load_tokenizer
from ssn_runtime.core.fingerprint import model_fingerprint
from ssn_runtime.data import Record, load_records
from ssn_runtime.science.neuron_sets import NeuronSet, NeuronSetFile
from ssn_runtime.training.patches import NeuronPatch
from ssn_runtime.training.train import TrainConfig, example_ids, lr_at, sample_weights, train


def neurons_for(model, k=6):
    fp = model_fingerprint(model)
    g = torch.Generator().manual_seed(0)
    return NeuronSet({layer: torch.randperm(fp["num_neurons"], generator=g)[:k] for layer in range(fp["num_layers"])},
                     fp["num_layers"], fp["num_neurons"])


@pytest.fixture(scope="module")
def train_jsonl(tmp_path_factory, prompts_jsonl):
    from ssn_runtime.science.judges import builtin_lexicon
    from ssn_runtime.training.train import refusal_pairs

    recs = [r for r in load_records(prompts_jsonl) if r.fields["label"] == "harmful"]
    pairs = refusal_pairs(recs, builtin_lexicon()["canonical"])
    path = tmp_path_factory.mktemp("train") / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": r.text, "response": r.response, **r.fields}, ensure_ascii=False)
                            + "\n" for r in pairs))
    return path


def test_training_lowers_the_loss_and_touches_only_the_patch(tiny_ckpts, train_jsonl, tmp_path):
    model = load_model(tiny_ckpts["llama"])
    tok = load_tokenizer(tiny_ckpts["llama"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    records = load_records(train_jsonl)
    res = train(model, tok, neurons_for(model), records, TrainConfig(lr=1e-1, steps=30, batch_size=8, save_every=10,
                                                                     eval_every=10),
                tmp_path / "patch", eval_records=records[:6], progress=False)
    log = res["log"]
    assert log[-1]["loss"] < 0.8 * log[0]["loss"], (log[0], log[-1])
    assert "eval_loss" in log[9]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # base untouched
    patch = NeuronPatch.load(tmp_path / "patch", model=model)
    assert patch.num_params() == res["trainable_params"] == 2 * 6 * 48 * 3
    assert not (tmp_path / "patch" / "checkpoint").exists()
    assert json.loads((tmp_path / "patch" / "training_log.json").read_text())[-1]["step"] == 30


def test_language_weights_and_schedule():
    recs = [Record("a", None, {"language": "en"}), Record("b", None, {"language": "sw"}),
            Record("c", None, {"language": "sw"})]
    w = sample_weights(recs, TrainConfig(nhr_weight=3.0), [False, False, True])
    assert w.tolist() == [1.0, 3.0, 3.0]
    w = sample_weights(recs, TrainConfig(language_weights={"en": 0.5}, retain_weight=0.1), [False, False, True])
    assert w.tolist() == pytest.approx([0.5, 3.0, 0.3])
    cfg = TrainConfig(lr=1.0, steps=10, warmup=2)
    assert lr_at(0, cfg) == 0.5 and lr_at(1, cfg) == 1.0 and lr_at(10, cfg) == pytest.approx(0.0)
    with pytest.raises(SSNError):
        TrainConfig(schedule="step")


def test_loss_only_on_response_tokens(tiny_ckpts):
    tok = load_tokenizer(tiny_ckpts["llama"])
    ids, n_prompt = example_ids(Record(None, [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "no"}], {}), tok, True, 256)
    assert tok.decode(ids[n_prompt:]).startswith("no") and ids[-1] == tok.eos_token_id
    with pytest.raises(SSNError, match="needs a 'response'"):
        example_ids(Record("hi", None, {}, "x:1"), tok, True, 256)


def _ssn(*args, env=None):
    return subprocess.run([sys.executable, "-m", "ssn_runtime", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


# `ssn` in a subprocess whose trainer SIGKILLs the process after N steps, through train's
# test-only hook (production code reads no fault-injection setting).
_KILLED_AFTER = """
import os, signal, sys
from ssn_runtime import cli
from ssn_runtime.training import train
n = int(sys.argv.pop(1))
train.after_step_test_hook = lambda done: done >= n and os.kill(os.getpid(), signal.SIGKILL)
sys.exit(cli.main(sys.argv[1:]))
"""


def _ssn_killed_after(steps, *args):
    return subprocess.run([sys.executable, "-c", _KILLED_AFTER, str(steps), *args], capture_output=True, text=True,
                          timeout=600)


def test_cli_resume_after_sigkill_merge_unmerge(tiny_ckpts, train_jsonl, tmp_path):
    model_dir = str(tiny_ckpts["llama"])
    model = load_model(model_dir)
    sets = NeuronSetFile({"SS": neurons_for(model)}, model_fingerprint(model))
    sets.save(tmp_path / "neurons.json")
    base = ["train", "--model", model_dir, "--neurons", str(tmp_path / "neurons.json"), "--data", str(train_jsonl),
            "--steps", "12", "--batch-size", "4", "--save-every", "3", "--lr", "0.01", "--quiet"]
    full = _ssn(*base, "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    killed = _ssn_killed_after(7, *base, "--out", str(tmp_path / "resumed"))
    assert killed.returncode == -signal.SIGKILL
    meta = json.loads((tmp_path / "resumed" / "checkpoint" / "trainer_state.json").read_text())
    assert meta["step"] == 6
    done = _ssn(*base, "--out", str(tmp_path / "resumed"))
    assert done.returncode == 0, done.stderr
    a, b = NeuronPatch.load(tmp_path / "full"), NeuronPatch.load(tmp_path / "resumed")
    for k, v in a.tensors.items():
        assert torch.equal(b.tensors[k], v), k

    r = _ssn("merge", "--model", model_dir, "--patch", str(tmp_path / "full"), "--out", str(tmp_path / "merged"))
    assert r.returncode == 0, r.stderr
    import ssn_runtime

    ids = torch.randint(3, 300, (2, 9))
    merged = load_model(tmp_path / "merged")
    with torch.no_grad(), ssn_runtime.attach(model) as h, h.intervene(patch=a):
        applied = model(ids).logits
    torch.testing.assert_close(merged(ids).logits, applied, rtol=1e-4, atol=1e-5)
    r = _ssn("merge", "--unmerge", "--model", str(tmp_path / "merged"), "--patch", str(tmp_path / "full"), "--out",
             str(tmp_path / "back"))
    assert r.returncode == 0, r.stderr
    back = load_model(tmp_path / "back")
    ref = model.state_dict()
    for k, v in back.state_dict().items():
        assert torch.equal(v, ref[k]), k  # bit-exact: `ssn merge` kept the values it replaced


def test_training_attention_neurons_via_cli(tiny_ckpts, train_jsonl, tmp_path):
    model_dir = str(tiny_ckpts["llama"])
    model = load_model(model_dir)
    NeuronSetFile({"SS": neurons_for(model, 2)}, model_fingerprint(model)).save(tmp_path / "neurons.json")
    (tmp_path / "attn.json").write_text(json.dumps({"layers": {"0": [1, 13], "1": [40]}}))
    r = _ssn("train", "--model", model_dir, "--neurons", str(tmp_path / "neurons.json"), "--data", str(train_jsonl),
             "--steps", "3", "--batch-size", "4", "--attention-neurons", str(tmp_path / "attn.json"), "--out",
             str(tmp_path / "p"), "--quiet")
    assert r.returncode == 0, r.stderr
    patch = NeuronPatch.load(tmp_path / "p", model=model)
    assert {k: v.tolist() for k, v in patch.attention().items()} == {0: [1, 13], 1: [40]}
    assert float(patch.tensors["attn.0.o"].abs().sum()) > 0  # it trained
    (tmp_path / "bad.json").write_text(json.dumps({"0": [999]}))
    r = _ssn("train", "--model", model_dir, "--neurons", str(tmp_path / "neurons.json"), "--data", str(train_jsonl),
             "--steps", "1", "--attention-neurons", str(tmp_path / "bad.json"), "--out", str(tmp_path / "q"))
    assert r.returncode == 2 and "out of range" in r.stderr


@pytest.mark.parametrize("channels,message", [
    ({"0": [999]}, "out of range"),
    ({"0": [1.7, 2]}, "expected an integer, got 1.7"),
    ({"0": [3, 3]}, "index 3 appears twice"),
    ({"01": [3]}, "is not a layer number"),
    ({"9": [3]}, "out of range: the model has 2 layers"),
    ({"0": 3}, "expected a list of integers"),
    ([1, 2], "expected JSON {layer"),
])
def test_attention_channels_are_never_coerced(tiny_ckpts, tmp_path, channels, message):
    from ssn_runtime.core.attention_neurons import attention_sites, load_channels, validate_channels

    model = load_model(str(tiny_ckpts["llama"]))
    (tmp_path / "attn.json").write_text(json.dumps(channels))
    with pytest.raises(SSNError, match=message.replace("[", r"\[").replace("{", r"\{")):
        validate_channels(attention_sites(model), load_channels(tmp_path / "attn.json"), "attn.json")
    assert {k: v.tolist() for k, v in validate_channels(attention_sites(model), {1: [5, 2]}).items()} == {1: [2, 5]}


@pytest.mark.parametrize("option,value,message", [
    ("--lr", "nan", "lr: must be finite"),
    ("--lr", "0", "lr: 0.0 is out of range"),
    ("--clip", "-1", "clip: -1.0 is out of range"),
    ("--steps", "0", "steps: 0 is out of range"),
    ("--language-weights", "sw=x", "expected distinct KEY=NUMBER pairs"),
    ("--language-weights", "sw=inf", "must be finite"),
    ("--modules", "gate,gate", "modules must be distinct"),
])
def test_train_options_are_validated_before_anything_loads(tmp_path, option, value, message):
    """Options come from TrainConfig's declared fields; bad values are one error line, exit 2,
    before the model or data are read (the paths here do not exist)."""
    r = _ssn("train", "--model", str(tmp_path / "none"), "--neurons", "x.json", "--data", "x.jsonl",
             "--out", str(tmp_path / "p"), option, value)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and r.stderr.count("error:") == 1, r.stderr


def test_train_options_come_from_the_config():
    from ssn_runtime.cli import build_parser
    from ssn_runtime.options import describe

    train_help = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for name in describe(TrainConfig):
        flag = "--" + name.replace("_", "-")
        assert flag in train_help, flag
    assert "--no-chat-template" in train_help


def _full_logit_loss(model, ids, mask, labels):
    """The training loss as it was: every position's logits, then cross-entropy on the response."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_response_loss_equals_the_full_logit_loss(tiny_ckpts, train_jsonl, arch):
    from ssn_runtime.likelihood import batch_tensors, response_loss

    model, tok = load_model(tiny_ckpts[arch]), load_tokenizer(tiny_ckpts[arch])
    examples = [example_ids(r, tok, True, 256) for r in load_records(train_jsonl)[:6]]
    ids, mask, labels = batch_tensors(examples, list(range(6)), tok.pad_token_id, "cpu")
    assert int((labels[:, 1:] != -100).sum()) < int(mask[:, 1:].sum())  # prompt positions are excluded
    ref = _full_logit_loss(model, ids, mask, labels)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for chunk in (1, 7, 10_000):  # one position at a time, uneven chunks, one chunk
        model.zero_grad(set_to_none=True)
        loss = response_loss(model, ids, mask, labels, chunk=chunk)
        loss.backward()
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-5, atol=1e-7, msg=n)


def test_neuron_patch_gradients_unchanged_and_no_vocabulary_sized_tensor_kept(tiny_ckpts, train_jsonl):
    """The training path (attached model, neuron patch): the same loss and patch gradients as the
    full-logit loss, while autograd keeps no tensor with a vocabulary-sized last dimension (the
    full-logit loss keeps several of [batch x positions, vocab])."""
    import ssn_runtime
    from ssn_runtime.likelihood import batch_tensors, response_loss
    from ssn_runtime.training.patches import PatchState

    model, tok = load_model(tiny_ckpts["llama"]), load_tokenizer(tiny_ckpts["llama"])
    for p in model.parameters():
        p.requires_grad_(False)
    examples = [example_ids(r, tok, True, 256) for r in load_records(train_jsonl)[:5]]
    ids, mask, labels = batch_tensors(examples, list(range(5)), tok.pad_token_id, "cpu")
    vocab = model.config.vocab_size
    with ssn_runtime.attach(model) as h:
        state = PatchState(neurons_for(model), h.sites[0].hidden_size, gated=True)
        with torch.no_grad():
            for p in state.parameters():
                p.normal_(0, 0.05)
        with h.intervene(patch=state):
            results = {}
            for name, fn in (("full", _full_logit_loss), ("response", response_loss)):
                saved = []

                def pack(t, saved=saved):
                    saved.append(tuple(t.shape))
                    return t

                for p in state.parameters():
                    p.grad = None
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    loss = fn(model, ids, mask, labels)
                loss.backward()
                results[name] = (loss.detach(), [p.grad.clone() for p in state.parameters()],
                                 [s for s in saved if s and s[-1] == vocab])
    (l_full, g_full, big_full), (l_resp, g_resp, big_resp) = results["full"], results["response"]
    torch.testing.assert_close(l_resp, l_full, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_resp, g_full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert big_full and max(s[0] * (s[1] if len(s) == 3 else 1) for s in big_full) >= ids.numel() - len(ids)
    assert big_resp == []
