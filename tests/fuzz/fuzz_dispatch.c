/* libFuzzer target: arbitrary bytes -> a world of W local-backend ranks
 * (threads), a config, per-rank inputs (ids may be out of range, repeated or
 * -1) and faults. Checks that:
 * - an invalid config or input gives the expected error code (the faulty rank
 *   its own code, every other rank DISCO_ERR_REMOTE), never a crash or hang;
 * - valid inputs give dispatch and combine outputs bit-identical to disco_ref.
 * Sizes are tiny so each input runs in about a millisecond. A failed check
 * calls __builtin_trap() so libFuzzer records the input. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/dtype.h"
#include "disco.h"
#include "ref/ref.h"

#define FZ_MAX_W 8
#define FZ_MAX_T 8

/* Bytes in, values out; reads past the end return 0. */
typedef struct fz_reader {
  const uint8_t *p;
  size_t n, i;
} fz_reader_t;

static unsigned fz_u8(fz_reader_t *r) {
  return r->i < r->n ? r->p[r->i++] : 0u;
}

/* Allowed results of one rank, as a bit set over disco_result_t. */
#define BIT(code) (1u << (unsigned)(code))

typedef struct fz_rank {
  int64_t T;
  int64_t *idx;    /* [T, K] */
  int32_t *idx32;  /* [T, K] */
  float *w;        /* [T, K] */
  void *x;         /* [T, H] + 16 spare bytes (for the misaligned fault) */
  uint32_t faults; /* bit set of the codes this rank's input must produce */
  int short_cap;   /* recv_capacity one row short */
  /* outputs */
  int64_t cap, rows;
  void *recv_x, *out;
  int32_t *src_rank, *src_token, *expert, n_to[FZ_MAX_W], n_from[FZ_MAX_W], *tpe;
  float *weight;
  disco_result_t rc_dispatch, rc_combine;
  char msg[256]; /* disco_last_error() of the rank's thread */
} fz_rank_t;

typedef struct fz_world {
  disco_config_t cfg;
  int W, E_loc, K, layout, align, weights, weighted, idx32;
  size_t rb; /* row bytes */
  disco_comm_t *comms[FZ_MAX_W];
  fz_rank_t r[FZ_MAX_W];
  disco_ref_input_t in[FZ_MAX_W];
  pthread_barrier_t barrier;
} fz_world_t;

typedef struct fz_job {
  fz_world_t *w;
  int rank;
} fz_job_t;

static void fz_fail(const char *what, int rank, disco_result_t got, const char *msg) {
  fprintf(stderr, "fuzz_dispatch: %s on rank %d (got %s: %s)\n", what, rank,
          disco_result_name(got), msg);
  __builtin_trap();
}

static void *fz_calloc(size_t n) {
  /* 16-byte aligned; +16 spare for the misaligned-buffer fault. */
  void *p = aligned_alloc(64, (n + 16 + 63) / 64 * 64);
  if (!p) __builtin_trap();
  memset(p, 0, (n + 16 + 63) / 64 * 64);
  return p;
}

static void *fz_rank_thread(void *arg) {
  fz_job_t *job = (fz_job_t *)arg;
  fz_world_t *w = job->w;
  const int me = job->rank;
  fz_rank_t *r = &w->r[me];
  disco_handle_t *h = NULL;
  disco_result_t rc = disco_handle_create(w->comms[me], &h);
  if (rc != DISCO_SUCCESS) fz_fail("handle_create failed", me, rc, disco_last_error());

  disco_dispatch_args_t a = DISCO_DISPATCH_ARGS_INIT;
  a.x = r->x;
  a.topk_idx = w->idx32 ? (const void *)r->idx32 : (const void *)r->idx;
  a.index_type = w->idx32 ? DISCO_INDEX_INT32 : DISCO_INDEX_INT64;
  a.topk_weights = w->weights ? r->w : NULL;
  a.num_tokens = r->T;
  a.layout = (disco_layout_t)w->layout;
  a.expert_alignment = w->align;
  if (r->faults & BIT(DISCO_ERR_INVALID_ARGUMENT)) a.layout = (disco_layout_t)7;
  if (r->faults & BIT(DISCO_ERR_MISALIGNED)) a.x = (const char *)r->x + 2;
  if (r->faults & BIT(DISCO_ERR_NULL_POINTER)) a.x = NULL;
  a.recv_capacity = r->cap;
  a.recv_x = r->recv_x;
  a.recv_src_rank = r->src_rank;
  a.recv_src_token = r->src_token;
  a.recv_expert = r->expert;
  a.recv_weight = r->weight;
  a.n_tokens_to_rank = r->n_to;
  a.n_tokens_from_rank = r->n_from;
  a.tokens_per_expert = r->tpe;
  a.num_recv_rows = &r->rows;
  r->rc_dispatch = disco_dispatch(w->comms[me], h, &a);
  snprintf(r->msg, sizeof(r->msg), "%s", disco_last_error());
  r->rc_combine = DISCO_RESULT_COUNT_;

  /* Combine only if every rank's dispatch succeeded (a collective decision
   * made from shared results after the barrier). */
  pthread_barrier_wait(&w->barrier);
  int all_ok = 1;
  for (int p = 0; p < w->W; p++) all_ok &= w->r[p].rc_dispatch == DISCO_SUCCESS;
  if (all_ok) {
    disco_combine_args_t ca = DISCO_COMBINE_ARGS_INIT;
    ca.y = r->recv_x; /* identity experts */
    ca.y_rows = r->rows;
    ca.out = r->out;
    ca.weighted = w->weighted;
    r->rc_combine = disco_combine(w->comms[me], h, &ca);
    if (r->rc_combine != DISCO_SUCCESS)
      snprintf(r->msg, sizeof(r->msg), "%s", disco_last_error());
  }
  disco_handle_destroy(h);
  return NULL;
}

