/* disco-bench: process groups (threads, MPI) and the host-memory backends
 * (local, mpi): aligned host buffers, monotonic clock around each call. */
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"

#ifdef DISCO_HAVE_MPI
#include <mpi.h>

#include "disco_mpi.h"
#endif

/* Bound on every wait of a barrier between threads; a stuck rank ends the run. */
#define BARRIER_TIMEOUT_S 600
#define GATHER_MAX 256

/* ---- thread group ------------------------------------------------------------ */

typedef struct thread_group {
  int n;
  int count;
  atomic_uint gen;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  unsigned char gather_buf[BENCH_MAX_WORLD * GATHER_MAX];
} thread_group_t;

static int thread_group_init(thread_group_t *tg, int n) {
  pthread_condattr_t ca;
  memset(tg, 0, sizeof(*tg));
  tg->n = n;
  atomic_init(&tg->gen, 0u);
  if (pthread_mutex_init(&tg->mu, NULL) != 0) return -1;
  if (pthread_condattr_init(&ca) != 0) goto fail_mu;
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  if (pthread_cond_init(&tg->cv, &ca) != 0) {
    pthread_condattr_destroy(&ca);
    goto fail_mu;
  }
  pthread_condattr_destroy(&ca);
  return 0;
fail_mu:
  pthread_mutex_destroy(&tg->mu);
  return -1;
}

static void thread_group_fini(thread_group_t *tg) {
  pthread_cond_destroy(&tg->cv);
  pthread_mutex_destroy(&tg->mu);
}

static void thread_barrier(rank_ctx_t *c) {
  thread_group_t *tg = c->gstate;
  struct timespec dl;
  pthread_mutex_lock(&tg->mu);
  unsigned g = atomic_load(&tg->gen);
  if (++tg->count == tg->n) {
    tg->count = 0;
    atomic_store(&tg->gen, g + 1u);
    pthread_cond_broadcast(&tg->cv);
    pthread_mutex_unlock(&tg->mu);
    return;
  }
  pthread_mutex_unlock(&tg->mu);
  /* Short spin first so that ranks leave the barrier close together. */
  for (int i = 0; i < 200; i++) {
    if (atomic_load(&tg->gen) != g) return;
    sched_yield();
  }
  clock_gettime(CLOCK_MONOTONIC, &dl);
  dl.tv_sec += BARRIER_TIMEOUT_S;
  pthread_mutex_lock(&tg->mu);
  while (atomic_load(&tg->gen) == g) {
    int rc = pthread_cond_timedwait(&tg->cv, &tg->mu, &dl);
    if (rc == ETIMEDOUT && atomic_load(&tg->gen) == g) {
      pthread_mutex_unlock(&tg->mu);
      fail_msg(c, "barrier: peers did not arrive within %d s", BARRIER_TIMEOUT_S);
      return;
    }
  }
  pthread_mutex_unlock(&tg->mu);
}

static void thread_gather(rank_ctx_t *c, const void *mine, void *all, size_t n) {
  thread_group_t *tg = c->gstate;
  if (n > GATHER_MAX) fail_msg(c, "gather of %zu bytes too large", n);
  memcpy(tg->gather_buf + (size_t)c->rank * GATHER_MAX, mine, n);
  thread_barrier(c);
  if (c->rank == 0)
    for (int r = 0; r < c->world; r++)
      memcpy((unsigned char *)all + (size_t)r * n,
             tg->gather_buf + (size_t)r * GATHER_MAX, n);
  thread_barrier(c);
}

static void thread_abort(rank_ctx_t *c, int code) {
  (void)c;
  fflush(stdout);
  fflush(stderr);
  _Exit(code);
}

static const group_ops_t thread_group_ops = {
    "threads", 1, thread_barrier, thread_gather, thread_abort,
};

typedef struct thread_arg {
  rank_ctx_t *ctx;
  thread_init_fn init;
  thread_fini_fn fini;
  void *arg;
} thread_arg_t;

static void *thread_main(void *p) {
  thread_arg_t *ta = p;
  if (ta->init && ta->init(ta->ctx, ta->arg) != 0)
    fail_msg(ta->ctx, "per-rank setup failed");
  rank_main(ta->ctx);
  if (ta->fini) ta->fini(ta->ctx, ta->arg);
  return NULL;
}

