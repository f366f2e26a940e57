/* Internal: the CUDA kernels of the NCCL backend, as extern "C" launchers.
 *
 * Every launcher enqueues on `stream` and returns the launch's cudaError_t.
 * The structs are plain C and passed to kernels by value.
 *
 * Dispatch data flow on rank r (W ranks, M = max_tokens, C tokens per layout
 * block):
 *   layout    per token: validate ids, dedupe destination ranks, per-block
 *             counts and stable in-block positions per expert and per rank
 *   finalize  scan block counts, first validation error -> status, count
 *             messages for every peer (own one copied to the receive side)
 *   (NCCL: count messages exchanged)
 *   recv_plan receive offsets per source, per expert group offsets, user counts
 *   pack      one row per (token, destination) into that peer's send segment
 *             plus a metadata row (EXPERT_MAJOR self rows are not copied:
 *             expand reads them from x); runs on the comm's side stream,
 *             alongside the count exchange
 *   (NCCL: payload + metadata)
 *   expand    received rows into the caller's layout, with metadata and the
 *             per-row lists combine's expert side needs
 */
#ifndef DISCO_CUDA_KERNELS_H_
#define DISCO_CUDA_KERNELS_H_

#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#include "disco.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Count message sent to every peer: int64 fields. */
enum {
  DISCO_MSG_CODE = 0,   /* disco_result_t of the sender's device validation */
  DISCO_MSG_ROW = 1,    /* offending token */
  DISCO_MSG_SLOT = 2,   /* offending slot */
  DISCO_MSG_VALUE = 3,  /* offending id */
  DISCO_MSG_PREV = 4,   /* earlier slot holding the same id (duplicates) */
  DISCO_MSG_TOKENS = 5, /* tokens sent to the receiver */
  DISCO_MSG_LAYOUT = 6, /* the sender's own receive layout in this dispatch */
  DISCO_MSG_COUNTS = 7  /* then one count per receiver's local expert */
};

/* Sizes and the comm's scratch buffers. */
typedef struct disco_kparams {
  int rank, world, num_experts, num_local, top_k;
  int kd;           /* min(K, W): most destinations of one token */
  int num_cols;     /* E + W columns of the layout counters */
  int layout_warps; /* warps (of 32 tokens) per layout block */
  int max_blocks;   /* grid cap of grid-stride kernels */
  int side_blocks;  /* most blocks of a row kernel run beside NCCL's (0: no
                       cap), env DISCO_NCCL_SIDE_SMS */
  int dtype;        /* disco_dtype_t */
  int wire32;       /* config: fp32 combine wire with a 16-bit dtype */
  int layout;       /* this call's receive layout (set per dispatch) */
  int row_vecs;     /* 16-byte vectors per row of the config dtype */
  int meta_ints;    /* int32 per metadata row */
  int msg_len;      /* int64 per count message */
  int64_t max_tokens;
  size_t row_bytes;
  int32_t *blk_cnt;            /* [B_max, num_cols] */
  unsigned long long *err_key; /* first bad flat slot index, ~0 if none */
  unsigned *blk_done;          /* layout blocks done (finalize), 0 between calls */
  void *ws_send;               /* [W, M] rows (dispatch send, combine receive) */
  void *ws_recv;               /* [W*M] rows (dispatch receive, combine partials) */
  int32_t *send_meta;          /* [W, M, meta_ints] */
  int32_t *recv_meta;          /* [W*M, meta_ints] */
  /* nccl_device only (NULL on nccl): the receive plan latches its errors
   * into this mapped host record (DISCO_LATCH_*) instead of returning them. */
  unsigned long long *lerr;
} disco_kparams_t;

/* Latched error record (8 words of mapped host memory, written by the
 * device, read by disco_comm_check): word 0 is the code, written last. */
enum {
  DISCO_LATCH_CODE = 0,
  DISCO_LATCH_RANK = 1, /* offending / missing rank */
  DISCO_LATCH_CALL = 2, /* DISCO_CALL_* << 32 | call sequence number (low bits) */
  DISCO_LATCH_A = 3,    /* details: row / rows / phase */
  DISCO_LATCH_B = 4,    /* slot / capacity */
  DISCO_LATCH_C = 5,    /* value */
  DISCO_LATCH_D = 6,    /* earlier slot (duplicates) / peer's code */
  DISCO_LATCH_WORDS = 8
};
enum { DISCO_CALL_DISPATCH = 1, DISCO_CALL_COMBINE = 2, DISCO_CALL_LAYOUT = 3 };

