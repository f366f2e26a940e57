"""An expert-parallel MoE block with disco, checked against a dense one.

Block: router (linear, top-k of softmax, renormalised), SwiGLU experts
(w2 @ (silu(x w1) * (x w3))), output = sum_k gate_k * expert_k(x). Each rank
holds E/W experts and its own tokens; disco moves tokens to experts and back,
and each local expert runs one matmul over its contiguous group of rows
(tokens_per_expert), as a grouped GEMM would. The same block computed densely
on all tokens must give the same output and gradients.

    python examples/moe_layer.py --ranks 4            # CPU, local backend (threads)
    python examples/moe_layer.py --ranks 2 --numpy    # forward only, numpy, no torch
    torchrun --nproc_per_node 2 examples/moe_layer.py # GPUs, nccl backend

Exit status 0 when the expert-parallel and dense results agree.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import numpy as np  # noqa: E402

import disco  # noqa: E402


def make_params(E: int, H: int, F: int, seed: int = 0) -> dict:
    """Global parameters, identical on every rank (same seed)."""
    g = np.random.default_rng(seed)
    p = {"router": g.standard_normal((H, E)) / np.sqrt(H),
         "w1": g.standard_normal((E, H, F)) / np.sqrt(H),
         "w3": g.standard_normal((E, H, F)) / np.sqrt(H),
         "w2": g.standard_normal((E, F, H)) / np.sqrt(F)}
    return {k: v.astype(np.float32) for k, v in p.items()}


def make_tokens(W: int, T: int, H: int, seed: int = 1) -> list:
    g = np.random.default_rng(seed)
    return [g.standard_normal((T, H)).astype(np.float32) for _ in range(W)]


# ---- numpy forward (no torch) ------------------------------------------------
def np_route(x: np.ndarray, router: np.ndarray, K: int):
    logits = x @ router
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    idx = np.argsort(-p, axis=1, kind="stable")[:, :K]
    gate = np.take_along_axis(p, idx, 1)
    return idx.astype(np.int64), (gate / gate.sum(1, keepdims=True)).astype(np.float32)


def np_expert(x: np.ndarray, p: dict, e: int) -> np.ndarray:
    a, b = x @ p["w1"][e], x @ p["w3"][e]
    return ((a / (1 + np.exp(-a))) * b) @ p["w2"][e]


def numpy_main(W: int, E: int, K: int, H: int, F: int, T: int) -> float:
    p = make_params(E, H, F)
    xs = make_tokens(W, T, H)
    comms = disco.local_group(W, num_experts=E, top_k=K, hidden=H, max_tokens=T)

    def rank(r: int, comm: disco.Comm) -> np.ndarray:
        idx, gate = np_route(xs[r], p["router"], K)
        res = comm.dispatch(xs[r], idx, gate)
        y = np.zeros_like(res.x)
        start = 0
        for lo, n in enumerate(res.tokens_per_expert.tolist()):
            e = r * comm.num_local_experts + lo
            y[start:start + n] = np_expert(res.x[start:start + n], p, e)
            start += n
        return comm.combine(y, res)

    outs = disco.run_ranks(comms, rank)
    err = 0.0
    for r in range(W):
        idx, gate = np_route(xs[r], p["router"], K)
        per_slot = [np.stack([np_expert(xs[r][t:t + 1], p, idx[t, j])[0] for t in range(T)])
                    for j in range(K)]
        dense = sum(gate[:, j:j + 1] * per_slot[j] for j in range(K))
        err = max(err, float(np.abs(outs[r] - dense).max()))
    for c in comms:
        c.close()
    return err


# ---- torch ---------------------------------------------------------------------
def torch_block(torch, x, params, K, experts):
    """Router + gates; `experts(x, idx, gate)` does the expert part."""
    logits = x @ params["router"]
    probs = torch.softmax(logits, dim=1)
    gate, idx = torch.topk(probs, K, dim=1)
    gate = gate / gate.sum(1, keepdim=True)
    return experts(x, idx, gate)


def swiglu(torch, x, w1, w3, w2):
    return (torch.nn.functional.silu(x @ w1) * (x @ w3)) @ w2


def torch_rank(torch, comm, x, params, local, K, dtype):
    """Forward+backward of one rank's expert-parallel block."""
    import disco.torch as dt

    def experts(x, idx, gate):
        res = dt.dispatch(comm, x.to(dtype), idx, gate.float().contiguous())
        ys, start = [], 0
        for lo, n in enumerate(res.tokens_per_expert.tolist()):  # grouped per expert
            rows = res.x[start:start + n].float()
            ys.append(swiglu(torch, rows, local["w1"][lo], local["w3"][lo], local["w2"][lo]))
            start += n
        y = torch.cat(ys) if ys else res.x.float()
        return dt.combine(comm, y.to(dtype).contiguous(), res).float()

    return torch_block(torch, x, params, K, experts)


