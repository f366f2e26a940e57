/* nccl_device backend: communicator (symmetric window, device communicator),
 * handles, latched device errors (disco_comm_check), destruction. */
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/nccl/nccl_backend.h"
#include "backend/nccl_device/nd_backend.h"
#include "core/error.h"
#include "disco_nccl.h"

#define ND_ALIGN_UP(n, a) (((n) + (a)-1) / (a) * (a))
/* Small device block: seq[2], fatal, plan (u64), done[4] (u32), sent[2], lay
 * (u64), then peer[W], step[DISCO_ND_STEPS(W)] (u32), 8-aligned, the work counters (u64),
 * then the combine's chunk counters [W][DISCO_ND_CHUNKS(M)] (u32). */
#define ND_SMALL_PEER_OFF 72u

/* Pipelined dispatch from this many tokens on, with this share of the
 * blocks expanding (0: chosen per call by the kernel, nd_pipe.cu;
 * docs/nccl_device.md; env overrides for tuning). */
#define ND_PIPE_MIN_TOKENS 1024
#define ND_EXPAND_PCT 0
/* Small dispatch: row pieces per block in the expand (run 27: 1 against 4
 * took 128 tokens K 8 from 70.0 to 66.0 us, 32 tokens K 8 50.5 -> 47.3) */
#define ND_EXPAND_ITEMS 1
#define ND_PIPE_PARTS 1 /* parts per destination (2: see docs/nccl_device.md) */
/* Pipelined combine (token side folds as chunks land) from this many tokens,
 * with this share of the blocks starting on the token side. */
#define ND_CPIPE_MIN_TOKENS 2048
#define ND_CTOKEN_PCT 25
#define ND_CHUNK_ROWS 512
/* Pipelined dispatch: rows per chunk flag (0: none), sent for a source's
 * rows of at least this many KiB (run 54, 4x H200: 4096 tokens K 8, 52 MB
 * per peer, 593 -> 579 us; 13-15 MB per peer lost 1-4 us) */
#define ND_DCHUNK_ROWS 512
#define ND_DCHUNK_MIN_KB (32 * 1024)
/* Warp-mode expand (many rows from one source): pieces per row. 4 took 4096
 * tokens K 8 from 599 to 592 us with 35% expanders but lost to whole rows
 * with 25% (599 against 585: the expand re-reads each row's metadata per
 * piece and falls behind), H 4096 K 2 E 8 225 against 222 (runs 33-36). */
#define ND_WARP_PIECES 1
/* Combine's expert side: at most this many pieces per row, 0: no cap
 * (nd_combine.cu) */
#define ND_CSEND_PIECES 0
/* Pipelined dispatch, batched expand (a source with few rows per expander):
 * most rows per ticket, tickets sized for every block that may join (run 69:
 * 2 against 4 took 1024 tokens K 8 from 193.6-197.7 to 187.0-187.9 us and
 * 4096 K 1 from 195.7-196.5 to 192.5-192.8; at most ND_XG) */
#define ND_PIPE_XG 2

/* An integer from the environment, or def when unset or below lo. */
static int nd_env_int(const char *name, int def, int lo) {
  const char *v = getenv(name);
  const int n = v != NULL ? atoi(v) : def;
  return n < lo ? def : n;
}

static double nd_now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

static const char *nd_phase(long long phase) {
  switch (phase) {
    case DISCO_ND_PHASE_DACK:
      return "its ack of the previous dispatch";
    case DISCO_ND_PHASE_DFLAG:
      return "its dispatch data";
    case DISCO_ND_PHASE_CACK:
      return "its ack of the previous combine";
    case DISCO_ND_PHASE_CFLAG:
      return "its combine partials";
    case DISCO_ND_PHASE_DCNT:
      return "its dispatch counts";
    case DISCO_ND_PHASE_CSTAT:
      return "its combine status";
    default:
      return "its flag";
  }
}

static const char *nd_call(unsigned long long call) {
  switch ((int)(call >> 32)) {
    case DISCO_CALL_DISPATCH:
      return "disco_dispatch";
    case DISCO_CALL_COMBINE:
      return "disco_combine";
    case DISCO_CALL_LAYOUT:
      return "disco_dispatch_layout";
    default:
      return "disco";
  }
}

