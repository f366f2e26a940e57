/* NCCL backend: dispatch and combine (host side: kernel launches, NCCL
 * groups, the one count read-back). See src/cuda/kernels.h for the flow. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "backend/nccl/nccl_backend.h"
#include "core/error.h"
#include "core/validate.h"

#define CK_CUDA(call, what)                               \
  do {                                                    \
    rc = disco_nccl_cuda((call), fn, (what), comm->rank); \
    if (rc != DISCO_SUCCESS) goto done;                   \
  } while (0)

/* Dispatch: packed bytes (tokens x min(K, W) x row bytes) above which the pack
 * is launched before the count exchange rather than after it. */
#define DISCO_PACK_FIRST_BYTES (16.0 * 1048576.0)

/* Rows this rank receives for a layout, from the read-back messages. */
int64_t disco_nccl_host_rows(const disco_kparams_t *p, const int64_t *recv,
                             disco_layout_t layout, int align) {
  int64_t rows = 0;
  if (layout == DISCO_LAYOUT_RANK_MAJOR) {
    for (int s = 0; s < p->world; s++)
      rows += recv[(int64_t)s * p->msg_len + DISCO_MSG_TOKENS];
    return rows;
  }
  for (int l = 0; l < p->num_local; l++) {
    int64_t n = 0;
    for (int s = 0; s < p->world; s++)
      n += recv[(int64_t)s * p->msg_len + DISCO_MSG_COUNTS + l];
    if (align > 1) n = (n + align - 1) / align * align;
    rows += n;
  }
  return rows;
}

/* Host copies of the exchanged counts (after a successful read-back). */
static void disco_take_counts(disco_nccl_plan_t *pl, const disco_kparams_t *p,
                              int64_t T) {
  const int W = p->world;
  const int64_t *sent = pl->host_msg, *recv = pl->host_msg + (int64_t)W * p->msg_len;
  pl->recv_off[0] = 0;
  for (int s = 0; s < W; s++) {
    pl->n_to[s] = sent[(int64_t)s * p->msg_len + DISCO_MSG_TOKENS];
    pl->n_from[s] = recv[(int64_t)s * p->msg_len + DISCO_MSG_TOKENS];
    pl->recv_off[s + 1] = pl->recv_off[s] + pl->n_from[s];
  }
  pl->recv_tokens = pl->recv_off[W];
  pl->num_tokens = T;
  pl->has_counts = 1;
  /* As the receive plan's pl.wide on the device (src/cuda/recv_plan.cuh). */
  pl->wide = 0;
  for (int s = 0; s < W; s++)
    if (recv[(int64_t)s * p->msg_len + DISCO_MSG_LAYOUT] == DISCO_LAYOUT_EXPERT_MAJOR)
      pl->wide = p->wire32;
}

/* Statuses of every rank, identical everywhere: the lowest failing rank. */
disco_result_t disco_nccl_check_status(const disco_comm_t *comm, const disco_kparams_t *p,
                                       const int64_t *recv, const char *fn) {
  for (int s = 0; s < p->world; s++) {
    const int64_t *m = recv + (int64_t)s * p->msg_len;
    disco_result_t code = (disco_result_t)m[DISCO_MSG_CODE];
    char what[160];
    if (code == DISCO_SUCCESS) continue;
    if (code != DISCO_ERR_DUPLICATE_EXPERT && code != DISCO_ERR_EXPERT_OUT_OF_RANGE)
      snprintf(what, sizeof(what), "its arguments failed the host-side checks");
    else if (code == DISCO_ERR_DUPLICATE_EXPERT)
      snprintf(what, sizeof(what),
               "topk_idx[%lld][%lld] = %lld repeats topk_idx[%lld][%lld]",
               (long long)m[DISCO_MSG_ROW], (long long)m[DISCO_MSG_SLOT],
               (long long)m[DISCO_MSG_VALUE], (long long)m[DISCO_MSG_ROW],
               (long long)m[DISCO_MSG_PREV]);
    else
      snprintf(what, sizeof(what), "topk_idx[%lld][%lld] = %lld outside [-1, %d)",
               (long long)m[DISCO_MSG_ROW], (long long)m[DISCO_MSG_SLOT],
               (long long)m[DISCO_MSG_VALUE], p->num_experts);
    if (s == comm->rank)
      return disco_error(code, "%s: %s%s on rank %d", fn, what,
                         code == DISCO_ERR_DUPLICATE_EXPERT ? " (same expert twice)" : "",
                         s);
    return disco_error(DISCO_ERR_REMOTE,
                       "%s: rank %d rejected its input (%s: %s); no data moved (seen on "
                       "rank %d)",
                       fn, s, disco_result_name(code), what, comm->rank);
  }
  return DISCO_SUCCESS;
}

