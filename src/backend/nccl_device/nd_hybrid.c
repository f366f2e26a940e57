/* nccl_device backend: where each rank's stores go (nd.prow, nd.ppart, and
 * peer[] for the window's small regions), and the hybrid comm: peers outside
 * NCCL's LSA team (other hosts) served by NCCL send/recv inside the same
 * call (docs/nccl_device.md, "Peers on other hosts"; decision 20).
 *
 * In a hybrid comm each call runs in two launches of the plain kernels. The
 * send half stores what goes to a remote peer into a local staging copy of
 * our slot in its window (the same offsets: counts, metadata and flags in a
 * copy of the window's small regions, rows and partials in buffers of one
 * slot each), then NCCL moves those bytes to the peer, which lands them in
 * staging of its own and copies them into its window (NCCL never touches
 * the symmetric window: run 76 hung in NCCL once it received into it
 * messages above ~512 KB), and the receive half finds every source's
 * counts, rows and flags in its own window as if they had been stored over
 * NVLink. Flags still carry the
 * call's sequence; acks are not needed for remote peers (stream order
 * protects both the staging copies and our window's remote slots). */
#include <stdlib.h>
#include <string.h>

#include "backend/nccl/nccl_backend.h"
#include "backend/nccl_device/nd_backend.h"
#include "core/error.h"

#define ND_ALIGN256(n) (((n) + 255u) / 256u * 256u)

/* Copies from the receive staging into the window, issued after the group. */
typedef struct nd_land {
  void *dst;
  const void *src;
  size_t bytes;
} nd_land_t;
#define ND_LANDS_PER_PEER 3

/* Bytes of one remote peer's staging: the window's small regions (below
 * off_rows, disco_nd_window_layout puts them first; our slot in it is what
 * we send, the peer's slot what we receive), then one slot of rows and one
 * of partials to send, then the same to receive. */
static void nd_stage_sizes(const disco_nd_state_t *st, size_t *small, size_t *rows,
                           size_t *part) {
  const size_t M = (size_t)st->kp.max_tokens;
  *small = ND_ALIGN256((size_t)st->nd.off_rows);
  *rows = ND_ALIGN256(M * (size_t)st->kp.row_bytes);
  *part = ND_ALIGN256(M * (size_t)st->nd.part_vecs * 16u);
}

