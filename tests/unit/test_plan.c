/* A small hand-computed routing example through the local backend, W = 2,
 * E = 4 (2 local experts per rank), K = 2, H = 8 fp32:
 *   rank 0: t0 -> {1 (w .5), 2 (w .25)}, t1 -> {3 (w 1), -1}, t2 -> {0 (w .75), 1 (w
 * .125)} rank 1: t0 -> {-1, -1},             t1 -> {2 (w .5), 0 (w .5)} x[r][t][h] = 100
 * r + 10 t + h. Checks exact rows, metadata, counts, padding, RANK_MAJOR, layout +
 * REUSE_LAYOUT, combine, and bit identity with the ref. */
#include <math.h>

#include "ref/ref.h"
#include "unit_util.h"

#define W 2
#define E 4
#define K 2
#define H 8
#define CAP 16

static const int64_t tokens[W] = {3, 2};
static const int64_t idx[W][3 * K] = {{1, 2, 3, -1, 0, 1}, {-1, -1, 2, 0, 0, 0}};
static const float wts[W][3 * K] = {{0.5f, 0.25f, 1.0f, 0.0f, 0.75f, 0.125f},
                                    {0.0f, 0.0f, 0.5f, 0.5f, 0.0f, 0.0f}};
static float x[W][3][H];
static disco_comm_t *comms[W];

typedef struct expect {
  int64_t rows;
  int32_t src_rank[CAP], src_token[CAP], expert[CAP * K];
  float weight[CAP * K];
  int32_t to[W], from[W], tpe[E / W];
} expect_t;

/* EXPERT_MAJOR, alignment 1 (worked out by hand, see the header). */
static const expect_t em[W] = {
    {4,
     {0, 1, 0, 0},
     {2, 1, 0, 2},
     {0, 0, 1, 1},
     {0.75f, 0.5f, 0.5f, 0.125f},
     {2, 2},
     {2, 1},
     {2, 2}},
    {3, {0, 1, 0}, {0, 1, 1}, {2, 2, 3}, {0.25f, 0.5f, 1.0f}, {1, 1}, {2, 1}, {2, 1}}};
/* EXPERT_MAJOR, alignment 4: groups padded to 4 rows. */
static const expect_t em4[W] = {{8,
                                 {0, 1, -1, -1, 0, 0, -1, -1},
                                 {2, 1, -1, -1, 0, 2, -1, -1},
                                 {0, 0, -1, -1, 1, 1, -1, -1},
                                 {0.75f, 0.5f, 0, 0, 0.5f, 0.125f, 0, 0},
                                 {2, 2},
                                 {2, 1},
                                 {4, 4}},
                                {8,
                                 {0, 1, -1, -1, 0, -1, -1, -1},
                                 {0, 1, -1, -1, 1, -1, -1, -1},
                                 {2, 2, -1, -1, 3, -1, -1, -1},
                                 {0.25f, 0.5f, 0, 0, 1.0f, 0, 0, 0},
                                 {1, 1},
                                 {2, 1},
                                 {4, 4}}};
/* RANK_MAJOR: K local ids / weights per row, slot order. */
static const expect_t rm[W] = {{3,
                                {0, 0, 1},
                                {0, 2, 1},
                                {1, -1, 0, 1, -1, 0},
                                {0.5f, 0, 0.75f, 0.125f, 0, 0.5f},
                                {2, 2},
                                {2, 1},
                                {2, 2}},
                               {3,
                                {0, 0, 1},
                                {0, 1, 1},
                                {-1, 0, 1, -1, 0, -1},
                                {0, 0.25f, 1.0f, 0, 0.5f, 0},
                                {1, 1},
                                {2, 1},
                                {2, 1}}};
/* Weighted combine with identity experts: out = (sum of the token's weights) x. */
static const float comb_scale[W][3] = {{0.75f, 1.0f, 0.875f}, {0.0f, 1.0f, 0.0f}};

