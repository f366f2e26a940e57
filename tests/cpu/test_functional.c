/* Functional tests of the local backend against disco_ref, bit for bit.
 * usage: test_functional MODE, MODE one of
 *   w1 w2 w3 w4 w8  covering set of shapes/dtypes/layouts on W ranks
 *   roundtrip       K=1 identity round trips (specials) and K>1 vs reference
 *   reuse           one handle reused 100 times with changing T and routing
 *   edge            NULL pointers allowed with zero rows / zero tokens
 *   w64             W = 64 smoke test */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "harness.h"
#include "world.h"

typedef struct fbase {
  int64_t hidden;
  disco_dtype_t dtype;
  int64_t tokens; /* max tokens per rank */
  int tmode;      /* 0 all T, 1 odd ranks 0, 2 mixed T/1/0/17, 3 all 0 */
  int top_k;
  int experts; /* rounded up to a multiple of W */
  th_route_t route;
} fbase_t;

static const fbase_t k_bases[] = {
    {8, DISCO_DTYPE_BF16, 17, 0, 1, 8, TH_ROUTE_UNIFORM},
    {8, DISCO_DTYPE_FP32, 1000, 2, 2, 16, TH_ROUTE_ZIPF},
    {128, DISCO_DTYPE_FP16, 1000, 1, 8, 64, TH_ROUTE_UNIFORM},
    {128, DISCO_DTYPE_BF16, 1000, 0, 4, 32, TH_ROUTE_ZIPF},
    {24, DISCO_DTYPE_FP16, 17, 2, 4, 8, TH_ROUTE_HOLES},
    {12, DISCO_DTYPE_FP32, 17, 0, 2, 4, TH_ROUTE_ONE_EXPERT},
    {7168, DISCO_DTYPE_BF16, 17, 2, 8, 256, TH_ROUTE_UNIFORM},
    {7168, DISCO_DTYPE_FP32, 1, 0, 1, 16, TH_ROUTE_UNIFORM},
    {7168, DISCO_DTYPE_FP16, 17, 1, 32, 64, TH_ROUTE_ZIPF},
    {128, DISCO_DTYPE_FP32, 0, 3, 4, 16, TH_ROUTE_UNIFORM},
    {8, DISCO_DTYPE_BF16, 1000, 0, 32, 32, TH_ROUTE_UNIFORM},
    {40, DISCO_DTYPE_BF16, 1000, 1, 8, 128, TH_ROUTE_HOLES},
    {128, DISCO_DTYPE_FP16, 1, 2, 2, 8, TH_ROUTE_ONE_EXPERT},
    {24, DISCO_DTYPE_FP16, 1000, 0, 1, 8, TH_ROUTE_ZIPF},
    {8, DISCO_DTYPE_FP32, 17, 2, DISCO_MAX_TOP_K, 64, TH_ROUTE_UNIFORM},
};
#define NUM_BASES ((int)(sizeof(k_bases) / sizeof(k_bases[0])))

/* Sanitizer builds run the same shapes with fewer tokens per rank. */
static int64_t scaled(const fbase_t *b) {
  int64_t cap = b->hidden >= 4096 ? 4 : 200;
  return TH_SANITIZED && b->tokens > cap ? cap : b->tokens;
}

static void tokens_for(int world, int64_t T, int tmode, int64_t *out) {
  const int64_t mixed[4] = {T, 1, 0, 17};
  for (int r = 0; r < world; r++) {
    int64_t t = T;
    if (tmode == 1) t = (r % 2) ? 0 : T;
    if (tmode == 2) t = mixed[r % 4];
    if (tmode == 3) t = 0;
    out[r] = t < T ? t : T;
  }
}

typedef struct fcase {
  int world;
  disco_config_t cfg;
  int64_t tokens[64];
  th_route_t route;
  int weighted, specials;
  th_round_opts_t opts;
} fcase_t;

