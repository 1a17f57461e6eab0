"""The streaming neuron profiler: per-neuron statistics over a prompt set, per group.

    stats = profile(model, tokenizer, records, ProfileConfig(group_by=["language", "label"]))

Statistics are gathered inside the fused MLP kernels during ordinary forward passes (or
`generate` for `positions="generated"`): nothing per token is stored. The run is split
into deterministic batches; every `checkpoint_every` batches the totals and the number
of batches done are written atomically as one file, so a killed run restarted with the
same inputs resumes where it stopped and ends with exactly the statistics of an
uninterrupted run. Under torchrun the batches are sharded across ranks and the
per-rank statistics merged at the end.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import batching
from ..core.devices import to_device
from ..core.fingerprint import model_fingerprint
from ..core.loading import default_device
from ..core.runtime import ensure_attached
from ..data import Record, encode_prompt, ids_digest, plan_batches
from ..errors import SSNError
from ..options import option
from ..validation import check_int, check_number
from .collector import StatsCollector
from .stats import NeuronStats, stamp

POSITIONS = ("prompt", "last", "generated")

# Test-only hook, None in production: called after every batch (and its checkpoint) with
# the number of batches this call has run. tests/test_profiler.py sets it in a subprocess
# to SIGKILL a run mid-way and check that the rerun resumes to identical statistics.
after_batch_test_hook: Callable[[int], None] | None = None


@dataclass
class ProfileConfig:
    """What `profile` counts and how it batches; `ssn profile`'s options are generated from
    these fields (options.py)."""

    group_by: list[str] = option(["language"], "record fields whose values form the groups", csv=True)
    positions: str = option("prompt", "tokens counted: every prompt token, the last prompt token, or generated "
                            "tokens", choices=POSITIONS)
    threshold: float = option(0.0, "activation threshold for frequencies (LAPE: 0)")
    gate_stats: bool = option(False, "also count act(gate) > threshold (gated MLPs; LAPE as published)")
    topk: int | None = option(None, "count per-sequence layer top-k membership (PLND/SN-Tune)")
    max_tokens_per_batch: int = option(8192, "padded tokens per batch")
    max_batch_size: int = option(64, "sequences per batch")
    max_new_tokens: int = option(32, "tokens generated per prompt with --positions generated")
    chat_template: bool = option(True, "encode prompts with the tokenizer's chat template, when it has one")
    max_length: int | None = option(None, "truncate prompts to their last N tokens")
    checkpoint_every: int = option(20, "batches between checkpoints (a re-run resumes from the last)")

    def __post_init__(self):
        where = "profile config"
        if self.positions not in POSITIONS:
            raise SSNError(f"positions must be one of {', '.join(POSITIONS)}, got {self.positions!r}")
        for key in ("max_tokens_per_batch", "max_batch_size", "max_new_tokens", "checkpoint_every"):
            check_int(getattr(self, key), where, key, 1)
        for key in ("topk", "max_length"):
            if getattr(self, key) is not None:
                check_int(getattr(self, key), where, key, 1)
        check_number(self.threshold, where, "threshold")
        if not self.group_by or len(set(self.group_by)) != len(self.group_by):
            raise SSNError(f"group_by must name distinct record fields, got {self.group_by!r}")


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1


def _dist() -> _Dist:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return _Dist(torch.distributed.get_rank(), torch.distributed.get_world_size())
    return _Dist()


def init_distributed(device: str | None) -> str | None:
    """Under torchrun (WORLD_SIZE/RANK set) join the process group (gloo on CPU, nccl on CUDA)
    and return this rank's device; otherwise return `device` unchanged."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = default_device(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        # ranks on one machine share its cores: oversubscribed threads slow every rank down
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        device = "cpu"
    torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    return device


@contextlib.contextmanager
def distributed(device: str | None):
    """This process's device (`init_distributed`, then cuda when present) for the block; the
    process group, when torchrun started one, is torn down on the way out."""
    try:
        yield default_device(init_distributed(device))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def is_main_rank() -> bool:
    """True outside torchrun and on rank 0 under it: the process that reports."""
    import os

    return int(os.environ.get("RANK", "0")) == 0


def summary_lines(stats: NeuronStats, out, positions: str) -> list[str]:
    """What `profile` wrote to `out`, as `ssn profile` prints it: shape, groups and tokens per group."""
    return [f"wrote {out}: {stats.num_layers} layers x {stats.num_neurons} neurons, {len(stats.groups)} groups, "
            f"{stats.tokens_seen} tokens ({positions})"] + [
        f"  {g:<24} {int(stats.count[0, i]):>10} tokens" for i, g in enumerate(stats.groups)]


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


