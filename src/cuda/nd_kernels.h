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
 * Dispatch: [layout] send -> recv -> expand (+padding) -> ack.
 * Combine:  csend (expert side fold, stored at the token owner) -> ctoken
 *           (fold over sources, acks in its last block).
 */
#ifndef DISCO_CUDA_ND_KERNELS_H_
#define DISCO_CUDA_ND_KERNELS_H_

#include "cuda/kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Flag kinds in a window's flag area, [kind][W] u64, entry q written by q. */
enum {
  DISCO_ND_DFLAG = 0, /* dispatch data from q is complete: seq << 8 | status */
  DISCO_ND_DACK = 1,  /* q has read our dispatch data of call seq */
  DISCO_ND_CFLAG = 2, /* combine partials from q are complete */
  DISCO_ND_CACK = 3,  /* q has read our partials */
  DISCO_ND_DEAD = 4,  /* q gave up (timed out): nobody waits for it any more */
  DISCO_ND_KINDS = 5
};
/* Phases named by a TIMEOUT record (DISCO_LATCH_A). */
enum {
  DISCO_ND_PHASE_DACK = 1,
  DISCO_ND_PHASE_DFLAG = 2,
  DISCO_ND_PHASE_CACK = 3,
  DISCO_ND_PHASE_CFLAG = 4,
  DISCO_ND_PHASE_DEAD = 5 /* the peer itself timed out earlier */
};

typedef struct disco_nd_params {
  char *const *peer; /* device [W]: every rank's window base as mapped here */
  char *local;       /* this rank's window base */
  unsigned long long off_flags, off_cnt, off_meta, off_rows, off_part;
  int part_vecs;              /* 16-byte vectors of one combine partial row */
  unsigned long long *seq;    /* device [2]: last finished dispatch, combine */
  unsigned *done;             /* device [2]: blocks done (send, csend/ctoken) */
  int32_t *cstat;             /* device [1]: this rank's status in the combine */
  unsigned long long *fatal;  /* device word, != 0 after a timeout: exit */
  unsigned long long *hfatal; /* mapped host record of the fatal error */
  unsigned long long timeout_ns;
} disco_nd_params_t;

/* Window bytes per rank and the offsets, a pure function of the sizes. */
unsigned long long disco_nd_window_layout(const disco_kparams_t *p, int part_vecs,
                                          disco_nd_params_t *nd);

/* Rows (rows != 0) and count messages to every rank's slot, then flags.
 * status != 0: this rank's call failed on the host; send that code and no
 * rows (layout not run). */
cudaError_t disco_nd_send(const disco_kparams_t *p, const disco_nd_params_t *nd,
                          const disco_dev_plan_t *pl, const void *x, const float *weights,
                          int64_t num_tokens, int rank_major, int rows, int status,
                          cudaStream_t stream);
/* Waits for every source's flag, takes the count messages, makes the receive
 * plan (user counts written when all is well and `capacity` holds the rows).
 * p->lerr NULL: errors are not latched (the host reads them back). */
cudaError_t disco_nd_recv(const disco_kparams_t *p, const disco_nd_params_t *nd,
                          const disco_dev_plan_t *pl, int layout, int alignment,
                          int32_t *n_to, int32_t *n_from, int32_t *tokens_per_expert,
                          int64_t *num_recv_rows, int64_t capacity, int call,
                          cudaStream_t stream);
/* Dispatch done reading the slots: ack every source, advance the sequence. */
cudaError_t disco_nd_ack(const disco_kparams_t *p, const disco_nd_params_t *nd,
                         cudaStream_t stream);
/* Combine, expert side. status != 0: host-side failure, send only flags. */
cudaError_t disco_nd_csend(const disco_kparams_t *p, const disco_nd_params_t *nd,
                           const disco_dev_plan_t *pl, const void *y, int64_t y_rows,
                           int weighted, int wire32, int rank_major, int status,
                           cudaStream_t stream);
/* Combine, token side: out[t] = fold of the partials (nothing written when
 * any rank failed), then acks. */
cudaError_t disco_nd_ctoken(const disco_kparams_t *p, const disco_nd_params_t *nd,
                            const disco_dev_plan_t *pl, void *out, int wire32,
                            int64_t num_tokens, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* DISCO_CUDA_ND_KERNELS_H_ */
