"""The packed cache's C++ kernels (csrc/packed_cache.cpp via ssn_runtime/core/cpp_ops.py): decode
attention equals attention over the same columns in float64 (float32 to 1e-5, bfloat16 to its
rounding), for head sizes on the vector path (64, 128, 256) and off it (12, 20), grouped heads,
sliding windows, rows in any slots; each row's result is the same bits whatever the thread
count and whichever rows share the call; the key/value scatter equals torch's index writes and
the slot moves of a leave equal PackedCache.keep's torch loop, bit for bit; every bad argument
is refused before a pointer crosses into C++."""

import pytest
import torch

from ssn_runtime.core import cpp_ops

pytestmark = pytest.mark.skipif(not cpp_ops.available("decode_attention"), reason="C++ kernels not built")


def _case(dtype, D, G, Hkv=2, n=5, slots=7, cols=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = torch.randn(slots, Hkv, cols, D, generator=g).to(dtype)
    V = torch.randn(slots, Hkv, cols, D, generator=g).to(dtype)
    T = n + 3  # the query holds further token rows (a join's) after the decoding ones
    q = (torch.randn(1, Hkv * G, T, D, generator=g) * 2).to(dtype)
    which = torch.randperm(slots, generator=g)[:n]  # any slots, in any order
    cols_ = torch.randint(0, cols, (n,), generator=g)
    cols_[0] = 0  # a row holding a single column
    return q, K, V, cpp_ops.CacheRows(which.clone(), cols_.clone()), which, cols_


def _reference(q, K, V, which, cols, window, scale):
    """float64 softmax(q k^T * scale) v over each row's columns [len - window, len)."""
    n, Hq = len(which), q.shape[1]
    G = Hq // K.shape[1]
    out = torch.empty(n, Hq, V.shape[3], dtype=torch.float64)
    for i, (s, c) in enumerate(zip(which.tolist(), cols.tolist(), strict=True)):
        lo = max(0, c + 1 - window) if window else 0
        for h in range(Hq):
            k = K[s, h // G, lo:c + 1].double()
            v = V[s, h // G, lo:c + 1].double()
            p = torch.softmax(q[0, h, i].double() @ k.T * scale, -1)
            out[i, h] = p @ v
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("D", [12, 20, 64, 128, 256])
@pytest.mark.parametrize("G,window", [(1, 0), (3, 0), (3, 6)], ids=["mha", "gqa", "gqa-window"])
def test_decode_attention_equals_float64_attention_over_the_same_columns(dtype, D, G, window):
    q, K, V, rows, which, cols = _case(dtype, D, G)
    scale = D ** -0.5
    out = torch.full((q.shape[2], q.shape[1], D), float("nan"), dtype=dtype)
    cpp_ops.decode_attention(q[0], K, V, rows, window, scale, out)
    want = _reference(q, K, V, which, cols, window, scale)
    tol = dict(rtol=1e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out[:rows.n].double(), want, **tol)
    assert out[rows.n:].isnan().all()  # token rows past the decoding ones are left alone


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_a_rows_result_is_the_same_bits_whatever_threads_and_batch(dtype):
    q, K, V, rows, which, cols = _case(dtype, 64, 3, n=12, slots=16, cols=300)
    outs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            out = torch.empty((q.shape[2], q.shape[1], 64), dtype=dtype)
            cpp_ops.decode_attention(q[0], K, V, rows, 0, 0.125, out)
        finally:
            torch.set_num_threads(2)
        outs.append(out[:rows.n])
    assert torch.equal(outs[0], outs[1])
    alone = torch.empty((1, q.shape[1], 64), dtype=dtype)  # row 4 by itself
    cpp_ops.decode_attention(q[0, :, 4:5], K, V, cpp_ops.CacheRows(which[4:5].clone(), cols[4:5].clone()), 0, 0.125,
                             alone)
    assert torch.equal(alone[0], outs[0][4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_scatter_kv_equals_index_writes(dtype):
    g = torch.Generator().manual_seed(3)
    K = torch.randn(6, 3, 30, 20, generator=g).to(dtype)
    want = K.clone()
    slots = torch.tensor([4, 0, 4, 4, 2])
    cols = torch.tensor([7, 0, 8, 9, 29])
    src = torch.randn(1, 3, 5, 20, generator=g).to(dtype)
    want[slots, :, cols] = src[0].transpose(0, 1)
    cpp_ops.scatter_kv(src[0], K, cpp_ops.CacheRows(slots, cols))
    assert torch.equal(K, want)


def test_bad_arguments_are_refused():
    q, K, V, rows, which, cols = _case(torch.float32, 16, 2)
    out = torch.empty((q.shape[2], q.shape[1], 16))

    def call(**kw):
        a = dict(query=q[0], k=K, v=V, rows=rows, window=0, scale=0.25, out=out)
        a.update(kw)
        cpp_ops.decode_attention(**a)

    call()
    far = cpp_ops.CacheRows(torch.tensor([K.shape[0]]), torch.tensor([0]))
    deep = cpp_ops.CacheRows(torch.tensor([0]), torch.tensor([K.shape[2]]))
    for kw in ({"rows": far}, {"rows": deep}, {"k": K.bfloat16()}, {"out": out.bfloat16()},
               {"query": q[0].transpose(1, 2)}, {"k": K.transpose(2, 3)}, {"out": out[:, :3]},
               {"v": V[:, :1]}, {"query": q[0, :3]}, {"query": q[0, :, :2]}, {"window": -1}, {"scale": float("nan")},
               {"query": q[0].double()}, {"k": K[..., :8], "v": V[..., :8]}):
        with pytest.raises(ValueError):
            call(**kw)
    for s, c in ((torch.tensor([-1]), torch.tensor([0])), (torch.tensor([0]), torch.tensor([-2])),
                 (torch.tensor([0], dtype=torch.int32), torch.tensor([0])), (torch.tensor([0.0]), torch.tensor([0])),
                 (torch.tensor([0, 1]), torch.tensor([0])), (torch.tensor([[0]]), torch.tensor([[0]]))):
        with pytest.raises(ValueError):
            cpp_ops.CacheRows(s, c)
    src = torch.randn(K.shape[1], rows.n, 16)
    cpp_ops.scatter_kv(src, K, rows)
    for a, b in ((src.bfloat16(), K), (src[:1], K), (src[..., :8], K), (src.transpose(0, 1), K),
                 (src, K.transpose(2, 3)), (src[:, :2], K)):
        with pytest.raises(ValueError):
            cpp_ops.scatter_kv(a, b, rows)
    with pytest.raises(ValueError):
        cpp_ops.scatter_kv(src[:, :1], K, far)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("keep", [[0, 2, 5, 7], [0, 1, 2], [6], [3, 4, 5, 6, 7], list(range(8))],
                         ids=["holes", "tail-leaves", "one-stays", "head-leaves", "none-leave"])
def test_slot_moves_equal_the_torch_keep(dtype, keep):
    """PackedCache.keep with the C++ moves leaves every layer's keys and values exactly as its
    torch loop does (a layer with fewer slots than the others too: a row whose step failed
    before that layer ran)."""
    from ssn_runtime.serve import packed

    g = torch.Generator().manual_seed(11)
    lengths = [5, 17, 1, 30, 9, 22, 3, 12]
    layers = {}
    for layer, rows in enumerate((8, 8, 6)):
        kv = []
        for _ in range(2):
            t = torch.randn(rows, 3, 32, 20, generator=g)
            for s in range(rows):  # columns past a row's length are zero, as the cache keeps them
                t[s, :, lengths[s]:] = 0
            kv.append(t.to(dtype))
        layers[layer] = tuple(kv)
    caches = []
    for native in (False, True):
        kv = packed.PackedCache(8, native=native)
        kv.layers = {i: (k.clone(), v.clone()) for i, (k, v) in layers.items()}
        caches.append((kv, kv.keep(list(keep), list(lengths))))
    (torch_kv, torch_order), (cpp_kv, cpp_order) = caches
    assert torch_order == cpp_order
    for i in layers:
        for a, b in zip(torch_kv.layers[i], cpp_kv.layers[i], strict=True):
            assert torch.equal(a, b), i


def test_slot_moves_refuse_bad_arguments():
    lengths = [3, 4, 5, 6]
    cpp_ops.SlotMoves([0, 1], [3, 2], lengths, 2)
    for args in (([1, 0], [3, 2], lengths, 2), ([0], [4], lengths, 1), ([-1], [3], lengths, 1),
                 ([0], [3], [3, -1, 5, 6], 1), ([0], [3.0], lengths, 1), ([0], [3], lengths, 5),
                 ([0, 1], [3], lengths, 2), ([True], [3], lengths, 1)):
        with pytest.raises(ValueError):
            cpp_ops.SlotMoves(*args)
    moves = cpp_ops.SlotMoves([0], [3], lengths, 1)
    cpp_ops.move_slots(torch.zeros(4, 2, 6, 8), moves)
    for t in (torch.zeros(4, 2, 5, 8), torch.zeros(4, 2, 6, 8, dtype=torch.float64),
              torch.zeros(4, 2, 8, 6).transpose(2, 3), torch.zeros(4, 2, 6)):
        with pytest.raises(ValueError):
            cpp_ops.move_slots(t, moves)
