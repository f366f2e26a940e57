/* NCCL backend: communicator and handle lifetime, checked-call helpers and
 * the bounded host wait. */
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/nccl/nccl_backend.h"
#include "core/error.h"
#include "disco_nccl.h"

#define DISCO_ALIGN_UP(n, a) (((n) + (a)-1) / (a) * (a))
#define DISCO_SMEM_LIMIT 49152
/* ncclMemAlloc and ncclCommRegister (NCCL 2.19): zero-copy sends between
 * registered buffers. */
#define DISCO_NCCL_CAN_REGISTER (NCCL_VERSION_CODE >= NCCL_VERSION(2, 19, 0))

/* SMs kept free for NCCL's kernel while the side stream works beside it.
 * 2x H100 (run 43): 4096 tokens, K 8, EXPERT_MAJOR dispatch ~455 us with 32
 * or 48 free against ~500-520 with none or 16 (NCCL's kernel then waits). */
#define DISCO_NCCL_FREE_SMS 40

disco_result_t disco_nccl_cuda(cudaError_t e, const char *fn, const char *what,
                               int rank) {
  if (e == cudaSuccess) return DISCO_SUCCESS;
  if (e == cudaErrorMemoryAllocation)
    return disco_error(DISCO_ERR_OUT_OF_MEMORY, "%s: %s: %s on rank %d", fn, what,
                       cudaGetErrorString(e), rank);
  return disco_error(DISCO_ERR_CUDA, "%s: %s: %s (%s) on rank %d", fn, what,
                     cudaGetErrorName(e), cudaGetErrorString(e), rank);
}

disco_result_t disco_nccl_nccl(ncclResult_t e, const char *fn, const char *what,
                               int rank) {
  if (e == ncclSuccess) return DISCO_SUCCESS;
  return disco_error(DISCO_ERR_BACKEND, "%s: %s: %s (%s) on rank %d", fn, what,
                     ncclGetErrorString(e), ncclGetLastError(NULL), rank);
}

static double disco_now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

disco_result_t disco_nccl_poll(ncclComm_t nc, cudaEvent_t ev, int timeout_ms,
                               const char *fn, const char *what, int rank) {
  const double deadline = disco_now_ms() + (double)timeout_ms;
  for (unsigned it = 0;; it++) {
    ncclResult_t ae = ncclSuccess, r;
    if (ev != NULL) {
      cudaError_t e = cudaEventQuery(ev);
      if (e == cudaSuccess) return DISCO_SUCCESS;
      if (e != cudaErrorNotReady) return disco_nccl_cuda(e, fn, what, rank);
    }
    if (ev == NULL || (it & 63u) == 63u) {
      r = ncclCommGetAsyncError(nc, &ae);
      if (r != ncclSuccess) return disco_nccl_nccl(r, fn, "ncclCommGetAsyncError", rank);
      if (ev == NULL && ae == ncclSuccess) return DISCO_SUCCESS;
      if (ae != ncclSuccess && ae != ncclInProgress)
        return disco_nccl_nccl(ae, fn, what, rank);
      if (disco_now_ms() > deadline)
        return disco_error(DISCO_ERR_TIMEOUT,
                           "%s: %s did not complete within %d ms on rank %d (a peer may "
                           "be missing; the NCCL comm may need ncclCommAbort)",
                           fn, what, timeout_ms, rank);
      if ((it & 4095u) == 4095u) sched_yield(); /* long waits: let others run */
    }
  }
}

disco_result_t disco_nccl_group_end(disco_comm_t *comm, const char *fn) {
  disco_nccl_state_t *st = comm->backend_state;
  ncclResult_t r = ncclGroupEnd();
  if (r == ncclInProgress) /* non-blocking comm: wait for the enqueue */
    return disco_nccl_poll(st->nccl, NULL, comm->timeout_ms, fn, "ncclGroupEnd",
                           comm->rank);
  return disco_nccl_nccl(r, fn, "ncclGroupEnd", comm->rank);
}

