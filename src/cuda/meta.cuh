/* Internal: the metadata rows that travel with dispatched tokens, shared by
 * the kernels of both GPU backends (data.cu, nd_kernels.cu).
 *
 * A row sent for (token t, destination d): [src_token, n_local, then
 * (j | l << 8, pos, weight) per slot j of t whose expert is d's local
 * expert l, in slot order]; pos is the token's position among the sending
 * rank's tokens of that expert. CG: read rows written by other GPUs during
 * the kernel through L2 (ld.global.cg) rather than as constant data. */
#ifndef DISCO_CUDA_META_CUH_
#define DISCO_CUDA_META_CUH_

#include "cuda/kernels.h"

template <bool CG>
__device__ __forceinline__ int disco_ld_meta(const int *p) {
  return CG ? __ldcg(p) : *p;
}

/* Source rank of received token i, given the receive offsets (ascending,
 * W + 1 of them, in global or shared memory). */
__device__ __forceinline__ int disco_source_in(const int64_t *recv_off, int W,
                                               long long i) {
  int lo = 0, hi = W - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) >> 1;
    if (recv_off[mid] <= i)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

/* The same from the plan. */
__device__ __forceinline__ int disco_source(const disco_dev_plan_t &pl, int W,
                                            long long i) {
  return disco_source_in(pl.recv_off, W, i);
}

/* One warp (lane 0..31) writes token t's metadata row for destination d at
 * `meta`; bb is t's layout-block base. */
__device__ __forceinline__ void disco_meta_row(const disco_kparams_t &p,
                                               const disco_dev_plan_t &pl, const int *bb,
                                               const float *w, int t, int d, int lane,
                                               int *meta) {
  const int K = p.top_k, L = p.num_local;
  int n = 0;
  for (int jb = 0; jb < K; jb += 32) {
    int j = jb + lane;
    int e = j < K ? pl.slot[(long long)t * K + j] : -1;
    int mine = e >= 0 && e / L == d;
    unsigned bal = __ballot_sync(0xffffffffu, mine);
    if (mine) {
      int i = n + __popc(bal & ((1u << lane) - 1u));
      meta[2 + 3 * i] = j | ((e - d * L) << 8);
      meta[3 + 3 * i] = bb[e] + pl.slot_pos[(long long)t * K + j];
      meta[4 + 3 * i] = __float_as_int(w ? w[(long long)t * K + j] : 1.0f);
    }
    n += __popc(bal);
  }
  if (lane == 0) {
    meta[0] = t;
    meta[1] = n;
  }
}

/* EXPERT_MAJOR, one warp: received token i (from source s, metadata `meta`)
 * -> combine's row list (local experts ascending) and the caller's per-row
 * metadata; sb = srcbase of s. */
template <bool CG>
__device__ __forceinline__ void disco_expand_meta(const disco_kparams_t &p,
                                                  const disco_dev_plan_t &pl,
                                                  const int *meta, int s, long long i,
                                                  const int64_t *sb, int lane,
                                                  int *src_rank, int *src_token,
                                                  int *expert, float *weight) {
  const int K = p.top_k, L = p.num_local;
  const int t = disco_ld_meta<CG>(meta), n = disco_ld_meta<CG>(meta + 1);
  for (int q = lane; q < n; q += 32) {
    const int l = disco_ld_meta<CG>(meta + 2 + 3 * q) >> 8;
    const float wt = __int_as_float(disco_ld_meta<CG>(meta + 4 + 3 * q));
    const long long row = sb[l] + disco_ld_meta<CG>(meta + 3 + 3 * q);
    int rk = 0; /* rank by local expert: combine folds experts ascending */
    for (int o = 0; o < n; o++) rk += (disco_ld_meta<CG>(meta + 2 + 3 * o) >> 8) < l;
    pl.comb_rows[i * K + rk] = (int)row;
    pl.comb_w[i * K + rk] = wt;
    if (src_rank) src_rank[row] = s;
    if (src_token) src_token[row] = t;
    if (expert) expert[row] = p.rank * L + l;
    if (weight) weight[row] = wt;
  }
  if (lane == 0 && n < K) pl.comb_rows[i * K + n] = -1;
}

/* RANK_MAJOR: the local expert id and weight of slots j = first, first +
 * step, ... < K of received row i (-1 / 0.0 where the slot is not local). */
template <bool CG>
__device__ __forceinline__ void disco_rank_slots(const disco_kparams_t &p,
                                                 const int *meta, long long i, int first,
                                                 int step, int *expert, float *weight) {
  const int K = p.top_k, n = disco_ld_meta<CG>(meta + 1);
  for (int j = first; j < K; j += step) {
    int l = -1;
    float wt = 0.0f;
    for (int q = 0; q < n; q++) {
      const int jl = disco_ld_meta<CG>(meta + 2 + 3 * q);
      if ((jl & 255) == j) {
        l = jl >> 8;
        wt = __int_as_float(disco_ld_meta<CG>(meta + 4 + 3 * q));
      }
    }
    if (expert) expert[i * K + j] = l;
    if (weight) weight[i * K + j] = wt;
  }
}

#endif /* DISCO_CUDA_META_CUH_ */