static void describe(const fcase_t *c, char *buf, size_t n) {
  snprintf(buf, n,
           "W=%d E=%d K=%d H=%lld %s T0=%lld route=%s weights=%d layout=%s align=%d "
           "idx=%s wire=%s combine_weighted=%d reuse=%d null_meta=%d extra_cap=%lld "
           "identity=%d",
           c->world, c->cfg.num_experts, c->cfg.top_k, (long long)c->cfg.hidden,
           th_dtype_name(c->cfg.dtype), (long long)c->tokens[0], th_route_name(c->route),
           c->weighted,
           c->opts.mixed_layouts                       ? "mixed"
           : c->opts.layout == DISCO_LAYOUT_RANK_MAJOR ? "rank"
                                                       : "expert",
           c->opts.expert_alignment,
           c->opts.index_type == DISCO_INDEX_INT32 ? "int32" : "int64",
           c->cfg.combine_wire == DISCO_COMBINE_WIRE_DTYPE ? "dtype" : "fp32",
           c->opts.combine_weighted, (int)c->opts.reuse, c->opts.null_metadata,
           (long long)c->opts.extra_capacity, c->opts.identity_y);
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* TH_VERBOSE=1 in the environment prints every case with its time. */
static void run_case(const fcase_t *c, uint64_t seed) {
  int before = th_failures();
  double t0 = now_s();
  disco_comm_t *comms[64];
  if (th_comms_create(c->world, &c->cfg, comms) != 0) return;
  th_world_t w;
  th_world_init(&w, &c->cfg, c->world, c->tokens, c->route, c->weighted, c->specials,
                seed);
  th_round_run(&w, comms, NULL, &c->opts, th_seed(seed, 9));
  th_world_free(&w);
  th_comms_destroy(c->world, comms, NULL);
  if (getenv("TH_VERBOSE")) {
    char d[512];
    describe(c, d, sizeof(d));
    printf("%.3f s  %s\n", now_s() - t0, d);
  }
  if (th_failures() != before) {
    char d[512];
    describe(c, d, sizeof(d));
    fprintf(stderr, "  ^ in case: %s (seed %llu)\n", d, (unsigned long long)seed);
  }
}

static void base_config(disco_config_t *cfg, int world, const fbase_t *b) {
  disco_config_t init = DISCO_CONFIG_INIT;
  *cfg = init;
  int e = (b->experts + world - 1) / world * world;
  cfg->num_experts = e;
  cfg->top_k = b->top_k;
  cfg->hidden = b->hidden;
  cfg->max_tokens = scaled(b);
  cfg->dtype = b->dtype;
}

/* Three variants of each base shape, rotating the remaining parameters. */
static void run_covering(int world) {
  static const int aligns[] = {0, 1, 4, 16, 7, 128};
  for (int i = 0; i < NUM_BASES; i++) {
    const fbase_t *b = &k_bases[i];
    for (int v = 0; v < 4; v++) {
      if (v == 3 && (world < 2 || i % 2)) continue; /* mixed layouts: half the bases */
      fcase_t c;
      memset(&c, 0, sizeof(c));
      c.world = world;
      base_config(&c.cfg, world, b);
      tokens_for(world, scaled(b), b->tmode, c.tokens);
      c.route = b->route;
      int k = i + v + world;
      c.cfg.combine_wire = (k % 2) ? DISCO_COMBINE_WIRE_DTYPE : DISCO_COMBINE_WIRE_FP32;
      c.weighted = (k % 3) != 0;
      c.opts.index_type = ((k / 2) % 2) ? DISCO_INDEX_INT32 : DISCO_INDEX_INT64;
      c.opts.combine_weighted = 1;
      c.opts.combines = 1;
      if (v == 0) { /* EXPERT_MAJOR, plain dispatch */
        c.opts.layout = DISCO_LAYOUT_EXPERT_MAJOR;
        c.opts.expert_alignment = aligns[k % 6];
        c.opts.extra_capacity = (k % 2) ? 0 : 5;
      } else if (v == 1) { /* RANK_MAJOR, layout + reuse, exact outputs */
        c.opts.layout = DISCO_LAYOUT_RANK_MAJOR;
        c.opts.expert_alignment = aligns[(k + 1) % 6];
        c.opts.reuse = TH_REUSE_LAYOUT;
        c.opts.null_metadata = (k % 3) == 0;
      } else if (v == 3) { /* odd ranks RANK_MAJOR, the others EXPERT_MAJOR */
        c.opts.layout = DISCO_LAYOUT_EXPERT_MAJOR;
        c.opts.mixed_layouts = 1;
        c.opts.expert_alignment = aligns[(k + 2) % 6];
        c.opts.reuse = (k % 2) ? TH_REUSE_LAYOUT : TH_REUSE_NONE;
      } else { /* EXPERT_MAJOR aligned, re-dispatch, unweighted sum, 2 combines */
        c.opts.layout = DISCO_LAYOUT_EXPERT_MAJOR;
        c.opts.expert_alignment = aligns[1 + (k % 5)];
        c.opts.reuse = (k % 2) ? TH_REUSE_REDISPATCH : TH_REUSE_LAYOUT;
        c.opts.combine_weighted = 0;
        c.opts.combines = 2;
        c.opts.extra_capacity = 1;
      }
      /* padding to 128 rows per expert only where rows are small */
      if (c.opts.expert_alignment > 16 && b->hidden > 128) c.opts.expert_alignment = 16;
      run_case(&c, th_seed((uint64_t)world, (uint64_t)(i * 3 + v)));
    }
  }
}

/* K=1 unweighted identity experts: combine(dispatch(x)) == x, specials
 * included; K>1 identity experts: equal to disco_ref_combine. */
static void run_roundtrip(void) {
  static const int worlds[] = {1, 2, 3, 4};
  static const int aligns[] = {1, 16, 4};
  int n = 0;
  for (int wi = 0; wi < 4; wi++) {
    for (int dt = 0; dt < 3; dt++) {
      for (int lay = 0; lay < 2; lay++) {
        for (int topk = 1; topk <= 4; topk *= 4) {
          fcase_t c;
          memset(&c, 0, sizeof(c));
          c.world = worlds[wi];
          fbase_t b = {dt == 2 ? 12 : 24,
                       (disco_dtype_t)dt,
                       200,
                       2,
                       topk,
                       8,
                       (th_route_t)(n % TH_ROUTE_COUNT_)};
          base_config(&c.cfg, c.world, &b);
          tokens_for(c.world, b.tokens, b.tmode, c.tokens);
          c.route = b.route;
          c.specials = 1; /* K>1: inf-inf = NaN etc. must match the reference */
          c.weighted = topk > 1 || n % 2; /* K=1: weights given but not applied */
          c.cfg.combine_wire = (n % 3 == 0) ? DISCO_COMBINE_WIRE_DTYPE : 0;
          c.opts.layout = (disco_layout_t)lay;
          c.opts.expert_alignment = aligns[n % 3];
          c.opts.combine_weighted = topk > 1;
          c.opts.identity_y = 1;
          c.opts.expect_identity = topk == 1;
          c.opts.reuse = (th_reuse_t)(n % 3);
          c.opts.extra_capacity = n % 2 ? 3 : 0;
          c.opts.combines = 1;
          run_case(&c, th_seed(77, (uint64_t)n));
          n++;
        }
      }
    }
  }
}

/* One communicator and handle set, 100 rounds with changing T and routing. */
static void run_reuse(void) {
  const int world = 3;
  disco_config_t cfg = DISCO_CONFIG_INIT;
  cfg.num_experts = 6;
  cfg.top_k = 3;
  cfg.hidden = 8;
  cfg.max_tokens = 40;
  cfg.dtype = DISCO_DTYPE_FP32;
  disco_comm_t *comms[3];
  disco_handle_t *handles[3] = {NULL, NULL, NULL};
  if (th_comms_create(world, &cfg, comms) != 0) return;
  for (int r = 0; r < world; r++)
    TH_EXPECT_RC(disco_handle_create(comms[r], &handles[r]), DISCO_SUCCESS,
                 "handle_create rank %d", r);
  uint64_t s = 12345;
  for (int it = 0; it < 100 && th_failures() == 0; it++) {
    int64_t tokens[3];
    for (int r = 0; r < world; r++) tokens[r] = (int64_t)(th_rng(&s) % 41);
    if (it % 10 == 3) tokens[it % 3] = 0;
    th_world_t w;
    th_world_init(&w, &cfg, world, tokens, (th_route_t)(it % TH_ROUTE_COUNT_), it % 2, 0,
                  th_seed(500, (uint64_t)it));
    th_round_opts_t o = {0};
    o.layout = (disco_layout_t)((it / 2) % 2);
    o.expert_alignment = (it % 5) + 0;
    o.index_type = (disco_index_type_t)((it / 3) % 2);
    o.combine_weighted = it % 4 != 1;
    o.reuse = (th_reuse_t)(it % 3);
    o.extra_capacity = it % 7;
    o.combines = 1;
    th_round_run(&w, comms, handles, &o, th_seed(600, (uint64_t)it));
    th_world_free(&w);
    if (th_failures()) fprintf(stderr, "  ^ in reuse iteration %d\n", it);
  }
  th_comms_destroy(world, comms, handles);
}

/* NULL buffers are allowed where there is nothing to read or write. */
typedef struct edge_ctx {
  disco_comm_t **comms;
  disco_handle_t **handles;
  th_world_t *w;
} edge_ctx_t;

static void edge_rank(int rank, void *p) {
  edge_ctx_t *e = p;
  disco_dispatch_args_t a = DISCO_DISPATCH_ARGS_INIT; /* all NULL, T = 0 */
  int64_t rows = -1;
  TH_EXPECT_RC(disco_dispatch(e->comms[rank], e->handles[rank], &a), DISCO_SUCCESS,
               "rank %d: dispatch with T=0 everywhere and NULL buffers", rank);
  TH_EXPECT_RC(disco_handle_num_recv_rows(e->handles[rank], &rows), DISCO_SUCCESS,
               "rank %d: num_recv_rows", rank);
  TH_CHECK(rows == 0, "rank %d: %lld rows received with T=0 everywhere", rank,
           (long long)rows);
  disco_combine_args_t c = DISCO_COMBINE_ARGS_INIT; /* y, out NULL */
  TH_EXPECT_RC(disco_combine(e->comms[rank], e->handles[rank], &c), DISCO_SUCCESS,
               "rank %d: combine with T=0 and NULL buffers", rank);
  /* Only rank 0 holds the hot expert (ONE_EXPERT routing, expert 0..E_loc-1):
   * the other ranks receive nothing and may pass recv_x = y = NULL. */
  const th_world_t *w = e->w;
  a.x = w->x[rank];
  a.topk_idx = w->idx[rank];
  a.num_tokens = w->num_tokens[rank];
  th_buf_t recv, out;
  int64_t cap = rank == 0 ? 64 : 0;
  th_buf_init(&recv, (size_t)(cap * w->cfg.hidden) * 4, 0);
  th_buf_init(&out, (size_t)(a.num_tokens * w->cfg.hidden) * 4, 0);
  a.recv_capacity = cap;
  a.recv_x = rank == 0 ? recv.ptr : NULL;
  TH_EXPECT_RC(disco_dispatch(e->comms[rank], e->handles[rank], &a), DISCO_SUCCESS,
               "rank %d: dispatch with recv_x NULL where no rows arrive", rank);
  c.y = a.recv_x;
  c.out = out.ptr;
  TH_EXPECT_RC(disco_combine(e->comms[rank], e->handles[rank], &c), DISCO_SUCCESS,
               "rank %d: combine with y NULL where no rows arrived", rank);
  th_cmp("identity out", rank, out.ptr, w->x[rank], a.num_tokens, w->cfg.hidden, 4);
  th_buf_guards_ok(&recv, "recv_x", rank);
  th_buf_guards_ok(&out, "out", rank);
  th_buf_free(&recv);
  th_buf_free(&out);
}

static void run_edge(void) {
  const int world = 4;
  disco_config_t cfg = DISCO_CONFIG_INIT;
  cfg.num_experts = 8;
  cfg.top_k = 1;
  cfg.hidden = 4;
  cfg.max_tokens = 16;
  cfg.dtype = DISCO_DTYPE_FP32;
  disco_comm_t *comms[4];
  disco_handle_t *handles[4] = {NULL, NULL, NULL, NULL};
  if (th_comms_create(world, &cfg, comms) != 0) return;
  for (int r = 0; r < world; r++)
    TH_EXPECT_RC(disco_handle_create(comms[r], &handles[r]), DISCO_SUCCESS,
                 "handle_create rank %d", r);
  int64_t tokens[4] = {16, 3, 0, 16};
  th_world_t w;
  /* seed chosen so the hot expert lives on rank 0 (checked below) */
  uint64_t seed = 0;
  for (;; seed++) {
    th_world_init(&w, &cfg, world, tokens, TH_ROUTE_ONE_EXPERT, 0, 0, seed);
    int on_rank0 = 1;
    for (int r = 0; r < world; r++)
      if (tokens[r] > 0 && w.idx[r][0] >= 2) on_rank0 = 0;
    if (on_rank0) break;
    th_world_free(&w);
  }
  edge_ctx_t e = {comms, handles, &w};
  th_run(world, edge_rank, &e);
  th_world_free(&w);
  th_comms_destroy(world, comms, handles);
}

static void run_w64(void) {
  fcase_t c;
  memset(&c, 0, sizeof(c));
  c.world = 64;
  fbase_t b = {8, DISCO_DTYPE_BF16, 5, 2, 4, 128, TH_ROUTE_ZIPF};
  base_config(&c.cfg, 64, &b);
  tokens_for(64, b.tokens, b.tmode, c.tokens);
  c.route = b.route;
  c.weighted = 1;
  c.opts.layout = DISCO_LAYOUT_EXPERT_MAJOR;
  c.opts.expert_alignment = 4;
  c.opts.combine_weighted = 1;
  c.opts.combines = 1;
  run_case(&c, 64);
  c.opts.layout = DISCO_LAYOUT_RANK_MAJOR;
  c.opts.reuse = TH_REUSE_LAYOUT;
  run_case(&c, 65);
}

int main(int argc, char **argv) {
  const char *mode = argc > 1 ? argv[1] : "w2";
  char name[64];
  snprintf(name, sizeof(name), "test_functional %s", mode);
  if (mode[0] == 'w' && strcmp(mode, "w64") != 0) {
    int world = atoi(mode + 1);
    if (world < 1 || world > 8) {
      fprintf(stderr, "bad world size %s\n", mode);
      return 2;
    }
    run_covering(world);
  } else if (strcmp(mode, "roundtrip") == 0) {
    run_roundtrip();
  } else if (strcmp(mode, "reuse") == 0) {
    run_reuse();
  } else if (strcmp(mode, "edge") == 0) {
    run_edge();
  } else if (strcmp(mode, "w64") == 0) {
    run_w64();
  } else {
    fprintf(stderr, "unknown mode %s\n", mode);
    return 2;
  }
  return th_finish(name);
}
