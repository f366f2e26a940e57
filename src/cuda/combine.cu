/* Combine kernels: the expert side's weighted fold over local experts and the
 * token side's fold over destination ranks (docs/semantics.md, Combine). One
 * thread per 16-byte vector of the config dtype of one row: 8 elements for
 * bf16/fp16 (32 bytes of fp32 partials), 4 for fp32. */
#include "core/dtype.h"
#include "cuda/kernels.h"
#include "cuda/rowmath.cuh"
#include "cuda/rowsel.cuh"

/* Launch shape: x covers a row's vectors, y walks rows (grid-stride). */
static void disco_shape(const disco_kparams_t *p, long long rows, dim3 *grid,
                        dim3 *block) {
  int nv = p->row_vecs;
  int bx = nv >= 128 ? 128 : (nv + 31) / 32 * 32;
  long long gy = rows < 65535 ? rows : 65535;
  *block = dim3((unsigned)bx, 1, 1);
  *grid = dim3((unsigned)((nv + bx - 1) / bx), (unsigned)(gy < 1 ? 1 : gy), 1);
}

#define DISCO_BATCH 4 /* loads in flight per thread */

__global__ void __launch_bounds__(128)
    disco_combine_expert_kernel(disco_kparams_t p, disco_dev_plan_t pl, const uint4 *y,
                                disco_rowsel_t sel, int weighted, int wire32) {
  const int K = p.top_k, nv = p.row_vecs, V = p.dtype == DISCO_DTYPE_FP32 ? 4 : 8;
  const int nq = V / 4, out_vecs = wire32 ? nv * nq : nv;
  const int v = blockIdx.x * blockDim.x + threadIdx.x;
  if (v >= nv) return;
  for (long long j = blockIdx.y; j < sel.n; j += gridDim.y) {
    const long long i = disco_sel(sel, pl.recv_off, p.world, p.rank, j);
    const int *rows = pl.comb_rows + i * K;
    const float *ws = pl.comb_w + i * K;
    int n = 0;
    while (n < K && rows[n] >= 0) n++;
    float acc[8], f[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    for (int k0 = 0; k0 < n; k0 += DISCO_BATCH) {
      uint4 a[DISCO_BATCH];
#pragma unroll
      for (int u = 0; u < DISCO_BATCH; u++)
        if (k0 + u < n) a[u] = __ldg(y + (long long)rows[k0 + u] * nv + v);
#pragma unroll
      for (int u = 0; u < DISCO_BATCH; u++) {
        if (k0 + u >= n) break;
        disco_unpack(a[u], p.dtype, f);
        const float wk = ws[k0 + u];
#pragma unroll
        for (int e = 0; e < 8; e++) {
          float term = weighted ? __fmul_rn(wk, f[e]) : f[e];
          acc[e] = k0 + u == 0 ? term : __fadd_rn(acc[e], term);
        }
      }
    }
    disco_store_part((uint4 *)p.ws_recv + i * out_vecs, v, wire32, nq, p.dtype, acc);
  }
}

extern "C" cudaError_t disco_k_combine_expert(const disco_kparams_t *p,
                                              const disco_dev_plan_t *pl, const void *y,
                                              disco_rowsel_t sel, int weighted,
                                              int wire_fp32, cudaStream_t stream) {
  if (sel.n <= 0) return cudaSuccess;
  dim3 grid, block;
  disco_shape(p, sel.n, &grid, &block);
  disco_combine_expert_kernel<<<grid, block, 0, stream>>>(
      *p, *pl, (const uint4 *)y, sel, weighted,
      wire_fp32 && p->dtype != DISCO_DTYPE_FP32);
  return cudaGetLastError();
}

__global__ void __launch_bounds__(128)
    disco_combine_token_kernel(disco_kparams_t p, disco_dev_plan_t pl,
                               const uint4 *self_part, int wire32, int T, uint4 *out) {
  const int kd = p.kd, nv = p.row_vecs, V = p.dtype == DISCO_DTYPE_FP32 ? 4 : 8;
  const int nq = V / 4, part_vecs = wire32 ? nv * nq : nv;
  const long long M = p.max_tokens, self_off = pl.recv_off[p.rank];
  const int v = blockIdx.x * blockDim.x + threadIdx.x;
  if (v >= nv) return;
  for (int t = blockIdx.y; t < T; t += gridDim.y) {
    const int *dest = pl.tok_dest + (long long)t * kd;
    const int *trow = pl.tok_row + (long long)t * kd;
    float acc[8], f[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int e = 0; e < 8; e++) acc[e] = 0.0f; /* +0.0 for tokens with no slot */
    int n = 0;
    while (n < kd && dest[n] >= 0) n++;
    for (int k0 = 0; k0 < n; k0 += DISCO_BATCH) {
      uint4 a[DISCO_BATCH], b[DISCO_BATCH];
#pragma unroll
      for (int u = 0; u < DISCO_BATCH; u++) {
        if (k0 + u >= n) break;
        const int d = dest[k0 + u];
        const uint4 *row = d == p.rank
                               ? self_part + (self_off + trow[k0 + u]) * part_vecs
                               : (const uint4 *)p.ws_send +
                                     ((long long)d * M + trow[k0 + u]) * part_vecs;
        if (wire32) {
          a[u] = __ldg(row + (long long)v * nq);
          if (nq == 2) b[u] = __ldg(row + (long long)v * 2 + 1);
        } else {
          a[u] = __ldg(row + v);
        }
      }
#pragma unroll
      for (int u = 0; u < DISCO_BATCH; u++) {
        if (k0 + u >= n) break;
        if (wire32) {
          f[0] = __uint_as_float(a[u].x);
          f[1] = __uint_as_float(a[u].y);
          f[2] = __uint_as_float(a[u].z);
          f[3] = __uint_as_float(a[u].w);
          if (nq == 2) {
            f[4] = __uint_as_float(b[u].x);
            f[5] = __uint_as_float(b[u].y);
            f[6] = __uint_as_float(b[u].z);
            f[7] = __uint_as_float(b[u].w);
          }
        } else {
          disco_unpack(a[u], p.dtype, f);
        }
#pragma unroll
        for (int e = 0; e < 8; e++) acc[e] = k0 + u == 0 ? f[e] : __fadd_rn(acc[e], f[e]);
      }
    }
    out[(long long)t * nv + v] = disco_pack(acc, p.dtype);
  }
}

extern "C" cudaError_t disco_k_combine_token(const disco_kparams_t *p,
                                             const disco_dev_plan_t *pl,
                                             const void *self_part, int wire_fp32,
                                             int64_t num_tokens, void *out,
                                             cudaStream_t stream) {
  if (num_tokens <= 0) return cudaSuccess;
  dim3 grid, block;
  disco_shape(p, num_tokens, &grid, &block);
  disco_combine_token_kernel<<<grid, block, 0, stream>>>(
      *p, *pl, (const uint4 *)self_part, wire_fp32 && p->dtype != DISCO_DTYPE_FP32,
      (int)num_tokens, (uint4 *)out);
  return cudaGetLastError();
}