typedef struct outbuf {
  _Alignas(16) float recv_x[CAP][H];
  int32_t src_rank[CAP], src_token[CAP], expert[CAP * K];
  float weight[CAP * K];
  int32_t to[W], from[W], tpe[E / W];
  int64_t rows;
  _Alignas(16) float out[3][H];
} outbuf_t;

static outbuf_t bufs[W];

static void fill_args(int r, disco_dispatch_args_t *a, outbuf_t *b, disco_layout_t layout,
                      int align) {
  a->x = x[r];
  a->topk_idx = idx[r];
  a->topk_weights = wts[r];
  a->num_tokens = tokens[r];
  a->layout = layout;
  a->expert_alignment = align;
  a->flags = 0;
  a->recv_capacity = CAP;
  a->recv_x = b->recv_x;
  a->recv_src_rank = b->src_rank;
  a->recv_src_token = b->src_token;
  a->recv_expert = b->expert;
  a->recv_weight = b->weight;
  a->n_tokens_to_rank = b->to;
  a->n_tokens_from_rank = b->from;
  a->tokens_per_expert = b->tpe;
  a->num_recv_rows = &b->rows;
}

static void check_dispatch(int r, const char *what, const outbuf_t *b, const expect_t *e,
                           int kk) {
  CHECK(b->rows == e->rows, "%s rank %d: rows %lld want %lld", what, r,
        (long long)b->rows, (long long)e->rows);
  for (int q = 0; q < W; q++) {
    CHECK(b->to[q] == e->to[q], "%s rank %d: n_tokens_to_rank[%d] = %d want %d", what, r,
          q, b->to[q], e->to[q]);
    CHECK(b->from[q] == e->from[q], "%s rank %d: n_tokens_from_rank[%d] = %d want %d",
          what, r, q, b->from[q], e->from[q]);
  }
  for (int l = 0; l < E / W; l++)
    CHECK(b->tpe[l] == e->tpe[l], "%s rank %d: tokens_per_expert[%d] = %d want %d", what,
          r, l, b->tpe[l], e->tpe[l]);
  for (int64_t i = 0; i < e->rows && i < CAP; i++) {
    CHECK(b->src_rank[i] == e->src_rank[i], "%s rank %d row %lld: src_rank %d want %d",
          what, r, (long long)i, b->src_rank[i], e->src_rank[i]);
    CHECK(b->src_token[i] == e->src_token[i], "%s rank %d row %lld: src_token %d want %d",
          what, r, (long long)i, b->src_token[i], e->src_token[i]);
    for (int j = 0; j < kk; j++) {
      CHECK(b->expert[i * kk + j] == e->expert[i * kk + j],
            "%s rank %d row %lld slot %d: expert %d want %d", what, r, (long long)i, j,
            b->expert[i * kk + j], e->expert[i * kk + j]);
      CHECK(b->weight[i * kk + j] == e->weight[i * kk + j],
            "%s rank %d row %lld slot %d: weight %g want %g", what, r, (long long)i, j,
            b->weight[i * kk + j], e->weight[i * kk + j]);
    }
    for (int h = 0; h < H; h++) {
      int s = e->src_rank[i], t = e->src_token[i];
      float want = s < 0 ? 0.0f : x[s][t][h];
      CHECK(memcmp(&b->recv_x[i][h], &want, sizeof(float)) == 0,
            "%s rank %d row %lld h %d: %g want %g", what, r, (long long)i, h,
            b->recv_x[i][h], want);
    }
  }
}

