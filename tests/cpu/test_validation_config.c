/* Validation at creation (disco_comm_create_local) and of the non-collective
 * entry points: every bad config gives its code, a message naming the field,
 * and no communicator; NULL destroys are no-ops. */
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "harness.h"
#include "world.h"

static disco_config_t good_config(void) {
  disco_config_t cfg = DISCO_CONFIG_INIT;
  cfg.num_experts = 8;
  cfg.top_k = 2;
  cfg.hidden = 8;
  cfg.max_tokens = 16;
  cfg.dtype = DISCO_DTYPE_BF16;
  return cfg;
}

/* want == DISCO_SUCCESS + 1000 means "any error". */
#define ANY_ERROR ((disco_result_t)1000)

static void expect_create(const char *name, int world, const disco_config_t *cfg,
                          disco_result_t want, const char *names) {
  disco_comm_t *comms[8];
  for (int r = 0; r < 8; r++) comms[r] = (disco_comm_t *)(uintptr_t)0x1;
  disco_result_t rc = disco_comm_create_local(world, cfg, comms);
  char msg[512];
  snprintf(msg, sizeof(msg), "%s", disco_last_error());
  int before = th_failures();
  if (want == ANY_ERROR)
    TH_CHECK(rc != DISCO_SUCCESS, "%s: succeeded, want an error", name);
  else
    TH_CHECK(rc == want, "%s: got %s, want %s (\"%s\")", name, disco_result_name(rc),
             disco_result_name(want), msg);
  if (rc == DISCO_SUCCESS) {
    for (int r = 0; r < world; r++) disco_comm_destroy(comms[r]);
  } else {
    for (int r = 0; r < world && r < 8; r++)
      TH_CHECK(comms[r] == NULL, "%s: comms[%d] not set to NULL on failure", name, r);
    TH_CHECK(msg[0] != '\0', "%s: disco_last_error() is empty after %s", name,
             disco_result_name(rc));
    if (names)
      TH_CHECK(th_msg_names(msg, names), "%s: message names none of {%s}: \"%s\"", name,
               names, msg);
  }
  printf("%-36s %s (%s)\n", name, th_failures() == before ? "ok" : "FAILED",
         disco_result_name(rc));
}

