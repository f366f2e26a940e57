/* Combine kernels: the expert side's weighted fold over local experts and the
 * token side's fold over destination ranks (docs/semantics.md, Combine). One
 * thread per 16-byte vector of the config dtype of one row: 8 elements for
 * bf16/fp16 (32 bytes of fp32 partials), 4 for fp32. */
#include "core/dtype.h"
#include "cuda/kernels.h"
#include "cuda/rowmath.cuh"
#include "cuda/rowsel.cuh"

__global__ void __launch_bounds__(DISCO_SIDE_THREADS)
    disco_combine_expert_kernel(disco_kparams_t p, disco_dev_plan_t pl, const uint4 *y,
                                disco_rowsel_t sel, int weighted, int wire32) {
  const int K = p.top_k, nv = p.row_vecs, V = p.dtype == DISCO_DTYPE_FP32 ? 4 : 8;
  const int nq = V / 4, out_vecs = wire32 ? nv * nq : nv;
  const int v = blockIdx.x * blockDim.x + threadIdx.x;
  if (v >= nv) return;
  for (long long j = blockIdx.y; j < sel.n; j += gridDim.y) {
    const long long i = disco_sel(sel, pl.recv_off, p.world, p.rank, j);
    const int *rows = pl.comb_rows + i * K;
    const int n = disco_count_valid(rows, K);
    float acc[8];
    disco_fold_expert(y, rows, pl.comb_w + i * K, n, nv, v, weighted, p.dtype, acc);
    disco_store_part((uint4 *)p.ws_recv + i * out_vecs, v, wire32, nq, p.dtype, acc);
  }
}

extern "C" cudaError_t disco_k_combine_expert(const disco_kparams_t *p,
                                              const disco_dev_plan_t *pl, const void *y,
                                              disco_rowsel_t sel, int weighted,
                                              int wire_fp32, cudaStream_t stream) {
  if (sel.n <= 0) return cudaSuccess;
  dim3 grid, block;
  disco_row_shape(p, sel.n, sel.side, &grid, &block);
  disco_combine_expert_kernel<<<grid, block, 0, stream>>>(
      *p, *pl, (const uint4 *)y, sel, weighted,
      wire_fp32 && p->dtype != DISCO_DTYPE_FP32);
  return cudaGetLastError();
}

__global__ void __launch_bounds__(256)
    disco_classify_kernel(disco_kparams_t p, disco_dev_plan_t pl, int T, int chunks,
                          long long split) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= T) return;
  const int *dest = pl.tok_dest + (long long)t * p.kd;
  const int *trow = pl.tok_row + (long long)t * p.kd;
  int last = 0;
  for (int n = 0; n < p.kd && dest[n] >= 0; n++) {
    const int d = dest[n];
    if (d == p.rank) continue; /* own partials are ready before any pass */
    const long long sent = pl.msg[(long long)d * p.msg_len + DISCO_MSG_TOKENS];
    const int c = disco_piece_of(sent, trow[n], chunks, split);
    last = c > last ? c : last;
  }
  const int j = atomicAdd(pl.pass_cnt + last, 1);
  pl.pass_list[(long long)last * p.max_tokens + j] = t;
}

extern "C" cudaError_t disco_k_combine_classify(const disco_kparams_t *p,
                                                const disco_dev_plan_t *pl,
                                                int64_t num_tokens, int chunks,
                                                long long split, cudaStream_t stream) {
  cudaError_t e =
      cudaMemsetAsync(pl->pass_cnt, 0, DISCO_MAX_CHUNKS * sizeof(int32_t), stream);
  if (e != cudaSuccess || num_tokens <= 0) return e;
  disco_classify_kernel<<<(unsigned)((num_tokens + 255) / 256), 256, 0, stream>>>(
      *p, *pl, (int)num_tokens, chunks, split);
  return cudaGetLastError();
}

__global__ void __launch_bounds__(DISCO_SIDE_THREADS)
    disco_combine_token_kernel(disco_kparams_t p, disco_dev_plan_t pl,
                               const uint4 *self_part, int wire32, int T, int pass,
                               uint4 *out) {
  const int kd = p.kd, nv = p.row_vecs, V = p.dtype == DISCO_DTYPE_FP32 ? 4 : 8;
  const int nq = V / 4, part_vecs = wire32 ? nv * nq : nv;
  const long long M = p.max_tokens, self_off = pl.recv_off[p.rank];
  const int v = blockIdx.x * blockDim.x + threadIdx.x;
  if (v >= nv) return;
  const int cnt = pass >= 0 ? pl.pass_cnt[pass] : T;
  for (int j = blockIdx.y; j < cnt; j += gridDim.y) {
    const int t = pass >= 0 ? pl.pass_list[(long long)pass * M + j] : j;
    const int *dest = pl.tok_dest + (long long)t * kd;
    const int *trow = pl.tok_row + (long long)t * kd;
    const int n = disco_count_valid(dest, kd);
    float acc[8];
    disco_fold_token<false>(dest, trow, n, p.rank, self_part, self_off,
                            (const uint4 *)p.ws_send, M, part_vecs, v, wire32, nq,
                            p.dtype, acc);
    out[(long long)t * nv + v] = disco_pack(acc, p.dtype);
  }
}

extern "C" cudaError_t disco_k_combine_token(const disco_kparams_t *p,
                                             const disco_dev_plan_t *pl,
                                             const void *self_part, int wire_fp32,
                                             int64_t num_tokens, int pass, int side,
                                             void *out, cudaStream_t stream) {
  if (num_tokens <= 0) return cudaSuccess;
  dim3 grid, block;
  disco_row_shape(p, num_tokens, side, &grid, &block);
  disco_combine_token_kernel<<<grid, block, 0, stream>>>(
      *p, *pl, (const uint4 *)self_part, wire_fp32 && p->dtype != DISCO_DTYPE_FP32,
      (int)num_tokens, pass, (uint4 *)out);
  return cudaGetLastError();
}
