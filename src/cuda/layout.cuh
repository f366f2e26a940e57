/* Internal: the routing layout's device code (layout.cu's kernel, and the
 * nccl_device dispatch kernel for small batches): validation, per-rank and
 * per-expert counts, stable positions in token order, count messages.
 *
 * Determinism without sorting: inside a warp (32 consecutive tokens) each
 * token sets its lane bit in a shared bitmask per expert and per destination
 * rank (atomicOr commutes, so the result does not depend on timing); a
 * token's position among the warp's tokens with that column is the popcount
 * of the lower lanes. Warps of a block are scanned per column, blocks by the
 * last block to finish (finalize, in the same launch). */
#ifndef DISCO_CUDA_LAYOUT_CUH_
#define DISCO_CUDA_LAYOUT_CUH_

#include "cuda/kernels.h"

#define DISCO_LAYOUT_REG 8 /* slots per token kept in registers between passes */

__device__ __forceinline__ long long disco_id(const void *idx, int idx64, long long i) {
  return idx64 ? ((const long long *)idx)[i] : (long long)((const int *)idx)[i];
}

/* Finalize, run by the last layout block to finish: scan of the per-block
 * counts per column, status, count messages. `tot`: shared [nc] then
 * status[5]. Reads what other blocks wrote through L2. */
static __device__ void disco_finalize_body(const disco_kparams_t &p,
                                           const disco_dev_plan_t &pl, const void *idx,
                                           int idx64, int nblk, long long *tot) {
  const int nc = p.num_cols, E = p.num_experts, K = p.top_k;
  long long *st = tot + nc;
  /* the first bad slot, read ahead of the loop below (its latency hidden) */
  const unsigned long long key =
      threadIdx.x == 0 ? *(volatile unsigned long long *)p.err_key : ~0ull;
  /* Loads in batches: one at a time (the store to blk_base may alias the
   * next load for the compiler) cost an L2 round trip per layout block, ~10
   * us at 4096 tokens. */
  for (int c = threadIdx.x; c < nc; c += blockDim.x) {
    int acc = 0;
    for (int b0 = 0; b0 < nblk; b0 += DISCO_LAYOUT_REG) {
      int n[DISCO_LAYOUT_REG];
#pragma unroll
      for (int u = 0; u < DISCO_LAYOUT_REG; u++)
        n[u] = b0 + u < nblk ? __ldcg(&p.blk_cnt[(long long)(b0 + u) * nc + c]) : 0;
#pragma unroll
      for (int u = 0; u < DISCO_LAYOUT_REG; u++)
        if (b0 + u < nblk) {
          pl.blk_base[(long long)(b0 + u) * nc + c] = acc;
          acc += n[u];
        }
    }
    tot[c] = acc;
  }
  if (threadIdx.x == 0) {
    st[0] = st[1] = st[2] = st[3] = st[4] = 0;
    if (key != ~0ull) {
      long long t = (long long)(key / (unsigned long long)K);
      int j = (int)(key % (unsigned long long)K);
      long long v = disco_id(idx, idx64, (long long)key);
      st[0] = DISCO_ERR_EXPERT_OUT_OF_RANGE;
      if (v >= -1 && v < E) {
        st[0] = DISCO_ERR_DUPLICATE_EXPERT;
        for (int i = j - 1; i >= 0; i--)
          if (disco_id(idx, idx64, t * K + i) == v) st[4] = i;
      }
      st[1] = t;
      st[2] = j;
      st[3] = v;
      *p.err_key = ~0ull; /* ready for the next dispatch */
    }
  }
  __syncthreads();
  const int ml = p.msg_len;
  int64_t *send = pl.msg, *recv = pl.msg + (long long)p.world * ml;
  for (int i = threadIdx.x; i < p.world * ml; i += blockDim.x) {
    int d = i / ml, f = i % ml;
    long long v;
    if (f < DISCO_MSG_TOKENS)
      v = st[f];
    else if (f == DISCO_MSG_TOKENS)
      v = tot[E + d];
    else if (f == DISCO_MSG_LAYOUT)
      v = p.layout;
    else
      v = tot[d * p.num_local + (f - DISCO_MSG_COUNTS)];
    send[i] = v;
    if (d == p.rank) recv[i] = v; /* self: no transport */
  }
}

/* The layout kernel's work as block `blk` of `nblk` (smem: the kernel's
 * dynamic shared memory, disco_layout_smem bytes); the last block to finish
 * runs the finalize and gets 1 back (the others 0). Also run by the first
 * blocks of the nccl_device dispatch kernels (their layout fused). */
