/* Whole-world test inputs and one checked dispatch+combine round per rank:
 * every output of the library is compared bit for bit with disco_ref. */
#ifndef DISCO_TESTS_CPU_WORLD_H_
#define DISCO_TESTS_CPU_WORLD_H_

#include "harness.h"
#include "ref/ref.h"

typedef struct th_world {
  disco_config_t cfg; /* as passed to disco_comm_create_local */
  int world;
  int64_t *num_tokens;       /* [W] */
  void **x;                  /* [W] [T, H] of cfg.dtype */
  int64_t **idx;             /* [W] [T, K] */
  int32_t **idx32;           /* [W] same ids as int32 */
  float **weights;           /* [W] [T, K], entries NULL when unweighted */
  disco_ref_input_t *inputs; /* [W] for disco_ref */
} th_world_t;

/* Deterministic inputs from `seed`. num_tokens[r] must be <= cfg->max_tokens. */
void th_world_init(th_world_t *w, const disco_config_t *cfg, int world,
                   const int64_t *num_tokens, th_route_t route, int weighted,
                   int specials, uint64_t seed);
void th_world_free(th_world_t *w);

typedef enum th_reuse {
  TH_REUSE_NONE = 0,       /* plain dispatch */
  TH_REUSE_LAYOUT = 1,     /* dispatch_layout, exact outputs, dispatch REUSE_LAYOUT */
  TH_REUSE_REDISPATCH = 2, /* dispatch, then dispatch again with REUSE_LAYOUT */
} th_reuse_t;

typedef struct th_round_opts {
  disco_layout_t layout;
  int expert_alignment;
  disco_index_type_t index_type;
  int combine_weighted;
  th_reuse_t reuse;
  int null_metadata;      /* only recv_x; metadata pointers NULL */
  int64_t extra_capacity; /* rows beyond the exact count (0 = exact size) */
  int identity_y;         /* expert outputs y = recv_x (identity experts) */
  int expect_identity;    /* also require out == x bit for bit */
  int combines;           /* combine this many times with one dispatch (>= 1) */
  int mixed_layouts;      /* odd ranks receive RANK_MAJOR, the others `layout` */
} th_round_opts_t;

/* The receive layout of `rank` in a round. */
static inline disco_layout_t th_layout_of(const th_round_opts_t *o, int rank) {
  return o->mixed_layouts && (rank & 1) ? DISCO_LAYOUT_RANK_MAJOR : o->layout;
}

typedef struct th_round {
  th_world_t *w;
  disco_comm_t **comms;     /* [W] */
  disco_handle_t **handles; /* [W] */
  th_round_opts_t opts;
  uint64_t seed; /* for the expert outputs y */
  th_barrier_t *barrier;
  const void **ys; /* [W], filled during the round */
} th_round_t;

/* Prepares a round (barrier, ys); call th_round_fini after. */
void th_round_init(th_round_t *rd, th_world_t *w, disco_comm_t **comms,
                   disco_handle_t **handles, const th_round_opts_t *opts, uint64_t seed);
void th_round_fini(th_round_t *rd);
/* The per-rank body; every rank of the world must call it (th_rank_fn). */
void th_round_rank(int rank, void *round);
/* Creates handles if `handles` is NULL, runs the round on W threads. */
void th_round_run(th_world_t *w, disco_comm_t **comms, disco_handle_t **handles,
                  const th_round_opts_t *opts, uint64_t seed);

/* disco_comm_create_local that records a failure on error. 0 on success. */
int th_comms_create(int world, const disco_config_t *cfg, disco_comm_t **comms);
void th_comms_destroy(int world, disco_comm_t **comms, disco_handle_t **handles);

#endif /* DISCO_TESTS_CPU_WORLD_H_ */