/* Least rows of a pipelined piece (see disco_piece in src/cuda/kernels.h). */
static int64_t disco_split_rows(const disco_comm_t *comm) {
  const disco_nccl_state_t *st = comm->backend_state;
  return (st->split_bytes + (int64_t)comm->row_bytes - 1) / (int64_t)comm->row_bytes;
}

/* Rows [lo, hi) of an n-row peer segment that piece c of `chunks` carries
 * (c < 0: all of it). */
static void disco_cut(const disco_comm_t *comm, int64_t n, int c, int chunks, int64_t *lo,
                      int64_t *hi) {
  long long l, h;
  disco_piece(n, c, chunks, disco_split_rows(comm), &l, &h);
  *lo = l, *hi = h;
}

/* Most pieces any of this rank's segments (sent or received) is cut into.
 * A pair's piece c travels in group c on both ends; groups past this rank's
 * last piece would be empty here, so they are not posted. */
static int disco_used_pieces(const disco_comm_t *comm, const disco_nccl_plan_t *pl,
                             int chunks) {
  int64_t most = 1;
  for (int q = 0; q < comm->world_size; q++) {
    if (q == comm->rank) continue;
    int64_t a = disco_pieces(pl->n_to[q], chunks, disco_split_rows(comm)),
            b = disco_pieces(pl->n_from[q], chunks, disco_split_rows(comm));
    most = a > most ? a : most;
    most = b > most ? b : most;
  }
  return (int)most;
}

/* Rows of the peers' pieces c (launch size of a piece rowsel); side: the
 * launch runs beside an NCCL kernel. */
static disco_rowsel_t disco_chunk_sel(const disco_comm_t *comm,
                                      const disco_nccl_plan_t *pl, int c, int chunks,
                                      int side) {
  disco_rowsel_t s = {0, 0, 0, 0, c, chunks, disco_split_rows(comm), side};
  for (int q = 0; q < comm->world_size; q++) {
    int64_t lo, hi;
    if (q == comm->rank) continue;
    disco_cut(comm, pl->n_from[q], c, chunks, &lo, &hi);
    s.n += hi - lo;
  }
  return s;
}

/* One NCCL group of dispatch rows + metadata (c < 0: whole segments).
 * `dst`: where received rows land (recv_x or the workspace). */
