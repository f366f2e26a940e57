/* lsa-probe device side: NCCL device communicator, flag ping-pong, LSA push
 * all-to-all. Memory model as docs/design-nccl-device.md §5: weak 16-byte stores,
 * __syncthreads, one system-scope release store of the flag; the waiter polls with
 * system-scope acquire loads, bounded by a %globaltimer deadline. */
#include <nccl_device.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cuda/atomic>

#include "probe.h"

struct lp_dev {
  ncclDevComm dc;
  ncclWindow_t win;
};

typedef unsigned long long u64;
typedef cuda::atomic_ref<u64, cuda::thread_scope_system> lp_sys_u64;

extern "C" ncclResult_t lp_dev_create(ncclComm_t comm, ncclWindow_t win, int nbarriers,
                                      lp_dev_t **out, lp_info_t *info) {
  lp_dev_t *d = (lp_dev_t *)calloc(1, sizeof(*d));
  if (!d) return ncclSystemError;
  ncclDevCommRequirements_t reqs;
#ifdef NCCL_DEV_COMM_REQUIREMENTS_INITIALIZER
  reqs = NCCL_DEV_COMM_REQUIREMENTS_INITIALIZER;
#else
  memset(&reqs, 0, sizeof(reqs));
#endif
  reqs.lsaMultimem = false; /* never multimem / NVLS */
  reqs.lsaBarrierCount = nbarriers;
  ncclResult_t r = ncclDevCommCreate(comm, &reqs, &d->dc);
  if (r != ncclSuccess) {
    free(d);
    return r;
  }
  d->win = win;
  memset(info, 0, sizeof(*info));
  info->rank = d->dc.rank;
  info->nranks = d->dc.nRanks;
  info->lsa_rank = d->dc.lsaRank;
  info->lsa_size = d->dc.lsaSize;
#ifndef LP_COMPAT
  ncclTeam_t lsa = ncclTeamLsa(comm), world = ncclTeamWorld(comm);
  info->team_nranks = lsa.nRanks;
  info->team_rank = lsa.rank;
  info->team_stride = lsa.stride;
  for (int p = 0; p < LP_MAXW; ++p) {
    info->lsa_of[p] = -1;
    if (p < world.nRanks && ncclTeamRankIsMember(lsa, world, p))
      info->lsa_of[p] = ncclTeamRankToTeam(lsa, world, p);
  }
#else /* no team helpers: LSA ranks are the contiguous block around our rank */
  info->team_nranks = d->dc.lsaSize;
  info->team_rank = d->dc.lsaRank;
  info->team_stride = 1;
  for (int p = 0; p < LP_MAXW; ++p) {
    int l = p - d->dc.rank + d->dc.lsaRank;
    info->lsa_of[p] = p < d->dc.nRanks && l >= 0 && l < d->dc.lsaSize ? l : -1;
  }
#endif
  *out = d;
  return ncclSuccess;
}

extern "C" int lp_have_ncclbar(void) {
#ifndef LP_COMPAT
  return 1;
#else
  return 0;
#endif
}

extern "C" ncclResult_t lp_dev_destroy(ncclComm_t comm, lp_dev_t *d) {
  if (!d) return ncclSuccess;
  ncclResult_t r = ncclDevCommDestroy(comm, &d->dc);
  free(d);
  return r;
}

