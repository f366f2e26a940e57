/* GPU backend test: disco dispatch/combine over NCCL on every visible GPU
 * (and on 2 of them), compared bit for bit with disco_ref.
 * usage: test_nccl [--world N] [--small] [--filter SUBSTR]
 * env DISCO_TEST_BACKEND: nccl (default) or nccl_device. On nccl_device,
 * dispatch and combine return once enqueued and errors found on the device
 * come from disco_comm_check(comm, 1), which this test calls after every
 * call that returned DISCO_SUCCESS and takes as the call's outcome; the
 * expected codes are the same on both backends. With DISCO_ND_HOST_PEERS
 * set (the ranks split into two pretend hosts), the nccl_device comm is
 * hybrid: NCCL send/recv to the other host inside each call, caps 0; the
 * whole table must pass through it all the same.
 * Prints SKIP and exits 0 only when there is no GPU. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/dtype.h"
#include "disco_nccl.h"
#include "gpu_world.h"

/* Backend under test (DISCO_TEST_BACKEND), set once in main: g_nd_create,
 * the create function called; g_nd, the backend expected to come back;
 * g_hybrid: a comm with pretend peers on another host (caps 0). */
static int g_nd, g_nd_create, g_hybrid;
static const char *g_backend = "nccl";

enum { PLAIN, LAYOUT, REPEAT, REDISPATCH };
/* INJ_HOST: rank 0 passes a misaligned x, an error found on the host before
 * any kernel runs; peers must get DISCO_ERR_REMOTE, not a hang. */
enum { INJ_NONE, INJ_CAPACITY, INJ_BAD_ID, INJ_DUP, INJ_HOST };

typedef struct tcase {
  const char *name;
  int e_loc, K;
  int64_t H, M;
  disco_dtype_t dtype;
  disco_combine_wire_t wire;
  gw_route_t route;
  double holes;
  int tmode; /* 0 varied T, 1 odd ranks have no tokens, 2 no tokens anywhere */
  int weighted;
  disco_layout_t layout;
  int align;
  disco_index_type_t itype;
  int cweighted;
  int mode, inject;
} tcase_t;

#define EM DISCO_LAYOUT_EXPERT_MAJOR
#define RM DISCO_LAYOUT_RANK_MAJOR
#define BF DISCO_DTYPE_BF16
#define F16 DISCO_DTYPE_FP16
#define F32 DISCO_DTYPE_FP32
#define WF DISCO_COMBINE_WIRE_FP32
#define WD DISCO_COMBINE_WIRE_DTYPE
#define I64 DISCO_INDEX_INT64
#define I32 DISCO_INDEX_INT32

