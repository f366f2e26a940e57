/* MPI backend test, run as `mpirun -np N test_mpi [--timeout]`.
 *
 * Every rank generates every rank's inputs from a seed, runs dispatch +
 * combine over the MPI backend and compares its outputs bit for bit with
 * disco_ref. Some cases are also run by rank 0 alone on the local backend (N
 * threads) and compared byte for byte with the gathered MPI outputs. Error
 * cases check that one rank's bad input fails that rank with its code, the
 * others with DISCO_ERR_REMOTE, and that the comm works afterwards. */
#include <mpi.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "disco.h"
#include "disco_mpi.h"
#include "mpi_gen.h"

#define BF16 DISCO_DTYPE_BF16
#define FP16 DISCO_DTYPE_FP16
#define FP32 DISCO_DTYPE_FP32
#define EM DISCO_LAYOUT_EXPERT_MAJOR
#define RM DISCO_LAYOUT_RANK_MAJOR

/* name, min E, K, H, dtype, layout, align, weights, weighted, route,
 * zero_ranks, max_tokens, idx32, layout_call, identity, wire, short_rank */
static const mg_case_t k_cases[] = {
    {"k1_identity_bf16", 4, 1, 64, BF16, EM, 0, 0, 0, MG_ROUTE_UNIFORM, 0, 24, 0, 0, 1,
     DISCO_COMBINE_WIRE_FP32, 0},
    {"k1_identity_fp32_rm", 8, 1, 12, FP32, RM, 0, 1, 1, MG_ROUTE_UNIFORM, 0, 16, 1, 0, 1,
     DISCO_COMBINE_WIRE_FP32, 0},
    {"k2_fp16_align4_w", 8, 2, 24, FP16, EM, 4, 1, 1, MG_ROUTE_UNIFORM, 0, 20, 0, 0, 0,
     DISCO_COMBINE_WIRE_FP32, 0},
    {"k2_bf16_wiredtype_layout", 8, 2, 16, BF16, EM, 16, 1, 1, MG_ROUTE_SKEW, 0, 12, 1, 1,
     0, DISCO_COMBINE_WIRE_DTYPE, 0},
    {"k8_fp32_rm_w", 16, 8, 8, FP32, RM, 0, 1, 1, MG_ROUTE_UNIFORM, 0, 16, 0, 0, 0,
     DISCO_COMBINE_WIRE_FP32, 0},
    {"k8_bf16_skew_zero_unweighted", 16, 8, 32, BF16, EM, 8, 1, 0, MG_ROUTE_SKEW, 1, 18,
     0, 0, 0, DISCO_COMBINE_WIRE_FP32, 0},
    {"k8_fp16_nowts_sparse", 8, 8, 40, FP16, EM, 2, 0, 1, MG_ROUTE_SPARSE, 0, 10, 1, 0, 0,
     DISCO_COMBINE_WIRE_DTYPE, 0},
    {"k32_bf16_sparse_w", 40, 32, 16, BF16, EM, 3, 1, 1, MG_ROUTE_SPARSE, 0, 8, 0, 0, 0,
     DISCO_COMBINE_WIRE_FP32, 0},
    {"k32_fp16_rm_skew", 48, 32, 8, FP16, RM, 0, 0, 0, MG_ROUTE_SKEW, 1, 8, 0, 1, 0,
     DISCO_COMBINE_WIRE_FP32, 0},
    {"k32_fp32_em_align8", 64, 32, 4, FP32, EM, 8, 1, 1, MG_ROUTE_UNIFORM, 0, 6, 1, 0, 0,
     DISCO_COMBINE_WIRE_FP32, 0},
    {"all_ranks_empty", 8, 4, 8, BF16, EM, 4, 1, 1, MG_ROUTE_UNIFORM, 2, 8, 0, 0, 0,
     DISCO_COMBINE_WIRE_FP32, 0},
    {"k4_bf16_wide", 16, 4, 512, BF16, EM, 0, 1, 1, MG_ROUTE_UNIFORM, 0, 32, 0, 0, 0,
     DISCO_COMBINE_WIRE_FP32, 0},
};
#define NUM_CASES ((int)(sizeof(k_cases) / sizeof(k_cases[0])))

static int g_rank, g_world;

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

#define FAILF(...)                             \
  do {                                         \
    fprintf(stderr, "FAIL rank %d: ", g_rank); \
    fprintf(stderr, __VA_ARGS__);              \
    fprintf(stderr, "\n");                     \
    bad++;                                     \
  } while (0)

