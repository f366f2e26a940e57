/* disco-bench: one case on one rank.
 *
 * Sequence (collective over the group, every rank runs the same steps):
 *   inputs -> comm + handle -> buffers (allocated once, inputs copied once)
 *   -> timed dispatch loop -> read back -> synthetic experts (y)
 *   -> timed combine loop -> read back -> plain baseline (nccl) -> --check
 * Each timed iteration: wait for the stream, barrier, timer, call, timer
 * (idle-stream timing); with --back-to-back only the warm-up iterations and
 * the first timed one start that way, the others are queued right behind.
 */
#include "bench.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/dtype.h"

typedef struct dev_bufs {
  void *x, *idx, *w;
  void *recv_x, *src_rank, *src_token, *expert, *weight;
  void *n_to, *n_from, *tpe, *nrows;
  void *y, *out;
  void *plain_s, *plain_r;
} dev_bufs_t;

typedef struct host_out {
  int64_t rows; /* as reported, clamped to [0, capacity] */
  int64_t rows_reported;
  void *recv_x;
  int32_t *src_rank, *src_token, *expert;
  float *weight;
  int32_t *n_to, *n_from, *tpe;
  void *y, *out;
} host_out_t;

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static double median(double *v, int n) {
  qsort(v, (size_t)n, sizeof(double), cmp_double);
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* Elements of size esz whose bytes differ. */
static int64_t count_diff(const void *a, const void *b, int64_t n, size_t esz) {
  const unsigned char *p = a, *q = b;
  int64_t bad = 0;
  if (n <= 0) return 0;
  if (!a || !b) return n;
  for (int64_t i = 0; i < n; i++)
    if (memcmp(p + (size_t)i * esz, q + (size_t)i * esz, esz) != 0) bad++;
  return bad;
}

static void *xcalloc(rank_ctx_t *c, size_t n, size_t sz) {
  void *p = calloc(n ? n : 1, sz ? sz : 1);
  if (!p) fail_msg(c, "out of host memory");
  return p;
}

static double wall_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec / 1e3;
}

/* Runs warm-up + timed iterations of fn and returns the median in us.
 * Idle-stream timing (default): every iteration waits for the stream and
 * passes a barrier first, so its span includes the host's time in the call
 * and the ranks' launch skew. --back-to-back: warm-up as above, one sync and
 * barrier, then the timed iterations are issued one after the other with no
 * sync or barrier between them (how the DeepEP and NCCL EP figures were
 * taken): once the GPU queue runs ahead of the host, an event pair spans the
 * call's device time only. Host backends return from a call only when it is
 * done, so there it just drops the barriers; their calls are collective and
 * keep the ranks in step by themselves.
 * graph: time replays of a CUDA graph of the call (--graph, where the
 * backend can be captured) instead of the call itself; the call runs once
 * uncaptured first (NCCL connects peers lazily, outside any capture).
 * DISCO_BENCH_HOST_US=1: rank 0 also prints the median host time spent inside
 * the call (with idle-stream timing, the part of the span the GPU may sit idle
 * for). */
static double timed_loop(rank_ctx_t *c, const char *what, op_fn fn, void *arg,
                         int graph) {
  const options_t *opt = c->opt;
  const int back_to_back = opt->back_to_back;
  double *us = xcalloc(c, (size_t)opt->iters, sizeof(double));
  double *host = xcalloc(c, (size_t)opt->iters, sizeof(double));
  const char *env = getenv("DISCO_BENCH_HOST_US");
  void *g = NULL;
  double med;
  if (graph) {
    c->d->sync(c);
    c->g->barrier(c);
    disco_result_t rc = fn(c, arg);
    if (rc != DISCO_SUCCESS) fail_disco(c, what, rc, NULL);
    c->d->sync(c);
    c->g->barrier(c);
    g = c->d->graph_capture(c, fn, arg);
  }
  for (int i = -opt->warmup; i < opt->iters; i++) {
    if (!back_to_back || i <= 0) { /* back to back: warm-ups and the first only */
      c->d->sync(c);
      c->g->barrier(c);
    }
    if (i >= 0) c->d->timer_begin(c, i);
    const double h0 = wall_us();
    disco_result_t rc = DISCO_SUCCESS;
    if (g != NULL)
      c->d->graph_launch(c, g);
    else
      rc = fn(c, arg);
    if (i >= 0) host[i] = wall_us() - h0;
    if (i >= 0) c->d->timer_end(c, i);
    if (rc != DISCO_SUCCESS) fail_disco(c, what, rc, NULL);
  }
  c->d->sync(c); /* the only wait on the timed iterations when back to back */
  if (g != NULL) c->d->graph_free(c, g);
  c->d->timer_read(c, opt->iters, us);
  med = median(us, opt->iters);
  if (env != NULL && atoi(env) > 0 && c->rank == 0)
    fprintf(stderr,
            "# rank 0 %s: host time in the call %.1f us (median), timed %.1f us\n", what,
            median(host, opt->iters), med);
  free(host);
  free(us);
  return med;
}

