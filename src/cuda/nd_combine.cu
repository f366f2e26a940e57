/* nccl_device: the combine (nd_kernels.h), one launch.
 *
 * Expert side: every block folds received tokens' expert rows and stores the
 * partial row at the token owner, going round the owners (r + 1, r + 2, ...)
 * so that all links are busy at once. Token side: each token's partials
 * folded over its destinations in ascending order into out.
 *
 * Plain: the token side starts when every expert rank's CFLAG is in (the
 * last block of each rank flags once all its partials are out). At 4096
 * tokens K 8 on 4x H200 that leaves ~87 us of token-side fold after the last
 * flag (DISCO_ND_TRACE). Pipelined (cpipe, a token owner with many tokens):
 * expert ranks that received many rows also flag each chunk of nd.cch_rows
 * rows per owner once it is stored (a block counts its pieces per chunk round
 * and fences once per round), and the token side folds a token as soon as
 * the chunks holding its partials are in: ctoken_pct of the blocks start
 * there, the others join when the expert side runs out. A chunk
 * flag or the final CFLAG of an expert rank both mean "this token's partial
 * from that rank is in", so every mix of modes across ranks is correct.
 * Statuses travel ahead (CSTAT, at the start), so the token side writes
 * nothing into out when any rank failed, as in the plain mode. */
#include "cuda/latch.cuh"
#include "cuda/nd_kernels.h"
#include "cuda/nd_rows.cuh"

/* Chunk flag [q][g] in window `base` (written by expert rank q). */
__device__ __forceinline__ u64 *nd_cch(const disco_nd_params_t &nd, char *base, int q,
                                       long long g, long long nch) {
  return (u64 *)(base + nd.off_cch) + (long long)q * nch + g;
}

/* Adds n stored pieces to chunk g of owner q's rows (one thread, after a
 * system fence over the worker's stores); the piece that completes the chunk
 * flags it at the owner. P: pieces per row. */
__device__ __forceinline__ void nd_chunk_add(const disco_kparams_t &p,
                                             const disco_nd_params_t &nd,
                                             const disco_dev_plan_t &pl, int q,
                                             long long g, unsigned n, int P, u64 v) {
  const long long CH = nd.cch_rows, rows = pl.recv_off[q + 1] - pl.recv_off[q];
  const long long left = rows - g * CH, nch = DISCO_ND_CHUNKS(p.max_tokens);
  const unsigned want = (unsigned)((left < CH ? left : CH) * P);
  nd_chunk_count(nd.cdone + q * nch + g, n, want, nd_cch(nd, nd.peer[q], p.rank, g, nch),
                 v);
}

/* A warp has stored received row i (all its pieces): count it at once (a
 * system fence per row, which stalls this warp only). */
__device__ __forceinline__ void nd_chunk_row_warp(const disco_kparams_t &p,
                                                  const disco_nd_params_t &nd,
                                                  const disco_dev_plan_t &pl, long long i,
                                                  u64 v) {
  __syncwarp();
  if ((threadIdx.x & 31) != 0) return;
  const int q = disco_source(pl, p.world, i);
  nd_fence_sys();
  nd_chunk_add(p, nd, pl, q, (i - pl.recv_off[q]) / nd.cch_rows, 1u, 1, v);
}

/* Block workers defer the count: pieces pile up per owner in shared memory
 * while the block stays in one chunk round g (items come in increasing
 * order, so a block crosses each round once), and one system fence covers
 * them all when it moves on: a fence per row stalled every warp of the block
 * and took the expert side from 442 to 686 us at 4096 tokens K 8. */
#define ND_PEND_MAX 64 /* owners a block tracks; larger worlds count per row */
struct nd_pend {
  unsigned n[ND_PEND_MAX];
  long long g;
};

/* Flushes the block's pending pieces (block-wide call). */
__device__ __forceinline__ void nd_pend_flush(const disco_kparams_t &p,
                                              const disco_nd_params_t &nd,
                                              const disco_dev_plan_t &pl, nd_pend &pd,
                                              int P, u64 v) {
  __syncthreads(); /* the block's stores are issued */
  if (threadIdx.x == 0 && pd.g >= 0) {
    nd_fence_sys();
    for (int q = 0; q < p.world && q < ND_PEND_MAX; q++)
      if (pd.n[q] != 0u) {
        nd_chunk_add(p, nd, pl, q, pd.g, pd.n[q], P, v);
        pd.n[q] = 0u;
      }
  }
  __syncthreads(); /* pd is settled for everyone */
}

/* Block worker about to store a piece of row i: flushes first when i is in
 * a new round (block-uniform). Returns i's owner. */