/* ---- local backend on rank 0, for local-vs-MPI equality ------------------- */
typedef struct local_job {
  disco_comm_t *comm;
  const mg_case_t *c;
  const mg_world_t *w;
  int rank;
  mg_result_t res;
} local_job_t;

static void *local_thread(void *p) {
  local_job_t *j = (local_job_t *)p;
  mg_run_rank(j->comm, j->c, j->w, j->rank, &j->res);
  return NULL;
}

/* Rank 0: runs the same round on W threads of the local backend and compares
 * each rank's serialised outputs with what that MPI rank sent. */
static int compare_local(const mg_case_t *c, const mg_world_t *w,
                         unsigned char **mpi_bytes, const size_t *mpi_len) {
  int bad = 0, W = w->world;
  disco_comm_t **comms = calloc((size_t)W, sizeof(*comms));
  local_job_t *jobs = calloc((size_t)W, sizeof(*jobs));
  pthread_t *th = calloc((size_t)W, sizeof(*th));
  if (!comms || !jobs || !th) {
    FAILF("out of memory");
    goto done;
  }
  disco_result_t rc = disco_comm_create_local(W, &w->cfg, comms);
  if (rc != DISCO_SUCCESS) {
    FAILF("%s: disco_comm_create_local: %s", c->name, disco_last_error());
    goto done;
  }
  for (int r = 0; r < W; r++) {
    jobs[r] = (local_job_t){comms[r], c, w, r, {0}};
    if (pthread_create(&th[r], NULL, local_thread, &jobs[r]) != 0) {
      fprintf(stderr, "pthread_create failed\n");
      MPI_Abort(MPI_COMM_WORLD, 2); /* cannot join the other ranks: give up */
    }
  }
  for (int r = 0; r < W; r++) pthread_join(th[r], NULL);
  for (int r = 0; r < W; r++) {
    size_t len = 0;
    unsigned char *loc = mg_serialize(c, w, r, &jobs[r].res, &len);
    if (len != mpi_len[r] || memcmp(loc, mpi_bytes[r], len) != 0)
      FAILF("%s: local backend rank %d differs from MPI rank %d (%zu vs %zu bytes)",
            c->name, r, r, len, mpi_len[r]);
    free(loc);
    mg_result_free(&jobs[r].res);
  }
  for (int r = 0; r < W; r++) disco_comm_destroy(comms[r]);
done:
  free(comms);
  free(jobs);
  free(th);
  return bad;
}

/* Gathers every rank's serialised result on rank 0 and compares with the
 * local backend there. */
