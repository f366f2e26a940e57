/* One test per validation rule of docs/semantics.md. For each: the code on
 * the rank with the bad input, DISCO_ERR_REMOTE (or success) on its peers,
 * disco_last_error() naming the argument and the rank, guard bytes and
 * poisoned outputs intact, and a correct round on the same communicator
 * right after. The config rules are in test_validation_config.c. */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "world.h"

enum {
  OP_DISPATCH,
  OP_LAYOUT,
  OP_COMBINE,
  OP_COMBINE_NO_DISPATCH,
  OP_COMBINE_AFTER_LAYOUT,
  OP_FOREIGN_HANDLE,    /* dispatch with a handle of another communicator */
  OP_REUSE_AFTER_LAYOUT /* dispatch_layout, then the (mutated) REUSE_LAYOUT dispatch */
};

typedef struct vstate {
  disco_dispatch_args_t a;
  disco_combine_args_t c;
  th_buf_t scratch; /* a misaligned or modified copy of an input */
  const th_world_t *w;
  int rank;
  int64_t rows; /* rows this rank receives */
} vstate_t;

typedef struct vcase {
  const char *name;
  int op;
  disco_result_t want;      /* on the rank with the bad input */
  disco_result_t want_peer; /* on the other ranks */
  int all_ranks;            /* every rank makes the bad call */
  const char *names;        /* the message must name one of these */
  const char *detail;       /* and contain this, if not NULL */
  void (*mutate)(vstate_t *s);
} vcase_t;

