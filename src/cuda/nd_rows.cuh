/* Internal: per-row work of the nccl_device kernels (a block, or a warp
 * when S = 32): a token's rows and metadata into its destinations' slots,
 * the expand of a received row, and the combine's two folds. Included by
 * nd_kernels.cu and nd_pipe.cu. */
#ifndef DISCO_CUDA_ND_ROWS_CUH_
#define DISCO_CUDA_ND_ROWS_CUH_

#include "cuda/meta.cuh"
#include "cuda/nd_sync.cuh"
#include "cuda/recv_plan.cuh"
#include "cuda/rowmath.cuh"

/* ---- dispatch ------------------------------------------------------------------ */

/* Count messages travel as self-validating words (as NCCL's LL protocol):
 * each 8-byte word carries the call's sequence (low 32 bits) in its high
 * half and a 32-bit field in its low half, stored with one relaxed system-
 * scope store, so a receiver knows a word is this call's by reading it, and
 * the sender needs neither a fence nor a flag after them (the count path
 * was the small dispatch's critical path: stores, a system fence that
 * waited for them, a flag, its poll). Word f < ml of source q: field f, as
 * a 32-bit integer (every field but DISCO_MSG_VALUE fits: counts and
 * tokens are below max_tokens, slots below K); word ml: the high half of
 * DISCO_MSG_VALUE (a caller's bad expert id, any int64); word ml + 1: the
 * rows this call really sends the receiver (0 for a counts-only call or a
 * failed rank), which a hybrid comm's host reads to size its NCCL
 * transfers (nd_hybrid.c). */
#define ND_CNT_WORDS(ml) ((ml) + 2)

/* Block 0: the count messages (pl.msg's send half, or the failed status)
 * into every rank's slot r, self included. rows_on: rows go out with them. */
static __device__ void nd_send_counts(const disco_kparams_t &p,
                                      const disco_nd_params_t &nd,
                                      const disco_dev_plan_t &pl, int status_in,
                                      int rows_on, u64 s) {
  const int W = p.world, r = p.rank, ml = p.msg_len, m1 = ND_CNT_WORDS(ml);
  const u64 tag = (s & 0xffffffffull) << 32;
  const int sends = rows_on && status_in == 0 && pl.msg[DISCO_MSG_CODE] == 0;
  for (int i = threadIdx.x; i < W * m1; i += blockDim.x) {
    const int d = i / m1, f = i % m1;
    const int g = f == ml ? (int)DISCO_MSG_VALUE : f > ml ? (int)DISCO_MSG_TOKENS : f;
    long long v;
    if (status_in == 0)
      v = pl.msg[(long long)d * ml + g];
    else
      v = g == DISCO_MSG_CODE ? status_in : g < DISCO_MSG_TOKENS ? -1 : 0;
    if (f > ml && !sends) v = 0;
    const unsigned x = f == ml ? (unsigned)((unsigned long long)v >> 32) : (unsigned)v;
    nd_st_relaxed((u64 *)(nd.peer[d] + nd.off_cnt) + (long long)r * m1 + f, tag | x);
  }
}

/* Waits (one thread) until count word `word` from peer q carries sequence
 * s; bounded as nd_wait<true> (the peer's dead word read with the first
 * poll; a timeout names q and the counts). */
static __device__ int nd_wait_word(const disco_kparams_t &p, const disco_nd_params_t &nd,
                                   const u64 *word, u64 s, int q, u64 call, u64 *val) {
  const u64 deadline = nd_now() + nd.timeout_ns;
  const unsigned want = (unsigned)s;
  for (unsigned it = 0;; it++) {
    const u64 dead = it == 0 && q != p.rank
                         ? nd_ld_relaxed(nd_flag(nd, nd.local, p.world, DISCO_ND_DEAD, q))
                         : 0ull;
    const u64 v = nd_ld_relaxed(word);
    if (dead != 0ull) {
      nd_give_up(p, nd, q, DISCO_ND_PHASE_DEAD, call, 0);
      return 0;
    }
    if ((unsigned)(v >> 32) == want) {
      *val = v;
      return 1;
    }
    if ((it & 255u) == 255u) {
      if (nd_dead(nd) || (q != p.rank && nd_peer_dead(p, nd, q, call))) return 0;
      if (nd_now() > deadline) {
        nd_give_up(p, nd, q, DISCO_ND_PHASE_DCNT, call, s);
        return 0;
      }
    }
  }
}

