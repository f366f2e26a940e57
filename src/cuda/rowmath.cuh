/* Internal: 16-byte vectors of a row <-> fp32, rounding as src/core/dtype.h;
 * shared by the combine kernels of both GPU backends. */
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

#endif /* DISCO_CUDA_ROWMATH_CUH_ */