/* A latched record (copied) as a disco error with its message. */
static disco_result_t nd_report(const disco_comm_t *comm, const unsigned long long *rec,
                                int fatal) {
  const disco_result_t code = (disco_result_t)rec[DISCO_LATCH_CODE];
  const long long who = (long long)rec[DISCO_LATCH_RANK];
  const long long a = (long long)rec[DISCO_LATCH_A], b = (long long)rec[DISCO_LATCH_B];
  const long long c = (long long)rec[DISCO_LATCH_C], d = (long long)rec[DISCO_LATCH_D];
  const char *fn = nd_call(rec[DISCO_LATCH_CALL]);
  const unsigned long long n = rec[DISCO_LATCH_CALL] & 0xffffffffull;
  const int r = comm->rank;
  if (fatal && a == DISCO_ND_PHASE_DEAD)
    return disco_error(code,
                       "%s (call %llu): rank %d timed out earlier and gave up; seen on "
                       "rank %d. The comm is broken: destroy it and ncclCommAbort the "
                       "NCCL comm",
                       fn, n, (int)who, r);
  if (fatal)
    return disco_error(code,
                       "%s (call %llu): rank %d did not deliver %s within %lld ms; "
                       "seen on rank %d. The comm is broken: destroy it and "
                       "ncclCommAbort the NCCL comm",
                       fn, n, (int)who, nd_phase(a), b, r);
  switch (code) {
    case DISCO_ERR_EXPERT_OUT_OF_RANGE:
      return disco_error(code,
                         "%s (call %llu): topk_idx[%lld][%lld] = %lld outside [-1, %d) "
                         "on rank %d (found on the device)",
                         fn, n, a, b, c, comm->config.num_experts, r);
    case DISCO_ERR_DUPLICATE_EXPERT:
      return disco_error(
          code,
          "%s (call %llu): topk_idx[%lld][%lld] = %lld repeats "
          "topk_idx[%lld][%lld] (same expert twice) on rank %d (found on the "
          "device)",
          fn, n, a, b, c, a, d, r);
    case DISCO_ERR_REMOTE:
      return disco_error(code,
                         "%s (call %llu): rank %d failed this call (%s); nothing "
                         "written (seen on rank %d)",
                         fn, n, (int)who, disco_result_name((disco_result_t)d), r);
    case DISCO_ERR_CAPACITY:
      if (rec[DISCO_LATCH_CALL] >> 32 == DISCO_CALL_COMBINE)
        return disco_error(code,
                           "%s (call %llu): args->y_rows = %lld but the dispatch "
                           "received %lld rows on rank %d",
                           fn, n, a, b, r);
      return disco_error(code,
                         "%s (call %llu): rank %d receives %lld rows but its outputs "
                         "hold %lld (recv_capacity, or recv_x NULL); nothing written",
                         fn, n, r, a, b);
    case DISCO_ERR_INVALID_USAGE:
      return disco_error(code,
                         "%s (call %llu): the handle's dispatch failed on rank %d; "
                         "nothing written",
                         fn, n, r);
    case DISCO_ERR_NULL_POINTER:
      return disco_error(code,
                         "%s (call %llu): args->y is NULL but the dispatch received "
                         "%lld rows on rank %d",
                         fn, n, b, r);
    default:
      return disco_error(code, "%s (call %llu): %s on rank %d", fn, n,
                         disco_result_string(code), r);
  }
}

disco_result_t disco_nd_fatal(disco_comm_t *comm) {
  disco_nd_state_t *st = comm->backend_state;
  volatile unsigned long long *f = st->hrec + DISCO_LATCH_WORDS;
  unsigned long long rec[DISCO_LATCH_WORDS];
  if (f[DISCO_LATCH_CODE] == 0ull) return DISCO_SUCCESS;
  for (int i = 0; i < DISCO_LATCH_WORDS; i++) rec[i] = f[i];
  return nd_report(comm, rec, 1);
}

disco_result_t disco_nd_mark(disco_comm_t *comm, cudaStream_t stream, const char *fn) {
  disco_nd_state_t *st = comm->backend_state;
  enum cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
  disco_result_t rc = disco_nccl_cuda(cudaStreamIsCapturing(stream, &cs), fn,
                                      "cudaStreamIsCapturing", comm->rank);
  if (rc != DISCO_SUCCESS || cs != cudaStreamCaptureStatusNone) return rc;
  rc = disco_nccl_cuda(cudaEventRecord(st->last, stream), fn, "cudaEventRecord",
                       comm->rank);
  if (rc == DISCO_SUCCESS) st->last_valid = 1;
  return rc;
}

