/*
 * disco over NCCL: the GPU backend.
 *
 * Needs cuda_runtime.h's and nccl.h's types; include after (or with) them.
 * All buffers passed to a comm made here (dispatch/combine inputs and
 * outputs) are device pointers on the comm's CUDA device, and `stream` fields
 * are cudaStream_t.
 *
 * Stream semantics: dispatch, dispatch_layout and combine enqueue all their
 * device work on args->stream. Calls on one comm share internal workspaces,
 * so a comm's calls (with any of its handles) must be issued on one stream or
 * be ordered by the caller. Inputs must stay valid until the stream reaches
 * the call's end.
 *
 * Host waits: disco_dispatch (without DISCO_DISPATCH_REUSE_LAYOUT) and
 * disco_dispatch_layout read the exchanged counts back once (one
 * device-to-host copy of a few hundred bytes) and wait for it, polling the
 * copy and ncclCommGetAsyncError for at most config->timeout_ms. On a timeout
 * they return DISCO_ERR_TIMEOUT; the NCCL communicator may then be stuck in a
 * collective: the caller, who owns it, decides whether to ncclCommAbort it
 * (after which this disco comm must be destroyed). disco_combine and a
 * REUSE_LAYOUT dispatch never wait on the host.
 *
 * Side stream: each comm owns one internal CUDA stream; a call forks work
 * onto it (pack beside the count exchange, this rank's own rows beside the
 * NCCL transfer) with events recorded on args->stream and joins it back the
 * same way, so the caller sees plain stream order on args->stream.
 *
 * Layouts: every rank of a collective dispatch must pass the same layout
 * (the combine wire format follows it: EXPERT_MAJOR sends partials in the
 * config's combine_wire, RANK_MAJOR sends y as it is). Not checked.
 *
 * CUDA graphs: disco_combine and REUSE_LAYOUT dispatches enqueue no host
 * work except NCCL calls and can be captured where NCCL's capture rules
 * allow; dispatches that read counts back cannot.
 */
#ifndef DISCO_NCCL_H_
#define DISCO_NCCL_H_

#include <nccl.h>

#include "disco.h"

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Creates the disco communicator of this rank over `nccl_comm` (rank and
 * world size are the NCCL comm's). Collective over nccl_comm: every rank
 * calls it with the same config; the configs are compared and a mismatch is
 * DISCO_ERR_INVALID_ARGUMENT on every rank. Uses the calling thread's current
 * CUDA device (it must be the NCCL comm's device) and allocates every device
 * workspace here, sized from config (each rank sends and receives at most
 * max_tokens rows per peer); dispatch and combine never allocate.
 * [in] nccl_comm: the caller keeps ownership; it must outlive the disco comm
 *      and must not be used concurrently by the caller during disco calls.
 * [in] config: DISCO_CONFIG_INIT-initialised.
 * [out] comm: the new communicator, NULL on failure.
 * Not thread-safe with other calls on the same NCCL comm. Not graph capturable.
 * Errors: NULL_POINTER, BAD_STRUCT, INVALID_ARGUMENT, EXPERT_DIVISIBILITY,
 * HIDDEN_ALIGNMENT, NOT_SUPPORTED (sizes beyond the kernels' limits),
 * OUT_OF_MEMORY (device or pinned host memory), CUDA, BACKEND, TIMEOUT.
 * Free with disco_comm_destroy (not collective; it synchronises the device
 * work of this comm's last calls before freeing).
 */
DISCO_API disco_result_t disco_comm_create_nccl(ncclComm_t nccl_comm,
                                                const disco_config_t *config,
                                                disco_comm_t **comm);

/*
 * Device-initiated backend ("nccl_device"): kernels store tokens straight
 * into the peers' receive windows over NVLink (NCCL symmetric memory and its
 * device API, NCCL >= 2.28, built and run against the same NCCL), and
 * counts, offsets and completion flags travel on the device. dispatch and
 * combine never wait on the host and can be captured in a CUDA graph
 * (DISCO_CAP_NO_HOST_SYNC | DISCO_CAP_GRAPH); disco_dispatch_layout still
 * reads counts back once.
 * Collective over nccl_comm, like disco_comm_create_nccl. When some peers are
 * not load-store accessible (other nodes: NCCL's LSA team is smaller than
 * the comm), the comm is hybrid: each call still stores over NVLink to the
 * peers of this node and moves what goes to and comes from the others by
 * NCCL send/recv inside the same call, reading their row counts back on the
 * host once per dispatch; disco_comm_caps() is then 0 (no NO_HOST_SYNC, no
 * GRAPH: capturing a call returns NOT_SUPPORTED). Allocates, at creation, one
 * symmetric window of about world_size * max_tokens * (hidden * (elem_size +
 * wire bytes)) per rank, and in a hybrid comm about 2 * max_tokens * hidden *
 * (elem_size + wire bytes) of staging per peer on another node. Never
 * requests NVLink multicast (NVLS).
 * Errors found on the device (bad expert ids, CAPACITY, REMOTE) are not
 * returned by the call that meets them: read them with disco_comm_check().
 * Every device wait is bounded by config->timeout_ms; on expiry the kernel
 * exits, the comm latches DISCO_ERR_TIMEOUT naming the missing peer, and
 * every later call returns it. disco_comm_destroy on this backend is
 * collective (it deregisters the window) unless a TIMEOUT is latched, in which
 * case the window is left to the caller's ncclCommAbort/ncclCommDestroy.
 * Errors: as disco_comm_create_nccl, plus NOT_SUPPORTED (NCCL older than
 * 2.28, header and library versions differ).
 */
DISCO_API disco_result_t disco_comm_create_nccl_device(ncclComm_t nccl_comm,
                                                       const disco_config_t *config,
                                                       disco_comm_t **comm);

#ifdef __cplusplus
}
#endif

#endif /* DISCO_NCCL_H_ */
