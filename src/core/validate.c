/* Host-side argument validation (see validate.h and docs/semantics.md). */
#include "core/validate.h"

#include <stddef.h>

#include "core/config.h"
#include "core/error.h"

static int misaligned(const void *p, uintptr_t align) {
  return p != NULL && ((uintptr_t)p % align) != 0;
}

#define CHECK_ALIGN(ptr, name, align)                                                 \
  do {                                                                                \
    if (misaligned((ptr), (align)))                                                   \
      return disco_error(DISCO_ERR_MISALIGNED,                                        \
                         "%s: %s = %p is not %d-byte aligned on rank %d", fn, (name), \
                         (const void *)(ptr), (int)(align), rank);                    \
  } while (0)

disco_result_t disco_validate_dispatch_args(const char *fn, const disco_comm_t *comm,
                                            const disco_dispatch_args_t *args,
                                            int layout_only, disco_dispatch_args_t *out) {
  disco_dispatch_args_t a = DISCO_DISPATCH_ARGS_INIT;
  const int rank = comm->rank;
  disco_result_t rc =
      disco_struct_copy(args, DISCO_DISPATCH_ARGS_MAGIC,
                        offsetof(disco_dispatch_args_t, num_tokens) + sizeof(int64_t), &a,
                        sizeof(a), fn, "args", rank);
  if (rc != DISCO_SUCCESS) return rc;
  if (a.layout != DISCO_LAYOUT_EXPERT_MAJOR && a.layout != DISCO_LAYOUT_RANK_MAJOR)
    return disco_error(DISCO_ERR_INVALID_ARGUMENT,
                       "%s: args->layout = %d is not a disco_layout_t on rank %d", fn,
                       (int)a.layout, rank);
  if (a.index_type != DISCO_INDEX_INT64 && a.index_type != DISCO_INDEX_INT32)
    return disco_error(DISCO_ERR_INVALID_ARGUMENT,
                       "%s: args->index_type = %d is not a disco_index_type_t on rank %d",
                       fn, (int)a.index_type, rank);
  if (a.expert_alignment < 0)
    return disco_error(DISCO_ERR_INVALID_ARGUMENT,
                       "%s: args->expert_alignment = %d must be >= 0 on rank %d", fn,
                       (int)a.expert_alignment, rank);
  if ((a.flags & ~(uint32_t)DISCO_DISPATCH_REUSE_LAYOUT) != 0)
    return disco_error(DISCO_ERR_INVALID_ARGUMENT,
                       "%s: args->flags = 0x%x has unknown bits on rank %d", fn,
                       (unsigned)a.flags, rank);
  if (a.num_tokens < 0 || a.num_tokens > comm->config.max_tokens)
    return disco_error(DISCO_ERR_TOO_MANY_TOKENS,
                       "%s: args->num_tokens = %lld outside [0, %lld] (max_tokens) on "
                       "rank %d",
                       fn, (long long)a.num_tokens, (long long)comm->config.max_tokens,
                       rank);
  if (a.num_tokens > 0 && a.x == NULL)
    return disco_error(DISCO_ERR_NULL_POINTER,
                       "%s: args->x is NULL with num_tokens = %lld on rank %d", fn,
                       (long long)a.num_tokens, rank);
  if (a.num_tokens > 0 && a.topk_idx == NULL)
    return disco_error(DISCO_ERR_NULL_POINTER,
                       "%s: args->topk_idx is NULL with num_tokens = %lld on rank %d", fn,
                       (long long)a.num_tokens, rank);
  CHECK_ALIGN(a.x, "args->x", 16);
  CHECK_ALIGN(a.topk_idx, "args->topk_idx", a.index_type == DISCO_INDEX_INT64 ? 8 : 4);
  CHECK_ALIGN(a.topk_weights, "args->topk_weights", 4);
  if (!layout_only) {
    if (a.recv_capacity < 0)
      return disco_error(DISCO_ERR_INVALID_ARGUMENT,
                         "%s: args->recv_capacity = %lld must be >= 0 on rank %d", fn,
                         (long long)a.recv_capacity, rank);
    CHECK_ALIGN(a.recv_x, "args->recv_x", 16);
    CHECK_ALIGN(a.recv_src_rank, "args->recv_src_rank", 4);
    CHECK_ALIGN(a.recv_src_token, "args->recv_src_token", 4);
    CHECK_ALIGN(a.recv_expert, "args->recv_expert", 4);
    CHECK_ALIGN(a.recv_weight, "args->recv_weight", 4);
    CHECK_ALIGN(a.n_tokens_to_rank, "args->n_tokens_to_rank", 4);
    CHECK_ALIGN(a.n_tokens_from_rank, "args->n_tokens_from_rank", 4);
    CHECK_ALIGN(a.tokens_per_expert, "args->tokens_per_expert", 4);
    CHECK_ALIGN(a.num_recv_rows, "args->num_recv_rows", 8);
  }
  if (out != NULL) *out = a;
  return DISCO_SUCCESS;
}