static __device__ int disco_layout_body(const disco_kparams_t &p,
                                        const disco_dev_plan_t &pl, const void *idx,
                                        int idx64, int T, int blk, int nblk,
                                        unsigned *smem) {
  const int nw = blockDim.x >> 5, nc = p.num_cols, K = p.top_k, E = p.num_experts;
  unsigned *mask = smem;           /* [nw, nc] lane bits */
  unsigned *base = smem + nw * nc; /* [nw, nc] tokens in earlier warps */
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const unsigned bit = 1u << lane;
  const int t = blk * blockDim.x + threadIdx.x;
  for (int i = threadIdx.x; i < nw * nc; i += blockDim.x) mask[i] = 0u;
  __syncthreads();
  /* A token's first DISCO_LAYOUT_REG slots stay in registers between the
   * passes: loads issued together, no read-back of pl.slot (each of those was
   * an L2 round trip in a row, ~1 us per slot in one block). */
  int ereg[DISCO_LAYOUT_REG];
  if (t < T) {
    const long long row = (long long)t * K;
    for (int j0 = 0; j0 < K; j0 += DISCO_LAYOUT_REG) {
      long long v[DISCO_LAYOUT_REG];
#pragma unroll
      for (int u = 0; u < DISCO_LAYOUT_REG; u++)
        v[u] = j0 + u < K ? disco_id(idx, idx64, row + j0 + u) : -1;
#pragma unroll
      for (int u = 0; u < DISCO_LAYOUT_REG; u++) {
        const int j = j0 + u;
        if (j >= K) continue; /* (not break: the loop stays fully unrolled) */
        int bad = v[u] < -1 || v[u] >= E;
        if (!bad && v[u] >= 0) {
#pragma unroll
          for (int i = 0; i < u; i++)
            if (v[i] == v[u]) bad = 1;
          for (int i = 0; i < j0; i++) /* K > DISCO_LAYOUT_REG only */
            if (disco_id(idx, idx64, row + i) == v[u]) bad = 1;
        }
        int e = -1;
        if (bad) {
          atomicMin(p.err_key, (unsigned long long)(row + j));
        } else if (v[u] >= 0) {
          e = (int)v[u];
          atomicOr(&mask[warp * nc + e], bit);
          atomicOr(&mask[warp * nc + E + e / p.num_local], bit);
        }
        pl.slot[row + j] = e;
        if (j0 == 0) ereg[u] = e;
      }
    }
  }
  __syncthreads();
  for (int c = threadIdx.x; c < nc; c += blockDim.x) {
    unsigned acc = 0;
    for (int w = 0; w < nw; w++) {
      base[w * nc + c] = acc;
      acc += __popc(mask[w * nc + c]);
    }
    p.blk_cnt[(long long)blk * nc + c] = (int)acc;
  }
  __syncthreads();
  if (t < T) {
    const unsigned lt = bit - 1u;
    const unsigned *m = mask + warp * nc, *b = base + warp * nc;
    const long long row = (long long)t * K;
#pragma unroll
    for (int j = 0; j < DISCO_LAYOUT_REG; j++)
      if (j < K) {
        const int e = ereg[j];
        pl.slot_pos[row + j] = e < 0 ? -1 : (int)(b[e] + __popc(m[e] & lt));
      }
    for (int j = DISCO_LAYOUT_REG; j < K; j++) {
      const int e = pl.slot[row + j];
      pl.slot_pos[row + j] = e < 0 ? -1 : (int)(b[e] + __popc(m[e] & lt));
    }
    /* Destinations ascending and deduplicated: walk the rank columns. */
    int nd = 0;
    const long long drow = (long long)t * p.kd;
    for (int d = 0; d < p.world && nd < p.kd; d++) {
      unsigned md = m[E + d];
      if (md & bit) {
        pl.tok_dest[drow + nd] = d;
        pl.tok_dpos[drow + nd] = (int)(b[E + d] + __popc(md & lt));
        nd++;
      }
    }
    for (; nd < p.kd; nd++) pl.tok_dest[drow + nd] = -1;
  }
  /* The last block to finish scans every block's counts (threadfence
   * reduction: counts and error keys are visible once the counter says all
   * blocks are done) and writes the count messages. */
  __shared__ int last;
  if (nblk > 1) { /* one block: its own writes are ordered by the barrier */
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(p.blk_done, 1u) == (unsigned)nblk - 1u;
    __syncthreads();
    if (!last) return 0;
    __threadfence();
  } else {
    __syncthreads();
  }
  disco_finalize_body(p, pl, idx, idx64, nblk, (long long *)smem);
  if (threadIdx.x == 0 && nblk > 1) *p.blk_done = 0u; /* ready for the next dispatch */
  return 1;
}

/* Dynamic shared memory of a layout block. */
static inline size_t disco_layout_smem(const disco_kparams_t *p) {
  size_t smem = 2u * (size_t)p->layout_warps * (size_t)p->num_cols * sizeof(unsigned);
  size_t fin = ((size_t)p->num_cols + 5) * sizeof(long long); /* reuses the masks */
  return fin > smem ? fin : smem;
}

#endif /* DISCO_CUDA_LAYOUT_CUH_ */