static disco_result_t disco_post_rows(disco_comm_t *comm, const disco_nccl_plan_t *pl,
                                      char *dst, int c, int chunks, cudaStream_t stream,
                                      const char *fn) {
  const disco_nccl_state_t *st = comm->backend_state;
  const disco_kparams_t *p = &st->kp;
  const int W = comm->world_size, r = comm->rank;
  const size_t rb = comm->row_bytes, mb = (size_t)p->meta_ints * 4u,
               M = (size_t)p->max_tokens;
  disco_result_t rc = disco_nccl_nccl(ncclGroupStart(), fn, "ncclGroupStart", r);
  if (rc != DISCO_SUCCESS) return rc;
  for (int d = 0; d < W && rc == DISCO_SUCCESS; d++) {
    int64_t lo, hi;
    if (d == r) continue;
    disco_cut(comm, pl->n_to[d], c, chunks, &lo, &hi);
    if (hi > lo) {
      rc =
          disco_nccl_nccl(ncclSend((char *)p->ws_send + ((size_t)d * M + (size_t)lo) * rb,
                                   (size_t)(hi - lo) * rb, ncclChar, d, st->nccl, stream),
                          fn, "ncclSend(rows)", r);
      if (rc == DISCO_SUCCESS)
        rc = disco_nccl_nccl(
            ncclSend(p->send_meta + ((size_t)d * M + (size_t)lo) * (size_t)p->meta_ints,
                     (size_t)(hi - lo) * mb, ncclChar, d, st->nccl, stream),
            fn, "ncclSend(metadata)", r);
    }
    disco_cut(comm, pl->n_from[d], c, chunks, &lo, &hi);
    if (hi > lo && rc == DISCO_SUCCESS) {
      const size_t at = (size_t)(pl->recv_off[d] + lo);
      rc = disco_nccl_nccl(
          ncclRecv(dst + at * rb, (size_t)(hi - lo) * rb, ncclChar, d, st->nccl, stream),
          fn, "ncclRecv(rows)", r);
      if (rc == DISCO_SUCCESS)
        rc = disco_nccl_nccl(
            ncclRecv(p->recv_meta + at * (size_t)p->meta_ints, (size_t)(hi - lo) * mb,
                     ncclChar, d, st->nccl, stream),
            fn, "ncclRecv(metadata)", r);
    }
  }
  if (rc != DISCO_SUCCESS) {
    ncclGroupEnd(); /* close the group after a failed call inside */
    return rc;
  }
  return disco_nccl_group_end(comm, fn);
}

/* One NCCL group of combine partials (row bytes wb), chunk c. */
static disco_result_t disco_post_partials(disco_comm_t *comm, const disco_nccl_plan_t *pl,
                                          const char *part, size_t wb, int c, int chunks,
                                          cudaStream_t stream, const char *fn) {
  const disco_nccl_state_t *st = comm->backend_state;
  const int W = comm->world_size, r = comm->rank;
  const size_t M = (size_t)st->kp.max_tokens;
  disco_result_t rc = disco_nccl_nccl(ncclGroupStart(), fn, "ncclGroupStart", r);
  if (rc != DISCO_SUCCESS) return rc;
  for (int d = 0; d < W && rc == DISCO_SUCCESS; d++) {
    int64_t lo, hi;
    if (d == r) continue;
    disco_cut(comm, pl->n_from[d], c, chunks, &lo, &hi);
    if (hi > lo)
      rc =
          disco_nccl_nccl(ncclSend(part + (size_t)(pl->recv_off[d] + lo) * wb,
                                   (size_t)(hi - lo) * wb, ncclChar, d, st->nccl, stream),
                          fn, "ncclSend(partials)", r);
    disco_cut(comm, pl->n_to[d], c, chunks, &lo, &hi);
    if (hi > lo && rc == DISCO_SUCCESS)
      rc = disco_nccl_nccl(
          ncclRecv((char *)st->kp.ws_send + ((size_t)d * M + (size_t)lo) * wb,
                   (size_t)(hi - lo) * wb, ncclChar, d, st->nccl, stream),
          fn, "ncclRecv(partials)", r);
  }
  if (rc != DISCO_SUCCESS) {
    ncclGroupEnd();
    return rc;
  }
  return disco_nccl_group_end(comm, fn);
}

/* Count messages (with each rank's status) to every peer, then the one
 * read-back of sent and received messages into pl->host_msg; st->done is
 * recorded after it. */
