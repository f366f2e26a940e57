/* lsa-probe: steps 0-1 of docs/design-nccl-device.md §9 on one node.
 * One thread per GPU (ncclCommInitAll). Per rank: ncclMemAlloc + symmetric window +
 * ncclDevCommCreate; flag ping-pong rank 0 <-> each peer through LSA pointers; LSA
 * push all-to-all (own flags, and NCCL's LSA barrier for A/B) against grouped
 * ncclSend/ncclRecv and copy-engine peer copies (cudaMemcpyPeerAsync, a stream per
 * destination) of the same bytes. Every received byte is checked. LP_COPY=tma: the
 * push stores through bulk copies from shared memory (probe.cu). */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "probe.h"

#ifndef LP_NCCL_INCLUDE_DIR
#define LP_NCCL_INCLUDE_DIR "?"
#endif

#define LP_NSIZES 3
#define LP_NMODES 4 /* LSA flags, LSA + NCCL barrier, ncclSend/ncclRecv, copy engines */
static const size_t lp_sizes[LP_NSIZES] = {1u << 20, 14u << 20, 64u << 20};
static const char *const lp_mode_name[LP_NMODES] = {"lsa-push+flags", "lsa-push+ncclbar",
                                                    "nccl send/recv", "ce memcpy peer"};

typedef struct {
  int world, sms, threads, iters, warmup, pp_iters, ncclbar;
  double timeout_ms;
} lp_opts_t;

typedef struct {
  double med_us, mean_us;
  unsigned long long bad;
  int ran;
} lp_res_t;

static lp_opts_t g_opt;
static ncclComm_t g_comms[LP_MAXW];
static pthread_barrier_t g_bar;
static atomic_int g_fail;
static lp_res_t g_res[LP_MAXW][LP_NSIZES][LP_NMODES];
static double g_pp_med_ns[LP_MAXW], g_pp_mean_ns[LP_MAXW];
static int g_nblocks, g_bad_any;

#define FAIL(...)                               \
  do {                                          \
    fprintf(stderr, "lsa-probe: " __VA_ARGS__); \
    atomic_store(&g_fail, 1);                   \
    return NULL;                                \
  } while (0)

#define CK_CUDA(r, call)                                                            \
  do {                                                                              \
    cudaError_t e_ = (call);                                                        \
    if (e_ != cudaSuccess)                                                          \
      FAIL("rank %d: %s: %s (%s:%d)\n", r, #call, cudaGetErrorString(e_), __FILE__, \
           __LINE__);                                                               \
  } while (0)

#define CK_NCCL(r, call)                                                       \
  do {                                                                         \
    ncclResult_t e_ = (call);                                                  \
    if (e_ != ncclSuccess)                                                     \
      FAIL("rank %d: %s: %s / %s (%s:%d)\n", r, #call, ncclGetErrorString(e_), \
           ncclGetLastError(NULL), __FILE__, __LINE__);                        \
  } while (0)

