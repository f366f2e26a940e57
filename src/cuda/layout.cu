/* Routing layout and receive plan kernels of the nccl backend (the device
 * code is in layout.cuh and recv_plan.cuh). */
#include "cuda/kernels.h"
#include "cuda/layout.cuh"
#include "cuda/recv_plan.cuh"

#define DISCO_SMALL_THREADS 512

__global__ void disco_layout_kernel(disco_kparams_t p, disco_dev_plan_t pl,
                                    const void *idx, int idx64, int T) {
  extern __shared__ unsigned smem[];
  (void)disco_layout_body(p, pl, idx, idx64, T, blockIdx.x, gridDim.x, smem);
}

extern "C" cudaError_t disco_k_layout(const disco_kparams_t *p,
                                      const disco_dev_plan_t *pl, const void *topk_idx,
                                      int idx64, int64_t num_tokens,
                                      cudaStream_t stream) {
  /* At least one block: with no tokens it still writes the messages. */
  int threads = 32 * p->layout_warps;
  int blocks = num_tokens <= 0 ? 1 : (int)((num_tokens + threads - 1) / threads);
  const size_t smem = disco_layout_smem(p);
  disco_layout_kernel<<<blocks, threads, smem, stream>>>(*p, *pl, topk_idx, idx64,
                                                         (int)num_tokens);
  return cudaGetLastError();
}

__global__ void disco_recv_plan_kernel(disco_kparams_t p, disco_dev_plan_t pl, int layout,
                                       int align, int32_t *n_to, int32_t *n_from,
                                       int32_t *tpe, int64_t *num_rows_out,
                                       long long cap) {
  disco_recv_plan_body(p, pl, layout, align, n_to, n_from, tpe, num_rows_out, cap, 0,
                       NULL);
}

extern "C" cudaError_t disco_k_recv_plan(const disco_kparams_t *p,
                                         const disco_dev_plan_t *pl, int layout,
                                         int alignment, int32_t *n_to, int32_t *n_from,
                                         int32_t *tokens_per_expert,
                                         int64_t *num_recv_rows, int64_t capacity,
                                         cudaStream_t stream) {
  disco_recv_plan_kernel<<<1, DISCO_SMALL_THREADS, 0, stream>>>(
      *p, *pl, layout, alignment, n_to, n_from, tokens_per_expert, num_recv_rows,
      (long long)capacity);
  return cudaGetLastError();
}
