/* Internal: element conversions shared by the host path, the reference and
 * the CUDA kernels, so every backend rounds identically (bit for bit).
 * float -> bf16/fp16 is round-to-nearest-even; NaN stays NaN (quiet). */
#ifndef DISCO_CORE_DTYPE_H_
#define DISCO_CORE_DTYPE_H_

#include <stdint.h>
#include <string.h>

#include "disco.h"

#if defined(__CUDACC__)
#define DISCO_HD __host__ __device__ __forceinline__
#else
#define DISCO_HD static inline
#endif

DISCO_HD uint32_t disco_f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

DISCO_HD float disco_bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

DISCO_HD float disco_bf16_to_f32(uint16_t h) {
  return disco_bits_f32((uint32_t)h << 16);
}

DISCO_HD uint16_t disco_f32_to_bf16(float f) {
  uint32_t u = disco_f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

DISCO_HD float disco_f16_to_f32(uint16_t h) {
  uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
  uint32_t e = ((uint32_t)h >> 10) & 0x1fu;
  uint32_t m = (uint32_t)h & 0x3ffu;
  uint32_t u;
  if (e == 0) {
    if (m == 0) {
      u = sign;
    } else { /* subnormal: normalise */
      e = 113;
      while (!(m & 0x400u)) {
        m <<= 1;
        e--;
      }
      u = sign | (e << 23) | ((m & 0x3ffu) << 13);
    }
  } else if (e == 31) {
    u = sign | 0x7f800000u | (m << 13);
  } else {
    u = sign | ((e + 112u) << 23) | (m << 13);
  }
  return disco_bits_f32(u);
}

DISCO_HD uint16_t disco_f32_to_f16(float f) {
  uint32_t x = disco_f32_bits(f);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
  if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* >= 65520: inf */
  if (ax < 0x38800000u) {                                   /* below 2^-14 */
    if (ax <= 0x33000000u) return (uint16_t)sign;           /* <= 2^-25: 0 */
    uint32_t m = (ax & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126u - (ax >> 23);
    uint32_t q = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) q++;
    return (uint16_t)(sign | q);
  }
  uint32_t r = ax + 0xfffu + ((ax >> 13) & 1u);
  r -= 0x38000000u;
  return (uint16_t)(sign | (r >> 13));
}

/* Element i of a row of `dtype` as float. */
DISCO_HD float disco_load_f32(const void *p, int64_t i, disco_dtype_t dtype) {
  if (dtype == DISCO_DTYPE_FP32) return ((const float *)p)[i];
  if (dtype == DISCO_DTYPE_BF16) return disco_bf16_to_f32(((const uint16_t *)p)[i]);
  return disco_f16_to_f32(((const uint16_t *)p)[i]);
}

DISCO_HD void disco_store_f32(void *p, int64_t i, float v, disco_dtype_t dtype) {
  if (dtype == DISCO_DTYPE_FP32)
    ((float *)p)[i] = v;
  else if (dtype == DISCO_DTYPE_BF16)
    ((uint16_t *)p)[i] = disco_f32_to_bf16(v);
  else
    ((uint16_t *)p)[i] = disco_f32_to_f16(v);
}

DISCO_HD size_t disco_dtype_size(disco_dtype_t dtype) {
  return dtype == DISCO_DTYPE_FP32 ? 4u : 2u;
}

#endif /* DISCO_CORE_DTYPE_H_ */
