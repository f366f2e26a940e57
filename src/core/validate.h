/* Internal: host-side argument validation of dispatch and combine, exactly as
 * the table of docs/semantics.md. Messages name the function, the argument,
 * the rank and (for ids) the row and slot.
 *
 * (a) struct / pointer / size checks read no buffer contents, so device
 *     backends use them too; (b) disco_validate_topk reads host topk_idx. */
#ifndef DISCO_CORE_VALIDATE_H_
#define DISCO_CORE_VALIDATE_H_

#include <stdint.h>

#include "core/comm.h"

#ifdef __cplusplus
extern "C" {
#endif

/* (a) Struct head, enums, flags, num_tokens, input pointers/alignment and
 * (unless layout_only) output pointer alignment. On success *out is the
 * caller's struct with defaults for fields beyond its size. Errors:
 * NULL_POINTER, BAD_STRUCT, INVALID_ARGUMENT, TOO_MANY_TOKENS, MISALIGNED. */
disco_result_t disco_validate_dispatch_args(const char *fn, const disco_comm_t *comm,
                                            const disco_dispatch_args_t *args,
                                            int layout_only, disco_dispatch_args_t *out);

/* (a) Checks that depend on the number of rows this rank receives:
 * rows > recv_capacity -> CAPACITY; recv_x NULL while rows > 0 -> NULL_POINTER. */
disco_result_t disco_validate_dispatch_rows(const char *fn, const disco_comm_t *comm,
                                            const disco_dispatch_args_t *args,
                                            int64_t num_rows);

/* (b) Every id in [-1, E) and no expert twice in a row. `scratch` is E int32
 * all -1 (left all -1 on return) for an O(K) duplicate check per row; NULL
 * falls back to pairwise comparison. Errors: EXPERT_OUT_OF_RANGE,
 * DUPLICATE_EXPERT. */
disco_result_t disco_validate_topk(const char *fn, const disco_comm_t *comm,
                                   const void *topk_idx, disco_index_type_t index_type,
                                   int64_t num_tokens, int32_t *scratch);

/* (a) Combine struct head and pointer alignment. Errors: NULL_POINTER,
 * BAD_STRUCT, MISALIGNED. */
disco_result_t disco_validate_combine_args(const char *fn, const disco_comm_t *comm,
                                           const disco_combine_args_t *args,
                                           disco_combine_args_t *out);

/* (a) Combine against the handle: INVALID_USAGE (no successful dispatch that
 * moved data, or a handle of another comm), NULL_POINTER (y while rows > 0,
 * out while T > 0), CAPACITY (0 <= y_rows < rows). */
disco_result_t disco_validate_combine_handle(const char *fn, const disco_comm_t *comm,
                                             const disco_handle_t *handle,
                                             const disco_combine_args_t *args);

#ifdef __cplusplus
}
#endif

#endif /* DISCO_CORE_VALIDATE_H_ */