/* Block 0: every rank's count message of call s, decoded into pl.msg's
 * receive half (block-wide; 0 after a timeout or a dead peer). One wait
 * per word (a second wait in the loop spilled ~180 bytes more per thread
 * in the small kernel); DISCO_MSG_VALUE's two words, both seen by then,
 * are joined after the barrier. */
static __device__ int nd_wait_counts(const disco_kparams_t &p,
                                     const disco_nd_params_t &nd,
                                     const disco_dev_plan_t &pl, u64 s, u64 call) {
  const int W = p.world, ml = p.msg_len, m1 = ND_CNT_WORDS(ml);
  const u64 *in = (const u64 *)(nd.local + nd.off_cnt);
  int64_t *recv = pl.msg + (long long)W * ml;
  __shared__ int s_ok;
  __syncthreads(); /* the previous call's s_ok is read */
  if (threadIdx.x == 0) s_ok = 1;
  __syncthreads();
  for (int i = threadIdx.x; i < W * m1; i += blockDim.x) {
    const int q = i / m1, f = i % m1;
    u64 v;
    if (!nd_wait_word(p, nd, in + i, s, q, call, &v)) {
      atomicExch(&s_ok, 0);
      break;
    }
    if (f < ml && f != DISCO_MSG_VALUE)
      recv[(long long)q * ml + f] = (long long)(int)(unsigned)v;
  }
  __syncthreads();
  for (int q = threadIdx.x; s_ok && q < W; q += blockDim.x) {
    const u64 lo = nd_ld_relaxed(in + (long long)q * m1 + DISCO_MSG_VALUE);
    const u64 hi = nd_ld_relaxed(in + (long long)q * m1 + ml);
    recv[(long long)q * ml + DISCO_MSG_VALUE] =
        (long long)((hi << 32) | (lo & 0xffffffffull));
  }
  __syncthreads();
  return s_ok;
}

/* Block 0, once every rank's count message is in (nd_wait_counts): the
 * receive plan. */
static __device__ void nd_make_plan(const disco_kparams_t &p, const disco_nd_params_t &nd,
                                    const disco_dev_plan_t &pl, int layout, int align,
                                    int32_t *n_to, int32_t *n_from, int32_t *tpe,
                                    int64_t *num_rows_out, long long cap, u64 call) {
  (void)nd;
  disco_recv_plan_body(p, pl, layout, align, n_to, n_from, tpe, num_rows_out, cap,
                       (long long)call, NULL);
}

/* Token t's metadata rows, one per destination (warp 0 of a sender block):
 * [src_token, n_local, then (j | l << 8, pos, weight) per slot j whose
 * expert is d's local expert l, in slot order], as the nccl backend's pack
 * (disco_meta_row). The routing is read once, a lane per destination and
 * per slot, and every row is written from registers: a destination at a
 * time, each a chain of dependent loads, took ~2 us per destination and
 * held the block (run 57 trace, 32 tokens: sends 8.4 us at K 8, 4.1 at K 1). */
