"""torch tensors and autograd (skipped when torch is not installed).

The library has no float64, so torch.autograd.gradcheck runs in float32 with
loose tolerances (the maps are linear in x and bilinear in (y, w), so central
differences are exact up to rounding); the main check compares analytic
gradients with the same computation done densely on one device.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import disco  # noqa: E402
import disco.torch as dt  # noqa: E402
import reference as ref  # noqa: E402


def _routing(seed, W, T, K, E):
    g = np.random.default_rng(seed)
    return [torch.from_numpy(ref.random_routing(g, T, K, E)) for _ in range(W)]


def test_torch_cpu_round_trip_matches_numpy(make_group):
    W, E, K, H, T = 2, 4, 2, 8, 6
    comms = make_group(W, num_experts=E, top_k=K, hidden=H, max_tokens=T)
    idx = _routing(0, W, T, K, E)
    xs = [torch.randn(T, H) for _ in range(W)]
    ws = [torch.rand(T, K) for _ in range(W)]
    tres = disco.run_ranks(comms, lambda r, c: c.dispatch(xs[r], idx[r], ws[r]))
    nres = disco.run_ranks(comms, lambda r, c: c.dispatch(xs[r].numpy(), idx[r].numpy(),
                                                          ws[r].numpy()))
    for a, b in zip(tres, nres):
        assert isinstance(a.x, torch.Tensor) and a.src_rank.dtype == torch.int32
        np.testing.assert_array_equal(a.x.numpy(), b.x)
        np.testing.assert_array_equal(a.expert.numpy(), b.expert)
        np.testing.assert_array_equal(a.tokens_per_expert.numpy(), b.tokens_per_expert)


def test_torch_argument_errors(make_group):
    (c,) = make_group(1, num_experts=2, top_k=1, hidden=4, max_tokens=4)
    x, idx = torch.zeros(2, 4), torch.zeros(2, 1, dtype=torch.int64)
    with pytest.raises(TypeError, match="x has dtype float64"):
        c.dispatch(x.double(), idx)
    with pytest.raises(ValueError, match="C-contiguous"):
        c.dispatch(torch.zeros(4, 2).t(), idx)
    with pytest.raises(TypeError, match="do not mix"):
        c.dispatch(x, idx.numpy())
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="is on cuda:0"):
            c.dispatch(x.cuda(), idx.cuda())


def _dense_moe(xs, idx, ws, weights_per_expert, E):
    """out[t] = sum_j w[t,j] * (x[t] @ A[e]) on one device."""
    outs = []
    for x, i, w in zip(xs, idx, ws):
        out = torch.zeros_like(x)
        for j in range(i.shape[1]):
            for e in range(E):
                m = i[:, j] == e
                if m.any():
                    out[m] = out[m] + w[m, j:j + 1] * (x[m] @ weights_per_expert[e])
        outs.append(out)
    return outs


@pytest.mark.parametrize("W,layout,align", [(1, "expert_major", 1), (2, "expert_major", 4),
                                            (3, "expert_major", 1), (2, "rank_major", 1),
                                            (4, "rank_major", 1)])
def test_autograd_matches_dense(make_group, W, layout, align):
    torch.manual_seed(0)
    E, K, H, T = 2 * W, 2, 8, 5
    comms = make_group(W, num_experts=E, top_k=K, hidden=H, max_tokens=T)
    idx = _routing(W, W, T, K, E)
    A = torch.randn(E, H, H) / H ** 0.5
    x0 = [torch.randn(T, H) for _ in range(W)]
    w0 = [torch.rand(T, K) for _ in range(W)]
    gout = [torch.randn(T, H) for _ in range(W)]
    E_loc = E // W

    def step(r, c):
        x = x0[r].clone().requires_grad_()
        w = w0[r].clone().requires_grad_()
        res = dt.dispatch(c, x, idx[r], w, layout=layout, expert_alignment=align)
        if layout == "expert_major":
            ys, start = [], 0
            for lo, n in enumerate(res.tokens_per_expert.tolist()):
                ys.append(res.x[start:start + n] @ A[r * E_loc + lo])
                start += n
            y = torch.cat(ys)
        else:  # the caller reduces the local experts with res.weight
            y = torch.zeros_like(res.x)
            for j in range(K):
                for lo in range(E_loc):
                    m = (res.expert[:, j] == lo).unsqueeze(1)
                    y = y + m * res.weight[:, j:j + 1] * (res.x @ A[r * E_loc + lo])
        out = dt.combine(c, y, res)
        out.backward(gout[r])
        return out.detach(), x.grad, w.grad

    got = disco.run_ranks(comms, step)
    xs = [x.clone().requires_grad_() for x in x0]
    ws = [w.clone().requires_grad_() for w in w0]
    want = _dense_moe(xs, idx, ws, A, E)
    torch.autograd.backward(want, gout)
    for r in range(W):
        torch.testing.assert_close(got[r][0], want[r].detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[r][1], xs[r].grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[r][2], ws[r].grad, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:Input #.* is not a double precision")
@pytest.mark.parametrize("layout", ["expert_major", "rank_major"])
def test_gradcheck_float32(make_group, layout):
    (c,) = make_group(1, num_experts=4, top_k=3, hidden=4, max_tokens=4)
    idx = torch.tensor([[0, 2, -1], [3, 1, 0], [-1, -1, -1], [2, 3, 1]])
    x = torch.randn(4, 4, requires_grad=True)
    w = torch.rand(4, 3, requires_grad=True)
    scale = torch.randn(4, 4)

    def f(x, w):
        res = dt.dispatch(c, x, idx, w, layout=layout)
        if layout == "expert_major":
            y = res.x * scale[res.expert.long()].to(res.x.dtype)
        else:
            y = (res.x.unsqueeze(1) * res.weight.unsqueeze(2)).sum(1)
        return dt.combine(c, y, res)

    assert torch.autograd.gradcheck(f, (x, w), eps=1e-2, atol=2e-3, rtol=1e-2)


def test_h_smaller_than_k_weight_gradient(make_group):
    # K > H: the weight gradient needs ceil(K/H) combines.
    W, E, K, H, T = 2, 16, 6, 4, 3
    comms = make_group(W, num_experts=E, top_k=K, hidden=H, max_tokens=T)
    idx = _routing(5, W, T, K, E)
    x0 = [torch.randn(T, H) for _ in range(W)]
    w0 = [torch.rand(T, K) for _ in range(W)]

    def step(r, c):
        x = x0[r].clone().requires_grad_()
        w = w0[r].clone().requires_grad_()
        res = dt.dispatch(c, x, idx[r], w)
        out = dt.combine(c, res.x * 2.0, res)
        out.sum().backward()
        return w.grad

    got = disco.run_ranks(comms, step)
    for r in range(W):
        want = (2.0 * x0[r].sum(1, keepdim=True)).expand(T, K) * (idx[r] >= 0)
        torch.testing.assert_close(got[r], want, rtol=1e-5, atol=1e-5)


def test_bf16_autograd_runs(make_group):
    W, E, K, H, T = 2, 4, 2, 8, 4
    comms = make_group(W, num_experts=E, top_k=K, hidden=H, max_tokens=T, dtype="bfloat16")
    idx = _routing(1, W, T, K, E)

    def step(r, c):
        x = torch.randn(T, H, dtype=torch.bfloat16, requires_grad=True)
        w = torch.rand(T, K, requires_grad=True)
        res = dt.dispatch(c, x, idx[r], w)
        out = dt.combine(c, res.x, res)
        out.float().sum().backward()
        return x.grad.dtype, w.grad.dtype

    for gx, gw in disco.run_ranks(comms, step):
        assert gx == torch.bfloat16 and gw == torch.float32