/* Pipelined NCCL groups: a peer segment of n rows goes in
 * P = clamp(n / split, 1, chunks) pieces, piece c being rows
 * [n * c / P, n * (c + 1) / P); pieces c >= P are empty. Both ends of a pair
 * cut alike: the sender's n_to equals the receiver's n_from, and split and
 * chunks agree (checked at comm creation). Host and device share this rule. */
#define DISCO_MAX_CHUNKS 8
#ifdef __CUDACC__
#define DISCO_HD __host__ __device__ __forceinline__
#else
#define DISCO_HD inline
#endif
static DISCO_HD long long disco_pieces(long long n, int chunks, long long split) {
  long long P = split > 0 ? n / split : chunks;
  return P < 1 ? 1 : P > chunks ? chunks : P;
}
static DISCO_HD void disco_piece(long long n, int c, int chunks, long long split,
                                 long long *lo, long long *hi) {
  const long long P = disco_pieces(n, chunks, split);
  if (c < 0) {
    *lo = 0, *hi = n;
  } else if (c >= P) {
    *lo = *hi = n;
  } else {
    *lo = n * c / P, *hi = n * (c + 1) / P;
  }
}
/* Piece of row `row` of an n-row segment (0 when not pipelined). */
static DISCO_HD int disco_piece_of(long long n, long long row, int chunks,
                                   long long split) {
  const long long P = disco_pieces(n, chunks, split);
  int c = (int)(row * P / n); /* a guess, then corrected for the floors */
  while (c > 0 && n * c / P > row) c--;
  while (c + 1 < P && n * (c + 1) / P <= row) c++;
  return c;
}

/* A selection of received-token rows. chunk < 0: row j of the launch is
 * received token base + j, skipping gap_len rows at j >= gap_at (the self
 * segment). chunk >= 0: piece `chunk` of every peer's segment (of `chunks`,
 * rows per piece at least `split`), peers ascending: what one pipelined NCCL
 * group carries. */
typedef struct disco_rowsel {
  long long n, base, gap_at, gap_len;
  int chunk, chunks;
  long long split;
  int side; /* runs beside an NCCL kernel (see disco_row_shape) */
} disco_rowsel_t;

/* Pipelined groups (env DISCO_NCCL_SPLIT_BYTES, DISCO_NCCL_DISPATCH_CHUNKS,
 * DISCO_NCCL_COMBINE_CHUNKS): least bytes of a piece, and the most pieces
 * of a segment in dispatch (EXPERT_MAJOR: its expand follows each piece)
 * and in combine (the expert side's fold precedes each piece, the token side
 * follows it). An extra NCCL group costs ~25 us; on 4x H200 two pieces won
 * at 4096 tokens K 8 (52 MB per peer: 803 / 864 -> 776 / 819 us EXPERT_MAJOR)
 * and lost from 15 MB down (run 46), hence 16 MiB pieces, at most two. */
#define DISCO_SPLIT_BYTES (16ll << 20)
#define DISCO_DISPATCH_CHUNKS 2
#define DISCO_COMBINE_CHUNKS 2

/* One handle's device plan. */
typedef struct disco_dev_plan {
  int32_t *slot;      /* [M, K] expert id of each slot, -1 unused */
  int32_t *slot_pos;  /* [M, K] position among the block's tokens with that expert */
  int32_t *tok_dest;  /* [M, kd] destination ranks ascending, -1 after the last */
  int32_t *tok_dpos;  /* [M, kd] position among the block's tokens sent there */
  int32_t *tok_row;   /* [M, kd] row in the destination's segment (pack) */
  int32_t *blk_base;  /* [B_max, num_cols] exclusive scan of block counts */
  int64_t *msg;       /* [2, W, msg_len]: messages sent, then received */
  int64_t *recv_off;  /* [W + 1] received tokens before each source */
  int64_t *exp_off;   /* [E_loc + 1] first row of each expert group */
  int64_t *exp_total; /* [E_loc] rows of each group without padding */
  int64_t *srcbase;   /* [W, E_loc] first row of (source, expert) in recv_x */
  int64_t *num_rows;  /* [1] */
  int32_t *ok;        /* [1] every rank's status is success */
  int32_t *go;        /* [1] ok and this rank's outputs hold its rows */
  int32_t *comb_rows; /* [W*M, K] recv_x rows of a received token, experts
                         ascending, -1 after the last */
  float *comb_w;      /* [W*M, K] their weights */
  int32_t *pass_list; /* [DISCO_MAX_CHUNKS, M] tokens of each pipelined combine
                         pass (nccl backend), in no particular order */
  int32_t *pass_cnt;  /* [DISCO_MAX_CHUNKS] */
  int32_t *wide;      /* [1] combine partials cross as fp32: wire32 and some
                         rank received this dispatch EXPERT_MAJOR (then every
                         rank's partials do, RANK_MAJOR ones widened from y,
                         so that ranks may choose their layouts freely) */
} disco_dev_plan_t;