static __device__ void nd_send_meta(const disco_kparams_t &p, const disco_nd_params_t &nd,
                                    const disco_dev_plan_t &pl, const int *bb,
                                    const float *w, int t, int sel) {
  const int r = p.rank, E = p.num_experts, K = p.top_k, L = p.num_local, kd = p.kd;
  const int lane = threadIdx.x & 31, mi = p.meta_ints;
  const unsigned below = (1u << lane) - 1u;
  const long long M = p.max_tokens;
  int e0 = -1, pos0 = 0; /* slots 0..31 (K > 32: the rest per destination) */
  float wt0 = 1.0f;
  if (lane < K) {
    e0 = pl.slot[(long long)t * K + lane];
    const int sp = pl.slot_pos[(long long)t * K + lane];
    if (w) wt0 = w[(long long)t * K + lane];
    pos0 = e0 >= 0 ? bb[e0] + sp : 0;
  }
  for (int k0 = 0; k0 < kd; k0 += 32) { /* destinations, 32 at a time */
    const int dd = k0 + lane < kd ? pl.tok_dest[(long long)t * kd + k0 + lane] : -1;
    const int row = dd >= 0 ? bb[E + dd] + pl.tok_dpos[(long long)t * kd + k0 + lane] : 0;
    char *pb = dd >= 0 ? nd.peer[dd] : NULL;
    for (int kk = 0; kk < 32 && k0 + kk < kd; kk++) {
      const int d = __shfl_sync(0xffffffffu, dd, kk);
      if (d < 0) return;
      const int rk = __shfl_sync(0xffffffffu, row, kk);
      char *pk = (char *)__shfl_sync(0xffffffffu, (unsigned long long)pb, kk);
      if (nd_skip(sel, d == r)) continue;
      int *meta = (int *)(pk + nd.off_meta) + ((long long)r * M + rk) * mi;
      int n = 0;
      for (int jb = 0; jb < K; jb += 32) {
        const int j = jb + lane;
        int e = e0, pos = pos0;
        float wt = wt0;
        if (jb > 0) {
          e = j < K ? pl.slot[(long long)t * K + j] : -1;
          pos = e >= 0 ? bb[e] + pl.slot_pos[(long long)t * K + j] : 0;
          wt = w && j < K ? w[(long long)t * K + j] : 1.0f;
        }
        const int mine = e >= 0 && e / L == d;
        const unsigned bal = __ballot_sync(0xffffffffu, mine);
        if (mine) {
          const int i = n + __popc(bal & below);
          meta[2 + 3 * i] = j | ((e - d * L) << 8);
          meta[3 + 3 * i] = pos;
          meta[4 + 3 * i] = __float_as_int(wt);
        }
        n += __popc(bal);
      }
      if (lane == 0) {
        meta[0] = t;
        meta[1] = n;
        pl.tok_row[(long long)t * kd + k0 + kk] = rk;
      }
    }
  }
}

/* Rows and metadata of token t to every destination's slot (block-wide). */
static __device__ void nd_send_token(const disco_kparams_t &p,
                                     const disco_nd_params_t &nd,
                                     const disco_dev_plan_t &pl, const uint4 *x,
                                     const float *w, int t, int rank_major, int lo,
                                     int hi, int first, int sel) {
  const int r = p.rank, E = p.num_experts;
  const int nc = p.num_cols, C = 32 * p.layout_warps, nv = p.row_vecs;
  const int *bb = pl.blk_base + (long long)(t / C) * nc;
  const int *dest = pl.tok_dest + (long long)t * p.kd;
  const int *dpos = pl.tok_dpos + (long long)t * p.kd;
  if (first && threadIdx.x < 32) nd_send_meta(p, nd, pl, bb, w, t, sel);
  /* Up to 8 destinations per pass (min(K, W) > 8 re-reads the row). */
  for (int k0 = 0; k0 < p.kd; k0 += 8) {
    uint4 *dst[8];
    int n = 0;
    for (int k = k0; k < p.kd && k < k0 + 8; k++) {
      const int d = dest[k];
      if (d < 0) break;
      if ((d == r && !rank_major) || nd_skip(sel, d == r)) continue; /* expand reads x */
      dst[n++] = (uint4 *)nd.prow[d] + ((long long)bb[E + d] + dpos[k]) * nv;
    }
    if (n > 0) nd_copy<false>(dst, n, x + (long long)t * nv, lo, hi);
  }
}

/* Received token i (EXPERT_MAJOR) into its expert rows, with metadata and
 * combine's per-row lists, by S threads (tid: a block, or a warp's lane). */
