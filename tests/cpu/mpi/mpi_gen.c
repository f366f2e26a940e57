/* Inputs, one rank's round and the reference check for the MPI test. */
#include "mpi_gen.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/dtype.h"

void *mg_alloc(size_t bytes) {
  size_t n = (bytes + 63) / 64 * 64;
  void *p = aligned_alloc(64, n ? n : 64);
  if (!p) {
    fprintf(stderr, "mpi test: out of memory (%zu bytes)\n", bytes);
    exit(2); /* test harness only */
  }
  memset(p, 0, n ? n : 64);
  return p;
}

static uint64_t mg_next(uint64_t *s) {
  uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

static int64_t mg_pick(uint64_t *s, const mg_case_t *c, int64_t e_total, int64_t e_loc) {
  uint64_t r = mg_next(s) % 100;
  if (c->route == MG_ROUTE_SKEW) {
    if (r < 70) return (int64_t)(mg_next(s) % (uint64_t)e_loc); /* all to rank 0 */
    if (r < 80) return e_total - 1;
  }
  return (int64_t)(mg_next(s) % (uint64_t)e_total);
}

int mg_world_init(mg_world_t *w, const mg_case_t *c, int world, uint64_t seed) {
  memset(w, 0, sizeof(*w));
  disco_config_t cfg = DISCO_CONFIG_INIT;
  int e_loc = (c->min_experts + world - 1) / world;
  cfg.num_experts = e_loc * world;
  cfg.top_k = c->k;
  cfg.hidden = c->hidden;
  cfg.max_tokens = c->max_tokens;
  cfg.dtype = c->dtype;
  cfg.combine_wire = c->wire;
  cfg.timeout_ms = 60000; /* 8 ranks on 2 cores can be slow */
  w->cfg = cfg;
  w->world = world;
  w->in = calloc((size_t)world, sizeof(*w->in));
  w->idx32 = calloc((size_t)world, sizeof(*w->idx32));
  if (!w->in || !w->idx32) return -1;
  const int64_t E = cfg.num_experts, K = c->k, H = c->hidden;
  for (int r = 0; r < world; r++) {
    uint64_t s = seed * 0x100000001b3ull + (uint64_t)r * 0x9e3779b97f4a7c15ull + 1;
    int64_t T = c->max_tokens;
    if (r > 0)
      T = c->max_tokens / 2 + (int64_t)(mg_next(&s) % (uint64_t)(c->max_tokens / 2 + 1));
    if (c->zero_ranks == 2 || (c->zero_ranks == 1 && r % 2 == 1)) T = 0;
    int64_t *idx = mg_alloc((size_t)(T * K) * sizeof(int64_t));
    int32_t *idx32 = mg_alloc((size_t)(T * K) * sizeof(int32_t));
    float *wt = mg_alloc((size_t)(T * K) * sizeof(float));
    void *x = mg_alloc((size_t)(T * H) * disco_dtype_size(c->dtype));
    for (int64_t t = 0; t < T; t++) {
      for (int64_t j = 0; j < K; j++) {
        int64_t e = -1;
        unsigned p_unused = c->route == MG_ROUTE_SPARSE ? 50 : 6;
        if (mg_next(&s) % 100 >= p_unused) {
          e = mg_pick(&s, c, E, e_loc);
          for (int64_t tries = 0; tries < E; tries++) { /* distinct ids per row */
            int used = 0;
            for (int64_t i = 0; i < j; i++) used |= idx[t * K + i] == e;
            if (!used) break;
            e = (e + 1) % E;
          }
        }
        idx[t * K + j] = e;
        idx32[t * K + j] = (int32_t)e;
        wt[t * K + j] = (float)((int)(mg_next(&s) % 2048) - 512) / 1024.0f;
      }
      for (int64_t i = 0; i < H; i++) {
        float v = (float)((int)(mg_next(&s) % 4001) - 2000) / 64.0f;
        if (mg_next(&s) % 50 == 0) v = -0.0f;
        disco_store_f32(x, t * H + i, v, c->dtype);
      }
    }
    w->in[r].num_tokens = T;
    w->in[r].x = x;
    w->in[r].topk_idx = idx;
    w->in[r].topk_weights = c->weights ? wt : NULL;
    if (!c->weights) free(wt);
    w->idx32[r] = idx32;
  }
  return 0;
}

void mg_world_free(mg_world_t *w) {
  for (int r = 0; w->in && r < w->world; r++) {
    free((void *)w->in[r].x);
    free((void *)w->in[r].topk_idx);
    free((void *)w->in[r].topk_weights);
    free(w->idx32[r]);
  }
  free(w->in);
  free(w->idx32);
  memset(w, 0, sizeof(*w));
}

void mg_make_y(const mg_case_t *c, const disco_config_t *cfg, int64_t rows,
               const void *recv_x, const int32_t *src_rank, const int32_t *expert,
               void *y) {
  const int64_t H = cfg->hidden, K = cfg->top_k;
  if (c->identity) {
    memcpy(y, recv_x, (size_t)(rows * H) * disco_dtype_size(cfg->dtype));
    return;
  }
  for (int64_t r = 0; r < rows; r++) {
    int64_t key = 0;
    if (c->layout == DISCO_LAYOUT_EXPERT_MAJOR) {
      key = expert[r] < 0 ? 0 : expert[r] % 5;
    } else {
      for (int64_t j = 0; j < K; j++) key += expert[r * K + j] + 1;
      key %= 7;
    }
    float scale = 1.0f + 0.25f * (float)key;
    float off = src_rank[r] < 0 ? 0.0f : 0.5f * (float)src_rank[r];
    for (int64_t i = 0; i < H; i++) {
      float v = disco_load_f32(recv_x, r * H + i, cfg->dtype) * scale;
      disco_store_f32(y, r * H + i, v + off, cfg->dtype);
    }
  }
}

void mg_run_rank(disco_comm_t *comm, const mg_case_t *c, const mg_world_t *w, int rank,
                 mg_result_t *res) {
  memset(res, 0, sizeof(*res));
  res->rc_combine = DISCO_RESULT_COUNT_; /* not run */
  const disco_config_t *cfg = &w->cfg;
  const int W = w->world, El = cfg->num_experts / W, K = cfg->top_k;
  const size_t rb = (size_t)cfg->hidden * disco_dtype_size(cfg->dtype);
  const int mk = c->layout == DISCO_LAYOUT_RANK_MAJOR ? K : 1;
  const disco_ref_input_t *in = &w->in[rank];
  disco_handle_t *h = NULL;
  void *y = NULL;
  int64_t cap = 0;

  res->n_to = mg_alloc((size_t)W * 4);
  res->n_from = mg_alloc((size_t)W * 4);
  res->tpe = mg_alloc((size_t)El * 4);
  res->rc_dispatch = disco_handle_create(comm, &h);
  if (res->rc_dispatch != DISCO_SUCCESS) goto fail_dispatch;

  disco_dispatch_args_t a = DISCO_DISPATCH_ARGS_INIT;
  a.x = in->x;
  a.topk_idx = c->idx32 ? (const void *)w->idx32[rank] : (const void *)in->topk_idx;
  a.index_type = c->idx32 ? DISCO_INDEX_INT32 : DISCO_INDEX_INT64;
  a.topk_weights = in->topk_weights;
  a.num_tokens = in->num_tokens;
  a.layout = c->layout;
  a.expert_alignment = c->align;
  if (c->layout_call) {
    res->rc_dispatch = disco_dispatch_layout(comm, h, &a, &cap);
    if (res->rc_dispatch != DISCO_SUCCESS) goto fail_dispatch;
    a.flags = DISCO_DISPATCH_REUSE_LAYOUT;
    if (c->short_rank == rank + 1 && cap > 0) cap--;
  } else {
    int64_t per = K < El ? K : El;
    cap =
        (int64_t)W * cfg->max_tokens * per + (int64_t)El * (c->align > 1 ? c->align : 1);
  }
  res->recv_x = mg_alloc((size_t)cap * rb);
  res->src_rank = mg_alloc((size_t)cap * 4);
  res->src_token = mg_alloc((size_t)cap * 4);
  res->expert = mg_alloc((size_t)(cap * mk) * 4);
  res->weight = mg_alloc((size_t)(cap * mk) * 4);
  a.recv_capacity = cap;
  a.recv_x = res->recv_x;
  a.recv_src_rank = res->src_rank;
  a.recv_src_token = res->src_token;
  a.recv_expert = res->expert;
  a.recv_weight = res->weight;
  a.n_tokens_to_rank = res->n_to;
  a.n_tokens_from_rank = res->n_from;
  a.tokens_per_expert = res->tpe;
  a.num_recv_rows = &res->rows;
  res->rc_dispatch = disco_dispatch(comm, h, &a);
  if (res->rc_dispatch != DISCO_SUCCESS) goto fail_dispatch;
  if (c->short_rank) goto done; /* the short rank holds no plan to combine */

  y = mg_alloc((size_t)res->rows * rb);
  mg_make_y(c, cfg, res->rows, res->recv_x, res->src_rank, res->expert, y);
  res->out = mg_alloc((size_t)in->num_tokens * rb);
  disco_combine_args_t ca = DISCO_COMBINE_ARGS_INIT;
  ca.y = y;
  ca.y_rows = res->rows;
  ca.out = res->out;
  ca.weighted = c->weighted;
  res->rc_combine = disco_combine(comm, h, &ca);
  if (res->rc_combine != DISCO_SUCCESS)
    snprintf(res->msg, sizeof(res->msg), "%s", disco_last_error());
  goto done;
fail_dispatch:
  snprintf(res->msg, sizeof(res->msg), "%s", disco_last_error());
done:
  free(y);
  disco_handle_destroy(h);
}

void mg_result_free(mg_result_t *res) {
  free(res->recv_x);
  free(res->src_rank);
  free(res->src_token);
  free(res->expert);
  free(res->weight);
  free(res->n_to);
  free(res->n_from);
  free(res->tpe);
  free(res->out);
  memset(res, 0, sizeof(*res));
}

static int mg_cmp(const char *tag, int rank, const char *what, const void *got,
                  const void *want, size_t n) {
  if (n == 0 || memcmp(got, want, n) == 0) return 0;
  size_t i = 0;
  while (((const unsigned char *)got)[i] == ((const unsigned char *)want)[i]) i++;
  fprintf(stderr, "FAIL %s rank %d: %s differs from disco_ref at byte %zu of %zu\n", tag,
          rank, what, i, n);
  return 1;
}

int mg_check_ref(const mg_case_t *c, const mg_world_t *w, int rank,
                 const mg_result_t *res, const char *tag) {
  const disco_config_t *cfg = &w->cfg;
  const int W = w->world, El = cfg->num_experts / W;
  const size_t rb = (size_t)cfg->hidden * disco_dtype_size(cfg->dtype);
  const size_t mk = c->layout == DISCO_LAYOUT_RANK_MAJOR ? (size_t)cfg->top_k : 1;
  int bad = 0;
  disco_ref_output_t *exp = calloc((size_t)W, sizeof(*exp));
  void **ys = calloc((size_t)W, sizeof(*ys));
  void *out = NULL;
  if (!exp || !ys) {
    bad = 1;
    goto done;
  }
  if (res->rc_dispatch != DISCO_SUCCESS || res->rc_combine != DISCO_SUCCESS) {
    fprintf(stderr, "FAIL %s rank %d: dispatch %s, combine %s: %s\n", tag, rank,
            disco_result_name(res->rc_dispatch), disco_result_name(res->rc_combine),
            res->msg);
    bad = 1;
    goto done;
  }
  for (int d = 0; d < W; d++) {
    if (disco_ref_dispatch(cfg, W, d, w->in, c->layout, c->align, &exp[d]) != 0) {
      bad = 1;
      goto done;
    }
    ys[d] = mg_alloc((size_t)exp[d].num_rows * rb);
    mg_make_y(c, cfg, exp[d].num_rows, exp[d].recv_x, exp[d].src_rank, exp[d].expert,
              ys[d]);
  }
  const disco_ref_output_t *e = &exp[rank];
  if (res->rows != e->num_rows) {
    fprintf(stderr, "FAIL %s rank %d: %lld rows, disco_ref %lld\n", tag, rank,
            (long long)res->rows, (long long)e->num_rows);
    bad = 1;
    goto done;
  }
  size_t n = (size_t)e->num_rows;
  bad += mg_cmp(tag, rank, "recv_x", res->recv_x, e->recv_x, n * rb);
  bad += mg_cmp(tag, rank, "src_rank", res->src_rank, e->src_rank, n * 4);
  bad += mg_cmp(tag, rank, "src_token", res->src_token, e->src_token, n * 4);
  bad += mg_cmp(tag, rank, "expert", res->expert, e->expert, n * mk * 4);
  bad += mg_cmp(tag, rank, "weight", res->weight, e->weight, n * mk * 4);
  bad += mg_cmp(tag, rank, "n_tokens_to_rank", res->n_to, e->n_tokens_to_rank,
                (size_t)W * 4);
  bad += mg_cmp(tag, rank, "n_tokens_from_rank", res->n_from, e->n_tokens_from_rank,
                (size_t)W * 4);
  bad += mg_cmp(tag, rank, "tokens_per_expert", res->tpe, e->tokens_per_expert,
                (size_t)El * 4);
  size_t ob = (size_t)w->in[rank].num_tokens * rb;
  out = mg_alloc(ob);
  if (disco_ref_combine(cfg, W, rank, w->in, c->layout, c->align, (const void *const *)ys,
                        c->weighted, out) != 0) {
    bad++;
    goto done;
  }
  bad += mg_cmp(tag, rank, "combine out", res->out, out, ob);
  /* K = 1, unweighted, identity experts: the round trip is exact. */
  if (c->identity && cfg->top_k == 1 && (!c->weights || !c->weighted) &&
      c->layout == DISCO_LAYOUT_EXPERT_MAJOR) {
    const int64_t *idx = w->in[rank].topk_idx;
    for (int64_t t = 0; t < w->in[rank].num_tokens; t++) {
      if (idx[t] < 0) continue; /* no valid slot: zero row */
      bad += mg_cmp(tag, rank, "identity round trip", (const char *)res->out + t * rb,
                    (const char *)w->in[rank].x + t * rb, rb);
    }
  }
done:
  for (int d = 0; exp && d < W; d++) disco_ref_output_free(&exp[d]);
  for (int d = 0; ys && d < W; d++) free(ys[d]);
  free(exp);
  free(ys);
  free(out);
  return bad;
}

unsigned char *mg_serialize(const mg_case_t *c, const mg_world_t *w, int rank,
                            const mg_result_t *res, size_t *len) {
  const disco_config_t *cfg = &w->cfg;
  const size_t W = (size_t)w->world, El = (size_t)cfg->num_experts / W;
  const size_t rb = (size_t)cfg->hidden * disco_dtype_size(cfg->dtype);
  const size_t mk = c->layout == DISCO_LAYOUT_RANK_MAJOR ? (size_t)cfg->top_k : 1;
  const size_t n = res->rc_dispatch == DISCO_SUCCESS ? (size_t)res->rows : 0;
  const size_t ob =
      res->rc_combine == DISCO_SUCCESS ? (size_t)w->in[rank].num_tokens * rb : 0;
  struct {
    const void *p;
    size_t n;
  } parts[] = {
      {&res->rc_dispatch, sizeof(res->rc_dispatch)},
      {&res->rc_combine, sizeof(res->rc_combine)},
      {&n, sizeof(n)},
      {res->recv_x, n * rb},
      {res->src_rank, n * 4},
      {res->src_token, n * 4},
      {res->expert, n * mk * 4},
      {res->weight, n * mk * 4},
      {res->n_to, W * 4},
      {res->n_from, W * 4},
      {res->tpe, El * 4},
      {res->out, ob},
  };
  size_t total = 0;
  for (size_t i = 0; i < sizeof(parts) / sizeof(parts[0]); i++) total += parts[i].n;
  unsigned char *buf = mg_alloc(total), *p = buf;
  for (size_t i = 0; i < sizeof(parts) / sizeof(parts[0]); i++) {
    if (parts[i].n) memcpy(p, parts[i].p, parts[i].n);
    p += parts[i].n;
  }
  *len = total;
  return buf;
}
