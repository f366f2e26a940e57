/* GPU test world (see gpu_world.h). */
#include "gpu_world.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/dtype.h"

int gw_world_init(gw_world_t *w, int world) {
  memset(w, 0, sizeof(*w));
  w->world = world;
  for (int i = 0; i < world; i++) w->devices[i] = i;
  ncclResult_t r = ncclCommInitAll(w->nccl, world, w->devices);
  if (r != ncclSuccess) {
    fprintf(stderr, "ncclCommInitAll(%d): %s\n", world, ncclGetErrorString(r));
    return -1;
  }
  pthread_barrier_init(&w->barrier, NULL, (unsigned)world);
  return 0;
}

void gw_world_fini(gw_world_t *w) {
  for (int i = 0; i < w->world; i++) ncclCommDestroy(w->nccl[i]);
  pthread_barrier_destroy(&w->barrier);
}

void gw_world_abort(gw_world_t *w) {
  for (int i = 0; i < w->world; i++) {
    cudaSetDevice(w->devices[i]);
    ncclResult_t r = ncclCommAbort(w->nccl[i]);
    if (r != ncclSuccess)
      fprintf(stderr, "ncclCommAbort(rank %d): %s\n", i, ncclGetErrorString(r));
  }
  pthread_barrier_destroy(&w->barrier);
}

typedef struct gw_thread {
  void (*fn)(int, void *);
  void *arg;
  int rank;
  int device;
} gw_thread_t;

static void *gw_thread_main(void *p) {
  gw_thread_t *t = p;
  cudaSetDevice(t->device);
  t->fn(t->rank, t->arg);
  return NULL;
}

void gw_run(gw_world_t *w, void (*fn)(int, void *), void *arg) {
  pthread_t th[64];
  gw_thread_t ctx[64];
  for (int r = 0; r < w->world; r++) {
    ctx[r] = (gw_thread_t){fn, arg, r, w->devices[r]};
    pthread_create(&th[r], NULL, gw_thread_main, &ctx[r]);
  }
  for (int r = 0; r < w->world; r++) pthread_join(th[r], NULL);
}

uint64_t gw_rand(uint64_t *s) { /* splitmix64 */
  uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

static double gw_unit(uint64_t *s) {
  return (double)(gw_rand(s) >> 11) * 0x1.0p-53;
}

void gw_fill(void *buf, int64_t n, disco_dtype_t dtype, uint64_t seed) {
  uint64_t s = seed;
  for (int64_t i = 0; i < n; i++) {
    uint64_t u = gw_rand(&s);
    float f = (float)(gw_unit(&s) * 8.0 - 4.0);
    if ((u & 63) == 0) f = -0.0f;
    if ((u & 63) == 1) f = (float)((int)(u >> 8) % 7 - 3); /* exact small ints */
    if ((u & 1023) == 2) f = 3.0e-5f * (float)((int)(u >> 16) % 5 - 2); /* tiny */
    disco_store_f32(buf, i, f, dtype);
  }
}

int gw_inputs_make(gw_inputs_t *in, const disco_config_t *cfg, int world,
                   const int64_t *T, gw_route_t route, double holes, int weighted,
                   uint64_t seed) {
  const int K = cfg->top_k, E = cfg->num_experts;
  const size_t es = disco_dtype_size(cfg->dtype);
  double *cdf = NULL;
  memset(in, 0, sizeof(*in));
  in->cfg = *cfg;
  in->world = world;
  if (route == GW_ZIPF) {
    cdf = malloc((size_t)E * sizeof(double));
    if (cdf == NULL) return -1;
    double acc = 0;
    for (int e = 0; e < E; e++) cdf[e] = (acc += 1.0 / pow((double)e + 1.0, 1.2));
    for (int e = 0; e < E; e++) cdf[e] /= acc;
  }
  for (int r = 0; r < world; r++) {
    uint64_t s = seed * 1000003ull + (uint64_t)r * 7919ull + 17;
    int64_t n = T[r];
    in->T[r] = n;
    in->x[r] = malloc((size_t)(n > 0 ? n : 1) * (size_t)cfg->hidden * es);
    in->idx[r] = malloc((size_t)(n > 0 ? n : 1) * (size_t)K * 8);
    in->idx32[r] = malloc((size_t)(n > 0 ? n : 1) * (size_t)K * 4);
    in->w[r] = weighted ? malloc((size_t)(n > 0 ? n : 1) * (size_t)K * 4) : NULL;
    if (!in->x[r] || !in->idx[r] || !in->idx32[r] || (weighted && !in->w[r])) {
      free(cdf);
      return -1;
    }
    gw_fill(in->x[r], n * cfg->hidden, cfg->dtype, gw_rand(&s));
    for (int64_t t = 0; t < n; t++) {
      int64_t *row = in->idx[r] + t * K;
      for (int j = 0; j < K; j++) {
        int64_t e = -1;
        if (route == GW_ONE_EXPERT) {
          e = j == 0 ? 0 : -1;
        } else if (gw_unit(&s) >= holes) {
          for (int tries = 0; tries < 64; tries++) {
            double u = gw_unit(&s);
            int64_t c = (int64_t)(u * E);
            if (route == GW_ZIPF) {
              c = 0;
              while (c < E - 1 && cdf[c] < u) c++;
            }
            int dup = 0;
            for (int i = 0; i < j; i++) dup |= row[i] == c;
            if (!dup) {
              e = c;
              break;
            }
          }
        }
        row[j] = e;
        in->idx32[r][t * K + j] = (int32_t)e;
        if (weighted) in->w[r][t * K + j] = (float)(gw_unit(&s) * 0.9 + 0.05);
      }
    }
    in->in[r] = (disco_ref_input_t){n, in->x[r], in->idx[r], in->w[r]};
  }
  free(cdf);
  return 0;
}

void gw_inputs_free(gw_inputs_t *in) {
  for (int r = 0; r < in->world; r++) {
    free(in->x[r]);
    free(in->idx[r]);
    free(in->idx32[r]);
    free(in->w[r]);
  }
  memset(in, 0, sizeof(*in));
}
