/* Internal: kernels of the nccl_device backend (device-initiated transfers
 * into the peers' symmetric windows), as extern "C" launchers.
 *
 * Every rank's window has the same layout (offsets below). Rows for rank d
 * from rank r land in d's window, slot r; completion is a flag per (source,
 * receiver) carrying the call's sequence number (kept on the device, so
 * graph replays advance it) and the sender's status; the receiver acks a
 * slot once it has read it, and a sender waits for that ack before it
 * overwrites the slot in the next call. Every wait is bounded.
 *
 * Dispatch: [layout kernel] + one launch: send -> receive plan -> expand
 *           -> ack. Combine: one launch: expert-side fold stored at the
 *           token owner -> token-side fold -> ack.
 */
#ifndef DISCO_CUDA_ND_KERNELS_H_
#define DISCO_CUDA_ND_KERNELS_H_

#include "cuda/kernels.h"

/* Whether a call of T tokens takes the pipelined kernel, given its token
 * threshold (pipe_min for dispatch, cpipe_min for combine): 1 from min
 * tokens, 2 from half as many when T x min(K, W) is at least 2 x min (their
 * rows, not their count, make the pipeline pay: run 66, 512 tokens K 8
 * dispatch -4.5 us but K 1 +17 us; 1024 K 8 combine -5 us, K 1 +1), else 0.
 * The combine's expert side sends chunk flags from half as many rows in
 * mode 2 (nd_combine.cu). tests/unit/test_pipe_mode.c. */
static DISCO_HD int disco_nd_pipe_mode(long long T, int K, int W, int min_tokens) {
  const long long kw = K < W ? K : W;
  if (T >= min_tokens) return 1;
  return 2 * T >= min_tokens && T * kw >= 2ll * min_tokens ? 2 : 0;
}

