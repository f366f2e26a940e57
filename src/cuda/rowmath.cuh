/* Internal: 16-byte vectors of a row <-> fp32, rounding as src/core/dtype.h;
 * and the combine folds, shared by the kernels of both GPU backends. */
#ifndef DISCO_CUDA_ROWMATH_CUH_
#define DISCO_CUDA_ROWMATH_CUH_

#include "core/dtype.h"
#include "cuda/kernels.h"

/* 16 bytes of `dtype` -> floats (exact). Unused tail of f stays untouched. */
__device__ __forceinline__ void disco_unpack(uint4 u, int dtype, float *f) {
  unsigned w[4] = {u.x, u.y, u.z, u.w};
  if (dtype == DISCO_DTYPE_FP32) {
#pragma unroll
    for (int i = 0; i < 4; i++) f[i] = __uint_as_float(w[i]);
  } else if (dtype == DISCO_DTYPE_BF16) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
      f[2 * i] = disco_bf16_to_f32((uint16_t)(w[i] & 0xffffu));
      f[2 * i + 1] = disco_bf16_to_f32((uint16_t)(w[i] >> 16));
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; i++) {
      f[2 * i] = disco_f16_to_f32((uint16_t)(w[i] & 0xffffu));
      f[2 * i + 1] = disco_f16_to_f32((uint16_t)(w[i] >> 16));
    }
  }
}

/* floats -> 16 bytes of `dtype`, round to nearest even as dtype.h. */
__device__ __forceinline__ uint4 disco_pack(const float *f, int dtype) {
  unsigned w[4];
  if (dtype == DISCO_DTYPE_FP32) {
#pragma unroll
    for (int i = 0; i < 4; i++) w[i] = __float_as_uint(f[i]);
  } else if (dtype == DISCO_DTYPE_BF16) {
#pragma unroll
    for (int i = 0; i < 4; i++)
      w[i] = (unsigned)disco_f32_to_bf16(f[2 * i]) |
             ((unsigned)disco_f32_to_bf16(f[2 * i + 1]) << 16);
  } else {
#pragma unroll
    for (int i = 0; i < 4; i++)
      w[i] = (unsigned)disco_f32_to_f16(f[2 * i]) |
             ((unsigned)disco_f32_to_f16(f[2 * i + 1]) << 16);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ void disco_store_part(uint4 *row, long long v, int wire32,
                                                 int nq, int dtype, const float *f) {
  if (wire32) {
    row[v * nq] = make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]),
                             __float_as_uint(f[2]), __float_as_uint(f[3]));
    if (nq == 2)
      row[v * 2 + 1] = make_uint4(__float_as_uint(f[4]), __float_as_uint(f[5]),
                                  __float_as_uint(f[6]), __float_as_uint(f[7]));
  } else {
    row[v] = disco_pack(f, dtype);
  }
}

#define DISCO_BATCH 4 /* rows in flight per thread in a fold */

/* Entries of a before the first negative one, at most m (a list that ends
 * with -1 or fills m): loads in batches of 8 (a scan one entry at a time was
 * an L2 round trip per entry, in every row of the combines). */
__device__ __forceinline__ int disco_count_valid(const int *a, int m) {
  for (int k0 = 0; k0 < m; k0 += 8) {
    int v[8];
#pragma unroll
    for (int u = 0; u < 8; u++) v[u] = k0 + u < m ? a[k0 + u] : -1;
#pragma unroll
    for (int u = 0; u < 8; u++)
      if (v[u] < 0) return k0 + u;
  }
  return m;
}

/* Expert side, vector v of one received token: its n >= 1 rows of y (`rows`,
 * local experts ascending) folded in order, each times its weight when
 * `weighted`: fold from the first term, separate fp32 roundings, no FMA
 * (docs/semantics.md). */
__device__ __forceinline__ void disco_fold_expert(const uint4 *y, const int *rows,
                                                  const float *ws, int n, int nv, int v,
                                                  int weighted, int dtype, float *acc) {
  float f[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
  for (int e = 0; e < 8; e++) acc[e] = 0.0f;
  for (int k0 = 0; k0 < n; k0 += DISCO_BATCH) {
    uint4 a[DISCO_BATCH];
#pragma unroll
    for (int u = 0; u < DISCO_BATCH; u++)
      if (k0 + u < n) a[u] = __ldg(y + (long long)rows[k0 + u] * nv + v);
#pragma unroll
    for (int u = 0; u < DISCO_BATCH; u++) {
      if (k0 + u >= n) break;
      disco_unpack(a[u], dtype, f);
      const float wk = ws[k0 + u];
#pragma unroll
      for (int e = 0; e < 8; e++) {
        float term = weighted ? __fmul_rn(wk, f[e]) : f[e];
        acc[e] = k0 + u == 0 ? term : __fadd_rn(acc[e], term);
      }
    }
  }
}

/* Token side, vector v of one token: its n partial rows (destination ranks
 * `dest` ascending, rows `trow` in their segments) folded; +0.0 when n == 0.
 * The row for destination d is self_base + (self_off + trow) * part_vecs when
 * d == self, else other_base + (d * M + trow) * part_vecs. wire32: fp32
 * partials, nq 16-byte vectors per vector of the dtype row. CG: partials
 * written by other GPUs during the kernel (read through L2). */
template <bool CG>
__device__ __forceinline__ void disco_fold_token(const int *dest, const int *trow, int n,
                                                 int self, const uint4 *self_base,
                                                 long long self_off,
                                                 const uint4 *other_base, long long M,
                                                 int part_vecs, int v, int wire32, int nq,
                                                 int dtype, float *acc) {
  float f[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
  for (int e = 0; e < 8; e++) acc[e] = 0.0f;
  for (int k0 = 0; k0 < n; k0 += DISCO_BATCH) {
    uint4 a[DISCO_BATCH], b[DISCO_BATCH];
#pragma unroll
    for (int u = 0; u < DISCO_BATCH; u++) {
      if (k0 + u >= n) break;
      const int d = dest[k0 + u];
      const uint4 *row = d == self
                             ? self_base + (self_off + trow[k0 + u]) * part_vecs
                             : other_base + ((long long)d * M + trow[k0 + u]) * part_vecs;
      if (wire32) {
        a[u] = CG ? __ldcg(row + (long long)v * nq) : __ldg(row + (long long)v * nq);
        if (nq == 2)
          b[u] =
              CG ? __ldcg(row + (long long)v * 2 + 1) : __ldg(row + (long long)v * 2 + 1);
      } else {
        a[u] = CG ? __ldcg(row + v) : __ldg(row + v);
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
        disco_unpack(a[u], dtype, f);
      }
#pragma unroll
      for (int e = 0; e < 8; e++) acc[e] = k0 + u == 0 ? f[e] : __fadd_rn(acc[e], f[e]);
    }
  }
}

#endif /* DISCO_CUDA_ROWMATH_CUH_ */
