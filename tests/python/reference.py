"""Pure-numpy whole-world reference of docs/semantics.md.

Written from the spec, independently of the C library, so the binding's
outputs (and through them the library's) are checked against the document
rather than against another implementation of the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

try:
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    BF16 = None


def np_dtype(name: str) -> np.dtype:
    return BF16 if name == "bfloat16" else np.dtype(name)


@dataclass
class RankOut:
    x: np.ndarray
    src_rank: np.ndarray
    src_token: np.ndarray
    expert: np.ndarray
    weight: np.ndarray
    tokens_per_expert: np.ndarray
    n_tokens_to_rank: np.ndarray
    n_tokens_from_rank: np.ndarray
    num_rows: int


def dispatch(xs: Sequence[np.ndarray], idxs: Sequence[np.ndarray],
             ws: Optional[Sequence[np.ndarray]], num_experts: int, layout: str = "expert_major",
             align: int = 1) -> List[RankOut]:
    W = len(xs)
    E_loc = num_experts // W
    H = xs[0].shape[1]
    K = idxs[0].shape[1]
    dt = xs[0].dtype

    def w_of(s: int, t: int, j: int) -> np.float32:
        return np.float32(1.0) if ws is None else np.float32(ws[s][t, j])

    def dests(s: int, t: int) -> set:
        return {int(e) // E_loc for e in idxs[s][t] if e >= 0}

    outs = []
    for r in range(W):
        to_rank = np.array([sum(1 for t in range(len(xs[r])) if d in dests(r, t))
                            for d in range(W)], np.int32)
        from_rank = np.array([sum(1 for t in range(len(xs[s])) if r in dests(s, t))
                              for s in range(W)], np.int32)
        rows_x, src_r, src_t, exp, wt = [], [], [], [], []
        tpe = np.zeros(E_loc, np.int32)
        if layout == "expert_major":
            for lo in range(E_loc):
                e = r * E_loc + lo
                n = 0
                for s in range(W):
                    for t in range(len(xs[s])):
                        js = np.nonzero(idxs[s][t] == e)[0]
                        if len(js):
                            rows_x.append(xs[s][t])
                            src_r.append(s)
                            src_t.append(t)
                            exp.append(e)
                            wt.append(w_of(s, t, int(js[0])))
                            n += 1
                while align > 1 and n % align:
                    rows_x.append(np.zeros(H, dt))
                    src_r.append(-1)
                    src_t.append(-1)
                    exp.append(-1)
                    wt.append(np.float32(0.0))
                    n += 1
                tpe[lo] = n
            exp_a = np.array(exp, np.int32).reshape(-1)
            wt_a = np.array(wt, np.float32).reshape(-1)
        else:
            for s in range(W):
                for t in range(len(xs[s])):
                    if r not in dests(s, t):
                        continue
                    rows_x.append(xs[s][t])
                    src_r.append(s)
                    src_t.append(t)
                    le, lw = [], []
                    for j in range(K):
                        e = int(idxs[s][t, j])
                        local = e >= 0 and e // E_loc == r
                        le.append(e - r * E_loc if local else -1)
                        lw.append(w_of(s, t, j) if local else np.float32(0.0))
                        if local:
                            tpe[e - r * E_loc] += 1
                    exp.append(le)
                    wt.append(lw)
            exp_a = np.array(exp, np.int32).reshape(-1, K)
            wt_a = np.array(wt, np.float32).reshape(-1, K)
        n_rows = len(rows_x)
        x = np.array(rows_x, dt).reshape(n_rows, H)
        outs.append(RankOut(x, np.array(src_r, np.int32), np.array(src_t, np.int32), exp_a, wt_a,
                            tpe, to_rank, from_rank, n_rows))
    return outs


def combine(ys: Sequence[np.ndarray], disp: Sequence[RankOut], num_tokens: Sequence[int],
            layout: str = "expert_major", weighted: bool = True,
            wire_dtype: Optional[np.dtype] = None) -> List[np.ndarray]:
    """out[t] per semantics.md: fold (from the first term, fp32, products
    rounded to fp32) over local experts ascending on each destination, then
    over destinations ascending on the token's rank; one final cast."""
    W = len(ys)
    H = ys[0].shape[1]
    dt = ys[0].dtype
    partial = {}  # (s, t) -> list over d ascending of fp32 partial rows
    for d in range(W):
        res = disp[d]
        acc = {}
        for row in range(res.num_rows):
            s, t = int(res.src_rank[row]), int(res.src_token[row])
            if s < 0:
                continue
            y = ys[d][row].astype(np.float32)
            if layout == "expert_major":
                term = (np.float32(res.weight[row]) * y).astype(np.float32) if weighted else y
            else:
                term = y
            acc[(s, t)] = term if (s, t) not in acc else (acc[(s, t)] + term).astype(np.float32)
        for key, p in acc.items():
            if wire_dtype is not None:
                p = p.astype(wire_dtype).astype(np.float32)
            partial.setdefault(key, []).append(p)
    outs = []
    for s in range(W):
        out = np.zeros((num_tokens[s], H), np.float32)
        for t in range(num_tokens[s]):
            parts = partial.get((s, t), [])
            if parts:
                v = parts[0]
                for p in parts[1:]:
                    v = (v + p).astype(np.float32)
                out[t] = v
        outs.append(out.astype(dt))
    return outs


def random_routing(rng: np.random.Generator, T: int, K: int, E: int,
                   p_unused: float = 0.15, index_dtype=np.int64) -> np.ndarray:
    """[T, K] distinct expert ids per row, some slots -1."""
    idx = np.empty((T, K), index_dtype)
    for t in range(T):
        idx[t] = rng.choice(E, size=K, replace=False)
        idx[t][rng.random(K) < p_unused] = -1
    return idx


def random_data(rng: np.random.Generator, shape, dtype_name: str) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32).astype(np_dtype(dtype_name))