def torch_dense(torch, xs, params, K, E):
    def experts(x, idx, gate):
        out = torch.zeros_like(x)
        for j in range(K):
            for e in range(E):
                m = idx[:, j] == e
                if m.any():
                    y = swiglu(torch, x[m], params["w1"][e], params["w3"][e], params["w2"][e])
                    out[m] = out[m] + gate[m, j:j + 1] * y
        return out

    return [torch_block(torch, x, params, K, experts) for x in xs]


def leaf(torch, a, device):
    return torch.tensor(a, device=device).requires_grad_()


def compare(r, out, x, local, dense, E_loc):
    """Max abs difference of output, x grad, local expert grads (router grads
    are compared on the sum over ranks by the caller)."""
    d_out, xs_d, p_d = dense
    errs = [(out - d_out[r]).abs().max().item(), (x.grad - xs_d[r].grad).abs().max().item()]
    for k in ("w1", "w3", "w2"):
        errs.append((local[k].grad - p_d[k].grad[r * E_loc:(r + 1) * E_loc]).abs().max().item())
    return max(errs)


def torch_main(args) -> float:
    import torch
    import torch.distributed as dist

    distributed = "LOCAL_RANK" in os.environ
    W, E, K, H, F, T = args.ranks, args.experts, args.top_k, args.hidden, args.ffn, args.tokens
    dtype = getattr(torch, args.dtype)
    if distributed:
        dist.init_process_group("nccl")
        W = dist.get_world_size()
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    E_loc = E // W
    gp = make_params(E, H, F)
    xs_np = make_tokens(W, T, H)

    # Dense reference on all tokens (every rank computes it, cheap at this size).
    p_d = {k: leaf(torch, v, device) for k, v in gp.items()}
    xs_d = [leaf(torch, x, device) for x in xs_np]
    gouts = [torch.randn(T, H, generator=torch.Generator().manual_seed(r)).to(device)
             for r in range(W)]
    d_out = torch_dense(torch, xs_d, p_d, K, E)
    torch.autograd.backward(d_out, gouts)
    dense = ([o.detach() for o in d_out], xs_d, p_d)

    def rank(r, comm):
        params = {"router": leaf(torch, gp["router"], device)}
        local = {k: leaf(torch, gp[k][r * E_loc:(r + 1) * E_loc], device)
                 for k in ("w1", "w3", "w2")}
        x = leaf(torch, xs_np[r], device)
        out = torch_rank(torch, comm, x, params, local, K, dtype)
        out.backward(gouts[r])
        return out.detach(), x, params["router"].grad, local

    cfg = dict(num_experts=E, top_k=K, hidden=H, max_tokens=T, dtype=dtype)
    if distributed:
        r = dist.get_rank()
        comm = disco.Comm.from_torch(**cfg)
        out, x, router_grad, local = rank(r, comm)
        err = compare(r, out, x, local, dense, E_loc)
        dist.all_reduce(router_grad)
        err = max(err, (router_grad - p_d["router"].grad).abs().max().item())
        e = torch.tensor([err], device=device)
        dist.all_reduce(e, op=dist.ReduceOp.MAX)
        comm.close()
        dist.destroy_process_group()
        return e.item()
    comms = disco.local_group(W, **cfg)
    results = disco.run_ranks(comms, rank)
    err = max(compare(r, res[0], res[1], res[3], dense, E_loc)
              for r, res in enumerate(results))
    router_grad = sum(res[2] for res in results)
    err = max(err, (router_grad - p_d["router"].grad).abs().max().item())
    for c in comms:
        c.close()
    return err


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=4, help="local backend: number of threads")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--ffn", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=64, help="tokens per rank")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--numpy", action="store_true", help="numpy forward only (no torch)")
    args = ap.parse_args()
    if args.numpy:
        err, what, tol = numpy_main(args.ranks, args.experts, args.top_k, args.hidden,
                                    args.ffn, args.tokens), "forward", 1e-4
    else:
        err, what = torch_main(args), "forward+backward"
        # bf16/fp16: x and expert outputs cross the wire rounded (~3 digits).
        tol = {"float32": 1e-4, "float16": 0.05, "bfloat16": 0.25}[args.dtype]
    ok = err <= tol
    if os.environ.get("RANK", "0") == "0":
        print(f"moe_layer: {what} max |expert-parallel - dense| = {err:.3g} "
              f"(tolerance {tol}): {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
