/* nccl_device backend: dispatch and combine (host side: launches only; no
 * host wait except disco_dispatch_layout's one read-back). */
#include <stdint.h>
#include <string.h>

#include "backend/nccl/nccl_backend.h"
#include "backend/nccl_device/nd_backend.h"
#include "core/error.h"

#define CK_CUDA(call, what)                               \
  do {                                                    \
    rc = disco_nccl_cuda((call), fn, (what), comm->rank); \
    if (rc != DISCO_SUCCESS) goto done;                   \
  } while (0)

/* The io block of a dispatch from the caller's args (outputs left NULL). */
static disco_nd_io_t nd_io(const disco_dispatch_args_t *args, int align, int rows,
                           int status, int call) {
  disco_nd_io_t io;
  memset(&io, 0, sizeof(io));
  io.layout = args != NULL ? (int)args->layout : (int)DISCO_LAYOUT_EXPERT_MAJOR;
  io.alignment = align;
  io.rows = rows;
  io.status = status;
  io.call = call;
  if (args != NULL && status == 0) {
    io.x = args->x;
    io.weights = args->topk_weights;
    io.num_tokens = args->num_tokens;
  }
  return io;
}

disco_result_t disco_nd_dispatch(disco_comm_t *comm, disco_handle_t *handle,
                                 const disco_dispatch_args_t *args, int layout_only,
                                 int64_t *num_rows) {
  const char *fn = layout_only ? "disco_dispatch_layout" : "disco_dispatch";
  disco_nd_state_t *st = comm->backend_state;
  disco_nd_plan_t *pl = handle->backend_plan;
  const disco_dev_plan_t *dp = &pl->dev;
  cudaStream_t stream = (cudaStream_t)args->stream;
  const int reuse = !layout_only && (args->flags & DISCO_DISPATCH_REUSE_LAYOUT);
  const int rank_major = args->layout == DISCO_LAYOUT_RANK_MAJOR;
  const int align = rank_major || args->expert_alignment < 1 ? 1 : args->expert_alignment;
  const int W = comm->world_size;
  disco_kparams_t kp = st->kp;
  kp.layout = (int)args->layout; /* announced to the peers in the count messages */
  disco_nd_io_t io = nd_io(args, align, !layout_only, 0,
                           layout_only ? DISCO_CALL_LAYOUT : DISCO_CALL_DISPATCH);
  disco_result_t rc = disco_nd_fatal(comm);
  if (rc != DISCO_SUCCESS) return rc;
  CK_CUDA(cudaSetDevice(st->device), "cudaSetDevice");
  if (!reuse) { /* the layout: its own kernel, or block 0 of the dispatch kernel */
    io.topk_idx = args->topk_idx;
    io.idx64 = args->index_type == DISCO_INDEX_INT64;
  }
  if (layout_only) {
    kp.lerr = NULL; /* the host reads the statuses back itself */
    io.capacity = INT64_MAX;
    rc = disco_nd_run_dispatch(comm, pl, &kp, &io, stream, fn);
    if (rc != DISCO_SUCCESS) goto done;
    CK_CUDA(
        cudaMemcpyAsync(pl->host_msg, dp->msg, 2u * (size_t)W * (size_t)kp.msg_len * 8u,
                        cudaMemcpyDeviceToHost, stream),
        "cudaMemcpyAsync(counts)");
    rc = disco_nd_mark(comm, stream, fn);
    if (rc != DISCO_SUCCESS) goto done;
    rc = disco_nd_wait_last(comm, fn);
    if (rc == DISCO_SUCCESS) rc = disco_nd_fatal(comm);
    if (rc != DISCO_SUCCESS) goto done;
    const int64_t *recv = pl->host_msg + (int64_t)W * kp.msg_len;
    rc = disco_nccl_check_status(comm, &kp, recv, fn);
    if (rc != DISCO_SUCCESS) goto done;
    *num_rows = disco_nccl_host_rows(&kp, recv, args->layout, align);
    goto done;
  }
  io.recv_x = args->recv_x;
  io.src_rank = args->recv_src_rank;
  io.src_token = args->recv_src_token;
  io.expert = args->recv_expert;
  io.weight = args->recv_weight;
  io.n_to = args->n_tokens_to_rank;
  io.n_from = args->n_tokens_from_rank;
  io.tokens_per_expert = args->tokens_per_expert;
  io.num_recv_rows = args->num_recv_rows;
  io.capacity = args->recv_x ? args->recv_capacity : 0;
  rc = disco_nd_run_dispatch(comm, pl, &kp, &io, stream, fn);
  if (rc == DISCO_SUCCESS) rc = disco_nd_mark(comm, stream, fn);
  *num_rows = -1; /* on the device only (args->num_recv_rows) */
done:
  return rc;
}

