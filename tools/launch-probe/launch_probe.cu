/* launch-probe: how long a GPU sits between two back-to-back kernels of one
 * stream, by variant (docs/BENCHMARKS.md, "The gap between kernels").
 *
 * Each kernel stamps %globaltimer when its block 0 starts and when its last
 * block ends (a grid counter); gap = start of call i+1 - end of call i, with
 * the calls queued far ahead of the GPU. Variants: timing events around
 * each call (as disco-bench), the cooperative attribute, dynamic shared
 * memory, a large parameter block, the grid, a kernel with a large body. */
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LP_CALLS 200
#define LP_WARM 20

typedef struct {
  unsigned long long *stamp; /* [LP_CALLS][2] */
  unsigned *done;
  char pad[1024]; /* the "large parameters" variant passes all of it */
} lp_args_t;

static __device__ __forceinline__ unsigned long long lp_now(void) {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

static __device__ __forceinline__ void lp_end(unsigned long long *stamp, unsigned *done) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(done, 1u) == gridDim.x - 1u) {
      stamp[1] = lp_now();
      *done = 0u;
    }
  }
}

__global__ void lp_small(unsigned long long *stamp, unsigned *done, int i) {
  if (blockIdx.x == 0 && threadIdx.x == 0) stamp[2 * i] = lp_now();
  lp_end(stamp + 2 * i, done);
}

__global__ void lp_big_params(lp_args_t a, int i) {
  if (blockIdx.x == 0 && threadIdx.x == 0)
    a.stamp[2 * i] = lp_now() + (a.pad[i & 1023] & 0);
  lp_end(a.stamp + 2 * i, a.done);
}

/* a body of many registers and instructions that never runs (n = 0) */
__global__ void __launch_bounds__(256, 3)
    lp_big_body(unsigned long long *stamp, unsigned *done, int i, const float4 *x,
                float4 *y, int n) {
  if (blockIdx.x == 0 && threadIdx.x == 0) stamp[2 * i] = lp_now();
  float4 a[24];
#pragma unroll
  for (int u = 0; u < 24; u++) a[u] = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int k = 0; k < n; k++) {
#pragma unroll
    for (int u = 0; u < 24; u++) {
      const float4 v = x[(k * 24 + u) * 256 + threadIdx.x];
      a[u].x = a[u].x * v.y + v.x;
      a[u].y = a[u].y * v.z + v.y;
      a[u].z = a[u].z * v.w + v.z;
      a[u].w = a[u].w * v.x + v.w;
    }
  }
  if (n > 0)
#pragma unroll
    for (int u = 0; u < 24; u++) y[u * 256 + threadIdx.x] = a[u];
  lp_end(stamp + 2 * i, done);
}