/* Bit identity of this rank's dispatch output with src/ref. */
static void check_ref(int r, const char *what, const outbuf_t *b, disco_layout_t layout,
                      int align) {
  disco_config_t cfg;
  disco_ref_input_t in[W];
  disco_ref_output_t ro;
  memset(&ro, 0, sizeof(ro));
  disco_comm_get_config(comms[r], &cfg);
  for (int q = 0; q < W; q++) {
    in[q].num_tokens = tokens[q];
    in[q].x = x[q];
    in[q].topk_idx = idx[q];
    in[q].topk_weights = wts[q];
  }
  if (disco_ref_dispatch(&cfg, W, r, in, layout, align, &ro) != 0) {
    CHECK(0, "ref dispatch failed");
    return;
  }
  int kk = layout == DISCO_LAYOUT_RANK_MAJOR ? K : 1;
  CHECK(ro.num_rows == b->rows, "%s rank %d: ref rows %lld", what, r,
        (long long)ro.num_rows);
  if (ro.num_rows == b->rows) {
    CHECK(memcmp(ro.recv_x, b->recv_x, (size_t)b->rows * H * 4) == 0, "%s rank %d recv_x",
          what, r);
    CHECK(memcmp(ro.src_rank, b->src_rank, (size_t)b->rows * 4) == 0,
          "%s rank %d src_rank", what, r);
    CHECK(memcmp(ro.src_token, b->src_token, (size_t)b->rows * 4) == 0,
          "%s rank %d src_token", what, r);
    CHECK(memcmp(ro.expert, b->expert, (size_t)b->rows * kk * 4) == 0,
          "%s rank %d expert", what, r);
    CHECK(memcmp(ro.weight, b->weight, (size_t)b->rows * kk * 4) == 0,
          "%s rank %d weight", what, r);
    CHECK(memcmp(ro.tokens_per_expert, b->tpe, sizeof(b->tpe)) == 0, "%s rank %d tpe",
          what, r);
  }
  disco_ref_output_free(&ro);
}

static void combine_and_check(int r, disco_handle_t *h, outbuf_t *b, const char *what,
                              int weighted) {
  disco_combine_args_t c = DISCO_COMBINE_ARGS_INIT;
  c.y = b->recv_x; /* identity experts */
  c.y_rows = b->rows;
  c.out = b->out;
  c.weighted = weighted;
  memset(b->out, 0xff, sizeof(b->out));
  CHECK_OK(disco_combine(comms[r], h, &c));
  for (int t = 0; t < tokens[r]; t++)
    for (int hh = 0; hh < H; hh++) {
      float want = weighted ? comb_scale[r][t] * x[r][t][hh] : 0.0f;
      if (!weighted) /* unweighted: number of valid slots times x */
        for (int j = 0; j < K; j++) want += idx[r][t * K + j] >= 0 ? x[r][t][hh] : 0.0f;
      CHECK(b->out[t][hh] == want, "%s rank %d out[%d][%d] = %g want %g", what, r, t, hh,
            b->out[t][hh], want);
    }
}

