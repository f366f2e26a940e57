/* Internal: helpers of the nccl_device kernels (nd_kernels.cu): flags and
 * bounded waits across GPUs, grid-internal completion, work pieces and the
 * batched 16-byte copy. Memory-order rules: docs/design-nccl-device.md §5. */
#ifndef DISCO_CUDA_ND_SYNC_CUH_
#define DISCO_CUDA_ND_SYNC_CUH_

#include "cuda/latch.cuh"
#include "cuda/nd_kernels.h"

typedef unsigned long long u64;

#define DISCO_ND_THREADS 256 /* threads of every nccl_device kernel */
#define DISCO_BATCH 4

__device__ __forceinline__ u64 nd_now(void) {
  u64 t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ u64 nd_ld_acquire(const u64 *p) {
  u64 v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ u64 nd_ld_relaxed(const u64 *p) {
  u64 v;
  asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void nd_st_release(u64 *p, u64 v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

/* A strong relaxed store: after nd_fence_sys, the fence and this store make
 * a release pattern (PTX memory model), so several flags after one fence
 * need no fence each (st.release's own fence waited for the previous flag's
 * remote store every time). */
__device__ __forceinline__ void nd_st_relaxed(u64 *p, u64 v) {
  asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

/* System-scope acquire-release fence: all the ordering the flags need.
 * __threadfence_system() is fence.sc.sys, a sequentially consistent fence
 * that nothing here relies on. */
__device__ __forceinline__ void nd_fence_sys(void) {
  asm volatile("fence.acq_rel.sys;" ::: "memory");
}

__device__ __forceinline__ int nd_dead(const disco_nd_params_t &nd) {
  return *(volatile u64 *)nd.fatal != 0ull;
}

/* Flag `kind` of rank q in window `base`. */
__device__ __forceinline__ u64 *nd_flag(const disco_nd_params_t &nd, char *base, int W,
                                        int kind, int q) {
  return (u64 *)(base + nd.off_flags) + (long long)kind * W + q;
}

/* Flag `kind` of this rank r at every peer (not itself): v. One thread,
 * right after nd_fence_sys (which releases what the flags publish), or for
 * a flag whose value is all it says. */
__device__ __forceinline__ void nd_flag_peers(const disco_nd_params_t &nd, int W, int r,
                                              int kind, u64 v) {
#pragma unroll 1
  for (int d = 0; d < W; d++)
    if (d != r) nd_st_relaxed(nd_flag(nd, nd.peer[d], W, kind, r), v);
}

/* Latches the fatal TIMEOUT (first one wins) and tells every peer that this
 * rank gave up, so that a peer arriving late fails fast instead of waiting
 * for flags that will never come. */
static __device__ void nd_give_up(const disco_kparams_t &p, const disco_nd_params_t &nd,
                                  int peer, int phase, u64 call, u64 want) {
  if (atomicCAS(nd.fatal, 0ull, 1ull) != 0ull) return;
  disco_latch(nd.hfatal, DISCO_ERR_TIMEOUT, peer, (long long)call, phase,
              (long long)(nd.timeout_ns / 1000000ull), (long long)want, p.rank);
  for (int q = 0; q < p.world; q++)
    if (q != p.rank)
      nd_st_release(nd_flag(nd, nd.peer[q], p.world, DISCO_ND_DEAD, p.rank), 1ull);
}

/* A peer that gave up: latch it (as this rank's fatal error) and return 1. */
static __device__ int nd_peer_dead(const disco_kparams_t &p, const disco_nd_params_t &nd,
                                   int q, u64 call) {
  if (nd_ld_acquire(nd_flag(nd, nd.local, p.world, DISCO_ND_DEAD, q)) == 0ull) return 0;
  nd_give_up(p, nd, q, DISCO_ND_PHASE_DEAD, call, 0);
  return 1;
}

/* Waits until flag's sequence (bits 8..) reaches want. Returns 1 with the
 * flag's value in *val, or 0 after latching TIMEOUT (or seeing the comm
 * dead). DeadFirst: the first poll also reads the peer's dead word, a
 * relaxed load issued beside the flag's acquire load (no round trip of its
 * own), so that a peer that gave up fails the wait even when its flag is
 * here (a late rank must learn that the comm is dead: tests/gpu/test_nd.c
 * "late dispatch"). The dispatch kernels wait this way (run 63: 32 tokens
 * 1.3-1.8 us faster than a separate check first); the combine keeps the
 * check in nd_wait_all (there the fused one cost 0.8 us at 128 K 8 and 4 at
 * 512 K 8). One thread. */
template <bool DeadFirst>
static __device__ int nd_wait(const disco_kparams_t &p, const disco_nd_params_t &nd,
                              const u64 *flag, u64 want, int peer, int phase, u64 call,
                              u64 *val) {
  const u64 deadline = nd_now() + nd.timeout_ns;
  for (unsigned it = 0;; it++) {
    const u64 dead =
        DeadFirst && it == 0
            ? nd_ld_relaxed(nd_flag(nd, nd.local, p.world, DISCO_ND_DEAD, peer))
            : 0ull;
    const u64 v = nd_ld_acquire(flag);
    if (DeadFirst && dead != 0ull) {
      nd_give_up(p, nd, peer, DISCO_ND_PHASE_DEAD, call, 0);
      return 0;
    }
    if ((long long)((v >> 8) - want) >= 0) {
      *val = v;
      return 1;
    }
    if ((it & 255u) == 255u) {
      if (nd_dead(nd) || nd_peer_dead(p, nd, peer, call)) return 0;
      if (nd_now() > deadline) {
        nd_give_up(p, nd, peer, phase, call, want);
        return 0;
      }
    }
  }
}

/* Waits until flag `a` or flag `b` reaches seq want: a chunk or part flag,
 * or the one flag that covers them all. b_raw: b holds the bare seq (this
 * grid's `sent` word), not seq << 8. peer: who writes them (this rank: only
 * the comm's own death ends the wait early). One thread, bounded; 0 after a
 * timeout or a dead peer. */
static __device__ int nd_wait_either(const disco_kparams_t &p,
                                     const disco_nd_params_t &nd, const u64 *a,
                                     const u64 *b, int b_raw, u64 want, int peer,
                                     int phase, u64 call) {
  const u64 deadline = nd_now() + nd.timeout_ns;
  for (unsigned it = 0;; it++) {
    if ((long long)((nd_ld_acquire(a) >> 8) - want) >= 0) return 1;
    const u64 v = nd_ld_acquire(b);
    if ((long long)((b_raw ? v : v >> 8) - want) >= 0) return 1;
    if ((it & 255u) == 255u) {
      if (nd_dead(nd) || (peer != p.rank && nd_peer_dead(p, nd, peer, call))) return 0;
      if (nd_now() > deadline) {
        nd_give_up(p, nd, peer, phase, call, want);
        return 0;
      }
    }
  }
}

/* The whole block waits for `kind` flags of every peer, one peer per thread
 * (polled in parallel: one flag's latency, not W - 1 in a row); 1 in every
 * thread when all arrived, 0 after a timeout or a dead peer. *bad: lowest
 * peer whose flag carries a failure status (-1 none), *code its status.
 * DeadFirst: see nd_wait. */
template <bool DeadFirst>
static __device__ int nd_wait_all(const disco_kparams_t &p, const disco_nd_params_t &nd,
                                  int kind, u64 want, int phase, u64 call, int *bad,
                                  int *code) {
  __shared__ int s_ok, s_bad;
  __syncthreads(); /* the previous call's results are read */
  if (threadIdx.x == 0) {
    s_ok = 1;
    s_bad = 0x7fffffff;
  }
  __syncthreads();
  /* Fail fast: a peer that gave up (even one whose flag is here: a late rank
   * must learn that the others have given up on the comm; tests/gpu/test_nd.c
   * "late dispatch", run 62 caught a version without this check). */
  if (!DeadFirst) {
    for (int q = threadIdx.x; q < p.world; q += blockDim.x)
      if (q != p.rank && nd_peer_dead(p, nd, q, call)) atomicExch(&s_ok, 0);
    __syncthreads();
  }
  const int alive = s_ok; /* shared writes below are atomics (racecheck-clean) */
  /* a peer outside the LSA team (hybrid) acks nothing here: its NCCL
   * transfers into our window are ordered after our previous call by our
   * stream, and ours to it after its previous call by its stream */
  const int skip_remote =
      nd.remote != NULL && (kind == DISCO_ND_DACK || kind == DISCO_ND_CACK);
  for (int q = threadIdx.x; alive && q < p.world; q += blockDim.x) {
    u64 v = 0;
    if (q == p.rank || (skip_remote && nd.remote[q])) continue;
    if (!nd_wait<DeadFirst>(p, nd, nd_flag(nd, nd.local, p.world, kind, q), want, q,
                            phase, call, &v)) {
      atomicExch(&s_ok, 0);
      break;
    }
    if ((v & 255ull) != 0ull) atomicMin(&s_bad, q << 8 | (int)(v & 255ull));
  }
  __syncthreads();
  *bad = s_bad == 0x7fffffff ? -1 : s_bad >> 8;
  *code = s_bad == 0x7fffffff ? 0 : s_bad & 255;
  return s_ok;
}

/* Last of n blocks to get here (after their stores): returns 1 in thread 0
 * of that block, which may then publish with relaxed stores (its second
 * fence orders them after every block's stores). Resets the counter. */
__device__ __forceinline__ int nd_last_of(unsigned *done, unsigned n) {
  __syncthreads();
  if (threadIdx.x != 0) return 0;
  nd_fence_sys(); /* release this block's stores */
  if (atomicAdd(done, 1u) != n - 1u) return 0;
  nd_fence_sys(); /* acquire the other blocks' (and release them on) */
  *done = 0u;
  return 1;
}

/* Last block of the grid. */
__device__ __forceinline__ int nd_last_block(unsigned *done) {
  return nd_last_of(done, gridDim.x * gridDim.y);
}

/* Waits (one thread) for a device-local word written by another block of the
 * same (co-resident) grid to reach want; 0 if the comm died meanwhile (that
 * block timed out). */
static __device__ int nd_wait_block0(const disco_nd_params_t &nd, const u64 *word,
                                     u64 want) {
  for (unsigned it = 0;; it++) {
    u64 v;
    asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(word) : "memory");
    if ((long long)(v - want) >= 0) return 1;
    if ((it & 255u) == 255u && nd_dead(nd)) return 0;
  }
}

/* Pieces each row is cut into: about 4 work items per block, so that the
 * dynamic sharing leaves a short tail (small batches: several blocks per
 * row, at most a vector per thread per piece; large ones: a block per row). */
__device__ __forceinline__ int nd_parts(int nb, long long n, int nv, int per_block = 4) {
  const long long pmax = (nv + DISCO_ND_THREADS - 1) / DISCO_ND_THREADS;
  const long long pp = n > 0 ? ((long long)per_block * nb + n - 1) / n : 1;
  return (int)(pp < 1 ? 1 : pp > pmax ? pmax : pp);
}

/* P pieces per row, fewer where the n rows' items would take more than one
 * round of nb workers but the rows alone fit one: each worker then takes
 * one bigger piece instead of a second round of chains (the small combine:
 * ~1.6 items per block at 128 tokens K 1, each a chain of loads and a
 * remote store). */
__device__ __forceinline__ int nd_parts_round(int nb, long long n, int P) {
  if (n > 0 && n <= nb && n * P > nb) {
    const long long q = nb / n;
    return (int)(q < 1 ? 1 : q < P ? q : P);
  }
  return P;
}

/* Vectors [lo, hi) of piece `part` of P of an nv-vector row. */
__device__ __forceinline__ void nd_piece(int nv, int P, int part, int *lo, int *hi) {
  *lo = (int)((long long)nv * part / P);
  *hi = (int)((long long)nv * (part + 1) / P);
}

/* 16-byte copies of vectors [lo, hi) by S threads (tid 0..S-1: a block or a
 * warp), ND_UNROLL loads in flight per thread before their stores. One pass
 * (at most ND_UNROLL * S vectors) in two halves: nd_pre_load issues the
 * loads, nd_pre_store stores them to up to nd destinations once these are
 * known, so that the loads' latency can overlap the dependent loads that
 * find the destinations (metadata, layout) instead of following them. */
#define ND_UNROLL 4
template <bool CG, int S>
__device__ __forceinline__ void nd_pre_load(uint4 *a, const uint4 *src, int lo, int hi,
                                            int tid) {
#pragma unroll
  for (int u = 0; u < ND_UNROLL; u++) {
    const int v = lo + tid + u * S;
    if (v < hi) a[u] = CG ? __ldcg(src + v) : __ldg(src + v);
  }
}

template <int S>
__device__ __forceinline__ void nd_pre_store(uint4 *const *dst, int nd, const uint4 *a,
                                             int lo, int hi, int tid) {
#pragma unroll
  for (int u = 0; u < ND_UNROLL; u++) {
    const int v = lo + tid + u * S;
    if (v < hi)
      for (int k = 0; k < nd; k++) dst[k][v] = a[u];
  }
}

/* The whole range, pass by pass. */
template <bool CG, int S>
__device__ __forceinline__ void nd_copy_s(uint4 *const *dst, int nd, const uint4 *src,
                                          int lo, int hi, int tid) {
  for (int v0 = lo + tid; v0 < hi; v0 += ND_UNROLL * S) {
    uint4 a[ND_UNROLL];
    nd_pre_load<CG, S>(a, src, v0 - tid, hi, tid);
    nd_pre_store<S>(dst, nd, a, v0 - tid, hi, tid);
  }
}

/* The same by the whole block. */
template <bool CG>
__device__ __forceinline__ void nd_copy(uint4 *const *dst, int nd, const uint4 *src,
                                        int lo, int hi) {
  nd_copy_s<CG, DISCO_ND_THREADS>(dst, nd, src, lo, hi, threadIdx.x);
}

/* Dynamic work sharing. Workers of S threads (a warp, or the whole block when
 * S == DISCO_ND_THREADS) take item numbers from a counter that is 0 when the
 * phase starts (the phase's last block resets it): a fast worker takes more,
 * so no block is left far behind (a static split left the last block up to
 * 100 us after block 0). The next number is asked for before the current
 * item is worked on, so the atomic's latency overlaps the work:
 *   for (long long it = nd_share<S>(nd_ask<S>(c)), a; it < n; it = nd_share<S>(a)) {
 *     a = nd_ask<S>(c); ...item it...
 *   }
 */
template <int S>
__device__ __forceinline__ long long nd_ask(unsigned long long *ctr) {
  return (threadIdx.x & (S - 1)) == 0 ? (long long)atomicAdd(ctr, 1ull) : 0ll;
}

/* The worker leader's value in all its threads (block-uniform call for S > 32). */
template <int S>
__device__ __forceinline__ long long nd_share(long long v) {
  if (S == 32) return __shfl_sync(0xffffffffu, v, 0);
  __shared__ long long sh;
  __syncthreads(); /* everyone has read the previous value */
  if (threadIdx.x == 0) sh = v;
  __syncthreads();
  return sh;
}

/* Phase timestamp `slot` of call `seq` (kind 0 dispatch, 1 combine, 2 pipelined), one
 * thread; nothing when tracing is off. */
__device__ __forceinline__ void nd_trace(const disco_nd_params_t &nd, int kind, u64 seq,
                                         int slot) {
  if (nd.trace != NULL)
    nd.trace[((u64)kind * DISCO_ND_TRACE_CALLS + (seq % DISCO_ND_TRACE_CALLS)) *
                 DISCO_ND_TRACE_SLOTS +
             (u64)slot] = nd_now();
}

/* The latest of the blocks that pass here, in slot `slot` (one thread per
 * block; timestamps only grow, so the ring's stale entries lose). */
__device__ __forceinline__ void nd_trace_max(const disco_nd_params_t &nd, int kind,
                                             u64 seq, int slot) {
  if (nd.trace != NULL)
    atomicMax(nd.trace +
                  ((u64)kind * DISCO_ND_TRACE_CALLS + (seq % DISCO_ND_TRACE_CALLS)) *
                      DISCO_ND_TRACE_SLOTS +
                  (u64)slot,
              nd_now());
}

/* Adds n stored rows (or pieces) to a chunk's counter, after the caller's
 * system fence over them; the adder that brings it to `want` resets it
 * (nobody counts this chunk again in this call) and publishes v in the
 * chunk's flag. One thread. Chunk flags of the pipelined dispatch and
 * combine. */
__device__ __forceinline__ void nd_chunk_count(unsigned *cnt, unsigned n, unsigned want,
                                               u64 *flag, u64 v) {
  if (atomicAdd(cnt, n) + n != want) return;
  nd_fence_sys();
  *cnt = 0u;
  nd_st_relaxed(flag, v);
}

/* Device-scope release store of a word that blocks of this grid wait on. */
__device__ __forceinline__ void nd_st_release_gpu(u64 *p, u64 v) {
  asm volatile("st.release.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

/* Every block: sync, then thread 0's result in all threads. */
__device__ __forceinline__ int nd_block_all(int v) {
  __shared__ int flag;
  __syncthreads();
  if (threadIdx.x == 0) flag = v;
  __syncthreads();
  return flag;
}

/* Test hook (sel != 0): 1 = only the peers' share, 2 = only this rank's own. */
__device__ __forceinline__ int nd_skip(int sel, int self) {
  return (sel == 1 && self) || (sel == 2 && !self);
}

/* All threads of the block idle for ns nanoseconds (test hook). */
static __device__ void nd_sleep(u64 ns) {
  const u64 t0 = nd_now();
  while (nd_now() - t0 < ns) __nanosleep(1000);
}

#endif /* DISCO_CUDA_ND_SYNC_CUH_ */
