"""Dispatch metadata and combine results against the numpy reference."""

import itertools

import numpy as np
import pytest

import disco
import reference as ref

needs_bf16 = pytest.mark.skipif(ref.BF16 is None, reason="ml_dtypes not installed")


def _inputs(rng, W, E, K, H, max_tokens, dtype, weighted, index_dtype=np.int64,
            allow_empty=True):
    Ts = [int(rng.integers(0 if allow_empty else 1, max_tokens + 1)) for _ in range(W)]
    xs = [ref.random_data(rng, (T, H), dtype) for T in Ts]
    idxs = [ref.random_routing(rng, T, K, E, index_dtype=index_dtype) for T in Ts]
    ws = [rng.random((T, K), dtype=np.float32) for T in Ts] if weighted else None
    return Ts, xs, idxs, ws


def _run(comms, xs, idxs, ws, layout, align, ys_fn=None, weighted=True):
    def step(r, c):
        res = c.dispatch(xs[r], idxs[r], None if ws is None else ws[r], layout=layout,
                         expert_alignment=align)
        y = res.x if ys_fn is None else ys_fn(r, res)
        return res, y, c.combine(y, res, weighted=weighted)
    return disco.run_ranks(comms, step)


def _assert_meta(res, want):
    assert res.num_rows == want.num_rows
    for field in ("src_rank", "src_token", "expert", "weight", "tokens_per_expert",
                  "n_tokens_to_rank", "n_tokens_from_rank"):
        got, exp = getattr(res, field), getattr(want, field)
        assert got.dtype == exp.dtype, field
        np.testing.assert_array_equal(got, exp, err_msg=field)
    assert res.x.shape == want.x.shape
    assert res.x.tobytes() == want.x.tobytes(), "recv x differs"


CASES = list(itertools.product([1, 2, 3, 4], ["expert_major", "rank_major"], [1, 4]))


@pytest.mark.parametrize("W,layout,align", CASES)
def test_metadata_and_combine_match_reference(make_group, W, layout, align):
    rng = np.random.default_rng(1000 * W + align + (layout == "rank_major"))
    E, K, H, T = 4 * W, min(3, 4 * W), 8, 12
    comms = make_group(W, num_experts=E, top_k=K, hidden=H, max_tokens=T)
    Ts, xs, idxs, ws = _inputs(rng, W, E, K, H, T, "float32", weighted=True)
    # Experts: a per-row deterministic transform so rows are distinguishable.
    outs = _run(comms, xs, idxs, ws, layout, align,
                ys_fn=lambda r, res: (res.x * np.float32(1.5) + np.float32(r)).astype(np.float32))
    want = ref.dispatch(xs, idxs, ws, E, layout, align)
    for r, (res, _, _) in enumerate(outs):
        _assert_meta(res, want[r])
    ys = [y for _, y, _ in outs]
    want_out = ref.combine(ys, want, Ts, layout)
    for r, (_, _, out) in enumerate(outs):
        assert out.shape == (Ts[r], H)
        assert out.tobytes() == want_out[r].tobytes(), f"combine differs on rank {r}"


@pytest.mark.parametrize("dtype", ["float32", "float16",
                                   pytest.param("bfloat16", marks=needs_bf16)])
@pytest.mark.parametrize("weighted", [True, False])
def test_dtypes_bitwise(make_group, dtype, weighted):
    rng = np.random.default_rng(7)
    W, E, K, H, T = 3, 6, 2, 16, 10
    comms = make_group(W, num_experts=E, top_k=K, hidden=H, max_tokens=T, dtype=dtype)
    Ts, xs, idxs, ws = _inputs(rng, W, E, K, H, T, dtype, weighted=True)
    outs = _run(comms, xs, idxs, ws, "expert_major", 1, weighted=weighted)
    want = ref.dispatch(xs, idxs, ws, E)
    want_out = ref.combine([y for _, y, _ in outs], want, Ts, weighted=weighted)
    for r, (res, _, out) in enumerate(outs):
        _assert_meta(res, want[r])
        assert res.x.dtype == xs[r].dtype and out.dtype == xs[r].dtype
        assert out.tobytes() == want_out[r].tobytes()


@needs_bf16
def test_bf16_as_uint16_bits(make_group):
    rng = np.random.default_rng(3)
    W, E, K, H, T = 2, 4, 2, 8, 6
    comms = make_group(W, num_experts=E, top_k=K, hidden=H, max_tokens=T, dtype="bf16")
    Ts, xs, idxs, ws = _inputs(rng, W, E, K, H, T, "bfloat16", weighted=True)
    bits = [x.view(np.uint16) for x in xs]
    outs = _run(comms, bits, idxs, ws, "expert_major", 1)
    outs_bf = _run(comms, xs, idxs, ws, "expert_major", 1)
    for (res, _, out), (res_bf, _, out_bf) in zip(outs, outs_bf):
        assert res.x.dtype == np.uint16 and out.dtype == np.uint16
        assert res.x.tobytes() == res_bf.x.tobytes()
        assert out.tobytes() == out_bf.tobytes()


