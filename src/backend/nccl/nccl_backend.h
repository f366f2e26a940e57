/* Internal: state of the NCCL backend (comm and handle), shared by its files. */
#ifndef DISCO_BACKEND_NCCL_H_
#define DISCO_BACKEND_NCCL_H_

#include <cuda_runtime.h>
#include <nccl.h>

#include "core/comm.h"
#include "cuda/kernels.h"

typedef struct disco_nccl_state {
  ncclComm_t nccl;
  int device;
  cudaEvent_t done; /* recorded after the count read-back */
  /* Side stream: pack runs beside the count exchange and this rank's own
   * rows are expanded / reduced beside the NCCL transfer. Forked from and
   * joined back into the caller's stream with these events. */
  cudaStream_t aux;
  cudaEvent_t ev_fork, ev_pack, ev_mid, ev_aux;
  cudaEvent_t ev_piece[DISCO_MAX_CHUNKS]; /* pipelined piece c folded (combine) */
  cudaEvent_t ev_land[DISCO_MAX_CHUNKS];  /* pipelined piece c landed */
  disco_kparams_t kp;
  size_t ws_bytes;     /* each of kp.ws_send / kp.ws_recv */
  int64_t split_bytes; /* least bytes of a pipelined piece (DISCO_SPLIT_BYTES;
                          env DISCO_NCCL_SPLIT_BYTES) */
  int dispatch_chunks; /* most pieces of a peer segment, DISCO_*_CHUNKS; env */
  /* The payload buffers (ws_send, ws_recv, send_meta, recv_meta) come from
   * ncclMemAlloc and are registered with the NCCL comm, so that NCCL moves
   * rows without its staging copy; every payload send and receive then uses
   * them on both ends, as NCCL requires. Opt-in (env DISCO_NCCL_REGISTER=1):
   * on 4x H200 it saved 10-20 us on EXPERT_MAJOR and cost RANK_MAJOR the
   * copies through the workspace (run 45). */
  int registered;
  void *reg_handle[4];
  int combine_chunks; /* DISCO_NCCL_DISPATCH_CHUNKS / _COMBINE_CHUNKS */
  size_t meta_bytes;
} disco_nccl_state_t;

typedef struct disco_nccl_plan {
  disco_dev_plan_t dev;
  void *dev_mem;     /* one allocation behind every dev pointer */
  int64_t *host_msg; /* pinned [2, W, msg_len]: the one read-back */
  int64_t *n_to;     /* [W] rows sent to each peer */
  int64_t *n_from;   /* [W] rows received from each peer */
  int64_t *recv_off; /* [W + 1] */
  int64_t recv_tokens;
  int64_t num_tokens;
  int has_counts;             /* host_msg holds a successful count exchange */
  int wide;                   /* combine partials cross as fp32 (pl.wide) */
  disco_layout_t plan_layout; /* layout/alignment the device recv plan holds */
  int plan_alignment;
} disco_nccl_plan_t;

/* Checked calls: record a message and return the code. */
disco_result_t disco_nccl_cuda(cudaError_t e, const char *fn, const char *what, int rank);
disco_result_t disco_nccl_nccl(ncclResult_t e, const char *fn, const char *what,
                               int rank);
/* ncclGroupEnd, waiting (bounded) if the comm is non-blocking. */
disco_result_t disco_nccl_group_end(disco_comm_t *comm, const char *fn);
/* Waits for st->done (recorded by the caller) with the comm's deadline. */
disco_result_t disco_nccl_wait(disco_comm_t *comm, const char *fn);

/* Polls `ev` (NULL: only the comm's async error) until done, bounded by
 * timeout_ms; TIMEOUT on expiry. */
disco_result_t disco_nccl_poll(ncclComm_t nc, cudaEvent_t ev, int timeout_ms,
                               const char *fn, const char *what, int rank);
/* Kernel sizes and limits from the comm's config (no allocation). */
disco_result_t disco_nccl_params(const disco_comm_t *comm, int device, disco_kparams_t *p,
                                 const char *fn);
/* Sub-allocation of a handle's device plan in one block (base NULL: size only). */
size_t disco_nccl_plan_carve(const disco_kparams_t *p, disco_dev_plan_t *d, char *base);
/* Collective start of an NCCL-based comm: queries nccl_comm, allocates the
 * comm, lets `setup` make the backend state (it reports in *extra a tuning
 * value that must agree too); a local failure still joins the agreement so
 * peers do not wait. Then every rank learns whether all succeeded with the
 * same config; `compared` names those fields in the mismatch message. On
 * failure nothing is left allocated and *out is NULL. */
typedef disco_result_t (*disco_nccl_setup_t)(disco_comm_t *comm, ncclComm_t nccl,
                                             int device, const char *fn, int64_t *extra);
disco_result_t disco_nccl_create(ncclComm_t nccl_comm, const disco_config_t *config,
                                 const char *fn, const char *compared,
                                 disco_nccl_setup_t setup, disco_comm_t **out);
/* Collective: every rank learns whether any failed (`failed`) and whether the
 * configs (and `split`) agree. c may be NULL when failed. */
disco_result_t disco_nccl_agree(ncclComm_t nc, int rank, int timeout_ms,
                                const disco_config_t *c, int64_t split, int failed,
                                const char *fn, int *any_failed, int *mismatch);

/* Rows this rank receives, from read-back count messages. */
int64_t disco_nccl_host_rows(const disco_kparams_t *p, const int64_t *recv,
                             disco_layout_t layout, int align);
/* Every rank's status in read-back messages, as the call's result. */
disco_result_t disco_nccl_check_status(const disco_comm_t *comm, const disco_kparams_t *p,
                                       const int64_t *recv, const char *fn);

disco_result_t disco_nccl_dispatch(disco_comm_t *comm, disco_handle_t *handle,
                                   const disco_dispatch_args_t *args, int layout_only,
                                   int64_t *num_rows);
/* This rank's dispatch failed host-side checks: take part in the count
 * exchange carrying `code` so peers return DISCO_ERR_REMOTE. */
void disco_nccl_dispatch_abort(disco_comm_t *comm, disco_handle_t *handle, void *stream,
                               disco_result_t code);
disco_result_t disco_nccl_combine(disco_comm_t *comm, disco_handle_t *handle,
                                  const disco_combine_args_t *args);

#endif /* DISCO_BACKEND_NCCL_H_ */