__device__ __forceinline__ int nd_pend_at(const disco_kparams_t &p,
                                          const disco_nd_params_t &nd,
                                          const disco_dev_plan_t &pl, nd_pend &pd,
                                          long long i, int P, u64 v) {
  const int q = disco_source(pl, p.world, i);
  const long long g = (i - pl.recv_off[q]) / nd.cch_rows;
  if (g != pd.g) {
    nd_pend_flush(p, nd, pl, pd, P, v); /* every thread has read pd.g */
    if (threadIdx.x == 0) pd.g = g;
  }
  return q;
}

#define ND_CCACHE 64 /* destinations whose last ready chunk a block remembers */

/* Worker (a block, or a warp when S == 32): waits until the partials of
 * token t from all its destinations are in, one destination per lane of the
 * first warp. cache (block workers: shared, ND_CCACHE entries): the chunk
 * per destination last seen ready (tokens come in order, so the next one
 * mostly needs the same chunks). Uniform over the worker: 1, or 0 after a
 * timeout. */
template <int S>
__device__ int nd_token_ready(const disco_kparams_t &p, const disco_nd_params_t &nd,
                              const disco_dev_plan_t &pl, int t, u64 c, u64 call,
                              long long *cache, int tid) {
  int ok = 1;
  if (tid < 32) {
    const int *dest = pl.tok_dest + (long long)t * p.kd;
    const int *trow = pl.tok_row + (long long)t * p.kd;
    for (int k = tid; k < p.kd; k += 32) {
      const int d = dest[k];
      if (d < 0) break; /* ascending, -1 terminated; destinations distinct */
      const long long g = trow[k] / nd.cch_rows;
      if (cache != NULL && d < ND_CCACHE && cache[d] == g) continue;
      /* chunk g's flag, or d's CFLAG for all its partials (this grid's
       * `sent` word, a bare seq, for our own) */
      const int self = d == p.rank;
      const u64 *all =
          self ? nd.sent + 1 : nd_flag(nd, nd.local, p.world, DISCO_ND_CFLAG, d);
      if (!nd_wait_either(p, nd,
                          nd_cch(nd, nd.local, d, g, DISCO_ND_CHUNKS(p.max_tokens)), all,
                          self, c, d, DISCO_ND_PHASE_CFLAG, call)) {
        ok = 0;
        break;
      }
      if (cache != NULL && d < ND_CCACHE) cache[d] = g;
    }
    ok = __all_sync(0xffffffffu, ok);
    __syncwarp(); /* what lane k acquired is read by every lane (a vote does not order) */
  }
  return S == 32 ? ok : nd_block_all(ok);
}

