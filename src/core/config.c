/* Config and argument-struct normalisation: magic, size and version checks,
 * defaults for fields beyond the caller's `size`, field validation. */
#include "core/config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/dtype.h"
#include "core/error.h"

disco_result_t disco_struct_copy(const void *in, uint32_t magic, size_t required,
                                 void *out, size_t out_size, const char *fn,
                                 const char *arg, int rank) {
  const disco_struct_head_t *hdr = in;
  char where[32] = "";
  if (rank >= 0) snprintf(where, sizeof(where), " on rank %d", rank);
  if (in == NULL)
    return disco_error(DISCO_ERR_NULL_POINTER, "%s: %s is NULL%s", fn, arg, where);
  if (hdr->magic != magic)
    return disco_error(DISCO_ERR_BAD_STRUCT,
                       "%s: %s->magic = 0x%08x, expected 0x%08x (initialise it with "
                       "its DISCO_*_INIT macro)%s",
                       fn, arg, (unsigned)hdr->magic, (unsigned)magic, where);
  if (hdr->size < required)
    return disco_error(DISCO_ERR_BAD_STRUCT,
                       "%s: %s->size = %zu is smaller than the %zu bytes of its "
                       "required fields%s",
                       fn, arg, hdr->size, required, where);
  if (hdr->version == 0 || hdr->version > DISCO_STRUCT_VERSION)
    return disco_error(DISCO_ERR_BAD_STRUCT,
                       "%s: %s->version = %u, this library knows versions 1..%d%s", fn,
                       arg, (unsigned)hdr->version, DISCO_STRUCT_VERSION, where);
  /* `out` already holds the defaults; the caller's fields override them. */
  memcpy(out, in, hdr->size < out_size ? hdr->size : out_size);
  ((disco_struct_head_t *)out)->size = out_size;
  return DISCO_SUCCESS;
}

static int env_timeout_ms(void) {
  const char *s = getenv("DISCO_TIMEOUT_MS");
  if (s == NULL || *s == '\0') return DISCO_DEFAULT_TIMEOUT_MS;
  char *end = NULL;
  long v = strtol(s, &end, 10);
  /* An unparsable or non-positive value falls back to the default. */
  if (end == s || *end != '\0' || v <= 0 || v > 0x7fffffffL)
    return DISCO_DEFAULT_TIMEOUT_MS;
  return (int)v;
}

disco_result_t disco_config_normalize(const disco_config_t *in, int world_size,
                                      const char *fn, disco_config_t *out) {
  disco_config_t c = DISCO_CONFIG_INIT;
  disco_result_t rc = disco_struct_copy(
      in, DISCO_CONFIG_MAGIC, offsetof(disco_config_t, max_tokens) + sizeof(int64_t), &c,
      sizeof(c), fn, "config", -1);
  if (rc != DISCO_SUCCESS) return rc;
  if (world_size < 1)
    return disco_error(DISCO_ERR_INVALID_ARGUMENT, "%s: world_size = %d must be >= 1", fn,
                       world_size);
  if (c.num_experts <= 0)
    return disco_error(DISCO_ERR_INVALID_ARGUMENT,
                       "%s: config->num_experts = %d must be > 0", fn,
                       (int)c.num_experts);
  if (c.top_k < 1 || c.top_k > DISCO_MAX_TOP_K)
    return disco_error(DISCO_ERR_INVALID_ARGUMENT,
                       "%s: config->top_k = %d outside [1, %d]", fn, (int)c.top_k,
                       DISCO_MAX_TOP_K);
  if (c.hidden <= 0)
    return disco_error(DISCO_ERR_INVALID_ARGUMENT,
                       "%s: config->hidden = %lld must be > 0", fn, (long long)c.hidden);
  /* src_token is an int32 in the metadata, so max_tokens must fit one. */
  if (c.max_tokens < 0 || c.max_tokens > INT32_MAX)
    return disco_error(DISCO_ERR_INVALID_ARGUMENT,
                       "%s: config->max_tokens = %lld outside [0, %d]", fn,
                       (long long)c.max_tokens, INT32_MAX);
  if (c.dtype != DISCO_DTYPE_BF16 && c.dtype != DISCO_DTYPE_FP16 &&
      c.dtype != DISCO_DTYPE_FP32)
    return disco_error(DISCO_ERR_INVALID_ARGUMENT,
                       "%s: config->dtype = %d is not a disco_dtype_t", fn, (int)c.dtype);
  if (c.combine_wire != DISCO_COMBINE_WIRE_FP32 &&
      c.combine_wire != DISCO_COMBINE_WIRE_DTYPE)
    return disco_error(DISCO_ERR_INVALID_ARGUMENT,
                       "%s: config->combine_wire = %d is not a disco_combine_wire_t", fn,
                       (int)c.combine_wire);
  if (c.timeout_ms < 0)
    return disco_error(DISCO_ERR_INVALID_ARGUMENT,
                       "%s: config->timeout_ms = %d must be >= 0 (0 = default)", fn,
                       (int)c.timeout_ms);
  if (c.max_sms < 0)
    return disco_error(DISCO_ERR_INVALID_ARGUMENT,
                       "%s: config->max_sms = %d must be >= 0 (0 = auto)", fn,
                       (int)c.max_sms);
  if (c.num_experts % world_size != 0)
    return disco_error(DISCO_ERR_EXPERT_DIVISIBILITY,
                       "%s: config->num_experts = %d is not a multiple of world_size %d",
                       fn, (int)c.num_experts, world_size);
  size_t elem = disco_dtype_size(c.dtype);
  /* hidden * elem overflows only for absurd hidden; reject before multiplying. */
  if ((uint64_t)c.hidden > (uint64_t)INT64_MAX / 16)
    return disco_error(DISCO_ERR_INVALID_ARGUMENT, "%s: config->hidden = %lld too large",
                       fn, (long long)c.hidden);
  if (((uint64_t)c.hidden * elem) % 16 != 0)
    return disco_error(DISCO_ERR_HIDDEN_ALIGNMENT,
                       "%s: config->hidden = %lld times element size %zu is not a "
                       "multiple of 16 bytes",
                       fn, (long long)c.hidden, elem);
  if (c.timeout_ms == 0) c.timeout_ms = env_timeout_ms();
  *out = c;
  return DISCO_SUCCESS;
}