/* Distinct ids from bytes, or raw bytes in [-1, E+1) (out of range, repeats). */
static void fz_ids(fz_reader_t *rd, fz_world_t *w, fz_rank_t *r) {
  const int E = w->cfg.num_experts, K = w->K;
  const unsigned mode = fz_u8(rd) % 4;
  for (int64_t t = 0; t < r->T; t++) {
    for (int j = 0; j < K; j++) {
      unsigned v = fz_u8(rd);
      int64_t e;
      if (mode == 0) {
        e = (int64_t)(v % (unsigned)(E + 2)) - 1; /* raw: anything goes */
      } else if (v % 8 == 0 || j >= E) {
        e = -1;
      } else {
        e = (int64_t)(v % (unsigned)E);
        for (int tries = 0; tries < E; tries++) { /* make it distinct */
          int used = 0;
          for (int i = 0; i < j; i++) used |= r->idx[t * K + i] == e;
          if (!used) break;
          e = (e + 1) % E;
        }
      }
      r->idx[t * K + j] = e;
      r->idx32[t * K + j] = (int32_t)e;
      r->w[t * K + j] = (float)(int8_t)fz_u8(rd) / 16.0f;
    }
  }
  /* What the validation must say about these ids. */
  for (int64_t t = 0; t < r->T; t++) {
    for (int j = 0; j < K; j++) {
      int64_t e = r->idx[t * K + j];
      if (e < -1 || e >= E) r->faults |= BIT(DISCO_ERR_EXPERT_OUT_OF_RANGE);
      for (int i = 0; i < j && e >= 0; i++)
        if (r->idx[t * K + i] == e) r->faults |= BIT(DISCO_ERR_DUPLICATE_EXPERT);
    }
  }
}

static void fz_cmp(const void *got, const void *want, size_t n, const char *what,
                   int rank) {
  if (n && memcmp(got, want, n) != 0) {
    fprintf(stderr, "fuzz_dispatch: %s differs from disco_ref on rank %d\n", what, rank);
    __builtin_trap();
  }
}

/* Valid world: every output against disco_ref. */
static void fz_check_ref(fz_world_t *w) {
  disco_ref_output_t exp[FZ_MAX_W];
  const void *ys[FZ_MAX_W];
  memset(exp, 0, sizeof(exp));
  const int W = w->W;
  const size_t mk = w->layout == DISCO_LAYOUT_RANK_MAJOR ? (size_t)w->K : 1;
  for (int d = 0; d < W; d++) {
    if (disco_ref_dispatch(&w->cfg, W, d, w->in, (disco_layout_t)w->layout, w->align,
                           &exp[d]) != 0)
      __builtin_trap();
    ys[d] = exp[d].recv_x;
  }
  for (int d = 0; d < W; d++) {
    fz_rank_t *r = &w->r[d];
    const disco_ref_output_t *e = &exp[d];
    if (r->rows != e->num_rows)
      fz_fail("row count differs from disco_ref", d, DISCO_SUCCESS, "");
    size_t n = (size_t)e->num_rows;
    fz_cmp(r->recv_x, e->recv_x, n * w->rb, "recv_x", d);
    fz_cmp(r->src_rank, e->src_rank, n * 4, "src_rank", d);
    fz_cmp(r->src_token, e->src_token, n * 4, "src_token", d);
    fz_cmp(r->expert, e->expert, n * mk * 4, "expert", d);
    fz_cmp(r->weight, e->weight, n * mk * 4, "weight", d);
    fz_cmp(r->n_to, e->n_tokens_to_rank, (size_t)W * 4, "n_tokens_to_rank", d);
    fz_cmp(r->n_from, e->n_tokens_from_rank, (size_t)W * 4, "n_tokens_from_rank", d);
    fz_cmp(r->tpe, e->tokens_per_expert, (size_t)w->E_loc * 4, "tokens_per_expert", d);
    void *out = fz_calloc((size_t)r->T * w->rb);
    if (disco_ref_combine(&w->cfg, W, d, w->in, (disco_layout_t)w->layout, w->align, ys,
                          w->weighted, out) != 0)
      __builtin_trap();
    fz_cmp(r->out, out, (size_t)r->T * w->rb, "combine out", d);
    free(out);
  }
  for (int d = 0; d < W; d++) disco_ref_output_free(&exp[d]);
}