static const tcase_t cases[] = {
    {"basic", 4, 2, 64, 96, BF, WF, GW_UNIFORM, 0.1, 0, 1, EM, 1, I64, 1, PLAIN,
     INJ_NONE},
    {"basic-rank", 4, 2, 64, 96, BF, WF, GW_UNIFORM, 0.1, 0, 1, RM, 1, I64, 1, PLAIN,
     INJ_NONE},
    {"align16", 4, 3, 64, 80, BF, WF, GW_UNIFORM, 0.2, 0, 1, EM, 16, I64, 1, PLAIN,
     INJ_NONE},
    {"k1-identity", 4, 1, 128, 100, BF, WF, GW_UNIFORM, 0.0, 0, 0, EM, 1, I64, 0, PLAIN,
     INJ_NONE},
    {"k1-identity-rank", 4, 1, 128, 100, F16, WF, GW_UNIFORM, 0.0, 0, 0, RM, 1, I64, 0,
     PLAIN, INJ_NONE},
    {"k8-fp16-wire-dtype", 8, 8, 96, 64, F16, WD, GW_UNIFORM, 0.1, 0, 1, EM, 1, I64, 1,
     PLAIN, INJ_NONE},
    {"k8-bf16-wire-dtype-a4", 8, 8, 64, 64, BF, WD, GW_UNIFORM, 0.1, 0, 1, EM, 4, I64, 1,
     PLAIN, INJ_NONE},
    {"k32-fp32-int32", 16, 32, 36, 40, F32, WF, GW_UNIFORM, 0.2, 0, 1, EM, 1, I32, 1,
     PLAIN, INJ_NONE},
    {"k32-fp32-rank", 16, 32, 36, 40, F32, WD, GW_UNIFORM, 0.2, 0, 1, RM, 1, I64, 1,
     PLAIN, INJ_NONE},
    {"zipf-unweighted-combine", 8, 8, 64, 128, BF, WF, GW_ZIPF, 0.0, 0, 1, EM, 1, I64, 0,
     PLAIN, INJ_NONE},
    {"zipf-rank", 8, 8, 64, 128, BF, WF, GW_ZIPF, 0.0, 0, 1, RM, 1, I64, 1, PLAIN,
     INJ_NONE},
    {"one-expert", 4, 4, 64, 64, BF, WF, GW_ONE_EXPERT, 0.0, 0, 1, EM, 1, I64, 1, PLAIN,
     INJ_NONE},
    {"one-expert-rank", 4, 4, 64, 64, BF, WF, GW_ONE_EXPERT, 0.0, 0, 1, RM, 1, I64, 1,
     PLAIN, INJ_NONE},
    {"zero-tokens-odd", 4, 2, 64, 50, BF, WF, GW_UNIFORM, 0.1, 1, 1, EM, 8, I64, 1, PLAIN,
     INJ_NONE},
    {"zero-tokens-all", 4, 2, 64, 50, BF, WF, GW_UNIFORM, 0.1, 2, 1, EM, 1, I64, 1, PLAIN,
     INJ_NONE},
    {"zero-tokens-all-rank", 4, 2, 64, 50, BF, WF, GW_UNIFORM, 0.1, 2, 1, RM, 1, I64, 1,
     PLAIN, INJ_NONE},
    {"repeat20", 4, 4, 64, 70, BF, WF, GW_UNIFORM, 0.2, 0, 1, EM, 1, I64, 1, REPEAT,
     INJ_NONE},
    {"repeat20-rank-a16", 4, 4, 64, 70, F16, WD, GW_ZIPF, 0.2, 0, 1, RM, 16, I64, 1,
     REPEAT, INJ_NONE},
    {"layout-reuse", 4, 4, 64, 64, BF, WF, GW_UNIFORM, 0.1, 0, 1, EM, 16, I64, 1, LAYOUT,
     INJ_NONE},
    {"layout-reuse-rank", 4, 4, 64, 64, BF, WF, GW_UNIFORM, 0.1, 0, 1, RM, 1, I64, 1,
     LAYOUT, INJ_NONE},
    {"redispatch", 4, 4, 64, 64, BF, WD, GW_UNIFORM, 0.1, 0, 1, EM, 1, I32, 1, REDISPATCH,
     INJ_NONE},
    {"capacity", 4, 4, 64, 64, BF, WF, GW_UNIFORM, 0.1, 0, 1, EM, 1, I64, 1, PLAIN,
     INJ_CAPACITY},
    {"capacity-rank", 4, 4, 64, 64, BF, WF, GW_UNIFORM, 0.1, 0, 1, RM, 1, I64, 1, PLAIN,
     INJ_CAPACITY},
    {"bad-id", 4, 4, 64, 64, BF, WF, GW_UNIFORM, 0.1, 0, 1, EM, 1, I64, 1, PLAIN,
     INJ_BAD_ID},
    {"dup-id", 4, 4, 64, 64, BF, WF, GW_UNIFORM, 0.1, 0, 1, RM, 1, I32, 1, PLAIN,
     INJ_DUP},
    {"host-error", 4, 4, 64, 64, BF, WF, GW_UNIFORM, 0.1, 0, 1, EM, 1, I64, 1, PLAIN,
     INJ_HOST},
    {"mixed-layouts", 8, 8, 64, 96, BF, WD, GW_ZIPF, 0.1, 0, 1, EM, 4, I64, 1, PLAIN,
     INJ_NONE},
    {"mixed-layouts-reuse", 4, 3, 64, 80, F16, WF, GW_UNIFORM, 0.1, 1, 1, EM, 1, I32, 1,
     LAYOUT, INJ_NONE},
    {"mixed-layouts-reuse-t0", 4, 3, 64, 80, F16, WF, GW_UNIFORM, 0.1, 0, 1, EM, 1, I32,
     1, LAYOUT, INJ_NONE},
    {"mixed-layouts-zero-odd", 4, 3, 64, 80, F16, WF, GW_UNIFORM, 0.1, 1, 1, EM, 1, I32,
     1, PLAIN, INJ_NONE},
    {"layout-reuse-zero-odd", 4, 3, 64, 80, F16, WF, GW_UNIFORM, 0.1, 1, 1, EM, 1, I32, 1,
     LAYOUT, INJ_NONE},
    {"layout-reuse-zero-odd-rank", 4, 3, 64, 80, F16, WF, GW_UNIFORM, 0.1, 1, 1, RM, 1,
     I32, 1, LAYOUT, INJ_NONE},
    {"big-h7168-k8", 32, 8, 7168, 256, BF, WF, GW_UNIFORM, 0.0, 0, 1, EM, 1, I64, 1,
     PLAIN, INJ_NONE},
    {"big-h7168-k8-wire-dtype", 32, 8, 7168, 256, BF, WD, GW_ZIPF, 0.0, 0, 1, EM, 16, I64,
     1, PLAIN, INJ_NONE},
    {"big-h4096-rank", 32, 6, 4096, 192, BF, WF, GW_UNIFORM, 0.0, 0, 1, RM, 1, I64, 1,
     PLAIN, INJ_NONE},
};

