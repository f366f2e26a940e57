/* disco-bench: shared types of the benchmark and validator.
 *
 * Layers:
 * - main.c: options, sweep enumeration, per-rank driver loop, exit code.
 * - routing.c: deterministic inputs (routing generators, x, weights) and the
 *   synthetic expert function that turns dispatch outputs into combine inputs.
 * - bench.c: one case on one rank (buffers, warm-up, timed loops, check).
 * - env_host.c: process groups (threads of one process, MPI) and host memory
 *   and clocks for the local and mpi backends.
 * - env_nccl.c: CUDA memory, cudaEvent timing, NCCL communicators and the
 *   plain-NCCL baseline (only with DISCO_HAVE_NCCL).
 * - output.c: the stdout table and the --json file.
 */
#ifndef DISCO_BENCH_BENCH_H_
#define DISCO_BENCH_BENCH_H_

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "disco.h"
#include "ref/ref.h"

#define BENCH_MAX_LIST 64
#define BENCH_MAX_WORLD 256
#define BENCH_EXIT_WRONG 1
#define BENCH_EXIT_USAGE 2

typedef enum backend_kind {
  BACKEND_LOCAL,
  BACKEND_MPI,
  BACKEND_NCCL,
  BACKEND_NCCL_DEVICE /* runs in the nccl environment (same NCCL comms) */
} backend_kind_t;

typedef enum route_kind { ROUTE_UNIFORM, ROUTE_ZIPF, ROUTE_ALL_TO_ONE } route_kind_t;

typedef struct routing {
  route_kind_t kind;
  double zipf_s; /* exponent for ROUTE_ZIPF */
  double holes;  /* probability that a slot is -1, 0 = none */
  char name[64]; /* canonical spelling, e.g. "zipf:1.2+holes:0.1" */
} routing_t;

typedef struct options {
  backend_kind_t backend; /* environment: LOCAL, MPI or NCCL (also for nccl_device) */
  backend_kind_t backends[BENCH_MAX_LIST]; /* --backend list, run side by side */
  int n_backends;
  int backend_given;
  int world; /* -w; 0 = default */
  int64_t tokens[BENCH_MAX_LIST];
  int n_tokens;
  int64_t hidden[BENCH_MAX_LIST];
  int n_hidden;
  int topk[BENCH_MAX_LIST];
  int n_topk;
  int experts[BENCH_MAX_LIST];
  int n_experts;
  disco_dtype_t dtypes[BENCH_MAX_LIST];
  int n_dtypes;
  disco_layout_t layouts[BENCH_MAX_LIST];
  int n_layouts;
  routing_t routings[BENCH_MAX_LIST];
  int n_routings;
  int aligns[BENCH_MAX_LIST];
  int n_aligns;
  disco_combine_wire_t wires[BENCH_MAX_LIST];
  int n_wires;
  disco_index_type_t index_type;
  int iters;
  int warmup;
  int check;
  int weighted;     /* dispatch with topk_weights and a weighted combine */
  int graph;        /* time CUDA graph replays of each call (GPU backends) */
  int back_to_back; /* timed iterations queued without sync or barrier between */
  int lsa;          /* also time the LSA push of the same bytes (--lsa) */
  int timeout_ms;
  int64_t corrupt; /* testing aid: flip bits in this many received elements */
  const char *json_path;
  uint64_t seed;
} options_t;

typedef struct bench_case {
  int index; /* position in the sweep */
  int64_t tokens;
  int64_t hidden;
  int topk;
  int experts;
  disco_dtype_t dtype;
  disco_layout_t layout;
  routing_t routing;
  int align;
  disco_combine_wire_t wire;
  backend_kind_t backend; /* innermost sweep dimension; inputs do not depend on it */
} bench_case_t;

/* What one rank measured for one case (gathered to rank 0, plain bytes). */
typedef struct rank_result {
  double disp_us; /* medians over the timed iterations */
  double comb_us;
  double plain_disp_us; /* < 0: no plain baseline */
  double plain_comb_us;
  double lsa_disp_us; /* < 0: no LSA push timed */
  double lsa_comb_us;
  int64_t disp_bytes; /* bytes received in dispatch, own tokens included */
  int64_t comb_bytes; /* bytes sent in combine (same rows) */
  int64_t recv_rows;  /* num_recv_rows as returned */
  int64_t wrong_disp; /* -1: not checked */
  int64_t wrong_comb;
  int64_t graph; /* 1: times are CUDA graph replays (--graph) */
} rank_result_t;