/* Device waits are bounded by timeout_ms each and a call has several in a
 * row (the pipelined dispatch: acks, counts, then one per source and part:
 * 2 + H (W - 1)); the host allows for that before it calls the device stuck,
 * so that slow but live peers are not reported as a timeout. (The pipelined
 * combine and a chunked last source of the dispatch wait per chunk: peers
 * slower than that can still exceed it.) */
disco_result_t disco_nd_wait_last(disco_comm_t *comm, const char *fn) {
  disco_nd_state_t *st = comm->backend_state;
  if (!st->last_valid) return DISCO_SUCCESS;
  const double limit_ms =
      ((comm->world_size - 1.0) * st->nd.dparts + 3.0) * comm->timeout_ms + 1000.0;
  const double deadline = nd_now_ms() + limit_ms;
  for (unsigned it = 0;; it++) {
    cudaError_t e = cudaEventQuery(st->last);
    if (e == cudaSuccess) return DISCO_SUCCESS;
    if (e != cudaErrorNotReady)
      return disco_nccl_cuda(e, fn, "cudaEventQuery", comm->rank);
    if (nd_now_ms() > deadline)
      return disco_error(DISCO_ERR_TIMEOUT,
                         "%s: the device work of the last call did not finish within %d "
                         "ms on rank %d",
                         fn, (int)limit_ms, comm->rank);
    if ((it & 1023u) == 1023u) sched_yield();
  }
}

static disco_result_t nd_check(disco_comm_t *comm, int wait) {
  static const char fn[] = "disco_comm_check";
  disco_nd_state_t *st = comm->backend_state;
  disco_result_t rc =
      disco_nccl_cuda(cudaSetDevice(st->device), fn, "cudaSetDevice", comm->rank);
  if (rc != DISCO_SUCCESS) return rc;
  if (wait) {
    rc = disco_nd_wait_last(comm, fn);
    if (rc != DISCO_SUCCESS) return rc;
  }
  rc = disco_nd_fatal(comm);
  if (rc != DISCO_SUCCESS) return rc;
  volatile unsigned long long *l = st->hrec;
  unsigned long long rec[DISCO_LATCH_WORDS];
  if (l[DISCO_LATCH_CODE] == 0ull) return DISCO_SUCCESS;
  /* Details first; the device writes none while the code word is set. */
  for (int i = 1; i < DISCO_LATCH_WORDS; i++) rec[i] = l[i];
  rec[DISCO_LATCH_CODE] = __atomic_exchange_n(
      (unsigned long long *)&st->hrec[DISCO_LATCH_CODE], 0ull, __ATOMIC_SEQ_CST);
  return nd_report(comm, rec, 0);
}

/* ---- handles ------------------------------------------------------------------ */
static void nd_handle_fini(disco_comm_t *comm, disco_handle_t *handle) {
  disco_nd_plan_t *pl = handle->backend_plan;
  (void)comm;
  if (pl == NULL) return;
  cudaFree(pl->dev_mem);
  cudaFreeHost(pl->host_msg);
  free(pl->rows);
  free(pl);
  handle->backend_plan = NULL;
}