int run_threads(const options_t *opt, int world, const dev_ops_t *dev,
                thread_init_fn init, thread_fini_fn fini, void *arg, int *exit_code) {
  int ret = 1, started = 0;
  thread_group_t *tg = malloc(sizeof(*tg));
  rank_ctx_t *ctx = calloc((size_t)world, sizeof(*ctx));
  thread_arg_t *ta = calloc((size_t)world, sizeof(*ta));
  pthread_t *th = calloc((size_t)world, sizeof(*th));
  world_t wd = {world, calloc((size_t)world, sizeof(world_slot_t))};
  if (!tg || !ctx || !ta || !th || !wd.slot) goto cleanup;
  if (thread_group_init(tg, world) != 0) goto cleanup;
  for (int r = 0; r < world; r++) {
    ctx[r].rank = r;
    ctx[r].world = world;
    ctx[r].opt = opt;
    ctx[r].g = &thread_group_ops;
    ctx[r].gstate = tg;
    ctx[r].d = dev;
    ctx[r].wd = &wd;
    ta[r] = (thread_arg_t){&ctx[r], init, fini, arg};
  }
  for (; started < world; started++)
    if (pthread_create(&th[started], NULL, thread_main, &ta[started]) != 0) {
      fprintf(stderr, "disco-bench: cannot start thread %d\n", started);
      thread_abort(&ctx[0], 1);
    }
  for (int r = 0; r < started; r++) pthread_join(th[r], NULL);
  *exit_code = ctx[0].exit_code;
  ret = 0;
  thread_group_fini(tg);
cleanup:
  if (wd.slot)
    for (int r = 0; r < world; r++) world_slot_free(&wd.slot[r]);
  free(wd.slot);
  free(th);
  free(ta);
  free(ctx);
  free(tg);
  if (ret != 0) fprintf(stderr, "disco-bench: out of memory starting %d ranks\n", world);
  return ret;
}

/* ---- host memory, clocks, local and mpi communicators ------------------------- */

typedef struct local_shared {
  disco_comm_t *comms[BENCH_MAX_WORLD];
  disco_result_t rc;
  char err[512];
} local_shared_t;

typedef struct host_dev {
  backend_kind_t backend;
  local_shared_t *ls; /* local backend */
  double *t_begin;    /* [iters] seconds */
  double *t_us;       /* [iters] */
} host_dev_t;

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void *host_alloc(rank_ctx_t *c, size_t bytes) {
  size_t sz = (bytes + 255) / 256 * 256;
  void *p = aligned_alloc(256, sz ? sz : 256);
  if (!p) fail_msg(c, "out of host memory (%zu bytes)", bytes);
  return p;
}

static void host_free(rank_ctx_t *c, void *p) {
  (void)c;
  free(p);
}

static void host_copy(rank_ctx_t *c, void *dst, const void *src, size_t n) {
  (void)c;
  if (n) memcpy(dst, src, n);
}

static void host_sync(rank_ctx_t *c) {
  (void)c;
}

static void host_timer_begin(rank_ctx_t *c, int i) {
  host_dev_t *hd = c->dstate;
  hd->t_begin[i] = now_s();
}

static void host_timer_end(rank_ctx_t *c, int i) {
  host_dev_t *hd = c->dstate;
  hd->t_us[i] = (now_s() - hd->t_begin[i]) * 1e6;
}

static void host_timer_read(rank_ctx_t *c, int n, double *us) {
  host_dev_t *hd = c->dstate;
  memcpy(us, hd->t_us, sizeof(double) * (size_t)n);
}

static disco_result_t host_comm_create(rank_ctx_t *c, const disco_config_t *cfg,
                                       disco_comm_t **comm) {
  host_dev_t *hd = c->dstate;
  *comm = NULL;
#ifdef DISCO_HAVE_MPI
  if (hd->backend == BACKEND_MPI) return disco_comm_create_mpi(MPI_COMM_WORLD, cfg, comm);
#endif
  local_shared_t *ls = hd->ls;
  c->g->barrier(c);
  if (c->rank == 0) {
    ls->rc = disco_comm_create_local(c->world, cfg, ls->comms);
    snprintf(ls->err, sizeof(ls->err), "%s", disco_last_error());
  }
  c->g->barrier(c);
  if (ls->rc != DISCO_SUCCESS) {
    if (c->rank == 0) fail_disco(c, "disco_comm_create_local", ls->rc, ls->err);
    /* the other ranks wait for rank 0 to end the run */
    c->g->barrier(c);
    return ls->rc;
  }
  *comm = ls->comms[c->rank];
  return DISCO_SUCCESS;
}