/* A case named "mixed..." has odd ranks receive RANK_MAJOR (ranks choose
 * their layout per call; what crosses a link must not depend on it). */
static disco_layout_t layout_of(const tcase_t *c, int r) {
  return strncmp(c->name, "mixed", 5) == 0 && (r & 1) ? RM : c->layout;
}

typedef struct tctx {
  const tcase_t *c;
  gw_world_t *gw;
  disco_config_t cfg;
  gw_inputs_t in;
  const void *ys[64];
  int failures;
  int small;
  int short_rows; /* combine_errors: rank W-1 received rows (y_rows - 1 >= 0) */
  pthread_mutex_t mu;
} tctx_t;

static void fail(tctx_t *x, int r, const char *fmt, const char *a, long long b,
                 long long c) {
  pthread_mutex_lock(&x->mu);
  printf("FAIL [%s W=%d %s] rank %d: ", x->c->name, x->gw->world, g_backend, r);
  printf(fmt, a, b, c);
  printf("\n");
  x->failures++;
  pthread_mutex_unlock(&x->mu);
}

#define CUDA(call)                                                               \
  do {                                                                           \
    cudaError_t e_ = (call);                                                     \
    if (e_ != cudaSuccess) fail(x, r, "%s: %lld %lld", #call, (long long)e_, 0); \
  } while (0)

/* Bit-exact comparison of n elements of es bytes; reports the first diff. */
static void cmp(tctx_t *x, int r, const char *what, const void *dev, const void *exp,
                int64_t n, size_t es) {
  if (n <= 0) return;
  unsigned char *got = malloc((size_t)n * es);
  if (got == NULL) return;
  if (cudaMemcpy(got, dev, (size_t)n * es, cudaMemcpyDeviceToHost) != cudaSuccess) {
    fail(x, r, "%s: cudaMemcpy failed %lld %lld", what, 0, 0);
  } else if (memcmp(got, exp, (size_t)n * es) != 0) {
    int64_t i = 0;
    while (memcmp(got + i * es, (const unsigned char *)exp + i * es, es) == 0) i++;
    int64_t bad = 0;
    for (int64_t k = 0; k < n; k++)
      bad += memcmp(got + k * es, (const unsigned char *)exp + k * es, es) != 0;
    fail(x, r, "%s differs: first element %lld, %lld elements wrong", what, (long long)i,
         (long long)bad);
  }
  free(got);
}

/* Checks that n bytes at dev still hold the poison byte. */
static void untouched(tctx_t *x, int r, const char *what, const void *dev, size_t n) {
  unsigned char buf[4096];
  if (n > sizeof(buf)) n = sizeof(buf);
  if (n == 0 || cudaMemcpy(buf, dev, n, cudaMemcpyDeviceToHost) != cudaSuccess) return;
  for (size_t i = 0; i < n; i++)
    if (buf[i] != 0xA5) {
      fail(x, r, "%s written by a failed dispatch (byte %lld) %lld", what, (long long)i,
           0);
      return;
    }
}

/* Outcome of a collective call that returned rc, with its message in msg.
 * nccl_device returns DISCO_SUCCESS once the call is enqueued; its errors
 * found on the device (bad ids, CAPACITY, REMOTE, TIMEOUT) come from
 * disco_comm_check, which waits for the call. An error the call returned
 * itself (found on the host) must not come back from the check as well. */
static disco_result_t outcome(tctx_t *x, int r, disco_comm_t *comm, disco_result_t rc,
                              char *msg, size_t n) {
  snprintf(msg, n, "%s", disco_last_error());
  if (!g_nd) return rc;
  if (rc == DISCO_SUCCESS) {
    rc = disco_comm_check(comm, 1);
    snprintf(msg, n, "%s", disco_last_error());
  } else if (rc != DISCO_ERR_TIMEOUT) { /* TIMEOUT is sticky: it does come back */
    disco_result_t again = disco_comm_check(comm, 1);
    if (again != DISCO_SUCCESS)
      fail(x, r,
           "disco_comm_check after a call that failed on the host: %s (%lld), "
           "the call returned %lld",
           disco_last_error(), again, rc);
  }
  return rc;
}

typedef struct dbuf {
  void *x, *idx, *w, *rx, *y, *out;
  int32_t *sr, *st, *ex, *nto, *nfrom, *tpe;
  float *wt;
  int64_t *nrows;
} dbuf_t;

static void rank_body(int r, void *arg) {
  tctx_t *x = arg;
  const tcase_t *c = x->c;
  const disco_config_t *cfg = &x->cfg;
  const int W = x->gw->world, K = c->K, L = c->e_loc;
  const int64_t H = c->H, M = cfg->max_tokens;
  const size_t es = disco_dtype_size(c->dtype), rb = (size_t)H * es;
  const int64_t cap_max =
      (int64_t)W * M * (K < L ? K : L) + (int64_t)L * (c->align - 1) + 8;
  const int rounds = c->mode == REPEAT ? 20 : c->inject != INJ_NONE ? 2 : 1;
  disco_comm_t *comm = NULL;
  disco_handle_t *h = NULL;
  cudaStream_t stream = NULL;
  dbuf_t d;
  memset(&d, 0, sizeof(d));
  CUDA(cudaStreamCreate(&stream));
  char msg[1024];
  disco_result_t rc = g_nd_create
                          ? disco_comm_create_nccl_device(x->gw->nccl[r], cfg, &comm)
                          : disco_comm_create_nccl(x->gw->nccl[r], cfg, &comm);
  if (rc != DISCO_SUCCESS) fail(x, r, "create: %s %lld %lld", disco_last_error(), rc, 0);
  if (comm != NULL) {
    const uint32_t caps = disco_comm_caps(comm),
                   both = DISCO_CAP_NO_HOST_SYNC | DISCO_CAP_GRAPH;
    if (strcmp(disco_comm_backend(comm), g_backend) != 0)
      fail(x, r, "backend name '%s' %lld %lld", disco_comm_backend(comm), 0, 0);
    if (g_hybrid ? caps != 0u
        : g_nd   ? (caps & both) != both
                 : (caps & DISCO_CAP_NO_HOST_SYNC) != 0)
      fail(x, r, "disco_comm_caps = %s0x%llx %lld", "", (long long)caps, 0);
  }
  if (comm && disco_handle_create(comm, &h) != DISCO_SUCCESS)
    fail(x, r, "handle: %s %lld %lld", disco_last_error(), 0, 0);
  CUDA(cudaMalloc(&d.x, (size_t)M * rb + 16));
  CUDA(cudaMalloc(&d.idx, (size_t)M * K * 8 + 16));
  CUDA(cudaMalloc(&d.w, (size_t)M * K * 4 + 16));
  CUDA(cudaMalloc(&d.rx, (size_t)cap_max * rb));
  CUDA(cudaMalloc(&d.y, (size_t)cap_max * rb));
  CUDA(cudaMalloc(&d.out, (size_t)M * rb + 16));
  CUDA(cudaMalloc((void **)&d.sr, (size_t)cap_max * 4));
  CUDA(cudaMalloc((void **)&d.st, (size_t)cap_max * 4));
  CUDA(cudaMalloc((void **)&d.ex, (size_t)cap_max * K * 4));
  CUDA(cudaMalloc((void **)&d.wt, (size_t)cap_max * K * 4));
  CUDA(cudaMalloc((void **)&d.nto, (size_t)W * 4));
  CUDA(cudaMalloc((void **)&d.nfrom, (size_t)W * 4));
  CUDA(cudaMalloc((void **)&d.tpe, (size_t)L * 4));
  CUDA(cudaMalloc((void **)&d.nrows, 8));
  for (int it = 0; it < rounds && h != NULL; it++) {
    const int inject = it == 0 ? c->inject : INJ_NONE;
    pthread_barrier_wait(&x->gw->barrier);
    if (r == 0) {
      int64_t T[64];
      uint64_t s = 12345u + (uint64_t)it * 77u + (uint64_t)(c - cases) * 1000u;
      for (int q = 0; q < W; q++) {
        T[q] = c->mode == REPEAT ? (int64_t)(gw_rand(&s) % (uint64_t)(M + 1))
                                 : M - (q * 7) % (M / 2 + 1);
        if (c->tmode == 1 && q % 2 == 1) T[q] = 0;
        if (c->tmode == 2) T[q] = 0;
      }
      gw_route_t route = c->mode == REPEAT ? (gw_route_t)(it % 3) : c->route;
      if (gw_inputs_make(&x->in, cfg, W, T, route, c->holes, c->weighted, s) != 0)
        fail(x, r, "inputs: out of memory%s %lld %lld", "", 0, 0);
    }
    pthread_barrier_wait(&x->gw->barrier);
    const int64_t T = x->in.T[r];
    disco_ref_output_t ref;
    memset(&ref, 0, sizeof(ref));
    if (disco_ref_dispatch(cfg, W, r, x->in.in, layout_of(c, r), c->align, &ref) != 0)
      fail(x, r, "disco_ref_dispatch failed%s %lld %lld", "", 0, 0);
    /* Upload (with injected errors on this rank's copy). */
    int64_t *idx = malloc((size_t)(T > 0 ? T : 1) * K * 8);
    int32_t *idx32 = malloc((size_t)(T > 0 ? T : 1) * K * 4);
    memcpy(idx, x->in.idx[r], (size_t)T * K * 8);
    memcpy(idx32, x->in.idx32[r], (size_t)T * K * 4);
    disco_result_t want = DISCO_SUCCESS;
    int all_ok = inject == INJ_NONE || inject == INJ_CAPACITY;
    if (inject == INJ_HOST) want = r == 0 ? DISCO_ERR_MISALIGNED : DISCO_ERR_REMOTE;
    if (inject == INJ_BAD_ID || inject == INJ_DUP) {
      int bad_rank = inject == INJ_BAD_ID ? W - 1 : 0;
      want = DISCO_ERR_REMOTE;
      if (r == bad_rank && x->in.T[bad_rank] < 4)
        fail(x, r, "%s: too few tokens %lld %lld", c->name, 0, 0);
      if (r == bad_rank) {
        int64_t t = 3 < T ? 3 : T - 1;
        if (inject == INJ_BAD_ID) {
          /* 64-bit ids: one past 32 bits, which the message must name whole
           * (nccl_device's count words carry it in two halves) */
          idx[t * K + (K > 1)] =
              c->itype == I64 ? ((int64_t)1 << 40) + 5 : (int64_t)L * W + 5;
          want = DISCO_ERR_EXPERT_OUT_OF_RANGE;
        } else {
          idx[t * K + 0] = 1;
          idx[t * K + 1] = 1;
          want = DISCO_ERR_DUPLICATE_EXPERT;
        }
        for (int64_t i = 0; i < T * K; i++) idx32[i] = (int32_t)idx[i];
      }
    }
    CUDA(cudaMemcpy(d.x, x->in.x[r], (size_t)T * rb, cudaMemcpyHostToDevice));
    CUDA(cudaMemcpy(d.idx, c->itype == I64 ? (void *)idx : (void *)idx32,
                    (size_t)T * K * (c->itype == I64 ? 8 : 4), cudaMemcpyHostToDevice));
    if (c->weighted)
      CUDA(cudaMemcpy(d.w, x->in.w[r], (size_t)T * K * 4, cudaMemcpyHostToDevice));
    free(idx);
    free(idx32);
    int64_t cap = cap_max;
    if (inject == INJ_CAPACITY && r == 1 % W) {
      cap = ref.num_rows - 1;
      if (cap < 0) fail(x, r, "capacity case receives no rows%s %lld %lld", "", 0, 0);
      want = DISCO_ERR_CAPACITY;
    }
    const int em = layout_of(c, r) == EM;
    const int64_t mr = em ? 1 : K; /* metadata entries per row */
    disco_dispatch_args_t a = DISCO_DISPATCH_ARGS_INIT;
    a.x = inject == INJ_HOST && r == 0 ? (const void *)((const char *)d.x + 2) : d.x;
    a.topk_idx = d.idx;
    a.index_type = c->itype;
    /* A rank with no tokens passes no weights: weighting must still follow
     * each token's own rank (regression for the expert-rank flag). */
    a.topk_weights = c->weighted && T > 0 ? d.w : NULL;
    a.num_tokens = T;
    a.layout = layout_of(c, r);
    a.expert_alignment = c->align;
    a.stream = stream;
    a.recv_capacity = cap;
    a.recv_x = d.rx;
    a.recv_src_rank = d.sr;
    a.recv_src_token = d.st;
    a.recv_expert = d.ex;
    a.recv_weight = d.wt;
    a.n_tokens_to_rank = d.nto;
    a.n_tokens_from_rank = d.nfrom;
    a.tokens_per_expert = d.tpe;
    a.num_recv_rows = d.nrows;
    /* A hybrid comm's dispatch reads counts on the host: capturing one is
     * refused before anything is enqueued, and the comm stays usable (the
     * calls below must still be exact). */
    if (g_hybrid && it == 0 && !strcmp(c->name, "basic")) {
      cudaGraph_t g = NULL;
      CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
      rc = disco_dispatch(comm, h, &a);
      CUDA(cudaStreamEndCapture(stream, &g));
      if (g != NULL) CUDA(cudaGraphDestroy(g));
      if (rc != DISCO_ERR_NOT_SUPPORTED || strstr(disco_last_error(), "rank") == NULL)
        fail(x, r, "captured hybrid dispatch: %s, got %lld, expected %lld",
             disco_last_error(), rc, DISCO_ERR_NOT_SUPPORTED);
    }
    for (int pass = 0; pass < (c->mode == REDISPATCH ? 2 : 1); pass++) {
      CUDA(cudaMemset(d.rx, 0xA5, (size_t)cap_max * rb));
      CUDA(cudaMemset(d.sr, 0xA5, (size_t)cap_max * 4));
      CUDA(cudaMemset(d.st, 0xA5, (size_t)cap_max * 4));
      CUDA(cudaMemset(d.ex, 0xA5, (size_t)cap_max * K * 4));
      CUDA(cudaMemset(d.wt, 0xA5, (size_t)cap_max * K * 4));
      CUDA(cudaMemset(d.nto, 0xA5, (size_t)W * 4));
      CUDA(cudaMemset(d.nfrom, 0xA5, (size_t)W * 4));
      CUDA(cudaMemset(d.tpe, 0xA5, (size_t)L * 4));
      CUDA(cudaMemset(d.nrows, 0xA5, 8));
      CUDA(cudaMemset(d.out, 0xA5, (size_t)M * rb + 16));
      CUDA(cudaDeviceSynchronize());
      a.flags = pass == 1 ? DISCO_DISPATCH_REUSE_LAYOUT : 0u;
      if (c->mode == LAYOUT) {
        int64_t rows = -1;
        rc = disco_dispatch_layout(comm, h, &a, &rows);
        if (rc != DISCO_SUCCESS || rows != ref.num_rows)
          fail(x, r, "dispatch_layout: %s, rows %lld, expected %lld", disco_last_error(),
               (long long)rows, (long long)ref.num_rows);
        a.recv_capacity = rows; /* exact outputs */
        a.flags = DISCO_DISPATCH_REUSE_LAYOUT;
      }
      rc = outcome(x, r, comm, disco_dispatch(comm, h, &a), msg, sizeof(msg));
      CUDA(cudaStreamSynchronize(stream));
      if (rc != want)
        fail(x, r, "dispatch returned %s (%lld), expected %lld", msg, rc, want);
      if (rc == DISCO_SUCCESS) {
        int64_t nrows = -1;
        CUDA(cudaMemcpy(&nrows, d.nrows, 8, cudaMemcpyDeviceToHost));
        if (nrows != ref.num_rows)
          fail(x, r, "num_recv_rows %s%lld, expected %lld", "", (long long)nrows,
               (long long)ref.num_rows);
        cmp(x, r, "recv_x", d.rx, ref.recv_x, ref.num_rows, rb);
        cmp(x, r, "recv_src_rank", d.sr, ref.src_rank, ref.num_rows, 4);
        cmp(x, r, "recv_src_token", d.st, ref.src_token, ref.num_rows, 4);
        cmp(x, r, "recv_expert", d.ex, ref.expert, ref.num_rows * mr, 4);
        cmp(x, r, "recv_weight", d.wt, ref.weight, ref.num_rows * mr, 4);
        cmp(x, r, "n_tokens_to_rank", d.nto, ref.n_tokens_to_rank, W, 4);
        cmp(x, r, "n_tokens_from_rank", d.nfrom, ref.n_tokens_from_rank, W, 4);
        cmp(x, r, "tokens_per_expert", d.tpe, ref.tokens_per_expert, L, 4);
      } else if (rc == want) {
        untouched(x, r, "recv_x", d.rx, (size_t)cap_max * rb);
        untouched(x, r, "recv_src_rank", d.sr, (size_t)cap_max * 4);
        untouched(x, r, "n_tokens_from_rank", d.nfrom, (size_t)W * 4);
        untouched(x, r, "num_recv_rows", d.nrows, 8);
        if (rc != DISCO_SUCCESS && strstr(msg, "rank") == NULL)
          fail(x, r, "error message names no rank: %s %lld %lld", msg, 0, 0);
        if (rc == DISCO_ERR_EXPERT_OUT_OF_RANGE && c->itype == I64 &&
            strstr(msg, "1099511627781") == NULL)
          fail(x, r, "error message does not name the bad id 2^40 + 5: %s %lld %lld", msg,
               0, 0);
      }
    }
    /* Combine, unless this round was meant to fail somewhere. */
    void *y = NULL;
    if (all_ok && inject == INJ_NONE) {
      y = malloc((size_t)(ref.num_rows > 0 ? ref.num_rows : 1) * rb);
      const int identity = K == 1 && !c->weighted;
      if (identity)
        memcpy(y, ref.recv_x, (size_t)ref.num_rows * rb);
      else
        gw_fill(y, ref.num_rows * H, c->dtype, 999u + (uint64_t)r * 31u + (uint64_t)it);
      x->ys[r] = y;
      pthread_barrier_wait(&x->gw->barrier);
      CUDA(cudaMemcpy(d.y, y, (size_t)ref.num_rows * rb, cudaMemcpyHostToDevice));
      disco_combine_args_t ca = DISCO_COMBINE_ARGS_INIT;
      ca.y = d.y;
      ca.y_rows = ref.num_rows;
      ca.out = d.out;
      ca.weighted = c->cweighted;
      ca.stream = stream;
      for (int rep = 0; rep < 2; rep++) { /* a handle combines more than once */
        rc = outcome(x, r, comm, disco_combine(comm, h, &ca), msg, sizeof(msg));
        CUDA(cudaStreamSynchronize(stream));
        if (rc != DISCO_SUCCESS) fail(x, r, "combine: %s %lld %lld", msg, rc, 0);
      }
      void *exp = malloc((size_t)(T > 0 ? T : 1) * rb);
      disco_layout_t layouts[64];
      for (int q = 0; q < W; q++) layouts[q] = layout_of(c, q);
      if (disco_ref_combine_layouts(cfg, W, r, x->in.in, layouts, c->align, x->ys,
                                    c->cweighted, exp) != 0)
        fail(x, r, "disco_ref_combine failed%s %lld %lld", "", 0, 0);
      cmp(x, r, "combine out", d.out, exp, T, rb);
      /* nccl_device only (the nccl backend has no status exchange in combine):
       * a combine error on one rank reaches its peers as REMOTE, nothing is
       * written anywhere, and the comm stays usable. Step 0: rank 0's out is
       * misaligned (found on the host); step 1: rank W-1's y_rows is one short
       * (found on the device). */
      if (g_nd && W > 1 && it == 0 && !strcmp(c->name, "basic")) {
        if (r == W - 1) x->short_rows = ref.num_rows > 0;
        pthread_barrier_wait(&x->gw->barrier);
        for (int step = 0; step < 2; step++) {
          const int bad = step == 0 ? 0 : W - 1;
          disco_combine_args_t eb = ca;
          disco_result_t want_c = DISCO_ERR_REMOTE;
          if (step == 1 && !x->short_rows) break;
          if (r == bad) {
            want_c = step == 0 ? DISCO_ERR_MISALIGNED : DISCO_ERR_CAPACITY;
            if (step == 0)
              eb.out = (char *)d.out + 2;
            else
              eb.y_rows = ref.num_rows - 1;
          }
          CUDA(cudaMemset(d.out, 0xA5, (size_t)M * rb + 16));
          CUDA(cudaDeviceSynchronize());
          rc = outcome(x, r, comm, disco_combine(comm, h, &eb), msg, sizeof(msg));
          CUDA(cudaStreamSynchronize(stream));
          if (rc != want_c)
            fail(x, r, "combine error step %s: got %lld, expected %lld",
                 step == 0 ? "host" : "device", rc, want_c);
          else if (strstr(msg, "rank") == NULL)
            fail(x, r, "combine error message names no rank: %s %lld %lld", msg, 0, 0);
          untouched(x, r, "combine out", d.out, (size_t)T * rb);
          pthread_barrier_wait(&x->gw->barrier);
        }
        rc = outcome(x, r, comm, disco_combine(comm, h, &ca), msg, sizeof(msg));
        CUDA(cudaStreamSynchronize(stream));
        if (rc != DISCO_SUCCESS)
          fail(x, r, "combine after errors: %s %lld %lld", msg, rc, 0);
        cmp(x, r, "combine out after errors", d.out, exp, T, rb);
      }
      if (identity) cmp(x, r, "combine(dispatch(x)) == x", d.out, x->in.x[r], T, rb);
      free(exp);
      pthread_barrier_wait(&x->gw->barrier);
    }
    free(y);
    disco_ref_output_free(&ref);
    pthread_barrier_wait(&x->gw->barrier);
    if (r == 0) gw_inputs_free(&x->in);
  }
  disco_handle_destroy(h);
  disco_comm_destroy(comm);
  cudaFree(d.x);
  cudaFree(d.idx);
  cudaFree(d.w);
  cudaFree(d.rx);
  cudaFree(d.y);
  cudaFree(d.out);
  cudaFree(d.sr);
  cudaFree(d.st);
  cudaFree(d.ex);
  cudaFree(d.wt);
  cudaFree(d.nto);
  cudaFree(d.nfrom);
  cudaFree(d.tpe);
  cudaFree(d.nrows);
  if (stream) cudaStreamDestroy(stream);
}

static int run_world(int world, int small, const char *filter) {
  gw_world_t gw;
  int failures = 0, ran = 0;
  if (gw_world_init(&gw, world) != 0) return 1;
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
    const tcase_t *c = &cases[i];
    if (filter && !strstr(c->name, filter)) continue;
    if (small && c->H > 1024) continue;
    if ((c->inject == INJ_CAPACITY) && world < 2) continue;
    tctx_t x;
    memset(&x, 0, sizeof(x));
    x.c = c;
    x.gw = &gw;
    x.small = small;
    pthread_mutex_init(&x.mu, NULL);
    disco_config_t cfg = DISCO_CONFIG_INIT;
    cfg.num_experts = c->e_loc * world;
    cfg.top_k = c->K;
    cfg.hidden = c->H;
    cfg.max_tokens = small && c->M > 48 ? 48 : c->M;
    cfg.dtype = c->dtype;
    cfg.combine_wire = c->wire;
    cfg.timeout_ms = 20000;
    x.cfg = cfg;
    gw_run(&gw, rank_body, &x);
    printf("%s [W=%d %s] %s\n", x.failures ? "FAIL" : "ok  ", world, g_backend, c->name);
    fflush(stdout);
    failures += x.failures != 0;
    ran++;
    pthread_mutex_destroy(&x.mu);
  }
  gw_world_fini(&gw);
  printf("W=%d %s: %d cases, %d failed\n", world, g_backend, ran, failures);
  return failures;
}