disco_result_t disco_nd_links_setup(disco_comm_t *comm, const char *fn) {
  disco_nd_state_t *st = comm->backend_state;
  const int W = comm->world_size, r = comm->rank;
  const size_t M = (size_t)st->kp.max_tokens, rb = (size_t)st->kp.row_bytes;
  const size_t pb = (size_t)st->nd.part_vecs * 16u;
  size_t small = 0, rows = 0, part = 0;
  char **peer = calloc((size_t)W, sizeof(char *));
  char **h = calloc(2u * (size_t)W, sizeof(char *));
  unsigned char *rem = calloc((size_t)W, 1);
  disco_result_t rc = DISCO_SUCCESS;
  if (peer == NULL || h == NULL || rem == NULL) {
    rc = disco_error(DISCO_ERR_OUT_OF_MEMORY, "%s: out of memory on rank %d", fn, r);
    goto done;
  }
  rc = disco_nccl_cuda(cudaMemcpy(peer, (const void *)st->nd.peer,
                                  (size_t)W * sizeof(char *), cudaMemcpyDeviceToHost),
                       fn, "cudaMemcpy(peers)", r);
  if (rc != DISCO_SUCCESS) goto done;
  st->nremote = 0;
  for (int d = 0; d < W; d++) {
    rem[d] = d != r && peer[d] == NULL; /* nd_setup.cu: not load-store accessible */
    st->nremote += rem[d];
  }
  if ((st->nremote > 0) != (st->hybrid != 0)) {
    rc = disco_error(DISCO_ERR_INTERNAL,
                     "%s: rank %d counted its NVLink peers twice and got two answers", fn,
                     r);
    goto done;
  }
  nd_stage_sizes(st, &small, &rows, &part);
  st->stage_bytes = small + 2u * (rows + part);
  if (st->nremote > 0) {
    const int m1 = st->kp.msg_len + 2; /* ND_CNT_WORDS */
    st->remote_rank = calloc((size_t)st->nremote, sizeof(int));
    if (st->remote_rank == NULL) {
      rc = disco_error(DISCO_ERR_OUT_OF_MEMORY, "%s: out of memory on rank %d", fn, r);
      goto done;
    }
    rc = disco_nccl_cuda(cudaMalloc(&st->stage, st->stage_bytes * (size_t)st->nremote),
                         fn, "cudaMalloc(staging for peers on other hosts)", r);
    if (rc == DISCO_SUCCESS)
      rc =
          disco_nccl_cuda(cudaMemset(st->stage, 0, st->stage_bytes * (size_t)st->nremote),
                          fn, "cudaMemset", r);
    st->land = calloc((size_t)st->nremote * ND_LANDS_PER_PEER, sizeof(nd_land_t));
    if (st->land == NULL && rc == DISCO_SUCCESS)
      rc = disco_error(DISCO_ERR_OUT_OF_MEMORY, "%s: out of memory on rank %d", fn, r);
    if (rc == DISCO_SUCCESS)
      rc = disco_nccl_cuda(
          cudaMallocHost((void **)&st->hcnt,
                         (size_t)st->nremote * (size_t)W * (size_t)m1 * 8u),
          fn, "cudaMallocHost(counts)", r);
    if (rc != DISCO_SUCCESS) goto done;
  }
  for (int d = 0, i = 0; d < W; d++) {
    if (rem[d]) {
      char *s = (char *)st->stage + (size_t)i * st->stage_bytes;
      st->remote_rank[i++] = d;
      peer[d] = s; /* a copy of d's small regions; our slot r in it */
      h[d] = s + small;
      h[W + d] = s + small + rows;
    } else {
      h[d] = peer[d] + st->nd.off_rows + (size_t)r * M * rb;
      h[W + d] = peer[d] + st->nd.off_part + (size_t)r * M * pb;
    }
  }
  rc =
      disco_nccl_cuda(cudaMalloc(&st->links, 2u * (size_t)W * sizeof(char *) + (size_t)W),
                      fn, "cudaMalloc", r);
  if (rc != DISCO_SUCCESS) goto done;
  char **dl = st->links;
  rc = disco_nccl_cuda(
      cudaMemcpy(dl, h, 2u * (size_t)W * sizeof(char *), cudaMemcpyHostToDevice), fn,
      "cudaMemcpy", r);
  if (rc == DISCO_SUCCESS)
    rc = disco_nccl_cuda(cudaMemcpy(dl + 2 * W, rem, (size_t)W, cudaMemcpyHostToDevice),
                         fn, "cudaMemcpy", r);
  if (rc == DISCO_SUCCESS)
    rc = disco_nccl_cuda(cudaMemcpy((void *)st->nd.peer, peer, (size_t)W * sizeof(char *),
                                    cudaMemcpyHostToDevice),
                         fn, "cudaMemcpy(peers)", r);
  if (rc != DISCO_SUCCESS) goto done;
  st->nd.prow = dl;
  st->nd.ppart = dl + W;
  st->nd.remote = st->nremote > 0 ? (const unsigned char *)(dl + 2 * W) : NULL;
done:
  free(peer);
  free(h);
  free(rem);
  return rc;
}

void disco_nd_links_free(disco_nd_state_t *st) {
  cudaFree(st->links);
  cudaFree(st->stage);
  if (st->hcnt != NULL) cudaFreeHost(st->hcnt);
  free(st->remote_rank);
  free(st->land);
  st->land = NULL;
  st->links = st->stage = NULL;
  st->hcnt = NULL;
  st->remote_rank = NULL;
}

/* ---- a call in a hybrid comm --------------------------------------------------- */

/* A hybrid call can neither be captured (it reads counts on the host) nor
 * replayed (its NCCL sizes are this call's). */
static disco_result_t nd_not_capturing(disco_comm_t *comm, cudaStream_t stream,
                                       const char *fn) {
  enum cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
  disco_result_t rc = disco_nccl_cuda(cudaStreamIsCapturing(stream, &cs), fn,
                                      "cudaStreamIsCapturing", comm->rank);
  if (rc == DISCO_SUCCESS && cs != cudaStreamCaptureStatusNone)
    rc = disco_error(DISCO_ERR_NOT_SUPPORTED,
                     "%s: the stream is being captured, but this comm has peers on other "
                     "hosts (disco_comm_caps lacks DISCO_CAP_GRAPH; rank %d)",
                     fn, comm->rank);
  return rc;
}