static void fz_free(fz_world_t *w) {
  for (int d = 0; d < FZ_MAX_W; d++) {
    fz_rank_t *r = &w->r[d];
    free(r->idx);
    free(r->idx32);
    free(r->w);
    free(r->x);
    free(r->recv_x);
    free(r->out);
    free(r->src_rank);
    free(r->src_token);
    free(r->expert);
    free(r->weight);
    free(r->tpe);
    disco_comm_destroy(w->comms[d]);
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  fz_reader_t rd = {data, size, 0};
  fz_world_t *w = calloc(1, sizeof(*w));
  if (!w) return 0;
  disco_config_t cfg = DISCO_CONFIG_INIT;
  w->W = 1 + (int)(fz_u8(&rd) % FZ_MAX_W);
  w->E_loc = 1 + (int)(fz_u8(&rd) % 8);
  w->K = 1 + (int)(fz_u8(&rd) % 32);
  cfg.num_experts = w->W * w->E_loc;
  cfg.top_k = w->K;
  cfg.dtype = (disco_dtype_t)(fz_u8(&rd) % 3);
  const int64_t unit = cfg.dtype == DISCO_DTYPE_FP32 ? 4 : 8; /* 16 bytes */
  cfg.hidden = unit * (1 + (int64_t)(fz_u8(&rd) % 3));
  cfg.max_tokens = fz_u8(&rd) % (FZ_MAX_T + 1);
  cfg.combine_wire = (disco_combine_wire_t)(fz_u8(&rd) % 2);
  cfg.timeout_ms = 5000; /* a hang is a finding, not a stall */
  w->layout = (int)(fz_u8(&rd) % 2);
  w->align = (int)(fz_u8(&rd) % 5);
  unsigned flags = fz_u8(&rd);
  w->weights = flags & 1;
  w->weighted = (flags >> 1) & 1;
  w->idx32 = (flags >> 2) & 1;

  /* Config faults, one at a time so the expected code is exact. */
  disco_result_t want_cfg = DISCO_SUCCESS;
  switch (fz_u8(&rd) % 16) {
    case 0:
      if (w->W > 1) {
        cfg.num_experts += 1;
        want_cfg = DISCO_ERR_EXPERT_DIVISIBILITY;
      }
      break;
    case 1:
      cfg.hidden += 1;
      want_cfg = DISCO_ERR_HIDDEN_ALIGNMENT;
      break;
    case 2:
      cfg.magic ^= 1u;
      want_cfg = DISCO_ERR_BAD_STRUCT;
      break;
    case 3:
      cfg.dtype = (disco_dtype_t)9;
      want_cfg = DISCO_ERR_INVALID_ARGUMENT;
      break;
    case 4:
      cfg.top_k = 0;
      want_cfg = DISCO_ERR_INVALID_ARGUMENT;
      break;
    default:
      break;
  }
  w->cfg = cfg;
  disco_result_t rc = disco_comm_create_local(w->W, &cfg, w->comms);
  if (rc != want_cfg)
    fz_fail("disco_comm_create_local: unexpected result", -1, rc, disco_last_error());
  if (rc != DISCO_SUCCESS) {
    for (int d = 0; d < w->W; d++)
      if (w->comms[d] != NULL) fz_fail("comm returned on failure", d, rc, "");
    goto done;
  }
  w->rb = (size_t)cfg.hidden * disco_dtype_size(cfg.dtype);

  uint32_t any_fault = 0;
  for (int d = 0; d < w->W; d++) {
    fz_rank_t *r = &w->r[d];
    unsigned fault = fz_u8(&rd) % 32;
    r->T = fz_u8(&rd) % (unsigned)(cfg.max_tokens + 1);
    if (fault == 1) {
      r->T = cfg.max_tokens + 1;
      r->faults |= BIT(DISCO_ERR_TOO_MANY_TOKENS);
    }
    size_t tk = (size_t)(r->T * w->K);
    r->idx = fz_calloc(tk * 8);
    r->idx32 = fz_calloc(tk * 4);
    r->w = fz_calloc(tk * 4);
    r->x = fz_calloc((size_t)r->T * w->rb);
    for (int64_t i = 0; i < r->T * cfg.hidden; i++)
      disco_store_f32(r->x, i, (float)((int)fz_u8(&rd) - 128) / 8.0f, cfg.dtype);
    fz_ids(&rd, w, r);
    if (fault == 2) r->faults |= BIT(DISCO_ERR_INVALID_ARGUMENT);
    if (fault == 3 && r->T > 0) r->faults |= BIT(DISCO_ERR_MISALIGNED);
    if (fault == 4 && r->T > 0) r->faults |= BIT(DISCO_ERR_NULL_POINTER);
    r->short_cap = fault == 5;
    any_fault |= r->faults;
    w->in[d] = (disco_ref_input_t){r->T, r->x, r->idx, w->weights ? r->w : NULL};
  }

  /* Output capacity: the exact rows (from the reference) when inputs are
   * valid, so a short rank is exactly one row short; else a worst case. */
  for (int d = 0; d < w->W; d++) {
    fz_rank_t *r = &w->r[d];
    r->cap = (int64_t)w->W * FZ_MAX_T * (w->K < w->E_loc ? w->K : w->E_loc) +
             (int64_t)w->E_loc * (w->align > 1 ? w->align : 1);
    if (!any_fault) {
      disco_ref_output_t e;
      if (disco_ref_dispatch(&cfg, w->W, d, w->in, (disco_layout_t)w->layout, w->align,
                             &e) != 0)
        __builtin_trap();
      r->cap = e.num_rows;
      disco_ref_output_free(&e);
      if (r->short_cap && r->cap > 0)
        r->cap--;
      else
        r->short_cap = 0;
    }
    size_t mk = w->layout == DISCO_LAYOUT_RANK_MAJOR ? (size_t)w->K : 1;
    r->recv_x = fz_calloc((size_t)r->cap * w->rb);
    r->src_rank = fz_calloc((size_t)r->cap * 4);
    r->src_token = fz_calloc((size_t)r->cap * 4);
    r->expert = fz_calloc((size_t)r->cap * mk * 4);
    r->weight = fz_calloc((size_t)r->cap * mk * 4);
    r->tpe = fz_calloc((size_t)w->E_loc * 4);
    r->out = fz_calloc((size_t)r->T * w->rb);
  }

  fz_job_t jobs[FZ_MAX_W];
  pthread_t th[FZ_MAX_W];
  if (pthread_barrier_init(&w->barrier, NULL, (unsigned)w->W) != 0) __builtin_trap();
  for (int d = 0; d < w->W; d++) {
    jobs[d] = (fz_job_t){w, d};
    if (pthread_create(&th[d], NULL, fz_rank_thread, &jobs[d]) != 0) __builtin_trap();
  }
  for (int d = 0; d < w->W; d++) pthread_join(th[d], NULL);
  pthread_barrier_destroy(&w->barrier);

  int all_ok = 1;
  for (int d = 0; d < w->W; d++) {
    fz_rank_t *r = &w->r[d];
    uint32_t allowed;
    if (r->faults)
      allowed = r->faults; /* its own code */
    else if (any_fault)
      allowed = BIT(DISCO_ERR_REMOTE);
    else if (r->short_cap)
      allowed = BIT(DISCO_ERR_CAPACITY);
    else
      allowed = BIT(DISCO_SUCCESS);
    if (r->rc_dispatch >= DISCO_RESULT_COUNT_ || !(allowed & BIT(r->rc_dispatch)))
      fz_fail("dispatch: unexpected result", d, r->rc_dispatch, r->msg);
    if (r->rc_dispatch != DISCO_SUCCESS && r->msg[0] == '\0')
      fz_fail("error without a disco_last_error() message", d, r->rc_dispatch, r->msg);
    all_ok &= r->rc_dispatch == DISCO_SUCCESS;
  }
  if (all_ok) {
    for (int d = 0; d < w->W; d++)
      if (w->r[d].rc_combine != DISCO_SUCCESS)
        fz_fail("combine failed", d, w->r[d].rc_combine, w->r[d].msg);
    fz_check_ref(w);
  }
done:
  fz_free(w);
  free(w);
  return 0;
}
