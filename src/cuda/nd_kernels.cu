/* nccl_device kernels: dispatch and combine through the peers' symmetric
 * windows (see nd_kernels.h for the protocol). Ordering as in
 * docs/design-nccl-device.md §5: weak 16-byte stores; each block fences
 * (system scope, acquire-release) and counts itself done; the last block
 * fences once more and stores one flag per peer. Waiters poll with
 * system-scope acquire loads, bounded by %globaltimer, then __syncthreads
 * before the block reads. */
#include <string.h>

#include "cuda/latch.cuh"
#include "cuda/layout.cuh"
#include "cuda/nd_kernels.h"
#include "cuda/nd_rows.cuh"
#include "cuda/recv_plan.cuh"

extern "C" unsigned long long disco_nd_window_layout(const disco_kparams_t *p,
                                                     int part_vecs,
                                                     disco_nd_params_t *nd) {
  const u64 W = (u64)p->world, M = (u64)p->max_tokens;
  u64 off = 0;
#define ND_CARVE(field, bytes, align)                 \
  do {                                                \
    nd->field = off;                                  \
    off += ((bytes) + (align)-1) / (align) * (align); \
  } while (0)
  /* Everything but the rows and partials below off_rows: a hybrid comm's
   * staging copy of a peer's window covers only that much (nd_hybrid.c). */
  ND_CARVE(off_flags, DISCO_ND_KINDS * W * 8u, 4096u);
  ND_CARVE(off_cnt, W * (u64)ND_CNT_WORDS(p->msg_len) * 8u, 256u);
  ND_CARVE(off_cch, W * (u64)DISCO_ND_CHUNKS(M) * 8u, 256u);
  ND_CARVE(off_dch, W * (u64)DISCO_ND_CHUNKS(M) * 8u, 256u);
  ND_CARVE(off_meta, W * M * (u64)p->meta_ints * 4u, 256u);
  ND_CARVE(off_rows, W * M * (u64)p->row_bytes, 256u);
  ND_CARVE(off_part, W * M * (u64)part_vecs * 16u, 256u);
#undef ND_CARVE
  nd->part_vecs = part_vecs;
  const u64 gran = 2ull << 20; /* whole pages of the symmetric mapping */
  return (off + gran - 1) / gran * gran;
}

/* ---- dispatch ------------------------------------------------------------------ */

/* The dispatch of fewer tokens than DISCO_ND_PIPE_MIN_TOKENS (and every
 * counts-only or failed-rank call), one launch: [block 0 makes the layout]
 * -> acks of the previous call -> block 0 sends the counts, the others the
 * rows (flags by the last block) -> block 0 makes the receive plan once the
 * counts are in, then waits for the rows -> every block expands -> the last
 * block acks. Blocks are co-resident (cooperative launch): they wait for each
 * other only through block 0's words (lay, plan) and the counters. */