/* ---- mutations ---------------------------------------------------------------- */
static void copy_to_scratch(vstate_t *s, const void *src, size_t bytes, size_t misalign) {
  th_buf_init(&s->scratch, bytes, misalign);
  memcpy(s->scratch.ptr, src, bytes);
}
static size_t x_bytes(const vstate_t *s) {
  return (size_t)(s->w->num_tokens[s->rank] * s->w->cfg.hidden) * 4;
}
static size_t idx_bytes(const vstate_t *s) {
  return (size_t)(s->w->num_tokens[s->rank] * s->w->cfg.top_k) * 8;
}
static void m_d_magic(vstate_t *s) {
  s->a.magic ^= 1u;
}
static void m_d_size(vstate_t *s) {
  s->a.size = offsetof(disco_dispatch_args_t, x);
}
static void m_d_version(vstate_t *s) {
  s->a.version = DISCO_STRUCT_VERSION + 1;
}
static void m_x_null(vstate_t *s) {
  s->a.x = NULL;
}
static void m_idx_null(vstate_t *s) {
  s->a.topk_idx = NULL;
}
static void m_recv_null(vstate_t *s) {
  s->a.recv_x = NULL;
}
static void m_x_mis(vstate_t *s) {
  copy_to_scratch(s, s->a.x, x_bytes(s), 4);
  s->a.x = s->scratch.ptr;
}
static void m_idx_mis(vstate_t *s) {
  copy_to_scratch(s, s->a.topk_idx, idx_bytes(s), 4);
  s->a.topk_idx = s->scratch.ptr;
}
static void m_recv_mis(vstate_t *s) {
  s->a.recv_x = (char *)s->a.recv_x + 8;
}
static void m_src_rank_mis(vstate_t *s) {
  s->a.recv_src_rank = (int32_t *)((char *)s->a.recv_src_rank + 2);
}
static void m_weights_mis(vstate_t *s) {
  copy_to_scratch(s, s->a.topk_weights, idx_bytes(s) / 2, 2);
  s->a.topk_weights = (const float *)s->scratch.ptr;
}
static void m_nrows_mis(vstate_t *s) {
  th_buf_init(&s->scratch, 8, 4);
  s->a.num_recv_rows = (int64_t *)s->scratch.ptr;
}
static void set_id(vstate_t *s, int64_t t, int j, int64_t id) {
  copy_to_scratch(s, s->a.topk_idx, idx_bytes(s), 0);
  ((int64_t *)s->scratch.ptr)[t * s->w->cfg.top_k + j] = id;
  s->a.topk_idx = s->scratch.ptr;
}
static void m_id_big(vstate_t *s) {
  set_id(s, 5, 2, s->w->cfg.num_experts);
}
static void m_id_neg(vstate_t *s) {
  set_id(s, 7, 1, -2);
}
static void m_id_huge(vstate_t *s) {
  set_id(s, 0, 0, (int64_t)1 << 40);
}
static void m_id32_big(vstate_t *s) {
  int K = s->w->cfg.top_k;
  th_buf_init(&s->scratch, (size_t)(s->w->num_tokens[s->rank] * K) * 4, 0);
  int32_t *p = (int32_t *)s->scratch.ptr;
  for (int64_t i = 0; i < s->w->num_tokens[s->rank] * K; i++)
    p[i] = (int32_t)s->w->idx[s->rank][i];
  p[4 * K + 3] = 1000;
  s->a.topk_idx = p;
  s->a.index_type = DISCO_INDEX_INT32;
}
static void m_dup(vstate_t *s) {
  set_id(s, 3, 1, s->w->idx[s->rank][3 * s->w->cfg.top_k + 0]);
}
static void m_tokens_big(vstate_t *s) {
  s->a.num_tokens = s->w->cfg.max_tokens + 1;
}
static void m_tokens_neg(vstate_t *s) {
  s->a.num_tokens = -1;
}
static void m_layout(vstate_t *s) {
  s->a.layout = (disco_layout_t)7;
}
static void m_index_type(vstate_t *s) {
  s->a.index_type = (disco_index_type_t)5;
}
static void m_align(vstate_t *s) {
  s->a.expert_alignment = -1;
}
static void m_flags(vstate_t *s) {
  s->a.flags = 0x80u;
}
static void m_capacity(vstate_t *s) {
  s->a.recv_capacity = s->rows - 1;
}
static void m_reuse(vstate_t *s) {
  s->a.flags = DISCO_DISPATCH_REUSE_LAYOUT;
}
static void m_none(vstate_t *s) {
  (void)s;
}
static void m_reuse_other_t(vstate_t *s) {
  s->a.flags = DISCO_DISPATCH_REUSE_LAYOUT;
  s->a.num_tokens -= 1; /* not the T the plan was made for */
}
static void m_c_magic(vstate_t *s) {
  s->c.magic = DISCO_DISPATCH_ARGS_MAGIC;
}
static void m_c_size(vstate_t *s) {
  s->c.size = 4;
}
static void m_c_version(vstate_t *s) {
  s->c.version = DISCO_STRUCT_VERSION + 7;
}
static void m_y_null(vstate_t *s) {
  s->c.y = NULL;
}
static void m_out_null(vstate_t *s) {
  s->c.out = NULL;
}
static void m_y_mis(vstate_t *s) {
  s->c.y = (const char *)s->c.y + 4;
}
static void m_out_mis(vstate_t *s) {
  s->c.out = (char *)s->c.out + 4;
}
static void m_y_rows(vstate_t *s) {
  s->c.y_rows = s->rows - 1;
}

