/* Whole-world host reference (see ref.h). Written straight from
 * docs/semantics.md with plain loops; shares nothing with src/core except the
 * rounding helpers of dtype.h, which are the definition of a cast. */
#include "ref/ref.h"

#include <stdlib.h>
#include <string.h>

#include "core/dtype.h"

typedef struct ref_dims {
  int world;
  int e_loc;
  int k;
  int64_t hidden;
  size_t elem;
  size_t row_bytes;
} ref_dims_t;

static ref_dims_t ref_dims(const disco_config_t *cfg, int world) {
  ref_dims_t d;
  d.world = world;
  d.e_loc = cfg->num_experts / world;
  d.k = cfg->top_k;
  d.hidden = cfg->hidden;
  d.elem = disco_dtype_size(cfg->dtype);
  d.row_bytes = (size_t)cfg->hidden * d.elem;
  return d;
}

static int64_t ref_idx(const disco_ref_input_t *in, int k, int64_t t, int j) {
  return in->topk_idx[t * k + j];
}

/* 1 if token t of `in` has an expert on rank `dst`. */
static int ref_goes_to(const disco_ref_input_t *in, const ref_dims_t *d, int64_t t,
                       int dst) {
  for (int j = 0; j < d->k; j++) {
    int64_t e = ref_idx(in, d->k, t, j);
    if (e >= 0 && e / d->e_loc == dst) return 1;
  }
  return 0;
}

/* Slot of token t holding global expert e, or -1. */
static int ref_slot_of(const disco_ref_input_t *in, const ref_dims_t *d, int64_t t,
                       int64_t e) {
  for (int j = 0; j < d->k; j++)
    if (ref_idx(in, d->k, t, j) == e) return j;
  return -1;
}

static float ref_weight(const disco_ref_input_t *in, const ref_dims_t *d, int64_t t,
                        int j) {
  return in->topk_weights ? in->topk_weights[t * d->k + j] : 1.0f;
}

static void *ref_alloc(size_t n, size_t size) {
  return calloc(n ? n : 1, size);
}

void disco_ref_output_free(disco_ref_output_t *out) {
  if (!out) return;
  free(out->recv_x);
  free(out->src_rank);
  free(out->src_token);
  free(out->expert);
  free(out->weight);
  free(out->n_tokens_to_rank);
  free(out->n_tokens_from_rank);
  free(out->tokens_per_expert);
  memset(out, 0, sizeof(*out));
}

static int64_t ref_pad(int64_t n, int align) {
  if (align <= 1) return n;
  return (n + align - 1) / align * align;
}

/* Rows per local expert on rank `dst` before padding. */
static void ref_expert_counts(const ref_dims_t *d, const disco_ref_input_t *inputs,
                              int dst, int64_t *count) {
  for (int l = 0; l < d->e_loc; l++) count[l] = 0;
  for (int s = 0; s < d->world; s++)
    for (int64_t t = 0; t < inputs[s].num_tokens; t++)
      for (int j = 0; j < d->k; j++) {
        int64_t e = ref_idx(&inputs[s], d->k, t, j);
        if (e >= 0 && e / d->e_loc == dst) count[e - (int64_t)dst * d->e_loc]++;
      }
}