disco_result_t disco_validate_dispatch_rows(const char *fn, const disco_comm_t *comm,
                                            const disco_dispatch_args_t *args,
                                            int64_t num_rows) {
  if (num_rows > args->recv_capacity)
    return disco_error(DISCO_ERR_CAPACITY,
                       "%s: rank %d receives %lld rows but args->recv_capacity = %lld",
                       fn, comm->rank, (long long)num_rows,
                       (long long)args->recv_capacity);
  if (num_rows > 0 && args->recv_x == NULL)
    return disco_error(DISCO_ERR_NULL_POINTER,
                       "%s: args->recv_x is NULL but rank %d receives %lld rows", fn,
                       comm->rank, (long long)num_rows);
  return DISCO_SUCCESS;
}

static inline int64_t load_id(const void *idx, disco_index_type_t type, int64_t i) {
  return type == DISCO_INDEX_INT64 ? ((const int64_t *)idx)[i]
                                   : (int64_t)((const int32_t *)idx)[i];
}

disco_result_t disco_validate_topk(const char *fn, const disco_comm_t *comm,
                                   const void *topk_idx, disco_index_type_t index_type,
                                   int64_t num_tokens, int32_t *scratch) {
  const int K = comm->config.top_k;
  const int64_t E = comm->config.num_experts;
  disco_result_t rc = DISCO_SUCCESS;
  for (int64_t t = 0; t < num_tokens && rc == DISCO_SUCCESS; t++) {
    const int64_t base = t * K;
    int j;
    for (j = 0; j < K; j++) {
      int64_t e = load_id(topk_idx, index_type, base + j);
      if (e < -1 || e >= E) {
        rc = disco_error(DISCO_ERR_EXPERT_OUT_OF_RANGE,
                         "%s: topk_idx[%lld][%d] = %lld outside [-1, %lld) on rank %d",
                         fn, (long long)t, j, (long long)e, (long long)E, comm->rank);
        break;
      }
      if (e < 0) continue;
      int prev = -1;
      if (scratch != NULL) {
        prev = scratch[e];
        if (prev < 0) scratch[e] = j;
      } else {
        for (int i = 0; i < j; i++)
          if (load_id(topk_idx, index_type, base + i) == e) {
            prev = i;
            break;
          }
      }
      if (prev >= 0) {
        rc = disco_error(DISCO_ERR_DUPLICATE_EXPERT,
                         "%s: topk_idx[%lld][%d] = %lld repeats topk_idx[%lld][%d] "
                         "(same expert twice) on rank %d",
                         fn, (long long)t, j, (long long)e, (long long)t, prev,
                         comm->rank);
        break;
      }
    }
    /* Put the scratch back to all -1, touching only what this row set. Slots
     * before j were checked, so their ids are in range. */
    if (scratch != NULL)
      for (int i = 0; i < j; i++) {
        int64_t e = load_id(topk_idx, index_type, base + i);
        if (e >= 0) scratch[e] = -1;
      }
  }
  return rc;
}

disco_result_t disco_validate_combine_args(const char *fn, const disco_comm_t *comm,
                                           const disco_combine_args_t *args,
                                           disco_combine_args_t *out) {
  disco_combine_args_t a = DISCO_COMBINE_ARGS_INIT;
  const int rank = comm->rank;
  disco_result_t rc =
      disco_struct_copy(args, DISCO_COMBINE_ARGS_MAGIC,
                        offsetof(disco_combine_args_t, out) + sizeof(void *), &a,
                        sizeof(a), fn, "args", rank);
  if (rc != DISCO_SUCCESS) return rc;
  if (a.y_rows < -1)
    return disco_error(DISCO_ERR_INVALID_ARGUMENT,
                       "%s: args->y_rows = %lld must be >= -1 on rank %d", fn,
                       (long long)a.y_rows, rank);
  CHECK_ALIGN(a.y, "args->y", 16);
  CHECK_ALIGN(a.out, "args->out", 16);
  if (out != NULL) *out = a;
  return DISCO_SUCCESS;
}

disco_result_t disco_validate_combine_handle(const char *fn, const disco_comm_t *comm,
                                             const disco_handle_t *handle,
                                             const disco_combine_args_t *args) {
  const int rank = comm->rank;
  if (handle == NULL)
    return disco_error(DISCO_ERR_NULL_POINTER, "%s: handle is NULL on rank %d", fn, rank);
  if (handle->comm != comm)
    return disco_error(DISCO_ERR_INVALID_USAGE,
                       "%s: handle belongs to another communicator on rank %d", fn, rank);
  if (!handle->valid || !handle->data_moved)
    return disco_error(DISCO_ERR_INVALID_USAGE,
                       "%s: handle holds no successful disco_dispatch that moved data on "
                       "rank %d",
                       fn, rank);
  if (handle->num_rows > 0 && args->y == NULL)
    return disco_error(
        DISCO_ERR_NULL_POINTER,
        "%s: args->y is NULL but the dispatch received %lld rows on rank %d", fn,
        (long long)handle->num_rows, rank);
  /* num_rows < 0: the count lives on the device, which checks y_rows itself. */
  if (args->y_rows >= 0 && args->y_rows < handle->num_rows)
    return disco_error(DISCO_ERR_CAPACITY,
                       "%s: args->y_rows = %lld but the dispatch received %lld rows on "
                       "rank %d",
                       fn, (long long)args->y_rows, (long long)handle->num_rows, rank);
  if (handle->num_tokens > 0 && args->out == NULL)
    return disco_error(DISCO_ERR_NULL_POINTER,
                       "%s: args->out is NULL with num_tokens = %lld on rank %d", fn,
                       (long long)handle->num_tokens, rank);
  return DISCO_SUCCESS;
}