/* Errors of the calls just timed that the backend found on the device and
 * could not return from the call (nccl_device: DISCO_CAP_NO_HOST_SYNC); on
 * the other backends disco_comm_check returns DISCO_SUCCESS. */
static void check_device_errors(rank_ctx_t *c, disco_comm_t *comm, const char *what) {
  disco_result_t rc = disco_comm_check(comm, 1);
  if (rc != DISCO_SUCCESS) fail_disco(c, what, rc, NULL);
}

typedef struct op_ctx {
  disco_comm_t *comm;
  disco_handle_t *handle;
  disco_dispatch_args_t da;
  disco_combine_args_t ca;
  const size_t *send_bytes, *recv_bytes;
  const void *sbuf;
  void *rbuf;
} op_ctx_t;

static disco_result_t op_dispatch(rank_ctx_t *c, void *arg) {
  op_ctx_t *o = arg;
  (void)c;
  return disco_dispatch(o->comm, o->handle, &o->da);
}

static disco_result_t op_combine(rank_ctx_t *c, void *arg) {
  op_ctx_t *o = arg;
  (void)c;
  return disco_combine(o->comm, o->handle, &o->ca);
}

static disco_result_t op_plain(rank_ctx_t *c, void *arg) {
  op_ctx_t *o = arg;
  c->d->plain_exchange(c, o->send_bytes, o->sbuf, o->recv_bytes, o->rbuf);
  return DISCO_SUCCESS;
}

/* The LSA push of the same bytes (--lsa); `off` is set when the comm cannot
 * (every rank alike, on the first call). */
typedef struct lsa_ctx {
  const size_t *send_bytes;
  const void *sbuf;
  int off;
} lsa_ctx_t;

static disco_result_t op_lsa(rank_ctx_t *c, void *arg) {
  lsa_ctx_t *l = arg;
  if (!l->off) l->off = c->d->lsa_exchange(c, l->send_bytes, l->sbuf);
  return DISCO_SUCCESS;
}

/* Fills the world's input slots this rank needs. */
static void make_inputs(rank_ctx_t *c, const bench_case_t *bc) {
  world_t *wd = c->wd;
  if (c->g->shared_world) {
    if (gen_rank_inputs(&wd->slot[c->rank], c->opt, bc, c->world, c->rank, 1) != 0)
      fail_msg(c, "out of host memory generating inputs");
    c->g->barrier(c);
    return;
  }
  for (int s = 0; s < c->world; s++) {
    int with_x = s == c->rank || c->opt->check;
    if (gen_rank_inputs(&wd->slot[s], c->opt, bc, c->world, s, with_x) != 0)
      fail_msg(c, "out of host memory generating inputs");
  }
}

static void release_inputs(rank_ctx_t *c) {
  world_t *wd = c->wd;
  if (c->g->shared_world) {
    c->g->barrier(c); /* peers may still read this rank's slot */
    world_slot_free(&wd->slot[c->rank]);
    return;
  }
  for (int s = 0; s < c->world; s++) world_slot_free(&wd->slot[s]);
}

static void ref_inputs(const world_t *wd, disco_ref_input_t *in) {
  for (int s = 0; s < wd->size; s++) {
    in[s].num_tokens = wd->slot[s].tokens;
    in[s].x = wd->slot[s].x;
    in[s].topk_idx = wd->slot[s].idx;
    in[s].topk_weights = wd->slot[s].weights;
  }
}

