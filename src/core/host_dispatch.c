/* Host path dispatch: routing plan, header exchange, pack, alltoallv, expand.
 * Layout of docs/semantics.md; all buffers come from the workspace/plan. */
#include <string.h>

#include "core/error.h"
#include "core/host_path.h"
#include "core/validate.h"

/* Dispatch wire record: [row_bytes payload][int32 src_token][int32 id[K]]
 * [float w[K]]; id = local expert id at the destination or -1, w = weight
 * (1.0 without weights) where local, else 0.0. Slot order, so RANK_MAJOR can
 * copy it as is. */
#define META_IDS 4
#define META_W(K) (4 + 4 * (size_t)(K))

static inline int64_t load_id(const void *idx, disco_index_type_t type, int64_t i) {
  return type == DISCO_INDEX_INT64 ? ((const int64_t *)idx)[i]
                                   : (int64_t)((const int32_t *)idx)[i];
}

disco_result_t disco_host_exchange(disco_comm_t *comm, int64_t stride,
                                   disco_result_t status, const char *fn) {
  disco_host_ws_t *ws = comm->host_ws;
  const int W = comm->world_size;
  if (status != DISCO_SUCCESS) {
    memset(ws->hdr_send, 0, (size_t)(W * stride) * sizeof(int64_t));
    for (int q = 0; q < W; q++) ws->hdr_send[q * stride] = (int64_t)status;
  }
  disco_result_t rc = comm->ops->alltoall(comm, ws->hdr_send, ws->hdr_recv,
                                          (size_t)stride * sizeof(int64_t));
  if (rc != DISCO_SUCCESS) return rc;
  /* The bad rank keeps its own code and message. */
  if (status != DISCO_SUCCESS) return status;
  for (int q = 0; q < W; q++) {
    int64_t code = ws->hdr_recv[q * stride];
    if (code != DISCO_SUCCESS)
      return disco_error(DISCO_ERR_REMOTE,
                         "%s: rank %d failed this call (%s); no data moved, reported on "
                         "rank %d",
                         fn, q, disco_result_name((disco_result_t)code), comm->rank);
  }
  return DISCO_SUCCESS;
}

/* Small insertion sort: at most K (<= 64) distinct keys, usually a handful. */
static void sort_pairs(int32_t *key, float *val, int n) {
  for (int i = 1; i < n; i++) {
    int32_t k = key[i];
    float v = val != NULL ? val[i] : 0.0f;
    int j = i - 1;
    for (; j >= 0 && key[j] > k; j--) {
      key[j + 1] = key[j];
      if (val != NULL) val[j + 1] = val[j];
    }
    key[j + 1] = k;
    if (val != NULL) val[j + 1] = v;
  }
}

/* Send side of the plan: per-destination counts, per-token send slots in
 * ascending destination order, and the header for each peer. */
static void route(disco_comm_t *comm, disco_host_plan_t *p,
                  const disco_dispatch_args_t *a) {
  disco_host_ws_t *ws = comm->host_ws;
  const int W = comm->world_size, K = comm->config.top_k;
  const int64_t El = comm->num_local_experts, T = a->num_tokens;
  const int64_t stride = ws->hdr_stride;
  int32_t ds[DISCO_MAX_TOP_K];

  memset(ws->cnt_e, 0, (size_t)comm->config.num_experts * sizeof(int64_t));
  memset(p->send_cnt, 0, (size_t)W * sizeof(int64_t));
  for (int64_t t = 0; t < T; t++) {
    uint64_t stamp = ++ws->stamp;
    for (int j = 0; j < K; j++) {
      int64_t e = load_id(a->topk_idx, a->index_type, t * K + j);
      if (e < 0) continue;
      ws->cnt_e[e]++;
      int64_t d = e / El;
      if (ws->dest_mark[d] != stamp) {
        ws->dest_mark[d] = stamp;
        p->send_cnt[d]++;
      }
    }
  }
  int64_t off = 0;
  for (int d = 0; d < W; d++) {
    p->send_displ[d] = off;
    ws->cursor[d] = off;
    off += p->send_cnt[d];
  }
  p->n_send = off;

  int64_t k = 0;
  for (int64_t t = 0; t < T; t++) {
    uint64_t stamp = ++ws->stamp;
    int n = 0;
    p->tok_off[t] = k;
    for (int j = 0; j < K; j++) {
      int64_t e = load_id(a->topk_idx, a->index_type, t * K + j);
      if (e < 0) continue;
      int64_t d = e / El;
      if (ws->dest_mark[d] != stamp) {
        ws->dest_mark[d] = stamp;
        ds[n++] = (int32_t)d;
      }
    }
    sort_pairs(ds, NULL, n); /* combine folds over destinations ascending */
    for (int i = 0; i < n; i++, k++) {
      p->tok_dest[k] = ds[i];
      p->tok_slot[k] = ws->cursor[ds[i]]++;
    }
  }
  p->tok_off[T] = k;

  for (int d = 0; d < W; d++) {
    int64_t *h = ws->hdr_send + d * stride;
    h[0] = DISCO_SUCCESS;
    h[1] = p->send_cnt[d];
    memcpy(h + 2, ws->cnt_e + d * El, (size_t)El * sizeof(int64_t));
  }
}