static disco_result_t disco_post_counts(disco_comm_t *comm, const disco_nccl_plan_t *pl,
                                        cudaStream_t stream, const char *fn) {
  const disco_nccl_state_t *st = comm->backend_state;
  const disco_kparams_t *p = &st->kp;
  const int W = comm->world_size, r = comm->rank;
  const size_t msg_bytes = (size_t)p->msg_len * 8u;
  int64_t *msg = pl->dev.msg;
  disco_result_t rc = disco_nccl_nccl(ncclGroupStart(), fn, "ncclGroupStart", r);
  if (rc != DISCO_SUCCESS) return rc;
  for (int d = 0; d < W && rc == DISCO_SUCCESS; d++) {
    if (d == r) continue;
    rc = disco_nccl_nccl(
        ncclSend(msg + (int64_t)d * p->msg_len, msg_bytes, ncclChar, d, st->nccl, stream),
        fn, "ncclSend(counts)", r);
    if (rc == DISCO_SUCCESS)
      rc = disco_nccl_nccl(ncclRecv(msg + (int64_t)(W + d) * p->msg_len, msg_bytes,
                                    ncclChar, d, st->nccl, stream),
                           fn, "ncclRecv(counts)", r);
  }
  if (rc != DISCO_SUCCESS) {
    ncclGroupEnd(); /* close the group after a failed call inside */
    return rc;
  }
  rc = disco_nccl_group_end(comm, fn);
  if (rc == DISCO_SUCCESS)
    rc = disco_nccl_cuda(cudaMemcpyAsync(pl->host_msg, msg, 2u * (size_t)W * msg_bytes,
                                         cudaMemcpyDeviceToHost, stream),
                         fn, "cudaMemcpyAsync(counts)", r);
  if (rc == DISCO_SUCCESS)
    rc = disco_nccl_cuda(cudaEventRecord(st->done, stream), fn, "cudaEventRecord", r);
  return rc;
}

void disco_nccl_dispatch_abort(disco_comm_t *comm, disco_handle_t *handle, void *stream_v,
                               disco_result_t code) {
  const char *fn = "disco_dispatch";
  disco_nccl_state_t *st = comm->backend_state;
  disco_nccl_plan_t *pl = handle->backend_plan;
  const disco_kparams_t *p = &st->kp;
  const int W = comm->world_size;
  cudaStream_t stream = (cudaStream_t)stream_v;
  if (pl == NULL) return;
  pl->has_counts = 0;
  if (cudaSetDevice(st->device) != cudaSuccess) return;
  /* The peers read this rank's status word and return DISCO_ERR_REMOTE. */
  int64_t *sent = pl->host_msg;
  memset(sent, 0, (size_t)W * (size_t)p->msg_len * 8u);
  for (int d = 0; d < W; d++) {
    int64_t *m = sent + (int64_t)d * p->msg_len;
    m[DISCO_MSG_CODE] = code;
    m[DISCO_MSG_ROW] = m[DISCO_MSG_SLOT] = m[DISCO_MSG_VALUE] = m[DISCO_MSG_PREV] = -1;
  }
  if (disco_nccl_cuda(
          cudaMemcpyAsync(pl->dev.msg, sent, (size_t)W * (size_t)p->msg_len * 8u,
                          cudaMemcpyHostToDevice, stream),
          fn, "cudaMemcpyAsync(status)", comm->rank) != DISCO_SUCCESS)
    return;
  if (disco_post_counts(comm, pl, stream, fn) == DISCO_SUCCESS)
    (void)disco_nccl_wait(comm, fn);
}