__global__ void __launch_bounds__(DISCO_ND_THREADS, 3)
    nd_dispatch_kernel(disco_kparams_t p, disco_nd_params_t nd, disco_dev_plan_t pl,
                       const uint4 *x, const float *w, int T, int layout, int align,
                       int rows_on, int status_in, int call_kind, uint4 *recv_x,
                       int *src_rank, int *src_token, int *expert, float *weight,
                       int32_t *n_to, int32_t *n_from, int32_t *tpe,
                       int64_t *num_rows_out, long long cap, const void *idx, int idx64,
                       int fuse) {
  /* the sequence loaded beside the dead word (one round trip, not two) */
  const u64 s = *(volatile u64 *)nd.seq + 1ull;
  if (nd_dead(nd)) return;
  const int W = p.world, r = p.rank, b = blockIdx.x, nb = gridDim.x;
  const int rank_major = layout == DISCO_LAYOUT_RANK_MAJOR;
  const u64 call = (u64)call_kind << 32 | (s & 0xffffffffull);
  int ok = 1, bad, code;
  const int tr = b == 0 && threadIdx.x == 0; /* the thread that traces */
  if (tr) nd_trace(nd, 0, s, 0);
  /* A hybrid comm's receive half (nd.phase 2): the send half ran as the
   * previous launch and NCCL has brought the other hosts' counts, rows and
   * flags into our window since (nd_hybrid.c). */
  if (nd.phase != 2) {
    /* 0. A batch of one layout block: block 0 makes the routing layout (one
     * launch less); the others wait for it after the acks below. */
    if (fuse && b == 0) {
      extern __shared__ unsigned smem[];
      (void)disco_layout_body(p, pl, idx, idx64, T, 0, 1, smem);
      __syncthreads();
      if (threadIdx.x == 0) nd_st_release_gpu(nd.lay, s);
    }
    /* 1. The peers have read our previous rows: we may overwrite the slots. */
    ok = nd_wait_all<true>(p, nd, DISCO_ND_DACK, s - 1ull, DISCO_ND_PHASE_DACK, call,
                           &bad, &code);
    if (fuse && b != 0 && threadIdx.x == 0) ok = ok && nd_wait_block0(nd, nd.lay, s);
    if (tr) nd_trace(nd, 0, s, 1);
    if (!nd_block_all(ok)) return;
    if (threadIdx.x == 0) nd_trace_max(nd, 0, s, 8);
    const int st = status_in != 0 ? status_in : (int)pl.msg[DISCO_MSG_CODE];
    /* 2. Block 0: the count messages (self included, self-validating words); the other
     * blocks (all, with a grid of one): rows and metadata. Flags by the last. */
    if (b == 0) nd_send_counts(p, nd, pl, status_in, rows_on, s);
    /* Test hook: rank 0 stores what it sends to itself late, after its peers'
     * share (a regression test for reading our own slot too early). */
    const int late = nd.test_self_delay_ns != 0ull && r == 0;
    const int senders = nb > 1 ? nb - 1 : 1;
    for (int pass = 0; rows_on && st == 0 && (b > 0 || nb == 1) && pass <= late; pass++) {
      if (pass == 1) nd_sleep(nd.test_self_delay_ns);
      const int P = nd_parts(senders, T, p.row_vecs), S = DISCO_ND_THREADS;
      /* the hook's second pass borrows the expand's counter (reset below, before
       * block 0 lets the expand start) */
      unsigned long long *c =
          &nd.ctr[pass == 0 ? DISCO_ND_CTR_SEND : DISCO_ND_CTR_EXPAND];
      for (long long it = nd_share<S>(nd_ask<S>(c)), a; it < (long long)T * P;
           it = nd_share<S>(a)) {
        int lo, hi;
        a = nd_ask<S>(c);
        nd_piece(p.row_vecs, P, (int)(it % P), &lo, &hi);
        nd_send_token(p, nd, pl, x, w, (int)(it / P), rank_major, lo, hi, it % P == 0,
                      late ? pass + 1 : 0);
      }
    }
    if (threadIdx.x == 0) nd_trace_max(nd, 0, s, 9);
    if (nd_last_block(&nd.done[0])) {
      nd.ctr[DISCO_ND_CTR_SEND] = 0ull;
      nd.ctr[DISCO_ND_CTR_EXPAND] = 0ull; /* the hook's second pass */
      nd_flag_peers(nd, W, r, DISCO_ND_DFLAG, s << 8 | (u64)(st & 255));
      nd_st_release_gpu(&nd.sent[0], s); /* our own slot's rows and metadata too */
      nd_trace(nd, 0, s, 3);
    }
    if (nd.phase == 1) return; /* hybrid: NCCL and the receive half follow */
  }                            /* nd.phase != 2 */
  /* 3. Block 0: the receive plan as soon as every rank's counts are in (their
   * rows still on the way), then every source's data, this rank's own slot
   * included (written by other blocks of this grid): go. */
  if (b == 0) {
    ok = nd_wait_counts(p, nd, pl, s, call);
    if (tr) nd_trace(nd, 0, s, 2);
    if (!ok) return;
    nd_make_plan(p, nd, pl, layout, align, n_to, n_from, tpe, num_rows_out, cap, call);
    ok = nd_wait_all<true>(p, nd, DISCO_ND_DFLAG, s, DISCO_ND_PHASE_DFLAG, call, &bad,
                           &code);
    if (threadIdx.x == 0) ok = ok && nd_wait_block0(nd, &nd.sent[0], s);
    if (tr) nd_trace(nd, 0, s, 4);
    if (!nd_block_all(ok)) return;
    if (threadIdx.x == 0) {
      nd_st_release_gpu(nd.plan, s);
      nd_trace(nd, 0, s, 5);
    }
  } else {
    if (threadIdx.x == 0) ok = nd_wait_block0(nd, nd.plan, s);
    if (!nd_block_all(ok)) return;
  }
  if (threadIdx.x == 0) nd_trace_max(nd, 0, s, 10);
  /* 4. Expand (nothing reaches the caller unless every rank is fine and the
   * rows fit), padding rows. */
  if (rows_on && *(volatile int32_t *)pl.go) {
    const long long R = pl.recv_off[W];
    const int warp = !(nd.tune & DISCO_ND_TUNE_BLOCK_EXPAND) &&
                     (R >= (long long)nb * (DISCO_ND_THREADS / 32) ||
                      (nd.tune & DISCO_ND_TUNE_FORCE_WARP));
    /* EXPERT_MAJOR, K <= 32: tickets of rows, their metadata read once and
     * all in flight at once (nd_expand_batch) */
    if (!warp && !rank_major && p.top_k <= 32 && !(nd.tune & DISCO_ND_TUNE_ROW_EXPAND))
      nd_expand_batch<ND_XU>(p, nd, pl, x, 0, R, nb, &nd.ctr[DISCO_ND_CTR_EXPAND], recv_x,
                             src_rank, src_token, expert, weight);
    else
      nd_expand_range<false>(p, nd, pl, x, 0, R, nb, warp, &nd.ctr[DISCO_ND_CTR_EXPAND],
                             nd.expand_items, rank_major, recv_x, src_rank, src_token,
                             expert, weight, NULL);
    if (!rank_major && align > 1)
      nd_pad_rows(p, pl, b, nb, recv_x, src_rank, src_token, expert, weight);
  }
  if (tr) nd_trace(nd, 0, s, 6);
  if (threadIdx.x == 0) nd_trace_max(nd, 0, s, 11);
  /* 5. Done reading the slots: ack every source; next call's sequence. */
  if (nd_last_block(&nd.done[2])) {
    nd_flag_peers(nd, W, r, DISCO_ND_DACK, s << 8);
    nd.ctr[DISCO_ND_CTR_EXPAND] = 0ull;
    nd.seq[0] = s;
    nd_trace(nd, 0, s, 7);
  }
}

