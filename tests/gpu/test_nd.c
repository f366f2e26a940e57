/* nccl_device backend tests beyond the bit-exact table of test_nccl.c:
 * - graph: dispatch + an identity "expert" (cudaMemcpyAsync y = recv_x) +
 *   weighted combine captured in one CUDA graph, replayed 10 times with new
 *   routing, x and weights uploaded before each replay (same per-rank T, which
 *   the graph bakes in), every replay compared bit for bit with disco_ref;
 *   then one eager (not captured) round on the same comm. Both layouts.
 * - timeout: config.timeout_ms = 300; rank 1 skips dispatch #3. The others'
 *   disco_comm_check returns DISCO_ERR_TIMEOUT naming rank 1 within 2 s; rank
 *   1's late dispatch times out too; every later dispatch returns TIMEOUT at
 *   once; disco_comm_destroy returns on every rank; the NCCL comms are then
 *   ncclCommAbort()ed.
 * usage: test_nd [--world N] [--filter SUBSTR]
 * Prints SKIP and exits 0 with no GPU (the timeout test is skipped with one).
 * A watchdog ends the run (exit 1, printing where each rank is) when nothing
 * progresses for 60 s. */
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "core/dtype.h"
#include "disco_nccl.h"
#include "gpu_world.h"

#define EM DISCO_LAYOUT_EXPERT_MAJOR
#define RM DISCO_LAYOUT_RANK_MAJOR
#define REPLAYS 10
#define WATCHDOG_S 60

/* ---- progress and watchdog --------------------------------------------------- */

static _Atomic(const char *) g_where[64];
static atomic_llong g_progress_ns;
static atomic_int g_watch_done;

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void at(int r, const char *where) {
  atomic_store(&g_where[r], where);
  atomic_store(&g_progress_ns, (long long)(now_s() * 1e9));
}

static void *watchdog(void *arg) {
  const int world = *(const int *)arg;
  while (!atomic_load(&g_watch_done)) {
    struct timespec ts = {0, 100 * 1000 * 1000};
    nanosleep(&ts, NULL);
    const double idle = now_s() - (double)atomic_load(&g_progress_ns) * 1e-9;
    if (idle > WATCHDOG_S && !atomic_load(&g_watch_done)) {
      printf("FAIL watchdog: no progress for %d s (a hang); ranks at:\n", WATCHDOG_S);
      for (int r = 0; r < world; r++) {
        const char *w = atomic_load(&g_where[r]);
        printf("  rank %d: %s\n", r, w ? w : "-");
      }
      printf("FAILED\n");
      fflush(stdout);
      _exit(1);
    }
  }
  return NULL;
}

/* ---- shared test context ------------------------------------------------------ */

typedef struct nctx {
  const char *name;
  gw_world_t *gw;
  disco_config_t cfg;
  disco_layout_t layout;
  uint32_t flags; /* dispatch flags (mode bits) */
  int64_t T[64];
  gw_inputs_t in;
  const void *ys[64];
  int failures;
  atomic_int broken; /* a rank cannot go on: every rank skips to cleanup */
  pthread_mutex_t mu;
} nctx_t;

