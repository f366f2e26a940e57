/* Communicator and handle lifetime, getters. */
#include "core/comm.h"

#include <stdlib.h>
#include <string.h>

#include "core/config.h"
#include "core/dtype.h"
#include "core/error.h"
#include "core/host_path.h"

disco_result_t disco_comm_alloc(const disco_config_t *config, int rank, int world_size,
                                const char *who, disco_comm_t **out) {
  disco_config_t c;
  disco_result_t rc;
  if (out == NULL)
    return disco_error(DISCO_ERR_NULL_POINTER, "%s: comm output is NULL", who);
  *out = NULL;
  rc = disco_config_normalize(config, world_size, who, &c);
  if (rc != DISCO_SUCCESS) return rc;
  if (rank < 0 || rank >= world_size)
    return disco_error(DISCO_ERR_INVALID_ARGUMENT, "%s: rank %d outside [0, %d)", who,
                       rank, world_size);
  disco_comm_t *comm = calloc(1, sizeof(*comm));
  if (comm == NULL)
    return disco_error(DISCO_ERR_OUT_OF_MEMORY, "%s: out of memory for the comm", who);
  comm->config = c;
  comm->rank = rank;
  comm->world_size = world_size;
  comm->num_local_experts = c.num_experts / world_size;
  comm->elem_size = disco_dtype_size(c.dtype);
  comm->row_bytes = (size_t)c.hidden * comm->elem_size;
  comm->timeout_ms = c.timeout_ms;
  *out = comm;
  return DISCO_SUCCESS;
}

void disco_comm_free(disco_comm_t *comm) {
  if (comm == NULL) return;
  disco_host_path_fini(comm);
  free(comm);
}

void disco_comm_destroy(disco_comm_t *comm) {
  if (comm == NULL) return;
  if (comm->ops != NULL && comm->ops->destroy != NULL) comm->ops->destroy(comm);
  disco_comm_free(comm);
}

int disco_comm_rank(const disco_comm_t *comm) {
  return comm == NULL ? -1 : comm->rank;
}

int disco_comm_size(const disco_comm_t *comm) {
  return comm == NULL ? -1 : comm->world_size;
}

int disco_comm_num_local_experts(const disco_comm_t *comm) {
  return comm == NULL ? -1 : comm->num_local_experts;
}

const char *disco_comm_backend(const disco_comm_t *comm) {
  if (comm == NULL || comm->ops == NULL || comm->ops->name == NULL) return "";
  return comm->ops->name;
}

disco_result_t disco_comm_get_config(const disco_comm_t *comm, disco_config_t *config) {
  disco_error_clear();
  if (comm == NULL)
    return disco_error(DISCO_ERR_NULL_POINTER, "disco_comm_get_config: comm is NULL");
  if (config == NULL)
    return disco_error(DISCO_ERR_NULL_POINTER,
                       "disco_comm_get_config: config is NULL on rank %d", comm->rank);
  /* An older caller's struct may be shorter than ours: honour its size. */
  if (config->magic == DISCO_CONFIG_MAGIC && config->size > 0 &&
      config->size < sizeof(*config)) {
    size_t n = config->size;
    memcpy(config, &comm->config, n);
    config->size = n;
  } else {
    *config = comm->config;
  }
  return DISCO_SUCCESS;
}

int disco_comm_uses_device_memory(const disco_comm_t *comm) {
  return comm != NULL && comm->ops != NULL && comm->ops->device_memory ? 1 : 0;
}

uint32_t disco_comm_caps(const disco_comm_t *comm) {
  return comm != NULL && comm->ops != NULL ? comm->ops->caps : 0u;
}

