/* nccl_device: the pipelined dispatch for many tokens (nd_kernels.h).
 *
 * The plain kernel sends everything, then expands everything: at 4096 tokens
 * K 8 on 4x H200 that is ~470 us of NVLink stores followed by ~240 us of HBM
 * copies (DISCO_ND_TRACE). Here the grid splits: sender blocks go through
 * the destinations one at a time (own slot, r + 1, r + 2, ...: at any moment
 * the ranks send to distinct receivers) and publish one DFLAG per
 * destination when its rows are out (one system fence per block and step,
 * not per row); expander blocks make the plan as soon as the counts are in
 * (nd_wait_counts), expand this rank's own tokens, then each source as its flag lands
 * (r - 1 first: the rank that sends to us first). Only the last source's
 * expand is left after the sends, and the sender blocks join it once their
 * rows are out. Flags, acks and waits are the plain kernel's
 * (design-nccl-device.md §5). The layout runs in the first blocks. */
#include "cuda/latch.cuh"
#include "cuda/layout.cuh"
#include "cuda/nd_kernels.h"
#include "cuda/nd_rows.cuh"
#include "cuda/recv_plan.cuh"

/* Token t's row (unless it is our own token in EXPERT_MAJOR: the expand reads
 * x) and metadata for its k-th destination d, if the row at d is in [lo, hi)
 * (block-wide). */
static __device__ int nd_send_one(const disco_kparams_t &p, const disco_nd_params_t &nd,
                                  const disco_dev_plan_t &pl, const uint4 *x,
                                  const float *w, int t, int k, int d, int rank_major,
                                  long long lo, long long hi) {
  const int r = p.rank, nc = p.num_cols, C = 32 * p.layout_warps, nv = p.row_vecs;
  const long long M = p.max_tokens;
  const int *bb = pl.blk_base + (long long)(t / C) * nc;
  const int row = bb[p.num_experts + d] + pl.tok_dpos[(long long)t * p.kd + k];
  if (row < lo || row >= hi) return -1; /* another part's row */
  /* The row's loads before the metadata's chain of loads (see nd_expand_expert) */
  const int cp = d != r || rank_major;
  const int pre = cp && !(nd.tune & DISCO_ND_TUNE_NO_PREFETCH_PIPE) &&
                  nv <= ND_UNROLL * DISCO_ND_THREADS;
  uint4 a[ND_UNROLL];
  if (pre)
    nd_pre_load<false, DISCO_ND_THREADS>(a, x + (long long)t * nv, 0, nv, threadIdx.x);
  if (threadIdx.x < 32) {
    int *meta =
        (int *)(nd.peer[d] + nd.off_meta) + ((long long)r * M + row) * p.meta_ints;
    disco_meta_row(p, pl, bb, w, t, d, threadIdx.x, meta);
    if (threadIdx.x == 0) pl.tok_row[(long long)t * p.kd + k] = row;
  }
  if (!cp) return row;
  /* peer[] + offsets, not nd.prow: this kernel never runs in a hybrid comm
   * (nd_hybrid.c), and prow here spilled ~100 bytes more per thread */
  uint4 *dst = (uint4 *)(nd.peer[d] + nd.off_rows) + ((long long)r * M + row) * nv;
  if (pre)
    nd_pre_store<DISCO_ND_THREADS>(&dst, 1, a, 0, nv, threadIdx.x);
  else
    nd_copy<false>(&dst, 1, x + (long long)t * nv, 0, nv);
  return row;
}

/* Whether a source's `rows` to one receiver go in flagged chunks (the
 * sender's step to it and the receiver's expand of it decide alike). */
__device__ __forceinline__ int nd_dch_on(const disco_kparams_t &p,
                                         const disco_nd_params_t &nd, int H,
                                         long long rows) {
  return nd.dch_rows > 0 && H == 1 && rows * (long long)p.row_bytes >= nd.dch_min;
}

/* Chunk flags of the rows to destination d (nd.dch_rows > 0): a sender block
 * counts the rows it stored while they stay in one chunk g (its tickets come
 * in increasing order, so it crosses each chunk once) and, when it moves on,
 * fences once and adds them to the chunk's counter; the block that completes
 * the chunk flags it at d ([r][g] in d's off_dch, seq << 8). As in the
 * combine (nd_combine.cu), a fence per row would stall the block. Block-wide
 * call; n: rows of chunk g, 0: nothing pending. */
