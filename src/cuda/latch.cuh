/* Internal: device-side error latch (nccl_device backend). First error wins:
 * a record is written only while its code word is 0; the host reads the
 * details, then clears the code word (disco_comm_check). */
#ifndef DISCO_CUDA_LATCH_CUH_
#define DISCO_CUDA_LATCH_CUH_

#include "cuda/kernels.h"

__device__ __forceinline__ void disco_latch(unsigned long long *rec, long long code,
                                            long long rank, long long call, long long a,
                                            long long b, long long c, long long d) {
  volatile unsigned long long *v = rec;
  if (rec == NULL || v[DISCO_LATCH_CODE] != 0ull) return;
  v[DISCO_LATCH_RANK] = (unsigned long long)rank;
  v[DISCO_LATCH_CALL] = (unsigned long long)call;
  v[DISCO_LATCH_A] = (unsigned long long)a;
  v[DISCO_LATCH_B] = (unsigned long long)b;
  v[DISCO_LATCH_C] = (unsigned long long)c;
  v[DISCO_LATCH_D] = (unsigned long long)d;
  __threadfence_system(); /* details before the code word */
  v[DISCO_LATCH_CODE] = (unsigned long long)code;
  __threadfence_system();
}

#endif /* DISCO_CUDA_LATCH_CUH_ */