/* Reference dispatch of rank s and its synthetic expert outputs. */
static void ref_rank(rank_ctx_t *c, const bench_case_t *bc, const disco_config_t *cfg,
                     const disco_ref_input_t *in, int s, int keep) {
  world_slot_t *sl = &c->wd->slot[s];
  size_t row_bytes = (size_t)bc->hidden * disco_dtype_size(bc->dtype);
  if (disco_ref_dispatch(cfg, c->world, s, in, bc->layout, bc->align, &sl->ref) != 0)
    fail_msg(c, "disco_ref_dispatch failed (out of memory)");
  sl->have_ref = 1;
  sl->ref_y = xcalloc(c, (size_t)sl->ref.num_rows, row_bytes);
  expert_outputs(bc, c->world, s, sl->ref.num_rows, sl->ref.recv_x, sl->ref.expert,
                 sl->ref.weight, sl->ref_y);
  if (!keep) {
    disco_ref_output_free(&sl->ref);
    sl->have_ref = 0;
  }
}

static void check_case(rank_ctx_t *c, const bench_case_t *bc, const disco_config_t *cfg,
                       const host_out_t *h, rank_result_t *res) {
  const int w = c->world, me = c->rank;
  const int e_loc = bc->experts / w;
  const int m = bc->layout == DISCO_LAYOUT_RANK_MAJOR ? bc->topk : 1;
  const size_t elem = disco_dtype_size(bc->dtype);
  const int64_t hd = bc->hidden;
  disco_ref_input_t *in = xcalloc(c, (size_t)w, sizeof(*in));
  const void **ys = xcalloc(c, (size_t)w, sizeof(*ys));
  void *ref_out = NULL;
  int64_t bad = 0;

  ref_inputs(c->wd, in);
  if (c->g->shared_world) {
    ref_rank(c, bc, cfg, in, me, 1);
    c->g->barrier(c);
  } else {
    for (int s = 0; s < w; s++) ref_rank(c, bc, cfg, in, s, s == me);
  }
  const disco_ref_output_t *r = &c->wd->slot[me].ref;

  /* dispatch: counts, then every row's data and metadata */
  bad += h->rows_reported != r->num_rows;
  bad += count_diff(h->n_to, r->n_tokens_to_rank, w, 4);
  bad += count_diff(h->n_from, r->n_tokens_from_rank, w, 4);
  bad += count_diff(h->tpe, r->tokens_per_expert, e_loc, 4);
  int64_t n = h->rows < r->num_rows ? h->rows : r->num_rows;
  int64_t extra = (h->rows > r->num_rows ? h->rows : r->num_rows) - n;
  bad += count_diff(h->recv_x, r->recv_x, n * hd, elem);
  bad += count_diff(h->src_rank, r->src_rank, n, 4);
  bad += count_diff(h->src_token, r->src_token, n, 4);
  bad += count_diff(h->expert, r->expert, n * m, 4);
  bad += count_diff(h->weight, r->weight, n * m, 4);
  bad += extra * (hd + 2 + 2 * m);
  res->wrong_disp = bad;

  /* combine: the reference runs on the reference rows of every rank */
  for (int s = 0; s < w; s++) ys[s] = c->wd->slot[s].ref_y;
  ref_out = xcalloc(c, (size_t)(bc->tokens * hd), elem);
  if (disco_ref_combine(cfg, w, me, in, bc->layout, bc->align, ys, c->opt->weighted,
                        ref_out) != 0)
    fail_msg(c, "disco_ref_combine failed (out of memory)");
  res->wrong_comb = count_diff(h->out, ref_out, bc->tokens * hd, elem);
  if (c->g->shared_world) c->g->barrier(c); /* peers read our ref_y */
  free(ref_out);
  free(ys);
  free(in);
}

static void free_host_out(host_out_t *h) {
  free(h->recv_x);
  free(h->src_rank);
  free(h->src_token);
  free(h->expert);
  free(h->weight);
  free(h->n_to);
  free(h->n_from);
  free(h->tpe);
  free(h->y);
  free(h->out);
}

