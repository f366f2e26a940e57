#include "world.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void th_world_init(th_world_t *w, const disco_config_t *cfg, int world,
                   const int64_t *num_tokens, th_route_t route, int weighted,
                   int specials, uint64_t seed) {
  memset(w, 0, sizeof(*w));
  w->cfg = *cfg;
  w->world = world;
  size_t n = (size_t)world;
  w->num_tokens = th_xmalloc(n * sizeof(int64_t));
  w->x = th_xmalloc(n * sizeof(void *));
  w->idx = th_xmalloc(n * sizeof(int64_t *));
  w->idx32 = th_xmalloc(n * sizeof(int32_t *));
  w->weights = th_xmalloc(n * sizeof(float *));
  w->inputs = th_xmalloc(n * sizeof(disco_ref_input_t));
  int64_t H = cfg->hidden;
  int K = cfg->top_k;
  for (int r = 0; r < world; r++) {
    int64_t T = num_tokens[r];
    w->num_tokens[r] = T;
    w->x[r] = th_xmalloc((size_t)(T * H) * th_elem_size(cfg->dtype));
    th_gen_x(w->x[r], T * H, cfg->dtype, th_seed(seed, 100 + (uint64_t)r), specials);
    w->idx[r] = th_xmalloc((size_t)(T * K) * sizeof(int64_t));
    th_gen_topk(w->idx[r], T, K, cfg->num_experts, route,
                th_seed(seed, 200 + (uint64_t)r));
    w->idx32[r] = th_xmalloc((size_t)(T * K) * sizeof(int32_t));
    for (int64_t i = 0; i < T * K; i++) w->idx32[r][i] = (int32_t)w->idx[r][i];
    w->weights[r] = NULL;
    if (weighted) {
      w->weights[r] = th_xmalloc((size_t)(T * K) * sizeof(float));
      th_gen_weights(w->weights[r], T * K, th_seed(seed, 300 + (uint64_t)r));
    }
    w->inputs[r] = (disco_ref_input_t){T, w->x[r], w->idx[r], w->weights[r]};
  }
}

void th_world_free(th_world_t *w) {
  for (int r = 0; r < w->world; r++) {
    free(w->x[r]);
    free(w->idx[r]);
    free(w->idx32[r]);
    free(w->weights[r]);
  }
  free(w->num_tokens);
  free(w->x);
  free(w->idx);
  free(w->idx32);
  free(w->weights);
  free(w->inputs);
  memset(w, 0, sizeof(*w));
}

int th_comms_create(int world, const disco_config_t *cfg, disco_comm_t **comms) {
  disco_result_t rc = disco_comm_create_local(world, cfg, comms);
  if (rc != DISCO_SUCCESS) {
    th_fail(__FILE__, __LINE__,
            "disco_comm_create_local(W=%d, E=%d, K=%d, H=%lld, %s): %s (%s)", world,
            cfg->num_experts, cfg->top_k, (long long)cfg->hidden,
            th_dtype_name(cfg->dtype), disco_result_name(rc), disco_last_error());
    return -1;
  }
  for (int r = 0; r < world; r++) {
    TH_CHECK(
        comms[r] && disco_comm_rank(comms[r]) == r && disco_comm_size(comms[r]) == world,
        "comm %d: rank %d size %d", r, disco_comm_rank(comms[r]),
        disco_comm_size(comms[r]));
  }
  return 0;
}

void th_comms_destroy(int world, disco_comm_t **comms, disco_handle_t **handles) {
  for (int r = 0; r < world; r++) {
    if (handles) disco_handle_destroy(handles[r]);
    disco_comm_destroy(comms[r]);
  }
}

void th_round_init(th_round_t *rd, th_world_t *w, disco_comm_t **comms,
                   disco_handle_t **handles, const th_round_opts_t *opts, uint64_t seed) {
  rd->w = w;
  rd->comms = comms;
  rd->handles = handles;
  rd->opts = *opts;
  if (rd->opts.combines < 1) rd->opts.combines = 1;
  rd->seed = seed;
  rd->barrier = th_barrier_create(w->world);
  rd->ys = th_xmalloc((size_t)w->world * sizeof(void *));
}