/* Receive side of the plan from the peers' headers. A header outside the
 * workspace bounds (a bug or a mismatched peer) reads as zero rows from that
 * peer; the transport then reports the count mismatch. */
static disco_result_t recv_plan(disco_comm_t *comm, disco_host_plan_t *p,
                                disco_layout_t layout, int32_t align, const char *fn,
                                int64_t *num_rows) {
  disco_host_ws_t *ws = comm->host_ws;
  const int W = comm->world_size;
  const int64_t El = comm->num_local_experts, stride = ws->hdr_stride;
  const int64_t maxT = comm->config.max_tokens;
  disco_result_t rc = DISCO_SUCCESS;

  memset(p->raw, 0, (size_t)El * sizeof(int64_t));
  int64_t off = 0;
  for (int s = 0; s < W; s++) {
    const int64_t *h = ws->hdr_recv + s * stride;
    int ok = h[1] >= 0 && h[1] <= maxT;
    for (int64_t l = 0; l < El && ok; l++) ok = h[2 + l] >= 0 && h[2 + l] <= h[1];
    if (!ok) {
      rc = disco_error(DISCO_ERR_INTERNAL,
                       "%s: corrupt count header from rank %d on rank %d", fn, s,
                       comm->rank);
      p->recv_cnt[s] = 0;
    } else {
      p->recv_cnt[s] = h[1];
      for (int64_t l = 0; l < El; l++) p->raw[l] += h[2 + l];
    }
    p->recv_displ[s] = off;
    off += p->recv_cnt[s];
  }
  p->n_recv = off;

  int64_t rows = 0, pairs = 0;
  for (int64_t l = 0; l < El; l++) {
    int64_t n = p->raw[l];
    pairs += n;
    if (layout == DISCO_LAYOUT_EXPERT_MAJOR && align > 1 && n % align != 0)
      n += align - n % align;
    p->grp_off[l] = rows;
    p->tpe[l] = n;
    rows += n;
    if (n > INT32_MAX && rc == DISCO_SUCCESS)
      rc = disco_error(
          DISCO_ERR_INVALID_ARGUMENT,
          "%s: local expert %lld gets %lld rows (args->expert_alignment = %d), "
          "more than tokens_per_expert can count on rank %d",
          fn, (long long)l, (long long)n, (int)align, comm->rank);
  }
  p->n_pairs = pairs;
  *num_rows = layout == DISCO_LAYOUT_EXPERT_MAJOR ? rows : p->n_recv;
  return rc;
}

static void pack(disco_comm_t *comm, disco_host_plan_t *p,
                 const disco_dispatch_args_t *a) {
  disco_host_ws_t *ws = comm->host_ws;
  const int K = comm->config.top_k;
  const int64_t El = comm->num_local_experts;
  const size_t row_bytes = comm->row_bytes;
  int32_t ids[DISCO_MAX_TOP_K];
  float w[DISCO_MAX_TOP_K];

  for (int64_t t = 0; t < a->num_tokens; t++) {
    for (int64_t k = p->tok_off[t]; k < p->tok_off[t + 1]; k++) {
      const int64_t d = p->tok_dest[k];
      unsigned char *rec = ws->buf_s + (size_t)p->tok_slot[k] * ws->rec_bytes;
      int32_t st = (int32_t)t;
      memcpy(rec, (const unsigned char *)a->x + (size_t)t * row_bytes, row_bytes);
      for (int j = 0; j < K; j++) {
        int64_t e = load_id(a->topk_idx, a->index_type, t * K + j);
        int local = e >= 0 && e / El == d;
        ids[j] = local ? (int32_t)(e - d * El) : -1;
        w[j] = !local ? 0.0f : a->topk_weights ? a->topk_weights[t * K + j] : 1.0f;
      }
      memcpy(rec + row_bytes, &st, sizeof(st));
      memcpy(rec + row_bytes + META_IDS, ids, (size_t)K * sizeof(int32_t));
      memcpy(rec + row_bytes + META_W(K), w, (size_t)K * sizeof(float));
    }
  }
}

