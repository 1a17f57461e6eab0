"""Host-to-device copies that do not make the host wait."""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """Host tensor `t` on `device` (None: unchanged). To CUDA it goes through pinned memory with
    non_blocking=True: a pageable copy makes torch wait for the stream, and the per-layer
    paths (mask tables, row plans, statistics plans) would stall the host once a layer.
    The caching host allocator keeps the pinned block until the copy has run."""
    if device is None:
        return t
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