static char *nd_stage(const disco_nd_state_t *st, int i) {
  return (char *)st->stage + (size_t)i * st->stage_bytes;
}

/* Offset of flag `kind` of rank q in a window (or its staging copy). */
static size_t nd_flag_off(const disco_nd_state_t *st, int kind, int q) {
  return st->nd.off_flags + ((size_t)kind * (size_t)st->kp.world + (size_t)q) * 8u;
}

static disco_result_t nd_group_start(disco_comm_t *comm, const char *fn) {
  disco_nd_state_t *st = comm->backend_state;
  st->nland = 0;
  return disco_nccl_nccl(ncclGroupStart(), fn, "ncclGroupStart", comm->rank);
}

/* Ends the group (rc: how its calls went), then lands what it received in
 * the window, in stream order before the receive half. */
static disco_result_t nd_group_finish(disco_comm_t *comm, disco_result_t rc,
                                      cudaStream_t stream, const char *fn) {
  disco_nd_state_t *st = comm->backend_state;
  const nd_land_t *land = st->land;
  if (rc != DISCO_SUCCESS) {
    ncclGroupEnd(); /* close the group after a failed call inside */
    return rc;
  }
  const ncclResult_t e = ncclGroupEnd();
  if (e == ncclInProgress) /* non-blocking comm: wait for the enqueue */
    rc =
        disco_nccl_poll(st->nccl, NULL, comm->timeout_ms, fn, "ncclGroupEnd", comm->rank);
  else
    rc = disco_nccl_nccl(e, fn, "ncclGroupEnd", comm->rank);
  for (int i = 0; i < st->nland && rc == DISCO_SUCCESS; i++)
    rc = disco_nccl_cuda(cudaMemcpyAsync(land[i].dst, land[i].src, land[i].bytes,
                                         cudaMemcpyDeviceToDevice, stream),
                         fn, "cudaMemcpyAsync(into the window)", comm->rank);
  return rc;
}

/* Inside a group: sends n bytes at s to peer d and receives m bytes from d
 * into staging t, to land at w (either may be 0: skipped; both sides skip
 * alike, the sizes being exchanged). */
static disco_result_t nd_xfer(disco_comm_t *comm, int d, const void *s, size_t n, void *t,
                              void *w, size_t m, cudaStream_t stream, const char *fn,
                              const char *what) {
  disco_nd_state_t *st = comm->backend_state;
  nd_land_t *land = st->land;
  disco_result_t rc = DISCO_SUCCESS;
  if (n > 0)
    rc = disco_nccl_nccl(ncclSend(s, n, ncclChar, d, st->nccl, stream), fn, what,
                         comm->rank);
  if (rc == DISCO_SUCCESS && m > 0) {
    rc = disco_nccl_nccl(ncclRecv(t, m, ncclChar, d, st->nccl, stream), fn, what,
                         comm->rank);
    land[st->nland].dst = w;
    land[st->nland].src = t;
    land[st->nland++].bytes = m;
  }
  return rc;
}

/* The same for the window's small regions with remote peer i = rank d:
 * ours from offset `from` of its staging copy, d's into offset `to` of the
 * copy, landing at `to` in the window. */
static disco_result_t nd_xfer_small(disco_comm_t *comm, int i, int d, size_t from,
                                    size_t n, size_t to, size_t m, cudaStream_t stream,
                                    const char *fn, const char *what) {
  disco_nd_state_t *st = comm->backend_state;
  char *s = nd_stage(st, i);
  return nd_xfer(comm, d, s + from, n, s + to, (char *)st->win_mem + to, m, stream, fn,
                 what);
}

/* Flag `kind`, ours to remote peer i = rank d and d's to us. */
static disco_result_t nd_xfer_flag(disco_comm_t *comm, int i, int d, int kind,
                                   cudaStream_t stream, const char *fn) {
  disco_nd_state_t *st = comm->backend_state;
  return nd_xfer_small(comm, i, d, nd_flag_off(st, kind, comm->rank), 8u,
                       nd_flag_off(st, kind, d), 8u, stream, fn,
                       "ncclSend/ncclRecv(flag)");
}

/* The count words to and from every remote peer, read back: rows[d] = rows
 * we send d this call, rows[W + d] = rows d sends us (word ml + 1 of each
 * message, nd_rows.cuh). One host wait, bounded as disco_nd_wait_last. */