/* Host barrier of all rank threads; nonzero once any rank failed. */
static int sync_all(void) {
  pthread_barrier_wait(&g_bar);
  return atomic_load(&g_fail);
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

static double median(double *v, int n) {
  qsort(v, (size_t)n, sizeof(*v), cmp_double);
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* Nonzero (and reported) if the device error word is set. */
static int check_err(int rank, const unsigned long long *derr, const char *what) {
  unsigned long long e = 0;
  if (cudaMemcpy(&e, derr, sizeof(e), cudaMemcpyDeviceToHost) != cudaSuccess) return 1;
  if (e == 0) return 0;
  fprintf(stderr,
          "lsa-probe: rank %d: %s: device error 0x%llx (code %llu peer %llu phase %llu "
          "rank %llu seq %llu)\n",
          rank, what, e, e & 0xff, (e >> 8) & 0xff, (e >> 16) & 0xff, (e >> 24) & 0xff,
          e >> 32);
  atomic_store(&g_fail, 1);
  return 1;
}

typedef struct {
  int rank;
  lp_args_t a;
  lp_dev_t *dev;
  cudaStream_t st;
  ncclComm_t comm;
  void *send, *recv;
  cudaEvent_t ev[2 * 64 + 2];
  cudaStream_t ce[LP_MAXW]; /* copy-engine mode: a stream per destination */
  cudaEvent_t fork, join[LP_MAXW];
} lp_rank_t;

static lp_rank_t g_ranks[LP_MAXW];

/* One all-to-all of `bpp` bytes per peer in mode m. */
static cudaError_t a2a_once(lp_rank_t *R, int m, size_t bpp, int check) {
  if (m == 3) { /* cudaMemcpyPeerAsync into every peer's recv[rank], concurrently */
    const int W = R->a.world, r = R->rank;
    cudaError_t e = cudaEventRecord(R->fork, R->st);
    for (int p = 0; p < W && e == cudaSuccess; ++p) {
      e = cudaStreamWaitEvent(R->ce[p], R->fork, 0);
      if (e == cudaSuccess)
        e = cudaMemcpyPeerAsync((char *)g_ranks[p].recv + (size_t)r * bpp, p,
                                (const char *)R->send + (size_t)p * bpp, r, bpp,
                                R->ce[p]);
      if (e == cudaSuccess) e = cudaEventRecord(R->join[p], R->ce[p]);
      if (e == cudaSuccess) e = cudaStreamWaitEvent(R->st, R->join[p], 0);
    }
    (void)check;
    return e;
  }
  if (m == 2) {
    ncclResult_t r = ncclGroupStart();
    for (int p = 0; p < R->a.world && r == ncclSuccess; ++p) {
      r = ncclSend((const char *)R->send + (size_t)p * bpp, bpp, ncclUint8, p, R->comm,
                   R->st);
      if (r == ncclSuccess)
        r = ncclRecv((char *)R->recv + (size_t)p * bpp, bpp, ncclUint8, p, R->comm,
                     R->st);
    }
    ncclResult_t r2 = ncclGroupEnd();
    if (r != ncclSuccess || r2 != ncclSuccess) {
      fprintf(stderr, "lsa-probe: rank %d: ncclSend/ncclRecv: %s\n", R->rank,
              ncclGetErrorString(r != ncclSuccess ? r : r2));
      return cudaErrorUnknown;
    }
    return cudaSuccess;
  }
  return lp_launch_push(R->dev, &R->a, R->send, bpp, g_nblocks, g_opt.threads,
                        m == 1 ? LP_MODE_NCCLBAR : LP_MODE_FLAGS, check, R->st);
}

static void print_header(void) {
  printf(
      "\nall-to-all, W %d (med = slowest rank's median of %d calls, mean = slowest "
      "rank's total / calls;\n GB/s = bytes per rank incl. own slot / med; NVL GB/s = "
      "(W-1)/W of that)\n",
      g_opt.world, g_opt.iters);
  printf("  %-18s %10s %12s %10s %10s %8s %10s  %s\n", "mode", "per rank", "per peer",
         "med us", "mean us", "GB/s", "NVL GB/s", "check");
  fflush(stdout);
}

/* Rank 0, after a barrier: one line of the all-to-all table. */
static void print_result(int si, int m) {
  const int W = g_opt.world;
  const size_t bpp = lp_sizes[si] / (size_t)W / 16 * 16;
  double med = 0, mean = 0, tot = (double)bpp * W;
  unsigned long long bad = 0;
  for (int r = 0; r < W; ++r) {
    if (g_res[r][si][m].med_us > med) med = g_res[r][si][m].med_us;
    if (g_res[r][si][m].mean_us > mean) mean = g_res[r][si][m].mean_us;
    bad += g_res[r][si][m].bad;
  }
  if (bad) g_bad_any = 1;
  printf("  %-18s %7zu KiB %10zu B %10.1f %10.1f %8.1f %10.1f  %s\n", lp_mode_name[m],
         lp_sizes[si] >> 10, bpp, med, mean, tot / med / 1e3,
         tot * (W - 1) / W / med / 1e3, bad ? "WRONG" : "ok");
  fflush(stdout);
}

static void *rank_main(void *arg) {
  lp_rank_t *R = (lp_rank_t *)arg;
  const int r = R->rank, W = g_opt.world;
  const size_t max_total = lp_sizes[LP_NSIZES - 1];
  const size_t win_bytes = LP_OFF_DATA + max_total;
  void *buf = NULL;
  ncclWindow_t win = NULL;
  lp_info_t info;
  unsigned long long *dmem = NULL, *cycles = NULL;
  R->comm = g_comms[r];

  CK_CUDA(r, cudaSetDevice(r));
  CK_CUDA(r, cudaStreamCreateWithFlags(&R->st, cudaStreamNonBlocking));
  for (int i = 0; i < 2 * 64 + 2; ++i) CK_CUDA(r, cudaEventCreate(&R->ev[i]));
  CK_CUDA(r, cudaEventCreateWithFlags(&R->fork, cudaEventDisableTiming));
  for (int p = 0; p < W; ++p) {
    CK_CUDA(r, cudaStreamCreateWithFlags(&R->ce[p], cudaStreamNonBlocking));
    CK_CUDA(r, cudaEventCreateWithFlags(&R->join[p], cudaEventDisableTiming));
    if (p != r) { /* direct peer copies (NCCL may have enabled it already) */
      cudaError_t e = cudaDeviceEnablePeerAccess(p, 0);
      if (e == cudaErrorPeerAccessAlreadyEnabled)
        (void)cudaGetLastError();
      else
        CK_CUDA(r, e);
    }
  }
  /* Zeroed before registration: no peer can see stale flags (design §2.3). */
  CK_NCCL(r, ncclMemAlloc(&buf, win_bytes));
  CK_CUDA(r, cudaMemset(buf, 0, win_bytes));
  CK_CUDA(r, cudaDeviceSynchronize());
  CK_NCCL(r,
          ncclCommWindowRegister(R->comm, buf, win_bytes, &win, NCCL_WIN_COLL_SYMMETRIC));
  CK_NCCL(r, lp_dev_create(R->comm, win, g_opt.ncclbar ? g_nblocks : 0, &R->dev, &info));
  CK_CUDA(r, cudaMalloc((void **)&dmem, (1 + LP_MAXB + LP_MAXW + 2) * sizeof(*dmem)));
  CK_CUDA(r, cudaMemset(dmem, 0, (1 + LP_MAXB + LP_MAXW + 2) * sizeof(*dmem)));
  CK_CUDA(r, cudaMalloc(&R->send, max_total));
  CK_CUDA(r, cudaMalloc(&R->recv, max_total));
  CK_CUDA(r,
          cudaMalloc((void **)&cycles, (size_t)(g_opt.pp_iters + 2) * sizeof(*cycles)));
  CK_CUDA(r, cudaDeviceSynchronize());

  memset(&R->a, 0, sizeof(R->a));
  R->a.world = W;
  R->a.rank = r;
  R->a.timeout_ns = (unsigned long long)(g_opt.timeout_ms * 1e6);
  R->a.err = dmem;
  R->a.seq = dmem + 1;
  R->a.bad = dmem + 1 + LP_MAXB + LP_MAXW;
  memcpy(R->a.lsa_of, info.lsa_of, sizeof(info.lsa_of));

  printf(
      "rank %d: devcomm rank %d/%d lsaRank %d lsaSize %d; ncclTeamLsa {nRanks %d rank %d "
      "stride %d}; lsa_of =",
      r, info.rank, info.nranks, info.lsa_rank, info.lsa_size, info.team_nranks,
      info.team_rank, info.team_stride);
  for (int p = 0; p < W; ++p) printf(" %d", info.lsa_of[p]);
  printf("\n");
  if (info.lsa_size != W || info.rank != r)
    FAIL("rank %d: not all ranks are LSA peers\n", r);
  for (int p = 0; p < W; ++p)
    if (info.lsa_of[p] < 0) FAIL("rank %d: peer %d not LSA\n", r, p);
  if (sync_all()) return NULL;

  /* ---- flag ping-pong, rank 0 <-> p -------------------------------------------- */
  for (int p = 1; p < W; ++p) {
    if (r == 0 || r == p) {
      for (int rep = 0; rep < 2; ++rep) { /* rep 0: warm-up of 100 round trips */
        int n = rep || g_opt.pp_iters < 100 ? g_opt.pp_iters : 100;
        CK_CUDA(r, lp_launch_pingpong(R->dev, &R->a, p, n, cycles,
                                      cycles + g_opt.pp_iters, R->st));
        CK_CUDA(r, cudaStreamSynchronize(R->st));
        if (check_err(r, R->a.err, "ping-pong")) break;
      }
      if (r == 0 && !atomic_load(&g_fail)) {
        int n = g_opt.pp_iters;
        unsigned long long *h = malloc((size_t)(n + 2) * sizeof(*h));
        double *v = malloc((size_t)n * sizeof(*v));
        if (!h || !v) FAIL("out of memory\n");
        CK_CUDA(r, cudaMemcpy(h, cycles, (size_t)(n + 2) * sizeof(*h),
                              cudaMemcpyDeviceToHost));
        double ns_per_cycle = (double)h[n] / (double)h[n + 1];
        for (int i = 0; i < n; ++i) v[i] = (double)h[i] * ns_per_cycle;
        g_pp_med_ns[p] = median(v, n) / 2;
        g_pp_mean_ns[p] = (double)h[n] / n / 2;
        printf(
            "ping-pong rank 0 <-> %d (st.release.sys / ld.acquire.sys through LSA "
            "pointers, %d round trips): one-way median %.0f ns, mean %.0f ns\n",
            p, n, g_pp_med_ns[p], g_pp_mean_ns[p]);
        fflush(stdout);
        free(h);
        free(v);
      }
    }
    if (sync_all()) return NULL;
  }

  if (r == 0) print_header();
  /* ---- all-to-all ---------------------------------------------------------------- */
  /* The NCCL barrier variant last: its wait is unbounded. */
  static const int mode_order[LP_NMODES] = {0, 2, 3, 1};
  for (int mi = 0; mi < LP_NMODES; ++mi) {
    const int m = mode_order[mi];
    if (m == 1 && !g_opt.ncclbar) continue;
    for (int si = 0; si < LP_NSIZES; ++si) {
      const size_t bpp = lp_sizes[si] / (size_t)W / 16 * 16;
      CK_CUDA(r, lp_launch_fill(&R->a, R->send, bpp, R->st));
      CK_CUDA(r, cudaStreamSynchronize(R->st));
      if (sync_all()) return NULL;
      for (int i = 0; i < g_opt.warmup; ++i) CK_CUDA(r, a2a_once(R, m, bpp, 0));
      for (int i = 0; i < g_opt.iters; ++i) {
        CK_CUDA(r, cudaEventRecord(R->ev[2 * i], R->st));
        CK_CUDA(r, a2a_once(R, m, bpp, 0));
        CK_CUDA(r, cudaEventRecord(R->ev[2 * i + 1], R->st));
      }
      CK_CUDA(r, cudaStreamSynchronize(R->st));
      if (check_err(r, R->a.err, lp_mode_name[m])) {
        sync_all();
        return NULL;
      }
      double t[64], tot = 0;
      float ms;
      for (int i = 0; i < g_opt.iters; ++i) {
        CK_CUDA(r, cudaEventElapsedTime(&ms, R->ev[2 * i], R->ev[2 * i + 1]));
        t[i] = 1e3 * ms;
      }
      CK_CUDA(r, cudaEventElapsedTime(&ms, R->ev[0], R->ev[2 * g_opt.iters - 1]));
      tot = 1e3 * ms;
      /* Checked call: clear the landing zone everywhere first. */
      void *land = m >= 2 ? R->recv : (char *)buf + LP_OFF_DATA;
      CK_CUDA(r, cudaMemset(land, 0, max_total));
      CK_CUDA(r, cudaMemset(R->a.bad, 0, sizeof(unsigned long long)));
      CK_CUDA(r, cudaMemset(R->a.bad + 1, 0xff, sizeof(unsigned long long)));
      CK_CUDA(r, cudaStreamSynchronize(R->st));
      CK_CUDA(r, cudaDeviceSynchronize());
      if (sync_all()) return NULL;
      CK_CUDA(r, a2a_once(R, m, bpp, 1));
      if (m == 3) { /* the peers' copies into our recv are done too */
        CK_CUDA(r, cudaStreamSynchronize(R->st));
        if (sync_all()) return NULL;
      }
      if (m >= 2) CK_CUDA(r, lp_launch_verify(&R->a, R->recv, bpp, R->st));
      CK_CUDA(r, cudaStreamSynchronize(R->st));
      if (check_err(r, R->a.err, lp_mode_name[m])) {
        sync_all();
        return NULL;
      }
      unsigned long long bad[2];
      CK_CUDA(r, cudaMemcpy(bad, R->a.bad, sizeof(bad), cudaMemcpyDeviceToHost));
      if (bad[0])
        fprintf(stderr,
                "lsa-probe: rank %d: %s, %zu B/peer: %llu of %zu 16-byte vectors wrong, "
                "first at vector %llu (src %llu)\n",
                r, lp_mode_name[m], bpp, bad[0], bpp / 16 * (size_t)W, bad[1],
                bad[1] / (bpp / 16));
      lp_res_t *res = &g_res[r][si][m];
      res->med_us = median(t, g_opt.iters);
      res->mean_us = tot / g_opt.iters;
      res->bad = bad[0];
      res->ran = 1;
      if (sync_all()) return NULL;
      if (r == 0) print_result(si, m);
    }
  }
  if (sync_all()) return NULL;

  /* ---- teardown, reverse order ---- */
  CK_CUDA(r, cudaDeviceSynchronize());
  CK_NCCL(r, lp_dev_destroy(R->comm, R->dev));
  CK_NCCL(r, ncclCommWindowDeregister(R->comm, win));
  CK_NCCL(r, ncclMemFree(buf));
  CK_CUDA(r, cudaFree(dmem));
  CK_CUDA(r, cudaFree(cycles));
  CK_CUDA(r, cudaFree(R->send));
  CK_CUDA(r, cudaFree(R->recv));
  for (int i = 0; i < 2 * 64 + 2; ++i) CK_CUDA(r, cudaEventDestroy(R->ev[i]));
  for (int p = 0; p < W; ++p) {
    CK_CUDA(r, cudaStreamDestroy(R->ce[p]));
    CK_CUDA(r, cudaEventDestroy(R->join[p]));
  }
  CK_CUDA(r, cudaEventDestroy(R->fork));
  CK_CUDA(r, cudaStreamDestroy(R->st));
  CK_NCCL(r, ncclCommDestroy(R->comm));
  return NULL;
}

static void usage(FILE *f) {
  fprintf(
      f,
      "usage: lsa-probe [-w N] [--sms N] [--threads N] [--iters N] [--warmup N]\n"
      "                 [--pp-iters N] [--timeout-ms T] [--no-ncclbar]\n"
      "  -w N          ranks (GPUs), default all\n"
      "  --sms N       blocks of the push kernel, default the SM count (<= %d)\n"
      "  --threads N   threads per block, default 512\n"
      "  --iters N     timed all-to-all calls per case (<= 64), default 20\n"
      "  --warmup N    untimed calls first, default 5\n"
      "  --pp-iters N  ping-pong round trips per peer, default 1000\n"
      "  --timeout-ms  bound of every device wait, default 2000\n"
      "  --no-ncclbar  skip the ncclLsaBarrierSession variant (its wait is unbounded)\n"
      "environment: LP_COPY=tma  push with bulk (TMA) stores from shared memory\n",
      LP_MAXB);
}

static int parse_int(const char *s, int lo, int hi, int *out) {
  char *end;
  errno = 0;
  long v = strtol(s, &end, 10);
  if (errno || *end || end == s || v < lo || v > hi) return -1;
  *out = (int)v;
  return 0;
}

int main(int argc, char **argv) {
  int ndev = 0, lib = 0;
  g_opt = (lp_opts_t){.world = 0,
                      .sms = 0,
                      .threads = 512,
                      .iters = 20,
                      .warmup = 5,
                      .pp_iters = 1000,
                      .ncclbar = 1,
                      .timeout_ms = 2000};
  for (int i = 1; i < argc; ++i) {
    const char *k = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    int bad = 0;
    if (!strcmp(k, "-h") || !strcmp(k, "--help")) {
      usage(stdout);
      return 0;
    } else if (!strcmp(k, "--no-ncclbar")) {
      g_opt.ncclbar = 0;
      continue;
    } else if (!v) {
      bad = 1;
    } else if (!strcmp(k, "-w")) {
      bad = parse_int(v, 1, LP_MAXW, &g_opt.world);
    } else if (!strcmp(k, "--sms")) {
      bad = parse_int(v, 1, LP_MAXB, &g_opt.sms);
    } else if (!strcmp(k, "--threads")) {
      bad = parse_int(v, 32, 1024, &g_opt.threads);
    } else if (!strcmp(k, "--iters")) {
      bad = parse_int(v, 2, 64, &g_opt.iters);
    } else if (!strcmp(k, "--warmup")) {
      bad = parse_int(v, 0, 1000, &g_opt.warmup);
    } else if (!strcmp(k, "--pp-iters")) {
      bad = parse_int(v, 1, 1000000, &g_opt.pp_iters);
    } else if (!strcmp(k, "--timeout-ms")) {
      int t;
      bad = parse_int(v, 1, 600000, &t);
      g_opt.timeout_ms = t;
    } else {
      bad = 1;
    }
    if (bad) {
      fprintf(stderr, "lsa-probe: bad argument %s%s%s\n", k, v ? " " : "", v ? v : "");
      usage(stderr);
      return 2;
    }
    ++i;
  }

  /* Step 0: header and library must be the same NCCL (GPU.md: a 2.28.3 build gets
   * "invalid usage" from ncclDevCommCreate on a 2.28.9 library). */
  if (ncclGetVersion(&lib) != ncclSuccess) {
    fprintf(stderr, "lsa-probe: ncclGetVersion failed\n");
    return 1;
  }
  printf("NCCL_VERSION_CODE (header, %s) %d, ncclGetVersion (library) %d\n",
         LP_NCCL_INCLUDE_DIR, NCCL_VERSION_CODE, lib);
  if (lib != NCCL_VERSION_CODE) {
    fprintf(
        stderr,
        "lsa-probe: NCCL version mismatch: built with headers %d, running library %d; "
        "refusing to run\n",
        NCCL_VERSION_CODE, lib);
    return 1;
  }
  if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev < 1) {
    fprintf(stderr, "lsa-probe: no CUDA device\n");
    return 1;
  }
  if (ndev > LP_MAXW) ndev = LP_MAXW;
  if (g_opt.world == 0) g_opt.world = ndev;
  if (g_opt.world > ndev) {
    fprintf(stderr, "lsa-probe: -w %d but %d GPUs\n", g_opt.world, ndev);
    return 1;
  }
  const int W = g_opt.world;
  if (!lp_have_ncclbar()) g_opt.ncclbar = 0;
  int sm = 0;
  cudaDeviceGetAttribute(&sm, cudaDevAttrMultiProcessorCount, 0);
  g_nblocks = g_opt.sms ? g_opt.sms : (sm < LP_MAXB ? sm : LP_MAXB);
  struct cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  printf(
      "GPUs: %d x %s (%d SMs); W %d; push grid %d x %d; iters %d (+%d warm-up); "
      "timeout %.0f ms\n",
      ndev, prop.name, sm, W, g_nblocks, g_opt.threads, g_opt.iters, g_opt.warmup,
      g_opt.timeout_ms);

  int devs[LP_MAXW];
  for (int i = 0; i < W; ++i) devs[i] = i;
  ncclResult_t nr = ncclCommInitAll(g_comms, W, devs);
  if (nr != ncclSuccess) {
    fprintf(stderr, "lsa-probe: ncclCommInitAll: %s\n", ncclGetErrorString(nr));
    return 1;
  }
  pthread_barrier_init(&g_bar, NULL, (unsigned)W);
  lp_rank_t *ranks = g_ranks;
  pthread_t th[LP_MAXW];
  for (int i = 0; i < W; ++i) {
    ranks[i].rank = i;
    if (pthread_create(&th[i], NULL, rank_main, &ranks[i]) != 0) {
      fprintf(stderr, "lsa-probe: pthread_create failed\n");
      return 1;
    }
  }
  for (int i = 0; i < W; ++i) pthread_join(th[i], NULL);
  if (atomic_load(&g_fail)) {
    fprintf(stderr, "lsa-probe: FAILED (teardown skipped)\n");
    return 1;
  }
  pthread_barrier_destroy(&g_bar);

  if (g_bad_any) {
    fprintf(stderr, "lsa-probe: FAILED: wrong data received\n");
    return 1;
  }
  printf("lsa-probe: ok\n");
  return 0;
}