disco_result_t disco_nccl_wait(disco_comm_t *comm, const char *fn) {
  disco_nccl_state_t *st = comm->backend_state;
  return disco_nccl_poll(st->nccl, st->done, comm->timeout_ms, fn, "count exchange",
                         comm->rank);
}

/* ---- handles ---------------------------------------------------------------- */
/* Sub-allocation of one block; with base NULL only the size is computed. */
static void *disco_carve(char *base, size_t *off, size_t bytes) {
  void *p = base != NULL ? (void *)(base + *off) : NULL;
  *off += DISCO_ALIGN_UP(bytes, 256);
  return p;
}

size_t disco_nccl_plan_carve(const disco_kparams_t *p, disco_dev_plan_t *d, char *base) {
  const size_t M = (size_t)p->max_tokens, K = (size_t)p->top_k, W = (size_t)p->world;
  const size_t L = (size_t)p->num_local, KD = (size_t)p->kd;
  const size_t tpb = 32u * (size_t)p->layout_warps;
  const size_t bmax = M == 0 ? 1 : (M + tpb - 1) / tpb;
  size_t off = 0;
  d->slot = disco_carve(base, &off, M * K * 4);
  d->slot_pos = disco_carve(base, &off, M * K * 4);
  d->tok_dest = disco_carve(base, &off, M * KD * 4);
  d->tok_dpos = disco_carve(base, &off, M * KD * 4);
  d->tok_row = disco_carve(base, &off, M * KD * 4);
  d->blk_base = disco_carve(base, &off, bmax * (size_t)p->num_cols * 4);
  d->msg = disco_carve(base, &off, 2 * W * (size_t)p->msg_len * 8);
  d->recv_off = disco_carve(base, &off, (W + 1) * 8);
  d->exp_off = disco_carve(base, &off, (L + 1) * 8);
  d->exp_total = disco_carve(base, &off, (L + 1) * 8);
  d->srcbase = disco_carve(base, &off, (W * L + 1) * 8);
  d->num_rows = disco_carve(base, &off, 8);
  d->ok = disco_carve(base, &off, 4);
  d->go = disco_carve(base, &off, 4);
  d->comb_rows = disco_carve(base, &off, W * M * K * 4);
  d->comb_w = disco_carve(base, &off, W * M * K * 4);
  d->pass_list = disco_carve(base, &off, DISCO_MAX_CHUNKS * M * 4);
  d->pass_cnt = disco_carve(base, &off, DISCO_MAX_CHUNKS * 4);
  d->wide = disco_carve(base, &off, 4);
  return off;
}

static void disco_nccl_handle_fini(disco_comm_t *comm, disco_handle_t *handle) {
  disco_nccl_plan_t *pl = handle->backend_plan;
  (void)comm;
  if (pl == NULL) return;
  cudaFree(pl->dev_mem);
  cudaFreeHost(pl->host_msg);
  free(pl->n_to);
  free(pl);
  handle->backend_plan = NULL;
}