/* ---- device helpers ---------------------------------------------------------- */
__device__ __forceinline__ u64 lp_now(void) {
  u64 t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ u64 lp_err_read(const u64 *err) {
  return *(const volatile u64 *)err;
}

__device__ __forceinline__ void lp_err_set(const lp_args_t &a, unsigned peer,
                                           unsigned phase, u64 seq) {
  u64 code = (u64)LP_ERR_TIMEOUT | (u64)peer << 8 | (u64)phase << 16 |
             (u64)(unsigned)a.rank << 24 | (seq & 0xffffffffull) << 32;
  atomicCAS(a.err, 0ull, code);
}

/* Wait until the flag reaches seq (wrap-safe). Returns 0, or 1 after setting the
 * error word (deadline passed) or seeing it set by someone else. */
__device__ int lp_wait(u64 *flag, u64 seq, u64 deadline, const lp_args_t &a,
                       unsigned peer, unsigned phase) {
  lp_sys_u64 f(*flag);
  for (unsigned it = 1;; ++it) {
    if ((long long)(f.load(cuda::memory_order_acquire) - seq) >= 0) return 0;
    if ((it & 255u) == 0) {
      if (lp_err_read(a.err) != 0) return 1;
      if (lp_now() > deadline) {
        lp_err_set(a, peer, phase, seq);
        return 1;
      }
    }
  }
}

__device__ __forceinline__ uint32_t lp_mix(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

/* 16 bytes at 16-byte index i of the (src -> dst) message. Bijective in (src, dst,
 * i, word) for i < 2^24, so a misplaced or stale vector never matches. */
__device__ __forceinline__ uint4 lp_pattern(int src, int dst, size_t i) {
  uint32_t key = (uint32_t)(src * LP_MAXW + dst) << 26 ^ (uint32_t)(i * 4);
  return make_uint4(lp_mix(key), lp_mix(key + 1), lp_mix(key + 2), lp_mix(key + 3));
}

__device__ __forceinline__ int lp_same(uint4 x, uint4 y) {
  return x.x == y.x && x.y == y.y && x.z == y.z && x.w == y.w;
}

__device__ void lp_bad_add(const lp_args_t &a, u64 n, u64 first) {
  if (n == 0) return;
  atomicAdd(&a.bad[0], n);
  atomicMin(&a.bad[1], first);
}

/* ---- ping-pong --------------------------------------------------------------- */
__global__ void lp_pingpong_kernel(ncclWindow_t win, lp_args_t a, int peer, int iters,
                                   u64 *cycles, u64 *total) {
  if (lp_err_read(a.err) != 0) return;
  const u64 tmo = a.timeout_ns;
  if (a.rank == 0) {
    u64 *ping = (u64 *)ncclGetLsaPointer(win, LP_OFF_PING, a.lsa_of[peer]);
    u64 *pong = (u64 *)ncclGetLocalPointer(win, LP_OFF_PONG + 8 * (size_t)peer);
    u64 *ctr = &a.seq[LP_MAXB + peer];
    const u64 base = *ctr;
    const u64 t0 = lp_now();
    const long long c0 = clock64();
    for (int i = 0; i < iters; ++i) {
      const u64 s = base + (u64)i + 1;
      const long long ci = clock64();
      lp_sys_u64(*ping).store(s, cuda::memory_order_release);
      if (lp_wait(pong, s, lp_now() + tmo, a, (unsigned)peer, LP_PHASE_PONG)) return;
      cycles[i] = (u64)(clock64() - ci);
    }
    total[0] = lp_now() - t0;
    total[1] = (u64)(clock64() - c0);
    *ctr = base + (u64)iters;
  } else {
    u64 *ping = (u64 *)ncclGetLocalPointer(win, LP_OFF_PING);
    u64 *pong =
        (u64 *)ncclGetLsaPointer(win, LP_OFF_PONG + 8 * (size_t)a.rank, a.lsa_of[0]);
    u64 *ctr = &a.seq[LP_MAXB + 0];
    const u64 base = *ctr;
    for (int i = 0; i < iters; ++i) {
      const u64 s = base + (u64)i + 1;
      if (lp_wait(ping, s, lp_now() + tmo, a, 0, LP_PHASE_PING)) return;
      lp_sys_u64(*pong).store(s, cuda::memory_order_release);
    }
    *ctr = base + (u64)iters;
  }
}

extern "C" cudaError_t lp_launch_pingpong(const lp_dev_t *d, const lp_args_t *a, int peer,
                                          int iters, unsigned long long *cycles,
                                          unsigned long long *total, cudaStream_t st) {
  lp_pingpong_kernel<<<1, 1, 0, st>>>(d->win, *a, peer, iters, cycles, total);
  return cudaGetLastError();
}

/* ---- push all-to-all ----------------------------------------------------------- */
__device__ __forceinline__ void lp_copy(uint4 *__restrict__ dst,
                                        const uint4 *__restrict__ src, size_t lo,
                                        size_t hi) {
  const size_t step = blockDim.x;
  size_t i = lo + threadIdx.x;
  for (; i + 3 * step < hi; i += 4 * step) {
    uint4 v0 = __ldg(src + i), v1 = __ldg(src + i + step);
    uint4 v2 = __ldg(src + i + 2 * step), v3 = __ldg(src + i + 3 * step);
    dst[i] = v0;
    dst[i + step] = v1;
    dst[i + 2 * step] = v2;
    dst[i + 3 * step] = v3;
  }
  for (; i < hi; i += step) dst[i] = __ldg(src + i);
}

/* LP_COPY=tma: the block stages chunks of LP_TMA_CHUNK bytes in shared memory
 * (plain loads) and one thread stores each with a bulk copy (the TMA engine),
 * LP_TMA_STAGES chunks in flight: do bulk stores reach more of NVLink than
 * 16-byte stores from every thread, or the same with fewer SMs? */
#define LP_TMA_CHUNK 16384
#define LP_TMA_STAGES 6
__device__ __forceinline__ void lp_copy_tma(uint4 *__restrict__ dst,
                                            const uint4 *__restrict__ src, size_t lo,
                                            size_t hi, uint4 *sm, unsigned *nchunk) {
  const size_t c16 = LP_TMA_CHUNK / 16;
  for (size_t c = lo; c < hi; c += c16) {
    const unsigned stage = *nchunk % LP_TMA_STAGES;
    const size_t n = hi - c < c16 ? hi - c : c16;
    uint4 *buf = sm + stage * c16;
    if (threadIdx.x == 0 && *nchunk >= LP_TMA_STAGES)
      asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(LP_TMA_STAGES - 1)
                   : "memory");
    __syncthreads(); /* the stage's previous bulk store has read it */
    for (size_t i = threadIdx.x; i < n; i += blockDim.x) buf[i] = __ldg(src + c + i);
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    __syncthreads();
    if (threadIdx.x == 0) {
      asm volatile(
          "cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst + c),
          "r"((unsigned)__cvta_generic_to_shared(buf)), "r"((unsigned)(n * 16))
          : "memory");
      asm volatile("cp.async.bulk.commit_group;" ::: "memory");
    }
    ++*nchunk;
  }
}

__global__ void __launch_bounds__(1024)
    lp_push_kernel(ncclDevComm dc, ncclWindow_t win, lp_args_t a, const uint4 *send,
                   size_t n16, int mode, int check, int tma) {
  extern __shared__ uint4 lp_tma_buf[];
  unsigned nchunk = 0;
  __shared__ uint4 *dst_base[LP_MAXW];
  __shared__ u64 seq_s, t0_s;
  const int W = a.world, me = a.rank, b = blockIdx.x, B = gridDim.x;
  if (threadIdx.x < W)
    dst_base[threadIdx.x] = (uint4 *)ncclGetLsaPointer(
        win, LP_OFF_DATA + (size_t)me * n16 * 16, a.lsa_of[threadIdx.x]);
  if (threadIdx.x == 0) {
    t0_s = lp_now();
    if (mode == LP_MODE_FLAGS) {
      seq_s = a.seq[b] + 1;
      a.seq[b] = seq_s;
    }
  }
  __syncthreads();
  if (lp_err_read(a.err) != 0) return;
  const size_t lo = n16 * b / B, hi = n16 * (b + 1) / B;
  for (int k = 1; k <= W; ++k) { /* peers first, own slot last */
    const int d = (me + k) % W;
    if (tma)
      lp_copy_tma(dst_base[d], send + (size_t)d * n16, lo, hi, lp_tma_buf, &nchunk);
    else
      lp_copy(dst_base[d], send + (size_t)d * n16, lo, hi);
  }
  if (tma) { /* the bulk stores are done (written), then the generic proxy's flag */
    if (threadIdx.x == 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
    asm volatile("fence.proxy.async.global;" ::: "memory");
    __threadfence_system();
    __syncthreads();
  }
  if (mode == LP_MODE_NCCLBAR) {
#ifndef LP_COMPAT
    ncclLsaBarrierSession<ncclCoopCta> bar(ncclCoopCta(), dc, ncclTeamTagLsa(),
                                           (uint32_t)b);
    bar.sync(ncclCoopCta(), cuda::memory_order_acq_rel);
#else
    (void)dc;
    return;
#endif
  } else {
    __syncthreads();
    const u64 seq = seq_s;
    if (threadIdx.x < W) { /* thread d publishes to rank d: flags[me][b] there */
      u64 *f = (u64 *)ncclGetLsaPointer(win, LP_OFF_A2A + 8 * ((size_t)me * LP_MAXB + b),
                                        a.lsa_of[threadIdx.x]);
      lp_sys_u64(*f).store(seq, cuda::memory_order_release);
    }
    if (threadIdx.x < W) { /* thread s waits for rank s: flags[s][b] here */
      u64 *f = (u64 *)ncclGetLocalPointer(
          win, LP_OFF_A2A + 8 * ((size_t)threadIdx.x * LP_MAXB + b));
      lp_wait(f, seq, t0_s + a.timeout_ns, a, threadIdx.x, LP_PHASE_PUSH);
    }
    __syncthreads();
    if (lp_err_read(a.err) != 0) return;
  }
  if (!check) return;
  /* Source s's block b wrote [lo, hi) of slot s: check it now, after the wait. */
  u64 nbad = 0, first = ~0ull;
  for (int s = 0; s < W; ++s) {
    const uint4 *slot =
        (const uint4 *)ncclGetLocalPointer(win, LP_OFF_DATA + (size_t)s * n16 * 16);
    for (size_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
      if (!lp_same(slot[i], lp_pattern(s, me, i))) {
        ++nbad;
        if (first == ~0ull) first = (u64)s * n16 + i;
      }
    }
  }
  lp_bad_add(a, nbad, first);
}

extern "C" cudaError_t lp_launch_push(const lp_dev_t *d, const lp_args_t *a,
                                      const void *send, size_t bytes_per_peer,
                                      int nblocks, int nthreads, int mode, int check,
                                      cudaStream_t st) {
  const char *cp = getenv("LP_COPY");
  const int tma = cp && !strcmp(cp, "tma");
  const size_t smem = tma ? (size_t)LP_TMA_CHUNK * LP_TMA_STAGES : 0;
  if (tma) {
    cudaError_t e = cudaFuncSetAttribute(
        lp_push_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
  }
  lp_push_kernel<<<nblocks, nthreads, smem, st>>>(d->dc, d->win, *a, (const uint4 *)send,
                                                  bytes_per_peer / 16, mode, check, tma);
  return cudaGetLastError();
}

/* ---- fill / verify ------------------------------------------------------------- */
__global__ void lp_fill_kernel(uint4 *send, size_t n16, int world, int rank) {
  const size_t n = n16 * world;
  for (size_t j = blockIdx.x * (size_t)blockDim.x + threadIdx.x; j < n;
       j += (size_t)gridDim.x * blockDim.x)
    send[j] = lp_pattern(rank, (int)(j / n16), j % n16);
}

__global__ void lp_verify_kernel(lp_args_t a, const uint4 *recv, size_t n16) {
  const size_t n = n16 * a.world;
  u64 nbad = 0, first = ~0ull;
  for (size_t j = blockIdx.x * (size_t)blockDim.x + threadIdx.x; j < n;
       j += (size_t)gridDim.x * blockDim.x) {
    if (!lp_same(recv[j], lp_pattern((int)(j / n16), a.rank, j % n16))) {
      ++nbad;
      if (first == ~0ull) first = j;
    }
  }
  lp_bad_add(a, nbad, first);
}

extern "C" cudaError_t lp_launch_fill(const lp_args_t *a, void *send,
                                      size_t bytes_per_peer, cudaStream_t st) {
  lp_fill_kernel<<<264, 512, 0, st>>>((uint4 *)send, bytes_per_peer / 16, a->world,
                                      a->rank);
  return cudaGetLastError();
}

extern "C" cudaError_t lp_launch_verify(const lp_args_t *a, const void *recv,
                                        size_t bytes_per_peer, cudaStream_t st) {
  lp_verify_kernel<<<264, 512, 0, st>>>(*a, (const uint4 *)recv, bytes_per_peer / 16);
  return cudaGetLastError();
}
