/* disco-bench: the LSA push ceiling (lsa_push.h). Ordering as in
 * docs/design-nccl-device.md §5 and decision 27: weak 16-byte stores, each
 * block fences (acq_rel, system scope) and counts itself done, the last
 * block fences again and stores one relaxed flag per peer, then waits for
 * every peer's flag with acquire loads, bounded by %globaltimer. The data is
 * never read back (a ceiling, not a transport), so slots need no acks: a
 * peer's next call may overwrite them, and flags only grow. */
#include <nccl_device.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lsa_push.h"

typedef unsigned long long u64;

#define BL_FLAGS 4096 /* window bytes before the slots: u64 flag per source */
#define BL_THREADS 512

struct bench_lsa {
  ncclWindow_t win;
  ncclDevComm *dc;
  void *buf;
  size_t bytes, slot_bytes;
  int world, rank, blocks;
  unsigned long long timeout_ns;
  char **peer; /* device [world]: every window's base as mapped here */
  u64 *state;  /* device: [0] last call, [1] failed peer + 1, [2] blocks done */
};

typedef struct {
  long long off[BENCH_LSA_MAX_WORLD + 1]; /* send offsets in peer order */
} bl_offs;

__device__ __forceinline__ u64 bl_now(void) {
  u64 t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__global__ void bl_peer_kernel(ncclWindow_t win, const int *lsa_of, int world, int rank,
                               char *local, char **peer) {
  for (int p = threadIdx.x; p < world; p += blockDim.x)
    peer[p] = p == rank ? local : (char *)ncclGetLsaPointer(win, 0, lsa_of[p]);
}

__global__ void __launch_bounds__(BL_THREADS)
    bl_push_kernel(char *const *peer, u64 *state, const char *src, bl_offs o, int world,
                   int rank, size_t slot_bytes, u64 timeout_ns) {
  __shared__ u64 s_seq;
  __shared__ int s_last;
  if (threadIdx.x == 0) s_seq = *(volatile u64 *)&state[0] + 1ull;
  __syncthreads();
  const u64 seq = s_seq;
  const long long b = blockIdx.x, B = gridDim.x;
  for (int k = 1; k <= world; k++) { /* peers first (r + 1, ...), own slot last */
    const int d = (rank + k) % world;
    const char *s = src + o.off[d];
    const long long n = o.off[d + 1] - o.off[d];
    char *dst = peer[d] + BL_FLAGS + (size_t)rank * slot_bytes;
    if ((((uintptr_t)s | (uintptr_t)n) & 15u) == 0) {
      const uint4 *s16 = (const uint4 *)s;
      uint4 *d16 = (uint4 *)dst;
      const long long n16 = n / 16, lo = n16 * b / B, hi = n16 * (b + 1) / B;
      long long i = lo + threadIdx.x;
      for (; i + 3 * BL_THREADS < hi; i += 4 * BL_THREADS) {
        const uint4 v0 = __ldg(s16 + i), v1 = __ldg(s16 + i + BL_THREADS);
        const uint4 v2 = __ldg(s16 + i + 2 * BL_THREADS),
                    v3 = __ldg(s16 + i + 3 * BL_THREADS);
        d16[i] = v0;
        d16[i + BL_THREADS] = v1;
        d16[i + 2 * BL_THREADS] = v2;
        d16[i + 3 * BL_THREADS] = v3;
      }
      for (; i < hi; i += BL_THREADS) d16[i] = __ldg(s16 + i);
    } else { /* rows that are not 16-byte multiples: bytes */
      const long long lo = n * b / B, hi = n * (b + 1) / B;
      for (long long i = lo + threadIdx.x; i < hi; i += BL_THREADS) dst[i] = s[i];
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    asm volatile("fence.acq_rel.sys;" ::: "memory"); /* this block's stores */
    s_last = atomicAdd((unsigned *)&state[2], 1u) == gridDim.x - 1u;
    if (s_last) {
      asm volatile("fence.acq_rel.sys;" ::: "memory"); /* every block's */
      *(unsigned *)&state[2] = 0u;
      for (int d = 0; d < world; d++)
        if (d != rank)
          asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"((u64 *)peer[d] + rank),
                       "l"(seq)
                       : "memory");
    }
  }
  __syncthreads();
  if (!s_last) return;
  const u64 deadline = bl_now() + timeout_ns;
  for (int q = threadIdx.x; q < world; q += BL_THREADS) {
    if (q == rank) continue;
    const u64 *f = (const u64 *)peer[rank] + q;
    for (unsigned it = 0;; it++) {
      u64 v;
      asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(f) : "memory");
      if ((long long)(v - seq) >= 0) break;
      if ((it & 255u) == 255u && bl_now() > deadline) {
        atomicCAS(&state[1], 0ull, (u64)q + 1ull);
        break;
      }
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) state[0] = seq;
}

static int bl_err(char *err, size_t n, const char *what, const char *msg) {
  snprintf(err, n, "%s: %s", what, msg);
  return -1;
}

extern "C" int bench_lsa_create(ncclComm_t comm, int world, int rank, size_t slot_bytes,
                                unsigned long long timeout_ns, bench_lsa_t **out,
                                char *err, size_t errlen) {
  bench_lsa_t *l = NULL;
  int *lsa_of = NULL, *dev_lsa = NULL, sms = 0, dev = 0, ret = -1, registered = 0;
  ncclResult_t r;
  cudaError_t e;
  *out = NULL;
  if (world > BENCH_LSA_MAX_WORLD) return 1;
  lsa_of = (int *)calloc((size_t)world, sizeof(int));
  l = (bench_lsa_t *)calloc(1, sizeof(*l));
  if (lsa_of == NULL || l == NULL) {
    ret = bl_err(err, errlen, "lsa push", "out of host memory");
    goto fail;
  }
  {
    ncclTeam_t lsa = ncclTeamLsa(comm), wt = ncclTeamWorld(comm);
    for (int p = 0; p < world; p++) {
      if (!ncclTeamRankIsMember(lsa, wt, p)) {
        ret = 1; /* every rank sees the same teams: all return here */
        goto fail;
      }
      lsa_of[p] = ncclTeamRankToTeam(lsa, wt, p);
    }
  }
  l->world = world;
  l->rank = rank;
  l->timeout_ns = timeout_ns;
  l->slot_bytes = (slot_bytes + 255) / 256 * 256;
  l->bytes = (BL_FLAGS + (size_t)world * l->slot_bytes + (2u << 20) - 1) / (2u << 20) *
             (2u << 20);
  if ((e = cudaGetDevice(&dev)) != cudaSuccess ||
      (e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev)) !=
          cudaSuccess ||
      (e = cudaMalloc((void **)&l->peer, (size_t)world * sizeof(char *))) !=
          cudaSuccess ||
      (e = cudaMalloc((void **)&l->state, 4 * sizeof(u64))) != cudaSuccess ||
      (e = cudaMemset(l->state, 0, 4 * sizeof(u64))) != cudaSuccess ||
      (e = cudaMalloc((void **)&dev_lsa, (size_t)world * sizeof(int))) != cudaSuccess ||
      (e = cudaMemcpy(dev_lsa, lsa_of, (size_t)world * sizeof(int),
                      cudaMemcpyHostToDevice)) != cudaSuccess) {
    ret = bl_err(err, errlen, "lsa push setup", cudaGetErrorString(e));
    goto fail;
  }
  l->blocks = sms;
  if ((r = ncclMemAlloc(&l->buf, l->bytes)) != ncclSuccess) {
    ret = bl_err(err, errlen, "ncclMemAlloc", ncclGetErrorString(r));
    goto fail;
  }
  /* zeroed before any peer can see it: flags start at 0 */
  if ((e = cudaMemset(l->buf, 0, l->bytes)) != cudaSuccess ||
      (e = cudaDeviceSynchronize()) != cudaSuccess) {
    ret = bl_err(err, errlen, "cudaMemset", cudaGetErrorString(e));
    goto fail;
  }
  if ((r = ncclCommWindowRegister(comm, l->buf, l->bytes, &l->win,
                                  NCCL_WIN_COLL_SYMMETRIC)) != ncclSuccess) {
    ret = bl_err(err, errlen, "ncclCommWindowRegister", ncclGetErrorString(r));
    goto fail;
  }
  registered = 1;
  /* A device communicator, unused by the kernels (they take the peers'
   * windows through ncclGetLsaPointer): made and kept as the backend keeps
   * its own (nd_setup.cu), so that the push runs on disco's set-up. */
  l->dc = (ncclDevComm *)calloc(1, sizeof(ncclDevComm));
  if (l->dc == NULL) {
    ret = bl_err(err, errlen, "lsa push", "out of host memory");
    goto fail;
  }
  {
    ncclDevCommRequirements_t reqs;
#ifdef NCCL_DEV_COMM_REQUIREMENTS_INITIALIZER
    reqs = NCCL_DEV_COMM_REQUIREMENTS_INITIALIZER;
#else
    memset(&reqs, 0, sizeof(reqs));
#endif
    reqs.lsaMultimem = false; /* never multimem / NVLS */
    reqs.lsaBarrierCount = 0;
    if ((r = ncclDevCommCreate(comm, &reqs, l->dc)) != ncclSuccess) {
      free(l->dc);
      l->dc = NULL;
      ret = bl_err(err, errlen, "ncclDevCommCreate", ncclGetErrorString(r));
      goto fail;
    }
  }
  bl_peer_kernel<<<1, 128>>>(l->win, dev_lsa, world, rank, (char *)l->buf, l->peer);
  if ((e = cudaGetLastError()) != cudaSuccess ||
      (e = cudaDeviceSynchronize()) != cudaSuccess) {
    ret = bl_err(err, errlen, "lsa push peers", cudaGetErrorString(e));
    goto fail;
  }
  cudaFree(dev_lsa);
  free(lsa_of);
  *out = l;
  return 0;
fail:
  if (l != NULL) {
    if (l->dc != NULL) {
      ncclDevCommDestroy(comm, l->dc);
      free(l->dc);
    }
    if (registered) ncclCommWindowDeregister(comm, l->win);
    if (l->buf != NULL) ncclMemFree(l->buf);
    cudaFree(l->peer);
    cudaFree(l->state);
    free(l);
  }
  cudaFree(dev_lsa);
  free(lsa_of);
  return ret;
}