static disco_result_t disco_nccl_handle_init(disco_comm_t *comm, disco_handle_t *handle) {
  static const char fn[] = "disco_handle_create";
  disco_nccl_state_t *st = comm->backend_state;
  const int W = comm->world_size;
  disco_result_t rc;
  disco_nccl_plan_t *pl = calloc(1, sizeof(*pl));
  if (pl == NULL)
    return disco_error(DISCO_ERR_OUT_OF_MEMORY, "%s: out of memory on rank %d", fn,
                       comm->rank);
  handle->backend_plan = pl;
  pl->n_to = calloc((size_t)(3 * W + 1), sizeof(int64_t));
  if (pl->n_to == NULL) {
    rc = disco_error(DISCO_ERR_OUT_OF_MEMORY, "%s: out of memory on rank %d", fn,
                     comm->rank);
    goto fail;
  }
  pl->n_from = pl->n_to + W;
  pl->recv_off = pl->n_from + W;
  rc = disco_nccl_cuda(cudaSetDevice(st->device), fn, "cudaSetDevice", comm->rank);
  if (rc != DISCO_SUCCESS) goto fail;
  size_t bytes = disco_nccl_plan_carve(&st->kp, &pl->dev, NULL);
  rc = disco_nccl_cuda(cudaMalloc(&pl->dev_mem, bytes), fn, "cudaMalloc(plan)",
                       comm->rank);
  if (rc != DISCO_SUCCESS) goto fail;
  disco_nccl_plan_carve(&st->kp, &pl->dev, pl->dev_mem);
  rc = disco_nccl_cuda(cudaMallocHost((void **)&pl->host_msg,
                                      2u * (size_t)W * (size_t)st->kp.msg_len * 8u),
                       fn, "cudaMallocHost(counts)", comm->rank);
  if (rc != DISCO_SUCCESS) goto fail;
  return DISCO_SUCCESS;
fail:
  disco_nccl_handle_fini(comm, handle);
  return rc;
}

/* ---- comm ------------------------------------------------------------------- */
static void disco_nccl_destroy(disco_comm_t *comm) {
  disco_nccl_state_t *st = comm->backend_state;
  if (st == NULL) return;
  cudaSetDevice(st->device);
  void *payload[4] = {st->kp.ws_send, st->kp.ws_recv, st->kp.send_meta, st->kp.recv_meta};
  for (int i = 0; i < 4; i++) {
#if DISCO_NCCL_CAN_REGISTER
    if (st->registered) {
      if (st->reg_handle[i] != NULL) ncclCommDeregister(st->nccl, st->reg_handle[i]);
      if (payload[i] != NULL) ncclMemFree(payload[i]);
      continue;
    }
#endif
    cudaFree(payload[i]);
  }
  cudaFree(st->kp.blk_cnt);
  cudaFree(st->kp.err_key);
  if (st->done != NULL) cudaEventDestroy(st->done);
  if (st->ev_fork != NULL) cudaEventDestroy(st->ev_fork);
  if (st->ev_pack != NULL) cudaEventDestroy(st->ev_pack);
  if (st->ev_mid != NULL) cudaEventDestroy(st->ev_mid);
  if (st->ev_aux != NULL) cudaEventDestroy(st->ev_aux);
  for (int i = 0; i < DISCO_MAX_CHUNKS; i++) {
    if (st->ev_piece[i] != NULL) cudaEventDestroy(st->ev_piece[i]);
    if (st->ev_land[i] != NULL) cudaEventDestroy(st->ev_land[i]);
  }
  if (st->aux != NULL) cudaStreamDestroy(st->aux);
  free(st);
  comm->backend_state = NULL;
}

static const disco_backend_ops_t disco_nccl_ops = {
    .name = "nccl",
    .device_memory = 1,
    .alltoall = NULL,
    .alltoallv = NULL,
    .dispatch = disco_nccl_dispatch,
    .combine = disco_nccl_combine,
    .dispatch_abort = disco_nccl_dispatch_abort,
    .handle_init = disco_nccl_handle_init,
    .handle_fini = disco_nccl_handle_fini,
    .destroy = disco_nccl_destroy,
};

