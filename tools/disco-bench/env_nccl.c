/* disco-bench: the nccl and nccl_device backends: device buffers, cudaEvent
 * timing, NCCL communicators (one thread per GPU with ncclCommInitAll, or one
 * process per GPU under MPI; both backends run over the same ones) and the
 * plain-NCCL baseline. Built only with DISCO_HAVE_NCCL. */
#include <cuda_runtime.h>
#include <nccl.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"
#include "disco_nccl.h"
#ifdef DISCO_BENCH_LSA
#include "lsa_push.h"
#endif

#ifdef DISCO_HAVE_MPI
#include <mpi.h>
#endif

typedef struct cuda_dev {
  int device;
  ncclComm_t nccl;
  cudaStream_t stream;
  int n_ev;
  cudaEvent_t *ev_begin, *ev_end;
  /* DISCO_BENCH_PLAIN_REGISTERED=1: the plain baseline moves its bytes
   * between buffers from ncclMemAlloc registered with ncclCommRegister
   * (NCCL's zero-copy path) instead of the case's cudaMalloc ones. */
  void *reg_buf[2], *reg_handle[2];
  size_t reg_bytes[2];
#ifdef DISCO_BENCH_LSA
  bench_lsa_t *lsa; /* --lsa: the push's window, made at first use */
  int lsa_off;      /* 1: not possible on this communicator */
#endif
} cuda_dev_t;