#define REM DISCO_ERR_REMOTE
static const vcase_t k_cases[] = {
    {"dispatch bad magic", OP_DISPATCH, DISCO_ERR_BAD_STRUCT, REM, 0, "args|magic", NULL,
     m_d_magic},
    {"dispatch size too small", OP_DISPATCH, DISCO_ERR_BAD_STRUCT, REM, 0, "args|size",
     NULL, m_d_size},
    {"dispatch newer version", OP_DISPATCH, DISCO_ERR_BAD_STRUCT, REM, 0, "args|version",
     NULL, m_d_version},
    {"x NULL", OP_DISPATCH, DISCO_ERR_NULL_POINTER, REM, 0, "x", NULL, m_x_null},
    {"topk_idx NULL", OP_DISPATCH, DISCO_ERR_NULL_POINTER, REM, 0, "topk_idx", NULL,
     m_idx_null},
    {"recv_x NULL", OP_DISPATCH, DISCO_ERR_NULL_POINTER, DISCO_SUCCESS, 0, "recv_x", NULL,
     m_recv_null},
    {"x misaligned", OP_DISPATCH, DISCO_ERR_MISALIGNED, REM, 0, "x", NULL, m_x_mis},
    {"topk_idx misaligned", OP_DISPATCH, DISCO_ERR_MISALIGNED, REM, 0, "topk_idx", NULL,
     m_idx_mis},
    {"recv_x misaligned", OP_DISPATCH, DISCO_ERR_MISALIGNED, REM, 0, "recv_x", NULL,
     m_recv_mis},
    {"recv_src_rank misaligned", OP_DISPATCH, DISCO_ERR_MISALIGNED, REM, 0,
     "recv_src_rank", NULL, m_src_rank_mis},
    {"topk_weights misaligned", OP_DISPATCH, DISCO_ERR_MISALIGNED, REM, 0, "topk_weights",
     NULL, m_weights_mis},
    {"num_recv_rows misaligned", OP_DISPATCH, DISCO_ERR_MISALIGNED, REM, 0,
     "num_recv_rows", NULL, m_nrows_mis},
    {"id >= E", OP_DISPATCH, DISCO_ERR_EXPERT_OUT_OF_RANGE, REM, 0, "topk_idx", "[5][2]",
     m_id_big},
    {"id < -1", OP_DISPATCH, DISCO_ERR_EXPERT_OUT_OF_RANGE, REM, 0, "topk_idx", "[7][1]",
     m_id_neg},
    {"id 2^40", OP_DISPATCH, DISCO_ERR_EXPERT_OUT_OF_RANGE, REM, 0, "topk_idx", "[0][0]",
     m_id_huge},
    {"int32 id >= E", OP_DISPATCH, DISCO_ERR_EXPERT_OUT_OF_RANGE, REM, 0, "topk_idx",
     "[4][3]", m_id32_big},
    {"layout: id >= E", OP_LAYOUT, DISCO_ERR_EXPERT_OUT_OF_RANGE, REM, 0, "topk_idx",
     "[5][2]", m_id_big},
    {"duplicate expert", OP_DISPATCH, DISCO_ERR_DUPLICATE_EXPERT, REM, 0, "topk_idx",
     "[3]", m_dup},
    {"layout: duplicate", OP_LAYOUT, DISCO_ERR_DUPLICATE_EXPERT, REM, 0, "topk_idx",
     "[3]", m_dup},
    {"T > max_tokens", OP_DISPATCH, DISCO_ERR_TOO_MANY_TOKENS, REM, 0, "num_tokens", NULL,
     m_tokens_big},
    {"T < 0", OP_DISPATCH, DISCO_ERR_TOO_MANY_TOKENS, REM, 0, "num_tokens", NULL,
     m_tokens_neg},
    {"bad layout", OP_DISPATCH, DISCO_ERR_INVALID_ARGUMENT, REM, 0, "layout", NULL,
     m_layout},
    {"bad index_type", OP_DISPATCH, DISCO_ERR_INVALID_ARGUMENT, REM, 0, "index_type",
     NULL, m_index_type},
    {"expert_alignment < 0", OP_DISPATCH, DISCO_ERR_INVALID_ARGUMENT, REM, 0,
     "expert_alignment", NULL, m_align},
    {"unknown flags", OP_DISPATCH, DISCO_ERR_INVALID_ARGUMENT, REM, 0, "flags", NULL,
     m_flags},
    {"capacity too small", OP_DISPATCH, DISCO_ERR_CAPACITY, DISCO_SUCCESS, 0,
     "recv_capacity", NULL, m_capacity},
    {"REUSE_LAYOUT without plan", OP_DISPATCH, DISCO_ERR_INVALID_USAGE,
     DISCO_ERR_INVALID_USAGE, 1, "handle|flags|REUSE_LAYOUT|DISCO_DISPATCH_REUSE_LAYOUT",
     NULL, m_reuse},
    {"REUSE_LAYOUT with another T", OP_REUSE_AFTER_LAYOUT, DISCO_ERR_INVALID_USAGE,
     DISCO_ERR_INVALID_USAGE, 1, "num_tokens", NULL, m_reuse_other_t},
    {"combine without dispatch", OP_COMBINE_NO_DISPATCH, DISCO_ERR_INVALID_USAGE,
     DISCO_ERR_INVALID_USAGE, 1, "handle", NULL, m_none},
    {"combine after layout only", OP_COMBINE_AFTER_LAYOUT, DISCO_ERR_INVALID_USAGE,
     DISCO_ERR_INVALID_USAGE, 1, "handle", NULL, m_none},
    {"handle of another comm", OP_FOREIGN_HANDLE, DISCO_ERR_INVALID_USAGE,
     DISCO_ERR_INVALID_USAGE, 1, "handle", NULL, m_none},
    {"combine bad magic", OP_COMBINE, DISCO_ERR_BAD_STRUCT, REM, 0, "args|magic", NULL,
     m_c_magic},
    {"combine size too small", OP_COMBINE, DISCO_ERR_BAD_STRUCT, REM, 0, "args|size",
     NULL, m_c_size},
    {"combine newer version", OP_COMBINE, DISCO_ERR_BAD_STRUCT, REM, 0, "args|version",
     NULL, m_c_version},
    {"y NULL", OP_COMBINE, DISCO_ERR_NULL_POINTER, REM, 0, "y", NULL, m_y_null},
    {"out NULL", OP_COMBINE, DISCO_ERR_NULL_POINTER, REM, 0, "out", NULL, m_out_null},
    {"y misaligned", OP_COMBINE, DISCO_ERR_MISALIGNED, REM, 0, "y", NULL, m_y_mis},
    {"out misaligned", OP_COMBINE, DISCO_ERR_MISALIGNED, REM, 0, "out", NULL, m_out_mis},
    {"y_rows too small", OP_COMBINE, DISCO_ERR_CAPACITY, REM, 0, "y_rows", NULL,
     m_y_rows},
};
#undef REM
#define NUM_CASES ((int)(sizeof(k_cases) / sizeof(k_cases[0])))