static disco_result_t nd_handle_init(disco_comm_t *comm, disco_handle_t *handle) {
  static const char fn[] = "disco_handle_create";
  disco_nd_state_t *st = comm->backend_state;
  disco_result_t rc;
  disco_nd_plan_t *pl = calloc(1, sizeof(*pl));
  if (pl == NULL)
    return disco_error(DISCO_ERR_OUT_OF_MEMORY, "%s: out of memory on rank %d", fn,
                       comm->rank);
  handle->backend_plan = pl;
  pl->rows = calloc(2u * (size_t)comm->world_size, sizeof(int64_t));
  if (pl->rows == NULL) {
    rc = disco_error(DISCO_ERR_OUT_OF_MEMORY, "%s: out of memory on rank %d", fn,
                     comm->rank);
    goto fail;
  }
  rc = disco_nccl_cuda(cudaSetDevice(st->device), fn, "cudaSetDevice", comm->rank);
  if (rc != DISCO_SUCCESS) goto fail;
  size_t bytes = disco_nccl_plan_carve(&st->kp, &pl->dev, NULL);
  rc = disco_nccl_cuda(cudaMalloc(&pl->dev_mem, bytes), fn, "cudaMalloc(plan)",
                       comm->rank);
  if (rc != DISCO_SUCCESS) goto fail;
  disco_nccl_plan_carve(&st->kp, &pl->dev, pl->dev_mem);
  /* go = 0 until a dispatch succeeds: a combine before that writes nothing. */
  rc = disco_nccl_cuda(cudaMemset(pl->dev_mem, 0, bytes), fn, "cudaMemset(plan)",
                       comm->rank);
  if (rc != DISCO_SUCCESS) goto fail;
  rc = disco_nccl_cuda(
      cudaMallocHost((void **)&pl->host_msg,
                     2u * (size_t)comm->world_size * (size_t)st->kp.msg_len * 8u),
      fn, "cudaMallocHost(counts)", comm->rank);
  if (rc != DISCO_SUCCESS) goto fail;
  return DISCO_SUCCESS;
fail:
  nd_handle_fini(comm, handle);
  return rc;
}

/* ---- comm ----------------------------------------------------------------------- */
static void nd_destroy(disco_comm_t *comm) {
  disco_nd_state_t *st = comm->backend_state;
  if (st == NULL) return;
  cudaSetDevice(st->device);
  /* Collective teardown only when every device wait ended normally: after a
   * TIMEOUT a peer may be gone, and NCCL's calls could wait for it. */
  int healthy = disco_nd_wait_last(comm, "disco_comm_destroy") == DISCO_SUCCESS &&
                st->hrec != NULL &&
                st->hrec[DISCO_LATCH_WORDS + DISCO_LATCH_CODE] == 0ull;
  if (healthy && st->nd.trace != NULL) disco_nd_trace_report(st, comm->rank);
  if (healthy) {
    if (st->dev_comm != NULL) disco_nd_dev_destroy(st->nccl, st->dev_comm);
    if (st->win_registered) ncclCommWindowDeregister(st->nccl, st->win);
    if (st->win_mem != NULL) ncclMemFree(st->win_mem);
  } /* else the window stays with the NCCL comm (the caller aborts it) */
  disco_nd_links_free(st);
  cudaFree(st->kp.blk_cnt);
  cudaFree(st->kp.err_key);
  cudaFree(st->small);
  cudaFree(st->nd.trace);
  if (st->hrec != NULL) cudaFreeHost(st->hrec);
  if (st->last != NULL) cudaEventDestroy(st->last);
  free(st);
  comm->backend_state = NULL;
}

/* One table per capability set; a comm with peers on other hosts
 * (nd_hybrid.c) makes the same calls, which then read the remote row counts
 * on the host and cannot be captured. */
#define ND_OPS(caps_)                                                              \
  {                                                                                \
    .name = "nccl_device", .device_memory = 1, .dispatch = disco_nd_dispatch,      \
    .combine = disco_nd_combine, .dispatch_abort = disco_nd_dispatch_abort,        \
    .handle_init = nd_handle_init, .handle_fini = nd_handle_fini, .caps = (caps_), \
    .full_rounds = 1, .check = nd_check, .combine_abort = disco_nd_combine_abort,  \
    .destroy = nd_destroy,                                                         \
  }
static const disco_backend_ops_t disco_nd_ops =
    ND_OPS(DISCO_CAP_NO_HOST_SYNC | DISCO_CAP_GRAPH);
static const disco_backend_ops_t disco_nd_hybrid_ops = ND_OPS(0u);
#undef ND_OPS