/* One row of the table: rank 0's summary of all ranks. */
typedef struct case_result {
  bench_case_t c;
  int world;
  int slow_disp_rank, slow_comb_rank;
  double disp_us, comb_us;             /* max over ranks of the per-rank medians */
  double disp_gbps, comb_gbps;         /* that slowest rank's bytes / its time */
  double plain_disp_us, plain_comb_us; /* < 0: none */
  double lsa_disp_us, lsa_comb_us;     /* < 0: none */
  int64_t wrong;                       /* -1: not checked */
  rank_result_t *per_rank;             /* [world], owned */
} case_result_t;

/* Every rank's inputs for one case plus, with --check, the reference. In a
 * single process (threads) one world_t is shared and each thread fills its own
 * slot; under MPI each process fills every slot it needs. */
typedef struct world_slot {
  int64_t tokens;
  void *x;                /* [T, H] host, NULL when not generated */
  int64_t *idx;           /* [T, K] */
  float *weights;         /* [T, K] or NULL */
  disco_ref_output_t ref; /* reference dispatch of this rank (--check) */
  int have_ref;
  void *ref_y; /* synthetic expert outputs of the reference rows */
} world_slot_t;

typedef struct world {
  int size;
  world_slot_t *slot; /* [size] */
} world_t;

typedef struct rank_ctx rank_ctx_t;

/* A group of ranks: threads of one process or MPI processes. */
typedef struct group_ops {
  const char *name;
  int shared_world; /* 1: ranks share one world_t (same address space) */
  void (*barrier)(rank_ctx_t *c);
  /* Rank 0 gets every rank's `n` bytes in rank order in `all`. Collective. */
  void (*gather)(rank_ctx_t *c, const void *mine, void *all, size_t n);
  /* Ends the whole run now (every rank), with `code`. */
  void (*abort)(rank_ctx_t *c, int code);
} group_ops_t;

/* Memory, clocks and communicators of one backend. */
/* One timed operation of a case (a disco call or the plain exchange). */
typedef disco_result_t (*op_fn)(rank_ctx_t *c, void *arg);

typedef struct dev_ops {
  const char *name;
  int device_memory;
  void *(*alloc)(rank_ctx_t *c, size_t bytes); /* >= 256-byte aligned, never NULL */
  void (*free)(rank_ctx_t *c, void *p);
  void (*h2d)(rank_ctx_t *c, void *dst, const void *src, size_t n);
  void (*d2h)(rank_ctx_t *c, void *dst, const void *src, size_t n);
  void (*sync)(rank_ctx_t *c); /* wait for the rank's stream */
  /* Timing of iteration i (0 <= i < iters); read gives microseconds. */
  void (*timer_begin)(rank_ctx_t *c, int i);
  void (*timer_end)(rank_ctx_t *c, int i);
  void (*timer_read)(rank_ctx_t *c, int n, double *us);
  disco_result_t (*comm_create)(rank_ctx_t *c, const disco_config_t *cfg,
                                disco_comm_t **comm);
  void (*comm_destroy)(rank_ctx_t *c, disco_comm_t *comm);
  /* Plain exchange of the given per-peer byte counts (NULL: not available).
   * Buffers are packed in peer order. */
  void (*plain_exchange)(rank_ctx_t *c, const size_t *send_bytes, const void *sbuf,
                         const size_t *recv_bytes, void *rbuf);
  /* A CUDA graph of one op on the rank's stream (NULL: not available): made
   * once, then replayed in place of the call; freed after the loop. */
  void *(*graph_capture)(rank_ctx_t *c, op_fn fn, void *arg);
  void (*graph_launch)(rank_ctx_t *c, void *graph);
  void (*graph_free)(rank_ctx_t *c, void *graph);
  /* The same per-peer bytes pushed by SM stores into the peers' symmetric
   * windows (--lsa; NULL: not built). Returns 0, or 1 when the push is not
   * possible on this communicator (every rank alike). */
  int (*lsa_exchange)(rank_ctx_t *c, const size_t *send_bytes, const void *sbuf);
  /* After a timed loop of lsa_exchange: fails the run if a flag timed out. */
  void (*lsa_check)(rank_ctx_t *c);
} dev_ops_t;

