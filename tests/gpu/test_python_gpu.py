"""Python binding on GPUs: torch + NCCL backend, one process per GPU.

    DISCO_LIBRARY=build/libdisco.so PYTHONPATH=python \\
        torchrun --nproc_per_node 2 tests/gpu/test_python_gpu.py

Every rank runs the same checks in the same order (they are collective);
exit status is non-zero on any rank's failure. Checks: Comm.from_torch
bootstrap, dispatch metadata and combine bit for bit against the numpy
reference of docs/semantics.md (so the nccl backend agrees with the local one),
bf16, errors (bad id -> specific error here, REMOTE on peers, comm usable),
argument errors before any C call, autograd against a dense computation, the
MoE example, close.
"""

from __future__ import annotations

import os
import sys
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "python"))
sys.path.insert(0, os.path.join(REPO, "tests", "python"))
sys.path.insert(0, os.path.join(REPO, "examples"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import disco  # noqa: E402
import disco.torch as dt  # noqa: E402
import reference as ref  # noqa: E402

E_PER_RANK, K, H, T = 3, 2, 64, 40


def world_inputs(W, dtype_name, seed):
    """Every rank's inputs, generated identically on every rank."""
    g = np.random.default_rng(seed)
    Ts = [int(g.integers(0, T + 1)) for _ in range(W)]
    xs = [ref.random_data(g, (t, H), dtype_name) for t in Ts]
    idxs = [ref.random_routing(g, t, K, E_PER_RANK * W) for t in Ts]
    ws = [g.random((t, K), dtype=np.float32) for t in Ts]
    return Ts, xs, idxs, ws


def to_cuda(a):
    if a.dtype == ref.BF16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).cuda()
    return torch.from_numpy(a).cuda()


def to_numpy(t, like):
    t = t.cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16).view(like)
    return t.numpy()


def check_against_reference(comm, dtype_name, layout, align, seed):
    W, r = comm.world_size, comm.rank
    Ts, xs, idxs, ws = world_inputs(W, dtype_name, seed)
    res = comm.dispatch(to_cuda(xs[r]), to_cuda(idxs[r]), to_cuda(ws[r]), layout=layout,
                        expert_alignment=align)
    y = res.x * 2 if dtype_name != "bfloat16" else res.x
    out = comm.combine(y.contiguous(), res)
    torch.cuda.synchronize()
    want = ref.dispatch(xs, idxs, ws, E_PER_RANK * W, layout, align)
    # Every rank's y, as the reference needs them: y = 2 * recv_x (or recv_x).
    ys = [(w.x.astype(np.float32) * (2 if dtype_name != "bfloat16" else 1)).astype(w.x.dtype)
          for w in want]
    want_out = ref.combine(ys, want, Ts, layout)
    mine = want[r]
    assert res.num_rows == mine.num_rows, (res.num_rows, mine.num_rows)
    for f in ("src_rank", "src_token", "expert", "weight", "tokens_per_expert",
              "n_tokens_to_rank", "n_tokens_from_rank"):
        np.testing.assert_array_equal(getattr(res, f).cpu().numpy(), getattr(mine, f),
                                      err_msg=f)
    assert to_numpy(res.x, mine.x.dtype).tobytes() == mine.x.tobytes(), "recv_x"
    assert to_numpy(out, want_out[r].dtype).tobytes() == want_out[r].tobytes(), "combine"


def test_reference_fp32(comm):
    for i, (layout, align) in enumerate([("expert_major", 1), ("expert_major", 8),
                                         ("rank_major", 1)]):
        check_against_reference(comm, "float32", layout, align, seed=10 + i)


def test_reference_bf16(comm):
    if ref.BF16 is None:
        print("skip bf16 (ml_dtypes missing)")
        return
    check_against_reference(comm, "bfloat16", "expert_major", 1, seed=20)


