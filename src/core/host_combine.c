/* Host path combine: expert-side partial sums, alltoallv back, token-side
 * fold in DESIGN.md's fixed order (bit-identical to src/ref/ref.c). */
#include <string.h>

#include "core/dtype.h"
#include "core/error.h"
#include "core/host_path.h"

/* Header of a combine: [status, epoch of the handle's dispatch]. */
#define COMBINE_HDR 2

/* Partial of received record i into ws->acc (fp32): fold over its rows in
 * ascending local expert id, products rounded before the add (no FMA). */
static void expert_partial(const disco_comm_t *comm, const disco_host_plan_t *p,
                           const void *y, int weighted, int64_t i, float *acc) {
  const int64_t H = comm->config.hidden;
  const disco_dtype_t dt = comm->config.dtype;
  for (int64_t k = p->rec_off[i]; k < p->rec_off[i + 1]; k++) {
    const int64_t base = p->pair_row[k] * H;
    const float w = p->pair_w[k];
    const int first = k == p->rec_off[i];
    for (int64_t h = 0; h < H; h++) {
      float v = disco_load_f32(y, base + h, dt);
      if (weighted) v = w * v;
      acc[h] = first ? v : acc[h] + v;
    }
  }
}

disco_result_t disco_host_combine(disco_comm_t *comm, disco_handle_t *handle,
                                  const disco_combine_args_t *args, disco_result_t status,
                                  const char *fn) {
  disco_host_ws_t *ws = comm->host_ws;
  const int W = comm->world_size;
  const int64_t H = comm->config.hidden;
  const disco_dtype_t dt = comm->config.dtype;
  const int dtype_wire = comm->config.combine_wire == DISCO_COMBINE_WIRE_DTYPE;
  disco_host_plan_t *p = status == DISCO_SUCCESS ? handle->host_plan : NULL;
  float *acc = ws->acc;
  disco_result_t rc;

  if (status == DISCO_SUCCESS)
    for (int q = 0; q < W; q++) {
      ws->hdr_send[q * COMBINE_HDR] = DISCO_SUCCESS;
      ws->hdr_send[q * COMBINE_HDR + 1] = (int64_t)p->epoch;
    }
  rc = disco_host_exchange(comm, COMBINE_HDR, status, fn);
  if (rc != DISCO_SUCCESS) return rc;
  /* Every rank sees every epoch, so all agree on a mismatch. */
  for (int q = 0; q < W; q++)
    if (ws->hdr_recv[q * COMBINE_HDR + 1] != ws->hdr_recv[1])
      return disco_error(
          DISCO_ERR_INVALID_USAGE,
          "%s: the handle on rank %d holds a different dispatch than the one "
          "on rank 0 (reported on rank %d)",
          fn, q, comm->rank);

  /* Expert side: one partial per received record (source rank, token). */
  /* Weighting follows each token's own rank: rows from a rank that gave no
   * weights carry 1.0, and 1.0f * y == y exactly, so no per-rank flag here. */
  const int weighted = args->weighted && handle->layout == DISCO_LAYOUT_EXPERT_MAJOR;
  for (int64_t i = 0; i < p->n_recv; i++) {
    unsigned char *part = ws->buf_r + (size_t)i * ws->part_bytes;
    if (handle->layout == DISCO_LAYOUT_EXPERT_MAJOR) {
      expert_partial(comm, p, args->y, weighted, i, acc);
    } else {
      for (int64_t h = 0; h < H; h++) acc[h] = disco_load_f32(args->y, i * H + h, dt);
    }
    if (dtype_wire)
      for (int64_t h = 0; h < H; h++) disco_store_f32(part, h, acc[h], dt);
    else
      memcpy(part, acc, (size_t)H * sizeof(float));
  }

  size_t *sc = ws->a2a, *sd = sc + W, *rcn = sd + W, *rd = rcn + W;
  for (int q = 0; q < W; q++) {
    sc[q] = (size_t)p->recv_cnt[q] * ws->part_bytes;
    sd[q] = (size_t)p->recv_displ[q] * ws->part_bytes;
    rcn[q] = (size_t)p->send_cnt[q] * ws->part_bytes;
    rd[q] = (size_t)p->send_displ[q] * ws->part_bytes;
  }
  rc = comm->ops->alltoallv(comm, ws->buf_r, sc, sd, ws->buf_s, rcn, rd);
  if (rc != DISCO_SUCCESS) return rc;

  /* Token side: fold over destination ranks ascending, one cast at the end. */
  const disco_dtype_t wire_dt = dtype_wire ? dt : DISCO_DTYPE_FP32;
  for (int64_t t = 0; t < handle->num_tokens; t++) {
    unsigned char *orow = (unsigned char *)args->out + (size_t)t * comm->row_bytes;
    if (p->tok_off[t] == p->tok_off[t + 1]) {
      memset(orow, 0, comm->row_bytes); /* no valid slot: +0.0 */
      continue;
    }
    for (int64_t k = p->tok_off[t]; k < p->tok_off[t + 1]; k++) {
      const unsigned char *part = ws->buf_s + (size_t)p->tok_slot[k] * ws->part_bytes;
      const int first = k == p->tok_off[t];
      for (int64_t h = 0; h < H; h++) {
        float v = disco_load_f32(part, h, wire_dt);
        acc[h] = first ? v : acc[h] + v;
      }
    }
    for (int64_t h = 0; h < H; h++) disco_store_f32(orow, h, acc[h], dt);
  }
  return DISCO_SUCCESS;
}
