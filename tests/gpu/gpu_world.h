/* GPU test world: one thread per GPU, NCCL comms from ncclCommInitAll, and
 * deterministic whole-world inputs for the host reference. */
#ifndef DISCO_TESTS_GPU_WORLD_H_
#define DISCO_TESTS_GPU_WORLD_H_

#include <cuda_runtime.h>
#include <nccl.h>
#include <pthread.h>
#include <stdint.h>

#include "disco.h"
#include "ref/ref.h"

typedef enum gw_route { GW_UNIFORM, GW_ZIPF, GW_ONE_EXPERT } gw_route_t;

typedef struct gw_world {
  int world;
  int devices[64];
  ncclComm_t nccl[64];
  pthread_barrier_t barrier;
} gw_world_t;

/* Whole-world inputs of one round (host memory). */
typedef struct gw_inputs {
  disco_config_t cfg;
  int world;
  int64_t T[64];
  void *x[64];
  int64_t *idx[64];
  int32_t *idx32[64];
  float *w[64]; /* NULL entries when unweighted */
  disco_ref_input_t in[64];
} gw_inputs_t;

int gw_world_init(gw_world_t *w, int world);
void gw_world_fini(gw_world_t *w);
/* Like gw_world_fini, but ncclCommAbort()s the comms (for a world whose
 * collectives may be stuck, e.g. after a disco TIMEOUT). */
void gw_world_abort(gw_world_t *w);
/* Runs fn(rank, arg) on one thread per rank; returns when all are done. */
void gw_run(gw_world_t *w, void (*fn)(int, void *), void *arg);

uint64_t gw_rand(uint64_t *s);
/* Fills `in` for every rank; holes: fraction of -1 slots (uniform/zipf). */
int gw_inputs_make(gw_inputs_t *in, const disco_config_t *cfg, int world,
                   const int64_t *T, gw_route_t route, double holes, int weighted,
                   uint64_t seed);
void gw_inputs_free(gw_inputs_t *in);
/* Random row data of `dtype` (with some -0.0 and exact small values). */
void gw_fill(void *buf, int64_t n, disco_dtype_t dtype, uint64_t seed);

#endif /* DISCO_TESTS_GPU_WORLD_H_ */
