/* Config validation at communicator creation (local backend). */
#include <stddef.h>

#include "unit_util.h"

static disco_config_t good(void) {
  disco_config_t c = DISCO_CONFIG_INIT;
  c.num_experts = 8;
  c.top_k = 2;
  c.hidden = 64;
  c.max_tokens = 16;
  return c;
}

/* Creation with W ranks must fail with `code` naming `needle`, leaving NULLs. */
static void expect_fail(int W, const disco_config_t *c, disco_result_t code,
                        const char *needle) {
  disco_comm_t *comms[4] = {(disco_comm_t *)1, (disco_comm_t *)1, (disco_comm_t *)1,
                            (disco_comm_t *)1};
  CHECK_ERR(disco_comm_create_local(W, c, comms), code, needle);
  /* An out-of-range world_size leaves the array alone (its length is unknown). */
  for (int i = 0; i < W && W <= 4; i++) CHECK(comms[i] == NULL, "comms[%d] not NULL", i);
}

int main(void) {
  /* INIT defaults. */
  disco_config_t d = DISCO_CONFIG_INIT;
  CHECK(d.size == sizeof(disco_config_t), "size");
  CHECK(d.magic == DISCO_CONFIG_MAGIC, "magic");
  CHECK(d.version == DISCO_STRUCT_VERSION, "version");
  CHECK(d.dtype == DISCO_DTYPE_BF16, "dtype default");
  CHECK(d.combine_wire == DISCO_COMBINE_WIRE_FP32, "wire default");
  CHECK(d.timeout_ms == 0 && d.max_sms == 0, "timeout/max_sms default");
  disco_dispatch_args_t da = DISCO_DISPATCH_ARGS_INIT;
  CHECK(da.magic == DISCO_DISPATCH_ARGS_MAGIC && da.expert_alignment == 1 &&
            da.layout == DISCO_LAYOUT_EXPERT_MAJOR && da.index_type == DISCO_INDEX_INT64,
        "dispatch args defaults");
  disco_combine_args_t ca = DISCO_COMBINE_ARGS_INIT;
  CHECK(ca.magic == DISCO_COMBINE_ARGS_MAGIC && ca.y_rows == -1 && ca.weighted == 1,
        "combine args defaults");

  /* A good config, normalised: timeout filled in, getters. */
  disco_config_t c = good();
  disco_comm_t *comms[4] = {0};
  CHECK_OK(disco_comm_create_local(2, &c, comms));
  if (comms[0] != NULL) {
    disco_config_t got = DISCO_CONFIG_INIT;
    CHECK_OK(disco_comm_get_config(comms[1], &got));
    CHECK(got.timeout_ms > 0, "timeout not normalised: %d", got.timeout_ms);
    CHECK(got.num_experts == 8 && got.hidden == 64, "config copy");
    CHECK(disco_comm_rank(comms[1]) == 1 && disco_comm_size(comms[1]) == 2, "rank/size");
    CHECK(disco_comm_num_local_experts(comms[0]) == 4, "E_loc");
    CHECK(strcmp(disco_comm_backend(comms[0]), "local") == 0, "backend name");
    CHECK(disco_comm_uses_device_memory(comms[0]) == 0, "device memory");
    disco_comm_destroy(comms[0]);
    disco_comm_destroy(comms[1]);
  }
  CHECK(disco_comm_rank(NULL) == -1 && disco_comm_size(NULL) == -1, "NULL getters");
  disco_comm_destroy(NULL);
  disco_handle_destroy(NULL);

  /* An older caller: size covers only the required fields, the rest default. */
  c = good();
  c.size = offsetof(disco_config_t, max_tokens) + sizeof(int64_t);
  c.dtype = (disco_dtype_t)77; /* beyond size: must be ignored */
  CHECK_OK(disco_comm_create_local(1, &c, comms));
  if (comms[0] != NULL) {
    disco_config_t got = DISCO_CONFIG_INIT;
    CHECK_OK(disco_comm_get_config(comms[0], &got));
    CHECK(got.dtype == DISCO_DTYPE_BF16, "defaulted dtype %d", got.dtype);
    disco_comm_destroy(comms[0]);
  }

  /* Environment timeout. */
  setenv("DISCO_TIMEOUT_MS", "1234", 1);
  c = good();
  CHECK_OK(disco_comm_create_local(1, &c, comms));
  if (comms[0] != NULL) {
    disco_config_t got = DISCO_CONFIG_INIT;
    disco_comm_get_config(comms[0], &got);
    CHECK(got.timeout_ms == 1234, "env timeout %d", got.timeout_ms);
    disco_comm_destroy(comms[0]);
  }
  unsetenv("DISCO_TIMEOUT_MS");

  c = good();
  c.magic = 0;
  expect_fail(2, &c, DISCO_ERR_BAD_STRUCT, "magic");
  c = good();
  c.size = 8;
  expect_fail(2, &c, DISCO_ERR_BAD_STRUCT, "size");
  c = good();
  c.version = DISCO_STRUCT_VERSION + 1;
  expect_fail(2, &c, DISCO_ERR_BAD_STRUCT, "version");
  expect_fail(2, NULL, DISCO_ERR_NULL_POINTER, "config");
  c = good();
  c.num_experts = 0;
  expect_fail(2, &c, DISCO_ERR_INVALID_ARGUMENT, "num_experts");
  c = good();
  c.top_k = 0;
  expect_fail(2, &c, DISCO_ERR_INVALID_ARGUMENT, "top_k");
  c.top_k = DISCO_MAX_TOP_K + 1;
  expect_fail(2, &c, DISCO_ERR_INVALID_ARGUMENT, "top_k");
  c = good();
  c.hidden = 0;
  expect_fail(2, &c, DISCO_ERR_INVALID_ARGUMENT, "hidden");
  c = good();
  c.max_tokens = -1;
  expect_fail(2, &c, DISCO_ERR_INVALID_ARGUMENT, "max_tokens");
  c = good();
  c.dtype = (disco_dtype_t)9;
  expect_fail(2, &c, DISCO_ERR_INVALID_ARGUMENT, "dtype");
  c = good();
  c.combine_wire = (disco_combine_wire_t)5;
  expect_fail(2, &c, DISCO_ERR_INVALID_ARGUMENT, "combine_wire");
  c = good();
  c.timeout_ms = -5;
  expect_fail(2, &c, DISCO_ERR_INVALID_ARGUMENT, "timeout_ms");
  c = good();
  expect_fail(0, &c, DISCO_ERR_INVALID_ARGUMENT, "world_size");
  expect_fail(1025, &c, DISCO_ERR_INVALID_ARGUMENT, "world_size");
  c = good();
  c.num_experts = 9;
  expect_fail(2, &c, DISCO_ERR_EXPERT_DIVISIBILITY, "num_experts");
  c = good();
  c.hidden = 4; /* 4 * 2 bytes = 8, not a multiple of 16 */
  expect_fail(2, &c, DISCO_ERR_HIDDEN_ALIGNMENT, "hidden");
  c.dtype = DISCO_DTYPE_FP32; /* 16 bytes: fine */
  CHECK_OK(disco_comm_create_local(2, &c, comms));
  disco_comm_destroy(comms[0]);
  disco_comm_destroy(comms[1]);
  /* Workspace sizes that overflow or cannot be allocated fail cleanly. */
  c = good();
  c.hidden = (int64_t)1 << 50;
  c.max_tokens = INT32_MAX;
  {
    disco_comm_t *cm[4] = {0};
    disco_result_t rc = disco_comm_create_local(4, &c, cm);
    CHECK(rc == DISCO_ERR_OUT_OF_MEMORY || rc == DISCO_ERR_INVALID_ARGUMENT,
          "huge workspace: %s", disco_result_name(rc));
    CHECK(cm[0] == NULL, "comm returned on failure");
  }
  {
    disco_comm_t *cm[1];
    CHECK_ERR(disco_comm_create_local(1, &c, NULL), DISCO_ERR_NULL_POINTER, "comms");
    (void)cm;
  }
  return unit_finish("test_config");
}