/* Local resources (no collective call). */
static disco_result_t nd_setup(disco_comm_t *comm, const char *fn) {
  disco_nd_state_t *st = comm->backend_state;
  disco_kparams_t *p = &st->kp;
  const disco_config_t *c = &comm->config;
  const int W = comm->world_size, r = comm->rank;
  int sms = 1;
  int version = 0;
  disco_result_t rc = disco_nccl_nccl(ncclGetVersion(&version), fn, "ncclGetVersion", r);
  if (rc != DISCO_SUCCESS) return rc;
  if (version != NCCL_VERSION_CODE)
    return disco_error(DISCO_ERR_NOT_SUPPORTED,
                       "%s: libnccl is version %d but disco was built against nccl.h %d; "
                       "the device API needs both the same (rank %d)",
                       fn, version, NCCL_VERSION_CODE, r);
  rc = disco_nccl_params(comm, st->device, p, fn);
  if (rc != DISCO_SUCCESS) return rc;
  const int wire32 =
      c->combine_wire == DISCO_COMBINE_WIRE_FP32 && c->dtype != DISCO_DTYPE_FP32;
  const int part_vecs = wire32 ? p->row_vecs * 2 : p->row_vecs;
  st->win_bytes = (size_t)disco_nd_window_layout(p, part_vecs, &st->nd);
  rc = disco_nccl_cuda(
      disco_nd_max_grid(p, c->max_sms, &st->nd.max_grid, &sms, &st->nd.fuse_smem), fn,
      "cudaOccupancyMaxActiveBlocksPerMultiprocessor", r);
  if (rc != DISCO_SUCCESS) return rc;
  const size_t tpb = 32u * (size_t)p->layout_warps;
  const size_t bmax = c->max_tokens == 0 ? 1 : ((size_t)c->max_tokens + tpb - 1) / tpb;
  rc = disco_nccl_cuda(cudaMalloc((void **)&p->blk_cnt, bmax * (size_t)p->num_cols * 4u),
                       fn, "cudaMalloc(block counts)", r);
  if (rc == DISCO_SUCCESS)
    rc = disco_nccl_cuda(cudaMalloc((void **)&p->err_key, 16u), fn, "cudaMalloc", r);
  if (rc == DISCO_SUCCESS)
    rc = disco_nccl_cuda(cudaMemset(p->err_key, 0xff, 8u), fn, "cudaMemset", r);
  if (rc != DISCO_SUCCESS) return rc;
  p->blk_done = (unsigned *)(p->err_key + 1);
  const size_t ctr_off = ND_ALIGN_UP(
      ND_SMALL_PEER_OFF + (size_t)W * sizeof(char *) + (size_t)DISCO_ND_STEPS(W) * 4u,
      8u);
  const size_t cdone_off = ctr_off + (size_t)DISCO_ND_CTRS(W) * 8u;
  const size_t ddone_off =
      cdone_off + (size_t)W * (size_t)DISCO_ND_CHUNKS((size_t)c->max_tokens) * 4u;
  const size_t small =
      ddone_off + (size_t)W * (size_t)DISCO_ND_CHUNKS((size_t)c->max_tokens) * 4u;
  rc = disco_nccl_cuda(cudaMalloc(&st->small, small), fn, "cudaMalloc", r);
  if (rc == DISCO_SUCCESS)
    rc = disco_nccl_cuda(cudaMemset(st->small, 0, small), fn, "cudaMemset", r);
  if (rc == DISCO_SUCCESS)
    rc = disco_nccl_cuda(cudaMemset(p->blk_done, 0, 8u), fn, "cudaMemset", r);
  if (rc == DISCO_SUCCESS)
    rc =
        disco_nccl_cuda(cudaHostAlloc((void **)&st->hrec,
                                      2u * DISCO_LATCH_WORDS * sizeof(unsigned long long),
                                      cudaHostAllocMapped),
                        fn, "cudaHostAlloc(error records)", r);
  if (rc != DISCO_SUCCESS) return rc;
  memset(st->hrec, 0, 2u * DISCO_LATCH_WORDS * sizeof(unsigned long long));
  rc = disco_nccl_cuda(cudaHostGetDevicePointer((void **)&st->drec, st->hrec, 0), fn,
                       "cudaHostGetDevicePointer", r);
  if (rc == DISCO_SUCCESS)
    rc = disco_nccl_cuda(cudaEventCreateWithFlags(&st->last, cudaEventDisableTiming), fn,
                         "cudaEventCreate", r);
  if (rc != DISCO_SUCCESS) return rc;
  char *sm = st->small;
  st->nd.seq = (unsigned long long *)sm;
  st->nd.fatal = (unsigned long long *)(sm + 16);
  st->nd.plan = (unsigned long long *)(sm + 24);
  st->nd.done = (unsigned *)(sm + 32);
  st->nd.sent = (unsigned long long *)(sm + 48);
  st->nd.lay = (unsigned long long *)(sm + 64);
  st->nd.peer = (char *const *)(sm + ND_SMALL_PEER_OFF);
  st->nd.step = (unsigned *)(sm + ND_SMALL_PEER_OFF + (size_t)W * sizeof(char *));
  st->nd.ctr = (unsigned long long *)(sm + ctr_off);
  st->nd.cdone = (unsigned *)(sm + cdone_off);
  st->nd.ddone = (unsigned *)(sm + ddone_off);
  st->nd.hfatal = st->drec + DISCO_LATCH_WORDS;
  st->nd.timeout_ns = (unsigned long long)comm->timeout_ms * 1000000ull;
  /* Test hook: rank 0's kernels store what they send to themselves this many
   * microseconds late (tests/gpu/run.sh: ordering of a rank's own slot). */
  const char *delay = getenv("DISCO_ND_TEST_SELF_DELAY_US");
  if (delay != NULL && atoll(delay) > 0)
    st->nd.test_self_delay_ns = (unsigned long long)atoll(delay) * 1000ull;
  /* Tuning aid: DISCO_ND_TUNE bits turn kernel defaults off (nd_kernels.h). */
  st->nd.tune = nd_env_int("DISCO_ND_TUNE", 0, 0);
  st->nd.pipe_min = nd_env_int("DISCO_ND_PIPE_MIN_TOKENS", ND_PIPE_MIN_TOKENS, 1);
  st->nd.expand_pct = nd_env_int("DISCO_ND_EXPAND_PCT", ND_EXPAND_PCT, 1);
  if (st->nd.expand_pct > 99) st->nd.expand_pct = 99;
  st->nd.expand_items = nd_env_int("DISCO_ND_EXPAND_ITEMS", ND_EXPAND_ITEMS, 1);
  st->nd.dparts = nd_env_int("DISCO_ND_PIPE_PARTS", ND_PIPE_PARTS, 1);
  if (st->nd.dparts > DISCO_ND_PARTS_MAX) st->nd.dparts = DISCO_ND_PARTS_MAX;
  st->nd.cpipe_min = nd_env_int("DISCO_ND_CPIPE_MIN_TOKENS", ND_CPIPE_MIN_TOKENS, 1);
  st->nd.ctoken_pct = nd_env_int("DISCO_ND_CTOKEN_PCT", ND_CTOKEN_PCT, 0);
  if (st->nd.ctoken_pct > 99) st->nd.ctoken_pct = 99;
  st->nd.cch_rows = nd_env_int("DISCO_ND_CHUNK_ROWS", ND_CHUNK_ROWS, DISCO_ND_CHUNK_MIN);
  st->nd.dch_rows = nd_env_int("DISCO_ND_DCHUNK_ROWS", ND_DCHUNK_ROWS, 0);
  if (st->nd.dch_rows > 0 && st->nd.dch_rows < DISCO_ND_CHUNK_MIN)
    st->nd.dch_rows = DISCO_ND_CHUNK_MIN;
  st->nd.dch_min =
      (long long)nd_env_int("DISCO_ND_DCHUNK_MIN_KB", ND_DCHUNK_MIN_KB, 0) * 1024;
  st->nd.warp_pieces = nd_env_int("DISCO_ND_WARP_PIECES", ND_WARP_PIECES, 1);
  if (st->nd.warp_pieces > 8) st->nd.warp_pieces = 8;
  st->nd.sms = sms;
  st->nd.csend_pmax = nd_env_int("DISCO_ND_CSEND_PIECES", ND_CSEND_PIECES, 0);
  st->nd.small_blocks = nd_env_int("DISCO_ND_SMALL_BLOCKS", sms, 1);
  st->nd.pipe_xg = nd_env_int("DISCO_ND_PIPE_XG", ND_PIPE_XG, 1);
  /* Hybrid: the plain kernels only (their halves run as two launches). */
  if (st->hybrid) st->nd.tune |= DISCO_ND_TUNE_NO_PIPE | DISCO_ND_TUNE_NO_CPIPE;
  p->lerr = st->drec;
  rc = disco_nd_trace_init(st, r, fn);
  if (rc != DISCO_SUCCESS) return rc;
  /* The symmetric window, zeroed before any peer can see it (flags start at 0). */
  rc = disco_nccl_nccl(ncclMemAlloc(&st->win_mem, st->win_bytes), fn, "ncclMemAlloc", r);
  if (rc == DISCO_SUCCESS)
    rc = disco_nccl_cuda(cudaMemset(st->win_mem, 0, st->win_bytes), fn, "cudaMemset", r);
  if (rc == DISCO_SUCCESS)
    rc = disco_nccl_cuda(cudaDeviceSynchronize(), fn, "cudaDeviceSynchronize", r);
  if (rc != DISCO_SUCCESS) return rc;
  st->nd.local = st->win_mem;
  return DISCO_SUCCESS;
}