/* graph: as the disco calls of the case were timed (like for like); so is
 * --back-to-back, which timed_loop reads from the options for both. */
static void plain_baseline(rank_ctx_t *c, const bench_case_t *bc, dev_bufs_t *b,
                           const host_out_t *h, rank_result_t *res, int graph) {
  const int w = c->world;
  const size_t elem = disco_dtype_size(bc->dtype);
  const size_t row = (size_t)bc->hidden * elem;
  const size_t wire_elem =
      bc->layout == DISCO_LAYOUT_EXPERT_MAJOR && bc->wire == DISCO_COMBINE_WIRE_FP32
          ? 4
          : elem;
  const size_t wire_row = (size_t)bc->hidden * wire_elem;
  size_t *db_s = xcalloc(c, (size_t)w, sizeof(size_t));
  size_t *db_r = xcalloc(c, (size_t)w, sizeof(size_t));
  size_t *cb_s = xcalloc(c, (size_t)w, sizeof(size_t));
  size_t *cb_r = xcalloc(c, (size_t)w, sizeof(size_t));
  size_t s_tot = 0, r_tot = 0, cs_tot = 0, cr_tot = 0;
  for (int p = 0; p < w; p++) {
    db_s[p] = (size_t)h->n_to[p] * row;
    db_r[p] = (size_t)h->n_from[p] * row;
    cb_s[p] = (size_t)h->n_from[p] * wire_row; /* combine goes back */
    cb_r[p] = (size_t)h->n_to[p] * wire_row;
    s_tot += db_s[p];
    r_tot += db_r[p];
    cs_tot += cb_s[p];
    cr_tot += cb_r[p];
  }
  b->plain_s = c->d->alloc(c, s_tot > cs_tot ? s_tot : cs_tot);
  b->plain_r = c->d->alloc(c, r_tot > cr_tot ? r_tot : cr_tot);
  op_ctx_t o = {0};
  o.send_bytes = db_s;
  o.recv_bytes = db_r;
  o.sbuf = b->plain_s;
  o.rbuf = b->plain_r;
  res->plain_disp_us = timed_loop(c, "plain dispatch exchange", op_plain, &o, graph);
  o.send_bytes = cb_s;
  o.recv_bytes = cb_r;
  res->plain_comb_us = timed_loop(c, "plain combine exchange", op_plain, &o, graph);
  if (c->opt->lsa && c->d->lsa_exchange != NULL) {
    lsa_ctx_t l = {db_s, b->plain_s, 0};
    const double d_us = timed_loop(c, "lsa push, dispatch bytes", op_lsa, &l, graph);
    c->d->lsa_check(c);
    l.send_bytes = cb_s;
    const double c_us = timed_loop(c, "lsa push, combine bytes", op_lsa, &l, graph);
    c->d->lsa_check(c);
    if (!l.off) {
      res->lsa_disp_us = d_us;
      res->lsa_comb_us = c_us;
    }
  }
  free(db_s);
  free(db_r);
  free(cb_s);
  free(cb_r);
}

