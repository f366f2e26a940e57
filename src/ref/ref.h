/* Whole-world host reference for dispatch and combine.
 *
 * Deliberately naive and independent of src/core: it sees every rank's inputs
 * at once and computes one rank's expected outputs straight from DESIGN.md.
 * Used by the tests, the fuzz target and disco-bench --check. Not part of
 * libdisco.so (static library disco_ref). Inputs are assumed valid.
 *
 * Summation rule (docs/semantics.md): a sum is a left fold that starts from
 * its first term in the fixed order (so K=1 unweighted round trips are exact
 * even for -0.0); products w*y and sums are separate fp32 roundings (no FMA).
 */
#ifndef DISCO_REF_REF_H_
#define DISCO_REF_REF_H_

#include <stdint.h>

#include "disco.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct disco_ref_input {
  int64_t num_tokens;
  const void *x;             /* [T, H] config dtype */
  const int64_t *topk_idx;   /* [T, K], always int64 here */
  const float *topk_weights; /* [T, K] or NULL */
} disco_ref_input_t;

typedef struct disco_ref_output {
  int64_t num_rows;
  void *recv_x;              /* [rows, H] */
  int32_t *src_rank;         /* [rows] */
  int32_t *src_token;        /* [rows] */
  int32_t *expert;           /* EXPERT_MAJOR [rows] global; RANK_MAJOR [rows, K] local */
  float *weight;             /* same shape as expert */
  int32_t *n_tokens_to_rank; /* [W] */
  int32_t *n_tokens_from_rank; /* [W] */
  int32_t *tokens_per_expert;  /* [E_loc], padded counts */
} disco_ref_output_t;

/* Expected dispatch outputs of `rank` given all `world` ranks' inputs.
 * Allocates out's arrays; 0 on success, -1 on allocation failure. */
int disco_ref_dispatch(const disco_config_t *cfg, int world, int rank,
                       const disco_ref_input_t *inputs, disco_layout_t layout,
                       int expert_alignment, disco_ref_output_t *out);
void disco_ref_output_free(disco_ref_output_t *out);

/* Expected combine output of `rank` ([T_rank, H]) given every rank's expert
 * outputs ys[d] (rows in rank d's dispatch output order). `weighted` applies
 * topk_weights when the inputs have them (EXPERT_MAJOR only); cfg->combine_wire
 * says whether partials are rounded to the dtype before crossing. 0 or -1. */
int disco_ref_combine(const disco_config_t *cfg, int world, int rank,
                      const disco_ref_input_t *inputs, disco_layout_t layout,
                      int expert_alignment, const void *const *ys, int weighted,
                      void *out);
/* Same, with each rank's own receive layout (ranks may choose differently:
 * rank p's rows of ys[p] are in layouts[p]'s order and folded by its rule). */
int disco_ref_combine_layouts(const disco_config_t *cfg, int world, int rank,
                              const disco_ref_input_t *inputs,
                              const disco_layout_t *layouts, int expert_alignment,
                              const void *const *ys, int weighted, void *out);

#ifdef __cplusplus
}
#endif

#endif /* DISCO_REF_REF_H_ */
