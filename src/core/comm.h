/* Internal: the communicator, the handle and the backend vtable.
 *
 * Core code (src/core) never includes a backend's headers; backends fill a
 * disco_backend_ops_t. Two kinds of backend exist:
 * - host-transport backends (local, mpi) implement only the small collective
 *   primitives below (alltoall, alltoallv); core's host path
 *   (src/core/host_path.c) does routing, pack, expand and reduce on the CPU.
 * - device backends (nccl) implement dispatch/combine themselves (ops->dispatch
 *   non-NULL) and use core only for argument validation and bookkeeping.
 */
#ifndef DISCO_CORE_COMM_H_
#define DISCO_CORE_COMM_H_

#include <stddef.h>
#include <stdint.h>

#include "disco.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct disco_backend_ops {
  const char *name;
  int device_memory; /* buffers are CUDA device pointers */
  /* Device backends whose every dispatch, REUSE_LAYOUT included, is a full
   * exchange the peers wait for (so a host-side failure must still take
   * part through dispatch_abort). */
  int full_rounds;

  /* Host-transport primitives; all collective, all bounded by timeout_ms.
   * alltoall: `bytes` from send + p*bytes go to rank p, land at recv + q*bytes
   * from rank q. alltoallv: byte counts/displacements per peer, like
   * MPI_Alltoallv with MPI_BYTE. Must return the same error on every rank where
   * the transport allows it. */
  disco_result_t (*alltoall)(disco_comm_t *comm, const void *send, void *recv,
                             size_t bytes);
  disco_result_t (*alltoallv)(disco_comm_t *comm, const void *send,
                              const size_t *send_counts, const size_t *send_displs,
                              void *recv, const size_t *recv_counts,
                              const size_t *recv_displs);

  /* Device backends: whole operations. `args` are validated on the host side
   * (structs, pointers, sizes) before these are called; expert ids are the
   * backend's to check. layout_only: compute the plan and counts only (for
   * disco_dispatch_layout) and return rows in *num_rows. */
  disco_result_t (*dispatch)(disco_comm_t *comm, disco_handle_t *handle,
                             const disco_dispatch_args_t *args, int layout_only,
                             int64_t *num_rows);
  disco_result_t (*combine)(disco_comm_t *comm, disco_handle_t *handle,
                            const disco_combine_args_t *args);
  /* Device backends: this rank's dispatch failed the host-side checks with
   * `code` (its arguments may be unusable); take part in the count exchange
   * carrying the code so peers return DISCO_ERR_REMOTE instead of waiting.
   * api.c keeps the original error message. NULL: not needed. */
  void (*dispatch_abort)(disco_comm_t *comm, disco_handle_t *handle, void *stream,
                         disco_result_t code);
  /* Per-handle backend state (device buffers), sized from the config. */
  disco_result_t (*handle_init)(disco_comm_t *comm, disco_handle_t *handle);
  void (*handle_fini)(disco_comm_t *comm, disco_handle_t *handle);

  /* Backends that do not wait on the device (nccl_device): DISCO_CAP_* bits,
   * and the latched device errors for disco_comm_check. NULL: 0 / success. */
  uint32_t caps;
  disco_result_t (*check)(disco_comm_t *comm, int wait);
  /* This rank's combine failed the host-side checks with `code`: let the
   * peers learn it (they report DISCO_ERR_REMOTE) instead of timing out.
   * NULL: not needed or not possible. */
  void (*combine_abort)(disco_comm_t *comm, disco_handle_t *handle, void *stream,
                        disco_result_t code);

  void (*destroy)(disco_comm_t *comm); /* frees backend_state only */
} disco_backend_ops_t;

struct disco_comm {
  const disco_backend_ops_t *ops;
  void *backend_state;
  disco_config_t config; /* normalised: defaults filled in */
  int rank;
  int world_size;
  int num_local_experts;
  size_t elem_size;
  size_t row_bytes; /* hidden * elem_size */
  int timeout_ms;
  void *host_ws; /* host-path workspace (see host_path.c); NULL for device backends */
};

struct disco_handle {
  disco_comm_t *comm;
  int valid;      /* holds a plan from a successful dispatch/dispatch_layout */
  int data_moved; /* a dispatch (not only layout) completed: combine allowed */
  disco_layout_t layout;
  int64_t num_tokens; /* T of the dispatch */
  int64_t num_rows;   /* rows received, padding included; -1: only on the device
                         (backends without host sync) */
  void *host_plan;    /* host path's plan (host_path.c) */
  void *backend_plan; /* device backend's plan */
};

/* Comm creation helper for backends: validates and normalises the config,
 * allocates the comm, fills the common fields. Backends set ops/state. */
disco_result_t disco_comm_alloc(const disco_config_t *config, int rank, int world_size,
                                const char *who, disco_comm_t **out);
/* Frees what disco_comm_alloc and the host path allocated (not backend_state). */
void disco_comm_free(disco_comm_t *comm);

/* Host path: allocate/free its workspace in the comm (called by host backends
 * after disco_comm_alloc). */
disco_result_t disco_host_path_init(disco_comm_t *comm);

#ifdef __cplusplus
}
#endif

#endif /* DISCO_CORE_COMM_H_ */