static void rank_main(int r, void *ctx) {
  (void)ctx;
  disco_handle_t *h = NULL;
  outbuf_t *b = &bufs[r];
  disco_dispatch_args_t a = DISCO_DISPATCH_ARGS_INIT;
  CHECK_OK(disco_handle_create(comms[r], &h));
  if (h == NULL) return;

  fill_args(r, &a, b, DISCO_LAYOUT_EXPERT_MAJOR, 1);
  CHECK_OK(disco_dispatch(comms[r], h, &a));
  check_dispatch(r, "expert-major", b, &em[r], 1);
  check_ref(r, "expert-major", b, DISCO_LAYOUT_EXPERT_MAJOR, 1);
  combine_and_check(r, h, b, "combine weighted", 1);
  combine_and_check(r, h, b, "combine unweighted", 0);

  fill_args(r, &a, b, DISCO_LAYOUT_EXPERT_MAJOR, 4);
  memset(b->recv_x, 0xff, sizeof(b->recv_x));
  CHECK_OK(disco_dispatch(comms[r], h, &a));
  check_dispatch(r, "expert-major align 4", b, &em4[r], 1);
  check_ref(r, "expert-major align 4", b, DISCO_LAYOUT_EXPERT_MAJOR, 4);
  combine_and_check(r, h, b, "combine align 4", 1);

  fill_args(r, &a, b, DISCO_LAYOUT_RANK_MAJOR, 4);
  CHECK_OK(disco_dispatch(comms[r], h, &a));
  check_dispatch(r, "rank-major", b, &rm[r], K);
  check_ref(r, "rank-major", b, DISCO_LAYOUT_RANK_MAJOR, 4);
  /* RANK_MAJOR y is already reduced per token: with y = x, out = x times the
   * number of destination ranks. */
  {
    disco_combine_args_t c = DISCO_COMBINE_ARGS_INIT;
    c.y = b->recv_x;
    c.out = b->out;
    CHECK_OK(disco_combine(comms[r], h, &c));
    static const float ndest[W][3] = {{2, 1, 1}, {0, 2, 0}};
    for (int t = 0; t < tokens[r]; t++)
      for (int hh = 0; hh < H; hh++)
        CHECK(b->out[t][hh] == ndest[r][t] * x[r][t][hh],
              "rank-major combine rank %d out[%d][%d] = %g", r, t, hh, b->out[t][hh]);
  }

  /* Layout first, then REUSE_LAYOUT with outputs of the exact size. */
  int64_t rows = -1;
  fill_args(r, &a, b, DISCO_LAYOUT_EXPERT_MAJOR, 1);
  CHECK_OK(disco_dispatch_layout(comms[r], h, &a, &rows));
  CHECK(rows == em[r].rows, "layout rank %d: rows %lld want %lld", r, (long long)rows,
        (long long)em[r].rows);
  int64_t hr = -1;
  CHECK_OK(disco_handle_num_recv_rows(h, &hr));
  CHECK(hr == rows, "handle rows %lld", (long long)hr);
  {
    disco_combine_args_t c = DISCO_COMBINE_ARGS_INIT;
    c.y = b->recv_x;
    c.out = b->out;
    CHECK_ERR(disco_combine(comms[r], h, &c), DISCO_ERR_INVALID_USAGE, "disco_combine");
  }
  a.flags = DISCO_DISPATCH_REUSE_LAYOUT;
  a.recv_capacity = rows;
  CHECK_OK(disco_dispatch(comms[r], h, &a));
  check_dispatch(r, "reuse layout", b, &em[r], 1);
  combine_and_check(r, h, b, "combine after reuse", 1);

  /* Capacity one row short on rank 1 only: rank 1 fails, rank 0 succeeds. */
  fill_args(r, &a, b, DISCO_LAYOUT_EXPERT_MAJOR, 1);
  if (r == 1) a.recv_capacity = em[r].rows - 1;
  if (r == 1)
    CHECK_ERR(disco_dispatch(comms[r], h, &a), DISCO_ERR_CAPACITY, "recv_capacity");
  else
    CHECK_OK(disco_dispatch(comms[r], h, &a));
  {
    /* Rank 1's handle is now invalid: combine fails everywhere, nobody hangs. */
    disco_combine_args_t c = DISCO_COMBINE_ARGS_INIT;
    c.y = b->recv_x;
    c.out = b->out;
    disco_result_t rc = disco_combine(comms[r], h, &c);
    CHECK(rc == (r == 1 ? DISCO_ERR_INVALID_USAGE : DISCO_ERR_REMOTE),
          "combine after capacity error on rank %d: %s (%s)", r, disco_result_name(rc),
          disco_last_error());
  }
  /* And the comm is usable right after. */
  a.recv_capacity = CAP;
  CHECK_OK(disco_dispatch(comms[r], h, &a));
  combine_and_check(r, h, b, "combine after recovery", 1);
  disco_handle_destroy(h);
}

int main(void) {
  disco_config_t cfg = DISCO_CONFIG_INIT;
  cfg.num_experts = E;
  cfg.top_k = K;
  cfg.hidden = H;
  cfg.max_tokens = 3;
  cfg.dtype = DISCO_DTYPE_FP32;
  cfg.timeout_ms = 20000;
  for (int r = 0; r < W; r++)
    for (int t = 0; t < 3; t++)
      for (int h = 0; h < H; h++) x[r][t][h] = (float)(100 * r + 10 * t + h);
  CHECK_OK(disco_comm_create_local(W, &cfg, comms));
  if (comms[0] == NULL) return unit_finish("test_plan");
  unit_run_ranks(W, rank_main, NULL);
  for (int r = 0; r < W; r++) disco_comm_destroy(comms[r]);
  return unit_finish("test_plan");
}