class _Progress:
    """tqdm when available and stderr is a terminal or forced; else a line every few seconds."""

    def __init__(self, total_tokens: int, enabled: bool, desc: str):
        self.enabled = enabled
        self.total, self.done, self.t0, self.last = total_tokens, 0, time.perf_counter(), 0.0
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc=desc, smoothing=0.1,
                                dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _checkpoint_path(out: Path | None, dist: _Dist) -> Path | None:
    if out is None:
        return None
    return Path(str(out) + ".ckpt") / f"rank{dist.rank}-of-{dist.world}.safetensors"


def profile(model, tokenizer, records: list[Record], config: ProfileConfig, out: str | Path | None = None,
            progress: bool = True) -> NeuronStats:
    """Profile `model` over `records`; writes `out` (safetensors) when given and returns the stats."""
    groups = sorted({r.key(config.group_by) for r in records})
    group_of = {g: i for i, g in enumerate(groups)}
    ids = [encode_prompt(r, tokenizer, config.chat_template) for r in records]
    if config.max_length:
        ids = [s[-config.max_length:] for s in ids]  # keep the end: the question and the generation prompt
    if any(len(s) == 0 for s in ids):
        bad = next(r for r, s in zip(records, ids, strict=True) if not s)
        raise SSNError(f"{bad.where}: the prompt encodes to no tokens")
    rec_group = [group_of[r.key(config.group_by)] for r in records]
    sources = sorted({r.where.split(":")[0] for r in records})
    return profile_ids(model, ids, rec_group, groups, config, out=out, progress=progress,
                       pad_id=batching.pad_id(tokenizer, model), eos_ids=set(batching.eos_ids(tokenizer, model)),
                       sources=sources)


def profile_ids(model, ids: list[list[int]], seq_groups: list[int], groups: list[str], config: ProfileConfig,
                out: str | Path | None = None, progress: bool = True, pad_id: int | None = None,
                eos_ids: set[int] | None = None, sources: list[str] | None = None) -> NeuronStats:
    """`profile` over already-encoded prompts: `ids[i]` belongs to group `groups[seq_groups[i]]`."""
    dist = _dist()
    out = Path(out) if out is not None else None
    rec_group = list(seq_groups)
    batches = plan_batches([len(s) for s in ids], config.max_tokens_per_batch, config.max_batch_size)
    mine = [b for i, b in enumerate(batches) if i % dist.world == dist.rank]

    fp = model_fingerprint(model)
    # The run's identity, which only a checkpoint needs: hashing every prompt is ~10 ms per
    # 30k tokens, a visible share of a short GPU run.
    run_key = (ids_digest(ids, extra=repr((fp, groups, rec_group, asdict(config), dist.world)))
               if out is not None else None)
    meta = {**fp, "groups_by": config.group_by, "positions": config.positions, "threshold": config.threshold,
            "topk": config.topk, "gate_stats": config.gate_stats, "chat_template": config.chat_template,
            "max_new_tokens": config.max_new_tokens if config.positions == "generated" else None,
            "sources": sources or [], "created": stamp(), "sequences": len(ids)}

    scope = contextlib.ExitStack()  # closed in the `finally` below: the collector scope, then our attachment
    handle = scope.enter_context(ensure_attached(model))
    bar = None
    try:
        collector = StatsCollector(handle.sites, groups, config.threshold, config.gate_stats, config.topk, meta=meta)

        ckpt = _checkpoint_path(out, dist)
        done = 0
        if ckpt is not None and ckpt.exists():
            saved = NeuronStats.load(ckpt)
            if saved.meta.get("run_key") == run_key:
                collector.load_totals(saved)
                done = int(saved.meta["batches_done"])
            else:
                ckpt.unlink()  # a different run's leftovers

        total_tokens = sum(len(ids[i]) for b in mine for i in b)
        tokens_done = sum(len(ids[i]) for b in mine[:done] for i in b)
        bar = _Progress(total_tokens, progress and dist.rank == 0, f"profile ({config.positions})")
        bar.update(tokens_done)
        device = _device_of(model)
        pad = pad_id if pad_id is not None else batching.pad_id(None, model)
        eos = eos_ids if eos_ids is not None else set(batching.eos_ids(None, model))
        # the collector is bound to this thread's forwards only (scoped, restored on exit)
        scope.enter_context(handle.intervene(collector=collector))
        for k, batch in enumerate(mine[done:], start=done):
            seqs = [ids[i] for i in batch]
            seq_groups = torch.tensor([rec_group[i] for i in batch])
            collector.begin_batch(seq_groups)
            with torch.no_grad():
                if config.positions == "generated":
                    _run_generate(model, collector, seqs, seq_groups, pad, eos, config, device)
                else:
                    _run_forward(model, collector, seqs, seq_groups, pad, config.positions, device)
            collector.end_batch()
            bar.update(sum(len(s) for s in seqs))
            if ckpt is not None and ((k + 1) % config.checkpoint_every == 0) and k + 1 < len(mine):
                # The one place besides the end where statistics leave the device.
                collector.result({"run_key": run_key, "batches_done": k + 1}).save(ckpt)
            if after_batch_test_hook is not None:
                after_batch_test_hook(k + 1 - done)
    finally:
        if bar is not None:
            bar.close()
        scope.close()

    stats = collector.result()
    if dist.active:
        stats = _all_merge(stats, dist)
    if out is not None and dist.rank == 0:
        stats.save(out)
    if ckpt is not None and ckpt.exists():
        ckpt.unlink()
        try:
            ckpt.parent.rmdir()
        except OSError:
            pass
    return stats