/* Received records must match the headers before anything is written: ids in
 * range, per-expert counts as announced, at least one local expert each. */
static disco_result_t verify_records(disco_comm_t *comm, disco_host_plan_t *p,
                                     const char *fn) {
  disco_host_ws_t *ws = comm->host_ws;
  const int K = comm->config.top_k;
  const int64_t El = comm->num_local_experts;
  int32_t ids[DISCO_MAX_TOP_K];
  int32_t st;

  memset(ws->cursor, 0, (size_t)El * sizeof(int64_t));
  for (int64_t i = 0; i < p->n_recv; i++) {
    const unsigned char *meta = ws->buf_r + (size_t)i * ws->rec_bytes + comm->row_bytes;
    int n = 0;
    memcpy(&st, meta, sizeof(st));
    memcpy(ids, meta + META_IDS, (size_t)K * sizeof(int32_t));
    if (st < 0 || st >= comm->config.max_tokens) goto bad;
    for (int j = 0; j < K; j++) {
      if (ids[j] < -1 || ids[j] >= El) goto bad;
      if (ids[j] < 0) continue;
      if (++ws->cursor[ids[j]] > p->raw[ids[j]]) goto bad;
      n++;
    }
    if (n == 0) goto bad;
  }
  for (int64_t l = 0; l < El; l++)
    if (ws->cursor[l] != p->raw[l]) goto bad;
  return DISCO_SUCCESS;
bad:
  return disco_error(DISCO_ERR_INTERNAL,
                     "%s: received rows do not match the announced counts on rank %d "
                     "(peers disagree on the call)",
                     fn, comm->rank);
}

static void expand_expert_major(disco_comm_t *comm, disco_host_plan_t *p,
                                const disco_dispatch_args_t *a) {
  disco_host_ws_t *ws = comm->host_ws;
  const int K = comm->config.top_k, r = comm->rank;
  const int64_t El = comm->num_local_experts;
  const size_t row_bytes = comm->row_bytes;
  unsigned char *rx = a->recv_x;
  int32_t ids[DISCO_MAX_TOP_K];
  float w[DISCO_MAX_TOP_K];
  int64_t i = 0, np = 0;

  for (int64_t l = 0; l < El; l++) ws->cursor[l] = p->grp_off[l];
  for (int s = 0; s < comm->world_size; s++) {
    for (int64_t c = 0; c < p->recv_cnt[s]; c++, i++) {
      const unsigned char *rec = ws->buf_r + (size_t)i * ws->rec_bytes;
      const unsigned char *meta = rec + row_bytes;
      int32_t st;
      int n = 0;
      memcpy(&st, meta, sizeof(st));
      memcpy(ids, meta + META_IDS, (size_t)K * sizeof(int32_t));
      memcpy(w, meta + META_W(K), (size_t)K * sizeof(float));
      for (int j = 0; j < K; j++)
        if (ids[j] >= 0) {
          ids[n] = ids[j];
          w[n++] = w[j];
        }
      sort_pairs(ids, w, n); /* combine folds over local experts ascending */
      p->rec_off[i] = np;
      for (int k = 0; k < n; k++, np++) {
        int64_t row = ws->cursor[ids[k]]++;
        memcpy(rx + (size_t)row * row_bytes, rec, row_bytes);
        if (a->recv_src_rank) a->recv_src_rank[row] = s;
        if (a->recv_src_token) a->recv_src_token[row] = st;
        if (a->recv_expert) a->recv_expert[row] = (int32_t)(r * El + ids[k]);
        if (a->recv_weight) a->recv_weight[row] = w[k];
        p->pair_row[np] = row;
        p->pair_w[np] = w[k];
      }
    }
  }
  p->rec_off[i] = np;
  /* Padding rows: zero bits, metadata -1, weight 0. */
  for (int64_t l = 0; l < El; l++) {
    for (int64_t row = p->grp_off[l] + p->raw[l]; row < p->grp_off[l] + p->tpe[l];
         row++) {
      memset(rx + (size_t)row * row_bytes, 0, row_bytes);
      if (a->recv_src_rank) a->recv_src_rank[row] = -1;
      if (a->recv_src_token) a->recv_src_token[row] = -1;
      if (a->recv_expert) a->recv_expert[row] = -1;
      if (a->recv_weight) a->recv_weight[row] = 0.0f;
    }
  }
}

