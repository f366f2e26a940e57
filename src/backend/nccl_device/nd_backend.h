/* Internal: state of the nccl_device backend, shared by its files. */
#ifndef DISCO_BACKEND_ND_H_
#define DISCO_BACKEND_ND_H_

#include <cuda_runtime.h>
#include <nccl.h>

#include "core/comm.h"
#include "cuda/nd_kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct disco_nd_state {
  ncclComm_t nccl;
  int device;
  disco_kparams_t kp; /* kp.lerr = the mapped per-call error record */
  disco_nd_params_t nd;
  void *win_mem; /* ncclMemAlloc'd, registered as `win` */
  size_t win_bytes;
  ncclWindow_t win;
  int win_registered;
  /* Peers outside the LSA team (other hosts): served by NCCL send/recv
   * inside each call (nd_hybrid.c). */
  int hybrid;
  int nremote;
  int *remote_rank;   /* host [nremote] */
  void *stage;        /* device: per remote peer, what goes to it */
  size_t stage_bytes; /* per remote peer */
  void *links;        /* device: nd.prow [W], nd.ppart [W], nd.remote [W] */
  unsigned long long
      *hcnt;      /* pinned: the staging copies' count words, [nremote][W][m1] */
  void *land;     /* host: copies from receive staging into the window */
  int nland;      /* ... queued by the NCCL group in progress */
  void *dev_comm; /* ncclDevComm, owned by nd_setup.cu */
  void *small;    /* device: seq, done, cstat, fatal, peer[] */
  unsigned long long *hrec; /* mapped host: [2][DISCO_LATCH_WORDS] per-call, fatal */
  unsigned long long *drec; /* its device address */
  cudaEvent_t last;         /* recorded after each enqueued (not captured) call */
  int last_valid;
} disco_nd_state_t;

typedef struct disco_nd_plan {
  disco_dev_plan_t dev;
  void *dev_mem;
  int64_t *host_msg; /* pinned [2, W, msg_len]: disco_dispatch_layout's read-back */
  int64_t *rows;     /* hybrid: [2][W] rows sent to / received from each peer by the
                        last dispatch (the combine's NCCL sizes), 0 for LSA peers */
} disco_nd_plan_t;

/* nd_setup.cu */
ncclResult_t disco_nd_dev_create(ncclComm_t comm, ncclWindow_t win, int world, int rank,
                                 char *local, char **peer, void **dev_comm);
ncclResult_t disco_nd_dev_destroy(ncclComm_t comm, void *dev_comm);
/* Peers this rank reaches by load/store (itself included), -1 out of memory. */
int disco_nd_lsa_count(ncclComm_t comm, int world);

/* nd_comm.c */
/* The latched fatal error (TIMEOUT) as a disco error, or SUCCESS. */
disco_result_t disco_nd_fatal(disco_comm_t *comm);
/* After enqueueing a call on `stream`: remember it for check/destroy. */
disco_result_t disco_nd_mark(disco_comm_t *comm, cudaStream_t stream, const char *fn);
/* Bounded host wait for the last marked call. */
disco_result_t disco_nd_wait_last(disco_comm_t *comm, const char *fn);

/* nd_trace.c: DISCO_ND_TRACE=1 phase timing (allocates st->nd.trace). */
disco_result_t disco_nd_trace_init(disco_nd_state_t *st, int rank, const char *fn);
/* Prints the median phase lengths of the last calls to stderr. */
void disco_nd_trace_report(disco_nd_state_t *st, int rank);

/* nd_hybrid.c */
/* After disco_nd_dev_create: nd.prow, nd.ppart (where this rank's rows and
 * partials go at each peer) and, for peers outside the LSA team, the staging
 * copies that peer[], prow and ppart point at. */
disco_result_t disco_nd_links_setup(disco_comm_t *comm, const char *fn);
void disco_nd_links_free(disco_nd_state_t *st);
/* One dispatch (or combine) on the device: one launch, or in a hybrid comm
 * the send half, NCCL with the peers on other hosts (the dispatch reads
 * their row counts on the host once) and the receive half. */
disco_result_t disco_nd_run_dispatch(disco_comm_t *comm, disco_nd_plan_t *pl,
                                     const disco_kparams_t *kp, const disco_nd_io_t *io,
                                     cudaStream_t stream, const char *fn);
disco_result_t disco_nd_run_combine(disco_comm_t *comm, disco_nd_plan_t *pl,
                                    const disco_kparams_t *kp, const void *y,
                                    int64_t y_rows, int weighted, int wire32,
                                    int rank_major, int status, void *out,
                                    int64_t num_tokens, cudaStream_t stream,
                                    const char *fn);

/* nd_ops.c */
disco_result_t disco_nd_dispatch(disco_comm_t *comm, disco_handle_t *handle,
                                 const disco_dispatch_args_t *args, int layout_only,
                                 int64_t *num_rows);
void disco_nd_dispatch_abort(disco_comm_t *comm, disco_handle_t *handle, void *stream,
                             disco_result_t code);
disco_result_t disco_nd_combine(disco_comm_t *comm, disco_handle_t *handle,
                                const disco_combine_args_t *args);
void disco_nd_combine_abort(disco_comm_t *comm, disco_handle_t *handle, void *stream,
                            disco_result_t code);

#ifdef __cplusplus
}
#endif

#endif /* DISCO_BACKEND_ND_H_ */