static __device__ void nd_dch_flush(const disco_kparams_t &p, const disco_nd_params_t &nd,
                                    const disco_dev_plan_t &pl, int d, long long g,
                                    unsigned n, u64 s) {
  if (n == 0u) return; /* uniform: every thread counts alike */
  __syncthreads();     /* the block's stores are issued */
  if (threadIdx.x != 0) return;
  const long long CH = nd.dch_rows, nch = DISCO_ND_CHUNKS(p.max_tokens);
  const long long left = pl.msg[(long long)d * p.msg_len + DISCO_MSG_TOKENS] - g * CH;
  const unsigned want = (unsigned)(left < CH ? left : CH);
  nd_fence_sys();
  nd_chunk_count(nd.ddone + (long long)d * nch + g, n, want,
                 (u64 *)(nd.peer[d] + nd.off_dch) + (long long)p.rank * nch + g, s << 8);
}

/* Slot k of token t that goes to destination d, or -1. */
static __device__ __forceinline__ int nd_slot_of(const disco_kparams_t &p,
                                                 const disco_dev_plan_t &pl, long long t,
                                                 int d) {
  const int *dest = pl.tok_dest + t * p.kd;
  int k = -1;
  for (int q = 0; q < p.kd; q++) { /* ascending, -1 terminated */
    const int dq = dest[q];
    if (dq < 0 || dq > d) break;
    if (dq == d) k = q;
  }
  return k;
}

/* Tokens per sender ticket for destination d: about one row to d per ticket
 * (T / rows to d, at most 32: warp 0 checks them with one ballot), but at
 * least 4 tickets per sender block and step, or the blocks with the most
 * rows set the step's end. With one token per ticket, K 1 over 4 ranks spent
 * three tickets in four, each an atomic and two block barriers, on tokens
 * that skip d (run 25: 4096 tokens K 1 212 -> 204 us; 1024 tokens K 1, with
 * 1.3 tickets per block, 95 -> 110 us, hence the floor). */
static __device__ __forceinline__ int nd_group(const disco_kparams_t &p,
                                               const disco_dev_plan_t &pl, int tune,
                                               int T, int d, int ns) {
  if (tune & DISCO_ND_TUNE_NO_GROUP) return 1;
  const long long n = pl.msg[(long long)d * p.msg_len + DISCO_MSG_TOKENS];
  long long g = n > 0 ? T / n : 32;
  const long long gb = T / (4ll * ns);
  if (gb < g) g = gb;
  return (int)(g < 1 ? 1 : g > 32 ? 32 : g);
}

/* Share of the grid that expands (the rest sends). pct 0: half, unless a
 * sender block would have >= 12 rows per destination at half, then 25%: the
 * sends set the end (4096 tokens K 8: 638.6 -> 601.9 us at 35% in run 27,
 * 599 -> 585 us at 25% in run 36, three passes each) and more sender
 * blocks push more (the expand still keeps up); with fewer rows per block the
 * step tails do, and fewer expanders only lengthen the expand (35%: 4096 K 1
 * +27 us, 1024 K 8 +27 us; H 4096 K 2 E 8, 8 rows per block, the same;
 * 1024 K 8 at 40% 199 us, at 60% 206, at 50% 193, run 35). Every block reads
 * the same counts (read after the layout's release), so all agree. */
static __device__ __forceinline__ int nd_expand_pct(const disco_kparams_t &p,
                                                    const disco_dev_plan_t &pl, int pct,
                                                    int nb) {
  if (pct != 0) return pct;
  long long most = 0;
  for (int d = 0; d < p.world; d++) {
    const long long n = pl.msg[(long long)d * p.msg_len + DISCO_MSG_TOKENS];
    if (d != p.rank && n > most) most = n;
  }
  return most >= 12ll * (nb - nb / 2) ? 25 : 50;
}

/* Part h of H of the rows to destination d: rows [*lo, *hi) at d (split
 * evenly, as the receiver splits them), held by tokens in [*t0, *t1): the
 * layout blocks around the boundaries, found by binary search over the
 * blocks' bases (block-wide call). */
