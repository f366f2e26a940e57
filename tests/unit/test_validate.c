/* Validation of dispatch/combine arguments (docs/semantics.md table) through
 * the local backend, W = 2: rank 1 gets the bad input and must return the
 * specific code with a message naming the argument and its rank; rank 0 must
 * return DISCO_ERR_REMOTE naming rank 1 (or succeed, for checks after the
 * count exchange that only fail the receiving rank). */
#include <stddef.h>
#include <stdint.h>

#include "unit_util.h"

#define W 2
#define E 8
#define K 4
#define H 16
#define T 4
#define CAP 64

static disco_comm_t *comms[W];
static disco_handle_t *handles[W];
static _Alignas(16) uint16_t x[W][T * H + 8];
static _Alignas(16) uint16_t recv_x[W][CAP * H + 8];
static _Alignas(16) uint16_t out[W][T * H + 8];
static int64_t idx[W][T * K];
static int32_t idx32[W][T * K];

typedef enum { PEER_REMOTE, PEER_OK } peer_t;

typedef struct vcase {
  const char *name;
  disco_result_t code;
  const char *needle; /* in rank 1's message, with "rank 1" */
  peer_t peer;
  void (*mutate)(disco_dispatch_args_t *a, int64_t *bad_idx);
  disco_dispatch_args_t *null_args; /* pass NULL args */
} vcase_t;

static void m_magic(disco_dispatch_args_t *a, int64_t *i) {
  (void)i;
  a->magic = 1;
}
static void m_size(disco_dispatch_args_t *a, int64_t *i) {
  (void)i;
  a->size = 4;
}
static void m_version(disco_dispatch_args_t *a, int64_t *i) {
  (void)i;
  a->version = 99;
}
static void m_many(disco_dispatch_args_t *a, int64_t *i) {
  (void)i;
  a->num_tokens = T + 1;
}
static void m_neg(disco_dispatch_args_t *a, int64_t *i) {
  (void)i;
  a->num_tokens = -1;
}
static void m_xnull(disco_dispatch_args_t *a, int64_t *i) {
  (void)i;
  a->x = NULL;
}
static void m_inull(disco_dispatch_args_t *a, int64_t *i) {
  (void)i;
  a->topk_idx = NULL;
}
static void m_xmis(disco_dispatch_args_t *a, int64_t *i) {
  (void)i;
  a->x = (const char *)a->x + 2;
}
static void m_rxmis(disco_dispatch_args_t *a, int64_t *i) {
  (void)i;
  a->recv_x = (char *)a->recv_x + 8;
}
static void m_layout(disco_dispatch_args_t *a, int64_t *i) {
  (void)i;
  a->layout = (disco_layout_t)7;
}
static void m_itype(disco_dispatch_args_t *a, int64_t *i) {
  (void)i;
  a->index_type = (disco_index_type_t)3;
}
static void m_align(disco_dispatch_args_t *a, int64_t *i) {
  (void)i;
  a->expert_alignment = -2;
}
static void m_flags(disco_dispatch_args_t *a, int64_t *i) {
  (void)i;
  a->flags = 0x80;
}
static void m_cap(disco_dispatch_args_t *a, int64_t *i) {
  (void)i;
  a->recv_capacity = -1;
}
static void m_range(disco_dispatch_args_t *a, int64_t *i) {
  (void)a;
  i[2 * K + 3] = 300;
}
static void m_below(disco_dispatch_args_t *a, int64_t *i) {
  (void)a;
  i[1 * K + 0] = -2;
}
static void m_dup(disco_dispatch_args_t *a, int64_t *i) {
  (void)a;
  i[3 * K + 1] = 5;
  i[3 * K + 3] = 5;
}
static void m_range32(disco_dispatch_args_t *a, int64_t *i) {
  (void)i;
  a->index_type = DISCO_INDEX_INT32;
  a->topk_idx = idx32[1];
  idx32[1][1 * K + 2] = 8;
}
static void m_rxnull(disco_dispatch_args_t *a, int64_t *i) {
  (void)i;
  a->recv_x = NULL;
}
static void m_reuse(disco_dispatch_args_t *a, int64_t *i) {
  (void)i;
  a->flags = DISCO_DISPATCH_REUSE_LAYOUT;
}
static void m_ok(disco_dispatch_args_t *a, int64_t *i) {
  (void)a;
  (void)i;
}

static disco_dispatch_args_t null_marker;