def test_bad_id(comm):
    x = torch.zeros(4, H, device="cuda")
    idx = torch.zeros(4, K, dtype=torch.int64, device="cuda") - 1
    bad = idx.clone()
    bad[2, 1] = 10_000
    try:
        comm.dispatch(x, bad if comm.rank == 0 else idx)
    except disco.DiscoError as e:
        want = "DISCO_ERR_EXPERT_OUT_OF_RANGE" if comm.rank == 0 else "DISCO_ERR_REMOTE"
        assert e.name == want, (e.name, str(e))
    else:
        raise AssertionError("bad expert id not reported")
    res = comm.dispatch(x, idx)  # still usable
    comm.combine(res.x, res)


def test_argument_errors(comm):
    x = torch.zeros(4, H)
    idx = torch.zeros(4, K, dtype=torch.int64)
    for args, exc in [((x, idx), ValueError),                          # CPU tensors
                      ((x.cuda().double(), idx.cuda()), TypeError),
                      ((x.cuda()[:, ::2], idx.cuda()), ValueError)]:
        try:
            comm.dispatch(*args)
        except exc:
            pass
        else:
            raise AssertionError(f"{exc.__name__} not raised")


def test_autograd(comm):
    W, r = comm.world_size, comm.rank
    E = E_PER_RANK * W
    g = torch.Generator().manual_seed(3)
    A = (torch.randn(E, H, H, generator=g) / H ** 0.5).cuda()
    x0 = [torch.randn(T, H, generator=g).cuda() for _ in range(W)]
    w0 = [torch.rand(T, K, generator=g).cuda() for _ in range(W)]
    idx = [torch.from_numpy(ref.random_routing(np.random.default_rng(s), T, K, E)).cuda()
           for s in range(W)]
    gout = [torch.randn(T, H, generator=g).cuda() for _ in range(W)]
    x = x0[r].clone().requires_grad_()
    w = w0[r].clone().requires_grad_()
    res = dt.dispatch(comm, x, idx[r], w)
    ys, start = [], 0
    for lo, n in enumerate(res.tokens_per_expert.tolist()):
        ys.append(res.x[start:start + n] @ A[r * E_PER_RANK + lo])
        start += n
    out = dt.combine(comm, torch.cat(ys), res)
    out.backward(gout[r])
    xd = x0[r].clone().requires_grad_()
    wd = w0[r].clone().requires_grad_()
    dense = torch.zeros_like(xd)
    for j in range(K):
        for e in range(E):
            m = idx[r][:, j] == e
            if m.any():
                dense[m] = dense[m] + wd[m, j:j + 1] * (xd[m] @ A[e])
    dense.backward(gout[r])
    torch.testing.assert_close(out, dense, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, xd.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w.grad, wd.grad, rtol=1e-4, atol=1e-4)


TESTS = [test_reference_fp32, test_reference_bf16, test_bad_id, test_argument_errors,
         test_autograd]


def main() -> int:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    W = dist.get_world_size()
    failed = 0
    for dtype in ("float32", "bfloat16"):
        backend = os.environ.get("DISCO_TEST_BACKEND", "nccl")
        comm = disco.Comm.from_torch(num_experts=E_PER_RANK * W, top_k=K, hidden=H,
                                     max_tokens=T, dtype=dtype, timeout_ms=20000,
                                     backend=backend)
        assert comm.backend == backend and comm.uses_device_memory
        for t in TESTS:
            if (dtype == "bfloat16") != (t is test_reference_bf16):
                continue
            try:
                t(comm)
                comm.check()  # errors found on the device (nccl_device)
                status = "ok"
            except Exception:  # report and go on: the other ranks are in step
                failed += 1
                status = "FAILED\n" + traceback.format_exc()
            print(f"[rank {dist.get_rank()}] {t.__name__} ({dtype}): {status}", flush=True)
        comm.close()
    flag = torch.tensor([failed], device="cuda")
    dist.all_reduce(flag)
    dist.destroy_process_group()
    if dist_rank0():
        print("python gpu tests:", "PASSED" if flag.item() == 0 else "FAILED")
    return 0 if flag.item() == 0 else 1


def dist_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


if __name__ == "__main__":
    sys.exit(main())