#ifdef __cplusplus
extern "C" {
#endif

/* The pipelined dispatch sends each destination's rows in up to this many
 * parts (nd.dparts), each flagged as it lands (nd_pipe.cu). */
#define DISCO_ND_PARTS_MAX 4

/* Flag kinds in a window's flag area, [kind][W] u64, entry q written by q. */
enum {
  DISCO_ND_DFLAG = 0, /* dispatch data from q is complete: seq << 8 | status */
  DISCO_ND_DACK = 1,  /* q has read our dispatch data of call seq */
  DISCO_ND_CFLAG = 2, /* combine partials from q are complete */
  DISCO_ND_CACK = 3,  /* q has read our partials */
  DISCO_ND_DEAD = 4,  /* q gave up (timed out): nobody waits for it any more */
  DISCO_ND_DCNT = 5,  /* unused: count words validate themselves (nd_rows.cuh) */
  DISCO_ND_CSTAT = 6, /* q's combine status, sent as its combine starts */
  DISCO_ND_DPART = 7, /* + h: part h of q's dispatch rows is in (h < parts - 1) */
  DISCO_ND_KINDS = 7 + DISCO_ND_PARTS_MAX - 1
};
/* Combine partials go out in chunks of CH = nd.cch_rows rows per (expert
 * rank, token owner): a chunk flag [q][g] in the owner's window (off_cch)
 * says that rows [g * CH, (g + 1) * CH) from q are in, so the owner can fold
 * those tokens while the rest is still in flight (the pipelined combine).
 * Flags and counters are laid out for the smallest CH. */
/* The pipelined dispatch does the same for its rows (off_dch [q][g]: rows
 * [g * CH, (g + 1) * CH) from source q are in, CH = nd.dch_rows), so that the
 * receiver expands a source's rows as they land, not after the last one. */
#define DISCO_ND_CHUNK_MIN 64
#define DISCO_ND_CHUNKS(M) (((M) + DISCO_ND_CHUNK_MIN - 1) / DISCO_ND_CHUNK_MIN)
/* Phases named by a TIMEOUT record (DISCO_LATCH_A). */
enum {
  DISCO_ND_PHASE_DACK = 1,
  DISCO_ND_PHASE_DFLAG = 2,
  DISCO_ND_PHASE_CACK = 3,
  DISCO_ND_PHASE_CFLAG = 4,
  DISCO_ND_PHASE_DEAD = 5, /* the peer itself timed out earlier */
  DISCO_ND_PHASE_DCNT = 6,
  DISCO_ND_PHASE_CSTAT = 7
};

typedef struct disco_nd_params {
  char *const *peer; /* device [W]: every rank's window base as mapped here */
  char *local;       /* this rank's window base */
  unsigned long long off_flags, off_cnt, off_meta, off_rows, off_part, off_cch, off_dch;
  int part_vecs;           /* 16-byte vectors of one combine partial row */
  unsigned long long *seq; /* device [2]: last finished dispatch, combine */
  unsigned *done;          /* device [4]: blocks done per phase, 0 between calls */
  unsigned *step; /* device [DISCO_ND_STEPS(W)]: sender blocks done per part, step */
  unsigned long long *ctr; /* device [DISCO_ND_CTRS(W)]: work counters (DISCO_ND_CTR_*), 0
                              between calls */
  unsigned long long *plan; /* device: dispatch seq whose receive plan is made */
  unsigned long long *lay;  /* device: dispatch seq whose fused layout is made */
  unsigned long long *sent; /* device [2]: last dispatch / combine whose local
                               stores (all blocks) are done */
  int max_grid;             /* co-resident blocks of one launch */
  unsigned long long
      test_self_delay_ns;     /* test hook, 0: off (DISCO_ND_TEST_SELF_DELAY_US) */
  unsigned long long *fatal;  /* device word, != 0 after a timeout: exit */
  unsigned long long *hfatal; /* mapped host record of the fatal error */
  unsigned long long timeout_ns;
  unsigned long long *trace; /* device [KINDS][CALLS][SLOTS] phase times, NULL: off */
  int tune;          /* DISCO_ND_TUNE bits (A/B of kernel variants), 0: the defaults */
  int pipe_min;      /* tokens from which dispatch pipelines (nd_pipe.cu) */
  int expand_pct;    /* share of the pipelined dispatch's blocks that expand (0: auto) */
  int expand_items;  /* small dispatch, block-mode expand: row pieces per block */
  int dparts;        /* parts of a destination's rows in the pipelined dispatch */
  int cpipe_min;     /* tokens from which the combine's token side pipelines;
                        chunk flags go out from W * cpipe_min / 2 received rows */
  int ctoken_pct;    /* share of the pipelined combine's blocks that start on
                        the token side (the others join after the expert side) */
  int cch_rows;      /* rows per chunk flag, >= DISCO_ND_CHUNK_MIN */
  unsigned *cdone;   /* device [W][DISCO_ND_CHUNKS(M)]: chunk pieces stored, 0
                        between calls */
  int dch_rows;      /* pipelined dispatch: rows per chunk flag (0: none) */
  long long dch_min; /* ... for a source's rows of at least this many bytes */
  unsigned *ddone;   /* device [W][DISCO_ND_CHUNKS(M)]: dispatch rows stored per
                        destination and chunk, 0 between calls */
  size_t fuse_smem;  /* layout smem the dispatch kernel's occupancy allows */
  int warp_pieces;   /* warp-mode expand: pieces per row */
  int sms;           /* SMs a launch may use */
  int csend_pmax;    /* combine's expert side: most pieces per row (0: no cap) */
  int small_blocks;  /* most blocks of the plain dispatch kernel for few rows */
  int pipe_xg;       /* pipelined dispatch, batched expand: most rows per ticket */
  /* Where this rank's dispatch rows (prow) and combine partials (ppart) go
   * at each peer: its slot in the peer's window, or for a peer outside the
   * LSA team (hybrid comm) a local staging copy that NCCL sends on
   * (nd_hybrid.c; peer[] then points at a staging copy of the window's
   * small regions, which the layout puts first). */
  char *const *prow;
  char *const *ppart;
  const unsigned char *remote; /* device [W]: 1 = outside the LSA team; NULL: none */
  int phase; /* 0: the whole call; hybrid: 1 the send half, 2 the receive half */
} disco_nd_params_t;

/* Work counters (dynamic sharing of a phase's items). */
#define DISCO_ND_CTR_SEND 0
#define DISCO_ND_CTR_EXPAND 1
#define DISCO_ND_CTR_CSEND 2
#define DISCO_ND_CTR_TOKEN 3
/* + h * W + step: pipelined sends, per part and destination step */
#define DISCO_ND_CTR_STEP 4
#define DISCO_ND_STEPS(W) (DISCO_ND_PARTS_MAX * (W))
/* pipelined expand, per source q and part h */
#define DISCO_ND_CTR_SRC(W, q, h) (4 + DISCO_ND_STEPS(W) + (h) * (W) + (q))
#define DISCO_ND_CTR_CLATE(W) (4 + 2 * DISCO_ND_STEPS(W)) /* combine, test hook */
#define DISCO_ND_CTRS(W) (5 + 2 * DISCO_ND_STEPS(W))

/* DISCO_ND_TUNE bits: each switches a default, for measuring what it gains. */
#define DISCO_ND_TUNE_SOURCE_ORDER 1 /* combine stores in source order (hot spots) */
#define DISCO_ND_TUNE_BLOCK_EXPAND 2 /* expand a row per block even for many rows */
#define DISCO_ND_TUNE_WARP_CSEND 4   /* combine's expert side: a row per warp */
#define DISCO_ND_TUNE_WARP_TOKEN 8   /* combine's token side: a token per warp */
#define DISCO_ND_TUNE_FORCE_WARP 16  /* expand a row per warp at any size (tests) */
#define DISCO_ND_TUNE_NO_PIPE 32     /* no pipelined dispatch at any size */
#define DISCO_ND_TUNE_NO_FUSE 64     /* the layout always as its own launch */
#define DISCO_ND_TUNE_NO_CPIPE 128   /* no chunk flags, no pipelined combine */
#define DISCO_ND_TUNE_NO_GROUP 256   /* pipelined senders: one token per ticket */
#define DISCO_ND_TUNE_NO_VBATCH 512  /* combine: one-row folds as the general */
#define DISCO_ND_TUNE_NO_JOIN 1024   /* pipelined senders exit instead of expanding */
/* A row's loads after the metadata's chain of loads (the code before run
 * 51): 2048 in the pipelined kernel's expand, 4096 in its senders */
#define DISCO_ND_TUNE_NO_PREFETCH 2048
#define DISCO_ND_TUNE_NO_PREFETCH_PIPE 4096
/* The small dispatch's block expand a row (or piece) per ticket, one row's
 * loads in flight (the code before run 58) */
#define DISCO_ND_TUNE_ROW_EXPAND 8192
/* The pipelined dispatch's block expand a row (or piece) per ticket (the
 * code before session 9) */
#define DISCO_ND_TUNE_ROW_EXPAND_PIPE 16384
/* The combine's pieces per row as before run 75, not cut to fit one round of
 * blocks (nd_parts_round) */
#define DISCO_ND_TUNE_NO_ROUND 65536

/* DISCO_ND_TRACE: %globaltimer at phase ends of the last calls (nd_trace.c);
 * kinds: dispatch, combine, pipelined dispatch, pipelined combine. Slots
 * 0-7: block 0's (or the last block's) phase ends; 8-15: the latest block
 * to reach a point (atomicMax, the small dispatch: where its tail is). */
#define DISCO_ND_TRACE_KINDS 4
#define DISCO_ND_TRACE_CALLS 256
#define DISCO_ND_TRACE_SLOTS 16

/* Pipelined dispatch (nd_pipe.cu), for many tokens: blocks [0, nx) expand
 * each source's rows as its flag lands (own first), blocks [nx, nb) send in
 * destination order (own slot, then r + 1, r + 2, ...), one flag per
 * destination when its rows are out. Same arguments as the plain kernel. */
const void *disco_nd_pipe_kernel(void);
/* The combine (nd_combine.cu): plain, or pipelined (cpipe: the token side
 * folds each token as soon as the chunks holding its partials are in). */
const void *disco_nd_combine_kernel(void);

/* Window bytes per rank and the offsets, a pure function of the sizes. */
unsigned long long disco_nd_window_layout(const disco_kparams_t *p, int part_vecs,
                                          disco_nd_params_t *nd);

/* One dispatch's buffers and switches (device pointers). */
typedef struct disco_nd_io {
  const void *x;
  const float *weights;
  int64_t num_tokens;
  int layout, alignment;
  int rows;   /* 0: counts only (disco_dispatch_layout) */
  int status; /* != 0: this rank failed on the host: send that, no rows */
  int call;   /* DISCO_CALL_* (error records) */
  void *recv_x;
  int32_t *src_rank, *src_token, *expert;
  float *weight;
  int32_t *n_to, *n_from, *tokens_per_expert;
  int64_t *num_recv_rows;
  int64_t capacity;     /* rows the outputs hold */
  const void *topk_idx; /* != NULL: make the routing layout first (else reused) */
  int idx64;
} disco_nd_io_t;

/* Blocks of one co-resident launch on the current device (max_sms > 0 caps
 * the SMs counted, *sms); *fuse_smem: the layout's shared memory when the
 * dispatch kernels can make the layout themselves without losing occupancy,
 * else 0. */
cudaError_t disco_nd_max_grid(const disco_kparams_t *p, int max_sms, int *grid, int *sms,
                              size_t *fuse_smem);
/* The routing layout (io->topk_idx; made by the first blocks of the same
 * launch: block 0 of the small-batch kernel for one layout block of tokens,
 * as many as needed of the pipelined one; else its own kernel first), then
 * one cooperative launch that sends, receives, makes the receive plan,
 * expands and acks.
 * p->lerr NULL: errors are not latched (the host reads the statuses back). */
cudaError_t disco_nd_k_dispatch(const disco_kparams_t *p, const disco_nd_params_t *nd,
                                const disco_dev_plan_t *pl, const disco_nd_io_t *io,
                                cudaStream_t stream);
/* One cooperative launch: expert-side folds stored at the token owners,
 * then the token-side fold into out (nothing written when any rank failed).
 * status != 0: host-side failure on this rank, only the flags go out. */
cudaError_t disco_nd_k_combine(const disco_kparams_t *p, const disco_nd_params_t *nd,
                               const disco_dev_plan_t *pl, const void *y, int64_t y_rows,
                               int weighted, int wire32, int rank_major, int status,
                               void *out, int64_t num_tokens, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* DISCO_CUDA_ND_KERNELS_H_ */
