/* Local backend: timeout names the missing rank and breaks the group (later
 * calls fail fast); many ranks (W = 64 and 1024) complete a dispatch/combine. */
#include <time.h>

#include "unit_util.h"

static disco_comm_t *comms[1024];

typedef struct big {
  int W;
} big_t;

static void big_rank(int r, void *ctx) {
  big_t *b = ctx;
  disco_handle_t *h = NULL;
  _Alignas(16) float x[2][4], recv[2 * 1024][4], out[2][4];
  int64_t idx[2] = {(r + 1) % b->W, (r * 7 + 3) % b->W};
  for (int i = 0; i < 8; i++) x[i / 4][i % 4] = (float)(r * 8 + i);
  CHECK_OK(disco_handle_create(comms[r], &h));
  disco_dispatch_args_t a = DISCO_DISPATCH_ARGS_INIT;
  a.x = x;
  a.topk_idx = idx;
  a.num_tokens = 2;
  a.recv_capacity = 2 * b->W;
  a.recv_x = recv;
  CHECK_OK(disco_dispatch(comms[r], h, &a));
  disco_combine_args_t c = DISCO_COMBINE_ARGS_INIT;
  c.y = recv;
  c.out = out;
  CHECK_OK(disco_combine(comms[r], h, &c));
  /* K = 1, identity experts: the round trip is exact. */
  CHECK(memcmp(out, x, sizeof(x)) == 0, "W=%d rank %d round trip", b->W, r);
  disco_handle_destroy(h);
}

static void run_big(int W) {
  disco_config_t cfg = DISCO_CONFIG_INIT;
  cfg.num_experts = W;
  cfg.top_k = 1;
  cfg.hidden = 4;
  cfg.max_tokens = 2;
  cfg.dtype = DISCO_DTYPE_FP32;
  cfg.timeout_ms = 60000;
  CHECK_OK(disco_comm_create_local(W, &cfg, comms));
  if (comms[0] == NULL) return;
  big_t b = {W};
  unit_run_ranks(W, big_rank, &b);
  for (int r = 0; r < W; r++) disco_comm_destroy(comms[r]);
}

static void timeout_rank(int r, void *ctx) {
  (void)ctx;
  disco_handle_t *h = NULL;
  CHECK_OK(disco_handle_create(comms[r], &h));
  disco_dispatch_args_t a = DISCO_DISPATCH_ARGS_INIT; /* 0 tokens */
  if (r != 1) {
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    disco_result_t rc = disco_dispatch(comms[r], h, &a);
    CHECK(rc == DISCO_ERR_TIMEOUT, "rank %d: %s", r, disco_result_name(rc));
    CHECK(strstr(disco_last_error(), "missing ranks: 1") != NULL, "rank %d message '%s'",
          r, disco_last_error());
    /* Broken group: the next call fails at once. */
    clock_gettime(CLOCK_MONOTONIC, &t0);
    rc = disco_dispatch(comms[r], h, &a);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double ms = (t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) / 1e6;
    CHECK(rc == DISCO_ERR_TIMEOUT && ms < 100.0, "rank %d: second call %s after %.1f ms",
          r, disco_result_name(rc), ms);
  }
  disco_handle_destroy(h);
}

int main(void) {
  disco_config_t cfg = DISCO_CONFIG_INIT;
  cfg.num_experts = 3;
  cfg.top_k = 1;
  cfg.hidden = 8;
  cfg.max_tokens = 1;
  cfg.timeout_ms = 200;
  CHECK_OK(disco_comm_create_local(3, &cfg, comms));
  if (comms[0] != NULL) {
    unit_run_ranks(3, timeout_rank, NULL);
    for (int r = 0; r < 3; r++) disco_comm_destroy(comms[r]);
  }
  run_big(64);
  run_big(1024);
  return unit_finish("test_local");
}