/* Sizes and limits of the kernels on this rank (no allocation). */
disco_result_t disco_nccl_params(const disco_comm_t *comm, int device, disco_kparams_t *p,
                                 const char *fn) {
  const disco_config_t *c = &comm->config;
  const int W = comm->world_size, K = c->top_k, E = c->num_experts;
  const int64_t M = c->max_tokens;
  disco_result_t rc;
  int sms = 0;
  memset(p, 0, sizeof(*p));
  p->rank = comm->rank;
  p->world = W;
  p->num_experts = E;
  p->num_local = comm->num_local_experts;
  p->top_k = K;
  p->kd = K < W ? K : W;
  p->num_cols = E + W;
  p->dtype = (int)c->dtype;
  p->wire32 = c->combine_wire == DISCO_COMBINE_WIRE_FP32 && c->dtype != DISCO_DTYPE_FP32;
  p->row_bytes = comm->row_bytes;
  p->row_vecs = (int)(comm->row_bytes / 16u);
  p->meta_ints = DISCO_ALIGN_UP(2 + 3 * K, 4);
  p->msg_len = DISCO_MSG_COUNTS + p->num_local;
  p->max_tokens = M;
  p->layout_warps = 8;
  while (p->layout_warps > 0 &&
         2u * (size_t)p->layout_warps * (size_t)p->num_cols * 4u > DISCO_SMEM_LIMIT)
    p->layout_warps /= 2;
  if (p->layout_warps == 0 || p->num_cols > 6000 || p->num_local >= (1 << 23) ||
      (double)W * (double)M * (double)K > 2147483647.0 ||
      (double)comm->row_bytes / 16.0 > 2147483647.0)
    return disco_error(DISCO_ERR_NOT_SUPPORTED,
                       "%s: num_experts + world_size = %d (max 6000) or world_size * "
                       "max_tokens * top_k = %.0f (max 2^31-1) too large on rank %d",
                       fn, p->num_cols, (double)W * (double)M * (double)K, comm->rank);
  rc = disco_nccl_cuda(
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), fn,
      "cudaDeviceGetAttribute", comm->rank);
  if (rc != DISCO_SUCCESS) return rc;
  if (c->max_sms > 0 && c->max_sms < sms) sms = c->max_sms;
  p->max_blocks = 8 * (sms > 0 ? sms : 1);
  /* Row kernels beside NCCL's leave it DISCO_NCCL_FREE_SMS SMs, or half of a
   * small GPU (env DISCO_NCCL_SIDE_SMS: the side's SMs, 0 = no cap). */
  const char *env = getenv("DISCO_NCCL_SIDE_SMS");
  p->side_blocks =
      sms > 2 * DISCO_NCCL_FREE_SMS ? sms - DISCO_NCCL_FREE_SMS : (sms + 1) / 2;
  if (env != NULL) p->side_blocks = atoi(env) > 0 ? atoi(env) : 0;
  return DISCO_SUCCESS;
}

/* A chunk count from the environment, clamped to [1, DISCO_MAX_CHUNKS]. */
static int disco_nccl_chunks(const char *name, int dflt) {
  const char *env = getenv(name);
  int v = env != NULL ? atoi(env) : dflt;
  return v < 1 ? 1 : v > DISCO_MAX_CHUNKS ? DISCO_MAX_CHUNKS : v;
}