/* ---- driver --------------------------------------------------------------------- */
typedef struct vctx {
  th_world_t *w;
  disco_comm_t **comms;
  disco_handle_t **handles;
  disco_comm_t **other; /* a second group, smaller max_tokens */
  th_round_t round;     /* the correct round after each case */
  const vcase_t *vc;
  int bad_rank;
} vctx_t;

static int names_rank(const char *msg, int rank) {
  char needle[32];
  snprintf(needle, sizeof(needle), "rank %d", rank);
  for (const char *p = strstr(msg, needle); p; p = strstr(p + 1, needle)) {
    char next = p[strlen(needle)];
    if (next < '0' || next > '9') return 1;
  }
  return 0;
}

static void check_message(const vctx_t *v, int rank, disco_result_t rc, const char *msg) {
  const vcase_t *vc = v->vc;
  if (rc == DISCO_SUCCESS) return;
  int bad = vc->all_ranks || rank == v->bad_rank;
  int named_rank = bad ? rank : v->bad_rank;
  TH_CHECK(names_rank(msg, named_rank),
           "%s: rank %d: message does not name rank %d: \"%s\"", vc->name, rank,
           named_rank, msg);
  if (!bad) return;
  TH_CHECK(th_msg_names(msg, vc->names),
           "%s: rank %d: message names none of {%s}: \"%s\"", vc->name, rank, vc->names,
           msg);
  if (vc->detail)
    TH_CHECK(strstr(msg, vc->detail) != NULL, "%s: rank %d: message lacks \"%s\": \"%s\"",
             vc->name, rank, vc->detail, msg);
}

