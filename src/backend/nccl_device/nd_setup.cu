/* nccl_device: the only file that includes NCCL's device API (C++ templates),
 * behind extern "C" functions: the device communicator and the peers' window
 * pointers (docs/design-nccl-device.md §2). */
#include <nccl.h>
#include <nccl_device.h>
#include <stdlib.h>
#include <string.h>

#include "backend/nccl_device/nd_backend.h"

/* peer[p] = rank p's window base as mapped on this GPU; our own is the
 * window's local address (`local`), the one our reads use: the LSA pointer
 * of self would be a second virtual mapping of the same memory. */
__global__ void nd_peer_kernel(ncclWindow_t win, const int *lsa_of, int world, int rank,
                               char *local, char **peer) {
  for (int p = threadIdx.x; p < world; p += blockDim.x)
    peer[p] = p == rank       ? local
              : lsa_of[p] < 0 ? NULL
                              : (char *)ncclGetLsaPointer(win, 0, lsa_of[p]);
}

/* Every peer's rank in this rank's LSA team (-1: not load-store accessible);
 * returns how many are. Local: NCCL derives the team from the topology.
 * Test hook: DISCO_ND_HOST_PEERS=<mask> splits the ranks below 64 into two
 * pretend hosts, those in the mask and the others: a peer on the other one
 * is treated as not accessible (both ways, as real hosts are). */
static int nd_lsa_of(ncclComm_t comm, int world, int *lsa_of) {
  ncclTeam_t lsa = ncclTeamLsa(comm), wt = ncclTeamWorld(comm);
  int n = 0, me = 0;
  const char *env = getenv("DISCO_ND_HOST_PEERS");
  const unsigned long long mask = env != NULL ? strtoull(env, NULL, 0) : 0ull;
  if (ncclCommUserRank(comm, &me) != ncclSuccess) me = -1;
  for (int p = 0; p < world; p++) {
    lsa_of[p] = ncclTeamRankIsMember(lsa, wt, p) ? ncclTeamRankToTeam(lsa, wt, p) : -1;
    if (mask != 0ull && p != me && me >= 0 && me < 64 && p < 64 &&
        (((mask >> p) ^ (mask >> me)) & 1ull))
      lsa_of[p] = -1;
    n += lsa_of[p] >= 0;
  }
  return n;
}

extern "C" int disco_nd_lsa_count(ncclComm_t comm, int world) {
  int *lsa_of = (int *)calloc((size_t)(world > 0 ? world : 1), sizeof(int));
  if (lsa_of == NULL) return -1;
  const int n = nd_lsa_of(comm, world, lsa_of);
  free(lsa_of);
  return n;
}

extern "C" ncclResult_t disco_nd_dev_create(ncclComm_t comm, ncclWindow_t win, int world,
                                            int rank, char *local, char **peer,
                                            void **dev_comm) {
  ncclDevComm *dc = (ncclDevComm *)calloc(1, sizeof(ncclDevComm));
  int *lsa_of = (int *)calloc((size_t)world, sizeof(int));
  int *dev_lsa = NULL;
  ncclResult_t r = ncclSuccess;
  *dev_comm = NULL;
  if (dc == NULL || lsa_of == NULL) {
    free(dc);
    free(lsa_of);
    return ncclSystemError;
  }
  ncclDevCommRequirements_t reqs;
#ifdef NCCL_DEV_COMM_REQUIREMENTS_INITIALIZER
  reqs = NCCL_DEV_COMM_REQUIREMENTS_INITIALIZER;
#else
  memset(&reqs, 0, sizeof(reqs));
#endif
  reqs.lsaMultimem = false; /* never multimem / NVLS */
  reqs.lsaBarrierCount = 0; /* our own bounded flags instead (design §5) */
  r = ncclDevCommCreate(comm, &reqs, dc);
  if (r != ncclSuccess) {
    free(dc);
    free(lsa_of);
    return r;
  }
  *dev_comm = dc;
  (void)nd_lsa_of(comm, world, lsa_of); /* peers not in it: peer[] NULL */
  if (cudaMalloc((void **)&dev_lsa, (size_t)world * sizeof(int)) != cudaSuccess ||
      cudaMemcpy(dev_lsa, lsa_of, (size_t)world * sizeof(int), cudaMemcpyHostToDevice) !=
          cudaSuccess) {
    r = ncclUnhandledCudaError;
  } else {
    nd_peer_kernel<<<1, 128>>>(win, dev_lsa, world, rank, local, peer);
    if (cudaGetLastError() != cudaSuccess || cudaDeviceSynchronize() != cudaSuccess)
      r = ncclUnhandledCudaError;
  }
  if (dev_lsa != NULL) cudaFree(dev_lsa);
  free(lsa_of);
  return r;
}

extern "C" ncclResult_t disco_nd_dev_destroy(ncclComm_t comm, void *dev_comm) {
  ncclDevComm *dc = (ncclDevComm *)dev_comm;
  if (dc == NULL) return ncclSuccess;
  ncclResult_t r = ncclDevCommDestroy(comm, dc);
  free(dc);
  return r;
}
