/* Regression: whether combine applies weights must follow each token's own
 * rank, not the expert rank's. Rank 0 has no tokens (and so passes no
 * weights); rank 1's weighted tokens all go to rank 0's experts. Before the
 * fix rank 0 summed them unweighted. Checked against src/ref bit for bit. */
#include <string.h>

#include "ref/ref.h"
#include "unit_util.h"

enum { W = 2, E = 4, K = 2, H = 8, T1 = 3 };

static disco_comm_t *comms[W];
static float x1[T1 * H];
static int64_t idx1[T1 * K] = {0, 1, 1, -1, 0, 3};
static float w1[T1 * K] = {0.5f, 0.25f, 3.0f, 0.0f, 0.75f, 2.0f};
static disco_ref_input_t inputs[W];
static float out1[T1 * H];

static void rank_main(int r, void *ctx) {
  (void)ctx;
  disco_handle_t *h = NULL;
  float recv_x[W * T1 * K * H], y[W * T1 * K * H];
  CHECK_OK(disco_handle_create(comms[r], &h));
  disco_dispatch_args_t a = DISCO_DISPATCH_ARGS_INIT;
  a.x = r == 1 ? x1 : NULL;
  a.topk_idx = r == 1 ? idx1 : NULL;
  a.topk_weights = r == 1 ? w1 : NULL; /* rank 0: no tokens, no weights */
  a.num_tokens = r == 1 ? T1 : 0;
  a.recv_capacity = W * T1 * K;
  a.recv_x = recv_x;
  CHECK_OK(disco_dispatch(comms[r], h, &a));
  int64_t rows = 0;
  CHECK_OK(disco_handle_num_recv_rows(h, &rows));
  memcpy(y, recv_x, (size_t)rows * H * sizeof(float)); /* identity experts */
  disco_combine_args_t c = DISCO_COMBINE_ARGS_INIT;
  c.y = y;
  c.out = r == 1 ? out1 : NULL;
  CHECK_OK(disco_combine(comms[r], h, &c));
  disco_handle_destroy(h);
}

int main(void) {
  disco_config_t cfg = DISCO_CONFIG_INIT;
  cfg.num_experts = E;
  cfg.top_k = K;
  cfg.hidden = H;
  cfg.max_tokens = T1;
  cfg.dtype = DISCO_DTYPE_FP32;
  for (int i = 0; i < T1 * H; i++) x1[i] = 1.0f + (float)i / 7.0f;
  CHECK_OK(disco_comm_create_local(W, &cfg, comms));
  if (unit_failures) return unit_finish("test_weights_mixed");
  unit_run_ranks(W, rank_main, NULL);

  /* expected: reference over both ranks' dispatch outputs */
  inputs[0] = (disco_ref_input_t){0, NULL, NULL, NULL};
  inputs[1] = (disco_ref_input_t){T1, x1, idx1, w1};
  disco_ref_output_t o[W];
  const void *ys[W];
  for (int p = 0; p < W; p++) {
    CHECK(
        disco_ref_dispatch(&cfg, W, p, inputs, DISCO_LAYOUT_EXPERT_MAJOR, 1, &o[p]) == 0,
        "ref dispatch");
    ys[p] = o[p].recv_x;
  }
  float want[T1 * H];
  CHECK(disco_ref_combine(&cfg, W, 1, inputs, DISCO_LAYOUT_EXPERT_MAJOR, 1, ys, 1,
                          want) == 0,
        "ref combine");
  for (int i = 0; i < T1 * H; i++)
    CHECK(memcmp(&want[i], &out1[i], sizeof(float)) == 0, "out[%d][%d] = %g, want %g",
          i / H, i % H, (double)out1[i], (double)want[i]);
  /* token 0: 0.5x + 0.25x, both experts on rank 0 */
  CHECK(out1[0] == 0.5f * x1[0] + 0.25f * x1[0], "token 0 not weighted: %g",
        (double)out1[0]);
  for (int p = 0; p < W; p++) disco_ref_output_free(&o[p]);
  for (int r = 0; r < W; r++) disco_comm_destroy(comms[r]);
  return unit_finish("test_weights_mixed");
}