/* Sizes, limits and workspaces of this rank. */
static disco_result_t disco_nccl_setup(disco_comm_t *comm, const char *fn) {
  disco_nccl_state_t *st = comm->backend_state;
  disco_kparams_t *p = &st->kp;
  const disco_config_t *c = &comm->config;
  const int W = comm->world_size;
  const int64_t M = c->max_tokens;
  disco_result_t rc = disco_nccl_params(comm, st->device, p, fn);
  if (rc != DISCO_SUCCESS) return rc;
  /* Test hooks / tuning knobs; all ranks must agree (checked in create). */
  const char *env = getenv("DISCO_NCCL_SPLIT_BYTES");
  st->split_bytes = env != NULL && atoll(env) > 0 ? atoll(env) : DISCO_SPLIT_BYTES;
  if (st->split_bytes >= (1ll << 47)) st->split_bytes = 1ll << 47; /* never splits */
  st->dispatch_chunks =
      disco_nccl_chunks("DISCO_NCCL_DISPATCH_CHUNKS", DISCO_DISPATCH_CHUNKS);
  st->combine_chunks =
      disco_nccl_chunks("DISCO_NCCL_COMBINE_CHUNKS", DISCO_COMBINE_CHUNKS);
  const size_t wire = c->combine_wire == DISCO_COMBINE_WIRE_FP32 ? 4u : comm->elem_size;
  const size_t elem = wire > comm->elem_size ? wire : comm->elem_size;
  const size_t tpb = 32u * (size_t)p->layout_warps;
  const size_t bmax = M == 0 ? 1 : ((size_t)M + tpb - 1) / tpb;
  st->ws_bytes = (size_t)W * (size_t)M * (size_t)c->hidden * elem;
  st->meta_bytes = (size_t)W * (size_t)M * (size_t)p->meta_ints * 4u;
  struct {
    void **ptr;
    size_t bytes;
    const char *what;
  } allocs[] = {
      {&p->ws_send, st->ws_bytes, "cudaMalloc(send workspace)"},
      {&p->ws_recv, st->ws_bytes, "cudaMalloc(receive workspace)"},
      {(void **)&p->send_meta, st->meta_bytes, "cudaMalloc(send metadata)"},
      {(void **)&p->recv_meta, st->meta_bytes, "cudaMalloc(receive metadata)"},
      {(void **)&p->blk_cnt, bmax * (size_t)p->num_cols * 4u, "cudaMalloc(block counts)"},
      {(void **)&p->err_key, 16u, "cudaMalloc(error key)"},
  };
  const char *reg = getenv("DISCO_NCCL_REGISTER");
  st->registered = DISCO_NCCL_CAN_REGISTER && reg != NULL && strcmp(reg, "1") == 0;
  for (size_t i = 0; i < sizeof(allocs) / sizeof(allocs[0]); i++) {
    const size_t bytes = allocs[i].bytes ? allocs[i].bytes : 16u;
#if DISCO_NCCL_CAN_REGISTER
    if (st->registered && i < 4) { /* the payload buffers, in state order */
      rc = disco_nccl_nccl(ncclMemAlloc(allocs[i].ptr, bytes), fn, "ncclMemAlloc",
                           comm->rank);
      if (rc == DISCO_SUCCESS)
        rc = disco_nccl_nccl(
            ncclCommRegister(st->nccl, *allocs[i].ptr, bytes, &st->reg_handle[i]), fn,
            "ncclCommRegister", comm->rank);
      if (rc != DISCO_SUCCESS) return rc;
      continue;
    }
#endif
    rc =
        disco_nccl_cuda(cudaMalloc(allocs[i].ptr, bytes), fn, allocs[i].what, comm->rank);
    if (rc != DISCO_SUCCESS) return rc;
  }
  /* err_key (8 bytes, ~0 = no error), then the layout block counter (0). */
  p->blk_done = (unsigned *)(p->err_key + 1);
  rc = disco_nccl_cuda(cudaMemset(p->err_key, 0xff, 8u), fn, "cudaMemset", comm->rank);
  if (rc != DISCO_SUCCESS) return rc;
  rc = disco_nccl_cuda(cudaMemset(p->blk_done, 0, 8u), fn, "cudaMemset", comm->rank);
  if (rc != DISCO_SUCCESS) return rc;
  cudaEvent_t *evs[5 + 2 * DISCO_MAX_CHUNKS] = {&st->done, &st->ev_fork, &st->ev_pack,
                                                &st->ev_mid, &st->ev_aux};
  for (int i = 0; i < DISCO_MAX_CHUNKS; i++) {
    evs[5 + i] = &st->ev_piece[i];
    evs[5 + DISCO_MAX_CHUNKS + i] = &st->ev_land[i];
  }
  for (size_t i = 0; i < sizeof(evs) / sizeof(evs[0]); i++) {
    rc = disco_nccl_cuda(cudaEventCreateWithFlags(evs[i], cudaEventDisableTiming), fn,
                         "cudaEventCreate", comm->rank);
    if (rc != DISCO_SUCCESS) return rc;
  }
  return disco_nccl_cuda(cudaStreamCreateWithFlags(&st->aux, cudaStreamNonBlocking), fn,
                         "cudaStreamCreate", comm->rank);
}

