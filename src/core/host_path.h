/* Internal: the CPU implementation of dispatch/combine over the two transport
 * primitives of disco_backend_ops_t (alltoall, alltoallv). Used by the local
 * and MPI backends.
 *
 * Every host-path collective first exchanges a small per-peer header (status +
 * counts). A rank whose input was rejected still takes part and sends its
 * error code, so peers return DISCO_ERR_REMOTE instead of waiting for it; no
 * rank moves data in that case. All memory is sized from the config at comm
 * and handle creation; dispatch and combine never allocate. */
#ifndef DISCO_CORE_HOST_PATH_H_
#define DISCO_CORE_HOST_PATH_H_

#include <stddef.h>
#include <stdint.h>

#include "core/comm.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Per-comm workspace (comm->host_ws). */
typedef struct disco_host_ws {
  int64_t hdr_stride;    /* int64 entries per peer in a header */
  size_t rec_bytes;      /* dispatch wire record: row + metadata */
  size_t part_bytes;     /* combine wire partial row */
  int64_t max_send_rows; /* max_tokens * min(K, W) */
  int64_t max_recv_rows; /* W * max_tokens */
  int64_t max_pairs;     /* max_recv_rows * min(K, E_loc) */
  int64_t *hdr_send;     /* [W * hdr_stride] */
  int64_t *hdr_recv;     /* [W * hdr_stride] */
  unsigned char *buf_s;  /* dispatch send / combine receive */
  unsigned char *buf_r;  /* dispatch receive / combine send */
  int64_t *cnt_e;        /* [E] tokens per global expert from this rank */
  uint64_t *dest_mark;   /* [W] dedup stamps */
  uint64_t stamp;
  int32_t *dup_scratch; /* [E] all -1 between calls (validate.c) */
  int64_t *cursor;      /* [max(W, E_loc)] */
  size_t *a2a;          /* [4 * W] alltoallv counts/displs in bytes */
  float *acc;           /* [H] fp32 accumulator of the token side */
  uint64_t call_seq;    /* host dispatch calls so far (same on all ranks) */
} disco_host_ws_t;

/* Per-handle plan (handle->host_plan). Counts are in records (one per
 * (token, destination rank)). */
typedef struct disco_host_plan {
  uint64_t epoch; /* ws->call_seq of the dispatch that made the plan */
  int64_t n_send, n_recv, n_pairs;
  int64_t *send_cnt, *send_displ; /* [W] */
  int64_t *recv_cnt, *recv_displ; /* [W] */
  int64_t *tok_off;               /* [max_tokens + 1] CSR over tokens */
  int64_t *tok_slot;              /* [max_send_rows] send position, dest ascending */
  int32_t *tok_dest;              /* [max_send_rows] destination rank */
  int64_t *raw;                   /* [E_loc] rows per local expert, no padding */
  int64_t *tpe;                   /* [E_loc] as reported (padded for EXPERT_MAJOR) */
  int64_t *grp_off;               /* [E_loc] first output row of each group */
  int64_t *rec_off;               /* [max_recv_rows + 1] CSR record -> pairs */
  int64_t *pair_row;              /* [max_pairs] output row, local expert ascending */
  float *pair_w;                  /* [max_pairs] weight of that row */
} disco_host_plan_t;

void disco_host_path_fini(disco_comm_t *comm);
disco_result_t disco_host_plan_create(disco_comm_t *comm, disco_handle_t *handle);
void disco_host_plan_destroy(disco_handle_t *handle);

/* Collective dispatch on the host path. `status` is this rank's validation
 * result (its message already recorded): on failure the rank still exchanges
 * headers so that peers fail with REMOTE. `handle`/`args` may be NULL only
 * when status != SUCCESS. layout_only: plan + counts, no data. */
disco_result_t disco_host_dispatch(disco_comm_t *comm, disco_handle_t *handle,
                                   const disco_dispatch_args_t *args, int layout_only,
                                   disco_result_t status, const char *fn,
                                   int64_t *num_rows);

/* Collective combine on the host path; same status convention. */
disco_result_t disco_host_combine(disco_comm_t *comm, disco_handle_t *handle,
                                  const disco_combine_args_t *args, disco_result_t status,
                                  const char *fn);

/* Exchanges a per-peer header of `stride` int64 (ws->hdr_send, filled by the
 * caller when status == SUCCESS; entry 0 is the status). Returns the
 * transport's error, this rank's own `status`, or REMOTE naming the first
 * failing peer. */
disco_result_t disco_host_exchange(disco_comm_t *comm, int64_t stride,
                                   disco_result_t status, const char *fn);

/* Overflow-checked allocation of n * elem bytes (at least 1); NULL on overflow
 * or failure. */
void *disco_host_alloc(size_t n, size_t elem);

#ifdef __cplusplus
}
#endif

#endif /* DISCO_CORE_HOST_PATH_H_ */
