/* Data movement kernels: pack, expand (both layouts), padding, combine.
 * Rows move as 16-byte vectors, one vector of one row per thread. Arithmetic matches
 * src/core/dtype.h and docs/semantics.md bit for bit: exact conversions to fp32,
 * __fmul_rn/__fadd_rn (no FMA), fold from the first term, one rounding at the end. */
#include "core/dtype.h"
#include "cuda/kernels.h"

#define DISCO_WARPS 8
#define DISCO_THREADS (32 * DISCO_WARPS)

__device__ __forceinline__ uint4 disco_ldg(const uint4 *p) {
  return __ldg(p);
}

static int disco_grid(const disco_kparams_t *p, int64_t warps) {
  int64_t b = (warps + DISCO_WARPS - 1) / DISCO_WARPS;
  if (b > p->max_blocks) b = p->max_blocks;
  return (int)(b < 1 ? 1 : b);
}

#include "cuda/meta.cuh"
#include "cuda/rowmath.cuh"
#include "cuda/rowsel.cuh"

/* ---- pack ------------------------------------------------------------------ */
__global__ void __launch_bounds__(128)
    disco_pack_kernel(disco_kparams_t p, disco_dev_plan_t pl, const uint4 *x,
                      const float *w, int T, int rank_major) {
  /* Own ids rejected: slot data is garbage, write nothing. */
  if (pl.msg[((long long)p.world + p.rank) * p.msg_len + DISCO_MSG_CODE] != 0) return;
  const int lane = threadIdx.x & 31, E = p.num_experts;
  const int nc = p.num_cols, C = 32 * p.layout_warps, nv = p.row_vecs, mi = p.meta_ints;
  const long long M = p.max_tokens;
  const int v = blockIdx.x * blockDim.x + threadIdx.x;
  for (int t = blockIdx.y; t < T; t += gridDim.y) {
    const int *bb = pl.blk_base + (long long)(t / C) * nc;
    const int *dest = pl.tok_dest + (long long)t * p.kd;
    const int *dpos = pl.tok_dpos + (long long)t * p.kd;
    if (blockIdx.x == 0 && threadIdx.x < 32) {
      /* Metadata: [src_token, n_local, then (j | l << 8, pos, weight) per
       * local slot in slot order]. */
      for (int k = 0; k < p.kd; k++) {
        const int d = dest[k];
        if (d < 0) break;
        const int row = bb[E + d] + dpos[k];
        int *meta = p.send_meta + ((long long)d * M + row) * mi;
        disco_meta_row(p, pl, bb, w, t, d, lane, meta);
        if (lane == 0) pl.tok_row[(long long)t * p.kd + k] = row;
      }
    }
    if (v < nv) {
      const uint4 val = disco_ldg(x + (long long)t * nv + v);
      for (int k = 0; k < p.kd; k++) {
        const int d = dest[k];
        if (d < 0) break;
        if (d == p.rank && !rank_major) continue; /* expand reads x */
        const long long row = bb[E + d] + dpos[k];
        ((uint4 *)p.ws_send)[((long long)d * M + row) * nv + v] = val;
      }
    }
  }
}

extern "C" cudaError_t disco_k_pack(const disco_kparams_t *p, const disco_dev_plan_t *pl,
                                    const void *x, const float *weights,
                                    int64_t num_tokens, int rank_major,
                                    cudaStream_t stream) {
  if (num_tokens <= 0) return cudaSuccess;
  dim3 grid, block;
  disco_row_shape(p, num_tokens, 0, &grid, &block);
  disco_pack_kernel<<<grid, block, 0, stream>>>(*p, *pl, (const uint4 *)x, weights,
                                                (int)num_tokens, rank_major);
  return cudaGetLastError();
}

/* Metadata row of received token i; self rows are read where pack wrote them. */
__device__ __forceinline__ const int *disco_meta(const disco_kparams_t *p,
                                                 const disco_dev_plan_t *pl, int s,
                                                 long long i) {
  if (s == p->rank)
    return p->send_meta +
           ((long long)s * p->max_tokens + (i - pl->recv_off[s])) * p->meta_ints;
  return p->recv_meta + i * p->meta_ints;
}

/* ---- expand, EXPERT_MAJOR ---------------------------------------------------- */
__global__ void __launch_bounds__(DISCO_SIDE_THREADS)
    disco_expand_expert_kernel(disco_kparams_t p, disco_dev_plan_t pl, const uint4 *x,
                               disco_rowsel_t sel, uint4 *recv_x, int *src_rank,
                               int *src_token, int *expert, float *weight) {
  const int lane = threadIdx.x & 31, L = p.num_local, nv = p.row_vecs;
  const int v = blockIdx.x * blockDim.x + threadIdx.x;
  for (long long j = blockIdx.y; j < sel.n; j += gridDim.y) {
    const long long i = disco_sel(sel, pl.recv_off, p.world, p.rank, j);
    const int s = disco_source(pl, p.world, i);
    const int *meta = disco_meta(&p, &pl, s, i);
    const int t = meta[0], n = meta[1];
    const int64_t *sb = pl.srcbase + (long long)s * L;
    if (blockIdx.x == 0 && threadIdx.x < 32)
      disco_expand_meta<false>(p, pl, meta, s, i, sb, lane, src_rank, src_token, expert,
                               weight);
    if (v < nv) {
      const uint4 val = disco_ldg(s == p.rank ? x + (long long)t * nv + v
                                              : (const uint4 *)p.ws_recv + i * nv + v);
      for (int q = 0; q < n; q++)
        recv_x[(sb[meta[2 + 3 * q] >> 8] + meta[3 + 3 * q]) * nv + v] = val;
    }
  }
}

