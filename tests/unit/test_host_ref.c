/* Randomised bit-identity of the host path (local backend) against src/ref:
 * dispatch outputs and combine results for many configs (world size, dtype,
 * top-k, layout, alignment, combine wire, weights, index type). */
#include <stdint.h>

#include "core/dtype.h"
#include "ref/ref.h"
#include "unit_util.h"

typedef struct world {
  disco_config_t cfg;
  int W;
  disco_layout_t layout;
  int align;
  int weighted_in; /* dispatch has topk_weights */
  int weighted;    /* combine weighted flag */
  int int32_idx;
  disco_comm_t **comms;
  disco_ref_input_t *in;
  int32_t **idx32;
  void **y;      /* per rank expert outputs */
  void **recv_x; /* per rank dispatch output */
  int64_t *rows;
  int64_t cap;
} world_t;

static uint64_t rng = 88172645463325252ull;
static uint64_t next_u64(void) {
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return rng;
}
static int64_t total_rows = 0;
static int rnd(int n) {
  return (int)(next_u64() % (uint64_t)n);
}
static float rndf(void) {
  return (float)((int)(next_u64() % 2001) - 1000) / 37.0f;
}

static void rank_main(int r, void *ctx) {
  world_t *w = ctx;
  const disco_config_t *c = &w->cfg;
  const int K = c->top_k;
  const int64_t H = c->hidden;
  const size_t elem = disco_dtype_size(c->dtype);
  const int kk = w->layout == DISCO_LAYOUT_RANK_MAJOR ? K : 1;
  disco_handle_t *h = NULL;
  disco_ref_output_t ro;
  memset(&ro, 0, sizeof(ro));
  int32_t *src_rank = calloc((size_t)w->cap + 1, 4),
          *src_token = calloc((size_t)w->cap + 1, 4);
  int32_t *expert = calloc((size_t)(w->cap + 1) * kk, 4);
  float *weight = calloc((size_t)(w->cap + 1) * kk, 4);
  int32_t *to = calloc((size_t)w->W, 4), *from = calloc((size_t)w->W, 4);
  int32_t *tpe = calloc((size_t)(c->num_experts / w->W), 4);
  void *out = aligned_alloc(16, ((size_t)c->max_tokens * H * elem + 16) & ~(size_t)15);
  void *ref_out = calloc((size_t)c->max_tokens * H + 1, elem);
  int64_t nrows = -1;

  CHECK_OK(disco_handle_create(w->comms[r], &h));
  disco_dispatch_args_t a = DISCO_DISPATCH_ARGS_INIT;
  a.x = w->in[r].x;
  a.topk_idx = w->int32_idx ? (const void *)w->idx32[r] : (const void *)w->in[r].topk_idx;
  a.index_type = w->int32_idx ? DISCO_INDEX_INT32 : DISCO_INDEX_INT64;
  a.topk_weights = w->weighted_in ? w->in[r].topk_weights : NULL;
  a.num_tokens = w->in[r].num_tokens;
  a.layout = w->layout;
  a.expert_alignment = w->align;
  a.recv_capacity = w->cap;
  a.recv_x = w->recv_x[r];
  a.recv_src_rank = src_rank;
  a.recv_src_token = src_token;
  a.recv_expert = expert;
  a.recv_weight = weight;
  a.n_tokens_to_rank = to;
  a.n_tokens_from_rank = from;
  a.tokens_per_expert = tpe;
  a.num_recv_rows = &nrows;
  CHECK_OK(disco_dispatch(w->comms[r], h, &a));

  disco_ref_input_t in_copy[64];
  for (int q = 0; q < w->W; q++) {
    in_copy[q] = w->in[q];
    if (!w->weighted_in) in_copy[q].topk_weights = NULL;
  }
  if (disco_ref_dispatch(c, w->W, r, in_copy, w->layout, w->align, &ro) != 0) {
    CHECK(0, "ref failed");
    goto done;
  }
  CHECK(ro.num_rows == nrows, "rank %d rows %lld ref %lld", r, (long long)nrows,
        (long long)ro.num_rows);
  if (ro.num_rows != nrows) goto done;
  w->rows[r] = nrows;
  CHECK(memcmp(ro.recv_x, w->recv_x[r], (size_t)nrows * H * elem) == 0, "rank %d recv_x",
        r);
  CHECK(memcmp(ro.src_rank, src_rank, (size_t)nrows * 4) == 0, "rank %d src_rank", r);
  CHECK(memcmp(ro.src_token, src_token, (size_t)nrows * 4) == 0, "rank %d src_token", r);
  CHECK(memcmp(ro.expert, expert, (size_t)nrows * kk * 4) == 0, "rank %d expert", r);
  CHECK(memcmp(ro.weight, weight, (size_t)nrows * kk * 4) == 0, "rank %d weight", r);
  CHECK(memcmp(ro.n_tokens_to_rank, to, (size_t)w->W * 4) == 0, "rank %d to", r);
  CHECK(memcmp(ro.n_tokens_from_rank, from, (size_t)w->W * 4) == 0, "rank %d from", r);
  CHECK(memcmp(ro.tokens_per_expert, tpe, (size_t)(c->num_experts / w->W) * 4) == 0,
        "rank %d tpe", r);

  /* Expert outputs: random values in every row (padding rows too). */
  uint64_t s = 0x9e3779b97f4a7c15ull * (uint64_t)(r + 1); /* per-thread stream */
  for (int64_t i = 0; i < nrows * H; i++) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    float v = (float)((int)(s % 2001) - 1000) / 37.0f;
    disco_store_f32(w->y[r], i, v, c->dtype);
  }
  __atomic_add_fetch(&total_rows, nrows, __ATOMIC_RELAXED);
  disco_combine_args_t ca = DISCO_COMBINE_ARGS_INIT;
  ca.y = w->y[r];
  ca.y_rows = nrows;
  ca.out = out;
  ca.weighted = w->weighted;
  CHECK_OK(disco_combine(w->comms[r], h, &ca));
  /* The ref needs every rank's y: wait for all ranks' combine (collective). */
  CHECK_OK(disco_combine(w->comms[r], h, &ca));
  if (disco_ref_combine(c, w->W, r, in_copy, w->layout, w->align,
                        (const void *const *)w->y, w->weighted, ref_out) != 0) {
    CHECK(0, "ref combine failed");
    goto done;
  }
  CHECK(memcmp(ref_out, out, (size_t)w->in[r].num_tokens * H * elem) == 0,
        "rank %d combine differs from ref", r);
