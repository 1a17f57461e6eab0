"""Typed argument contracts between the runtime and every kernel backend (Triton, C++, torch).

`MaskArgs` is what a neuron mask becomes for one layer and one input; `StatsTarget` is
where one layer's profiling statistics go for the current batch. Both check their own
structure when built (dtype, shape, layout, one device), so a malformed argument fails
in Python with a message instead of reaching a kernel as a bad pointer. The checks never
read tensor values: on CUDA that would synchronise the stream on every layer. Value
ranges (variant ids, group ids) are checked where the values are made, on the host
(ssn_runtime.core.runtime, ssn_runtime.science.collector), and again by ssn_runtime.core.cpp_ops before a
pointer crosses into C++.

Importable without triton (C++-only and torch-only installs use these too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _fail(what: str) -> None:
    raise ValueError(what)


def _same_device(*tensors: torch.Tensor | None) -> None:
    devs = {t.device for t in tensors if t is not None}
    if len(devs) > 1:
        _fail(f"kernel arguments are on different devices: {sorted(map(str, devs))}")


@dataclass(frozen=True)
class MaskArgs:
    """A neuron mask as the kernels apply it: h -> h * scale + bias, in float32.

    `scale`/`bias`: contiguous float32, [N] (one mask for every row) or [P, N] (a table
    of P masks) with `row_variant`: contiguous int32 [M], the table row of each input row.
    """

    scale: torch.Tensor
    bias: torch.Tensor
    row_variant: torch.Tensor | None = None

    def __post_init__(self):
        s, b, rp = self.scale, self.bias, self.row_variant
        for name, t in (("scale", s), ("bias", b)):
            if t.dtype != torch.float32 or not t.is_contiguous():
                _fail(f"MaskArgs.{name} must be contiguous float32, got {t.dtype}")
        if s.shape != b.shape:
            _fail(f"MaskArgs scale {tuple(s.shape)} and bias {tuple(b.shape)} differ in shape")
        if rp is None and s.dim() != 1:
            _fail(f"MaskArgs without row_variant needs [N] scale/bias, got {tuple(s.shape)}")
        if rp is not None:
            if s.dim() != 2:
                _fail(f"MaskArgs with row_variant needs [P, N] scale/bias tables, got {tuple(s.shape)}")
            if rp.dtype != torch.int32 or rp.dim() != 1 or not rp.is_contiguous():
                _fail(f"MaskArgs.row_variant must be contiguous int32 [rows], got {rp.dtype} {tuple(rp.shape)}")
        _same_device(s, b, rp)

    @property
    def mode(self) -> int:
        """Kernel mask mode: 1 one mask for all rows, 2 one table row per input row."""
        return 2 if self.row_variant is not None else 1

    @property
    def num_neurons(self) -> int:
        return self.scale.shape[-1]

    def check_input(self, rows: int, cols: int, device: torch.device) -> None:
        """The mask fits an input of `rows` x `cols` on `device`."""
        if self.num_neurons != cols:
            _fail(f"mask covers {self.num_neurons} neurons but the layer has {cols}")
        if self.row_variant is not None and self.row_variant.numel() != rows:
            _fail(f"row_variant has {self.row_variant.numel()} entries for {rows} input rows")
        if self.scale.device != device:
            _fail(f"mask is on {self.scale.device}, the input on {device}")

    def scale_rows(self, rows_shape: torch.Size) -> torch.Tensor:
        """d(h * scale + bias)/dh, broadcastable to an input of shape `rows_shape` (backward)."""
        if self.row_variant is None:
            return self.scale
        return self.scale[self.row_variant.long()].view(*rows_shape[:-1], self.num_neurons)

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        """h * scale + bias in float32, one rounding back to h's dtype: what the kernels compute."""
        n = h.shape[-1]
        if self.row_variant is None:
            return (h.float() * self.scale + self.bias).to(h.dtype)
        rp = self.row_variant.long()
        h2 = h.reshape(-1, n).float() * self.scale[rp] + self.bias[rp]
        return h2.to(h.dtype).view(h.shape)


