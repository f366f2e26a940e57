/* Internal: received-token row of launch row j (see disco_rowsel_t). */
#ifndef DISCO_CUDA_ROWSEL_CUH_
#define DISCO_CUDA_ROWSEL_CUH_

#include "cuda/kernels.h"

__host__ __device__ __forceinline__ long long disco_sel(disco_rowsel_t s,
                                                        const int64_t *recv_off, int W,
                                                        int rank, long long j) {
  if (s.chunk < 0) return s.base + j + (j >= s.gap_at ? s.gap_len : 0);
  for (int q = 0; q < W; q++) { /* W is small: walk the peers */
    if (q == rank) continue;
    long long n = recv_off[q + 1] - recv_off[q], h = n >= s.split ? n / 2 : n;
    long long c = s.chunk == 0 ? h : n - h;
    if (j < c) return recv_off[q] + (s.chunk == 0 ? 0 : h) + j;
    j -= c;
  }
  return -1; /* j beyond the selection: callers never ask */
}

#endif /* DISCO_CUDA_ROWSEL_CUH_ */