static void case_rank(int rank, void *p) {
  vctx_t *v = p;
  const vcase_t *vc = v->vc;
  const th_world_t *w = v->w;
  disco_comm_t *comm = v->comms[rank];
  disco_handle_t *h = v->handles[rank];
  disco_handle_t *fresh = NULL;
  int bad = vc->all_ranks || rank == v->bad_rank;
  int64_t H = w->cfg.hidden, T = w->num_tokens[rank];
  disco_ref_output_t ref;
  if (disco_ref_dispatch(&w->cfg, w->world, rank, w->inputs, DISCO_LAYOUT_EXPERT_MAJOR, 1,
                         &ref) != 0) {
    th_fail(__FILE__, __LINE__, "disco_ref_dispatch failed");
    exit(2);
  }
  vstate_t s;
  memset(&s, 0, sizeof(s));
  s.w = w;
  s.rank = rank;
  s.rows = ref.num_rows;
  th_buf_t recv_x, src_rank, out;
  th_buf_init(&recv_x, (size_t)(s.rows * H) * 4, 0);
  th_buf_init(&src_rank, (size_t)s.rows * 4, 0);
  th_buf_init(&out, (size_t)(T * H) * 4, 0);
  disco_dispatch_args_t a = DISCO_DISPATCH_ARGS_INIT;
  a.x = w->x[rank];
  a.topk_idx = w->idx[rank];
  a.topk_weights = w->weights[rank];
  a.num_tokens = T;
  a.recv_capacity = s.rows;
  a.recv_x = recv_x.ptr;
  a.recv_src_rank = (int32_t *)src_rank.ptr;
  s.a = a;
  disco_combine_args_t c = DISCO_COMBINE_ARGS_INIT;
  c.y = recv_x.ptr; /* identity experts */
  c.y_rows = s.rows;
  c.out = out.ptr;
  s.c = c;

  if (vc->op == OP_COMBINE_NO_DISPATCH || vc->op == OP_COMBINE_AFTER_LAYOUT ||
      vc->all_ranks) {
    TH_EXPECT_RC(disco_handle_create(comm, &fresh), DISCO_SUCCESS, "handle_create");
    h = fresh;
  }
  if (vc->op == OP_FOREIGN_HANDLE) {
    disco_handle_destroy(fresh);
    fresh = NULL;
    TH_EXPECT_RC(disco_handle_create(v->other[rank], &fresh), DISCO_SUCCESS,
                 "handle_create on the other comm");
    h = fresh;
  }
  if (vc->op == OP_COMBINE) {
    TH_EXPECT_RC(disco_dispatch(comm, h, &a), DISCO_SUCCESS, "%s: rank %d: dispatch",
                 vc->name, rank);
  }
  if (vc->op == OP_COMBINE_AFTER_LAYOUT || vc->op == OP_REUSE_AFTER_LAYOUT) {
    int64_t n = 0;
    TH_EXPECT_RC(disco_dispatch_layout(comm, h, &a, &n), DISCO_SUCCESS,
                 "%s: rank %d: dispatch_layout", vc->name, rank);
  }
  if (bad) vc->mutate(&s);
  th_buf_poison(&recv_x);
  th_buf_poison(&src_rank);
  th_buf_poison(&out);
  disco_result_t rc;
  int64_t n_layout = -1;
  if (vc->op == OP_DISPATCH || vc->op == OP_FOREIGN_HANDLE ||
      vc->op == OP_REUSE_AFTER_LAYOUT)
    rc = disco_dispatch(comm, h, &s.a);
  else if (vc->op == OP_LAYOUT)
    rc = disco_dispatch_layout(comm, h, &s.a, &n_layout);
  else
    rc = disco_combine(comm, h, &s.c);
  char msg[512];
  snprintf(msg, sizeof(msg), "%s", disco_last_error());
  disco_result_t want = bad ? vc->want : vc->want_peer;
  TH_CHECK(rc == want, "%s: rank %d (bad rank %d): got %s, want %s (\"%s\")", vc->name,
           rank, v->bad_rank, disco_result_name(rc), disco_result_name(want), msg);
  check_message(v, rank, rc, msg);
  if (rc == DISCO_SUCCESS && vc->op == OP_DISPATCH) { /* a peer of a CAPACITY rank */
    th_cmp("recv_x of a capacity peer", rank, recv_x.ptr, ref.recv_x, s.rows, H, 4);
    th_cmp("recv_src_rank of a capacity peer", rank, src_rank.ptr, ref.src_rank, s.rows,
           1, 4);
  } else {
    th_buf_poison_ok(&recv_x, vc->name, rank);
    th_buf_poison_ok(&src_rank, vc->name, rank);
  }
  th_buf_poison_ok(&out, vc->name, rank);
  /* A failed dispatch leaves no plan: combine is INVALID_USAGE everywhere. */
  int dispatch_op = vc->op == OP_DISPATCH || vc->op == OP_LAYOUT ||
                    vc->op == OP_FOREIGN_HANDLE || vc->op == OP_REUSE_AFTER_LAYOUT;
  if (dispatch_op && vc->want_peer != DISCO_SUCCESS) {
    s.c = c;
    TH_EXPECT_RC(disco_combine(comm, h, &s.c), DISCO_ERR_INVALID_USAGE,
                 "%s: rank %d: combine after the failed dispatch", vc->name, rank);
    th_buf_poison_ok(&out, "out of a combine after a failed dispatch", rank);
    s.a = a;
    s.a.flags = DISCO_DISPATCH_REUSE_LAYOUT;
    TH_EXPECT_RC(disco_dispatch(comm, h, &s.a), DISCO_ERR_INVALID_USAGE,
                 "%s: rank %d: dispatch(REUSE_LAYOUT) after the failed dispatch",
                 vc->name, rank);
    th_buf_poison_ok(&recv_x, "recv_x of a REUSE_LAYOUT after a failed dispatch", rank);
  }
  if (fresh) disco_handle_destroy(fresh);
  th_buf_free(&s.scratch);
  th_buf_free(&recv_x);
  th_buf_free(&src_rank);
  th_buf_free(&out);
  disco_ref_output_free(&ref);
  /* the communicator is usable right after */
  th_round_rank(rank, &v->round);
}