void th_round_fini(th_round_t *rd) {
  th_barrier_destroy(rd->barrier);
  free(rd->ys);
}

/* The caller's output buffers of one dispatch. */
typedef struct th_recv_bufs {
  th_buf_t x, src_rank, src_token, expert, weight, to, from, tpe, nrows;
} th_recv_bufs_t;

static void recv_bufs_init(th_recv_bufs_t *b, const disco_config_t *cfg, int world,
                           int64_t cap, int slots) {
  size_t c = (size_t)cap;
  th_buf_init(&b->x, c * (size_t)cfg->hidden * th_elem_size(cfg->dtype), 0);
  th_buf_init(&b->src_rank, c * 4, 0);
  th_buf_init(&b->src_token, c * 4, 0);
  th_buf_init(&b->expert, c * (size_t)slots * 4, 0);
  th_buf_init(&b->weight, c * (size_t)slots * 4, 0);
  th_buf_init(&b->to, (size_t)world * 4, 0);
  th_buf_init(&b->from, (size_t)world * 4, 0);
  th_buf_init(&b->tpe, (size_t)(cfg->num_experts / world) * 4, 0);
  th_buf_init(&b->nrows, 8, 0);
}

static th_buf_t *recv_bufs_at(th_recv_bufs_t *b, int i) {
  th_buf_t *all[] = {&b->x,  &b->src_rank, &b->src_token, &b->expert, &b->weight,
                     &b->to, &b->from,     &b->tpe,       &b->nrows};
  return all[i];
}

static const char *const k_recv_names[] = {
    "recv_x",       "recv_src_rank",    "recv_src_token",     "recv_expert",
    "recv_weight",  "n_tokens_to_rank", "n_tokens_from_rank", "tokens_per_expert",
    "num_recv_rows"};

static void recv_bufs_poison(th_recv_bufs_t *b) {
  for (int i = 0; i < 9; i++) th_buf_poison(recv_bufs_at(b, i));
}

static void recv_bufs_free(th_recv_bufs_t *b) {
  for (int i = 0; i < 9; i++) th_buf_free(recv_bufs_at(b, i));
}

static void recv_bufs_to_args(th_recv_bufs_t *b, int null_metadata,
                              disco_dispatch_args_t *a) {
  a->recv_x = b->x.ptr;
  if (null_metadata) return;
  a->recv_src_rank = (int32_t *)b->src_rank.ptr;
  a->recv_src_token = (int32_t *)b->src_token.ptr;
  a->recv_expert = (int32_t *)b->expert.ptr;
  a->recv_weight = (float *)b->weight.ptr;
  a->n_tokens_to_rank = (int32_t *)b->to.ptr;
  a->n_tokens_from_rank = (int32_t *)b->from.ptr;
  a->tokens_per_expert = (int32_t *)b->tpe.ptr;
  a->num_recv_rows = (int64_t *)b->nrows.ptr;
}