@dataclass(frozen=True)
class StatsTarget:
    """One layer's statistics tables for the current batch; the kernels add into them.

    Per (group, neuron), over the input rows whose group id is >= 0, of the activation
    the down projection receives (after any mask, rounded to the storage dtype):
    sum, sum of squares, sum of |h|, count of h > threshold, and (gated MLPs, optional)
    count of act(gate) > threshold. Optionally per sequence: sum of |h| (layer top-k).
    Rows of one sequence are contiguous and share one group, which the kernels exploit.
    """

    group_ids: torch.Tensor  # [M] int32, -1: row not counted
    sum: torch.Tensor  # [G, N] float64
    sumsq: torch.Tensor  # [G, N] float64
    abs_sum: torch.Tensor  # [G, N] float64
    active: torch.Tensor  # [G, N] float64 (counts, exact below 2**53)
    gate_active: torch.Tensor | None  # [G, N] float64
    seq_ids: torch.Tensor | None  # [M] int32, -1: none; with seq_abs
    seq_abs: torch.Tensor | None  # [S, N] float32
    threshold: float

    def __post_init__(self):
        gid = self.group_ids
        if gid.dtype != torch.int32 or gid.dim() != 1 or not gid.is_contiguous():
            _fail(f"StatsTarget.group_ids must be contiguous int32 [rows], got {gid.dtype} {tuple(gid.shape)}")
        shape = self.sum.shape
        if len(shape) != 2:
            _fail(f"StatsTarget tables must be [groups, neurons], got {tuple(shape)}")
        for name in ("sum", "sumsq", "abs_sum", "active", "gate_active"):
            t = getattr(self, name)
            if t is None:
                if name != "gate_active":
                    _fail(f"StatsTarget.{name} is required")
                continue
            if t.dtype != torch.float64 or t.shape != shape or not t.is_contiguous():
                _fail(f"StatsTarget.{name} must be contiguous float64 {tuple(shape)}, got {t.dtype} {tuple(t.shape)}")
        if (self.seq_ids is None) != (self.seq_abs is None):
            _fail("StatsTarget.seq_ids and seq_abs come together")
        if self.seq_abs is not None:
            sid = self.seq_ids
            if sid.dtype != torch.int32 or sid.shape != gid.shape or not sid.is_contiguous():
                _fail(f"StatsTarget.seq_ids must be contiguous int32 like group_ids, got {sid.dtype} "
                      f"{tuple(sid.shape)}")
            sa = self.seq_abs
            if sa.dtype != torch.float32 or sa.dim() != 2 or sa.shape[1] != shape[1] or not sa.is_contiguous():
                _fail(f"StatsTarget.seq_abs must be contiguous float32 [seqs, {shape[1]}], got {sa.dtype} "
                      f"{tuple(sa.shape)}")
        if not isinstance(self.threshold, float):
            _fail(f"StatsTarget.threshold must be a float, got {type(self.threshold).__name__}")
        _same_device(gid, self.sum, self.sumsq, self.abs_sum, self.active, self.gate_active, self.seq_ids,
                     self.seq_abs)

    @property
    def num_groups(self) -> int:
        return self.sum.shape[0]

    @property
    def num_neurons(self) -> int:
        return self.sum.shape[1]

    @property
    def gate_stats(self) -> bool:
        return self.gate_active is not None

    @property
    def seq_stats(self) -> bool:
        return self.seq_abs is not None

    def check_input(self, rows: int, cols: int, device: torch.device) -> None:
        if self.num_neurons != cols:
            _fail(f"statistics tables cover {self.num_neurons} neurons but the layer has {cols}")
        if self.group_ids.numel() != rows:
            _fail(f"group_ids has {self.group_ids.numel()} entries for {rows} input rows")
        if self.sum.device != device:
            _fail(f"statistics tables are on {self.sum.device}, the input on {device}")

    def add_torch(self, h: torch.Tensor, a: torch.Tensor | None) -> None:
        """The reference accumulation with torch ops (float64 index_add_): the torch backend's
        statistics and the ground truth the kernels are tested against. `a` = act(gate).

        Rows not counted add exact zeros to group 0 instead of being filtered out: boolean
        indexing would synchronise a CUDA stream on every layer.
        """
        with torch.no_grad():
            n = h.shape[-1]
            gid = self.group_ids.long()
            keep = (gid >= 0).unsqueeze(-1)
            g = gid.clamp_min(0)
            hv = torch.where(keep, h.detach().reshape(-1, n).double(), 0.0)
            self.sum.index_add_(0, g, hv)
            self.sumsq.index_add_(0, g, hv * hv)
            self.abs_sum.index_add_(0, g, hv.abs())
            self.active.index_add_(0, g, (keep & (hv > self.threshold)).double())
            if self.gate_active is not None and a is not None:
                av = a.detach().reshape(-1, n).double()
                self.gate_active.index_add_(0, g, (keep & (av > self.threshold)).double())
            if self.seq_abs is not None:
                sid = self.seq_ids.long()
                sk = (sid >= 0).unsqueeze(-1)
                habs = torch.where(sk, h.detach().reshape(-1, n).float().abs(), 0.0)
                self.seq_abs.index_add_(0, sid.clamp_min(0), habs)