disco_result_t disco_nccl_dispatch(disco_comm_t *comm, disco_handle_t *handle,
                                   const disco_dispatch_args_t *args, int layout_only,
                                   int64_t *num_rows) {
  const char *fn = layout_only ? "disco_dispatch_layout" : "disco_dispatch";
  disco_nccl_state_t *st = comm->backend_state;
  disco_nccl_plan_t *pl = handle->backend_plan;
  disco_kparams_t kp = st->kp;
  kp.layout = (int)args->layout; /* announced to the peers in the count messages */
  const disco_kparams_t *p = &kp;
  const disco_dev_plan_t *dp = &pl->dev;
  cudaStream_t stream = (cudaStream_t)args->stream;
  const int reuse = !layout_only && (args->flags & DISCO_DISPATCH_REUSE_LAYOUT);
  const int rank_major = args->layout == DISCO_LAYOUT_RANK_MAJOR;
  const int align = rank_major || args->expert_alignment < 1 ? 1 : args->expert_alignment;
  const int idx64 = args->index_type == DISCO_INDEX_INT64;
  const int W = comm->world_size, r = comm->rank;
  const int64_t M = p->max_tokens, T = args->num_tokens;
  const size_t rb = comm->row_bytes;
  const int64_t *recv = pl->host_msg + (int64_t)W * p->msg_len;
  disco_result_t rc, cap_rc = DISCO_SUCCESS;
  cudaEvent_t tail = NULL; /* last event recorded on the side stream */
  int64_t rows;

  CK_CUDA(cudaSetDevice(st->device), "cudaSetDevice");
  if (reuse) {
    if (!pl->has_counts || T != pl->num_tokens) {
      rc = disco_error(DISCO_ERR_INVALID_USAGE,
                       "%s: DISCO_DISPATCH_REUSE_LAYOUT with num_tokens = %lld but the "
                       "handle's plan is for %lld tokens on rank %d",
                       fn, (long long)T, (long long)pl->num_tokens, r);
      goto done;
    }
  } else {
    pl->has_counts = 0;
    CK_CUDA(disco_k_layout(p, dp, args->topk_idx, idx64, T, stream), "layout kernel");
  }
  /* Pack runs on the side stream beside the count exchange. A small one is
   * launched after the count group, so that few host launches precede it (4x
   * H200, 128 tokens: ~10 us less per dispatch). A large pack is the longer
   * path and goes first (4096 tokens, K = 8, EXPERT_MAJOR: 855-868 us with it
   * second vs 789 us, one A/B run). */
  const int pack_first = (double)T * (double)p->kd * (double)rb > DISCO_PACK_FIRST_BYTES;
  if (!layout_only) CK_CUDA(cudaEventRecord(st->ev_fork, stream), "cudaEventRecord");
  for (int step = 0; step < 2; step++) {
    if (!layout_only && step == !pack_first) {
      CK_CUDA(cudaStreamWaitEvent(st->aux, st->ev_fork, 0), "cudaStreamWaitEvent");
      CK_CUDA(disco_k_pack(p, dp, args->x, args->topk_weights, T, rank_major, st->aux),
              "pack kernel");
      CK_CUDA(cudaEventRecord(st->ev_pack, st->aux), "cudaEventRecord");
      tail = st->ev_pack;
    }
    if (!reuse && step == pack_first) {
      rc = disco_post_counts(comm, pl, stream, fn);
      if (rc != DISCO_SUCCESS) goto done;
    }
  }
  if (!reuse) {
    if (layout_only) {
      /* The device plan is (re)made for the actual layout at dispatch. */
      rc = disco_nccl_wait(comm, fn);
      if (rc != DISCO_SUCCESS) goto done;
      rc = disco_nccl_check_status(comm, p, recv, fn);
      if (rc != DISCO_SUCCESS) goto done;
      disco_take_counts(pl, p, T);
      *num_rows = disco_nccl_host_rows(p, recv, args->layout, align);
      goto done;
    }
  }
  /* Receive plan and user counts; written on the device only if every rank's
   * status is fine and this rank's outputs can hold what it receives. */
  CK_CUDA(disco_k_recv_plan(p, dp, (int)args->layout, align, args->n_tokens_to_rank,
                            args->n_tokens_from_rank, args->tokens_per_expert,
                            args->num_recv_rows, args->recv_x ? args->recv_capacity : 0,
                            stream),
          "recv_plan kernel");
  CK_CUDA(cudaEventRecord(st->ev_mid, stream), "cudaEventRecord");
  if (!reuse) { /* the one host read of counts */
    rc = disco_nccl_wait(comm, fn);
    if (rc != DISCO_SUCCESS) goto done;
    rc = disco_nccl_check_status(comm, p, recv, fn);
    if (rc != DISCO_SUCCESS) goto done;
    disco_take_counts(pl, p, T);
  }
  rows = disco_nccl_host_rows(p, recv, args->layout, align);
  cap_rc = disco_validate_dispatch_rows(fn, comm, args, rows);
  if (cap_rc == DISCO_SUCCESS && rows > 2147483647) /* kernels index rows with int32 */
    cap_rc =
        disco_error(DISCO_ERR_NOT_SUPPORTED, "%s: %lld rows exceed 2^31-1 on rank %d", fn,
                    (long long)rows, r);
  /* Payload and metadata. Peers send regardless of our capacity, so a rank
   * that cannot take its rows still receives them, into the workspace.
   * Segments of at least two pieces' bytes go in pieces (DISCO_NCCL_DISPATCH_
   * CHUNKS, DISCO_NCCL_SPLIT_BYTES), one NCCL group each; EXPERT_MAJOR
   * expands a piece on the side stream while the next one is on the wire,
   * and the last piece here. */
  CK_CUDA(cudaStreamWaitEvent(stream, st->ev_pack, 0), "cudaStreamWaitEvent");
  /* RANK_MAJOR rows land straight in recv_x, unless the workspaces are
   * registered: then in ws_recv, copied after (NCCL's zero-copy path wants
   * registered buffers on both ends of every send). */
  char *dst = rank_major && cap_rc == DISCO_SUCCESS && !st->registered
                  ? (char *)args->recv_x
                  : (char *)p->ws_recv;
  /* The cut depends on counts and comm knobs only, never on this rank's
   * layout: ranks may receive in different layouts, and both ends of a pair
   * must post the same pieces. RANK_MAJOR just has nothing to overlap. */
  const int dchunks = st->dispatch_chunks;
  const int np = dchunks > 1 ? disco_used_pieces(comm, pl, dchunks) : 1;
  for (int c = 0; c < np; c++) {
    rc = disco_post_rows(comm, pl, dst, np > 1 ? c : -1, dchunks, stream, fn);
    if (rc != DISCO_SUCCESS) goto done;
    if (c + 1 < np) CK_CUDA(cudaEventRecord(st->ev_land[c], stream), "cudaEventRecord");
  }
  if (cap_rc != DISCO_SUCCESS) {
    rc = cap_rc;
    goto done;
  }
  /* This rank's own rows, on the side stream while NCCL moves the others. */
  const int64_t self_n = pl->n_from[r], self_off = pl->recv_off[r];
  const disco_rowsel_t self = {self_n, self_off, INT64_MAX, 0, -1, 1, 0, 1};
  const disco_rowsel_t all_peers = {
      pl->recv_tokens - self_n, 0, self_off, self_n, -1, 1, 0, 0};
  const disco_rowsel_t peers =
      np > 1 ? disco_chunk_sel(comm, pl, np - 1, dchunks, 0) : all_peers;
  CK_CUDA(cudaStreamWaitEvent(st->aux, st->ev_mid, 0), "cudaStreamWaitEvent");
  if (rank_major) {
    if (self_n > 0)
      CK_CUDA(cudaMemcpyAsync((char *)args->recv_x + (size_t)self_off * rb,
                              (char *)p->ws_send + (size_t)(r * M) * rb,
                              (size_t)self_n * rb, cudaMemcpyDeviceToDevice, st->aux),
              "cudaMemcpyAsync(self rows)");
  } else {
    CK_CUDA(disco_k_expand_expert(p, dp, args->x, self, args->recv_x, args->recv_src_rank,
                                  args->recv_src_token, args->recv_expert,
                                  args->recv_weight, st->aux),
            "expand kernel (self)");
    for (int c = 0; c + 1 < np; c++) {
      CK_CUDA(cudaStreamWaitEvent(st->aux, st->ev_land[c], 0), "cudaStreamWaitEvent");
      CK_CUDA(
          disco_k_expand_expert(p, dp, args->x, disco_chunk_sel(comm, pl, c, dchunks, 1),
                                args->recv_x, args->recv_src_rank, args->recv_src_token,
                                args->recv_expert, args->recv_weight, st->aux),
          "expand kernel (piece)");
    }
  }
  CK_CUDA(cudaEventRecord(st->ev_aux, st->aux), "cudaEventRecord");
  tail = st->ev_aux;
  if (rank_major) {
    if (st->registered)
      CK_CUDA(disco_k_copy_rows(p, dp, all_peers, p->ws_recv, args->recv_x, 0, stream),
              "copy kernel (peer rows)"); /* every piece: all landed by now */
    CK_CUDA(disco_k_expand_rank(p, dp, pl->recv_tokens, args->recv_src_rank,
                                args->recv_src_token, args->recv_expert,
                                args->recv_weight, stream),
            "expand kernel");
  } else {
    CK_CUDA(disco_k_expand_expert(p, dp, args->x, peers, args->recv_x,
                                  args->recv_src_rank, args->recv_src_token,
                                  args->recv_expert, args->recv_weight, stream),
            "expand kernel (peers)");
    if (align > 1)
      CK_CUDA(
          disco_k_padding(p, dp, args->recv_x, args->recv_src_rank, args->recv_src_token,
                          args->recv_expert, args->recv_weight, stream),
          "padding kernel");
  }
  *num_rows = rows;
  rc = DISCO_SUCCESS;
done:
  if (tail != NULL) { /* join the side stream back into the caller's */
    disco_result_t jr = disco_nccl_cuda(cudaStreamWaitEvent(stream, tail, 0), fn,
                                        "cudaStreamWaitEvent", r);
    if (rc == DISCO_SUCCESS) rc = jr;
  }
  return rc;
}