/* State of this backend, then its local resources. */
static disco_result_t nd_make(disco_comm_t *comm, ncclComm_t nccl, int device,
                              const char *fn, int64_t *extra) {
  disco_nd_state_t *st = calloc(1, sizeof(*st));
  *extra = 0;
  if (st == NULL)
    return disco_error(DISCO_ERR_OUT_OF_MEMORY, "%s: out of memory on rank %d", fn,
                       comm->rank);
  comm->ops = &disco_nd_ops;
  comm->backend_state = st;
  st->nccl = nccl;
  st->device = device;
  /* Peers beyond this NVLink domain: a hybrid comm (nd_hybrid.c). */
  const int n = disco_nd_lsa_count(nccl, comm->world_size);
  if (n < 0)
    return disco_error(DISCO_ERR_OUT_OF_MEMORY, "%s: out of memory on rank %d", fn,
                       comm->rank);
  st->hybrid = n < comm->world_size;
  if (st->hybrid) comm->ops = &disco_nd_hybrid_ops;
  disco_result_t rc = nd_setup(comm, fn);
  /* Senders and receivers must cut rows the same way and agree on the
   * hybrid protocol: these must agree. */
  *extra = (int64_t)st->hybrid << 62 | (int64_t)st->nd.dch_rows << 32 |
           (int64_t)st->nd.cch_rows << 3 | (int64_t)st->nd.dparts;
  return rc;
}

