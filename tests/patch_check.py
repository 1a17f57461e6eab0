"""The exact-sparse-gradient setup the patch tests share (tests/test_patches.py on dense MLPs
and attention neurons, tests/test_moe_workflow.py on expert neurons): random patch values, the
loss, and one backward pass through the attached, patched model next to one through a dense
copy with the patch merged into its weights."""

import copy

import torch

import ssn_runtime
from ssn_runtime.training.patches import PatchState, merge_patch


def randomize_(state: PatchState, generator: torch.Generator, scale: float = 0.05) -> PatchState:
    """Every parameter of `state` drawn N(0, scale) from `generator`, in parameter order."""
    with torch.no_grad():
        for p in state.parameters():
            p.normal_(0, scale, generator=generator)
    return state


def loss_of(model, ids, mask):
    out = model(input_ids=ids, attention_mask=mask).logits
    return torch.nn.functional.cross_entropy(out[mask.bool()], ids[mask.bool()])


def sparse_and_dense_backward(model, state: PatchState, ids, mask, backend: str | None = None):
    """`loss_of` backward through `model` attached (on `backend`) with `state` as its patch, so
    the sparse gradients land in `state`; then through a deep copy of `model` with `state` merged
    and every weight trainable, so the dense gradients land in the copy's weights.
    Returns (loss, dense loss, dense copy)."""
    with ssn_runtime.attach(model, backend=backend) as h, h.intervene(patch=state):
        loss = loss_of(model, ids, mask)
        loss.backward()
    dense = copy.deepcopy(model)
    merge_patch(dense, state)
    for p in dense.parameters():
        p.requires_grad_(True)
    ref = loss_of(dense, ids, mask)
    ref.backward()
    return loss, ref, dense