done:
  disco_ref_output_free(&ro);
  disco_handle_destroy(h);
  free(src_rank);
  free(src_token);
  free(expert);
  free(weight);
  free(to);
  free(from);
  free(tpe);
  free(out);
  free(ref_out);
}

static void run_case(int W, int E, int K, int64_t H, int64_t T, disco_dtype_t dt,
                     disco_layout_t layout, int align, int wire, int weighted_in,
                     int weighted, int int32_idx, int unused_rate) {
  world_t w;
  memset(&w, 0, sizeof(w));
  disco_config_t cfg = DISCO_CONFIG_INIT;
  cfg.num_experts = E;
  cfg.top_k = K;
  cfg.hidden = H;
  cfg.max_tokens = T;
  cfg.dtype = dt;
  cfg.combine_wire = wire;
  cfg.timeout_ms = 60000;
  w.cfg = cfg;
  w.W = W;
  w.layout = layout;
  w.align = align;
  w.weighted_in = weighted_in;
  w.weighted = weighted;
  w.int32_idx = int32_idx;
  w.comms = calloc((size_t)W, sizeof(void *));
  w.in = calloc((size_t)W, sizeof(disco_ref_input_t));
  w.idx32 = calloc((size_t)W, sizeof(void *));
  w.y = calloc((size_t)W, sizeof(void *));
  w.recv_x = calloc((size_t)W, sizeof(void *));
  w.rows = calloc((size_t)W, sizeof(int64_t));
  size_t elem = disco_dtype_size(dt);
  w.cap = (int64_t)W * T * K + (int64_t)(E / W) * (align > 1 ? align : 1) + 1;
  for (int r = 0; r < W; r++) {
    int64_t n = rnd((int)T + 1);
    int64_t *idx = malloc(((size_t)n * K + 1) * 8);
    int32_t *idx32 = malloc(((size_t)n * K + 1) * 4);
    float *wt = malloc(((size_t)n * K + 1) * 4);
    void *x = aligned_alloc(16, (size_t)n * H * elem + 16);
    for (int64_t i = 0; i < n * H; i++) disco_store_f32(x, i, rndf(), dt);
    for (int64_t t = 0; t < n; t++)
      for (int j = 0; j < K; j++) {
        int64_t e;
        int dup;
        do { /* distinct experts per row */
          e = rnd(100) < unused_rate ? -1 : rnd(E);
          dup = 0;
          for (int i = 0; i < j && e >= 0; i++) dup |= idx[t * K + i] == e;
        } while (dup);
        idx[t * K + j] = e;
        idx32[t * K + j] = (int32_t)e;
        wt[t * K + j] = rndf() / 16.0f;
      }
    w.in[r].num_tokens = n;
    w.in[r].x = x;
    w.in[r].topk_idx = idx;
    w.in[r].topk_weights = wt;
    w.idx32[r] = idx32;
    w.recv_x[r] = aligned_alloc(16, (size_t)w.cap * H * elem);
    w.y[r] = aligned_alloc(16, (size_t)w.cap * H * elem);
  }
  disco_result_t rc = disco_comm_create_local(W, &cfg, w.comms);
  CHECK(rc == DISCO_SUCCESS, "create W=%d E=%d: %s", W, E, disco_last_error());
  if (rc == DISCO_SUCCESS) {
    int before = unit_failures;
    unit_run_ranks(W, rank_main, &w);
    if (unit_failures != before)
      fprintf(
          stderr,
          "  in case W=%d E=%d K=%d H=%lld T=%lld dtype=%d layout=%d align=%d wire=%d "
          "weights=%d weighted=%d int32=%d\n",
          W, E, K, (long long)H, (long long)T, dt, layout, align, wire, weighted_in,
          weighted, int32_idx);
  }
  for (int r = 0; r < W; r++) {
    disco_comm_destroy(w.comms[r]);
    free((void *)w.in[r].x);
    free((void *)w.in[r].topk_idx);
    free((void *)w.in[r].topk_weights);
    free(w.idx32[r]);
    free(w.recv_x[r]);
    free(w.y[r]);
  }
  free(w.comms);
  free(w.in);
  free(w.idx32);
  free(w.y);
  free(w.recv_x);
  free(w.rows);
}