static void config_cases(void) {
  disco_config_t c;
  c = good_config();
  expect_create("good config", 4, &c, DISCO_SUCCESS, NULL);
  c.magic ^= 0x100u;
  expect_create("config bad magic", 4, &c, DISCO_ERR_BAD_STRUCT, "config|magic");
  c = good_config();
  c.size = offsetof(disco_config_t, num_experts);
  expect_create("config size too small", 4, &c, DISCO_ERR_BAD_STRUCT, "config|size");
  c = good_config();
  c.size = 0;
  expect_create("config size 0", 4, &c, DISCO_ERR_BAD_STRUCT, "config|size");
  c = good_config();
  c.version = DISCO_STRUCT_VERSION + 1;
  expect_create("config newer version", 4, &c, DISCO_ERR_BAD_STRUCT, "config|version");
  c = good_config();
  c.num_experts = 6;
  expect_create("E % W != 0", 4, &c, DISCO_ERR_EXPERT_DIVISIBILITY, "num_experts");
  c = good_config();
  c.hidden = 4; /* 8 bytes of bf16 */
  expect_create("H*2 % 16 != 0 (bf16)", 2, &c, DISCO_ERR_HIDDEN_ALIGNMENT, "hidden");
  c.dtype = DISCO_DTYPE_FP16;
  c.hidden = 12; /* 24 bytes */
  expect_create("H*2 % 16 != 0 (fp16)", 2, &c, DISCO_ERR_HIDDEN_ALIGNMENT, "hidden");
  c.dtype = DISCO_DTYPE_FP32;
  c.hidden = 6; /* 24 bytes */
  expect_create("H*4 % 16 != 0 (fp32)", 2, &c, DISCO_ERR_HIDDEN_ALIGNMENT, "hidden");
  c = good_config();
  c.dtype = (disco_dtype_t)9;
  expect_create("bad dtype", 2, &c, DISCO_ERR_INVALID_ARGUMENT, "dtype");
  c = good_config();
  c.combine_wire = (disco_combine_wire_t)5;
  expect_create("bad combine_wire", 2, &c, DISCO_ERR_INVALID_ARGUMENT, "combine_wire");
  c = good_config();
  c.top_k = 0;
  expect_create("top_k 0", 2, &c, DISCO_ERR_INVALID_ARGUMENT, "top_k");
  c.top_k = DISCO_MAX_TOP_K + 1;
  c.num_experts = 128;
  expect_create("top_k > DISCO_MAX_TOP_K", 2, &c, DISCO_ERR_INVALID_ARGUMENT, "top_k");
  c = good_config();
  c.num_experts = 0;
  expect_create("num_experts 0", 2, &c, ANY_ERROR, "num_experts");
  c = good_config();
  c.num_experts = -8;
  expect_create("num_experts < 0", 2, &c, ANY_ERROR, "num_experts");
  c = good_config();
  c.hidden = 0;
  expect_create("hidden 0", 2, &c, ANY_ERROR, "hidden");
  c = good_config();
  c.hidden = -16;
  expect_create("hidden < 0", 2, &c, ANY_ERROR, "hidden");
  c = good_config();
  c.max_tokens = -1;
  expect_create("max_tokens < 0", 2, &c, ANY_ERROR, "max_tokens");
  c = good_config();
  c.hidden = (int64_t)1 << 40;
  expect_create("hidden 2^40", 2, &c, ANY_ERROR, NULL);
  c = good_config();
  c.max_tokens = (int64_t)1 << 40;
  expect_create("max_tokens 2^40", 2, &c, ANY_ERROR, NULL);
  c = good_config();
  c.max_tokens = (int64_t)1 << 40;
  c.hidden = (int64_t)1 << 40;
  c.top_k = 64;
  c.num_experts = 64;
  expect_create("max_tokens*hidden*top_k overflow", 2, &c, ANY_ERROR, NULL);
  c = good_config();
  expect_create("world_size 0", 0, &c, DISCO_ERR_INVALID_ARGUMENT, NULL);
  expect_create("world_size -1", -1, &c, DISCO_ERR_INVALID_ARGUMENT, NULL);
  expect_create("NULL config", 2, NULL, ANY_ERROR, NULL);
  /* A caller compiled against an older header: fields past `size` take their
   * defaults (garbage there must be ignored). */
  c = good_config();
  c.size = offsetof(disco_config_t, dtype);
  c.dtype = (disco_dtype_t)77;
  c.combine_wire = (disco_combine_wire_t)77;
  disco_comm_t *comms[2] = {NULL, NULL};
  TH_EXPECT_RC(disco_comm_create_local(2, &c, comms), DISCO_SUCCESS, "%s",
               "config with only the required fields");
  if (comms[0]) {
    disco_config_t got;
    memset(&got, 0xff, sizeof(got));
    TH_EXPECT_RC(disco_comm_get_config(comms[0], &got), DISCO_SUCCESS, "%s",
                 "get_config");
    TH_CHECK(got.dtype == DISCO_DTYPE_BF16 &&
                 got.combine_wire == DISCO_COMBINE_WIRE_FP32 && got.num_experts == 8 &&
                 got.hidden == 8,
             "defaults not applied: dtype %d wire %d E %d H %lld", (int)got.dtype,
             (int)got.combine_wire, got.num_experts, (long long)got.hidden);
    TH_CHECK(got.timeout_ms > 0, "normalised timeout_ms = %d", got.timeout_ms);
  }
  disco_comm_destroy(comms[0]);
  disco_comm_destroy(comms[1]);
}

