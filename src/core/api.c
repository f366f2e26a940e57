/* Public dispatch/combine entry points: validation, handle rules, then either
 * the device backend's whole operation or the host path. */
#include <stddef.h>
#include <stdio.h>

#include "core/comm.h"
#include "core/error.h"
#include "core/host_path.h"
#include "core/validate.h"

/* Local checks of a dispatch; the first failure's message is kept. */
static disco_result_t check_dispatch(const char *fn, disco_comm_t *comm,
                                     disco_handle_t *handle,
                                     const disco_dispatch_args_t *args, int layout_only,
                                     int64_t *num_rows, disco_dispatch_args_t *a) {
  if (handle == NULL)
    return disco_error(DISCO_ERR_NULL_POINTER, "%s: handle is NULL on rank %d", fn,
                       comm->rank);
  if (handle->comm != comm)
    return disco_error(DISCO_ERR_INVALID_USAGE,
                       "%s: handle belongs to another communicator on rank %d", fn,
                       comm->rank);
  if (layout_only && num_rows == NULL)
    return disco_error(DISCO_ERR_NULL_POINTER, "%s: num_recv_rows is NULL on rank %d", fn,
                       comm->rank);
  disco_result_t rc = disco_validate_dispatch_args(fn, comm, args, layout_only, a);
  if (rc != DISCO_SUCCESS) return rc;
  if (!layout_only && (a->flags & DISCO_DISPATCH_REUSE_LAYOUT) && !handle->valid)
    return disco_error(DISCO_ERR_INVALID_USAGE,
                       "%s: DISCO_DISPATCH_REUSE_LAYOUT but the handle holds no plan "
                       "(call disco_dispatch_layout first) on rank %d",
                       fn, comm->rank);
  /* The plan fixes which tokens move: another T would read x and write out
   * past what the caller gave. */
  if (!layout_only && (a->flags & DISCO_DISPATCH_REUSE_LAYOUT) &&
      a->num_tokens != handle->num_tokens)
    return disco_error(DISCO_ERR_INVALID_USAGE,
                       "%s: DISCO_DISPATCH_REUSE_LAYOUT with num_tokens = %lld but the "
                       "plan was made for %lld on rank %d",
                       fn, (long long)a->num_tokens, (long long)handle->num_tokens,
                       comm->rank);
  return DISCO_SUCCESS;
}

/* args->flags/stream when the caller's struct is readable that far. */
static int args_reach(const disco_dispatch_args_t *args, size_t end) {
  return args != NULL && args->magic == DISCO_DISPATCH_ARGS_MAGIC && args->size >= end;
}

static int dispatch_reuses(const disco_dispatch_args_t *args) {
  return args_reach(args, offsetof(disco_dispatch_args_t, flags) + sizeof(uint32_t)) &&
         (args->flags & DISCO_DISPATCH_REUSE_LAYOUT);
}

/* A device backend's peers are already in (or about to enter) the count
 * exchange: let the backend carry `code` through it so they return
 * DISCO_ERR_REMOTE, and keep this rank's own message. A REUSE_LAYOUT call
 * has no count exchange, so there is nothing to join. */
static void device_abort(disco_comm_t *comm, disco_handle_t *handle,
                         const disco_dispatch_args_t *args, disco_result_t code) {
  char msg[512];
  void *stream =
      args_reach(args, offsetof(disco_dispatch_args_t, stream) + sizeof(void *))
          ? args->stream
          : NULL;
  snprintf(msg, sizeof(msg), "%s", disco_last_error());
  comm->ops->dispatch_abort(comm, handle, stream, code);
  disco_error(code, "%s", msg);
}