static __device__ void nd_part_span(const disco_kparams_t &p, const disco_dev_plan_t &pl,
                                    int T, int d, int h, int H, long long *lo,
                                    long long *hi, int *t0, int *t1) {
  __shared__ int sh[2];
  const int C = 32 * p.layout_warps, nb = (T + C - 1) / C, col = p.num_experts + d;
  const long long n = pl.msg[(long long)d * p.msg_len + DISCO_MSG_TOKENS];
  *lo = n * h / H;
  *hi = n * (h + 1) / H;
  __syncthreads(); /* sh of the previous call is read */
  if (threadIdx.x == 0) {
    /* last block whose base <= lo; first block whose base >= hi (nb: none) */
    int a = 0, z = nb - 1;
    while (a < z) {
      const int m = (a + z + 1) / 2;
      if (pl.blk_base[(long long)m * p.num_cols + col] <= *lo)
        a = m;
      else
        z = m - 1;
    }
    int u = 0, v = nb;
    while (u < v) {
      const int m = (u + v) / 2;
      if (pl.blk_base[(long long)m * p.num_cols + col] >= *hi)
        v = m;
      else
        u = m + 1;
    }
    sh[0] = a * C;
    sh[1] = u >= nb ? T : u * C;
  }
  __syncthreads();
  *t0 = sh[0];
  *t1 = sh[1];
}