static disco_result_t nd_counts(disco_comm_t *comm, int64_t *rows, cudaStream_t stream,
                                const char *fn) {
  disco_nd_state_t *st = comm->backend_state;
  const int W = comm->world_size, r = comm->rank, ml = st->kp.msg_len, m1 = ml + 2;
  const size_t cb = (size_t)m1 * 8u, cnt = st->nd.off_cnt;
  disco_result_t rc = nd_group_start(comm, fn);
  if (rc != DISCO_SUCCESS) return rc;
  for (int i = 0; i < st->nremote && rc == DISCO_SUCCESS; i++) {
    const int d = st->remote_rank[i];
    rc = nd_xfer_small(comm, i, d, cnt + (size_t)r * cb, cb, cnt + (size_t)d * cb, cb,
                       stream, fn, "ncclSend/ncclRecv(counts)");
  }
  rc = nd_group_finish(comm, rc, stream, fn);
  /* A staging copy's count words hold both messages: ours (slot r), d's
   * (slot d): one read each. */
  for (int i = 0; i < st->nremote && rc == DISCO_SUCCESS; i++)
    rc = disco_nccl_cuda(
        cudaMemcpyAsync(st->hcnt + (size_t)i * W * m1, nd_stage(st, i) + cnt,
                        (size_t)W * cb, cudaMemcpyDeviceToHost, stream),
        fn, "cudaMemcpyAsync(counts)", r);
  if (rc == DISCO_SUCCESS) rc = disco_nd_mark(comm, stream, fn);
  if (rc == DISCO_SUCCESS) rc = disco_nd_wait_last(comm, fn);
  if (rc == DISCO_SUCCESS) rc = disco_nd_fatal(comm);
  for (int d = 0; d < 2 * W; d++) rows[d] = 0;
  for (int i = 0; i < st->nremote && rc == DISCO_SUCCESS; i++) {
    const int d = st->remote_rank[i];
    const unsigned long long *h = st->hcnt + (size_t)i * W * m1;
    const unsigned long long ours = h[(size_t)r * m1 + ml + 1];
    const unsigned long long theirs = h[(size_t)d * m1 + ml + 1];
    /* both messages carry this call's sequence in their high halves */
    if (ours >> 32 != theirs >> 32)
      return disco_error(DISCO_ERR_INTERNAL,
                         "%s: rank %d's count message is from call %llu, ours from "
                         "call %llu (rank %d)",
                         fn, d, theirs >> 32, ours >> 32, r);
    rows[d] = (int64_t)(unsigned)ours;
    rows[W + d] = (int64_t)(unsigned)theirs;
    if (rows[W + d] > st->kp.max_tokens)
      return disco_error(
          DISCO_ERR_INTERNAL,
          "%s: rank %d announces %lld rows, more than max_tokens (rank %d)", fn, d,
          (long long)rows[W + d], r);
  }
  return rc;
}

disco_result_t disco_nd_run_dispatch(disco_comm_t *comm, disco_nd_plan_t *pl,
                                     const disco_kparams_t *kp, const disco_nd_io_t *io,
                                     cudaStream_t stream, const char *fn) {
  disco_nd_state_t *st = comm->backend_state;
  const int W = comm->world_size, r = comm->rank;
  if (!st->hybrid)
    return disco_nccl_cuda(disco_nd_k_dispatch(kp, &st->nd, &pl->dev, io, stream), fn,
                           "dispatch kernel", r);
  const size_t M = (size_t)st->kp.max_tokens, rb = (size_t)st->kp.row_bytes;
  const size_t mb = (size_t)st->kp.meta_ints * 4u, meta = st->nd.off_meta;
  size_t small = 0, rows = 0, part = 0;
  nd_stage_sizes(st, &small, &rows, &part);
  disco_nd_params_t nd = st->nd;
  disco_nd_io_t io2 = *io;
  disco_result_t rc = nd_not_capturing(comm, stream, fn);
  nd.phase = 1;
  if (rc == DISCO_SUCCESS)
    rc = disco_nccl_cuda(disco_nd_k_dispatch(kp, &nd, &pl->dev, io, stream), fn,
                         "dispatch kernel (send half)", r);
  if (rc == DISCO_SUCCESS) rc = nd_counts(comm, pl->rows, stream, fn);
  if (rc == DISCO_SUCCESS) rc = nd_group_start(comm, fn);
  if (rc != DISCO_SUCCESS) return rc;
  for (int i = 0; i < st->nremote && rc == DISCO_SUCCESS; i++) {
    const int d = st->remote_rank[i];
    const size_t nt = (size_t)pl->rows[d], nf = (size_t)pl->rows[W + d];
    char *s = nd_stage(st, i);
    rc = nd_xfer_small(comm, i, d, meta + (size_t)r * M * mb, nt * mb,
                       meta + (size_t)d * M * mb, nf * mb, stream, fn,
                       "ncclSend/ncclRecv(metadata)");
    if (rc == DISCO_SUCCESS)
      rc = nd_xfer(comm, d, s + small, nt * rb, s + small + rows + part,
                   (char *)st->win_mem + st->nd.off_rows + (size_t)d * M * rb, nf * rb,
                   stream, fn, "ncclSend/ncclRecv(rows)");
    if (rc == DISCO_SUCCESS) rc = nd_xfer_flag(comm, i, d, DISCO_ND_DFLAG, stream, fn);
  }
  rc = nd_group_finish(comm, rc, stream, fn);
  if (rc != DISCO_SUCCESS) return rc;
  nd.phase = 2;
  io2.topk_idx = NULL; /* the send half made the layout */
  return disco_nccl_cuda(disco_nd_k_dispatch(kp, &nd, &pl->dev, &io2, stream), fn,
                         "dispatch kernel (receive half)", r);
}