/* Every rank learns whether all created their comm with the same config. */
#define DISCO_NF 8
disco_result_t disco_nccl_agree(ncclComm_t nc, int rank, int timeout_ms,
                                const disco_config_t *c, int64_t split, int failed,
                                const char *fn, int *any_failed, int *mismatch) {
  int64_t v[2 * DISCO_NF] = {0};
  int64_t *dev = NULL;
  cudaStream_t s = NULL;
  cudaEvent_t ev = NULL;
  disco_result_t rc;
  v[0] = failed;
  if (!failed) {
    v[1] = c->num_experts;
    v[2] = c->top_k;
    v[3] = c->hidden;
    v[4] = c->max_tokens;
    v[5] = c->dtype;
    v[6] = c->combine_wire;
    v[7] = split;
  }
  for (int i = 0; i < DISCO_NF; i++) v[DISCO_NF + i] = -v[i];
  rc = disco_nccl_cuda(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), fn,
                       "cudaStreamCreate", rank);
  if (rc == DISCO_SUCCESS)
    rc = disco_nccl_cuda(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), fn,
                         "cudaEventCreate", rank);
  if (rc == DISCO_SUCCESS)
    rc = disco_nccl_cuda(cudaMalloc((void **)&dev, sizeof(v)), fn, "cudaMalloc", rank);
  if (rc == DISCO_SUCCESS)
    rc = disco_nccl_cuda(cudaMemcpyAsync(dev, v, sizeof(v), cudaMemcpyHostToDevice, s),
                         fn, "cudaMemcpyAsync", rank);
  if (rc == DISCO_SUCCESS)
    rc = disco_nccl_nccl(ncclAllReduce(dev, dev, 2 * DISCO_NF, ncclInt64, ncclMax, nc, s),
                         fn, "ncclAllReduce", rank);
  if (rc == DISCO_SUCCESS)
    rc = disco_nccl_cuda(cudaMemcpyAsync(v, dev, sizeof(v), cudaMemcpyDeviceToHost, s),
                         fn, "cudaMemcpyAsync", rank);
  if (rc == DISCO_SUCCESS)
    rc = disco_nccl_cuda(cudaEventRecord(ev, s), fn, "cudaEventRecord", rank);
  if (rc == DISCO_SUCCESS)
    rc = disco_nccl_poll(nc, ev, timeout_ms, fn, "config agreement", rank);
  if (rc == DISCO_SUCCESS) {
    *any_failed = v[0] != 0;
    *mismatch = 0;
    for (int i = 1; i < DISCO_NF; i++)
      if (v[i] != -v[DISCO_NF + i]) *mismatch = 1;
  }
  if (dev != NULL) cudaFree(dev);
  if (ev != NULL) cudaEventDestroy(ev);
  if (s != NULL) cudaStreamDestroy(s);
  return rc;
}