def _run_forward(model, collector, seqs, seq_groups, pad, positions, device):
    """Right-padded forward through the decoder only (no LM head: nothing reads logits)."""
    input_ids, mask = batching.right_padded(seqs, pad)
    groups = seq_groups.to(torch.int32)
    if positions == "prompt":
        gid = torch.where(mask.bool(), groups[:, None], -1).to(torch.int32)
    else:
        gid = torch.full(input_ids.shape, -1, dtype=torch.int32)
        gid[torch.arange(len(seqs)), torch.tensor([len(s) - 1 for s in seqs])] = groups
    collector.plan_rows(gid)
    body = getattr(model, "base_model", model)
    body(input_ids=to_device(input_ids, device), attention_mask=to_device(mask, device), use_cache=False)


def _run_generate(model, collector, seqs, seq_groups, pad, eos, config, device):
    """Greedy generation; counts the positions that produce generated tokens: the last
    prompt token, then each decode step until the sequence has produced EOS."""
    input_ids, mask = batching.left_padded(seqs, pad)  # generation needs every row to end at the last column
    finished = torch.zeros(len(seqs), dtype=torch.bool)
    eos_t = torch.tensor(sorted(eos)) if eos else torch.empty(0, dtype=torch.long)
    state = {"first": True}

    def plan(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise SSNError("generated-position profiling needs input_ids")
        b, t = ids.shape
        gid = torch.full((b, t), -1, dtype=torch.int32)
        if state["first"]:
            gid[:, -1] = seq_groups.to(torch.int32)
            state["first"] = False
        else:
            fed = ids[:, -1].cpu()
            finished.logical_or_(torch.isin(fed, eos_t))
            gid[:, -1] = torch.where(finished, -1, seq_groups).to(torch.int32)
        collector.plan_rows(gid)

    hook = model.register_forward_pre_hook(plan, with_kwargs=True)
    try:
        model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), do_sample=False,
                       max_new_tokens=config.max_new_tokens, pad_token_id=pad,
                       eos_token_id=sorted(eos) or None)
    finally:
        hook.remove()


def _all_merge(stats: NeuronStats, dist: _Dist) -> NeuronStats:
    """All-gather every rank's statistics and merge them in rank order (on every rank)."""
    names = [k for k, v in stats.tensors().items()]
    flat = torch.cat([stats.tensors()[k].reshape(-1).to(torch.float64) for k in names])
    gathered = [torch.empty_like(flat) for _ in range(dist.world)]
    torch.distributed.all_gather(gathered, flat)
    merged = None
    for buf in gathered:
        parts, off = {}, 0
        for k in names:
            t = stats.tensors()[k]
            parts[k] = buf[off: off + t.numel()].view(t.shape).to(t.dtype)
            off += t.numel()
        s = NeuronStats(stats.groups, **parts, meta=stats.meta)
        merged = s if merged is None else NeuronStats.merge(merged, s)
    merged.meta.update(stats.meta)
    merged.meta["world_size"] = dist.world
    return merged