template <int S, bool PRE>
__device__ void nd_expand_expert(const disco_kparams_t &p, const disco_nd_params_t &nd,
                                 const disco_dev_plan_t &pl, const uint4 *x, long long i,
                                 uint4 *recv_x, int *src_rank, int *src_token,
                                 int *expert, float *weight, int lo, int hi, int first,
                                 int tid) {
  const int lane = tid & 31, L = p.num_local, nv = p.row_vecs;
  const int s = disco_source(pl, p.world, i);
  const long long slot = (long long)s * p.max_tokens + (i - pl.recv_off[s]);
  const int *meta = (const int *)(nd.local + nd.off_meta) + slot * p.meta_ints;
  /* PRE: a peer's row's loads first, before the chain metadata -> srcbase
   * that finds where it goes (run 51, with the pipelined senders' prefetch,
   * nd_pipe.cu: 4096 tokens K 8 -4.5 us, 1024 K 8 -2 us; the small kernel
   * gained nothing measurable and spilled more, so it keeps PRE false). */
  const uint4 *srow = (const uint4 *)(nd.local + nd.off_rows) + slot * nv;
  const int pre = PRE && !(nd.tune & DISCO_ND_TUNE_NO_PREFETCH) && s != p.rank &&
                  hi - lo <= ND_UNROLL * S;
  uint4 a[ND_UNROLL];
  if (pre) nd_pre_load<true, S>(a, srow, lo, hi, tid);
  const int t = __ldcg(meta), n = __ldcg(meta + 1);
  const int64_t *sb = pl.srcbase + (long long)s * L;
  if (first && tid < 32)
    disco_expand_meta<true>(p, pl, meta, s, i, sb, lane, src_rank, src_token, expert,
                            weight);
  for (int q0 = 0; q0 < n; q0 += 8) { /* up to 8 expert rows per pass */
    uint4 *dst[8];
    const int nn = n - q0 < 8 ? n - q0 : 8;
    for (int q = 0; q < nn; q++)
      dst[q] = recv_x + (sb[__ldcg(meta + 2 + 3 * (q0 + q)) >> 8] +
                         __ldcg(meta + 3 + 3 * (q0 + q))) *
                            nv;
    if (s == p.rank)
      nd_copy_s<false, S>(dst, nn, x + (long long)t * nv, lo, hi, tid);
    else if (pre)
      nd_pre_store<S>(dst, nn, a, lo, hi, tid);
    else
      nd_copy_s<true, S>(dst, nn, srow, lo, hi, tid);
  }
}

/* Received token i (RANK_MAJOR): its row out of the slot, src and K slots,
 * by S threads. */
template <int S>
__device__ void nd_expand_rank(const disco_kparams_t &p, const disco_nd_params_t &nd,
                               const disco_dev_plan_t &pl, long long i, uint4 *recv_x,
                               int *src_rank, int *src_token, int *expert, float *weight,
                               int lo, int hi, int first, int tid) {
  const int nv = p.row_vecs;
  const int s = disco_source(pl, p.world, i);
  const long long slot = (long long)s * p.max_tokens + (i - pl.recv_off[s]);
  const int *meta = (const int *)(nd.local + nd.off_meta) + slot * p.meta_ints;
  const int n = __ldcg(meta + 1);
  const uint4 *src = (const uint4 *)(nd.local + nd.off_rows) + slot * nv;
  uint4 *dst = recv_x + i * nv;
  nd_copy_s<true, S>(&dst, 1, src, lo, hi, tid);
  if (!first) return;
  if (tid == 0) {
    if (src_rank) src_rank[i] = s;
    if (src_token) src_token[i] = __ldcg(meta);
  }
  disco_rank_slots<true>(p, meta, i, tid, S, expert, weight);
}

/* EXPERT_MAJOR with alignment: the padding rows after each expert's rows
 * (zeros, -1 / 0.0 metadata); local experts b, b + nb, ... (block-wide). */
static __device__ void nd_pad_rows(const disco_kparams_t &p, const disco_dev_plan_t &pl,
                                   int b, int nb, uint4 *recv_x, int *src_rank,
                                   int *src_token, int *expert, float *weight) {
  const uint4 z = make_uint4(0u, 0u, 0u, 0u);
  for (int l = b; l < p.num_local; l += nb) {
    const long long first = pl.exp_off[l] + pl.exp_total[l], end = pl.exp_off[l + 1];
    for (long long row = first; row < end; row++) {
      for (int v = threadIdx.x; v < p.row_vecs; v += blockDim.x)
        recv_x[row * p.row_vecs + v] = z;
      if (threadIdx.x == 0) {
        if (src_rank) src_rank[row] = -1;
        if (src_token) src_token[row] = -1;
        if (expert) expert[row] = -1;
        if (weight) weight[row] = 0.0f;
      }
    }
  }
}