__global__ void __launch_bounds__(DISCO_ND_THREADS, 3)
    nd_combine_kernel(disco_kparams_t p, disco_nd_params_t nd, disco_dev_plan_t pl,
                      const uint4 *y, long long y_rows, int weighted, int wire32_cfg,
                      int rank_major, int status_in, uint4 *out, int T, int cpipe) {
  /* the sequence loaded beside the dead word (one round trip, not two) */
  const u64 c = ((volatile u64 *)nd.seq)[1] + 1ull;
  if (nd_dead(nd)) return;
  /* fp32 partials on every rank or on none (pl.wide: some rank received
   * this dispatch EXPERT_MAJOR); RANK_MAJOR rows are then widened. */
  const int wire32 = wire32_cfg && *pl.wide != 0;
  const int W = p.world, r = p.rank, b = blockIdx.x, nb = gridDim.x;
  const u64 call = (u64)DISCO_CALL_COMBINE << 32 | (c & 0xffffffffull);
  const int kind = cpipe ? 3 : 1; /* trace kind */
  int st = status_in;
  const long long rows = *pl.num_rows;
  if (st == 0)
    st = *pl.go == 0                    ? (int)DISCO_ERR_INVALID_USAGE
         : rows > 0 && y == NULL        ? (int)DISCO_ERR_NULL_POINTER
         : y_rows >= 0 && y_rows < rows ? (int)DISCO_ERR_CAPACITY
                                        : 0;
  int ok = 1, q = -1, code = 0;
  const int tr = b == 0 && threadIdx.x == 0;
  if (tr) nd_trace(nd, kind, c, 0);
  /* A hybrid comm's receive half (nd.phase 2): the expert side ran as the
   * previous launch, NCCL has brought the other hosts' partials and flags. */
  if (nd.phase != 2) {
    if (threadIdx.x == 0 && b == 0 && st != 0 && status_in == 0)
      disco_latch(p.lerr, st, r, (long long)call, y_rows, rows, 0, 0);
    /* the token owners have read our previous partials */
    ok = nd_wait_all<false>(p, nd, DISCO_ND_CACK, c - 1ull, DISCO_ND_PHASE_CACK, call, &q,
                            &code);
    if (tr) nd_trace(nd, kind, c, 1);
    if (!ok) return;
    /* Our status, ahead of the partials. Only now: the owners have finished
     * the previous call, whose CSTAT they might otherwise read as this one's. */
    if (tr) nd_flag_peers(nd, W, r, DISCO_ND_CSTAT, c << 8 | (u64)(st & 255));
    /* Pipelined: blocks [0, nt) start on the token side. */
    int nt = cpipe ? (int)((long long)nb * nd.ctoken_pct / 100) : 0;
    nt = nt > nb - 1 ? nb - 1 : nt;
    const long long R = pl.recv_off[W];
    /* chunk flags when the owners are likely to fold as they land: about what
     * a rank receives when its peers have cpipe_min tokens each (a token goes
     * to half the ranks), or half that when this rank pipelines by its rows
     * (cpipe 2: its peers, alike, probably do too) */
    const int chunks = (2 * R >= (long long)W * nd.cpipe_min ||
                        (cpipe == 2 && 4 * R >= (long long)W * nd.cpipe_min)) &&
                       !(nd.tune & DISCO_ND_TUNE_NO_CPIPE);
    const u64 cv = c << 8 | (u64)(st & 255);
    /* Test hook: rank 0 stores its own partials late (see dispatch). */
    const int late = nd.test_self_delay_ns != 0ull && r == 0;
    for (int pass = 0; b >= nt && st == 0 && pass <= late; pass++) {
      if (pass == 1) nd_sleep(nd.test_self_delay_ns);
      /* csend_pmax (0: no cap): halves instead of quarter rows took 32 tokens
       * K 8 from 33.9 to 31.7 us but 128 K 8 from 44.3 to 45.2 (run 39) */
      const int rr = !(nd.tune & DISCO_ND_TUNE_SOURCE_ORDER);
      long long N = R;
      if (rr) { /* items: W times the most rows from one source */
        N = 0;
        for (int q = 0; q < W; q++)
          if (pl.recv_off[q + 1] - pl.recv_off[q] > N)
            N = pl.recv_off[q + 1] - pl.recv_off[q];
        N *= W;
      }
      int P0 = nd_parts(nb - nt, R, p.row_vecs);
      if (!(nd.tune & DISCO_ND_TUNE_NO_ROUND)) P0 = nd_parts_round(nb - nt, N, P0);
      const int P = nd.csend_pmax > 0 && P0 > nd.csend_pmax ? nd.csend_pmax : P0;
      const int sel = late ? pass + 1 : 0, S = DISCO_ND_THREADS;
      unsigned long long *ct = &nd.ctr[pass ? DISCO_ND_CTR_CLATE(W) : DISCO_ND_CTR_CSEND];
      if (!(nd.tune & DISCO_ND_TUNE_WARP_CSEND)) {
        __shared__ nd_pend pd;
        for (int q = threadIdx.x; q < ND_PEND_MAX; q += blockDim.x) pd.n[q] = 0u;
        if (threadIdx.x == 0) pd.g = -1;
        for (long long it = nd_share<S>(nd_ask<S>(ct)), a; it < N * P;
             it = nd_share<S>(a)) {
          const long long i = nd_citem_row(pl, W, r, it / P, rr);
          int lo, hi;
          a = nd_ask<S>(ct);
          if (i < 0) continue;
          const int q = chunks ? nd_pend_at(p, nd, pl, pd, i, P, cv) : -1;
          nd_piece(p.row_vecs, P, (int)(it % P), &lo, &hi);
          const int sent =
              nd_csend_token<S>(p, nd, pl, y, i, weighted, wire32, rank_major, lo, hi,
                                sel, threadIdx.x); /* block-uniform */
          if (sent && q >= 0 && q < ND_PEND_MAX) {
            if (threadIdx.x == 0) pd.n[q]++;
          } else if (sent && q >= ND_PEND_MAX) { /* a world too large to track */
            __syncthreads();                     /* every thread's stores of the piece */
            if (threadIdx.x == 0) {
              nd_fence_sys();
              nd_chunk_add(p, nd, pl, q, (i - pl.recv_off[q]) / nd.cch_rows, 1u, P, cv);
            }
          }
        }
        if (chunks) nd_pend_flush(p, nd, pl, pd, P, cv);
      } else { /* a row per warp */
        for (long long j = nd_share<32>(nd_ask<32>(ct)), a; j < N; j = nd_share<32>(a)) {
          const long long i = nd_citem_row(pl, W, r, j, rr);
          a = nd_ask<32>(ct);
          if (i >= 0 &&
              nd_csend_token<32>(p, nd, pl, y, i, weighted, wire32, rank_major, 0,
                                 p.row_vecs, sel, threadIdx.x & 31) &&
              chunks)
            nd_chunk_row_warp(p, nd, pl, i, cv);
        }
      }
    }
    if (!cpipe && tr) nd_trace(nd, kind, c, 2);
    if (nd_last_block(&nd.done[1])) {
      nd.ctr[DISCO_ND_CTR_CSEND] = 0ull;
      nd.ctr[DISCO_ND_CTR_CLATE(W)] = 0ull;
      nd_flag_peers(nd, W, r, DISCO_ND_CFLAG, cv);
      nd_st_release_gpu(&nd.sent[1], c); /* our own partials too */
      nd_trace(nd, kind, c, 3);
    }
    if (nd.phase == 1) return; /* hybrid: NCCL and the receive half follow */
  }                            /* nd.phase != 2 */
  if (cpipe) {
    /* Every rank's status first: nothing reaches out unless all are fine. */
    ok = nd_wait_all<false>(p, nd, DISCO_ND_CSTAT, c, DISCO_ND_PHASE_CSTAT, call, &q,
                            &code);
    if (tr) nd_trace(nd, kind, c, 2);
  } else {
    /* Every expert rank's partials, ours (other blocks of this grid) included. */
    ok = nd_wait_all<false>(p, nd, DISCO_ND_CFLAG, c, DISCO_ND_PHASE_CFLAG, call, &q,
                            &code);
    if (threadIdx.x == 0) ok = ok && nd_wait_block0(nd, &nd.sent[1], c);
  }
  if (threadIdx.x == 0) {
    if (ok && st == 0 && q >= 0 && b == 0)
      disco_latch(p.lerr, DISCO_ERR_REMOTE, q, (long long)call, -1, -1, -1, code);
    if (ok && (st != 0 || q >= 0)) ok = 2; /* someone failed: write nothing */
    if (tr && !cpipe) nd_trace(nd, kind, c, 4);
  }
  ok = nd_block_all(ok);
  if (!ok) return;
  unsigned long long *ct = &nd.ctr[DISCO_ND_CTR_TOKEN];
  if (ok == 1 && (nd.tune & DISCO_ND_TUNE_WARP_TOKEN)) { /* a token per warp */
    for (long long t = nd_share<32>(nd_ask<32>(ct)), a; t < T; t = nd_share<32>(a)) {
      a = nd_ask<32>(ct);
      if (cpipe &&
          !nd_token_ready<32>(p, nd, pl, (int)t, c, call, NULL, threadIdx.x & 31))
        break; /* timed out: the comm is dead; the block still meets its barriers */
      nd_ctoken_token<32>(p, nd, pl, out, wire32, (int)t, 0, p.row_vecs,
                          threadIdx.x & 31);
    }
  } else if (ok == 1) {
    __shared__ long long cache[ND_CCACHE];
    for (int i = threadIdx.x; i < ND_CCACHE; i += blockDim.x) cache[i] = -1;
    int P = nd_parts(nb, T, p.row_vecs);
    if (!(nd.tune & DISCO_ND_TUNE_NO_ROUND)) P = nd_parts_round(nb, T, P);
    const int S = DISCO_ND_THREADS;
    for (long long it = nd_share<S>(nd_ask<S>(ct)), a; it < (long long)T * P;
         it = nd_share<S>(a)) {
      int lo, hi;
      a = nd_ask<S>(ct);
      if (cpipe &&
          !nd_token_ready<S>(p, nd, pl, (int)(it / P), c, call, cache, threadIdx.x))
        return;
      nd_piece(p.row_vecs, P, (int)(it % P), &lo, &hi);
      nd_ctoken_token<S>(p, nd, pl, out, wire32, (int)(it / P), lo, hi, threadIdx.x);
    }
  }
  if (tr) nd_trace(nd, kind, c, cpipe ? 4 : 5);
  if (nd_last_block(&nd.done[3])) {
    nd.ctr[DISCO_ND_CTR_TOKEN] = 0ull;
    nd_flag_peers(nd, W, r, DISCO_ND_CACK, c << 8);
    nd.seq[1] = c;
    nd_trace(nd, kind, c, cpipe ? 5 : 6);
  }
}

extern "C" const void *disco_nd_combine_kernel(void) {
  return (const void *)nd_combine_kernel;
}