/* ---- launchers ------------------------------------------------------------------ */
/* Blocks of a launch: enough for the work, at most what is co-resident. */
static int nd_grid(const disco_nd_params_t *nd, long long work) {
  long long g = work < 1 ? 1 : work;
  return (int)(g < nd->max_grid ? g : nd->max_grid);
}

static cudaError_t nd_launch(const void *fn, int grid, size_t smem, void **args,
                             cudaStream_t stream) {
  cudaLaunchConfig_t cfg;
  cudaLaunchAttribute attr[1];
  memset(&cfg, 0, sizeof(cfg));
  cfg.gridDim = dim3((unsigned)grid, 1, 1);
  cfg.blockDim = dim3(DISCO_ND_THREADS, 1, 1);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  attr[0].id = cudaLaunchAttributeCooperative; /* co-residency, or an error */
  attr[0].val.cooperative = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelExC(&cfg, fn, args);
}

extern "C" cudaError_t disco_nd_max_grid(const disco_kparams_t *p, int max_sms, int *grid,
                                         int *sms_out, size_t *fuse_smem) {
  int dev = 0, sms = 0, a = 0, a1 = 0, c = 0, q = 0, q1 = 0;
  /* The layout's shared memory, when a layout block is the kernel's block */
  const size_t lsm = 32 * p->layout_warps == DISCO_ND_THREADS ? disco_layout_smem(p) : 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess)
    e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (e == cudaSuccess)
    e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&a, nd_dispatch_kernel,
                                                      DISCO_ND_THREADS, 0);
  if (e == cudaSuccess && lsm > 0)
    e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&a1, nd_dispatch_kernel,
                                                      DISCO_ND_THREADS, lsm);
  if (e == cudaSuccess && lsm > 0)
    e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&q1, disco_nd_pipe_kernel(),
                                                      DISCO_ND_THREADS, lsm);
  if (e == cudaSuccess)
    e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&c, disco_nd_combine_kernel(),
                                                      DISCO_ND_THREADS, 0);
  if (e == cudaSuccess)
    e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&q, disco_nd_pipe_kernel(),
                                                      DISCO_ND_THREADS, 0);
  if (e != cudaSuccess) return e;
  if (max_sms > 0 && max_sms < sms) sms = max_sms;
  if (q < a) a = q;
  if (c < a) a = c;
  /* fuse the layout only where it costs no co-resident block */
  *fuse_smem = lsm > 0 && a1 >= a && q1 >= a ? lsm : 0;
  *grid = a * sms;
  *sms_out = sms;
  if (*grid < 1) *grid = 1;
  return cudaSuccess;
}