__global__ void __launch_bounds__(DISCO_ND_THREADS, 3)
    nd_dispatch_pipe_kernel(disco_kparams_t p, disco_nd_params_t nd, disco_dev_plan_t pl,
                            const uint4 *x, const float *w, int T, int layout, int align,
                            int rows_on, int status_in, int call_kind, uint4 *recv_x,
                            int *src_rank, int *src_token, int *expert, float *weight,
                            int32_t *n_to, int32_t *n_from, int32_t *tpe,
                            int64_t *num_rows_out, long long cap, const void *idx,
                            int idx64, int fuse) {
  /* the sequence loaded beside the dead word (one round trip, not two) */
  const u64 s = *(volatile u64 *)nd.seq + 1ull;
  if (nd_dead(nd)) return;
  const int W = p.world, r = p.rank, b = blockIdx.x, nb = gridDim.x;
  const int rank_major = layout == DISCO_LAYOUT_RANK_MAJOR;
  const u64 call = (u64)call_kind << 32 | (s & 0xffffffffull);
  const int tr = b == 0 && threadIdx.x == 0;
  int ok = 1, bad, code;
  (void)rows_on; /* always 1 here: the layout-only call takes the plain kernel */
  if (tr) nd_trace(nd, 2, s, 0);
  /* The layout, fused: the first blocks are its blocks (the launcher checks
   * there are enough); the last to finish releases `lay`. One launch less:
   * 2-5 us host-observed (run 32); the layout itself still takes 6-12 us
   * here, a chain of dependent loads and stores (DISCO_ND_TUNE=64: its own
   * launch again). */
  if (fuse) {
    const int C = 32 * p.layout_warps, nl = (T + C - 1) / C;
    extern __shared__ unsigned smem[];
    if (b < nl && disco_layout_body(p, pl, idx, idx64, T, b, nl, smem)) {
      __syncthreads();
      if (threadIdx.x == 0) nd_st_release_gpu(nd.lay, s);
    }
  }
  ok = nd_wait_all<true>(p, nd, DISCO_ND_DACK, s - 1ull, DISCO_ND_PHASE_DACK, call, &bad,
                         &code);
  if (fuse && threadIdx.x == 0) ok = ok && nd_wait_block0(nd, nd.lay, s);
  if (tr) nd_trace(nd, 2, s, 1);
  if (!nd_block_all(ok)) return;
  /* the counts are in (pl.msg): split the grid */
  int nx = (int)((long long)nb * nd_expand_pct(p, pl, nd.expand_pct, nb) / 100);
  nx = nx < 1 ? 1 : nx > nb - 1 ? nb - 1 : nx; /* the launcher ensures nb >= 2 */
  const int ns = nb - nx;
  /* senders expand too once their rows are out (blocks past the expand) */
  const int join = !(nd.tune & DISCO_ND_TUNE_NO_JOIN), nexp = join ? nb : nx;
  const int st = status_in != 0 ? status_in : (int)pl.msg[DISCO_MSG_CODE];

  if (b >= nx) { /* ---- senders: one destination at a time, in parts ---- */
    /* Own slot first (metadata, and rows for RANK_MAJOR), then part h of
     * every peer's rows for h = 0, 1, ...: the last flag a receiver waits
     * for covers 1 / H of a source's rows. Test hook: rank 0 sends to itself
     * last, late (see the plain kernel). */
    const int late = nd.test_self_delay_ns != 0ull && r == 0;
    const int H = W > 1 ? nd.dparts : 1, n_e = 1 + H * (W - 1);
    for (int e = 0; e < n_e; e++) {
      const int e2 = late ? (e + 1) % n_e : e;
      const int h = e2 == 0 ? 0 : (e2 - 1) / (W - 1);
      const int step = e2 == 0 ? 0 : 1 + (e2 - 1) % (W - 1), d = (r + step) % W;
      if (late && step == 0) nd_sleep(nd.test_self_delay_ns);
      unsigned long long *c = &nd.ctr[DISCO_ND_CTR_STEP + h * W + step];
      long long lo = 0, hi = 1ll << 62; /* rows of this part at d */
      int t0 = 0, t1 = T;               /* tokens that may hold them */
      if (step != 0 && H > 1) nd_part_span(p, pl, T, d, h, H, &lo, &hi, &t0, &t1);
      const int S = DISCO_ND_THREADS, G = nd_group(p, pl, nd.tune, T, d, ns);
      const long long ng = (t1 - t0 + G - 1) / G; /* tickets of G tokens */
      /* chunk flags to d: on the last step only (its rows are the receiver's
       * last source; the earlier ones land while the expand is busy, and
       * the fences cost the senders ~30 us over all steps at 4096 K 8), and
       * only for many bytes (run 54: 4096 K 8 -14 us, 14 MB per peer +1-4) */
      const int dch =
          step == W - 1 && d != r &&
          nd_dch_on(p, nd, H, pl.msg[(long long)d * p.msg_len + DISCO_MSG_TOKENS]);
      long long pg = -1; /* pending chunk, */
      unsigned pn = 0u;  /* its rows (uniform) */
      __shared__ int ks[32];
      __shared__ unsigned km;
      for (long long g = st == 0 ? nd_share<S>(nd_ask<S>(c)) : ng, a; g < ng;
           g = nd_share<S>(a)) {
        const long long ta = t0 + g * G, n = t1 - ta < G ? t1 - ta : G;
        a = nd_ask<S>(c);
        if (threadIdx.x < 32) { /* warp 0: which of the G tokens go to d */
          const int k = threadIdx.x < n ? nd_slot_of(p, pl, ta + threadIdx.x, d) : -1;
          const unsigned m = __ballot_sync(0xffffffffu, k >= 0);
          ks[threadIdx.x] = k;
          if (threadIdx.x == 0) km = m;
        }
        __syncthreads();
        for (unsigned m = km; m != 0u; m &= m - 1u) {
          const int j = __ffs(m) - 1;
          const int row =
              nd_send_one(p, nd, pl, x, w, (int)(ta + j), ks[j], d, rank_major, lo, hi);
          if (dch && row >= 0) {
            if (row / nd.dch_rows != pg) {
              nd_dch_flush(p, nd, pl, d, pg, pn, s);
              pg = row / nd.dch_rows;
              pn = 0u;
            }
            pn++;
          }
        }
      }
      if (dch) nd_dch_flush(p, nd, pl, d, pg, pn, s);
      if (nd_last_of(&nd.step[h * W + step], (unsigned)ns)) {
        *c = 0ull;
        if (d == r)
          nd_st_release_gpu(&nd.sent[0], s); /* own slot: read by this grid only */
        else
          nd_st_relaxed(nd_flag(nd, nd.peer[d], W,
                                h == H - 1 ? DISCO_ND_DFLAG : DISCO_ND_DPART + h, r),
                        s << 8 | (u64)(st & 255));
        if (e == n_e - 1) nd_trace(nd, 2, s, 7);
      }
    }
    if (!join) return;
    /* Done sending: join the expanders, whose last sources' expand is the
     * tail of the call (their counters are shared, so a late joiner finds
     * the finished sources empty). */
  }

  /* ---- expanders: the plan as soon as the counts are in ---- */
  if (b == 0) {
    nd_send_counts(p, nd, pl, status_in, 1, s);
    ok = nd_wait_counts(p, nd, pl, s, call);
    if (!ok) return;
    nd_make_plan(p, nd, pl, layout, align, n_to, n_from, tpe, num_rows_out, cap, call);
    __syncthreads();
    if (threadIdx.x == 0) {
      nd_st_release_gpu(nd.plan, s);
      nd_trace(nd, 2, s, 2);
    }
  } else {
    if (threadIdx.x == 0) ok = nd_wait_block0(nd, nd.plan, s);
    if (!nd_block_all(ok)) return;
  }
  const int go = *(volatile int32_t *)pl.go;
  /* Own rows first, then part h of sources r - 1, r - 2, ... for h = 0, 1, ...
   * (the order they are sent in). A source that is not pipelined sends one
   * flag for all its rows: its DFLAG stands for every part. */
  const int H = W > 1 ? nd.dparts : 1, n_e = 1 + H * (W - 1);
  for (int e = 0; e < n_e; e++) {
    const int h = e == 0 ? 0 : (e - 1) / (W - 1);
    const int q = e == 0 ? r : (r - 1 - (e - 1) % (W - 1) + W) % W;
    if (tr && e == 1) nd_trace(nd, 2, s, 3); /* own rows expanded */
    /* a peer's rows in chunks: the expand waits for each chunk's flag (or
     * the source's DFLAG) as it reaches it, not for the DFLAG first */
    const int chunked = go && e == n_e - 1 && e != 0 &&
                        nd_dch_on(p, nd, H, pl.recv_off[q + 1] - pl.recv_off[q]);
    if (threadIdx.x == 0 && !chunked) {
      u64 v;
      const u64 *fin = nd_flag(nd, nd.local, W, DISCO_ND_DFLAG, q);
      ok = e == 0 ? nd_wait_block0(nd, &nd.sent[0], s)
           : h == H - 1
               ? nd_wait<true>(p, nd, fin, s, q, DISCO_ND_PHASE_DFLAG, call, &v)
               : nd_wait_either(p, nd, nd_flag(nd, nd.local, W, DISCO_ND_DPART + h, q),
                                fin, 0, s, q, DISCO_ND_PHASE_DFLAG, call);
    }
    if (!nd_block_all(ok)) return;
    if (tr && e == n_e - 1) nd_trace(nd, 2, s, 4); /* the last source's flag is in */
    if (!go) continue;
    const long long first = pl.recv_off[q], all = pl.recv_off[q + 1] - first;
    const long long lo = e == 0 ? 0 : all * h / H, hi = e == 0 ? all : all * (h + 1) / H;
    const long long n = hi - lo;
    /* pieces and mode from nx, whoever joins: every worker must cut alike */
    const int warp = !(nd.tune & DISCO_ND_TUNE_BLOCK_EXPAND) &&
                     (n >= (long long)nx * (DISCO_ND_THREADS / 32) ||
                      (nd.tune & DISCO_ND_TUNE_FORCE_WARP));
    const nd_chunks cw = {q, first, s, call};
    unsigned long long *ctr = &nd.ctr[DISCO_ND_CTR_SRC(W, q, h)];
    /* Block mode, whole source in: tickets of up to 4 rows, metadata read
     * once, ND_XU_PIPE loads in flight (nd_expand_batch), as in the small
     * kernel.
     * The last source's expand is the dispatch's tail. */
    if (!warp && !chunked && !rank_major && p.top_k <= 32 &&
        !(nd.tune & DISCO_ND_TUNE_ROW_EXPAND_PIPE)) {
      /* tickets sized for every worker that may join, of at most pipe_xg
       * rows (sized for the expanders alone, with 4 rows, the last block to
       * join took a whole ticket and ended alone: 4096 K 1, 13.6 us behind
       * block 0, run 67) */
      long long xb = nexp;
      if (xb < (n + nd.pipe_xg - 1) / nd.pipe_xg) xb = (n + nd.pipe_xg - 1) / nd.pipe_xg;
      nd_expand_batch<ND_XU_PIPE>(p, nd, pl, x, first + lo, n, (int)xb, ctr, recv_x,
                                  src_rank, src_token, expert, weight);
    } else
      nd_expand_range<true>(p, nd, pl, x, first + lo, n, nx, warp, ctr, 4, rank_major,
                            recv_x, src_rank, src_token, expert, weight,
                            chunked ? &cw : NULL);
  }
  /* a chunk wait that timed out stopped its worker: no pads, no acks */
  if (!nd_block_all(!nd_dead(nd))) return;
  if (go && !rank_major && align > 1 && b < nx)
    nd_pad_rows(p, pl, b, nx, recv_x, src_rank, src_token, expert, weight);
  if (tr) nd_trace(nd, 2, s, 5);
  if (nd_last_of(&nd.done[2], (unsigned)nexp)) {
    for (int h = 0; h < DISCO_ND_PARTS_MAX; h++)
      for (int q = 0; q < W; q++) nd.ctr[DISCO_ND_CTR_SRC(W, q, h)] = 0ull;
    nd_flag_peers(nd, W, r, DISCO_ND_DACK, s << 8);
    nd.seq[0] = s;
    nd_trace(nd, 2, s, 6);
  }
}

extern "C" const void *disco_nd_pipe_kernel(void) {
  return (const void *)nd_dispatch_pipe_kernel;
}
