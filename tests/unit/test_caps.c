/* disco_comm_caps, disco_comm_max_recv_rows and disco_comm_check on the host
 * backends: bits, bounds (reached by the worst routing, per the reference) and
 * argument errors. */
#include "ref/ref.h"
#include "unit_util.h"

#define W 4
#define E 16 /* 4 local experts per rank */
#define K 6
#define M 10
#define H 8

int main(void) {
  disco_config_t cfg = DISCO_CONFIG_INIT;
  disco_comm_t *comms[W];
  int64_t rows = -1;
  cfg.num_experts = E;
  cfg.top_k = K;
  cfg.hidden = H;
  cfg.max_tokens = M;
  cfg.dtype = DISCO_DTYPE_FP32;
  CHECK_OK(disco_comm_create_local(W, &cfg, comms));
  if (comms[0] == NULL) return 1;
  disco_comm_t *c = comms[0];

  /* Host backends wait for everything: no caps, nothing latched. */
  CHECK(disco_comm_caps(c) == 0u, "local caps %u", disco_comm_caps(c));
  CHECK(disco_comm_caps(NULL) == 0u, "NULL caps");
  CHECK_OK(disco_comm_check(c, 1));
  CHECK_OK(disco_comm_check(c, 0));
  CHECK_ERR(disco_comm_check(NULL, 1), DISCO_ERR_NULL_POINTER, "comm");

  /* W * M * min(K, E_loc) (+ E_loc * (align - 1)); W * M for RANK_MAJOR. */
  CHECK_OK(disco_comm_max_recv_rows(c, DISCO_LAYOUT_EXPERT_MAJOR, 1, &rows));
  CHECK(rows == W * M * 4, "expert-major bound %lld", (long long)rows);
  CHECK_OK(disco_comm_max_recv_rows(c, DISCO_LAYOUT_EXPERT_MAJOR, 0, &rows));
  CHECK(rows == W * M * 4, "alignment 0 bound %lld", (long long)rows);
  CHECK_OK(disco_comm_max_recv_rows(c, DISCO_LAYOUT_EXPERT_MAJOR, 8, &rows));
  CHECK(rows == W * M * 4 + 4 * 7, "aligned bound %lld", (long long)rows);
  CHECK_OK(disco_comm_max_recv_rows(c, DISCO_LAYOUT_RANK_MAJOR, 8, &rows));
  CHECK(rows == W * M, "rank-major bound %lld", (long long)rows);
  CHECK_ERR(disco_comm_max_recv_rows(c, (disco_layout_t)7, 1, &rows),
            DISCO_ERR_INVALID_ARGUMENT, "layout");
  CHECK_ERR(disco_comm_max_recv_rows(c, DISCO_LAYOUT_EXPERT_MAJOR, -1, &rows),
            DISCO_ERR_INVALID_ARGUMENT, "expert_alignment");
  CHECK_ERR(disco_comm_max_recv_rows(c, DISCO_LAYOUT_EXPERT_MAJOR, 1, NULL),
            DISCO_ERR_NULL_POINTER, "rows");
  CHECK_ERR(disco_comm_max_recv_rows(NULL, DISCO_LAYOUT_EXPERT_MAJOR, 1, &rows),
            DISCO_ERR_NULL_POINTER, "comm");

  /* The worst routing reaches the bound: every token of every rank picks all
   * four experts of rank 0 (and two of rank 1). */
  static float x[W][M * H];
  static int64_t idx[W][M * K];
  disco_ref_input_t in[W];
  for (int q = 0; q < W; q++) {
    for (int t = 0; t < M; t++)
      for (int j = 0; j < K; j++) idx[q][t * K + j] = j;
    in[q].num_tokens = M;
    in[q].x = x[q];
    in[q].topk_idx = idx[q];
    in[q].topk_weights = NULL;
  }
  disco_ref_output_t out;
  memset(&out, 0, sizeof(out));
  CHECK(disco_ref_dispatch(&cfg, W, 0, in, DISCO_LAYOUT_EXPERT_MAJOR, 1, &out) == 0,
        "ref");
  CHECK_OK(disco_comm_max_recv_rows(c, DISCO_LAYOUT_EXPERT_MAJOR, 1, &rows));
  CHECK(out.num_rows == rows, "worst routing gives %lld rows, bound %lld",
        (long long)out.num_rows, (long long)rows);
  disco_ref_output_free(&out);
  memset(&out, 0, sizeof(out));
  CHECK(disco_ref_dispatch(&cfg, W, 1, in, DISCO_LAYOUT_RANK_MAJOR, 1, &out) == 0, "ref");
  CHECK_OK(disco_comm_max_recv_rows(c, DISCO_LAYOUT_RANK_MAJOR, 1, &rows));
  CHECK(out.num_rows == rows, "rank-major worst %lld, bound %lld",
        (long long)out.num_rows, (long long)rows);
  disco_ref_output_free(&out);

  for (int q = 0; q < W; q++) disco_comm_destroy(comms[q]);
  if (unit_failures) fprintf(stderr, "test_caps: %d failure(s)\n", unit_failures);
  return unit_failures != 0;
}