void bench_case_run(rank_ctx_t *c, const bench_case_t *bc, rank_result_t *res) {
  const options_t *opt = c->opt;
  const dev_ops_t *d = c->d;
  const int w = c->world, me = c->rank;
  const int e_loc = bc->experts / w;
  const int m = bc->layout == DISCO_LAYOUT_RANK_MAJOR ? bc->topk : 1;
  const size_t elem = disco_dtype_size(bc->dtype);
  const size_t row = (size_t)bc->hidden * elem;
  const size_t slots = (size_t)bc->tokens * (size_t)bc->topk;
  const size_t isz = opt->index_type == DISCO_INDEX_INT32 ? 4 : 8;
  disco_config_t cfg = DISCO_CONFIG_INIT;
  disco_comm_t *comm = NULL;
  disco_handle_t *handle = NULL;
  dev_bufs_t b;
  host_out_t h;
  op_ctx_t o;
  disco_result_t rc;

  memset(&b, 0, sizeof(b));
  memset(&h, 0, sizeof(h));
  memset(&o, 0, sizeof(o));
  memset(res, 0, sizeof(*res));
  res->plain_disp_us = res->plain_comb_us = -1.0;
  res->lsa_disp_us = res->lsa_comb_us = -1.0;
  res->wrong_disp = res->wrong_comb = -1;

  make_inputs(c, bc);
  const world_slot_t *mine = &c->wd->slot[me];
  int64_t cap = expected_recv_rows(c->wd, bc, me);
  if (cap < 0) fail_msg(c, "out of host memory");

  cfg.num_experts = bc->experts;
  cfg.top_k = bc->topk;
  cfg.hidden = bc->hidden;
  cfg.max_tokens = bc->tokens;
  cfg.dtype = bc->dtype;
  cfg.timeout_ms = opt->timeout_ms;
  cfg.combine_wire = bc->wire;
  rc = d->comm_create(c, &cfg, &comm);
  if (rc != DISCO_SUCCESS) fail_disco(c, "disco_comm_create", rc, NULL);
  rc = disco_handle_create(comm, &handle);
  if (rc != DISCO_SUCCESS) fail_disco(c, "disco_handle_create", rc, NULL);
  if (disco_comm_caps(comm) & DISCO_CAP_NO_HOST_SYNC) {
    /* The row count exists on the device only: size the outputs for the worst
     * case, as a caller of such a backend does (no dispatch_layout). */
    rc = disco_comm_max_recv_rows(comm, bc->layout, bc->align, &cap);
    if (rc != DISCO_SUCCESS) fail_disco(c, "disco_comm_max_recv_rows", rc, NULL);
  }

  /* buffers: allocated once per case, inputs copied once */
  b.x = d->alloc(c, (size_t)bc->tokens * row);
  b.idx = d->alloc(c, slots * isz);
  b.w = opt->weighted ? d->alloc(c, slots * sizeof(float)) : NULL;
  b.recv_x = d->alloc(c, (size_t)cap * row);
  b.src_rank = d->alloc(c, (size_t)cap * 4);
  b.src_token = d->alloc(c, (size_t)cap * 4);
  b.expert = d->alloc(c, (size_t)cap * (size_t)m * 4);
  b.weight = d->alloc(c, (size_t)cap * (size_t)m * 4);
  b.n_to = d->alloc(c, (size_t)w * 4);
  b.n_from = d->alloc(c, (size_t)w * 4);
  b.tpe = d->alloc(c, (size_t)e_loc * 4);
  b.nrows = d->alloc(c, 8);
  b.y = d->alloc(c, (size_t)cap * row);
  b.out = d->alloc(c, (size_t)bc->tokens * row);
  d->h2d(c, b.x, mine->x, (size_t)bc->tokens * row);
  if (isz == 8) {
    d->h2d(c, b.idx, mine->idx, slots * 8);
  } else {
    int32_t *i32 = xcalloc(c, slots, 4);
    for (size_t i = 0; i < slots; i++) i32[i] = (int32_t)mine->idx[i];
    d->h2d(c, b.idx, i32, slots * 4);
    free(i32);
  }
  if (b.w) d->h2d(c, b.w, mine->weights, slots * sizeof(float));

  /* dispatch */
  disco_dispatch_args_t da = DISCO_DISPATCH_ARGS_INIT;
  da.x = b.x;
  da.topk_idx = b.idx;
  da.index_type = opt->index_type;
  da.topk_weights = b.w;
  da.num_tokens = bc->tokens;
  da.layout = bc->layout;
  da.expert_alignment = bc->align;
  da.stream = c->stream;
  da.recv_capacity = cap;
  da.recv_x = b.recv_x;
  da.recv_src_rank = b.src_rank;
  da.recv_src_token = b.src_token;
  da.recv_expert = b.expert;
  da.recv_weight = b.weight;
  da.n_tokens_to_rank = b.n_to;
  da.n_tokens_from_rank = b.n_from;
  da.tokens_per_expert = b.tpe;
  da.num_recv_rows = b.nrows;
  o.comm = comm;
  o.handle = handle;
  o.da = da;
  /* --graph: only where the backend is capturable (no host sync) */
  const int graph = opt->graph && d->graph_capture != NULL &&
                    (disco_comm_caps(comm) & DISCO_CAP_GRAPH) != 0;
  res->disp_us = timed_loop(c, "disco_dispatch", op_dispatch, &o, graph);
  check_device_errors(c, comm, "disco_dispatch (disco_comm_check)");

  /* read back every dispatch output */
  h.n_to = xcalloc(c, (size_t)w, 4);
  h.n_from = xcalloc(c, (size_t)w, 4);
  h.tpe = xcalloc(c, (size_t)e_loc, 4);
  d->d2h(c, h.n_to, b.n_to, (size_t)w * 4);
  d->d2h(c, h.n_from, b.n_from, (size_t)w * 4);
  d->d2h(c, h.tpe, b.tpe, (size_t)e_loc * 4);
  d->d2h(c, &h.rows_reported, b.nrows, 8);
  h.rows = h.rows_reported < 0 ? 0 : h.rows_reported > cap ? cap : h.rows_reported;
  h.recv_x = xcalloc(c, (size_t)cap, row);
  h.src_rank = xcalloc(c, (size_t)cap, 4);
  h.src_token = xcalloc(c, (size_t)cap, 4);
  h.expert = xcalloc(c, (size_t)cap * (size_t)m, 4);
  h.weight = xcalloc(c, (size_t)cap * (size_t)m, 4);
  d->d2h(c, h.recv_x, b.recv_x, (size_t)h.rows * row);
  d->d2h(c, h.src_rank, b.src_rank, (size_t)h.rows * 4);
  d->d2h(c, h.src_token, b.src_token, (size_t)h.rows * 4);
  d->d2h(c, h.expert, b.expert, (size_t)h.rows * (size_t)m * 4);
  d->d2h(c, h.weight, b.weight, (size_t)h.rows * (size_t)m * 4);

  if (opt->corrupt > 0 && me == 0) { /* testing aid: the check must notice */
    const int64_t n = h.rows * bc->hidden;
    const int64_t step = n / opt->corrupt > 0 ? n / opt->corrupt : 1;
    unsigned char *bytes = h.recv_x;
    for (int64_t i = 0; i < opt->corrupt && i * step < n; i++)
      bytes[(size_t)(i * step) * elem] ^= 1u;
  }

  /* synthetic experts on the rows actually received */
  h.y = xcalloc(c, (size_t)cap, row);
  expert_outputs(bc, w, me, h.rows, h.recv_x, h.expert, h.weight, h.y);
  d->h2d(c, b.y, h.y, (size_t)h.rows * row);

  /* combine */
  disco_combine_args_t ca = DISCO_COMBINE_ARGS_INIT;
  ca.y = b.y;
  ca.y_rows = cap;
  ca.out = b.out;
  ca.weighted = opt->weighted;
  ca.stream = c->stream;
  o.ca = ca;
  res->comb_us = timed_loop(c, "disco_combine", op_combine, &o, graph);
  check_device_errors(c, comm, "disco_combine (disco_comm_check)");
  h.out = xcalloc(c, (size_t)bc->tokens, row);
  d->d2h(c, h.out, b.out, (size_t)bc->tokens * row);

  /* DeepEP's count: rows received in dispatch (one per token and rank, own
   * tokens included) times the row size; combine sends the same rows back. */
  int64_t recv_tokens = 0;
  for (int p = 0; p < w; p++) recv_tokens += h.n_from[p];
  res->disp_bytes = recv_tokens * (int64_t)row;
  res->comb_bytes = recv_tokens * (int64_t)row;
  res->recv_rows = h.rows_reported;
  res->graph = graph;

  if (d->plain_exchange) plain_baseline(c, bc, &b, &h, res, graph);
  if (opt->check) check_case(c, bc, &cfg, &h, res);

  void *bufs[] = {b.x,      b.idx,    b.w,       b.recv_x, b.src_rank, b.src_token,
                  b.expert, b.weight, b.n_to,    b.n_from, b.tpe,      b.nrows,
                  b.y,      b.out,    b.plain_s, b.plain_r};
  for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++)
    if (bufs[i]) d->free(c, bufs[i]);
  free_host_out(&h);
  disco_handle_destroy(handle);
  d->comm_destroy(c, comm);
  release_inputs(c);
}
