/* Internal: validation and normalisation of the public structs. */
#ifndef DISCO_CORE_CONFIG_H_
#define DISCO_CORE_CONFIG_H_

#include <stddef.h>
#include <stdint.h>

#include "disco.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The common head of every public struct (config and argument structs). */
typedef struct disco_struct_head {
  size_t size;
  uint32_t magic;
  uint32_t version;
} disco_struct_head_t;

/* Checks magic, size >= required and version, then copies the caller's first
 * min(size, out_size) bytes over `out` (which holds the defaults) and sets
 * out->size = out_size. rank < 0 in messages means "not known yet". Errors:
 * NULL_POINTER, BAD_STRUCT. */
disco_result_t disco_struct_copy(const void *in, uint32_t magic, size_t required,
                                 void *out, size_t out_size, const char *fn,
                                 const char *arg, int rank);

/* Validates a config for `world_size` ranks and returns it with defaults
 * filled in (timeout_ms 0 -> env DISCO_TIMEOUT_MS or DISCO_DEFAULT_TIMEOUT_MS).
 * Errors: NULL_POINTER, BAD_STRUCT, INVALID_ARGUMENT, EXPERT_DIVISIBILITY,
 * HIDDEN_ALIGNMENT. */
disco_result_t disco_config_normalize(const disco_config_t *in, int world_size,
                                      const char *fn, disco_config_t *out);

#ifdef __cplusplus
}
#endif

#endif /* DISCO_CORE_CONFIG_H_ */