disco_result_t disco_nccl_combine(disco_comm_t *comm, disco_handle_t *handle,
                                  const disco_combine_args_t *args) {
  static const char fn[] = "disco_combine";
  disco_nccl_state_t *st = comm->backend_state;
  disco_nccl_plan_t *pl = handle->backend_plan;
  const disco_kparams_t *p = &st->kp;
  cudaStream_t stream = (cudaStream_t)args->stream;
  const int r = comm->rank;
  const int rank_major = handle->layout == DISCO_LAYOUT_RANK_MAJOR;
  /* fp32 partials on every rank, or dtype ones on every rank: decided from
   * the layouts all ranks announced in this handle's dispatch (pl->wide). */
  const int wire32 = pl->wide;
  const size_t wb = wire32 ? (size_t)comm->config.hidden * 4u : comm->row_bytes;
  /* Partials travel from ws_recv. A RANK_MAJOR y is sent as it is, unless
   * the partials are fp32 (widened there first, exactly) or the workspaces
   * are registered (copied there first, see dispatch). */
  const int via_ws = !rank_major || wire32 || st->registered;
  const char *part = via_ws ? (const char *)p->ws_recv : (const char *)args->y;
  const char *self_part = rank_major && !wire32 ? (const char *)args->y : part;
  const disco_rowsel_t self = {pl->n_from[r], pl->recv_off[r], INT64_MAX, 0, -1, 1, 0, 1};
  /* Weighting follows each token's own rank: rows of a rank that gave no
   * weights carry 1.0 (packed so), and 1.0f * y == y exactly. */
  const int weighted = args->weighted;
  const int cchunks = st->combine_chunks;
  const int np = cchunks > 1 ? disco_used_pieces(comm, pl, cchunks) : 1;
  const long long split = disco_split_rows(comm);
  disco_result_t rc;
  int forked = 0;

  CK_CUDA(cudaSetDevice(st->device), "cudaSetDevice");
  /* The side stream starts where the caller's stream is (y written, the last
   * combine's token kernel done with the pass lists). A RANK_MAJOR combine
   * in one piece has nothing for it. */
  if (!rank_major || np > 1) {
    CK_CUDA(cudaEventRecord(st->ev_fork, stream), "cudaEventRecord");
    CK_CUDA(cudaStreamWaitEvent(st->aux, st->ev_fork, 0), "cudaStreamWaitEvent");
    forked = 1;
  }
  /* Pipeline (DISCO_NCCL_COMBINE_CHUNKS > 1): each peer segment's partials
   * go in pieces, one NCCL group each. EXPERT_MAJOR folds piece 0 here and
   * the others (then its own rows) on the side stream, each ahead of its
   * group. Tokens are sorted by the piece their last partial travels in;
   * the side stream folds each piece's tokens once it has landed, and the
   * last piece's tokens are folded here. */
  if (!rank_major) {
    const disco_rowsel_t first =
        np > 1 ? disco_chunk_sel(comm, pl, 0, cchunks, 0)
               : (disco_rowsel_t){
                     pl->recv_tokens - self.n, 0, self.base, self.n, -1, 1, 0, 0};
    CK_CUDA(disco_k_combine_expert(p, &pl->dev, args->y, first, weighted, wire32, stream),
            "combine expert kernel (peers)");
    for (int c = 1; c < np; c++) {
      CK_CUDA(disco_k_combine_expert(p, &pl->dev, args->y,
                                     disco_chunk_sel(comm, pl, c, cchunks, 1), weighted,
                                     wire32, st->aux),
              "combine expert kernel (piece)");
      CK_CUDA(cudaEventRecord(st->ev_piece[c], st->aux), "cudaEventRecord");
    }
    CK_CUDA(disco_k_combine_expert(p, &pl->dev, args->y, self, weighted, wire32, st->aux),
            "combine expert kernel (self)");
  }
  if (rank_major && via_ws) { /* own rows too when they are widened */
    const disco_rowsel_t rows = {pl->recv_tokens - (wire32 ? 0 : self.n),
                                 0,
                                 wire32 ? INT64_MAX : self.base,
                                 wire32 ? 0 : self.n,
                                 -1,
                                 1,
                                 0,
                                 0};
    CK_CUDA(disco_k_copy_rows(p, &pl->dev, rows, args->y, p->ws_recv, wire32, stream),
            "copy kernel (y)");
  }
  if (np > 1)
    CK_CUDA(disco_k_combine_classify(p, &pl->dev, handle->num_tokens, cchunks, split,
                                     st->aux),
            "combine classify kernel");
  for (int c = 0; c < np; c++) {
    if (!rank_major && c > 0) /* piece c folded */
      CK_CUDA(cudaStreamWaitEvent(stream, st->ev_piece[c], 0), "cudaStreamWaitEvent");
    rc = disco_post_partials(comm, pl, part, wb, np > 1 ? c : -1, cchunks, stream, fn);
    if (rc != DISCO_SUCCESS) goto done;
    if (c + 1 < np) CK_CUDA(cudaEventRecord(st->ev_land[c], stream), "cudaEventRecord");
  }
  for (int c = 0; c + 1 < np; c++) { /* piece c landed: its tokens */
    CK_CUDA(cudaStreamWaitEvent(st->aux, st->ev_land[c], 0), "cudaStreamWaitEvent");
    CK_CUDA(disco_k_combine_token(p, &pl->dev, self_part, wire32, handle->num_tokens, c,
                                  1, args->out, st->aux),
            "combine token kernel (piece)");
  }
  if (forked) {
    CK_CUDA(cudaEventRecord(st->ev_aux, st->aux), "cudaEventRecord");
    CK_CUDA(cudaStreamWaitEvent(stream, st->ev_aux, 0), "cudaStreamWaitEvent");
    forked = 0;
  }
  CK_CUDA(disco_k_combine_token(p, &pl->dev, self_part, wire32, handle->num_tokens,
                                np > 1 ? np - 1 : -1, 0, args->out, stream),
          "combine token kernel");
done:
  if (forked) { /* error path: still join the side stream */
    cudaEventRecord(st->ev_aux, st->aux);
    cudaStreamWaitEvent(stream, st->ev_aux, 0);
  }
  return rc;
}