disco_result_t disco_comm_max_recv_rows(const disco_comm_t *comm, disco_layout_t layout,
                                        int32_t expert_alignment, int64_t *rows) {
  static const char fn[] = "disco_comm_max_recv_rows";
  disco_error_clear();
  if (comm == NULL) return disco_error(DISCO_ERR_NULL_POINTER, "%s: comm is NULL", fn);
  if (rows == NULL)
    return disco_error(DISCO_ERR_NULL_POINTER, "%s: rows is NULL on rank %d", fn,
                       comm->rank);
  if (layout != DISCO_LAYOUT_EXPERT_MAJOR && layout != DISCO_LAYOUT_RANK_MAJOR)
    return disco_error(DISCO_ERR_INVALID_ARGUMENT, "%s: layout = %d on rank %d", fn,
                       (int)layout, comm->rank);
  if (expert_alignment < 0)
    return disco_error(DISCO_ERR_INVALID_ARGUMENT,
                       "%s: expert_alignment = %d < 0 on rank %d", fn,
                       (int)expert_alignment, comm->rank);
  const int64_t W = comm->world_size, M = comm->config.max_tokens,
                L = comm->num_local_experts, K = comm->config.top_k;
  if (layout == DISCO_LAYOUT_RANK_MAJOR) {
    *rows = W * M;
  } else {
    const int64_t a = expert_alignment > 1 ? expert_alignment : 1;
    *rows = W * M * (K < L ? K : L) + L * (a - 1);
  }
  return DISCO_SUCCESS;
}

disco_result_t disco_comm_check(disco_comm_t *comm, int32_t wait) {
  disco_error_clear();
  if (comm == NULL)
    return disco_error(DISCO_ERR_NULL_POINTER, "disco_comm_check: comm is NULL");
  if (comm->ops == NULL || comm->ops->check == NULL) return DISCO_SUCCESS;
  return comm->ops->check(comm, wait);
}

disco_result_t disco_handle_create(disco_comm_t *comm, disco_handle_t **handle) {
  disco_result_t rc = DISCO_SUCCESS;
  disco_handle_t *h = NULL;
  disco_error_clear();
  if (handle == NULL)
    return disco_error(DISCO_ERR_NULL_POINTER, "disco_handle_create: handle is NULL");
  *handle = NULL;
  if (comm == NULL)
    return disco_error(DISCO_ERR_NULL_POINTER, "disco_handle_create: comm is NULL");
  h = calloc(1, sizeof(*h));
  if (h == NULL) {
    rc = disco_error(DISCO_ERR_OUT_OF_MEMORY,
                     "disco_handle_create: out of memory on rank %d", comm->rank);
    goto fail;
  }
  h->comm = comm;
  if (comm->host_ws != NULL) {
    rc = disco_host_plan_create(comm, h);
    if (rc != DISCO_SUCCESS) goto fail;
  }
  if (comm->ops != NULL && comm->ops->handle_init != NULL) {
    rc = comm->ops->handle_init(comm, h);
    if (rc != DISCO_SUCCESS) goto fail;
  }
  *handle = h;
  return DISCO_SUCCESS;
fail:
  if (h != NULL) disco_host_plan_destroy(h);
  free(h);
  return rc;
}

void disco_handle_destroy(disco_handle_t *handle) {
  if (handle == NULL) return;
  disco_comm_t *comm = handle->comm;
  if (comm != NULL && comm->ops != NULL && comm->ops->handle_fini != NULL)
    comm->ops->handle_fini(comm, handle);
  disco_host_plan_destroy(handle);
  free(handle);
}

disco_result_t disco_handle_num_recv_rows(const disco_handle_t *handle,
                                          int64_t *num_rows) {
  disco_error_clear();
  if (handle == NULL || num_rows == NULL)
    return disco_error(DISCO_ERR_NULL_POINTER, "disco_handle_num_recv_rows: %s is NULL",
                       handle == NULL ? "handle" : "num_rows");
  if (!handle->valid)
    return disco_error(DISCO_ERR_INVALID_USAGE,
                       "disco_handle_num_recv_rows: handle holds no successful dispatch "
                       "on rank %d",
                       handle->comm != NULL ? handle->comm->rank : -1);
  if (handle->num_rows < 0)
    return disco_error(DISCO_ERR_INVALID_USAGE,
                       "disco_handle_num_recv_rows: backend '%s' keeps the row count in "
                       "device memory only (args->num_recv_rows of the dispatch) on rank "
                       "%d",
                       disco_comm_backend(handle->comm), handle->comm->rank);
  *num_rows = handle->num_rows;
  return DISCO_SUCCESS;
}