static int cmp_d(const void *a, const void *b) {
  const double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

static double median(double *v, int n) {
  qsort(v, (size_t)n, sizeof(*v), cmp_d);
  return n > 0 ? v[n / 2] : -1.0;
}

#define CK(x)                                                                \
  do {                                                                       \
    cudaError_t e_ = (x);                                                    \
    if (e_ != cudaSuccess) {                                                 \
      fprintf(stderr, "launch-probe: %s: %s\n", #x, cudaGetErrorString(e_)); \
      return 1;                                                              \
    }                                                                        \
  } while (0)

typedef struct {
  const char *name;
  int kind; /* 0 small, 1 big params, 2 big body */
  int coop, smem, grid_mul, events;
} lp_variant_t;

int main(void) {
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  unsigned long long *stamp = NULL;
  unsigned *done = NULL;
  float4 *buf = NULL;
  cudaStream_t st;
  cudaEvent_t ev[2 * LP_CALLS];
  CK(cudaMalloc((void **)&stamp, 2u * LP_CALLS * 8u));
  CK(cudaMalloc((void **)&done, 4));
  CK(cudaMalloc((void **)&buf, 1u << 20));
  CK(cudaMemset(done, 0, 4));
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  for (int i = 0; i < 2 * LP_CALLS; i++) CK(cudaEventCreate(&ev[i]));
  CK(cudaFuncSetAttribute(lp_small, cudaFuncAttributeMaxDynamicSharedMemorySize, 65536));
  static const lp_variant_t vs[] = {
      {"small, 3/SM grid, events", 0, 0, 0, 3, 1},
      {"small, 3/SM grid, no events", 0, 0, 0, 3, 0},
      {"small, 1/SM grid, events", 0, 0, 0, 1, 1},
      {"small, cooperative, events", 0, 1, 0, 3, 1},
      {"small, 16.6 KB dynamic smem, events", 0, 0, 16640, 3, 1},
      {"small, coop + smem + events", 0, 1, 16640, 3, 1},
      {"1 KB params, events", 1, 0, 0, 3, 1},
      {"big body (launch_bounds 256,3), coop, events", 2, 1, 0, 3, 1},
      {"small, 3/SM grid, events (again)", 0, 0, 0, 3, 1},
  };
  printf("# launch-probe: %d SMs; medians over %d back-to-back calls (us)\n", sms,
         LP_CALLS);
  printf("%-48s %8s %8s %8s\n", "variant", "gap", "kernel", "event");
  for (size_t v = 0; v < sizeof(vs) / sizeof(vs[0]); v++) {
    const lp_variant_t *V = &vs[v];
    const int grid = V->grid_mul * sms;
    lp_args_t big;
    memset(&big, 0, sizeof(big));
    big.stamp = stamp;
    big.done = done;
    CK(cudaMemset(stamp, 0, 2u * LP_CALLS * 8u));
    CK(cudaStreamSynchronize(st));
    for (int i = -LP_WARM; i < LP_CALLS; i++) {
      const int j = i < 0 ? 0 : i;
      int n0 = 0;
      const float4 *bx = buf;
      float4 *by = buf;
      void *a_small[] = {&stamp, &done, (void *)&j};
      void *a_big[] = {&big, (void *)&j};
      void *a_body[] = {&stamp, &done, (void *)&j, &bx, &by, &n0};
      cudaLaunchConfig_t cfg = {};
      cudaLaunchAttribute attr[1] = {};
      cfg.gridDim = dim3((unsigned)grid, 1, 1);
      cfg.blockDim = dim3(256, 1, 1);
      cfg.dynamicSmemBytes = (size_t)V->smem;
      cfg.stream = st;
      attr[0].id = cudaLaunchAttributeCooperative;
      attr[0].val.cooperative = 1;
      cfg.attrs = attr;
      cfg.numAttrs = V->coop ? 1 : 0;
      if (i >= 0 && V->events) CK(cudaEventRecord(ev[2 * i], st));
      const void *fn = V->kind == 0   ? (const void *)lp_small
                       : V->kind == 1 ? (const void *)lp_big_params
                                      : (const void *)lp_big_body;
      CK(cudaLaunchKernelExC(&cfg, fn,
                             V->kind == 0   ? a_small
                             : V->kind == 1 ? a_big
                                            : a_body));
      if (i >= 0 && V->events) CK(cudaEventRecord(ev[2 * i + 1], st));
    }
    CK(cudaStreamSynchronize(st));
    unsigned long long h[2 * LP_CALLS];
    CK(cudaMemcpy(h, stamp, sizeof(h), cudaMemcpyDeviceToHost));
    double gap[LP_CALLS], ker[LP_CALLS], evs[LP_CALLS];
    int ng = 0, nk = 0, ne = 0;
    for (int i = 0; i < LP_CALLS; i++) {
      if (h[2 * i + 1] >= h[2 * i]) ker[nk++] = (double)(h[2 * i + 1] - h[2 * i]) / 1e3;
      if (i > 0 && h[2 * i] >= h[2 * i - 1])
        gap[ng++] = (double)(h[2 * i] - h[2 * i - 1]) / 1e3;
      float ms = 0.f;
      if (V->events && cudaEventElapsedTime(&ms, ev[2 * i], ev[2 * i + 1]) == cudaSuccess)
        evs[ne++] = (double)ms * 1e3;
    }
    printf("%-48s %8.2f %8.2f %8.2f\n", V->name, median(gap, ng), median(ker, nk),
           ne > 0 ? median(evs, ne) : -1.0);
  }
  return 0;
}
