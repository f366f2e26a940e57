/* Internal: the receive plan (offsets per source, expert groups, user counts)
 * from the received count messages; one block. Shared by the nccl backend's
 * recv_plan kernel and the nccl_device receive kernel. */
#ifndef DISCO_CUDA_RECV_PLAN_CUH_
#define DISCO_CUDA_RECV_PLAN_CUH_

#include "cuda/kernels.h"
#include "cuda/latch.cuh"

/* The error the host path would return, latched: the lowest failing rank's
 * status (own code or REMOTE), else CAPACITY. */
__device__ __forceinline__ void disco_latch_status(const disco_kparams_t &p,
                                                   const int64_t *recv, int ok,
                                                   long long rows, long long cap,
                                                   long long call) {
  if (ok) {
    if (rows > cap)
      disco_latch(p.lerr, DISCO_ERR_CAPACITY, p.rank, call, rows, cap, 0, 0);
    return;
  }
  for (int s = 0; s < p.world; s++) {
    const int64_t *m = recv + (long long)s * p.msg_len;
    const long long code = m[DISCO_MSG_CODE];
    if (code == 0) continue;
    disco_latch(p.lerr, s == p.rank ? code : (long long)DISCO_ERR_REMOTE, s, call,
                m[DISCO_MSG_ROW], m[DISCO_MSG_SLOT], m[DISCO_MSG_VALUE],
                s == p.rank ? m[DISCO_MSG_PREV] : code);
    return;
  }
}

/* Exclusive prefix sum of v over the lanes of a full warp; *total: the sum. */
__device__ __forceinline__ long long disco_warp_excl(long long v, int lane,
                                                     long long *total) {
  long long inc = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const long long u = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += u;
  }
  *total = __shfl_sync(0xffffffffu, inc, 31);
  return inc - v;
}

/* Long longs of shared memory the plan stages its inputs in (messages, then
 * expert totals and offsets); worlds whose messages need more read them
 * from global memory. */
#define DISCO_PLAN_SMEM 512

/* One block (all threads): receive offsets and expert groups from the
 * received messages: `src` (the nccl_device window; copied into pl.msg's
 * receive half on the way), or NULL when they are in pl.msg already. Works
 * in shared memory where the world fits (DISCO_PLAN_SMEM): read back from
 * global memory, each step was an L2 round trip in a row, ~4 us in all on
 * the small dispatch's critical path. */
static __device__ void disco_recv_plan_body(const disco_kparams_t &p,
                                            const disco_dev_plan_t &pl, int layout,
                                            int align, int32_t *n_to, int32_t *n_from,
                                            int32_t *tpe, int64_t *num_rows_out,
                                            long long cap, long long call,
                                            const long long *src) {
  const int W = p.world, L = p.num_local, ml = p.msg_len, n = W * ml;
  const int64_t *send = pl.msg;
  int64_t *grecv = pl.msg + n;
  const int expert_major = layout == DISCO_LAYOUT_EXPERT_MAJOR;
  __shared__ int ok, any_em;
  __shared__ long long rows;
  __shared__ long long sh[DISCO_PLAN_SMEM];
  const int staged = n + 2 * L + 1 <= DISCO_PLAN_SMEM;
  /* generic pointers: shared when staged, else global */
  const int64_t *recv = staged ? (const int64_t *)sh : grecv;
  int64_t *etot = staged ? (int64_t *)sh + n : pl.exp_total;
  int64_t *eoff = staged ? (int64_t *)sh + n + L : pl.exp_off;
  if (threadIdx.x == 0) ok = 1, any_em = 0;
  if (src != NULL || staged)
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const long long v = src != NULL ? __ldcg(src + i) : grecv[i];
      if (staged) sh[i] = v;
      if (src != NULL) grecv[i] = v;
    }
  __syncthreads();
  for (int s = threadIdx.x; s < W; s += blockDim.x) {
    if (recv[(long long)s * ml + DISCO_MSG_CODE] != 0) ok = 0;
    if (recv[(long long)s * ml + DISCO_MSG_LAYOUT] == DISCO_LAYOUT_EXPERT_MAJOR)
      any_em = 1;
  }
  for (int l = threadIdx.x; l < L; l += blockDim.x) {
    long long acc = 0;
    for (int s0 = 0; s0 < W; s0 += 8) { /* loads in batches (see the layout's) */
      long long c[8];
#pragma unroll
      for (int u = 0; u < 8; u++)
        c[u] = s0 + u < W ? recv[(long long)(s0 + u) * ml + DISCO_MSG_COUNTS + l] : 0;
#pragma unroll
      for (int u = 0; u < 8; u++)
        if (s0 + u < W) acc += c[u];
    }
    etot[l] = acc;
    if (staged) pl.exp_total[l] = acc;
  }
  __syncthreads();
  if (threadIdx.x < 32) { /* warp 0: prefix sums 32 at a time (no serial chain) */
    const int lane = threadIdx.x;
    long long off = 0, e = 0, tot;
    for (int s0 = 0; s0 < W; s0 += 32) {
      const int s = s0 + lane;
      const long long c = s < W ? recv[(long long)s * ml + DISCO_MSG_TOKENS] : 0;
      const long long ex = disco_warp_excl(c, lane, &tot);
      if (s < W) pl.recv_off[s] = off + ex;
      off += tot;
    }
    if (expert_major)
      for (int l0 = 0; l0 < L; l0 += 32) {
        const int l = l0 + lane;
        long long c = l < L ? etot[l] : 0;
        if (align > 1) c = (c + align - 1) / align * align;
        const long long ex = disco_warp_excl(c, lane, &tot);
        if (l < L) {
          eoff[l] = e + ex;
          if (staged) pl.exp_off[l] = e + ex;
        }
        e += tot;
      }
    if (lane == 0) {
      pl.recv_off[W] = off;
      rows = expert_major ? e : off;
      if (expert_major) {
        eoff[L] = e;
        if (staged) pl.exp_off[L] = e;
      }
      *pl.num_rows = rows;
      *pl.ok = ok;
      *pl.go = ok && rows <= cap;
      *pl.wide = p.wire32 && any_em;
      if (p.lerr != NULL) /* no host sync: latch what the host would return */
        disco_latch_status(p, recv, ok, rows, cap, call);
    }
  }
  __syncthreads();
  const int out = ok && rows <= cap; /* nothing reaches the caller on failure */
  if (out && threadIdx.x == 0 && num_rows_out) *num_rows_out = rows;
  for (int s = threadIdx.x; out && s < W; s += blockDim.x) {
    if (n_to) n_to[s] = (int32_t)send[(long long)s * ml + DISCO_MSG_TOKENS];
    if (n_from) n_from[s] = (int32_t)recv[(long long)s * ml + DISCO_MSG_TOKENS];
  }
  /* Where source s's rows of local expert l start: the group's start plus
   * the earlier sources' rows. */
  for (int l = threadIdx.x; l < L; l += blockDim.x) {
    long long acc = expert_major ? eoff[l] : 0;
    for (int s = 0; s < W; s++) {
      pl.srcbase[(long long)s * L + l] = acc;
      acc += recv[(long long)s * ml + DISCO_MSG_COUNTS + l];
    }
    if (tpe && out) tpe[l] = (int32_t)(expert_major ? eoff[l + 1] - eoff[l] : etot[l]);
  }
}

#endif /* DISCO_CUDA_RECV_PLAN_CUH_ */