extern "C" cudaError_t disco_k_expand_expert(const disco_kparams_t *p,
                                             const disco_dev_plan_t *pl, const void *x,
                                             disco_rowsel_t sel, void *recv_x,
                                             int32_t *src_rank, int32_t *src_token,
                                             int32_t *expert, float *weight,
                                             cudaStream_t stream) {
  if (sel.n <= 0) return cudaSuccess;
  dim3 grid, block;
  disco_row_shape(p, sel.n, sel.side, &grid, &block);
  disco_expand_expert_kernel<<<grid, block, 0, stream>>>(*p, *pl, (const uint4 *)x, sel,
                                                         (uint4 *)recv_x, src_rank,
                                                         src_token, expert, weight);
  return cudaGetLastError();
}

/* ---- plain row copy (registered payload buffers <-> the caller's) ----------- */
__global__ void __launch_bounds__(DISCO_SIDE_THREADS)
    disco_copy_rows_kernel(disco_kparams_t p, disco_dev_plan_t pl, disco_rowsel_t sel,
                           const uint4 *src, uint4 *dst, int wide) {
  const int nv = p.row_vecs, nq = p.dtype == DISCO_DTYPE_FP32 ? 1 : 2;
  const int v = blockIdx.x * blockDim.x + threadIdx.x;
  if (v >= nv) return;
  for (long long j = blockIdx.y; j < sel.n; j += gridDim.y) {
    const long long i = disco_sel(sel, pl.recv_off, p.world, p.rank, j);
    const uint4 u = disco_ldg(src + i * nv + v);
    if (wide) {
      float f[8];
      disco_unpack(u, p.dtype, f);
      disco_store_part(dst + i * nv * nq, v, 1, nq, p.dtype, f);
    } else {
      dst[i * nv + v] = u;
    }
  }
}

extern "C" cudaError_t disco_k_copy_rows(const disco_kparams_t *p,
                                         const disco_dev_plan_t *pl, disco_rowsel_t sel,
                                         const void *src, void *dst, int wide,
                                         cudaStream_t stream) {
  if (sel.n <= 0) return cudaSuccess;
  dim3 grid, block;
  disco_row_shape(p, sel.n, sel.side, &grid, &block);
  disco_copy_rows_kernel<<<grid, block, 0, stream>>>(
      *p, *pl, sel, (const uint4 *)src, (uint4 *)dst,
      wide && p->dtype != DISCO_DTYPE_FP32);
  return cudaGetLastError();
}

/* Padding rows of EXPERT_MAJOR groups: zero data, metadata -1 / 0.0. One block
 * per local expert. */
__global__ void __launch_bounds__(DISCO_THREADS)
    disco_padding_kernel(disco_kparams_t p, disco_dev_plan_t pl, uint4 *recv_x,
                         int *src_rank, int *src_token, int *expert, float *weight) {
  const int l = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const long long first = pl.exp_off[l] + pl.exp_total[l], end = pl.exp_off[l + 1];
  const uint4 z = make_uint4(0u, 0u, 0u, 0u);
  for (long long row = first + warp; row < end; row += DISCO_WARPS) {
    for (int v = lane; v < p.row_vecs; v += 32) recv_x[row * p.row_vecs + v] = z;
    if (lane == 0) {
      if (src_rank) src_rank[row] = -1;
      if (src_token) src_token[row] = -1;
      if (expert) expert[row] = -1;
      if (weight) weight[row] = 0.0f;
    }
  }
}

extern "C" cudaError_t disco_k_padding(const disco_kparams_t *p,
                                       const disco_dev_plan_t *pl, void *recv_x,
                                       int32_t *src_rank, int32_t *src_token,
                                       int32_t *expert, float *weight,
                                       cudaStream_t stream) {
  if (p->num_local <= 0) return cudaSuccess;
  disco_padding_kernel<<<p->num_local, DISCO_THREADS, 0, stream>>>(
      *p, *pl, (uint4 *)recv_x, src_rank, src_token, expert, weight);
  return cudaGetLastError();
}

/* ---- expand, RANK_MAJOR (data already in recv_x: metadata only) ---------------- */
__global__ void disco_expand_rank_kernel(disco_kparams_t p, disco_dev_plan_t pl,
                                         long long R, int *src_rank, int *src_token,
                                         int *expert, float *weight) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (long long i = blockIdx.x * DISCO_WARPS + warp; i < R;
       i += (long long)gridDim.x * DISCO_WARPS) {
    const int s = disco_source(pl, p.world, i);
    const int *meta = disco_meta(&p, &pl, s, i);
    if (lane == 0) {
      if (src_rank) src_rank[i] = s;
      if (src_token) src_token[i] = meta[0];
    }
    disco_rank_slots<false>(p, meta, i, lane, 32, expert, weight);
  }
}

extern "C" cudaError_t disco_k_expand_rank(const disco_kparams_t *p,
                                           const disco_dev_plan_t *pl,
                                           int64_t recv_tokens, int32_t *src_rank,
                                           int32_t *src_token, int32_t *expert,
                                           float *weight, cudaStream_t stream) {
  if (recv_tokens <= 0) return cudaSuccess;
  disco_expand_rank_kernel<<<disco_grid(p, recv_tokens), DISCO_THREADS, 0, stream>>>(
      *p, *pl, (long long)recv_tokens, src_rank, src_token, expert, weight);
  return cudaGetLastError();
}