/* Compares one dispatch's outputs with the reference; guards always. */
static void check_dispatch(th_recv_bufs_t *b, const disco_ref_output_t *ref,
                           const th_world_t *w, int rank, int slots, int null_metadata,
                           const char *when) {
  const disco_config_t *cfg = &w->cfg;
  int64_t rows = ref->num_rows;
  char what[96];
  for (int i = 0; i < 9; i++) {
    snprintf(what, sizeof(what), "%s %s", when, k_recv_names[i]);
    th_buf_guards_ok(recv_bufs_at(b, i), what, rank);
    if (null_metadata && i > 0) th_buf_poison_ok(recv_bufs_at(b, i), what, rank);
  }
  snprintf(what, sizeof(what), "%s recv_x", when);
  th_cmp(what, rank, b->x.ptr, ref->recv_x, rows, cfg->hidden, th_elem_size(cfg->dtype));
  if (null_metadata) return;
  const void *want[] = {
      ref->src_rank,         ref->src_token,          ref->expert,           ref->weight,
      ref->n_tokens_to_rank, ref->n_tokens_from_rank, ref->tokens_per_expert};
  int64_t nrows[] = {rows, rows, rows, rows, 1, 1, 1};
  int64_t ncols[] = {1, 1, slots, slots, w->world, w->world, cfg->num_experts / w->world};
  for (int i = 0; i < 7; i++) {
    snprintf(what, sizeof(what), "%s %s", when, k_recv_names[i + 1]);
    th_cmp(what, rank, recv_bufs_at(b, i + 1)->ptr, want[i], nrows[i], ncols[i], 4);
  }
  int64_t got_rows;
  memcpy(&got_rows, b->nrows.ptr, 8);
  TH_CHECK(got_rows == rows, "rank %d: %s num_recv_rows = %lld, want %lld", rank, when,
           (long long)got_rows, (long long)rows);
}

static void round_dispatch_args(const th_round_t *rd, int rank,
                                disco_dispatch_args_t *a) {
  const th_world_t *w = rd->w;
  a->x = w->x[rank];
  a->index_type = rd->opts.index_type;
  a->topk_idx = rd->opts.index_type == DISCO_INDEX_INT32 ? (const void *)w->idx32[rank]
                                                         : (const void *)w->idx[rank];
  a->topk_weights = w->weights[rank];
  a->num_tokens = w->num_tokens[rank];
  a->layout = th_layout_of(&rd->opts, rank);
  a->expert_alignment = rd->opts.expert_alignment;
}