static const vcase_t cases[] = {
    {"null args", DISCO_ERR_NULL_POINTER, "args is NULL", PEER_REMOTE, m_ok,
     &null_marker},
    {"magic", DISCO_ERR_BAD_STRUCT, "args->magic", PEER_REMOTE, m_magic, NULL},
    {"size", DISCO_ERR_BAD_STRUCT, "args->size", PEER_REMOTE, m_size, NULL},
    {"version", DISCO_ERR_BAD_STRUCT, "args->version", PEER_REMOTE, m_version, NULL},
    {"too many", DISCO_ERR_TOO_MANY_TOKENS, "num_tokens = 5", PEER_REMOTE, m_many, NULL},
    {"negative", DISCO_ERR_TOO_MANY_TOKENS, "num_tokens = -1", PEER_REMOTE, m_neg, NULL},
    {"x null", DISCO_ERR_NULL_POINTER, "args->x is NULL", PEER_REMOTE, m_xnull, NULL},
    {"idx null", DISCO_ERR_NULL_POINTER, "args->topk_idx", PEER_REMOTE, m_inull, NULL},
    {"x misaligned", DISCO_ERR_MISALIGNED, "args->x", PEER_REMOTE, m_xmis, NULL},
    {"recv_x misaligned", DISCO_ERR_MISALIGNED, "args->recv_x", PEER_REMOTE, m_rxmis,
     NULL},
    {"layout", DISCO_ERR_INVALID_ARGUMENT, "args->layout", PEER_REMOTE, m_layout, NULL},
    {"index type", DISCO_ERR_INVALID_ARGUMENT, "args->index_type", PEER_REMOTE, m_itype,
     NULL},
    {"alignment", DISCO_ERR_INVALID_ARGUMENT, "args->expert_alignment", PEER_REMOTE,
     m_align, NULL},
    {"flags", DISCO_ERR_INVALID_ARGUMENT, "args->flags", PEER_REMOTE, m_flags, NULL},
    {"capacity < 0", DISCO_ERR_INVALID_ARGUMENT, "args->recv_capacity", PEER_REMOTE,
     m_cap, NULL},
    {"id range", DISCO_ERR_EXPERT_OUT_OF_RANGE,
     "disco_dispatch: topk_idx[2][3] = 300 outside [-1, 8) on rank 1", PEER_REMOTE,
     m_range, NULL},
    {"id below -1", DISCO_ERR_EXPERT_OUT_OF_RANGE, "topk_idx[1][0] = -2", PEER_REMOTE,
     m_below, NULL},
    {"duplicate", DISCO_ERR_DUPLICATE_EXPERT, "topk_idx[3][3] = 5 repeats topk_idx[3][1]",
     PEER_REMOTE, m_dup, NULL},
    {"int32 id range", DISCO_ERR_EXPERT_OUT_OF_RANGE, "topk_idx[1][2] = 8", PEER_REMOTE,
     m_range32, NULL},
    {"recv_x null", DISCO_ERR_NULL_POINTER, "args->recv_x is NULL", PEER_OK, m_rxnull,
     NULL},
    {"reuse without plan", DISCO_ERR_INVALID_USAGE, "REUSE_LAYOUT", PEER_REMOTE, m_reuse,
     NULL},
};

static void base_args(int r, disco_dispatch_args_t *a) {
  disco_dispatch_args_t d = DISCO_DISPATCH_ARGS_INIT;
  *a = d;
  for (int t = 0; t < T; t++)
    for (int j = 0; j < K; j++) {
      idx[r][t * K + j] = (t + 2 * j + r) % E; /* distinct per row */
      idx32[r][t * K + j] = (int32_t)idx[r][t * K + j];
    }
  a->x = x[r];
  a->topk_idx = idx[r];
  a->num_tokens = T;
  a->recv_capacity = CAP;
  a->recv_x = recv_x[r];
}

static void run_combine_cases(int r) {
  disco_combine_args_t c = DISCO_COMBINE_ARGS_INIT;
  disco_result_t rc;
  /* After the failed dispatches above, no handle holds a plan. */
  c.y = recv_x[r];
  c.out = out[r];
  rc = disco_combine(comms[r], handles[r], &c);
  CHECK(rc == DISCO_ERR_INVALID_USAGE, "combine without dispatch on rank %d: %s", r,
        disco_result_name(rc));
  CHECK(strstr(disco_last_error(), "disco_combine") != NULL, "message '%s'",
        disco_last_error());

  disco_dispatch_args_t a;
  base_args(r, &a);
  CHECK_OK(disco_dispatch(comms[r], handles[r], &a));
  int64_t rows = 0;
  CHECK_OK(disco_handle_num_recv_rows(handles[r], &rows));

  struct {
    const char *name;
    disco_result_t code;
    const char *needle;
    disco_combine_args_t args;
    int null_args;
  } cc[5];
  for (int i = 0; i < 5; i++) {
    disco_combine_args_t d = DISCO_COMBINE_ARGS_INIT;
    d.y = recv_x[r];
    d.out = out[r];
    cc[i].args = d;
    cc[i].null_args = 0;
  }
  cc[0].name = "magic", cc[0].code = DISCO_ERR_BAD_STRUCT, cc[0].needle = "args->magic";
  cc[0].args.magic = 0;
  cc[1].name = "y null", cc[1].code = DISCO_ERR_NULL_POINTER, cc[1].needle = "args->y";
  cc[1].args.y = NULL;
  cc[2].name = "out null", cc[2].code = DISCO_ERR_NULL_POINTER,
  cc[2].needle = "args->out";
  cc[2].args.out = NULL;
  cc[3].name = "y_rows", cc[3].code = DISCO_ERR_CAPACITY, cc[3].needle = "args->y_rows";
  cc[3].args.y_rows = rows - 1;
  cc[4].name = "null args", cc[4].code = DISCO_ERR_NULL_POINTER, cc[4].needle = "args";
  cc[4].null_args = 1;
  for (int i = 0; i < 5; i++) {
    disco_combine_args_t good = DISCO_COMBINE_ARGS_INIT;
    good.y = recv_x[r];
    good.out = out[r];
    const disco_combine_args_t *p =
        r == 1 ? (cc[i].null_args ? NULL : &cc[i].args) : &good;
    rc = disco_combine(comms[r], handles[r], p);
    if (r == 1) {
      CHECK(rc == cc[i].code, "combine %s: %s want %s (%s)", cc[i].name,
            disco_result_name(rc), disco_result_name(cc[i].code), disco_last_error());
      CHECK(strstr(disco_last_error(), cc[i].needle) &&
                strstr(disco_last_error(), "rank 1"),
            "combine %s: message '%s'", cc[i].name, disco_last_error());
    } else {
      CHECK(rc == DISCO_ERR_REMOTE, "combine %s on rank 0: %s", cc[i].name,
            disco_result_name(rc));
      CHECK(strstr(disco_last_error(), "rank 1") != NULL, "message '%s'",
            disco_last_error());
    }
  }
  /* Handle of another communicator. */
  rc = disco_combine(comms[r], r == 1 ? handles[0] : handles[r], &c);
  if (r == 1)
    CHECK(rc == DISCO_ERR_INVALID_USAGE && strstr(disco_last_error(), "another"),
          "foreign handle: %s (%s)", disco_result_name(rc), disco_last_error());
  else
    CHECK(rc == DISCO_ERR_REMOTE, "foreign handle peer: %s", disco_result_name(rc));
  /* Still usable. */
  CHECK_OK(disco_combine(comms[r], handles[r], &c));
}