def test_combine_wire_dtype(make_group):
    rng = np.random.default_rng(11)
    W, E, K, H, T = 2, 4, 3, 8, 9
    comms = make_group(W, num_experts=E, top_k=K, hidden=H, max_tokens=T, dtype="float16",
                       combine_wire="dtype")
    Ts, xs, idxs, ws = _inputs(rng, W, E, K, H, T, "float16", weighted=True)
    outs = _run(comms, xs, idxs, ws, "expert_major", 1)
    want = ref.dispatch(xs, idxs, ws, E)
    want_out = ref.combine([y for _, y, _ in outs], want, Ts, wire_dtype=np.float16)
    for r, (_, _, out) in enumerate(outs):
        assert out.tobytes() == want_out[r].tobytes()


def test_round_trip_identity_k1_bit_exact(make_group):
    rng = np.random.default_rng(5)
    W, E, H, T = 4, 8, 4, 16
    comms = make_group(W, num_experts=E, top_k=1, hidden=H, max_tokens=T)
    xs = [rng.standard_normal((T, H)).astype(np.float32) for _ in range(W)]
    xs[0][0, 0] = -0.0
    idxs = [rng.integers(0, E, size=(T, 1)) for _ in range(W)]
    outs = _run(comms, xs, idxs, None, "expert_major", 1)
    for r, (_, _, out) in enumerate(outs):
        assert out.tobytes() == xs[r].tobytes()


def test_int32_indices_and_unused_tokens(make_group):
    rng = np.random.default_rng(9)
    W, E, K, H, T = 2, 4, 2, 4, 8
    comms = make_group(W, num_experts=E, top_k=K, hidden=H, max_tokens=T)
    Ts, xs, idxs, ws = _inputs(rng, W, E, K, H, T, "float32", weighted=True,
                               index_dtype=np.int32, allow_empty=False)
    idxs[0][0] = -1  # a token with no expert gets zeros
    outs = _run(comms, xs, idxs, ws, "expert_major", 2)
    want = ref.dispatch(xs, idxs, ws, E, align=2)
    for r, (res, _, out) in enumerate(outs):
        _assert_meta(res, want[r])
    assert not outs[0][2][0].any()


def test_handle_reuse_and_multiple_combines(make_group):
    rng = np.random.default_rng(2)
    W, E, K, H, T = 2, 4, 2, 8, 5
    comms = make_group(W, num_experts=E, top_k=K, hidden=H, max_tokens=T)
    handles = [c.new_handle() for c in comms]

    def step(r, c):
        outs = []
        for _ in range(3):  # same handle, new routing each time
            x = rng_local[r].standard_normal((T, H)).astype(np.float32)
            idx = ref.random_routing(rng_local[r], T, K, E)
            res = c.dispatch(x, idx, handle=handles[r])
            a = c.combine(res.x, res, weighted=False)
            b = c.combine(res.x, res.handle, weighted=False)  # a Handle works too
            outs.append((x, idx, a, b))
        return outs

    rng_local = [np.random.default_rng(rng.integers(1 << 30)) for _ in range(W)]
    results = disco.run_ranks(comms, step)
    for r in range(W):
        for x, idx, a, b in results[r]:
            n_valid = (idx >= 0).sum(1, keepdims=True).astype(np.float32)
            np.testing.assert_allclose(a, x * n_valid, rtol=1e-6, atol=1e-6)
            assert a.tobytes() == b.tobytes()


def test_stale_result_rejected(make_group):
    comms = make_group(1, num_experts=2, top_k=1, hidden=4, max_tokens=4)
    c = comms[0]
    x = np.ones((2, 4), np.float32)
    idx = np.zeros((2, 1), np.int64)
    h = c.new_handle()
    old = c.dispatch(x, idx, handle=h)
    c.dispatch(x, idx, handle=h)
    with pytest.raises(ValueError, match="dispatched again"):
        c.combine(old.x, old)


def test_comm_properties(make_group):
    comms = make_group(2, num_experts=6, top_k=2, hidden=8, max_tokens=7, dtype="fp16")
    c = comms[1]
    assert (c.rank, c.world_size, c.num_local_experts) == (1, 2, 3)
    assert (c.num_experts, c.top_k, c.hidden, c.max_tokens) == (6, 2, 8, 7)
    assert c.dtype == "float16" and c.backend == "local" and not c.uses_device_memory
    assert "rank 1/2" in repr(c)
