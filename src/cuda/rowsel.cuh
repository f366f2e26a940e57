/* Internal: received-token row of launch row j (see disco_rowsel_t). */
#ifndef DISCO_CUDA_ROWSEL_CUH_
#define DISCO_CUDA_ROWSEL_CUH_

#include "cuda/kernels.h"

/* Launch shape of the row kernels: x covers a row's 16-byte vectors, y walks
 * rows (grid-stride). Default: a block row per row (up to 65535), so even a
 * few rows spread over many SMs. `side`: the launch runs beside an NCCL
 * kernel, whose blocks each need most of an SM's registers: then at most
 * p->side_blocks blocks of up to DISCO_SIDE_THREADS threads, which leaves the
 * other SMs free for NCCL's blocks whenever its next group starts. */
#define DISCO_SIDE_THREADS 1024
static inline void disco_row_shape(const disco_kparams_t *p, long long rows, int side,
                                   dim3 *grid, dim3 *block) {
  const int nv = p->row_vecs;
  if (side && p->side_blocks > 0) {
    const int gx = (nv + DISCO_SIDE_THREADS - 1) / DISCO_SIDE_THREADS;
    const int bx = ((nv + gx - 1) / gx + 31) / 32 * 32;
    long long gy = p->side_blocks / gx;
    gy = gy < 1 ? 1 : gy > rows ? rows : gy;
    *block = dim3((unsigned)bx, 1, 1);
    *grid = dim3((unsigned)gx, (unsigned)(gy < 1 ? 1 : gy), 1);
    return;
  }
  const int bx = nv >= 128 ? 128 : (nv + 31) / 32 * 32;
  const long long gy = rows < 65535 ? rows : 65535;
  *block = dim3((unsigned)bx, 1, 1);
  *grid = dim3((unsigned)((nv + bx - 1) / bx), (unsigned)(gy < 1 ? 1 : gy), 1);
}

__host__ __device__ __forceinline__ long long disco_sel(disco_rowsel_t s,
                                                        const int64_t *recv_off, int W,
                                                        int rank, long long j) {
  if (s.chunk < 0) return s.base + j + (j >= s.gap_at ? s.gap_len : 0);
  for (int q = 0; q < W; q++) { /* W is small: walk the peers */
    if (q == rank) continue;
    long long lo, hi;
    disco_piece(recv_off[q + 1] - recv_off[q], s.chunk, s.chunks, s.split, &lo, &hi);
    if (j < hi - lo) return recv_off[q] + lo + j;
    j -= hi - lo;
  }
  return -1; /* j beyond the selection: callers never ask */
}

#endif /* DISCO_CUDA_ROWSEL_CUH_ */