int disco_ref_dispatch(const disco_config_t *cfg, int world, int rank,
                       const disco_ref_input_t *inputs, disco_layout_t layout,
                       int expert_alignment, disco_ref_output_t *out) {
  ref_dims_t d = ref_dims(cfg, world);
  const disco_ref_input_t *mine = &inputs[rank];
  int64_t *count = NULL;
  int64_t rows = 0, pos = 0;
  int per_row = layout == DISCO_LAYOUT_RANK_MAJOR ? d.k : 1;
  int rc = -1;

  memset(out, 0, sizeof(*out));
  out->n_tokens_to_rank = ref_alloc((size_t)world, sizeof(int32_t));
  out->n_tokens_from_rank = ref_alloc((size_t)world, sizeof(int32_t));
  out->tokens_per_expert = ref_alloc((size_t)d.e_loc, sizeof(int32_t));
  count = ref_alloc((size_t)d.e_loc, sizeof(int64_t));
  if (!out->n_tokens_to_rank || !out->n_tokens_from_rank || !out->tokens_per_expert ||
      !count)
    goto cleanup;

  for (int p = 0; p < world; p++) {
    for (int64_t t = 0; t < mine->num_tokens; t++)
      out->n_tokens_to_rank[p] += ref_goes_to(mine, &d, t, p);
    for (int64_t t = 0; t < inputs[p].num_tokens; t++)
      out->n_tokens_from_rank[p] += ref_goes_to(&inputs[p], &d, t, rank);
  }

  if (layout == DISCO_LAYOUT_EXPERT_MAJOR) {
    ref_expert_counts(&d, inputs, rank, count);
    for (int l = 0; l < d.e_loc; l++) rows += ref_pad(count[l], expert_alignment);
  } else {
    for (int p = 0; p < world; p++) rows += out->n_tokens_from_rank[p];
  }

  out->num_rows = rows;
  out->recv_x = ref_alloc((size_t)rows, d.row_bytes);
  out->src_rank = ref_alloc((size_t)rows, sizeof(int32_t));
  out->src_token = ref_alloc((size_t)rows, sizeof(int32_t));
  out->expert = ref_alloc((size_t)rows * per_row, sizeof(int32_t));
  out->weight = ref_alloc((size_t)rows * per_row, sizeof(float));
  if (!out->recv_x || !out->src_rank || !out->src_token || !out->expert || !out->weight)
    goto cleanup;

  if (layout == DISCO_LAYOUT_EXPERT_MAJOR) {
    for (int l = 0; l < d.e_loc; l++) {
      int64_t e = (int64_t)rank * d.e_loc + l;
      int64_t group_end = pos + ref_pad(count[l], expert_alignment);
      for (int s = 0; s < world; s++)
        for (int64_t t = 0; t < inputs[s].num_tokens; t++) {
          int j = ref_slot_of(&inputs[s], &d, t, e);
          if (j < 0) continue;
          memcpy((char *)out->recv_x + pos * d.row_bytes,
                 (const char *)inputs[s].x + t * d.row_bytes, d.row_bytes);
          out->src_rank[pos] = s;
          out->src_token[pos] = (int32_t)t;
          out->expert[pos] = (int32_t)e;
          out->weight[pos] = ref_weight(&inputs[s], &d, t, j);
          pos++;
        }
      for (; pos < group_end; pos++) { /* padding: zero data, -1 metadata */
        out->src_rank[pos] = -1;
        out->src_token[pos] = -1;
        out->expert[pos] = -1;
        out->weight[pos] = 0.0f;
      }
      out->tokens_per_expert[l] = (int32_t)ref_pad(count[l], expert_alignment);
    }
  } else {
    for (int s = 0; s < world; s++)
      for (int64_t t = 0; t < inputs[s].num_tokens; t++) {
        if (!ref_goes_to(&inputs[s], &d, t, rank)) continue;
        memcpy((char *)out->recv_x + pos * d.row_bytes,
               (const char *)inputs[s].x + t * d.row_bytes, d.row_bytes);
        out->src_rank[pos] = s;
        out->src_token[pos] = (int32_t)t;
        for (int j = 0; j < d.k; j++) {
          int64_t e = ref_idx(&inputs[s], d.k, t, j);
          int local = e >= 0 && e / d.e_loc == rank;
          out->expert[pos * d.k + j] =
              local ? (int32_t)(e - (int64_t)rank * d.e_loc) : -1;
          out->weight[pos * d.k + j] = local ? ref_weight(&inputs[s], &d, t, j) : 0.0f;
          if (local) out->tokens_per_expert[e - (int64_t)rank * d.e_loc]++;
        }
        pos++;
      }
  }
  rc = 0;

cleanup:
  free(count);
  if (rc != 0) disco_ref_output_free(out);
  return rc;
}

/* rows[t * K + j]: row in rank dst's output that holds slot j of token t of
 * rank src (RANK_MAJOR: the token's row, the same for every slot on dst);
 * -1 where slot j's expert is not on dst. One pass over the inputs. */
static void ref_row_map(const ref_dims_t *d, const disco_ref_input_t *inputs, int dst,
                        disco_layout_t layout, int align, const int64_t *count, int src,
                        int64_t *rows) {
  const disco_ref_input_t *in = &inputs[src];
  int64_t base = 0;
  if (layout == DISCO_LAYOUT_RANK_MAJOR) {
    for (int s = 0; s < src; s++)
      for (int64_t t = 0; t < inputs[s].num_tokens; t++)
        base += ref_goes_to(&inputs[s], d, t, dst);
    for (int64_t t = 0; t < in->num_tokens; t++) {
      int goes = ref_goes_to(in, d, t, dst);
      for (int j = 0; j < d->k; j++) {
        int64_t e = ref_idx(in, d->k, t, j);
        rows[t * d->k + j] = (goes && e >= 0 && e / d->e_loc == dst) ? base : -1;
      }
      base += goes;
    }
    return;
  }
  for (int l = 0; l < d->e_loc; l++) {
    int64_t e = (int64_t)dst * d->e_loc + l;
    int64_t row = base;
    for (int s = 0; s < src; s++) /* rows of sources before src */
      for (int64_t t = 0; t < inputs[s].num_tokens; t++)
        row += ref_slot_of(&inputs[s], d, t, e) >= 0;
    for (int64_t t = 0; t < in->num_tokens; t++)
      for (int j = 0; j < d->k; j++)
        if (ref_idx(in, d->k, t, j) == e) rows[t * d->k + j] = row++;
    base += ref_pad(count[l], align);
  }
}