static void rank_main(int r, void *ctx) {
  (void)ctx;
  CHECK_OK(disco_handle_create(comms[r], &handles[r]));
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
    const vcase_t *vc = &cases[i];
    disco_dispatch_args_t a;
    base_args(r, &a);
    if (r == 1) vc->mutate(&a, idx[1]);
    const disco_dispatch_args_t *p = (r == 1 && vc->null_args) ? NULL : &a;
    disco_result_t rc = disco_dispatch(comms[r], handles[r], p);
    if (r == 1) {
      CHECK(rc == vc->code, "%s: got %s want %s (%s)", vc->name, disco_result_name(rc),
            disco_result_name(vc->code), disco_last_error());
      CHECK(strstr(disco_last_error(), vc->needle) != NULL, "%s: message '%s' lacks '%s'",
            vc->name, disco_last_error(), vc->needle);
      CHECK(strstr(disco_last_error(), "rank 1") != NULL, "%s: message '%s' lacks rank",
            vc->name, disco_last_error());
      CHECK(strncmp(disco_last_error(), "disco_dispatch", 14) == 0,
            "%s: message '%s' lacks function", vc->name, disco_last_error());
    } else if (vc->peer == PEER_REMOTE) {
      CHECK(rc == DISCO_ERR_REMOTE, "%s on rank 0: got %s (%s)", vc->name,
            disco_result_name(rc), disco_last_error());
      CHECK(strstr(disco_last_error(), "rank 1") != NULL, "%s: remote message '%s'",
            vc->name, disco_last_error());
    } else {
      CHECK(rc == DISCO_SUCCESS, "%s on rank 0: got %s (%s)", vc->name,
            disco_result_name(rc), disco_last_error());
    }
    /* Nothing was moved on error: the next (good) dispatch must then work; it
     * is done once per case to prove the comm stays usable. */
    disco_dispatch_args_t g;
    base_args(r, &g);
    CHECK_OK(disco_dispatch(comms[r], handles[r], &g));
    /* Fail the handle again so REUSE/combine cases see no plan. */
    disco_dispatch_args_t bad;
    base_args(r, &bad);
    bad.num_tokens = -1;
    disco_dispatch(comms[r], handles[r], &bad);
  }
  run_combine_cases(r);
}

int main(void) {
  disco_config_t cfg = DISCO_CONFIG_INIT;
  cfg.num_experts = E;
  cfg.top_k = K;
  cfg.hidden = H;
  cfg.max_tokens = T;
  cfg.timeout_ms = 20000;
  CHECK_OK(disco_comm_create_local(W, &cfg, comms));
  if (comms[0] == NULL) return unit_finish("test_validate");

  /* Single-call checks that need no peer. */
  CHECK_ERR(disco_dispatch(NULL, NULL, NULL), DISCO_ERR_NULL_POINTER, "comm");
  CHECK_ERR(disco_combine(NULL, NULL, NULL), DISCO_ERR_NULL_POINTER, "comm");
  CHECK_ERR(disco_handle_create(comms[0], NULL), DISCO_ERR_NULL_POINTER, "handle");

  unit_run_ranks(W, rank_main, NULL);
  for (int r = 0; r < W; r++) {
    disco_handle_destroy(handles[r]);
    disco_comm_destroy(comms[r]);
  }
  return unit_finish("test_validate");
}