static void expand_rank_major(disco_comm_t *comm, disco_host_plan_t *p,
                              const disco_dispatch_args_t *a) {
  disco_host_ws_t *ws = comm->host_ws;
  const int K = comm->config.top_k;
  const size_t row_bytes = comm->row_bytes;
  unsigned char *rx = a->recv_x;
  int64_t i = 0;

  for (int s = 0; s < comm->world_size; s++) {
    for (int64_t c = 0; c < p->recv_cnt[s]; c++, i++) {
      const unsigned char *rec = ws->buf_r + (size_t)i * ws->rec_bytes;
      const unsigned char *meta = rec + row_bytes;
      memcpy(rx + (size_t)i * row_bytes, rec, row_bytes);
      if (a->recv_src_rank) a->recv_src_rank[i] = s;
      if (a->recv_src_token) memcpy(&a->recv_src_token[i], meta, sizeof(int32_t));
      if (a->recv_expert)
        memcpy(a->recv_expert + i * K, meta + META_IDS, (size_t)K * sizeof(int32_t));
      if (a->recv_weight)
        memcpy(a->recv_weight + i * K, meta + META_W(K), (size_t)K * sizeof(float));
    }
  }
}

static void write_counts(disco_comm_t *comm, disco_host_plan_t *p,
                         const disco_dispatch_args_t *a, int64_t rows) {
  const int64_t El = comm->num_local_experts;
  for (int q = 0; q < comm->world_size; q++) {
    if (a->n_tokens_to_rank) a->n_tokens_to_rank[q] = (int32_t)p->send_cnt[q];
    if (a->n_tokens_from_rank) a->n_tokens_from_rank[q] = (int32_t)p->recv_cnt[q];
  }
  if (a->tokens_per_expert)
    for (int64_t l = 0; l < El; l++) a->tokens_per_expert[l] = (int32_t)p->tpe[l];
  if (a->num_recv_rows) *a->num_recv_rows = rows;
}

disco_result_t disco_host_dispatch(disco_comm_t *comm, disco_handle_t *handle,
                                   const disco_dispatch_args_t *args, int layout_only,
                                   disco_result_t status, const char *fn,
                                   int64_t *num_rows) {
  disco_host_ws_t *ws = comm->host_ws;
  disco_host_plan_t *p = handle != NULL ? handle->host_plan : NULL;
  const int W = comm->world_size;
  disco_result_t rc, post;
  int64_t rows = 0;

  ws->call_seq++; /* every rank counts every call, so epochs match */
  if (status == DISCO_SUCCESS)
    status = disco_validate_topk(fn, comm, args->topk_idx, args->index_type,
                                 args->num_tokens, ws->dup_scratch);
  if (status == DISCO_SUCCESS) route(comm, p, args);
  rc = disco_host_exchange(comm, ws->hdr_stride, status, fn);
  if (rc != DISCO_SUCCESS) return rc;

  post = recv_plan(comm, p, args->layout, args->expert_alignment, fn, &rows);
  if (layout_only) {
    if (post != DISCO_SUCCESS) return post;
    goto done;
  }
  /* Rows over capacity: this rank fails alone but still takes part in the
   * exchange (the rows land in the workspace only), so peers complete. */
  if (post == DISCO_SUCCESS) post = disco_validate_dispatch_rows(fn, comm, args, rows);
  pack(comm, p, args);

  size_t *sc = ws->a2a, *sd = sc + W, *rcn = sd + W, *rd = rcn + W;
  for (int q = 0; q < W; q++) {
    sc[q] = (size_t)p->send_cnt[q] * ws->rec_bytes;
    sd[q] = (size_t)p->send_displ[q] * ws->rec_bytes;
    rcn[q] = (size_t)p->recv_cnt[q] * ws->rec_bytes;
    rd[q] = (size_t)p->recv_displ[q] * ws->rec_bytes;
  }
  rc = comm->ops->alltoallv(comm, ws->buf_s, sc, sd, ws->buf_r, rcn, rd);
  if (rc != DISCO_SUCCESS) return rc;
  if (post != DISCO_SUCCESS) return post;
  rc = verify_records(comm, p, fn);
  if (rc != DISCO_SUCCESS) return rc;

  if (args->layout == DISCO_LAYOUT_EXPERT_MAJOR)
    expand_expert_major(comm, p, args);
  else
    expand_rank_major(comm, p, args);
  write_counts(comm, p, args, rows);

done:
  p->epoch = ws->call_seq;
  handle->layout = args->layout;
  handle->num_tokens = args->num_tokens;
  handle->num_rows = rows;
  handle->data_moved = !layout_only;
  handle->valid = 1;
  if (num_rows != NULL) *num_rows = rows;
  return DISCO_SUCCESS;
}