/* Source q's rows arrive in chunks (pipelined dispatch, nd.dch_rows): its
 * first received row, and the call's seq and id for the waits. */
struct nd_chunks {
  int q;
  long long base;
  u64 s, call;
};

/* Worker leader (one thread): waits until received row i's chunk of source
 * cw.q is in (its chunk flag, or the source's DFLAG for all its rows). */
__device__ __forceinline__ int nd_chunk_in(const disco_kparams_t &p,
                                           const disco_nd_params_t &nd,
                                           const nd_chunks &cw, long long g) {
  const long long nch = DISCO_ND_CHUNKS(p.max_tokens);
  return nd_wait_either(p, nd, (const u64 *)(nd.local + nd.off_dch) + cw.q * nch + g,
                        nd_flag(nd, nd.local, p.world, DISCO_ND_DFLAG, cw.q), 0, cw.s,
                        cw.q, DISCO_ND_PHASE_DFLAG, cw.call);
}

/* Expands received rows [first, first + n) (one source's, or all), workers
 * sharing them through *ctr: a warp per row when `warp`, else the block per
 * piece of a row (about `items` pieces per block, so that n rows keep nb
 * blocks busy). cw (or NULL: all rows are in): each worker waits for a
 * row's chunk before it reads the row (items come in increasing order, so it
 * remembers the last chunk it saw in); a wait that times out stops it (the
 * comm is then dead: the caller checks). */
template <bool PRE>
__device__ void nd_expand_range(const disco_kparams_t &p, const disco_nd_params_t &nd,
                                const disco_dev_plan_t &pl, const uint4 *x,
                                long long first, long long n, int nb, int warp,
                                unsigned long long *ctr, int items, int rank_major,
                                uint4 *recv_x, int *src_rank, int *src_token, int *expert,
                                float *weight, const nd_chunks *cw) {
  const int nv = p.row_vecs;
  long long rdy = -1; /* chunks up to this one are in */
  if (warp) {
    const int lane = threadIdx.x & 31, P = nd.warp_pieces;
    for (long long it = nd_share<32>(nd_ask<32>(ctr)), a; it < n * P;
         it = nd_share<32>(a)) {
      int lo, hi;
      a = nd_ask<32>(ctr);
      if (cw != NULL && (first + it / P - cw->base) / nd.dch_rows > rdy) {
        const long long g = (first + it / P - cw->base) / nd.dch_rows;
        int ok = lane == 0 ? nd_chunk_in(p, nd, *cw, g) : 1;
        ok = __shfl_sync(0xffffffffu, ok, 0);
        __syncwarp(); /* what lane 0 acquired is read by every lane */
        if (!ok) break;
        rdy = g;
      }
      nd_piece(nv, P, (int)(it % P), &lo, &hi);
      if (rank_major)
        nd_expand_rank<32>(p, nd, pl, first + it / P, recv_x, src_rank, src_token, expert,
                           weight, lo, hi, it % P == 0, lane);
      else
        nd_expand_expert<32, PRE>(p, nd, pl, x, first + it / P, recv_x, src_rank,
                                  src_token, expert, weight, lo, hi, it % P == 0, lane);
    }
    return;
  }
  const int P = nd_parts(nb, n, nv, items), S = DISCO_ND_THREADS;
  for (long long it = nd_share<S>(nd_ask<S>(ctr)), a; it < n * P; it = nd_share<S>(a)) {
    int lo, hi;
    a = nd_ask<S>(ctr);
    if (cw != NULL && (first + it / P - cw->base) / nd.dch_rows > rdy) {
      const long long g = (first + it / P - cw->base) / nd.dch_rows;
      if (!nd_block_all(threadIdx.x == 0 ? nd_chunk_in(p, nd, *cw, g) : 1)) break;
      rdy = g;
    }
    nd_piece(nv, P, (int)(it % P), &lo, &hi);
    if (rank_major)
      nd_expand_rank<S>(p, nd, pl, first + it / P, recv_x, src_rank, src_token, expert,
                        weight, lo, hi, it % P == 0, threadIdx.x);
    else
      nd_expand_expert<S, PRE>(p, nd, pl, x, first + it / P, recv_x, src_rank, src_token,
                               expert, weight, lo, hi, it % P == 0, threadIdx.x);
  }
}