#define CUDA_OK(c, call)                                                           \
  do {                                                                             \
    cudaError_t e_ = (call);                                                       \
    if (e_ != cudaSuccess) fail_msg((c), "%s: %s", #call, cudaGetErrorString(e_)); \
  } while (0)

#define NCCL_OK(c, call)                                                           \
  do {                                                                             \
    ncclResult_t r_ = (call);                                                      \
    if (r_ != ncclSuccess) fail_msg((c), "%s: %s", #call, ncclGetErrorString(r_)); \
  } while (0)

int nccl_device_count(void) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

static void *cuda_alloc(rank_ctx_t *c, size_t bytes) {
  void *p = NULL;
  cudaError_t e = cudaMalloc(&p, bytes ? bytes : 256);
  if (e != cudaSuccess) fail_msg(c, "cudaMalloc(%zu): %s", bytes, cudaGetErrorString(e));
  return p;
}

static void cuda_free(rank_ctx_t *c, void *p) {
  (void)c;
  cudaFree(p);
}

static void cuda_h2d(rank_ctx_t *c, void *dst, const void *src, size_t n) {
  if (n) CUDA_OK(c, cudaMemcpy(dst, src, n, cudaMemcpyHostToDevice));
}

static void cuda_d2h(rank_ctx_t *c, void *dst, const void *src, size_t n) {
  cuda_dev_t *cd = c->dstate;
  CUDA_OK(c, cudaStreamSynchronize(cd->stream));
  if (n) CUDA_OK(c, cudaMemcpy(dst, src, n, cudaMemcpyDeviceToHost));
}

static void cuda_sync(rank_ctx_t *c) {
  cuda_dev_t *cd = c->dstate;
  CUDA_OK(c, cudaStreamSynchronize(cd->stream));
}

static void cuda_timer_begin(rank_ctx_t *c, int i) {
  cuda_dev_t *cd = c->dstate;
  CUDA_OK(c, cudaEventRecord(cd->ev_begin[i], cd->stream));
}

static void cuda_timer_end(rank_ctx_t *c, int i) {
  cuda_dev_t *cd = c->dstate;
  CUDA_OK(c, cudaEventRecord(cd->ev_end[i], cd->stream));
}

static void cuda_timer_read(rank_ctx_t *c, int n, double *us) {
  cuda_dev_t *cd = c->dstate;
  for (int i = 0; i < n; i++) {
    float ms = 0.0f;
    CUDA_OK(c, cudaEventSynchronize(cd->ev_end[i]));
    CUDA_OK(c, cudaEventElapsedTime(&ms, cd->ev_begin[i], cd->ev_end[i]));
    us[i] = (double)ms * 1e3;
  }
}

static disco_result_t cuda_comm_create(rank_ctx_t *c, const disco_config_t *cfg,
                                       disco_comm_t **comm) {
  cuda_dev_t *cd = c->dstate;
  if (c->backend == BACKEND_NCCL_DEVICE)
    return disco_comm_create_nccl_device(cd->nccl, cfg, comm);
  return disco_comm_create_nccl(cd->nccl, cfg, comm);
}

static void cuda_comm_destroy(rank_ctx_t *c, disco_comm_t *comm) {
  cuda_sync(c);
  c->g->barrier(c);
  disco_comm_destroy(comm);
  c->g->barrier(c);
}

/* Registered buffer i of at least `bytes` (DISCO_BENCH_PLAIN_REGISTERED). */
static void *cuda_reg_buf(rank_ctx_t *c, int i, size_t bytes) {
  cuda_dev_t *cd = c->dstate;
  if (bytes <= cd->reg_bytes[i]) return cd->reg_buf[i];
  if (cd->reg_buf[i] != NULL) {
    CUDA_OK(c, cudaStreamSynchronize(cd->stream));
    NCCL_OK(c, ncclCommDeregister(cd->nccl, cd->reg_handle[i]));
    NCCL_OK(c, ncclMemFree(cd->reg_buf[i]));
  }
  cd->reg_buf[i] = NULL;
  cd->reg_bytes[i] = 0;
  NCCL_OK(c, ncclMemAlloc(&cd->reg_buf[i], bytes));
  NCCL_OK(c, ncclCommRegister(cd->nccl, cd->reg_buf[i], bytes, &cd->reg_handle[i]));
  cd->reg_bytes[i] = bytes;
  return cd->reg_buf[i];
}

static void cuda_plain(rank_ctx_t *c, const size_t *send_bytes, const void *sbuf,
                       const size_t *recv_bytes, void *rbuf) {
  cuda_dev_t *cd = c->dstate;
  size_t so = 0, ro = 0;
  const char *reg = getenv("DISCO_BENCH_PLAIN_REGISTERED");
  if (reg != NULL && reg[0] == '1') {
    size_t st = 256, rt = 256;
    for (int p = 0; p < c->world; p++) st += send_bytes[p], rt += recv_bytes[p];
    sbuf = cuda_reg_buf(c, 0, st);
    rbuf = cuda_reg_buf(c, 1, rt);
  }
  NCCL_OK(c, ncclGroupStart());
  for (int p = 0; p < c->world; p++) {
    if (send_bytes[p])
      NCCL_OK(c, ncclSend((const char *)sbuf + so, send_bytes[p], ncclChar, p, cd->nccl,
                          cd->stream));
    if (recv_bytes[p])
      NCCL_OK(c, ncclRecv((char *)rbuf + ro, recv_bytes[p], ncclChar, p, cd->nccl,
                          cd->stream));
    so += send_bytes[p];
    ro += recv_bytes[p];
  }
  NCCL_OK(c, ncclGroupEnd());
}

#ifdef DISCO_BENCH_LSA
/* Slot bytes every rank computes alike from the options: a peer sends at
 * most its tokens' rows to one destination, 4 bytes an element at most
 * (the fp32 combine wire). */
static size_t lsa_slot_bytes(const options_t *o) {
  int64_t t = 1, h = 1;
  for (int i = 0; i < o->n_tokens; i++)
    if (o->tokens[i] > t) t = o->tokens[i];
  for (int i = 0; i < o->n_hidden; i++)
    if (o->hidden[i] > h) h = o->hidden[i];
  return (size_t)t * (size_t)h * 4u;
}

/* Bound of the push's flag waits: the run's --timeout-ms, else 10 s. */
static int lsa_timeout_ms(const options_t *o) {
  return o->timeout_ms > 0 ? o->timeout_ms : 10000;
}

static int cuda_lsa(rank_ctx_t *c, const size_t *send_bytes, const void *sbuf) {
  cuda_dev_t *cd = c->dstate;
  if (cd->lsa_off) return 1;
  if (cd->lsa == NULL) { /* collective: every rank gets here in the same case */
    char err[256] = "";
    const int rc =
        bench_lsa_create(cd->nccl, c->world, c->rank, lsa_slot_bytes(c->opt),
                         (unsigned long long)lsa_timeout_ms(c->opt) * 1000000ull,
                         &cd->lsa, err, sizeof(err));
    if (rc < 0) fail_msg(c, "--lsa: %s", err);
    if (rc > 0) {
      cd->lsa_off = 1;
      return 1;
    }
  }
  CUDA_OK(c, bench_lsa_push(cd->lsa, send_bytes, sbuf, cd->stream));
  return 0;
}

static void cuda_lsa_check(rank_ctx_t *c) {
  cuda_dev_t *cd = c->dstate;
  if (cd->lsa == NULL) return;
  const int q = bench_lsa_failed(cd->lsa, cd->stream);
  if (q < 0) fail_msg(c, "--lsa: reading the push's state failed");
  if (q > 0)
    fail_msg(c, "--lsa: peer %d's flag did not arrive within %d ms", q - 1,
             lsa_timeout_ms(c->opt));
}
#endif

static void *cuda_graph_capture(rank_ctx_t *c, op_fn fn, void *arg) {
  cuda_dev_t *cd = c->dstate;
  cudaGraph_t g = NULL;
  cudaGraphExec_t ge = NULL;
  CUDA_OK(c, cudaStreamBeginCapture(cd->stream, cudaStreamCaptureModeThreadLocal));
  const disco_result_t rc = fn(c, arg);
  CUDA_OK(c, cudaStreamEndCapture(cd->stream, &g));
  if (rc != DISCO_SUCCESS) fail_disco(c, "the captured call", rc, NULL);
  CUDA_OK(c, cudaGraphInstantiate(&ge, g, 0));
  CUDA_OK(c, cudaGraphDestroy(g));
  return ge;
}

static void cuda_graph_launch(rank_ctx_t *c, void *graph) {
  cuda_dev_t *cd = c->dstate;
  CUDA_OK(c, cudaGraphLaunch((cudaGraphExec_t)graph, cd->stream));
}

static void cuda_graph_free(rank_ctx_t *c, void *graph) {
  CUDA_OK(c, cudaGraphExecDestroy((cudaGraphExec_t)graph));
}

static const dev_ops_t cuda_dev_ops = {
    "cuda",
    1,
    cuda_alloc,
    cuda_free,
    cuda_h2d,
    cuda_d2h,
    cuda_sync,
    cuda_timer_begin,
    cuda_timer_end,
    cuda_timer_read,
    cuda_comm_create,
    cuda_comm_destroy,
    cuda_plain,
    cuda_graph_capture,
    cuda_graph_launch,
    cuda_graph_free,
#ifdef DISCO_BENCH_LSA
    cuda_lsa,
    cuda_lsa_check,
#else
    NULL,
    NULL,
#endif
};

/* Per-rank device state; the NCCL communicator already exists. */
static int cuda_rank_init(rank_ctx_t *c, int device, ncclComm_t nccl) {
  cuda_dev_t *cd = calloc(1, sizeof(*cd));
  if (!cd) return -1;
  c->dstate = cd;
  cd->device = device;
  cd->nccl = nccl;
  cd->n_ev = c->opt->iters;
  if (cudaSetDevice(device) != cudaSuccess) return -1;
  if (cudaStreamCreateWithFlags(&cd->stream, cudaStreamNonBlocking) != cudaSuccess)
    return -1;
  c->stream = cd->stream;
  cd->ev_begin = calloc((size_t)cd->n_ev, sizeof(cudaEvent_t));
  cd->ev_end = calloc((size_t)cd->n_ev, sizeof(cudaEvent_t));
  if (!cd->ev_begin || !cd->ev_end) return -1;
  for (int i = 0; i < cd->n_ev; i++)
    if (cudaEventCreate(&cd->ev_begin[i]) != cudaSuccess ||
        cudaEventCreate(&cd->ev_end[i]) != cudaSuccess)
      return -1;
  return 0;
}

static void cuda_rank_fini(rank_ctx_t *c) {
  cuda_dev_t *cd = c->dstate;
  if (!cd) return;
  for (int i = 0; i < cd->n_ev; i++) {
    if (cd->ev_begin && cd->ev_begin[i]) cudaEventDestroy(cd->ev_begin[i]);
    if (cd->ev_end && cd->ev_end[i]) cudaEventDestroy(cd->ev_end[i]);
  }
  free(cd->ev_begin);
  free(cd->ev_end);
#ifdef DISCO_BENCH_LSA
  if (cd->lsa != NULL) bench_lsa_destroy(cd->nccl, cd->lsa); /* collective */
#endif
  for (int i = 0; i < 2; i++)
    if (cd->reg_buf[i] != NULL) {
      cudaDeviceSynchronize();
      ncclCommDeregister(cd->nccl, cd->reg_handle[i]);
      ncclMemFree(cd->reg_buf[i]);
    }
  if (cd->stream) cudaStreamDestroy(cd->stream);
  free(cd);
  c->dstate = NULL;
  c->stream = NULL;
}

static void fill_machine(int device, int ngpu) {
  struct cudaDeviceProp prop;
  if (cudaGetDeviceProperties(&prop, device) == cudaSuccess)
    snprintf(bench_machine.gpu, sizeof(bench_machine.gpu), "%s", prop.name);
  cudaRuntimeGetVersion(&bench_machine.cuda_runtime);
  cudaDriverGetVersion(&bench_machine.cuda_driver);
  ncclGetVersion(&bench_machine.nccl_version);
  bench_machine.num_gpus = ngpu;
}

/* ---- one thread per GPU ---- */

static int nccl_thread_init(rank_ctx_t *c, void *arg) {
  ncclComm_t *comms = arg;
  return cuda_rank_init(c, c->rank, comms[c->rank]);
}

static void nccl_thread_fini(rank_ctx_t *c, void *arg) {
  (void)arg;
  cuda_rank_fini(c);
}

static int run_nccl_threads(const options_t *opt, int *exit_code) {
  int ngpu = nccl_device_count();
  int world = opt->world ? opt->world : ngpu;
  int *devs = NULL, ret = 1;
  ncclComm_t *comms = NULL;
  ncclResult_t nr;
  if (ngpu < 1) {
    fprintf(stderr, "disco-bench: --backend %s: no CUDA device\n",
            backend_name(opt->backends[0]));
    return 1;
  }
  if (world > ngpu) {
    fprintf(stderr, "disco-bench: --world %d but only %d GPU(s)\n", world, ngpu);
    return BENCH_EXIT_USAGE;
  }
  devs = calloc((size_t)world, sizeof(int));
  comms = calloc((size_t)world, sizeof(ncclComm_t));
  if (!devs || !comms) goto cleanup;
  for (int i = 0; i < world; i++) devs[i] = i;
  fill_machine(0, world);
  nr = ncclCommInitAll(comms, world, devs);
  if (nr != ncclSuccess) {
    fprintf(stderr, "disco-bench: ncclCommInitAll: %s\n", ncclGetErrorString(nr));
    free(comms);
    comms = NULL;
    goto cleanup;
  }
  ret = run_threads(opt, world, &cuda_dev_ops, nccl_thread_init, nccl_thread_fini, comms,
                    exit_code);
  for (int i = 0; i < world; i++) ncclCommDestroy(comms[i]);
cleanup:
  free(comms);
  free(devs);
  return ret;
}

/* ---- one process per GPU under MPI ---- */
#ifdef DISCO_HAVE_MPI
static int run_nccl_mpi(const options_t *opt, int *exit_code) {
  rank_ctx_t c;
  MPI_Comm node = MPI_COMM_NULL;
  ncclUniqueId id;
  ncclComm_t nccl = NULL;
  int local_rank = 0, ngpu = nccl_device_count(), ret = 1;
  world_t wd = {0, NULL};
  memset(&c, 0, sizeof(c));
  MPI_Comm_rank(MPI_COMM_WORLD, &c.rank);
  MPI_Comm_size(MPI_COMM_WORLD, &c.world);
  c.opt = opt;
  c.g = &mpi_group_ops;
  c.d = &cuda_dev_ops;
  if (opt->world && opt->world != c.world) {
    if (c.rank == 0)
      fprintf(stderr, "disco-bench: --world %d differs from the MPI world size %d\n",
              opt->world, c.world);
    return BENCH_EXIT_USAGE;
  }
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, c.rank, MPI_INFO_NULL, &node);
  MPI_Comm_rank(node, &local_rank);
  MPI_Comm_free(&node);
  if (local_rank >= ngpu) fail_msg(&c, "local rank %d but %d GPU(s)", local_rank, ngpu);
  CUDA_OK(&c, cudaSetDevice(local_rank));
  if (c.rank == 0) {
    NCCL_OK(&c, ncclGetUniqueId(&id));
    fill_machine(local_rank, c.world);
  }
  MPI_Bcast(&id, (int)sizeof(id), MPI_BYTE, 0, MPI_COMM_WORLD);
  NCCL_OK(&c, ncclCommInitRank(&nccl, c.world, id, c.rank));
  if (cuda_rank_init(&c, local_rank, nccl) != 0) fail_msg(&c, "CUDA stream/event setup");
  wd.size = c.world;
  wd.slot = calloc((size_t)c.world, sizeof(world_slot_t));
  if (!wd.slot) fail_msg(&c, "out of host memory");
  c.wd = &wd;
  rank_main(&c);
  MPI_Bcast(&c.exit_code, 1, MPI_INT, 0, MPI_COMM_WORLD);
  *exit_code = c.exit_code;
  ret = 0;
  for (int r = 0; r < c.world; r++) world_slot_free(&wd.slot[r]);
  free(wd.slot);
  cuda_rank_fini(&c);
  ncclCommDestroy(nccl);
  return ret;
}
#endif

int run_nccl(const options_t *opt, int use_mpi, int *exit_code) {
#ifdef DISCO_HAVE_MPI
  if (use_mpi) return run_nccl_mpi(opt, exit_code);
#endif
  (void)use_mpi;
  return run_nccl_threads(opt, exit_code);
}
