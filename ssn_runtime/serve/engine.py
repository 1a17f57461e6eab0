"""The generation engine behind the server: dynamic batching with per-row neuron masks.

One engine owns one model instance and one worker thread. Requests wait in a bounded
queue; the worker takes as many as are waiting (up to `max_batch`, after a short
gathering window), runs prefill and decode steps for them together with the KV cache,
and gives each row its own mask profile (handle.set_row_profiles), sampling settings,
stop strings and token budget. Tokens flow back to the request's asyncio queue as they
are produced, so streaming and plain responses share one path. A cancelled request (the
client went away, or its deadline passed) leaves the batch at the next step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from .metrics import Metrics


class QueueFull(Exception):
    pass


@dataclass
class GenRequest:
    prompt_ids: list[int]
    profile: str = "base"
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks), as vLLM allows
    deadline: float = float("inf")
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.time)

    def emit(self, *event) -> None:
        if self.loop is not None and self.events is not None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Engine:
    def __init__(self, model, tokenizer, handle=None, profiles: list[str] | None = None, max_batch: int = 16,
                 queue_size: int = 64, gather_ms: float = 5.0, metrics: Metrics | None = None, name: str = "base"):
        self.model, self.tok, self.handle = model, tokenizer, handle
        self.profiles = profiles or ["base"]  # index = mask profile id (0: no mask)
        self.max_batch, self.gather_s = max_batch, gather_ms / 1000
        self.queue: queue.Queue[GenRequest] = queue.Queue(maxsize=queue_size)
        self.metrics = metrics or Metrics()
        self.name = name
        self.device = next(model.parameters()).device
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list | tuple) else [eos]) - {None}
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or getattr(model.config, "n_positions",
                                                                                            0) or 2048)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"ssn-engine-{name}", daemon=True)

    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def submit(self, req: GenRequest) -> None:
        try:
            self.queue.put_nowait(req)
        except queue.Full:
            raise QueueFull() from None
        self.metrics.set_queue_depth(self.name, self.queue.qsize())

    # ----- worker -----
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                first = self.queue.get(timeout=0.05)
            except queue.Empty:
                continue
            batch = [first]
            end = time.perf_counter() + self.gather_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get(timeout=max(0.0, end - time.perf_counter())))
                except queue.Empty:
                    break
            self.metrics.set_queue_depth(self.name, self.queue.qsize())
            now = time.time()
            live = []
            for r in batch:
                if r.cancelled.is_set():
                    r.emit("done", "cancelled", len(r.prompt_ids), 0)
                elif now > r.deadline:
                    r.emit("error", 408, "timeout", "the request timed out while waiting in the queue")
                else:
                    live.append(r)
            if not live:
                continue
            try:
                self._generate(live)
            except Exception as exc:  # noqa: BLE001 - one bad batch must not stop the server
                for r in live:
                    r.emit("error", 500, "server_error", f"generation failed: {type(exc).__name__}: {exc}")

    @torch.no_grad()
    def _generate(self, batch: list[GenRequest]) -> None:
        B = len(batch)
        self.metrics.observe_batch(self.name, B)
        T = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((B, T), self.pad, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        for b, r in enumerate(batch):
            ids[b, T - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[b, T - len(r.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        if self.handle is not None and len(self.profiles) > 1:
            self.handle.set_row_profiles([self.profiles.index(r.profile) for r in batch])
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1].float()
        gens = []
        for r in batch:
            g = torch.Generator(device="cpu")
            if r.seed is not None:
                g.manual_seed(r.seed)
            else:
                g.seed()  # fresh entropy: unseeded requests differ
            gens.append(g)
        tokens: list[list[int]] = [[] for _ in batch]
        sent = [0] * B
        finished: list[str | None] = [None] * B
        max_stop = [max((len(s) for s in r.stop), default=0) for r in batch]
        last_pos = pos[:, -1]
        for _ in range(max(r.max_tokens for r in batch)):
            nxt = self._sample(logits, batch, gens)
            for b, r in enumerate(batch):
                if finished[b]:
                    continue
                t = int(nxt[b])
                if r.cancelled.is_set():
                    finished[b] = "cancelled"
                elif time.time() > r.deadline:
                    finished[b] = "timeout"
                elif t in self.eos and not r.ignore_eos:
                    finished[b] = "stop"
                else:
                    tokens[b].append(t)
                    text = self.tok.decode(tokens[b], skip_special_tokens=True)
                    hit = min((text.find(s) for s in r.stop if s and s in text), default=-1)
                    if hit >= 0:
                        text, finished[b] = text[:hit], "stop"
                    elif len(tokens[b]) >= r.max_tokens:
                        finished[b] = "length"
                    # Hold back what could be the start of a stop string, and a trailing partial
                    # UTF-8 character (byte-level tokens can split one; the next token completes it).
                    safe = len(text) if finished[b] else max(sent[b], min(len(text) - max(0, max_stop[b] - 1),
                                                                          len(text.rstrip("\ufffd"))))
                    if safe > sent[b]:
                        r.emit("delta", text[sent[b]:safe])
                        sent[b] = safe
                if finished[b]:
                    self._finish(r, finished[b], len(tokens[b]))
            if all(finished):
                return
            feed = torch.tensor([int(nxt[b]) if not finished[b] else self.pad for b in range(B)], device=self.device)
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=self.device)], dim=1)
            last_pos = last_pos + 1
            out = self.model(input_ids=feed[:, None], attention_mask=mask, position_ids=last_pos[:, None],
                             past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1].float()
        for b, r in enumerate(batch):
            if not finished[b]:
                self._finish(r, "length", len(tokens[b]))

    def _finish(self, r: GenRequest, reason: str, n_tokens: int) -> None:
        if reason == "timeout":
            r.emit("error", 408, "timeout", "the request timed out during generation")
        else:
            r.emit("done", reason, len(r.prompt_ids), n_tokens)
        self.metrics.add_tokens(self.name, r.profile, len(r.prompt_ids), n_tokens)

    @staticmethod
    def _sample(logits: torch.Tensor, batch: list[GenRequest], gens) -> list[int]:
        out = []
        for b, r in enumerate(batch):
            row = logits[b].cpu()
            if r.temperature <= 0:
                out.append(int(row.argmax()))
                continue
            probs = torch.softmax(row / r.temperature, dim=-1)
            if r.top_p < 1.0:
                sp, si = probs.sort(descending=True)
                keep = sp.cumsum(0) - sp < r.top_p  # smallest set whose mass reaches top_p
                probs = torch.zeros_like(probs).scatter_(0, si[keep], sp[keep])
                probs = probs / probs.sum()
            out.append(int(torch.multinomial(probs, 1, generator=gens[b])))
        return out