void th_round_rank(int rank, void *round) {
  th_round_t *rd = round;
  const th_world_t *w = rd->w;
  const th_round_opts_t *o = &rd->opts;
  const disco_config_t *cfg = &w->cfg;
  disco_comm_t *comm = rd->comms[rank];
  disco_handle_t *h = rd->handles[rank];
  size_t es = th_elem_size(cfg->dtype);
  int64_t H = cfg->hidden, T = w->num_tokens[rank];
  const disco_layout_t layout = th_layout_of(o, rank);
  int slots = layout == DISCO_LAYOUT_RANK_MAJOR ? cfg->top_k : 1;

  disco_ref_output_t ref;
  memset(&ref, 0, sizeof(ref));
  if (disco_ref_dispatch(cfg, w->world, rank, w->inputs, layout, o->expert_alignment,
                         &ref) != 0) {
    th_fail(__FILE__, __LINE__, "rank %d: disco_ref_dispatch failed", rank);
    exit(2); /* the peers would wait on a barrier forever */
  }
  int64_t rows = ref.num_rows;
  disco_dispatch_args_t a = DISCO_DISPATCH_ARGS_INIT;
  round_dispatch_args(rd, rank, &a);
  if (o->reuse == TH_REUSE_LAYOUT) {
    int64_t n = -7;
    TH_EXPECT_RC(disco_dispatch_layout(comm, h, &a, &n), DISCO_SUCCESS,
                 "rank %d: disco_dispatch_layout", rank);
    TH_CHECK(n == rows, "rank %d: dispatch_layout says %lld rows, want %lld", rank,
             (long long)n, (long long)rows);
    a.flags = DISCO_DISPATCH_REUSE_LAYOUT;
  }
  int64_t cap = rows + o->extra_capacity;
  th_recv_bufs_t b;
  recv_bufs_init(&b, cfg, w->world, cap, slots);
  a.recv_capacity = cap;
  recv_bufs_to_args(&b, o->null_metadata, &a);
  TH_EXPECT_RC(disco_dispatch(comm, h, &a), DISCO_SUCCESS, "rank %d: disco_dispatch",
               rank);
  check_dispatch(&b, &ref, w, rank, slots, o->null_metadata, "dispatch");
  if (o->reuse == TH_REUSE_REDISPATCH) {
    recv_bufs_poison(&b);
    a.flags = DISCO_DISPATCH_REUSE_LAYOUT;
    TH_EXPECT_RC(disco_dispatch(comm, h, &a), DISCO_SUCCESS,
                 "rank %d: disco_dispatch(REUSE_LAYOUT) after a dispatch", rank);
    check_dispatch(&b, &ref, w, rank, slots, o->null_metadata, "re-dispatch");
  }
  int64_t hrows = -7;
  TH_EXPECT_RC(disco_handle_num_recv_rows(h, &hrows), DISCO_SUCCESS,
               "rank %d: disco_handle_num_recv_rows", rank);
  TH_CHECK(hrows == rows, "rank %d: handle_num_recv_rows = %lld, want %lld", rank,
           (long long)hrows, (long long)rows);

  /* expert outputs */
  th_buf_t ybuf;
  th_buf_init(&ybuf, (size_t)(rows * H) * es, 0);
  const void *y = ybuf.ptr;
  if (o->identity_y) {
    y = b.x.ptr;
  } else {
    th_gen_x(ybuf.ptr, rows * H, cfg->dtype, th_seed(rd->seed, (uint64_t)rank), 0);
  }
  rd->ys[rank] = y;
  th_buf_t out;
  th_buf_init(&out, (size_t)(T * H) * es, 0);
  void *want = th_xmalloc((size_t)(T * H) * es);
  disco_combine_args_t c = DISCO_COMBINE_ARGS_INIT;
  c.y = y;
  c.y_rows = (rank % 2) ? -1 : (o->identity_y ? cap : rows);
  c.out = out.ptr;
  c.weighted = o->combine_weighted;
  for (int it = 0; it < o->combines; it++) {
    th_buf_poison(&out);
    TH_EXPECT_RC(disco_combine(comm, h, &c), DISCO_SUCCESS,
                 "rank %d: disco_combine (#%d)", rank, it);
    th_buf_guards_ok(&out, "combine out", rank);
    th_buf_guards_ok(&ybuf, "combine y", rank);
    if (it == 0) {
      th_barrier_wait(rd->barrier); /* every rank's y is in rd->ys */
      disco_layout_t *layouts = th_xmalloc((size_t)w->world * sizeof(*layouts));
      for (int p = 0; p < w->world; p++) layouts[p] = th_layout_of(o, p);
      if (disco_ref_combine_layouts(cfg, w->world, rank, w->inputs, layouts,
                                    o->expert_alignment, rd->ys, o->combine_weighted,
                                    want) != 0)
        th_fail(__FILE__, __LINE__, "rank %d: disco_ref_combine failed", rank);
      free(layouts);
    }
    th_cmp("combine out", rank, out.ptr, want, T, H, es);
    if (o->expect_identity)
      th_cmp("round trip out vs x", rank, out.ptr, w->x[rank], T, H, es);
  }
  th_barrier_wait(rd->barrier); /* peers are done reading our y */
  free(want);
  th_buf_free(&out);
  th_buf_free(&ybuf);
  recv_bufs_free(&b);
  disco_ref_output_free(&ref);
}

void th_round_run(th_world_t *w, disco_comm_t **comms, disco_handle_t **handles,
                  const th_round_opts_t *opts, uint64_t seed) {
  disco_handle_t **own = NULL;
  if (!handles) {
    own = th_xmalloc((size_t)w->world * sizeof(*own));
    for (int r = 0; r < w->world; r++) {
      own[r] = NULL;
      TH_EXPECT_RC(disco_handle_create(comms[r], &own[r]), DISCO_SUCCESS,
                   "rank %d: disco_handle_create", r);
    }
    handles = own;
  }
  th_round_t rd;
  th_round_init(&rd, w, comms, handles, opts, seed);
  th_run(w->world, th_round_rank, &rd);
  th_round_fini(&rd);
  if (own) {
    for (int r = 0; r < w->world; r++) disco_handle_destroy(own[r]);
    free(own);
  }
}