disco_result_t disco_nd_run_combine(disco_comm_t *comm, disco_nd_plan_t *pl,
                                    const disco_kparams_t *kp, const void *y,
                                    int64_t y_rows, int weighted, int wire32,
                                    int rank_major, int status, void *out,
                                    int64_t num_tokens, cudaStream_t stream,
                                    const char *fn) {
  disco_nd_state_t *st = comm->backend_state;
  const int W = comm->world_size, r = comm->rank;
  disco_nd_params_t nd = st->nd;
  disco_result_t rc = DISCO_SUCCESS;
  if (st->hybrid) {
    rc = nd_not_capturing(comm, stream, fn);
    nd.phase = 1;
  }
  if (rc == DISCO_SUCCESS)
    rc = disco_nccl_cuda(
        disco_nd_k_combine(kp, &nd, &pl->dev, y, y_rows, weighted, wire32, rank_major,
                           status, out, num_tokens, stream),
        fn, st->hybrid ? "combine kernel (send half)" : "combine kernel", r);
  if (!st->hybrid || rc != DISCO_SUCCESS) return rc;
  const size_t M = (size_t)st->kp.max_tokens, pb = (size_t)st->nd.part_vecs * 16u;
  size_t small = 0, rows = 0, part = 0;
  nd_stage_sizes(st, &small, &rows, &part);
  rc = nd_group_start(comm, fn);
  if (rc != DISCO_SUCCESS) return rc;
  /* A partial per row the dispatch brought us from d (pl->rows[W + d]) goes
   * back to d; d's for the rows we sent it come in. Stale rows travel when a
   * rank failed: nothing reaches out then (the statuses say so). */
  for (int i = 0; i < st->nremote && rc == DISCO_SUCCESS; i++) {
    const int d = st->remote_rank[i];
    const size_t nf = (size_t)pl->rows[W + d], nt = (size_t)pl->rows[d];
    char *s = nd_stage(st, i);
    rc = nd_xfer(comm, d, s + small + rows, nf * pb, s + small + 2u * rows + part,
                 (char *)st->win_mem + st->nd.off_part + (size_t)d * M * pb, nt * pb,
                 stream, fn, "ncclSend/ncclRecv(partials)");
    if (rc == DISCO_SUCCESS) rc = nd_xfer_flag(comm, i, d, DISCO_ND_CSTAT, stream, fn);
    if (rc == DISCO_SUCCESS) rc = nd_xfer_flag(comm, i, d, DISCO_ND_CFLAG, stream, fn);
  }
  rc = nd_group_finish(comm, rc, stream, fn);
  if (rc != DISCO_SUCCESS) return rc;
  nd.phase = 2;
  return disco_nccl_cuda(
      disco_nd_k_combine(kp, &nd, &pl->dev, y, y_rows, weighted, wire32, rank_major,
                         status, out, num_tokens, stream),
      fn, "combine kernel (receive half)", r);
}
