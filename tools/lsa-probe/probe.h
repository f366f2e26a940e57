/* lsa-probe: C interface of the CUDA side (probe.cu). nccl_device.h is C++, so the
 * device communicator stays behind the opaque lp_dev_t. */
#ifndef LSA_PROBE_PROBE_H
#define LSA_PROBE_PROBE_H

#include <cuda_runtime_api.h>
#include <nccl.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LP_MAXW 8    /* most ranks */
#define LP_MAXB 1024 /* most blocks of the push kernel */

/* Window layout (bytes from the start of every rank's symmetric buffer). */
#define LP_OFF_PING 0            /* u64: rank 0 -> peer */
#define LP_OFF_PONG 64           /* u64[LP_MAXW]: peer p -> rank 0, at LP_OFF_PONG + 8p */
#define LP_OFF_A2A 4096          /* u64[LP_MAXW src][LP_MAXB block]: push flags */
#define LP_OFF_DATA (256 * 1024) /* [W src][bytes_per_peer] push slots */

/* Device error word: 0 = fine, else LP_ERR_TIMEOUT | peer << 8 | phase << 16 |
 * rank << 24, with the sequence number awaited in the upper 32 bits. */
#define LP_ERR_TIMEOUT 1u
#define LP_PHASE_PING 1u
#define LP_PHASE_PONG 2u
#define LP_PHASE_PUSH 3u

/* Modes of the push kernel. */
#define LP_MODE_FLAGS 0   /* own release/acquire flags, bounded waits */
#define LP_MODE_NCCLBAR 1 /* ncclLsaBarrierSession<ncclCoopCta>::sync (unbounded) */

typedef struct lp_dev lp_dev_t;

typedef struct {
  int rank, nranks;                        /* ncclDevComm rank, nRanks */
  int lsa_rank, lsa_size;                  /* ncclDevComm lsaRank, lsaSize */
  int team_nranks, team_rank, team_stride; /* ncclTeamLsa(comm) */
  int lsa_of[LP_MAXW];                     /* world rank -> LSA index, -1 if not LSA */
} lp_info_t;

typedef struct {
  int world, rank;
  int lsa_of[LP_MAXW];
  unsigned long long timeout_ns;
  unsigned long long *err; /* device word */
  unsigned long long *seq; /* device counters: [LP_MAXB] push blocks, [LP_MAXW] ping */
  unsigned long long *bad; /* device [2]: mismatches, first bad 16-byte index */
} lp_args_t;

/* Collective: ncclDevCommCreate with lsaBarrierCount = nbarriers, nothing else. */
ncclResult_t lp_dev_create(ncclComm_t comm, ncclWindow_t win, int nbarriers,
                           lp_dev_t **out, lp_info_t *info);
/* 0 if built with -DLP_COMPAT (no LSA barrier variant, no team helpers). */
int lp_have_ncclbar(void);
/* Collective: ncclDevCommDestroy. */
ncclResult_t lp_dev_destroy(ncclComm_t comm, lp_dev_t *d);

/* One thread on rank 0 and on `peer`: `iters` round trips. Rank 0 writes each
 * round trip's clock64 cycles to cycles[i] and {ns, cycles} of the whole loop to
 * total[0..1]. */
cudaError_t lp_launch_pingpong(const lp_dev_t *d, const lp_args_t *a, int peer, int iters,
                               unsigned long long *cycles, unsigned long long *total,
                               cudaStream_t st);
/* Push send[dst][bytes_per_peer] into every rank's slot `rank`, then signal and wait.
 * check != 0: after the wait each block verifies the range it waited for. */
cudaError_t lp_launch_push(const lp_dev_t *d, const lp_args_t *a, const void *send,
                           size_t bytes_per_peer, int nblocks, int nthreads, int mode,
                           int check, cudaStream_t st);
/* send[dst][bytes_per_peer] = pattern(src = a->rank, dst, offset). */
cudaError_t lp_launch_fill(const lp_args_t *a, void *send, size_t bytes_per_peer,
                           cudaStream_t st);
/* Count bytes of recv[src][bytes_per_peer] that differ from pattern(src, rank, offset)
 * into a->bad. */
cudaError_t lp_launch_verify(const lp_args_t *a, const void *recv, size_t bytes_per_peer,
                             cudaStream_t st);

#ifdef __cplusplus
}
#endif
#endif