extern "C" void bench_lsa_destroy(ncclComm_t comm, bench_lsa_t *l) {
  if (l == NULL) return;
  cudaDeviceSynchronize();
  if (l->dc != NULL) {
    ncclDevCommDestroy(comm, l->dc);
    free(l->dc);
  }
  ncclCommWindowDeregister(comm, l->win);
  ncclMemFree(l->buf);
  cudaFree(l->peer);
  cudaFree(l->state);
  free(l);
}

extern "C" cudaError_t bench_lsa_push(bench_lsa_t *l, const size_t *send_bytes,
                                      const void *sbuf, cudaStream_t st) {
  bl_offs o;
  o.off[0] = 0;
  for (int p = 0; p < l->world; p++) {
    if (send_bytes[p] > l->slot_bytes) return cudaErrorInvalidValue;
    o.off[p + 1] = o.off[p] + (long long)send_bytes[p];
  }
  bl_push_kernel<<<l->blocks, BL_THREADS, 0, st>>>(l->peer, l->state, (const char *)sbuf,
                                                   o, l->world, l->rank, l->slot_bytes,
                                                   l->timeout_ns);
  return cudaGetLastError();
}

extern "C" int bench_lsa_failed(bench_lsa_t *l, cudaStream_t st) {
  u64 v = 0;
  if (cudaStreamSynchronize(st) != cudaSuccess ||
      cudaMemcpy(&v, l->state + 1, sizeof(v), cudaMemcpyDeviceToHost) != cudaSuccess)
    return -1;
  return (int)v;
}
