/* disco-bench: the LSA push ceiling (--lsa). The same per-peer bytes as the
 * plain NCCL exchange, stored by SM threads straight into the peers'
 * symmetric NCCL windows (16-byte stores through ncclGetLsaPointer), one
 * flag per source after one fence, bounded waits: what NVLink gives a
 * device-initiated all-to-all of exactly those bytes, measured in the same
 * run as disco's calls (issue 6). C interface of lsa_push.cu. */
#ifndef DISCO_BENCH_LSA_PUSH_H_
#define DISCO_BENCH_LSA_PUSH_H_

#include <cuda_runtime_api.h>
#include <nccl.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define BENCH_LSA_MAX_WORLD 64

typedef struct bench_lsa bench_lsa_t;

/* Collective over comm (every rank, same slot_bytes): a window of `world`
 * slots of slot_bytes. Returns 0, 1 when the push is not possible here (a
 * peer outside the NVLink domain, or more than BENCH_LSA_MAX_WORLD ranks:
 * every rank returns 1 alike, nothing collective done), or -1 on a CUDA or
 * NCCL error (message in err). */
int bench_lsa_create(ncclComm_t comm, int world, int rank, size_t slot_bytes,
                     unsigned long long timeout_ns, bench_lsa_t **out, char *err,
                     size_t errlen);
/* Collective: deregisters and frees the window. */
void bench_lsa_destroy(ncclComm_t comm, bench_lsa_t *l);
/* Enqueues one push of send_bytes[p] (packed in peer order in sbuf) into
 * slot `rank` of every rank p's window, then waits on the device for every
 * peer's flag of this call (at most timeout_ns). Capturable. */
cudaError_t bench_lsa_push(bench_lsa_t *l, const size_t *send_bytes, const void *sbuf,
                           cudaStream_t st);
/* 0, or the peer whose flag did not come (+1 so that peer 0 is not 0), after
 * syncing the stream. */
int bench_lsa_failed(bench_lsa_t *l, cudaStream_t st);

#ifdef __cplusplus
}
#endif

#endif /* DISCO_BENCH_LSA_PUSH_H_ */