static void fail(nctx_t *x, int r, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void fail(nctx_t *x, int r, const char *fmt, ...) {
  va_list ap;
  pthread_mutex_lock(&x->mu);
  printf("FAIL [%s W=%d nccl_device] rank %d: ", x->name, x->gw->world, r);
  va_start(ap, fmt);
  vprintf(fmt, ap);
  va_end(ap);
  printf("\n");
  fflush(stdout);
  x->failures++;
  pthread_mutex_unlock(&x->mu);
}

#define CUDA(call)                                         \
  do {                                                     \
    cudaError_t e_ = (call);                               \
    if (e_ != cudaSuccess) {                               \
      fail(x, r, "%s: %s", #call, cudaGetErrorString(e_)); \
      atomic_store(&x->broken, 1);                         \
    }                                                      \
  } while (0)

/* Every rank reads the same value: writes happen outside the two barriers. */
static int sync_broken(nctx_t *x) {
  pthread_barrier_wait(&x->gw->barrier);
  const int b = atomic_load(&x->broken);
  pthread_barrier_wait(&x->gw->barrier);
  return b;
}

/* Bit-exact comparison of n elements of es bytes; reports the first diff. */
static void cmp(nctx_t *x, int r, const char *round, const char *what, const void *dev,
                const void *exp, int64_t n, size_t es) {
  if (n <= 0) return;
  unsigned char *got = malloc((size_t)n * es);
  if (got == NULL) return;
  cudaError_t e = cudaMemcpy(got, dev, (size_t)n * es, cudaMemcpyDeviceToHost);
  if (e != cudaSuccess) {
    fail(x, r, "%s: %s: cudaMemcpy: %s", round, what, cudaGetErrorString(e));
  } else if (memcmp(got, exp, (size_t)n * es) != 0) {
    int64_t i = 0, bad = 0;
    while (memcmp(got + i * es, (const unsigned char *)exp + i * es, es) == 0) i++;
    for (int64_t k = 0; k < n; k++)
      bad += memcmp(got + k * es, (const unsigned char *)exp + k * es, es) != 0;
    fail(x, r, "%s: %s differs: first element %lld, %lld of %lld wrong", round, what,
         (long long)i, (long long)bad, (long long)n);
  }
  free(got);
}

/* msg names "rank <rank>" (not a longer number starting with it). */
static int names_rank(const char *msg, int rank) {
  char pat[32];
  snprintf(pat, sizeof(pat), "rank %d", rank);
  for (const char *p = strstr(msg, pat); p != NULL; p = strstr(p + 1, pat)) {
    const char c = p[strlen(pat)];
    if (c < '0' || c > '9') return 1;
  }
  return 0;
}

typedef struct dbuf {
  void *x, *idx, *w, *rx, *y, *out;
  int32_t *sr, *st, *ex, *nto, *nfrom, *tpe;
  float *wt;
  int64_t *nrows;
} dbuf_t;

static void dbuf_alloc(nctx_t *x, int r, dbuf_t *d, int64_t cap) {
  const disco_config_t *cfg = &x->cfg;
  const int W = x->gw->world, K = cfg->top_k, L = cfg->num_experts / W;
  const int64_t M = cfg->max_tokens, c = cap > 0 ? cap : 1;
  const size_t rb = (size_t)cfg->hidden * disco_dtype_size(cfg->dtype);
  memset(d, 0, sizeof(*d));
  CUDA(cudaMalloc(&d->x, (size_t)M * rb + 16));
  CUDA(cudaMalloc(&d->idx, (size_t)M * K * 8 + 16));
  CUDA(cudaMalloc(&d->w, (size_t)M * K * 4 + 16));
  CUDA(cudaMalloc(&d->rx, (size_t)c * rb));
  CUDA(cudaMalloc(&d->y, (size_t)c * rb));
  CUDA(cudaMalloc(&d->out, (size_t)M * rb + 16));
  CUDA(cudaMalloc((void **)&d->sr, (size_t)c * 4));
  CUDA(cudaMalloc((void **)&d->st, (size_t)c * 4));
  CUDA(cudaMalloc((void **)&d->ex, (size_t)c * K * 4));
  CUDA(cudaMalloc((void **)&d->wt, (size_t)c * K * 4));
  CUDA(cudaMalloc((void **)&d->nto, (size_t)W * 4));
  CUDA(cudaMalloc((void **)&d->nfrom, (size_t)W * 4));
  CUDA(cudaMalloc((void **)&d->tpe, (size_t)L * 4));
  CUDA(cudaMalloc((void **)&d->nrows, 8));
}

static void dbuf_free(dbuf_t *d) {
  void *p[] = {d->x,  d->idx, d->w,  d->rx,    d->y,   d->out, d->sr,
               d->st, d->ex,  d->wt, d->nfrom, d->nto, d->tpe, d->nrows};
  for (size_t i = 0; i < sizeof(p) / sizeof(p[0]); i++) cudaFree(p[i]);
  memset(d, 0, sizeof(*d));
}

static void args_fill(nctx_t *x, int r, dbuf_t *d, cudaStream_t stream, int64_t cap,
                      disco_dispatch_args_t *a, disco_combine_args_t *ca) {
  *a = (disco_dispatch_args_t)DISCO_DISPATCH_ARGS_INIT;
  a->x = d->x;
  a->topk_idx = d->idx;
  a->index_type = DISCO_INDEX_INT64;
  a->topk_weights = d->w;
  a->num_tokens = x->T[r];
  a->layout = x->layout;
  a->expert_alignment = 1;
  a->flags = x->flags;
  a->stream = stream;
  a->recv_capacity = cap;
  a->recv_x = d->rx;
  a->recv_src_rank = d->sr;
  a->recv_src_token = d->st;
  a->recv_expert = d->ex;
  a->recv_weight = d->wt;
  a->n_tokens_to_rank = d->nto;
  a->n_tokens_from_rank = d->nfrom;
  a->tokens_per_expert = d->tpe;
  a->num_recv_rows = d->nrows;
  *ca = (disco_combine_args_t)DISCO_COMBINE_ARGS_INIT;
  ca->y = d->y;
  ca->y_rows = cap;
  ca->out = d->out;
  ca->weighted = 1;
  ca->stream = stream;
}

/* Uploads this rank's inputs of x->in and poisons every output (0xFF: NaN in
 * every dtype) so that a replay that leaves a row alone is noticed. */
static void upload(nctx_t *x, int r, dbuf_t *d, int64_t cap) {
  const disco_config_t *cfg = &x->cfg;
  const int W = x->gw->world, K = cfg->top_k, L = cfg->num_experts / W;
  const int64_t T = x->T[r], M = cfg->max_tokens, c = cap > 0 ? cap : 1;
  const size_t rb = (size_t)cfg->hidden * disco_dtype_size(cfg->dtype);
  CUDA(cudaMemcpy(d->x, x->in.x[r], (size_t)T * rb, cudaMemcpyHostToDevice));
  CUDA(cudaMemcpy(d->idx, x->in.idx[r], (size_t)T * K * 8, cudaMemcpyHostToDevice));
  CUDA(cudaMemcpy(d->w, x->in.w[r], (size_t)T * K * 4, cudaMemcpyHostToDevice));
  CUDA(cudaMemset(d->rx, 0xFF, (size_t)c * rb));
  CUDA(cudaMemset(d->y, 0xFF, (size_t)c * rb));
  CUDA(cudaMemset(d->out, 0xFF, (size_t)M * rb + 16));
  CUDA(cudaMemset(d->sr, 0xFF, (size_t)c * 4));
  CUDA(cudaMemset(d->st, 0xFF, (size_t)c * 4));
  CUDA(cudaMemset(d->ex, 0xFF, (size_t)c * K * 4));
  CUDA(cudaMemset(d->wt, 0xFF, (size_t)c * K * 4));
  CUDA(cudaMemset(d->nto, 0xFF, (size_t)W * 4));
  CUDA(cudaMemset(d->nfrom, 0xFF, (size_t)W * 4));
  CUDA(cudaMemset(d->tpe, 0xFF, (size_t)L * 4));
  CUDA(cudaMemset(d->nrows, 0xFF, 8));
  CUDA(cudaDeviceSynchronize());
}

/* ---- graph ----------------------------------------------------------------------- */

/* Rank 0 makes round `round`'s inputs for every rank (same T each round).
 * Returns sync_broken(). */
static int make_round(nctx_t *x, int r, int round, uint64_t seed) {
  pthread_barrier_wait(&x->gw->barrier);
  if (r == 0) {
    gw_inputs_free(&x->in);
    const gw_route_t route = (gw_route_t)(round % 3); /* uniform, zipf, one expert */
    if (gw_inputs_make(&x->in, &x->cfg, x->gw->world, x->T, route, 0.1, 1, seed) != 0) {
      fail(x, r, "gw_inputs_make: out of memory");
      atomic_store(&x->broken, 1);
    }
  }
  return sync_broken(x);
}

/* Compares this rank's outputs of the round just run with disco_ref. */
static void check_round(nctx_t *x, int r, const char *round, dbuf_t *d) {
  const disco_config_t *cfg = &x->cfg;
  const int W = x->gw->world, K = cfg->top_k, L = cfg->num_experts / W;
  const int64_t T = x->T[r], mr = x->layout == EM ? 1 : K;
  const size_t rb = (size_t)cfg->hidden * disco_dtype_size(cfg->dtype);
  disco_ref_output_t ref;
  memset(&ref, 0, sizeof(ref));
  if (disco_ref_dispatch(cfg, W, r, x->in.in, x->layout, 1, &ref) != 0)
    fail(x, r, "%s: disco_ref_dispatch failed", round);
  int64_t nrows = -1;
  cudaError_t e = cudaMemcpy(&nrows, d->nrows, 8, cudaMemcpyDeviceToHost);
  if (e != cudaSuccess || nrows != ref.num_rows)
    fail(x, r, "%s: num_recv_rows %lld, expected %lld (%s)", round, (long long)nrows,
         (long long)ref.num_rows, cudaGetErrorString(e));
  cmp(x, r, round, "recv_x", d->rx, ref.recv_x, ref.num_rows, rb);
  cmp(x, r, round, "recv_src_rank", d->sr, ref.src_rank, ref.num_rows, 4);
  cmp(x, r, round, "recv_src_token", d->st, ref.src_token, ref.num_rows, 4);
  cmp(x, r, round, "recv_expert", d->ex, ref.expert, ref.num_rows * mr, 4);
  cmp(x, r, round, "recv_weight", d->wt, ref.weight, ref.num_rows * mr, 4);
  cmp(x, r, round, "n_tokens_to_rank", d->nto, ref.n_tokens_to_rank, W, 4);
  cmp(x, r, round, "n_tokens_from_rank", d->nfrom, ref.n_tokens_from_rank, W, 4);
  cmp(x, r, round, "tokens_per_expert", d->tpe, ref.tokens_per_expert, L, 4);
  /* identity expert: every rank's y is its reference recv_x */
  x->ys[r] = ref.recv_x;
  pthread_barrier_wait(&x->gw->barrier);
  void *exp = malloc((size_t)(T > 0 ? T : 1) * rb);
  if (exp == NULL ||
      disco_ref_combine(cfg, W, r, x->in.in, x->layout, 1, x->ys, 1, exp) != 0)
    fail(x, r, "%s: disco_ref_combine failed", round);
  else
    cmp(x, r, round, "combine out", d->out, exp, T, rb);
  free(exp);
  pthread_barrier_wait(&x->gw->barrier); /* peers done with ys[r] */
  disco_ref_output_free(&ref);
}

static void graph_rank(int r, void *arg) {
  nctx_t *x = arg;
  const disco_config_t *cfg = &x->cfg;
  const size_t rb = (size_t)cfg->hidden * disco_dtype_size(cfg->dtype);
  cudaStream_t stream = NULL;
  cudaGraph_t graph = NULL;
  cudaGraphExec_t exec = NULL;
  disco_comm_t *comm = NULL;
  disco_handle_t *h = NULL;
  int64_t cap = 0;
  dbuf_t d;
  disco_dispatch_args_t a;
  disco_combine_args_t ca;
  disco_result_t rc;
  char round[64];
  memset(&d, 0, sizeof(d));

  at(r, "graph: create");
  CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  rc = disco_comm_create_nccl_device(x->gw->nccl[r], cfg, &comm);
  if (rc != DISCO_SUCCESS) {
    fail(x, r, "disco_comm_create_nccl_device: %s: %s", disco_result_name(rc),
         disco_last_error());
    atomic_store(&x->broken, 1);
  } else {
    const uint32_t caps = disco_comm_caps(comm);
    if ((caps & DISCO_CAP_GRAPH) == 0 || (caps & DISCO_CAP_NO_HOST_SYNC) == 0)
      fail(x, r, "disco_comm_caps = 0x%x, expected NO_HOST_SYNC|GRAPH", caps);
    if (strcmp(disco_comm_backend(comm), "nccl_device") != 0)
      fail(x, r, "backend '%s'", disco_comm_backend(comm));
    rc = disco_comm_max_recv_rows(comm, x->layout, 1, &cap);
    if (rc != DISCO_SUCCESS) {
      fail(x, r, "disco_comm_max_recv_rows: %s", disco_last_error());
      atomic_store(&x->broken, 1);
    }
    rc = disco_handle_create(comm, &h);
    if (rc != DISCO_SUCCESS) {
      fail(x, r, "disco_handle_create: %s", disco_last_error());
      atomic_store(&x->broken, 1);
    }
  }
  dbuf_alloc(x, r, &d, cap);
  args_fill(x, r, &d, stream, cap, &a, &ca);
  if (sync_broken(x)) goto out;

  /* Capture dispatch + identity expert + combine (no data needed yet). */
  at(r, "graph: capture");
  {
    cudaError_t e = cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal);
    if (e != cudaSuccess) {
      fail(x, r, "cudaStreamBeginCapture: %s", cudaGetErrorString(e));
      atomic_store(&x->broken, 1);
    } else {
      disco_result_t rd = disco_dispatch(comm, h, &a);
      if (rd != DISCO_SUCCESS)
        fail(x, r, "disco_dispatch during capture: %s: %s", disco_result_name(rd),
             disco_last_error());
      cudaError_t ec =
          cudaMemcpyAsync(d.y, d.rx, (size_t)cap * rb, cudaMemcpyDeviceToDevice, stream);
      if (ec != cudaSuccess)
        fail(x, r, "cudaMemcpyAsync during capture: %s", cudaGetErrorString(ec));
      disco_result_t rcb = rd == DISCO_SUCCESS ? disco_combine(comm, h, &ca) : rd;
      if (rd == DISCO_SUCCESS && rcb != DISCO_SUCCESS)
        fail(x, r, "disco_combine during capture: %s: %s", disco_result_name(rcb),
             disco_last_error());
      e = cudaStreamEndCapture(stream, &graph);
      if (e != cudaSuccess) fail(x, r, "cudaStreamEndCapture: %s", cudaGetErrorString(e));
      if (e == cudaSuccess && rd == DISCO_SUCCESS && rcb == DISCO_SUCCESS &&
          ec == cudaSuccess) {
        e = cudaGraphInstantiate(&exec, graph, 0);
        if (e != cudaSuccess)
          fail(x, r, "cudaGraphInstantiate: %s", cudaGetErrorString(e));
      }
      if (e != cudaSuccess || rd != DISCO_SUCCESS || rcb != DISCO_SUCCESS ||
          ec != cudaSuccess) {
        (void)cudaGetLastError();
        atomic_store(&x->broken, 1);
      }
    }
    rc = disco_comm_check(comm, 0);
    if (rc != DISCO_SUCCESS) {
      fail(x, r, "disco_comm_check after capture: %s: %s", disco_result_name(rc),
           disco_last_error());
      atomic_store(&x->broken, 1);
    }
  }
  if (sync_broken(x)) goto out;

  /* REPLAYS graph rounds, then one eager round on the same comm and handle. */
  for (int it = 0; it <= REPLAYS; it++) {
    const int eager = it == REPLAYS;
    snprintf(round, sizeof(round), eager ? "eager round after %d replays" : "replay %d",
             eager ? REPLAYS : it);
    at(r, eager ? "graph: eager round" : "graph: replay");
    if (make_round(x, r, it, 4242u + (uint64_t)it * 101u + (uint64_t)x->layout * 7u))
      break;
    upload(x, r, &d, cap);
    pthread_barrier_wait(&x->gw->barrier); /* every rank's inputs are in place */
    if (!eager) {
      CUDA(cudaGraphLaunch(exec, stream));
      CUDA(cudaStreamSynchronize(stream));
      rc = disco_comm_check(comm, 0);
    } else {
      rc = disco_dispatch(comm, h, &a);
      if (rc == DISCO_SUCCESS) rc = disco_comm_check(comm, 1);
      if (rc == DISCO_SUCCESS) {
        CUDA(cudaMemcpyAsync(d.y, d.rx, (size_t)cap * rb, cudaMemcpyDeviceToDevice,
                             stream));
        rc = disco_combine(comm, h, &ca);
        if (rc == DISCO_SUCCESS) rc = disco_comm_check(comm, 1);
      }
      CUDA(cudaStreamSynchronize(stream));
    }
    if (rc != DISCO_SUCCESS) {
      fail(x, r, "%s: %s: %s", round, disco_result_name(rc), disco_last_error());
      if (rc == DISCO_ERR_TIMEOUT) atomic_store(&x->broken, 1);
    }
    at(r, "graph: check round");
    check_round(x, r, round, &d);
    if (sync_broken(x)) break;
  }

out:
  at(r, "graph: destroy");
  if (exec) cudaGraphExecDestroy(exec);
  if (graph) cudaGraphDestroy(graph);
  disco_handle_destroy(h);
  disco_comm_destroy(comm);
  dbuf_free(&d);
  if (stream) cudaStreamDestroy(stream);
  at(r, "graph: done");
}

/* ---- timeout ------------------------------------------------------------------- */

/* One collective step whose errors come from disco_comm_check. */
static disco_result_t step(disco_comm_t *comm, disco_result_t rc) {
  return rc == DISCO_SUCCESS ? disco_comm_check(comm, 1) : rc;
}

static void timeout_rank(int r, void *arg) {
  nctx_t *x = arg;
  const disco_config_t *cfg = &x->cfg;
  cudaStream_t stream = NULL;
  disco_comm_t *comm = NULL;
  disco_handle_t *h = NULL;
  int64_t cap = 0;
  dbuf_t d;
  disco_dispatch_args_t a;
  disco_combine_args_t ca;
  disco_result_t rc;
  double t0, dt;
  memset(&d, 0, sizeof(d));

  at(r, "timeout: create");
  CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  rc = disco_comm_create_nccl_device(x->gw->nccl[r], cfg, &comm);
  if (rc != DISCO_SUCCESS) {
    fail(x, r, "disco_comm_create_nccl_device: %s: %s", disco_result_name(rc),
         disco_last_error());
    atomic_store(&x->broken, 1);
  } else {
    if (disco_comm_max_recv_rows(comm, x->layout, 1, &cap) != DISCO_SUCCESS ||
        disco_handle_create(comm, &h) != DISCO_SUCCESS) {
      fail(x, r, "setup: %s", disco_last_error());
      atomic_store(&x->broken, 1);
    }
  }
  dbuf_alloc(x, r, &d, cap);
  args_fill(x, r, &d, stream, cap, &a, &ca);
  ca.y = d.rx; /* identity expert, no copy needed here */
  if (sync_broken(x)) goto out;
  upload(x, r, &d, cap);

  /* Calls #1 and #2: normal rounds. */
  for (int it = 1; it <= 2; it++) {
    at(r, "timeout: normal dispatch");
    rc = step(comm, disco_dispatch(comm, h, &a));
    if (rc != DISCO_SUCCESS) {
      fail(x, r, "dispatch #%d: %s: %s", it, disco_result_name(rc), disco_last_error());
      atomic_store(&x->broken, 1);
    } else {
      at(r, "timeout: normal combine");
      rc = step(comm, disco_combine(comm, h, &ca));
      if (rc != DISCO_SUCCESS) {
        fail(x, r, "combine #%d: %s: %s", it, disco_result_name(rc), disco_last_error());
        atomic_store(&x->broken, 1);
      }
    }
    if (sync_broken(x)) goto out;
  }

  /* Dispatch #3 without rank 1. */
  if (r != 1) {
    at(r, "timeout: dispatch #3 without rank 1");
    rc = disco_dispatch(comm, h, &a);
    if (rc != DISCO_SUCCESS)
      fail(x, r, "dispatch #3 returned %s (%s), expected SUCCESS (enqueued)",
           disco_result_name(rc), disco_last_error());
    at(r, "timeout: disco_comm_check after dispatch #3");
    t0 = now_s();
    rc = disco_comm_check(comm, 1);
    dt = now_s() - t0;
    if (rc != DISCO_ERR_TIMEOUT)
      fail(x, r,
           "disco_comm_check after dispatch #3 without rank 1: %s (%s), expected "
           "DISCO_ERR_TIMEOUT",
           disco_result_name(rc), disco_last_error());
    else if (!names_rank(disco_last_error(), 1))
      fail(x, r, "TIMEOUT message does not name rank 1: %s", disco_last_error());
    if (dt >= 2.0) fail(x, r, "disco_comm_check took %.3f s (limit 2 s)", dt);
    printf("  [rank %d] dispatch #3 without rank 1: check %.3f s: %s\n", r, dt,
           disco_last_error());
  }
  pthread_barrier_wait(&x->gw->barrier);

  /* Rank 1's late dispatch #3: its peers have given up on this call. (Their
   * rows for call #3 were stored before they timed out, so the backend must
   * make them known as gone for this to be a TIMEOUT, not a success.) */
  if (r == 1) {
    at(r, "timeout: rank 1's late dispatch #3");
    t0 = now_s();
    rc = disco_dispatch(comm, h, &a);
    if (rc == DISCO_SUCCESS) rc = disco_comm_check(comm, 1);
    dt = now_s() - t0;
    if (rc == DISCO_SUCCESS)
      fail(x, r,
           "late dispatch #3 succeeded, expected DISCO_ERR_TIMEOUT: the peers stored "
           "their rows and flags of call #3 before they timed out, and nothing told this "
           "rank that they have given up on the comm");
    else if (rc != DISCO_ERR_TIMEOUT)
      fail(x, r, "late dispatch #3: %s (%s), expected DISCO_ERR_TIMEOUT (peers gone)",
           disco_result_name(rc), disco_last_error());
    if (dt >= 2.0) fail(x, r, "late dispatch #3 + check took %.3f s (limit 2 s)", dt);
    printf("  [rank %d] late dispatch #3: %.3f s: %s\n", r, dt, disco_last_error());
  }
  pthread_barrier_wait(&x->gw->barrier);

  /* Every rank: the comm is broken; calls fail at once, the error stays. */
  at(r, "timeout: dispatch after TIMEOUT");
  t0 = now_s();
  rc = disco_dispatch(comm, h, &a);
  dt = now_s() - t0;
  if (rc != DISCO_ERR_TIMEOUT)
    fail(x, r, "dispatch after TIMEOUT returned %s (%s), expected DISCO_ERR_TIMEOUT",
         disco_result_name(rc), disco_last_error());
  if (dt >= 0.050) fail(x, r, "dispatch after TIMEOUT took %.1f ms (limit 50)", dt * 1e3);
  rc = disco_comm_check(comm, 0);
  if (rc != DISCO_ERR_TIMEOUT)
    fail(x, r,
         "disco_comm_check(comm, 0) after TIMEOUT returned %s, expected TIMEOUT "
         "(sticky)",
         disco_result_name(rc));
  pthread_barrier_wait(&x->gw->barrier);

out:
  at(r, "timeout: destroy");
  t0 = now_s();
  disco_handle_destroy(h);
  disco_comm_destroy(comm);
  dt = now_s() - t0;
  if (dt >= 3.0) fail(x, r, "disco_comm_destroy took %.3f s (limit 3 s)", dt);
  printf("  [rank %d] disco_comm_destroy: %.3f s\n", r, dt);
  at(r, "timeout: free");
  dbuf_free(&d);
  if (stream) cudaStreamDestroy(stream);
  at(r, "timeout: done");
}

/* ---- driver --------------------------------------------------------------------- */

static void ctx_init(nctx_t *x, const char *name, gw_world_t *gw, disco_layout_t layout,
                     uint32_t flags) {
  memset(x, 0, sizeof(*x));
  x->name = name;
  x->gw = gw;
  x->layout = layout;
  x->flags = flags;
  atomic_init(&x->broken, 0);
  pthread_mutex_init(&x->mu, NULL);
}

static int report(nctx_t *x, int world) {
  printf("%s [W=%d nccl_device] %s\n", x->failures ? "FAIL" : "ok  ", world, x->name);
  fflush(stdout);
  gw_inputs_free(&x->in);
  pthread_mutex_destroy(&x->mu);
  return x->failures != 0;
}

typedef struct gcase {
  const char *name;
  disco_layout_t layout;
  uint32_t flags;
} gcase_t;

static const gcase_t gcases[] = {
    {"graph", EM, 0u},
    {"graph-rank", RM, 0u},
#ifdef DISCO_DISPATCH_LATENCY
    {"graph-latency", EM, DISCO_DISPATCH_LATENCY},
#endif
#ifdef DISCO_DISPATCH_BANDWIDTH
    {"graph-bandwidth", EM, DISCO_DISPATCH_BANDWIDTH},
#endif
};

static int run_graph(int world, const char *filter) {
  gw_world_t gw;
  int failures = 0;
  if (gw_world_init(&gw, world) != 0) return 1;
  for (size_t i = 0; i < sizeof(gcases) / sizeof(gcases[0]); i++) {
    const gcase_t *g = &gcases[i];
    if (filter && !strstr(g->name, filter)) continue;
    nctx_t x;
    ctx_init(&x, g->name, &gw, g->layout, g->flags);
    disco_config_t cfg = DISCO_CONFIG_INIT;
    cfg.num_experts = 4 * world;
    cfg.top_k = 4;
    cfg.hidden = 128;
    cfg.max_tokens = 64;
    cfg.dtype = DISCO_DTYPE_BF16;
    cfg.timeout_ms = 20000;
    x.cfg = cfg;
    for (int q = 0; q < world; q++) /* baked into the graph; a rank with none at W > 2 */
      x.T[q] = world > 2 && q == world - 1 ? 0 : 64 - (q * 7) % 33;
    gw_run(&gw, graph_rank, &x);
    failures += report(&x, world);
  }
  if (failures)
    gw_world_abort(&gw); /* a failed case may have left a collective stuck */
  else
    gw_world_fini(&gw);
  return failures;
}

static int run_timeout(int world) {
  gw_world_t gw;
  nctx_t x;
  if (gw_world_init(&gw, world) != 0) return 1;
  ctx_init(&x, "timeout", &gw, EM, 0u);
  disco_config_t cfg = DISCO_CONFIG_INIT;
  cfg.num_experts = 2 * world;
  cfg.top_k = 2;
  cfg.hidden = 64;
  cfg.max_tokens = 32;
  cfg.dtype = DISCO_DTYPE_BF16;
  cfg.timeout_ms = 300;
  x.cfg = cfg;
  for (int q = 0; q < world; q++) x.T[q] = 32 - q;
  if (gw_inputs_make(&x.in, &cfg, world, x.T, GW_UNIFORM, 0.0, 1, 99u) != 0) {
    printf("FAIL: gw_inputs_make: out of memory\n");
    gw_world_abort(&gw);
    return 1;
  }
  gw_run(&gw, timeout_rank, &x);
  const double t0 = now_s();
  gw_world_abort(&gw); /* the comms may be stuck: never reused */
  printf("  ncclCommAbort of %d comms: %.3f s\n", world, now_s() - t0);
  return report(&x, world);
}

int main(int argc, char **argv) {
  int ngpu = 0, world = 0, failures = 0;
  const char *filter = NULL;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--world") && i + 1 < argc)
      world = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--filter") && i + 1 < argc)
      filter = argv[++i];
    else {
      fprintf(stderr, "usage: %s [--world N] [--filter SUBSTR]\n", argv[0]);
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
  if (world > ngpu || world < 0) {
    printf("FAIL: --world %d but %d GPUs\n", world, ngpu);
    return 1;
  }
  printf("test_nd: backend nccl_device, %d GPU(s)\n", ngpu);
  fflush(stdout);

  pthread_t wd;
  int wd_world = world ? world : ngpu;
  at(0, "start");
  if (pthread_create(&wd, NULL, watchdog, &wd_world) != 0) {
    printf("FAIL: cannot start the watchdog\n");
    return 1;
  }
  int worlds[2] = {world ? world : ngpu, 0};
  if (!world && ngpu > 2) worlds[1] = 2;
  for (int k = 0; k < 2 && worlds[k]; k++) failures += run_graph(worlds[k], filter);
  if (!filter || strstr("timeout", filter)) {
    const int tw = world ? world : ngpu;
    if (tw < 2)
      printf("SKIP timeout: needs 2 or more GPUs (W=%d)\n", tw);
    else
      failures += run_timeout(tw);
  }
  atomic_store(&g_watch_done, 1);
  pthread_join(wd, NULL);
  printf("%s\n", failures ? "FAILED" : "ALL PASSED");
  return failures ? 1 : 0;
}