int disco_ref_combine(const disco_config_t *cfg, int world, int rank,
                      const disco_ref_input_t *inputs, disco_layout_t layout,
                      int expert_alignment, const void *const *ys, int weighted,
                      void *out) {
  disco_layout_t *layouts = ref_alloc((size_t)world, sizeof(disco_layout_t));
  if (layouts == NULL) return -1;
  for (int p = 0; p < world; p++) layouts[p] = layout;
  const int rc = disco_ref_combine_layouts(cfg, world, rank, inputs, layouts,
                                           expert_alignment, ys, weighted, out);
  free(layouts);
  return rc;
}

int disco_ref_combine_layouts(const disco_config_t *cfg, int world, int rank,
                              const disco_ref_input_t *inputs,
                              const disco_layout_t *layouts, int expert_alignment,
                              const void *const *ys, int weighted, void *out) {
  ref_dims_t d = ref_dims(cfg, world);
  const disco_ref_input_t *mine = &inputs[rank];
  int64_t *counts = ref_alloc((size_t)world * d.e_loc, sizeof(int64_t));
  size_t map_len = (size_t)mine->num_tokens * d.k;
  int64_t *rows = ref_alloc((size_t)world * map_len, sizeof(int64_t));
  float *acc = ref_alloc((size_t)d.hidden, sizeof(float));
  float *part = ref_alloc((size_t)d.hidden, sizeof(float));
  int rc = -1;

  if (!counts || !rows || !acc || !part) goto cleanup;
  for (size_t i = 0; i < (size_t)world * map_len; i++) rows[i] = -1;
  for (int p = 0; p < world; p++) {
    ref_expert_counts(&d, inputs, p, counts + (size_t)p * d.e_loc);
    ref_row_map(&d, inputs, p, layouts[p], expert_alignment, counts + (size_t)p * d.e_loc,
                rank, rows + (size_t)p * map_len);
  }

  for (int64_t t = 0; t < mine->num_tokens; t++) {
    int have = 0;
    for (int p = 0; p < world; p++) {
      if (!ref_goes_to(mine, &d, t, p)) continue;
      const int64_t *map = rows + (size_t)p * map_len + t * d.k;
      /* The expert side (rank p) applies the weights of EXPERT_MAJOR rows. */
      const int use_w =
          weighted && mine->topk_weights && layouts[p] == DISCO_LAYOUT_EXPERT_MAJOR;
      if (layouts[p] == DISCO_LAYOUT_RANK_MAJOR) {
        int64_t row = -1;
        for (int j = 0; j < d.k && row < 0; j++) row = map[j];
        for (int64_t h = 0; h < d.hidden; h++)
          part[h] = disco_load_f32(ys[p], row * d.hidden + h, cfg->dtype);
      } else {
        int first = 1;
        for (int l = 0; l < d.e_loc; l++) { /* ascending local expert id */
          int j = ref_slot_of(mine, &d, t, (int64_t)p * d.e_loc + l);
          if (j < 0) continue;
          int64_t row = map[j];
          float w = mine->topk_weights ? mine->topk_weights[t * d.k + j] : 1.0f;
          for (int64_t h = 0; h < d.hidden; h++) {
            float v = disco_load_f32(ys[p], row * d.hidden + h, cfg->dtype);
            if (use_w) v = w * v;
            part[h] = first ? v : part[h] + v;
          }
          first = 0;
        }
        if (cfg->combine_wire == DISCO_COMBINE_WIRE_DTYPE &&
            cfg->dtype != DISCO_DTYPE_FP32) {
          for (int64_t h = 0; h < d.hidden; h++) {
            uint16_t bits = cfg->dtype == DISCO_DTYPE_BF16 ? disco_f32_to_bf16(part[h])
                                                           : disco_f32_to_f16(part[h]);
            part[h] = cfg->dtype == DISCO_DTYPE_BF16 ? disco_bf16_to_f32(bits)
                                                     : disco_f16_to_f32(bits);
          }
        }
      }
      for (int64_t h = 0; h < d.hidden; h++) acc[h] = have ? acc[h] + part[h] : part[h];
      have = 1;
    }
    if (have) {
      for (int64_t h = 0; h < d.hidden; h++)
        disco_store_f32(out, t * d.hidden + h, acc[h], cfg->dtype);
    } else {
      memset((char *)out + t * d.row_bytes, 0, d.row_bytes);
    }
  }
  rc = 0;

cleanup:
  free(counts);
  free(rows);
  free(acc);
  free(part);
  return rc;
}