static void host_comm_destroy(rank_ctx_t *c, disco_comm_t *comm) {
  /* No rank may still be inside a collective call of a peer's comm. */
  c->g->barrier(c);
  disco_comm_destroy(comm);
  c->g->barrier(c);
}

const dev_ops_t host_dev_ops = {
    "host",
    0,
    host_alloc,
    host_free,
    host_copy,
    host_copy,
    host_sync,
    host_timer_begin,
    host_timer_end,
    host_timer_read,
    host_comm_create,
    host_comm_destroy,
    NULL,
    NULL,
    NULL,
    NULL,
    NULL,
    NULL,
};

static int host_dev_init(rank_ctx_t *c, backend_kind_t backend, local_shared_t *ls) {
  host_dev_t *hd = calloc(1, sizeof(*hd));
  int n = c->opt->iters > 0 ? c->opt->iters : 1;
  if (!hd) return -1;
  hd->backend = backend;
  hd->ls = ls;
  hd->t_begin = calloc((size_t)n, sizeof(double));
  hd->t_us = calloc((size_t)n, sizeof(double));
  c->dstate = hd;
  if (!hd->t_begin || !hd->t_us) return -1;
  return 0;
}

static void host_dev_fini(rank_ctx_t *c) {
  host_dev_t *hd = c->dstate;
  if (!hd) return;
  free(hd->t_begin);
  free(hd->t_us);
  free(hd);
  c->dstate = NULL;
}

static int local_thread_init(rank_ctx_t *c, void *arg) {
  return host_dev_init(c, BACKEND_LOCAL, arg);
}

static void local_thread_fini(rank_ctx_t *c, void *arg) {
  (void)arg;
  host_dev_fini(c);
}

int run_local(const options_t *opt, int world, int *exit_code) {
  local_shared_t *ls = calloc(1, sizeof(*ls));
  int rc;
  if (!ls) return 1;
  rc = run_threads(opt, world, &host_dev_ops, local_thread_init, local_thread_fini, ls,
                   exit_code);
  free(ls);
  return rc;
}

void host_machine_info(machine_info_t *m) {
  memset(m, 0, sizeof(*m));
  if (gethostname(m->host, sizeof(m->host) - 1) != 0)
    snprintf(m->host, sizeof(m->host), "?");
}

/* ---- MPI group ------------------------------------------------------------------ */
#ifdef DISCO_HAVE_MPI

static void mpi_barrier(rank_ctx_t *c) {
  if (MPI_Barrier(MPI_COMM_WORLD) != MPI_SUCCESS) fail_msg(c, "MPI_Barrier failed");
}

static void mpi_gather(rank_ctx_t *c, const void *mine, void *all, size_t n) {
  if (MPI_Gather(mine, (int)n, MPI_BYTE, all, (int)n, MPI_BYTE, 0, MPI_COMM_WORLD) !=
      MPI_SUCCESS)
    fail_msg(c, "MPI_Gather failed");
}

static void mpi_abort(rank_ctx_t *c, int code) {
  (void)c;
  fflush(stdout);
  fflush(stderr);
  MPI_Abort(MPI_COMM_WORLD, code);
  _Exit(code);
}

const group_ops_t mpi_group_ops = {
    "mpi", 0, mpi_barrier, mpi_gather, mpi_abort,
};

int run_mpi(const options_t *opt, int *exit_code) {
  rank_ctx_t c;
  int ret = 1;
  memset(&c, 0, sizeof(c));
  MPI_Comm_rank(MPI_COMM_WORLD, &c.rank);
  MPI_Comm_size(MPI_COMM_WORLD, &c.world);
  world_t wd = {c.world, calloc((size_t)c.world, sizeof(world_slot_t))};
  c.opt = opt;
  c.g = &mpi_group_ops;
  c.d = &host_dev_ops;
  c.wd = &wd;
  if (!wd.slot || host_dev_init(&c, BACKEND_MPI, NULL) != 0) {
    fprintf(stderr, "disco-bench: rank %d: out of memory\n", c.rank);
    mpi_abort(&c, 1);
  }
  rank_main(&c);
  /* every rank exits with rank 0's verdict */
  MPI_Bcast(&c.exit_code, 1, MPI_INT, 0, MPI_COMM_WORLD);
  *exit_code = c.exit_code;
  ret = 0;
  host_dev_fini(&c);
  for (int r = 0; r < c.world; r++) world_slot_free(&wd.slot[r]);
  free(wd.slot);
  return ret;
}
#endif /* DISCO_HAVE_MPI */