static void run_world(int world) {
  disco_config_t cfg = DISCO_CONFIG_INIT;
  cfg.num_experts = 8;
  cfg.top_k = 4;
  cfg.hidden = 8;
  cfg.max_tokens = 16;
  cfg.dtype = DISCO_DTYPE_FP32;
  cfg.timeout_ms = 3000; /* a peer left waiting shows up as TIMEOUT, quickly */
  disco_comm_t *comms[8];
  disco_handle_t *handles[8];
  if (th_comms_create(world, &cfg, comms) != 0) return;
  for (int r = 0; r < world; r++)
    TH_EXPECT_RC(disco_handle_create(comms[r], &handles[r]), DISCO_SUCCESS, "handle %d",
                 r);
  disco_comm_t *other[8];
  disco_config_t small = cfg;
  small.max_tokens = 4;
  if (th_comms_create(world, &small, other) != 0) return;
  int64_t tokens[8] = {12, 12, 12, 12, 12, 12, 12, 12};
  th_world_t w;
  th_world_init(&w, &cfg, world, tokens, TH_ROUTE_UNIFORM, 1, 0, 4242);
  th_round_opts_t good = {0};
  good.layout = DISCO_LAYOUT_EXPERT_MAJOR;
  good.expert_alignment = 2;
  good.combine_weighted = 1;
  good.combines = 1;
  vctx_t v = {&w, comms, handles, other, {0}, NULL, 0};
  th_round_init(&v.round, &w, comms, handles, &good, 99);
  for (int i = 0; i < NUM_CASES; i++) {
    v.vc = &k_cases[i];
    v.bad_rank = (i + 1) % world;
    int before = th_failures();
    th_run(world, case_rank, &v);
    printf("%-28s W=%d bad rank %d: %s\n", k_cases[i].name, world, v.bad_rank,
           th_failures() == before ? "ok" : "FAILED");
  }
  th_round_fini(&v.round);
  th_world_free(&w);
  th_comms_destroy(world, comms, handles);
  th_comms_destroy(world, other, NULL);
}

int main(void) {
  run_world(4);
  run_world(1);
  return th_finish("test_validation");
}