static int gather_and_compare(const mg_case_t *c, const mg_world_t *w,
                              const mg_result_t *res) {
  int bad = 0;
  size_t len = 0;
  unsigned char *mine = mg_serialize(c, w, g_rank, res, &len);
  if (g_rank != 0) {
    unsigned long long n = len;
    MPI_Send(&n, 1, MPI_UNSIGNED_LONG_LONG, 0, 1, MPI_COMM_WORLD);
    MPI_Send(mine, (int)len, MPI_BYTE, 0, 2, MPI_COMM_WORLD);
    free(mine);
    return 0;
  }
  unsigned char **all = calloc((size_t)g_world, sizeof(*all));
  size_t *lens = calloc((size_t)g_world, sizeof(*lens));
  all[0] = mine;
  lens[0] = len;
  for (int r = 1; r < g_world; r++) {
    unsigned long long n = 0;
    MPI_Recv(&n, 1, MPI_UNSIGNED_LONG_LONG, r, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    lens[r] = (size_t)n;
    all[r] = mg_alloc(lens[r]);
    MPI_Recv(all[r], (int)n, MPI_BYTE, r, 2, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
  }
  bad += compare_local(c, w, all, lens);
  for (int r = 0; r < g_world; r++) free(all[r]);
  free(all);
  free(lens);
  return bad;
}

static int run_case(const mg_case_t *c, uint64_t seed, int rounds, int vs_local) {
  int bad = 0;
  mg_world_t w;
  disco_comm_t *comm = NULL;
  char tag[128];
  if (mg_world_init(&w, c, g_world, seed) != 0) {
    FAILF("%s: out of memory", c->name);
    goto done;
  }
  disco_result_t rc = disco_comm_create_mpi(MPI_COMM_WORLD, &w.cfg, &comm);
  if (rc != DISCO_SUCCESS) {
    FAILF("%s: disco_comm_create_mpi: %s: %s", c->name, disco_result_name(rc),
          disco_last_error());
    goto done;
  }
  if (strcmp(disco_comm_backend(comm), "mpi") != 0 || disco_comm_rank(comm) != g_rank ||
      disco_comm_size(comm) != g_world)
    FAILF("%s: backend/rank/size wrong", c->name);
  for (int round = 0; round < rounds; round++) {
    mg_result_t res;
    snprintf(tag, sizeof(tag), "%s/W%d/round%d", c->name, g_world, round);
    mg_run_rank(comm, c, &w, g_rank, &res);
    bad += mg_check_ref(c, &w, g_rank, &res, tag);
    if (vs_local && round == 0) bad += gather_and_compare(c, &w, &res);
    mg_result_free(&res);
  }
done:
  disco_comm_destroy(comm);
  mg_world_free(&w);
  return bad;
}

/* One rank's bad input: that rank gets `want`, the others REMOTE; then the
 * same comm runs a valid round. */
static int run_input_error(const char *name, int bad_rank, int kind) {
  int bad = 0;
  mg_case_t c = k_cases[2]; /* K = 2, align 4, weighted */
  c.name = name;
  mg_world_t w;
  disco_comm_t *comm = NULL;
  if (mg_world_init(&w, &c, g_world, 77) != 0) return 1;
  disco_result_t rc = disco_comm_create_mpi(MPI_COMM_WORLD, &w.cfg, &comm);
  if (rc != DISCO_SUCCESS) {
    FAILF("%s: create: %s", name, disco_last_error());
    goto done;
  }
  int64_t *idx = (int64_t *)w.in[bad_rank].topk_idx;
  int64_t saved0 = idx[0], saved1 = idx[1];
  disco_result_t want = DISCO_ERR_EXPERT_OUT_OF_RANGE;
  if (kind == 0) {
    idx[1] = w.cfg.num_experts; /* one past the end */
  } else if (kind == 1) {
    idx[0] = idx[1] = 0;
    want = DISCO_ERR_DUPLICATE_EXPERT;
  } else {
    c.layout_call = 1;
    c.short_rank = bad_rank + 1;
    want = DISCO_ERR_CAPACITY;
  }
  mg_result_t res;
  mg_run_rank(comm, &c, &w, g_rank, &res);
  /* A capacity error is this rank's alone; input errors fail every rank. */
  disco_result_t expect = g_rank == bad_rank ? want
                          : kind == 2        ? DISCO_SUCCESS
                                             : DISCO_ERR_REMOTE;
  if (res.rc_dispatch != expect)
    FAILF("%s: dispatch returned %s, want %s (%s)", name,
          disco_result_name(res.rc_dispatch), disco_result_name(expect), res.msg);
  else if (expect != DISCO_SUCCESS && res.msg[0] == '\0')
    FAILF("%s: no disco_last_error message", name);
  if (g_rank == 0 && expect != DISCO_SUCCESS)
    printf("  %s: rank 0 got \"%s\"\n", name, res.msg);
  mg_result_free(&res);
  idx[0] = saved0;
  idx[1] = saved1;
  c.short_rank = 0;
  char tag[128];
  snprintf(tag, sizeof(tag), "%s/W%d/after-error", name, g_world);
  mg_run_rank(comm, &c, &w, g_rank, &res);
  bad += mg_check_ref(&c, &w, g_rank, &res, tag);
  mg_result_free(&res);
done:
  disco_comm_destroy(comm);
  mg_world_free(&w);
  return bad;
}

static int expect_create(const char *name, const disco_config_t *cfg, int null_out,
                         disco_result_t want) {
  int bad = 0;
  disco_comm_t *comm = (disco_comm_t *)&bad; /* must be reset to NULL */
  disco_result_t rc = disco_comm_create_mpi(MPI_COMM_WORLD, cfg, null_out ? NULL : &comm);
  if (rc != want)
    FAILF("create %s: got %s, want %s (%s)", name, disco_result_name(rc),
          disco_result_name(want), disco_last_error());
  if (!null_out && rc != DISCO_SUCCESS && comm != NULL)
    FAILF("create %s: comm not NULL on failure", name);
  if (rc == DISCO_SUCCESS) disco_comm_destroy(comm);
  return bad;
}

static int run_create_errors(void) {
  int bad = 0, last = g_world - 1;
  disco_config_t good = DISCO_CONFIG_INIT;
  good.num_experts = 2 * g_world;
  good.top_k = 2;
  good.hidden = 8;
  good.max_tokens = 4;
  disco_config_t cfg = good;
  if (g_world > 1) {
    if (g_rank == 0) cfg.hidden = 16;
    bad += expect_create("config mismatch", &cfg, 0, DISCO_ERR_INVALID_ARGUMENT);
    cfg = good;
    cfg.num_experts = g_world + 1;
    bad += expect_create("E % W", &cfg, 0, DISCO_ERR_EXPERT_DIVISIBILITY);
  }
  cfg = good;
  if (g_rank == 0) cfg.magic = 0;
  bad += expect_create("bad magic on rank 0", &cfg, 0,
                       g_rank == 0 ? DISCO_ERR_BAD_STRUCT : DISCO_ERR_REMOTE);
  bad += expect_create("comm NULL on last rank", &good, g_rank == last,
                       g_rank == last ? DISCO_ERR_NULL_POINTER : DISCO_ERR_REMOTE);
  cfg = good;
  cfg.hidden = 7; /* 14 bytes of bf16 */
  bad += expect_create("hidden alignment", &cfg, 0, DISCO_ERR_HIDDEN_ALIGNMENT);
  disco_comm_t *comm = NULL;
  if (disco_comm_create_mpi(MPI_COMM_NULL, &good, &comm) != DISCO_ERR_INVALID_ARGUMENT)
    FAILF("MPI_COMM_NULL accepted");
  bad += expect_create("good after errors", &good, 0, DISCO_SUCCESS);
  return bad;
}

/* Rank 0 dispatches alone: TIMEOUT after ~timeout_ms, then TIMEOUT at once. */
static int run_timeout(void) {
  int bad = 0;
  mg_case_t c = k_cases[2];
  mg_world_t w;
  disco_comm_t *comm = NULL;
  if (mg_world_init(&w, &c, g_world, 5) != 0) return 1;
  w.cfg.timeout_ms = 300;
  if (disco_comm_create_mpi(MPI_COMM_WORLD, &w.cfg, &comm) != DISCO_SUCCESS) {
    FAILF("timeout: create: %s", disco_last_error());
    goto done;
  }
  if (g_rank == 0) {
    mg_result_t res;
    double t0 = now_s();
    mg_run_rank(comm, &c, &w, 0, &res);
    double t1 = now_s();
    if (res.rc_dispatch != DISCO_ERR_TIMEOUT || t1 - t0 < 0.25 || t1 - t0 > 10.0)
      FAILF("timeout: got %s after %.3f s", disco_result_name(res.rc_dispatch), t1 - t0);
    printf("  first call: %s after %.3f s: %s\n", disco_result_name(res.rc_dispatch),
           t1 - t0, res.msg);
    mg_result_free(&res);
    mg_run_rank(comm, &c, &w, 0, &res);
    double t2 = now_s();
    if (res.rc_dispatch != DISCO_ERR_TIMEOUT || t2 - t1 > 0.2)
      FAILF("timeout: second call got %s after %.3f s",
            disco_result_name(res.rc_dispatch), t2 - t1);
    printf("  second call: %s after %.3f s: %s\n", disco_result_name(res.rc_dispatch),
           t2 - t1, res.msg);
    mg_result_free(&res);
  }
done:
  disco_comm_destroy(comm);
  mg_world_free(&w);
  MPI_Barrier(MPI_COMM_WORLD);
  return bad;
}

int main(int argc, char **argv) {
  int provided = 0, bad = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_SINGLE, &provided);
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &g_world);
  const int timeout_mode = argc > 1 && strcmp(argv[1], "--timeout") == 0;
  const int no_local = argc > 1 && strcmp(argv[1], "--no-local") == 0;
  if (timeout_mode) {
    bad += run_timeout();
  } else {
    bad += run_create_errors();
    for (int i = 0; i < NUM_CASES; i++) {
      int before = bad;
      /* Local-vs-MPI on every other case keeps the 8-rank run short. */
      bad += run_case(&k_cases[i], 1000 + (uint64_t)i, 2, !no_local && i % 2 == 0);
      if (g_rank == 0)
        printf("%s %s (W=%d)\n", bad == before ? "ok  " : "FAIL", k_cases[i].name,
               g_world);
    }
    bad += run_input_error("expert out of range on last rank", g_world - 1, 0);
    bad += run_input_error("duplicate expert on rank 0", 0, 1);
    bad += run_input_error("capacity short on last rank", g_world - 1, 2);
  }
  int total = 0;
  MPI_Allreduce(&bad, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (g_rank == 0)
    printf("%s: %d failure(s) over %d rank(s)\n", total ? "FAILED" : "PASSED", total,
           g_world);
  MPI_Finalize();
  return total ? 1 : 0;
}