disco_result_t disco_comm_create_nccl_device(ncclComm_t nccl_comm,
                                             const disco_config_t *config,
                                             disco_comm_t **out) {
  static const char fn[] = "disco_comm_create_nccl_device";
  disco_comm_t *comm = NULL;
  if (out == NULL)
    return disco_error(DISCO_ERR_NULL_POINTER, "%s: comm output is NULL", fn);
  *out = NULL;
  disco_result_t rc = disco_nccl_create(
      nccl_comm, config, fn,
      "num_experts, top_k, hidden, max_tokens, dtype, combine_wire, DISCO_ND_CHUNK_ROWS, "
      "DISCO_ND_DCHUNK_ROWS, "
      "DISCO_ND_PIPE_PARTS or which peers are load-store accessible "
      "(DISCO_ND_HOST_PEERS)",
      nd_make, &comm);
  if (rc != DISCO_SUCCESS) return rc;
  disco_nd_state_t *st = comm->backend_state;
  const int rank = comm->rank, world = comm->world_size;
  /* Collective from here on: every rank got this far. */
  rc = disco_nccl_nccl(ncclCommWindowRegister(nccl_comm, st->win_mem, st->win_bytes,
                                              &st->win, NCCL_WIN_COLL_SYMMETRIC),
                       fn, "ncclCommWindowRegister", rank);
  if (rc != DISCO_SUCCESS) goto fail; /* NCCL failed on every rank or it is stuck */
  st->win_registered = 1;
  rc = disco_nccl_nccl(disco_nd_dev_create(nccl_comm, st->win, world, rank, st->win_mem,
                                           (char **)st->nd.peer, &st->dev_comm),
                       fn, "ncclDevCommCreate", rank);
  if (rc != DISCO_SUCCESS) goto fail;
  /* Local from here: where our stores go, staging for the other hosts. */
  rc = disco_nd_links_setup(comm, fn);
  if (rc != DISCO_SUCCESS) goto fail;
  *out = comm;
  return DISCO_SUCCESS;
fail:
  disco_comm_destroy(comm);
  return rc;
}