/* Expands received rows [first, first + n), EXPERT_MAJOR, K <= 32, block
 * workers (the small dispatch's rows, all at once; the pipelined one's, a
 * source at a time): tickets of G consecutive rows (G = ceil(n / nb), at
 * most ND_XG).
 * Warp g reads row g's metadata once (a lane per local slot), finds the
 * destinations from the sources' offsets, staged per block in shared
 * memory, and writes the row's metadata outputs from registers; then the
 * whole block copies the G rows at once, U loads in flight per thread.
 * A row per ticket, its metadata read back field by field, left each block
 * a chain of ~10 dependent loads per row with a few KB in flight (run 61
 * trace, 128 tokens K 8: 15 us of expand after the last flag). */
#define ND_XG 4
#define ND_XU 8 /* loads in flight per thread in the small kernel */
/* ... in the pipelined kernel, whose other paths hold more registers: 8
 * spilled ~1 KB more per thread there, 4 ~110 bytes */
#define ND_XU_PIPE 4
#define ND_XSB 512 /* int64 of srcbase and recv_off staged per block */
template <int U>   /* loads in flight per thread */
static __device__ void nd_expand_batch(
    const disco_kparams_t &p, const disco_nd_params_t &nd, const disco_dev_plan_t &pl,
    const uint4 *x, long long first, long long R, int nb, unsigned long long *ctr,
    uint4 *recv_x, int *src_rank, int *src_token, int *expert, float *weight) {
  __shared__ const uint4 *xs[ND_XG];
  __shared__ uint4 *xd[ND_XG][32]; /* K <= 32 */
  __shared__ int xn[ND_XG];
  __shared__ int64_t sbs[ND_XSB];
  const int W = p.world, K = p.top_k, L = p.num_local, r = p.rank, nv = p.row_vecs;
  const int S = DISCO_ND_THREADS, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const long long M = p.max_tokens;
  /* generic pointers: shared when the world fits, else global */
  const int staged = W * L + W + 1 <= ND_XSB;
  const int64_t *sball = staged ? (const int64_t *)sbs : pl.srcbase;
  const int64_t *ro = staged ? (const int64_t *)sbs + W * L : pl.recv_off;
  for (int i = threadIdx.x; staged && i < W * L + W + 1; i += S)
    sbs[i] = i < W * L ? pl.srcbase[i] : pl.recv_off[i - W * L];
  __syncthreads();
  const long long g1 = (R + nb - 1) / nb;
  const int G = g1 < 1 ? 1 : g1 > ND_XG ? ND_XG : (int)g1;
  const long long ng = (R + G - 1) / G;
  for (long long it = nd_share<S>(nd_ask<S>(ctr)), a; it < ng; it = nd_share<S>(a)) {
    a = nd_ask<S>(ctr);
    const long long i0 = it * G;
    const int m = R - i0 < G ? (int)(R - i0) : G;
    if (warp < m) {
      const long long i = first + i0 + warp;
      const int s = disco_source_in(ro, W, i);
      const long long slot = (long long)s * M + (i - ro[s]);
      const int *meta = (const int *)(nd.local + nd.off_meta) + slot * p.meta_ints;
      const int t = __ldcg(meta), n = __ldcg(meta + 1);
      int jl = 0, pos = 0;
      float wt = 0.0f;
      if (lane < K) { /* slot fields past n are stale but inside the row */
        jl = __ldcg(meta + 2 + 3 * lane);
        pos = __ldcg(meta + 3 + 3 * lane);
        wt = __int_as_float(__ldcg(meta + 4 + 3 * lane));
      }
      const int l = jl >> 8;
      const long long row = lane < n ? sball[(long long)s * L + l] + pos : 0;
      if (lane < n) xd[warp][lane] = recv_x + row * nv;
      if (lane == 0) {
        xn[warp] = n;
        xs[warp] = s == r ? x + (long long)t * nv
                          : (const uint4 *)(nd.local + nd.off_rows) + slot * nv;
      }
      /* the metadata outputs (disco_expand_meta), from registers */
      int rk = 0; /* rank by local expert: combine folds experts ascending */
      for (int o = 0; o < n; o++) rk += __shfl_sync(0xffffffffu, l, o) < l;
      if (lane < n) {
        pl.comb_rows[i * K + rk] = (int)row;
        pl.comb_w[i * K + rk] = wt;
        if (src_rank) src_rank[row] = s;
        if (src_token) src_token[row] = t;
        if (expert) expert[row] = r * L + l;
        if (weight) weight[row] = wt;
      }
      if (lane == 0 && n < K) pl.comb_rows[i * K + n] = -1;
    }
    __syncthreads(); /* xs, xd, xn are set */
    const int tot = m * nv;
    for (int f0 = threadIdx.x; f0 < tot; f0 += U * S) {
      uint4 v[U];
#pragma unroll
      for (int u = 0; u < U; u++) {
        const int f = f0 + u * S, g = f / nv;
        if (f < tot) v[u] = __ldcg(xs[g] + (f - g * nv));
      }
#pragma unroll
      for (int u = 0; u < U; u++) {
        const int f = f0 + u * S, g = f / nv;
        if (f < tot)
          for (int q = 0; q < xn[g]; q++) xd[g][q][f - g * nv] = v[u];
      }
    }
  } /* (nd_share's barrier keeps the next ticket's writes after these reads) */
}

