/* The reference checked against a routing worked out by hand (W=2, E=4, K=2),
 * since every other test trusts it. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "ref/ref.h"

static int failures;
#define CHECK(cond)                                                            \
  do {                                                                         \
    if (!(cond)) {                                                             \
      fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
      failures++;                                                              \
    }                                                                          \
  } while (0)

enum { H = 8 };

int main(void) {
  disco_config_t cfg = DISCO_CONFIG_INIT;
  cfg.num_experts = 4;
  cfg.top_k = 2;
  cfg.hidden = H;
  cfg.max_tokens = 3;
  cfg.dtype = DISCO_DTYPE_FP32;
  float x0[3 * H], x1[1 * H];
  for (int i = 0; i < 3 * H; i++) x0[i] = (float)(i + 1);
  for (int i = 0; i < H; i++) x1[i] = (float)(100 + i);
  int64_t idx0[] = {1, 2, 3, -1, -1, -1};
  float w0[] = {0.5f, 0.25f, 1.0f, 0.0f, 0.0f, 0.0f};
  int64_t idx1[] = {0, 1};
  float w1[] = {2.0f, 4.0f};
  disco_ref_input_t in[2] = {{3, x0, idx0, w0}, {1, x1, idx1, w1}};

  /* rank 0, EXPERT_MAJOR, alignment 2: e0 <- (1,0) + pad; e1 <- (0,0), (1,0) */
  disco_ref_output_t o;
  CHECK(disco_ref_dispatch(&cfg, 2, 0, in, DISCO_LAYOUT_EXPERT_MAJOR, 2, &o) == 0);
  CHECK(o.num_rows == 4);
  int32_t sr[] = {1, -1, 0, 1}, st[] = {0, -1, 0, 0}, ex[] = {0, -1, 1, 1};
  float wt[] = {2.0f, 0.0f, 0.5f, 4.0f};
  CHECK(memcmp(o.src_rank, sr, sizeof(sr)) == 0);
  CHECK(memcmp(o.src_token, st, sizeof(st)) == 0);
  CHECK(memcmp(o.expert, ex, sizeof(ex)) == 0);
  CHECK(memcmp(o.weight, wt, sizeof(wt)) == 0);
  CHECK(o.tokens_per_expert[0] == 2 && o.tokens_per_expert[1] == 2);
  CHECK(o.n_tokens_to_rank[0] == 1 && o.n_tokens_to_rank[1] == 2);
  CHECK(o.n_tokens_from_rank[0] == 1 && o.n_tokens_from_rank[1] == 1);
  CHECK(((float *)o.recv_x)[0] == 100.0f && ((float *)o.recv_x)[H] == 0.0f);
  CHECK(((float *)o.recv_x)[2 * H] == 1.0f && ((float *)o.recv_x)[3 * H] == 100.0f);
  disco_ref_output_t o1;
  CHECK(disco_ref_dispatch(&cfg, 2, 1, in, DISCO_LAYOUT_EXPERT_MAJOR, 2, &o1) == 0);
  CHECK(o1.num_rows == 4 && o1.src_token[0] == 0 && o1.src_token[2] == 1);

  /* combine with identity experts: rank 0 token 0 = 0.5x + 0.25x, token 1 = x,
   * token 2 = 0; rank 1 token 0 = 2x + 4x */
  const void *ys[2] = {o.recv_x, o1.recv_x};
  float out0[3 * H], out1[H];
  CHECK(disco_ref_combine(&cfg, 2, 0, in, DISCO_LAYOUT_EXPERT_MAJOR, 2, ys, 1, out0) ==
        0);
  CHECK(disco_ref_combine(&cfg, 2, 1, in, DISCO_LAYOUT_EXPERT_MAJOR, 2, ys, 1, out1) ==
        0);
  for (int h = 0; h < H; h++) {
    CHECK(out0[h] == 0.5f * x0[h] + 0.25f * x0[h]);
    CHECK(out0[H + h] == x0[H + h]);
    CHECK(out0[2 * H + h] == 0.0f && !signbit(out0[2 * H + h]));
    CHECK(out1[h] == 2.0f * x1[h] + 4.0f * x1[h]);
  }
  /* unweighted: plain sums */
  CHECK(disco_ref_combine(&cfg, 2, 1, in, DISCO_LAYOUT_EXPERT_MAJOR, 2, ys, 0, out1) ==
        0);
  CHECK(out1[3] == 2.0f * x1[3]);
  disco_ref_output_free(&o1);
  disco_ref_output_free(&o);

  /* RANK_MAJOR on rank 0: rows (0,0), (1,0); K local ids and weights */
  CHECK(disco_ref_dispatch(&cfg, 2, 0, in, DISCO_LAYOUT_RANK_MAJOR, 1, &o) == 0);
  CHECK(o.num_rows == 2);
  int32_t ex_r[] = {1, -1, 0, 1};
  float wt_r[] = {0.5f, 0.0f, 2.0f, 4.0f};
  CHECK(memcmp(o.expert, ex_r, sizeof(ex_r)) == 0);
  CHECK(memcmp(o.weight, wt_r, sizeof(wt_r)) == 0);
  CHECK(o.tokens_per_expert[0] == 1 && o.tokens_per_expert[1] == 2);
  CHECK(disco_ref_dispatch(&cfg, 2, 1, in, DISCO_LAYOUT_RANK_MAJOR, 1, &o1) == 0);
  CHECK(o1.num_rows == 2); /* rank 0's tokens 0 and 1 */
  const void *yr[2] = {o.recv_x, o1.recv_x};
  CHECK(disco_ref_combine(&cfg, 2, 0, in, DISCO_LAYOUT_RANK_MAJOR, 1, yr, 1, out0) == 0);
  for (int h = 0; h < H; h++) {
    CHECK(out0[h] == x0[h] + x0[h]); /* reached ranks 0 and 1, caller-reduced rows */
    CHECK(out0[H + h] == x0[H + h]);
  }
  disco_ref_output_free(&o1);
  disco_ref_output_free(&o);

  if (failures) {
    fprintf(stderr, "test_ref: %d check(s) failed\n", failures);
    return 1;
  }
  printf("test_ref: ok\n");
  return 0;
}