struct rank_ctx {
  int rank;
  int world;
  const options_t *opt;
  const group_ops_t *g;
  void *gstate;
  const dev_ops_t *d;
  void *dstate;
  void *stream;           /* cudaStream_t for nccl, NULL for host backends */
  backend_kind_t backend; /* of the case being run (comm_create reads it) */
  world_t *wd;            /* see world_t */
  int exit_code;          /* rank 0: BENCH_EXIT_WRONG when any wrong element */
};

/* Description of the machine for the JSON file. */
typedef struct machine_info {
  char host[128];
  char gpu[256]; /* "" for host backends */
  int cuda_runtime, cuda_driver, nccl_version;
  int num_gpus;
} machine_info_t;

/* ---- main.c ---- */
const char *backend_name(backend_kind_t b);
const char *dtype_name(disco_dtype_t d);
const char *layout_name(disco_layout_t l);
const char *wire_name(disco_combine_wire_t w);
/* Runs every case of the sweep on this rank. Collective over the group. */
void rank_main(rank_ctx_t *c);
/* Prints "disco-bench: rank r: what: NAME: message" and aborts the run. */
void fail_disco(rank_ctx_t *c, const char *what, disco_result_t rc, const char *msg);
void fail_msg(rank_ctx_t *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* ---- routing.c ---- */
uint64_t rng_seed_for(uint64_t seed, const bench_case_t *bc, int rank, uint64_t stream);
/* Fills a slot's inputs for rank `rank` (x only when with_x). 0 or -1 (OOM). */
int gen_rank_inputs(world_slot_t *s, const options_t *opt, const bench_case_t *bc,
                    int world, int rank, int with_x);
void world_slot_free(world_slot_t *s);
/* Rows rank `rank` will receive (from every rank's topk_idx). */
int64_t expected_recv_rows(const world_t *wd, const bench_case_t *bc, int rank);
/* Synthetic experts: y[i] = x[i] * f(metadata of row i), rounded to dtype;
 * rows without a local expert are zero. */
void expert_outputs(const bench_case_t *bc, int world, int rank, int64_t rows,
                    const void *recv_x, const int32_t *recv_expert,
                    const float *recv_weight, void *y);

/* ---- bench.c ---- */
void bench_case_run(rank_ctx_t *c, const bench_case_t *bc, rank_result_t *res);

/* ---- output.c ---- */
/* plain: 1 = the plain NCCL columns, 3 = those and the LSA push's (--lsa) */
void output_header(FILE *f, const options_t *opt, int world, int plain);
/* show_backend: a backend column (when --backend lists several). */
void output_row(FILE *f, const case_result_t *r, int plain, int show_backend);
void output_skip(FILE *f, const bench_case_t *bc, const char *why);
int output_json(const char *path, const options_t *opt, const machine_info_t *m,
                const case_result_t *rows, int n);

/* ---- env_host.c ---- */
/* Runs rank_main on `world` threads sharing one group (local backend when
 * dev is NULL; otherwise per-thread device setup through dev_init). */
typedef int (*thread_init_fn)(rank_ctx_t *c, void *arg);
typedef void (*thread_fini_fn)(rank_ctx_t *c, void *arg);
int run_threads(const options_t *opt, int world, const dev_ops_t *dev,
                thread_init_fn init, thread_fini_fn fini, void *arg, int *exit_code);
int run_local(const options_t *opt, int world, int *exit_code);
extern const dev_ops_t host_dev_ops;
void host_machine_info(machine_info_t *m);
#ifdef DISCO_HAVE_MPI
int run_mpi(const options_t *opt, int *exit_code);
extern const group_ops_t mpi_group_ops;
#endif

/* ---- env_nccl.c ---- */
#ifdef DISCO_HAVE_NCCL
int nccl_device_count(void);
/* Single process, one thread per GPU (use_mpi = 0), or one process per GPU
 * under MPI (use_mpi = 1). Returns 0 or an exit code. */
int run_nccl(const options_t *opt, int use_mpi, int *exit_code);
#endif

/* Machine description filled by the active environment (rank 0). */
extern machine_info_t bench_machine;

#endif /* DISCO_BENCH_BENCH_H_ */