/* Layout, then (last block to finish, same launch) finalize. */
cudaError_t disco_k_layout(const disco_kparams_t *p, const disco_dev_plan_t *pl,
                           const void *topk_idx, int idx64, int64_t num_tokens,
                           cudaStream_t stream);
/* User count outputs may be NULL; they are written only when every rank's
 * status is success and this rank's rows fit `capacity`. */
cudaError_t disco_k_recv_plan(const disco_kparams_t *p, const disco_dev_plan_t *pl,
                              int layout, int alignment, int32_t *n_to, int32_t *n_from,
                              int32_t *tokens_per_expert, int64_t *num_recv_rows,
                              int64_t capacity, cudaStream_t stream);
/* Rows for peers (and, RANK_MAJOR, for this rank) into p->ws_send segment d;
 * does nothing if this rank's own ids were rejected (its plan is garbage). */
cudaError_t disco_k_pack(const disco_kparams_t *p, const disco_dev_plan_t *pl,
                         const void *x, const float *weights, int64_t num_tokens,
                         int rank_major, cudaStream_t stream);
cudaError_t disco_k_expand_expert(const disco_kparams_t *p, const disco_dev_plan_t *pl,
                                  const void *x, disco_rowsel_t sel, void *recv_x,
                                  int32_t *src_rank, int32_t *src_token, int32_t *expert,
                                  float *weight, cudaStream_t stream);
/* dst row i = src row i for the received-token rows `sel` picks; wide: dst
 * rows are fp32 (exact widening of the dtype). */
cudaError_t disco_k_copy_rows(const disco_kparams_t *p, const disco_dev_plan_t *pl,
                              disco_rowsel_t sel, const void *src, void *dst, int wide,
                              cudaStream_t stream);
cudaError_t disco_k_padding(const disco_kparams_t *p, const disco_dev_plan_t *pl,
                            void *recv_x, int32_t *src_rank, int32_t *src_token,
                            int32_t *expert, float *weight, cudaStream_t stream);
cudaError_t disco_k_expand_rank(const disco_kparams_t *p, const disco_dev_plan_t *pl,
                                int64_t recv_tokens, int32_t *src_rank,
                                int32_t *src_token, int32_t *expert, float *weight,
                                cudaStream_t stream);
/* Expert side of an EXPERT_MAJOR combine: partials [recv_tokens, H] of
 * wire_fp32 ? fp32 : dtype into p->ws_recv. */
cudaError_t disco_k_combine_expert(const disco_kparams_t *p, const disco_dev_plan_t *pl,
                                   const void *y, disco_rowsel_t sel, int weighted,
                                   int wire_fp32, cudaStream_t stream);
/* Pipelined combine: sorts this rank's tokens into pl->pass_list by the
 * piece their last partial travels in (pieces cut with `chunks` and `split`
 * from the rows this rank sent each peer in dispatch). */
cudaError_t disco_k_combine_classify(const disco_kparams_t *p, const disco_dev_plan_t *pl,
                                     int64_t num_tokens, int chunks, long long split,
                                     cudaStream_t stream);
/* Token side: out[t] = fold over destinations of the partials; the self
 * partials come from `self_part` (row recv_off[rank] + row), the others from
 * p->ws_send segment d. pass >= 0: only the tokens of pass_list[pass].
 * side: runs beside an NCCL kernel. */
cudaError_t disco_k_combine_token(const disco_kparams_t *p, const disco_dev_plan_t *pl,
                                  const void *self_part, int wire_fp32,
                                  int64_t num_tokens, int pass, int side, void *out,
                                  cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* DISCO_CUDA_KERNELS_H_ */