/* ---- combine ------------------------------------------------------------------- */
/* Received row of the combine's item j, or -1 (a hole). By default items go
 * round the token owners (r + 1, r + 2, ...): every rank stores to all its
 * peers at once instead of all ranks to rank 0 first, then to rank 1, ...
 * (a convoy: one receiver's links busy, the others idle). */
__device__ __forceinline__ long long nd_citem_row(const disco_dev_plan_t &pl, int W,
                                                  int r, long long j, int rr) {
  if (!rr) return j;
  const int q = (r + 1 + (int)(j % W)) % W;
  const long long k = j / W;
  return k < pl.recv_off[q + 1] - pl.recv_off[q] ? pl.recv_off[q] + k : -1;
}

/* Folds of one row (K 1), dtype on the wire, block workers. The general
 * folds batch over rows, so with one row a thread kept one load in flight
 * and waited a load latency per vector: the token side of 4096 tokens K 1
 * ended ~50 us after the last partial (run 25). These keep DISCO_BATCH
 * vectors in flight; the arithmetic is the general folds' with one term
 * (docs/semantics.md). Run 27: 4096 tokens K 1 combine 217.1 -> 196.0 us,
 * 1024 tokens K 1 73.6 -> 70.5 us; at 80 registers a thread they cost 4
 * bytes of spills. K 1 only: with them on the one-row tokens of K 2
 * (H 4096, E 8) that combine lost 6 us, in runs 26 and 27. */

/* dst[v] = w * src[v] (or src[v]) in the dtype: the expert side's fold of
 * one y row, and (unweighted, CG: partials written by other GPUs, read
 * through L2) the token side's of one partial. */
template <bool CG>
__device__ __forceinline__ void nd_fold_one(const uint4 *src, float wk, int weighted,
                                            int dtype, uint4 *dst, int lo, int hi) {
  constexpr int VB = DISCO_BATCH, S = DISCO_ND_THREADS;
  for (int v0 = lo + (int)threadIdx.x; v0 < hi; v0 += VB * S) {
    uint4 a[VB];
#pragma unroll
    for (int u = 0; u < VB; u++)
      if (v0 + u * S < hi) a[u] = CG ? __ldcg(src + v0 + u * S) : __ldg(src + v0 + u * S);
#pragma unroll
    for (int u = 0; u < VB; u++) {
      if (v0 + u * S < hi) {
        float f[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f}, acc[8];
        disco_unpack(a[u], dtype, f);
#pragma unroll
        for (int e = 0; e < 8; e++) acc[e] = weighted ? __fmul_rn(wk, f[e]) : f[e];
        dst[v0 + u * S] = disco_pack(acc, dtype);
      }
    }
  }
}

