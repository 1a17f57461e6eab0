"""Helpers shared by the server tests: a real `ssn serve` process on a free port, the tiny
model's profiles (a mask and a patch with random deltas), and the ground-truth answer of one
prompt alone on a fresh model with the patch merged."""

import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import httpx
import torch
from transformers import LogitsProcessor

import ssn_runtime
from ssn_runtime import load_model, load_tokenizer
from ssn_runtime.core.fingerprint import model_fingerprint
from ssn_runtime.science.masks import NeuronMask
from ssn_runtime.science.neuron_sets import NeuronSet
from ssn_runtime.training.patches import PatchState, merge_patch

PROMPTS = ["How do I bake bread at home?", "What is the capital of France?", "hi",
           "Tell me a fun fact about cats. Tell me a fun fact about cats. And dogs?", "How can I learn to swim?"]


def encode(tok, text):
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def make_profiles(model, seed=0):
    fp = model_fingerprint(model)
    g = torch.Generator().manual_seed(seed)
    ns = NeuronSet({layer: torch.randperm(fp["num_neurons"], generator=g)[:20] for layer in range(fp["num_layers"])},
                   fp["num_layers"], fp["num_neurons"])
    mask = NeuronMask.scale(ns, model, 4.0, name="amp")
    site = ssn_runtime.find_sites(model)[0]
    state = PatchState(ns, site.hidden_size, gated=site.gated, model_info=fp)
    with torch.no_grad():
        for p in state.parameters():
            p.normal_(0, 0.3, generator=g)
    return mask, state.to_patch()


def reference(path, ids, max_new, mask=None, patch=None, stop_ids=(), **generate):
    """Greedy answer of one prompt alone, on a fresh model with the patch merged (the ground truth).
    `generate`: more of model.generate's arguments (logits processors); `stop_ids`: tokens that
    end the answer as EOS does."""
    model = load_model(path)
    tok = load_tokenizer(path)
    if patch is not None:
        merge_patch(model, patch)
    with ssn_runtime.attach(model) as h, h.intervene(mask=mask):
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=max_new, pad_token_id=tok.pad_token_id, **generate)
    cont = out[0, len(ids):].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) | set(stop_ids)
    cut = next((j for j, t in enumerate(cont) if t in eos), len(cont))
    return tok.decode(cont[:cut], skip_special_tokens=True)


class FormulaProcessor(LogitsProcessor):
    """vLLM's documented order, in float64 with plain Python loops (not serve/sampling.py's code):
    min_tokens bans EOS and the stop ids, logit_bias adds, repetition_penalty divides positive
    logits of every token of the prompt and answer and multiplies the others, frequency and
    presence penalties subtract per occurrence in the answer and once."""

    def __init__(self, prompt_len, eos=(), stop_token_ids=(), min_tokens=0, logit_bias=(), repetition_penalty=1.0,
                 frequency_penalty=0.0, presence_penalty=0.0, **_):
        self.prompt_len, self.banned = prompt_len, set(eos) | set(stop_token_ids)
        self.min_tokens, self.bias = min_tokens, dict(logit_bias)
        self.rep, self.freq, self.pres = repetition_penalty, frequency_penalty, presence_penalty

    def __call__(self, input_ids, scores):
        assert input_ids.shape[0] == 1
        x = scores[0].double().tolist()
        answer = input_ids[0, self.prompt_len:].tolist()
        if len(answer) < self.min_tokens:
            for t in self.banned:
                x[t] = float("-inf")
        for t, b in self.bias.items():
            x[t] += b
        if self.rep != 1.0:
            for t in set(input_ids[0].tolist()):
                x[t] = x[t] / self.rep if x[t] > 0 else x[t] * self.rep
        for t, c in Counter(answer).items():
            x[t] -= self.freq * c + self.pres
        return torch.tensor([x], dtype=torch.float64).to(scores.dtype)


class Collector:
    """A request's events, with a hook when its n-th token arrives."""

    def __init__(self):
        self.events = queue.Queue()
        self.deltas = 0
        self.first = threading.Event()
        self.finished_at = None

    def __call__(self, ev):
        if ev[0] == "delta":
            self.deltas += 1
            if self.deltas >= 3:
                self.first.set()
        else:
            self.finished_at = time.perf_counter()
        self.events.put(ev)

    def result(self, timeout=120):
        text = []
        while True:
            ev = self.events.get(timeout=timeout)
            if ev[0] == "delta":
                text.append(ev[1])
            elif ev[0] == "done":
                return "".join(text), ev[1]
            else:
                return ev


def metric(server, name, headers=None, **labels) -> float:
    """Sum of a Prometheus counter's (or gauge's) samples whose labels include `labels`."""
    total = 0.0
    for line in httpx.get(server.url + "/metrics", headers=headers, timeout=30).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.split()[-1])
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args, env=None):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "ssn_runtime", "serve", *args, "--port", str(self.port)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})})
        self.url = f"http://127.0.0.1:{self.port}"
        end = time.monotonic() + 180  # imports, the model load and the GEMM calibration, on a loaded machine
        while time.monotonic() < end:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stdout.read())
            time.sleep(0.1)
        raise RuntimeError("server did not start")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()




def check_top(returned: list[tuple[int, float]], ref_row: torch.Tensor, k: int, abs_tol: float,
              rel_tol: float = 0.0) -> None:
    """Returned alternatives [(token id, log-probability)] against a reference log-softmax row:
    k of them, most likely first, each value the reference's for its token, and no other token
    more likely than the least of them beyond the tolerance (two tokens within rounding of each
    other may come in either order)."""
    import pytest

    assert len(returned) == k
    values = [v for _, v in returned]
    assert values == sorted(values, reverse=True)
    assert values == pytest.approx([float(ref_row[t]) for t, _ in returned], abs=abs_tol, rel=rel_tol)
    if k:
        kth = float(torch.topk(ref_row, k).values[-1])
        assert min(values) >= kth - max(abs_tol, rel_tol * abs(kth))