static disco_result_t dispatch_common(const char *fn, disco_comm_t *comm,
                                      disco_handle_t *handle,
                                      const disco_dispatch_args_t *args, int layout_only,
                                      int64_t *num_rows) {
  disco_dispatch_args_t a;
  disco_result_t rc;
  disco_error_clear();
  if (comm == NULL) return disco_error(DISCO_ERR_NULL_POINTER, "%s: comm is NULL", fn);
  rc = check_dispatch(fn, comm, handle, args, layout_only, num_rows, &a);
  /* Whatever happens next, the handle's old plan is gone. */
  int own = handle != NULL && handle->comm == comm;
  if (own) {
    handle->valid = 0;
    handle->data_moved = 0;
  }
  if (comm->ops->dispatch != NULL) {
    if (rc != DISCO_SUCCESS) {
      /* A REUSE_LAYOUT call exchanges nothing on the nccl backend; on
       * nccl_device (ops->full_rounds) it is a full round the peers wait for. */
      if (own && comm->ops->dispatch_abort != NULL &&
          (!dispatch_reuses(args) || comm->ops->full_rounds))
        device_abort(comm, handle, args, rc);
      return rc;
    }
    int64_t rows = 0;
    rc = comm->ops->dispatch(comm, handle, &a, layout_only, &rows);
    if (rc == DISCO_SUCCESS) {
      handle->layout = a.layout;
      handle->num_tokens = a.num_tokens;
      handle->num_rows = rows;
      handle->data_moved = !layout_only;
      handle->valid = 1;
      if (layout_only) *num_rows = rows;
    } else {
      handle->valid = 0;
      handle->data_moved = 0;
    }
    return rc;
  }
  if (comm->host_ws == NULL || comm->ops->alltoall == NULL ||
      comm->ops->alltoallv == NULL)
    return disco_error(DISCO_ERR_INTERNAL, "%s: backend '%s' has no transport on rank %d",
                       fn, disco_comm_backend(comm), comm->rank);
  /* Host path: a rank with bad input still takes part in the header exchange
   * so every peer returns REMOTE instead of waiting. */
  rc =
      disco_host_dispatch(comm, rc == DISCO_SUCCESS ? handle : NULL,
                          rc == DISCO_SUCCESS ? &a : NULL, layout_only, rc, fn, num_rows);
  if (rc != DISCO_SUCCESS && own) {
    handle->valid = 0;
    handle->data_moved = 0;
  }
  return rc;
}

disco_result_t disco_dispatch_layout(disco_comm_t *comm, disco_handle_t *handle,
                                     const disco_dispatch_args_t *args,
                                     int64_t *num_recv_rows) {
  return dispatch_common("disco_dispatch_layout", comm, handle, args, 1, num_recv_rows);
}

disco_result_t disco_dispatch(disco_comm_t *comm, disco_handle_t *handle,
                              const disco_dispatch_args_t *args) {
  return dispatch_common("disco_dispatch", comm, handle, args, 0, NULL);
}

disco_result_t disco_combine(disco_comm_t *comm, disco_handle_t *handle,
                             const disco_combine_args_t *args) {
  static const char fn[] = "disco_combine";
  disco_combine_args_t a;
  disco_result_t rc;
  disco_error_clear();
  if (comm == NULL) return disco_error(DISCO_ERR_NULL_POINTER, "%s: comm is NULL", fn);
  rc = disco_validate_combine_args(fn, comm, args, &a);
  if (rc == DISCO_SUCCESS) rc = disco_validate_combine_handle(fn, comm, handle, &a);
  if (comm->ops->combine != NULL) {
    if (rc != DISCO_SUCCESS) {
      /* Peers of a no-host-sync backend would wait for this rank's partials
       * until their timeout: tell them (only where our handle can). */
      if (comm->ops->combine_abort != NULL && handle != NULL && handle->comm == comm &&
          handle->valid && handle->data_moved) {
        char msg[512];
        snprintf(msg, sizeof(msg), "%s", disco_last_error());
        const int has_stream =
            args != NULL && args->magic == DISCO_COMBINE_ARGS_MAGIC &&
            args->size >= offsetof(disco_combine_args_t, stream) + sizeof(void *);
        comm->ops->combine_abort(comm, handle, has_stream ? args->stream : NULL, rc);
        disco_error(rc, "%s", msg);
      }
      return rc;
    }
    return comm->ops->combine(comm, handle, &a);
  }
  if (comm->host_ws == NULL || comm->ops->alltoall == NULL ||
      comm->ops->alltoallv == NULL)
    return disco_error(DISCO_ERR_INTERNAL, "%s: backend '%s' has no transport on rank %d",
                       fn, disco_comm_backend(comm), comm->rank);
  return disco_host_combine(comm, handle, rc == DISCO_SUCCESS ? &a : NULL, rc, fn);
}