extern "C" cudaError_t disco_nd_k_dispatch(const disco_kparams_t *p,
                                           const disco_nd_params_t *nd,
                                           const disco_dev_plan_t *pl,
                                           const disco_nd_io_t *io, cudaStream_t stream) {
  disco_kparams_t kp = *p;
  disco_nd_params_t ndp = *nd;
  disco_dev_plan_t plan = *pl;
  const uint4 *x = (const uint4 *)io->x;
  const float *w = io->weights;
  int T = (int)io->num_tokens, layout = io->layout, align = io->alignment;
  int rows = io->rows, status = io->status, call = io->call;
  uint4 *recv_x = (uint4 *)io->recv_x;
  int *sr = io->src_rank, *stok = io->src_token, *ex = io->expert;
  float *wt = io->weight;
  int32_t *nto = io->n_to, *nfrom = io->n_from, *tpe = io->tokens_per_expert;
  int64_t *nrows = io->num_recv_rows;
  long long cap = (long long)io->capacity;
  const void *idx = io->topk_idx;
  int idx64 = io->idx64, fuse = 0;
  void *args[] = {&kp,   &ndp,    &plan, &x,      &w,   &T,    &layout, &align,
                  &rows, &status, &call, &recv_x, &sr,  &stok, &ex,     &wt,
                  &nto,  &nfrom,  &tpe,  &nrows,  &cap, &idx,  &idx64,  &fuse};
  /* Work: tokens to send, and up to every possible received token. */
  long long work = T;
  const long long recv = (long long)p->world * (long long)(T > 0 ? T : 1);
  if (recv > work) work = recv;
  const int grid = nd_grid(nd, work);
  const long long kw = p->top_k < p->world ? p->top_k : p->world;
  const int pipe = rows && status == 0 &&
                   disco_nd_pipe_mode(T, p->top_k, p->world, nd->pipe_min) != 0 &&
                   grid >= 2 && !(nd->tune & DISCO_ND_TUNE_NO_PIPE);
  /* The layout in the kernel's first blocks: one block of tokens for the
   * plain kernel (block 0 alone waits for the acks meanwhile), any number
   * up to the grid for the pipelined one. */
  const long long nl = ((long long)T + DISCO_ND_THREADS - 1) / DISCO_ND_THREADS;
  fuse = idx != NULL && rows && !(nd->tune & DISCO_ND_TUNE_NO_FUSE) &&
         32 * p->layout_warps == DISCO_ND_THREADS && nd->fuse_smem > 0 &&
         (pipe ? nl <= grid : T <= DISCO_ND_THREADS);
  if (idx != NULL && !fuse) {
    const cudaError_t e = disco_k_layout(p, pl, idx, idx64, T, stream);
    if (e != cudaSuccess) return e;
  }
  /* The plain kernel with a few rows per block is latency-bound: a block per
   * SM while T * min(K, W) <= 4 per SM (runs 33-34: 128 tokens K 1 45.0 ->
   * 37.7 us, K 8 63.9 -> 60.8, 512 K 1 61.2 -> 58.4; but 256 K 8 85.5 ->
   * 92.2, hence the bound; the combine lost with fewer blocks). */
  const int sgrid = !pipe && (long long)T * kw <= 4ll * nd->sms && grid > nd->small_blocks
                        ? nd->small_blocks
                        : grid;
  return nd_launch(pipe ? disco_nd_pipe_kernel() : (const void *)nd_dispatch_kernel,
                   sgrid, fuse ? disco_layout_smem(p) : 0, args, stream);
}

extern "C" cudaError_t disco_nd_k_combine(const disco_kparams_t *p,
                                          const disco_nd_params_t *nd,
                                          const disco_dev_plan_t *pl, const void *y,
                                          int64_t y_rows, int weighted, int wire32,
                                          int rank_major, int status, void *out,
                                          int64_t num_tokens, cudaStream_t stream) {
  disco_kparams_t kp = *p;
  disco_nd_params_t ndp = *nd;
  disco_dev_plan_t plan = *pl;
  const uint4 *yv = (const uint4 *)y;
  long long yr = (long long)y_rows;
  int wt = weighted, w32 = wire32 && p->dtype != DISCO_DTYPE_FP32, rm = rank_major;
  int stt = status, T = (int)num_tokens;
  /* many tokens: fold each as its partials land (nd_combine.cu) */
  int cpipe = (nd->tune & DISCO_ND_TUNE_NO_CPIPE)
                  ? 0
                  : disco_nd_pipe_mode(T, p->top_k, p->world, nd->cpipe_min);
  uint4 *o = (uint4 *)out;
  void *args[] = {&kp, &ndp, &plan, &yv, &yr, &wt, &w32, &rm, &stt, &o, &T, &cpipe};
  const long long work = (long long)p->world * (long long)(T > 0 ? T : 1);
  return nd_launch(disco_nd_combine_kernel(), nd_grid(nd, work), 0, args, stream);
}