int main(int argc, char **argv) {
  int ngpu = 0, world = 0, small = 0, failures = 0;
  const char *filter = NULL;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--world") && i + 1 < argc)
      world = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--small"))
      small = 1;
    else if (!strcmp(argv[i], "--filter") && i + 1 < argc)
      filter = argv[++i];
    else {
      fprintf(stderr, "usage: %s [--world N] [--small] [--filter SUBSTR]\n", argv[0]);
      return 2;
    }
  }
  const char *be = getenv("DISCO_TEST_BACKEND");
  if (be != NULL && *be != '\0') {
    if (!strcmp(be, "nccl_device")) {
      const char *hp = getenv("DISCO_ND_HOST_PEERS");
      g_nd_create = 1;
      g_nd = 1;
      g_hybrid = hp != NULL && strtoull(hp, NULL, 0) != 0ull;
      g_backend = "nccl_device";
    } else if (strcmp(be, "nccl") != 0) {
      fprintf(stderr, "DISCO_TEST_BACKEND=%s: expected nccl or nccl_device\n", be);
      return 2;
    }
  }
  cudaError_t e = cudaGetDeviceCount(&ngpu);
  if (e != cudaSuccess) ngpu = 0;
  if (ngpu == 0) {
    printf("SKIP: cudaGetDeviceCount reports no device (%s)\n", cudaGetErrorName(e));
    return 0;
  }
  if (ngpu > 64) ngpu = 64;
  printf("test_nccl: backend %s, %d GPU(s)%s%s%s\n", g_backend, ngpu,
         small ? ", --small" : "", filter ? ", --filter " : "", filter ? filter : "");
  if (world > 0) {
    if (world > ngpu) {
      printf("FAIL: --world %d but %d GPUs\n", world, ngpu);
      return 1;
    }
    failures += run_world(world, small, filter);
  } else {
    failures += run_world(ngpu, small, filter);
    if (ngpu > 2) failures += run_world(2, small, filter);
  }
  printf("%s\n", failures ? "FAILED" : "ALL PASSED");
  return failures ? 1 : 0;
}
