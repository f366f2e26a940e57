/* Shared parts of the MPI backend test: whole-world inputs generated from a
 * seed (any rank can build any rank's inputs), one rank's dispatch + combine
 * through the public API, and the bitwise comparison with disco_ref.
 * Nothing here includes mpi.h, so the same round runs on local-backend
 * threads. */
#ifndef DISCO_TESTS_CPU_MPI_GEN_H_
#define DISCO_TESTS_CPU_MPI_GEN_H_

#include <stddef.h>
#include <stdint.h>

#include "disco.h"
#include "ref/ref.h"

enum { MG_ROUTE_UNIFORM = 0, MG_ROUTE_SKEW = 1, MG_ROUTE_SPARSE = 2 };

typedef struct mg_case {
  const char *name;
  int min_experts; /* E = W * ceil(min_experts / W) */
  int k;
  int64_t hidden;
  disco_dtype_t dtype;
  disco_layout_t layout;
  int align;      /* expert_alignment */
  int weights;    /* dispatch passes topk_weights */
  int weighted;   /* combine's weighted flag */
  int route;      /* MG_ROUTE_* (SPARSE: many -1 slots) */
  int zero_ranks; /* 1: odd ranks have no tokens; 2: every rank has none */
  int64_t max_tokens;
  int idx32;       /* pass int32 ids */
  int layout_call; /* dispatch_layout, exact outputs, then REUSE_LAYOUT */
  int identity;    /* y = recv_x; with K=1 unweighted also out == x */
  disco_combine_wire_t wire;
  int short_rank; /* r + 1: rank r passes recv_capacity one row short (needs
                     layout_call); combine is then skipped on every rank */
} mg_case_t;

/* Every rank's inputs. */
typedef struct mg_world {
  disco_config_t cfg;
  int world;
  disco_ref_input_t *in; /* [W]; x, topk_idx, topk_weights owned here */
  int32_t **idx32;       /* [W] ids as int32 */
} mg_world_t;

int mg_world_init(mg_world_t *w, const mg_case_t *c, int world, uint64_t seed);
void mg_world_free(mg_world_t *w);

/* One rank's outputs of a round. */
typedef struct mg_result {
  disco_result_t rc_dispatch, rc_combine;
  char msg[256];
  int64_t rows;
  void *recv_x;
  int32_t *src_rank, *src_token, *expert;
  float *weight;
  int32_t *n_to, *n_from, *tpe;
  void *out;
} mg_result_t;

/* Runs dispatch then combine for `rank` on `comm` (collective: every rank of
 * the comm runs it). Combine is skipped if dispatch failed. */
void mg_run_rank(disco_comm_t *comm, const mg_case_t *c, const mg_world_t *w, int rank,
                 mg_result_t *res);
void mg_result_free(mg_result_t *res);

/* Expert outputs from dispatch outputs (a pure function of row + metadata). */
void mg_make_y(const mg_case_t *c, const disco_config_t *cfg, int64_t rows,
               const void *recv_x, const int32_t *src_rank, const int32_t *expert,
               void *y);

/* Compares a rank's result with disco_ref; prints the first mismatch and
 * returns the number of mismatching outputs (0 = identical). */
int mg_check_ref(const mg_case_t *c, const mg_world_t *w, int rank,
                 const mg_result_t *res, const char *tag);

/* Serialises every output into one byte buffer (for local vs MPI). */
unsigned char *mg_serialize(const mg_case_t *c, const mg_world_t *w, int rank,
                            const mg_result_t *res, size_t *len);

void *mg_alloc(size_t bytes); /* 64-byte aligned, zeroed, never NULL for 0 */

#endif /* DISCO_TESTS_CPU_MPI_GEN_H_ */
