/*
 * disco MPI backend: one process per rank over an MPI communicator, on CPUs.
 *
 * Buffers are host memory. Data moves with MPI_Ialltoall / MPI_Ialltoallv
 * (MPI_BYTE) on a private duplicate of the caller's communicator; core's host
 * path does routing, pack, expand and reduce, so outputs are bit-identical to
 * the local and NCCL backends.
 */
#ifndef DISCO_MPI_H_
#define DISCO_MPI_H_

#include <mpi.h>

#include "disco.h"

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Creates rank MPI_Comm_rank(mpi_comm) of a disco communicator whose world is
 * the MPI_Comm_size(mpi_comm) processes of `mpi_comm`.
 *
 * [in]  mpi_comm  intra-communicator; duplicated (MPI_Comm_idup) so disco's
 *                 traffic never mixes with the caller's. The caller keeps
 *                 ownership of `mpi_comm` and may free it right after this
 *                 returns. The duplicate uses MPI_ERRORS_RETURN.
 * [in]  config    made with DISCO_CONFIG_INIT; must be identical on every rank
 *                 (except timeout_ms); a mismatch fails on every rank.
 * [out] comm      the new communicator; set to NULL on failure.
 *
 * Collective over mpi_comm: every process calls it, in the same order relative
 * to other collectives on mpi_comm. Either every rank succeeds or every rank
 * gets an error: a rank whose own arguments or allocations failed returns its
 * specific code, the others return DISCO_ERR_REMOTE naming a failed rank.
 *
 * Threads: MPI must be initialised by the caller (and not yet finalised).
 * MPI_THREAD_MULTIPLE is not required: disco makes MPI calls only from the
 * thread that calls a disco function with this comm, so with a lower thread
 * level the caller must serialise disco calls with its own MPI calls (and with
 * MPI_THREAD_FUNNELED make them from the main thread).
 *
 * Waits: every wait (creation, each exchange) polls MPI_Test with a deadline of
 * the config's timeout_ms. After DISCO_ERR_TIMEOUT or DISCO_ERR_BACKEND from any
 * call, the comm is broken: an MPI operation may still be pending and cannot be
 * cancelled, so every later collective call on it returns DISCO_ERR_TIMEOUT
 * (resp. BACKEND) at once. Destroy it; disco_comm_destroy then deliberately
 * leaks the duplicate MPI communicator and the workspaces the pending
 * operation may still write to. The caller's buffers of the failed call may
 * also still be written to by MPI: treat the MPI job as failed (MPI_Abort).
 *
 * disco_comm_destroy of an MPI comm is local (MPI_Comm_free of the duplicate);
 * call it before MPI_Finalize (after it, the duplicate is not freed).
 *
 * Message sizes above INT_MAX bytes per exchange are supported (a chunked
 * point-to-point exchange is chosen at creation when the config allows them).
 *
 * Errors: NULL_POINTER (config or comm NULL), BAD_STRUCT, INVALID_ARGUMENT
 * (bad config field, MPI_COMM_NULL, an inter-communicator, configs differing
 * across ranks), INVALID_USAGE (MPI not initialised or already finalised),
 * EXPERT_DIVISIBILITY, HIDDEN_ALIGNMENT, OUT_OF_MEMORY, REMOTE, TIMEOUT,
 * BACKEND (an MPI call failed; disco_last_error() holds MPI's error string).
 */
DISCO_API disco_result_t disco_comm_create_mpi(MPI_Comm mpi_comm,
                                               const disco_config_t *config,
                                               disco_comm_t **comm);

#ifdef __cplusplus
}
#endif

#endif /* DISCO_MPI_H_ */
