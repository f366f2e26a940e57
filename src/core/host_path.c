/* Host path: workspace and plan allocation (sized once from the config). */
#include "core/host_path.h"

#include <stdlib.h>
#include <string.h>

#include "core/error.h"

/* Beyond any real machine: fail as out of memory without asking malloc, which
 * sanitizers would turn into an abort. */
#define DISCO_HOST_ALLOC_MAX ((size_t)1 << 46)

void *disco_host_alloc(size_t n, size_t elem) {
  size_t bytes;
  if (__builtin_mul_overflow(n, elem, &bytes) || bytes > DISCO_HOST_ALLOC_MAX)
    return NULL;
  return malloc(bytes == 0 ? 1 : bytes);
}

/* a * b in int64, or -1 on overflow. */
static int64_t mul64(int64_t a, int64_t b) {
  int64_t r;
  return __builtin_mul_overflow(a, b, &r) ? -1 : r;
}

static int64_t min64(int64_t a, int64_t b) {
  return a < b ? a : b;
}

disco_result_t disco_host_path_init(disco_comm_t *comm) {
  const disco_config_t *c = &comm->config;
  const int64_t W = comm->world_size, E = c->num_experts, El = comm->num_local_experts;
  const int64_t K = c->top_k, T = c->max_tokens;
  disco_host_ws_t *ws = calloc(1, sizeof(*ws));
  if (ws == NULL) goto oom;
  comm->host_ws = ws;

  size_t meta = 4 + 8 * (size_t)K; /* src_token, K local ids, K weights */
  meta = (meta + 15) & ~(size_t)15;
  ws->rec_bytes = comm->row_bytes + meta;
  ws->part_bytes =
      (size_t)c->hidden *
      (c->combine_wire == DISCO_COMBINE_WIRE_DTYPE ? comm->elem_size : sizeof(float));
  size_t unit = ws->rec_bytes > ws->part_bytes ? ws->rec_bytes : ws->part_bytes;
  ws->hdr_stride = 2 + El;
  ws->max_send_rows = mul64(T, min64(K, W));
  ws->max_recv_rows = mul64(W, T);
  ws->max_pairs = ws->max_recv_rows < 0 ? -1 : mul64(ws->max_recv_rows, min64(K, El));
  if (ws->max_send_rows < 0 || ws->max_recv_rows < 0 || ws->max_pairs < 0 ||
      ws->max_recv_rows == INT64_MAX)
    goto too_large;

  ws->hdr_send = disco_host_alloc((size_t)(W * ws->hdr_stride), sizeof(int64_t));
  ws->hdr_recv = disco_host_alloc((size_t)(W * ws->hdr_stride), sizeof(int64_t));
  ws->buf_s = disco_host_alloc((size_t)ws->max_send_rows, unit);
  ws->buf_r = disco_host_alloc((size_t)ws->max_recv_rows, unit);
  ws->cnt_e = disco_host_alloc((size_t)E, sizeof(int64_t));
  ws->dest_mark = calloc((size_t)W, sizeof(uint64_t));
  ws->dup_scratch = disco_host_alloc((size_t)E, sizeof(int32_t));
  ws->cursor = disco_host_alloc((size_t)(W > El ? W : El), sizeof(int64_t));
  ws->a2a = disco_host_alloc((size_t)(4 * W), sizeof(size_t));
  ws->acc = disco_host_alloc((size_t)c->hidden, sizeof(float));
  if (!ws->hdr_send || !ws->hdr_recv || !ws->buf_s || !ws->buf_r || !ws->cnt_e ||
      !ws->dest_mark || !ws->dup_scratch || !ws->cursor || !ws->a2a || !ws->acc)
    goto oom;
  for (int64_t e = 0; e < E; e++) ws->dup_scratch[e] = -1;
  return DISCO_SUCCESS;

too_large:
  disco_host_path_fini(comm);
  return disco_error(DISCO_ERR_INVALID_ARGUMENT,
                     "disco: workspace for world_size %lld, max_tokens %lld, top_k %lld "
                     "overflows on rank %d",
                     (long long)W, (long long)T, (long long)K, comm->rank);
oom:
  disco_host_path_fini(comm);
  return disco_error(DISCO_ERR_OUT_OF_MEMORY,
                     "disco: out of memory for the host workspace (world_size %lld, "
                     "max_tokens %lld, hidden %lld) on rank %d",
                     (long long)W, (long long)T, (long long)c->hidden, comm->rank);
}

void disco_host_path_fini(disco_comm_t *comm) {
  disco_host_ws_t *ws = comm->host_ws;
  if (ws == NULL) return;
  free(ws->hdr_send);
  free(ws->hdr_recv);
  free(ws->buf_s);
  free(ws->buf_r);
  free(ws->cnt_e);
  free(ws->dest_mark);
  free(ws->dup_scratch);
  free(ws->cursor);
  free(ws->a2a);
  free(ws->acc);
  free(ws);
  comm->host_ws = NULL;
}

disco_result_t disco_host_plan_create(disco_comm_t *comm, disco_handle_t *handle) {
  const disco_host_ws_t *ws = comm->host_ws;
  const size_t W = (size_t)comm->world_size, El = (size_t)comm->num_local_experts;
  disco_host_plan_t *p = calloc(1, sizeof(*p));
  if (p == NULL) goto oom;
  handle->host_plan = p;
  p->send_cnt = disco_host_alloc(W, sizeof(int64_t));
  p->send_displ = disco_host_alloc(W, sizeof(int64_t));
  p->recv_cnt = disco_host_alloc(W, sizeof(int64_t));
  p->recv_displ = disco_host_alloc(W, sizeof(int64_t));
  p->tok_off = disco_host_alloc((size_t)comm->config.max_tokens + 1, sizeof(int64_t));
  p->tok_slot = disco_host_alloc((size_t)ws->max_send_rows, sizeof(int64_t));
  p->tok_dest = disco_host_alloc((size_t)ws->max_send_rows, sizeof(int32_t));
  p->raw = disco_host_alloc(El, sizeof(int64_t));
  p->tpe = disco_host_alloc(El, sizeof(int64_t));
  p->grp_off = disco_host_alloc(El, sizeof(int64_t));
  p->rec_off = disco_host_alloc((size_t)ws->max_recv_rows + 1, sizeof(int64_t));
  p->pair_row = disco_host_alloc((size_t)ws->max_pairs, sizeof(int64_t));
  p->pair_w = disco_host_alloc((size_t)ws->max_pairs, sizeof(float));
  if (!p->send_cnt || !p->send_displ || !p->recv_cnt || !p->recv_displ || !p->tok_off ||
      !p->tok_slot || !p->tok_dest || !p->raw || !p->tpe || !p->grp_off || !p->rec_off ||
      !p->pair_row || !p->pair_w)
    goto oom;
  return DISCO_SUCCESS;
oom:
  disco_host_plan_destroy(handle);
  return disco_error(DISCO_ERR_OUT_OF_MEMORY,
                     "disco_handle_create: out of memory for the routing plan on rank %d",
                     comm->rank);
}

void disco_host_plan_destroy(disco_handle_t *handle) {
  disco_host_plan_t *p = handle->host_plan;
  if (p == NULL) return;
  free(p->send_cnt);
  free(p->send_displ);
  free(p->recv_cnt);
  free(p->recv_displ);
  free(p->tok_off);
  free(p->tok_slot);
  free(p->tok_dest);
  free(p->raw);
  free(p->tpe);
  free(p->grp_off);
  free(p->rec_off);
  free(p->pair_row);
  free(p->pair_w);
  free(p);
  handle->host_plan = NULL;
}