static void misc_cases(void) {
  disco_comm_destroy(NULL);
  disco_handle_destroy(NULL);
  TH_CHECK(disco_comm_rank(NULL) == -1, "disco_comm_rank(NULL) = %d",
           disco_comm_rank(NULL));
  TH_CHECK(disco_comm_size(NULL) == -1, "disco_comm_size(NULL) = %d",
           disco_comm_size(NULL));
  disco_handle_t *h = (disco_handle_t *)(uintptr_t)0x1;
  disco_result_t rc = disco_handle_create(NULL, &h);
  TH_CHECK(rc != DISCO_SUCCESS, "disco_handle_create(NULL comm) succeeded");
  for (int i = 0; i <= (int)DISCO_RESULT_COUNT_; i++) {
    const char *s = disco_result_string((disco_result_t)i);
    const char *n = disco_result_name((disco_result_t)i);
    TH_CHECK(s && n && s[0] && n[0], "empty result string/name for %d", i);
  }
  TH_CHECK(strcmp(disco_result_name(DISCO_ERR_CAPACITY), "DISCO_ERR_CAPACITY") == 0,
           "disco_result_name(CAPACITY) = %s", disco_result_name(DISCO_ERR_CAPACITY));
  TH_CHECK(disco_get_version() == DISCO_VERSION, "version %d vs header %d",
           disco_get_version(), DISCO_VERSION);
  /* local comm properties */
  disco_config_t c = good_config();
  disco_comm_t *comms[4];
  if (th_comms_create(4, &c, comms) != 0) return;
  TH_CHECK(disco_comm_num_local_experts(comms[1]) == 2, "num_local_experts = %d",
           disco_comm_num_local_experts(comms[1]));
  TH_CHECK(strcmp(disco_comm_backend(comms[2]), "local") == 0, "backend = %s",
           disco_comm_backend(comms[2]));
  TH_CHECK(disco_comm_uses_device_memory(comms[3]) == 0, "local comm uses device memory");
  disco_handle_t *hd = NULL;
  TH_EXPECT_RC(disco_handle_create(comms[0], &hd), DISCO_SUCCESS, "%s", "handle_create");
  int64_t rows = 5;
  rc = disco_handle_num_recv_rows(hd, &rows);
  TH_CHECK(rc != DISCO_SUCCESS,
           "num_recv_rows of a handle without dispatch succeeded (%lld)",
           (long long)rows);
  disco_handle_destroy(hd);
  th_comms_destroy(4, comms, NULL);
}

/* A rank that never calls: its peers get DISCO_ERR_TIMEOUT after timeout_ms. */
static void timeout_rank(int rank, void *p) {
  disco_comm_t **comms = p;
  if (rank == 0) return;
  disco_handle_t *h = NULL;
  TH_EXPECT_RC(disco_handle_create(comms[rank], &h), DISCO_SUCCESS, "%s",
               "handle_create");
  disco_dispatch_args_t a = DISCO_DISPATCH_ARGS_INIT; /* T = 0 */
  disco_result_t rc = disco_dispatch(comms[rank], h, &a);
  TH_CHECK(rc == DISCO_ERR_TIMEOUT, "rank %d: dispatch without rank 0: got %s (%s)", rank,
           disco_result_name(rc), disco_last_error());
  disco_handle_destroy(h);
}

static void timeout_case(void) {
  disco_config_t c = good_config();
  c.timeout_ms = 300;
  disco_comm_t *comms[4];
  if (th_comms_create(4, &c, comms) != 0) return;
  int before = th_failures();
  th_run(4, timeout_rank, comms);
  printf("%-36s %s\n", "peer missing -> TIMEOUT",
         th_failures() == before ? "ok" : "FAILED");
  th_comms_destroy(4, comms, NULL);
}

int main(void) {
  timeout_case();
  config_cases();
  misc_cases();
  return th_finish("test_validation_config");
}