disco_result_t disco_nccl_create(ncclComm_t nccl_comm, const disco_config_t *config,
                                 const char *fn, const char *compared,
                                 disco_nccl_setup_t setup, disco_comm_t **out) {
  disco_comm_t *comm = NULL;
  int rank = -1, world = 0, device = -1, any_failed = 0, mismatch = 0;
  int64_t extra = 0;
  disco_result_t rc, local;
  char saved[512];
  disco_error_clear();
  if (out == NULL)
    return disco_error(DISCO_ERR_NULL_POINTER, "%s: comm output is NULL", fn);
  *out = NULL;
  if (nccl_comm == NULL)
    return disco_error(DISCO_ERR_NULL_POINTER, "%s: nccl_comm is NULL", fn);
  rc = disco_nccl_nccl(ncclCommUserRank(nccl_comm, &rank), fn, "ncclCommUserRank", -1);
  if (rc == DISCO_SUCCESS)
    rc = disco_nccl_nccl(ncclCommCount(nccl_comm, &world), fn, "ncclCommCount", rank);
  if (rc == DISCO_SUCCESS)
    rc = disco_nccl_cuda(cudaGetDevice(&device), fn, "cudaGetDevice", rank);
  if (rc != DISCO_SUCCESS) return rc;
  /* A local failure still joins the agreement so peers do not wait for us. */
  local = disco_comm_alloc(config, rank, world, fn, &comm);
  if (local == DISCO_SUCCESS) local = setup(comm, nccl_comm, device, fn, &extra);
  snprintf(saved, sizeof(saved), "%s", disco_last_error());
  rc = disco_nccl_agree(nccl_comm, rank,
                        comm != NULL ? comm->timeout_ms : DISCO_DEFAULT_TIMEOUT_MS,
                        comm != NULL ? &comm->config : NULL, extra,
                        local != DISCO_SUCCESS, fn, &any_failed, &mismatch);
  if (rc != DISCO_SUCCESS) goto fail;
  if (local != DISCO_SUCCESS) {
    rc = disco_error(local, "%s", saved);
    goto fail;
  }
  if (any_failed) {
    rc = disco_error(DISCO_ERR_REMOTE,
                     "%s: another rank failed to create its comm (seen on rank %d)", fn,
                     rank);
    goto fail;
  }
  if (mismatch) {
    rc = disco_error(DISCO_ERR_INVALID_ARGUMENT,
                     "%s: config differs between ranks (%s) on rank %d", fn, compared,
                     rank);
    goto fail;
  }
  *out = comm;
  return DISCO_SUCCESS;
fail:
  disco_comm_destroy(comm);
  return rc;
}

/* State of the nccl backend, then its sizes and workspaces. */
static disco_result_t disco_nccl_make(disco_comm_t *comm, ncclComm_t nccl, int device,
                                      const char *fn, int64_t *split) {
  disco_nccl_state_t *st = calloc(1, sizeof(*st));
  if (st == NULL)
    return disco_error(DISCO_ERR_OUT_OF_MEMORY, "%s: out of memory on rank %d", fn,
                       comm->rank);
  comm->ops = &disco_nccl_ops;
  comm->backend_state = st;
  st->nccl = nccl;
  st->device = device;
  disco_result_t rc = disco_nccl_setup(comm, fn);
  /* One value for the agreement: split bytes (< 2^47), both chunk counts
   * (<= 8) and whether payload buffers are registered. */
  *split = st->split_bytes | (int64_t)st->dispatch_chunks << 48 |
           (int64_t)st->combine_chunks << 52 | (int64_t)st->registered << 56;
  return rc;
}

disco_result_t disco_comm_create_nccl(ncclComm_t nccl_comm, const disco_config_t *config,
                                      disco_comm_t **out) {
  return disco_nccl_create(
      nccl_comm, config, "disco_comm_create_nccl",
      "num_experts, top_k, hidden, max_tokens, dtype, combine_wire or "
      "DISCO_NCCL_SPLIT_BYTES / _DISPATCH_CHUNKS / _COMBINE_CHUNKS / _REGISTER",
      disco_nccl_make, out);
}

#ifndef DISCO_HAVE_NCCL_DEVICE
/* Built against an NCCL without the device API (< 2.28). */
disco_result_t disco_comm_create_nccl_device(ncclComm_t nccl_comm,
                                             const disco_config_t *config,
                                             disco_comm_t **comm) {
  (void)nccl_comm;
  (void)config;
  if (comm != NULL) *comm = NULL;
  return disco_error(
      DISCO_ERR_NOT_SUPPORTED,
      "disco_comm_create_nccl_device: this libdisco was built against NCCL "
      "%d, without the device API (needs 2.28 or newer)",
      NCCL_VERSION_CODE);
}
#endif