/* Expert side of received token i: fold its rows (EXPERT_MAJOR) or take y's
 * row (RANK_MAJOR), store at the token owner's slot (S threads). 0: skipped
 * (the test hook's other pass). */
template <int S>
__device__ int nd_csend_token(const disco_kparams_t &p, const disco_nd_params_t &nd,
                              const disco_dev_plan_t &pl, const uint4 *y, long long i,
                              int weighted, int wire32, int rank_major, int lo, int hi,
                              int sel, int tid) {
  const int W = p.world, K = p.top_k, nv = p.row_vecs;
  const int nq = p.dtype == DISCO_DTYPE_FP32 ? 1 : 2;
  const int q = disco_source(pl, W, i);
  if (nd_skip(sel, q == p.rank)) return 0;
  uint4 *dst = (uint4 *)nd.ppart[q] + (i - pl.recv_off[q]) * nd.part_vecs;
  if (rank_major && !wire32) { /* the caller reduced: the row goes back as it is */
    nd_copy_s<false, S>(&dst, 1, y + i * nv, lo, hi, tid);
    return 1;
  }
  if (rank_major) { /* fp32 partials everywhere: the row widened (exact) */
    for (int v = lo + tid; v < hi; v += S) {
      float f[8];
      disco_unpack(__ldg(y + i * nv + v), p.dtype, f);
      disco_store_part(dst, v, 1, nq, p.dtype, f);
    }
    return 1;
  }
  const int *rws = pl.comb_rows + i * K;
  const int n = disco_count_valid(rws, K);
  if (S == DISCO_ND_THREADS && K == 1 && n == 1 && !wire32 &&
      !(nd.tune & DISCO_ND_TUNE_NO_VBATCH)) {
    nd_fold_one<false>(y + (long long)rws[0] * nv, pl.comb_w[i * K], weighted, p.dtype,
                       dst, lo, hi);
    return 1;
  }
  for (int v = lo + tid; v < hi; v += S) {
    float acc[8];
    disco_fold_expert(y, rws, pl.comb_w + i * K, n, nv, v, weighted, p.dtype, acc);
    disco_store_part(dst, v, wire32, nq, p.dtype, acc);
  }
  return 1;
}

/* Token side of token t: fold over destinations ascending (block-wide). */
template <int S>
__device__ void nd_ctoken_token(const disco_kparams_t &p, const disco_nd_params_t &nd,
                                const disco_dev_plan_t &pl, uint4 *out, int wire32, int t,
                                int lo, int hi, int tid) {
  const int kd = p.kd, nv = p.row_vecs, nq = p.dtype == DISCO_DTYPE_FP32 ? 1 : 2;
  const long long M = p.max_tokens;
  const uint4 *part = (const uint4 *)(nd.local + nd.off_part);
  const int *dest = pl.tok_dest + (long long)t * kd;
  const int *trow = pl.tok_row + (long long)t * kd;
  const int n = disco_count_valid(dest, kd);
  if (S == DISCO_ND_THREADS && p.top_k == 1 && n == 1 && !wire32 &&
      !(nd.tune & DISCO_ND_TUNE_NO_VBATCH)) {
    nd_fold_one<true>(part + ((long long)dest[0] * M + trow[0]) * nd.part_vecs, 1.0f, 0,
                      p.dtype, out + (long long)t * nv, lo, hi);
    return;
  }
  for (int v = lo + tid; v < hi; v += S) {
    float acc[8];
    disco_fold_token<true>(dest, trow, n, p.rank, part, (long long)p.rank * M, part, M,
                           nd.part_vecs, v, wire32, nq, p.dtype, acc);
    out[(long long)t * nv + v] = disco_pack(acc, p.dtype);
  }
}

#endif /* DISCO_CUDA_ND_ROWS_CUH_ */