void disco_nd_dispatch_abort(disco_comm_t *comm, disco_handle_t *handle, void *stream_v,
                             disco_result_t code) {
  static const char fn[] = "disco_dispatch";
  disco_nd_state_t *st = comm->backend_state;
  disco_nd_plan_t *pl = handle->backend_plan;
  cudaStream_t stream = (cudaStream_t)stream_v;
  disco_kparams_t kp = st->kp;
  disco_nd_io_t io = nd_io(NULL, 1, 0, (int)code, DISCO_CALL_DISPATCH);
  if (pl == NULL || disco_nd_fatal(comm) != DISCO_SUCCESS ||
      cudaSetDevice(st->device) != cudaSuccess)
    return;
  /* Peers latch DISCO_ERR_REMOTE from this rank's status; this rank's own
   * error is the call's return value, so it is not latched here. */
  kp.lerr = NULL;
  if (disco_nd_run_dispatch(comm, pl, &kp, &io, stream, fn) == DISCO_SUCCESS)
    (void)disco_nd_mark(comm, stream, fn);
}

static disco_result_t nd_combine(disco_comm_t *comm, disco_handle_t *handle,
                                 const disco_combine_args_t *args, cudaStream_t stream,
                                 disco_result_t code) {
  static const char fn[] = "disco_combine";
  disco_nd_state_t *st = comm->backend_state;
  disco_nd_plan_t *pl = handle->backend_plan;
  const int rank_major = handle->layout == DISCO_LAYOUT_RANK_MAJOR;
  /* The config's wire; the kernel narrows it with the handle's pl.wide (the
   * layouts every rank announced), so all ranks' partials agree. */
  const int wire32 = st->kp.wire32;
  disco_kparams_t kp = st->kp;
  disco_result_t rc = disco_nd_fatal(comm);
  if (rc != DISCO_SUCCESS) return rc;
  if (code != DISCO_SUCCESS) kp.lerr = NULL; /* returned by the call itself */
  CK_CUDA(cudaSetDevice(st->device), "cudaSetDevice");
  rc = disco_nd_run_combine(comm, pl, &kp, args ? args->y : NULL,
                            args ? args->y_rows : -1, args ? args->weighted : 0, wire32,
                            rank_major, (int)code, args ? args->out : NULL,
                            code != DISCO_SUCCESS ? 0 : handle->num_tokens, stream, fn);
  if (rc == DISCO_SUCCESS) rc = disco_nd_mark(comm, stream, fn);
done:
  return rc;
}

disco_result_t disco_nd_combine(disco_comm_t *comm, disco_handle_t *handle,
                                const disco_combine_args_t *args) {
  return nd_combine(comm, handle, args, (cudaStream_t)args->stream, DISCO_SUCCESS);
}

void disco_nd_combine_abort(disco_comm_t *comm, disco_handle_t *handle, void *stream,
                            disco_result_t code) {
  if (handle->backend_plan != NULL)
    (void)nd_combine(comm, handle, NULL, (cudaStream_t)stream, code);
}