int main(void) {
  static const int worlds[] = {1, 2, 3, 4, 8};
  int cases = 0;
  for (int wi = 0; wi < 5; wi++) {
    int W = worlds[wi];
    for (int it = 0; it < 12; it++) {
      int El = 1 + rnd(4);
      int E = W * El;
      int K = 1 + rnd(E < 6 ? E : 6);
      disco_dtype_t dt = (disco_dtype_t)rnd(3);
      int64_t H = dt == DISCO_DTYPE_FP32 ? 4 * (1 + rnd(4)) : 8 * (1 + rnd(3));
      run_case(W, E, K, H, 1 + rnd(9), dt, (disco_layout_t)rnd(2),
               rnd(2) ? 0 : 1 + rnd(4), rnd(2), rnd(4) != 0, rnd(3) != 0, rnd(2),
               rnd(40));
      cases++;
    }
  }
  /* A bigger world and a top-k of 64 over many experts. */
  run_case(16, 64, 8, 16, 12, DISCO_DTYPE_BF16, DISCO_LAYOUT_EXPERT_MAJOR, 4, 0, 1, 1, 0,
           5);
  run_case(2, 128, 64, 8, 5, DISCO_DTYPE_FP16, DISCO_LAYOUT_EXPERT_MAJOR, 1, 1, 1, 1, 1,
           10);
  run_case(64, 64, 4, 8, 3, DISCO_DTYPE_FP32, DISCO_LAYOUT_RANK_MAJOR, 0, 0, 1, 1, 0, 10);
  printf("%d random cases, %lld rows received\n", cases + 3, (long long)total_rows);
  CHECK(total_rows > 1000, "too few rows (%lld): the cases test nothing",
        (long long)total_rows);
  return unit_finish("test_host_ref");
}
