/* MPI backend: the host-transport primitives (alltoall, alltoallv) over a
 * private duplicate of the caller's communicator. Core's host path does the
 * rest, so outputs match the local backend bit for bit.
 *
 * Every wait polls MPI_Test with a deadline (no MPI_Wait): a peer that never
 * arrives turns into DISCO_ERR_TIMEOUT instead of a hang. A pending collective
 * request cannot be cancelled, so after a timeout or an MPI error the comm is
 * marked broken and refuses further traffic. */
#include <limits.h>
#include <mpi.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/comm.h"
#include "core/error.h"
#include "core/host_path.h"
#include "disco_mpi.h"

#define MPI_P2P_TAG 0x5d15
/* Largest message of the chunked point-to-point exchange; a power of two well
 * below INT_MAX. */
#define MPI_DEFAULT_CHUNK ((size_t)1 << 30)
/* Polls before the waiter starts yielding the CPU (ranks are often
 * oversubscribed on CPU-only test machines). */
#define MPI_SPIN_POLLS 64

typedef struct mpi_state {
  MPI_Comm comm;         /* private duplicate, MPI_ERRORS_RETURN */
  int use_p2p;           /* agreed at creation: a count may exceed INT_MAX */
  size_t chunk;          /* p2p message size, agreed at creation */
  disco_result_t broken; /* SUCCESS, or TIMEOUT/BACKEND/INTERNAL once broken */
  MPI_Request *reqs;     /* [2W] */
  MPI_Status *statuses;  /* [2W] */
  int *counts;           /* [4W]: send counts, send displs, recv counts, recv displs */
} mpi_state_t;

static int64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int64_t deadline_after(int timeout_ms) {
  return now_ns() + (int64_t)(timeout_ms > 0 ? timeout_ms : 1) * 1000000;
}

/* MPI's message for `code`; `buf` holds MPI_MAX_ERROR_STRING chars. */
static const char *mpi_err_string(int code, char *buf) {
  int len = 0;
  if (MPI_Error_string(code, buf, &len) != MPI_SUCCESS) {
    snprintf(buf, MPI_MAX_ERROR_STRING, "MPI error code %d", code);
  }
  return buf;
}

static disco_result_t mpi_fail(mpi_state_t *st, int code, const char *what, int rank) {
  char msg[MPI_MAX_ERROR_STRING];
  if (st) st->broken = DISCO_ERR_BACKEND;
  return disco_error(DISCO_ERR_BACKEND, "mpi backend: %s failed on rank %d: %s", what,
                     rank, mpi_err_string(code, msg));
}

/* Polls `n` requests until all complete or the deadline passes. On timeout
 * the requests stay pending (MPI cannot cancel collectives) and the comm is
 * broken. `st` may be NULL (creation, before the state exists). */
static disco_result_t wait_all(mpi_state_t *st, int n, MPI_Request *reqs,
                               MPI_Status *statuses, int64_t deadline, const char *what,
                               int rank, int timeout_ms) {
  for (long polls = 0;; polls++) {
    int done = 0;
    int rc = MPI_Testall(n, reqs, &done, statuses);
    if (rc == MPI_ERR_IN_STATUS && statuses != MPI_STATUSES_IGNORE) {
      for (int i = 0; i < n; i++) {
        int e = statuses[i].MPI_ERROR;
        if (e != MPI_SUCCESS && e != MPI_ERR_PENDING) return mpi_fail(st, e, what, rank);
      }
    }
    if (rc != MPI_SUCCESS) return mpi_fail(st, rc, what, rank);
    if (done) return DISCO_SUCCESS;
    if (now_ns() > deadline) {
      if (st) st->broken = DISCO_ERR_TIMEOUT;
      return disco_error(DISCO_ERR_TIMEOUT,
                         "mpi backend: %s on rank %d: a peer did not arrive within %d ms;"
                         " the communicator is broken and must be destroyed",
                         what, rank, timeout_ms);
    }
    if (polls >= MPI_SPIN_POLLS) sched_yield();
  }
}

static disco_result_t check_usable(const disco_comm_t *comm, const mpi_state_t *st) {
  if (st->broken == DISCO_SUCCESS) return DISCO_SUCCESS;
  return disco_error(st->broken,
                     "mpi backend: rank %d: communicator broken by an earlier %s;"
                     " destroy it",
                     comm->rank, disco_result_name(st->broken));
}

/* Chunked Isend/Irecv exchange for byte counts beyond INT_MAX. `sc == NULL`
 * means every peer gets `uniform` bytes at displacement p * uniform (alltoall).
 * Round k moves chunk k of every peer, so at most 2W requests are live. */
static disco_result_t p2p_exchange(disco_comm_t *comm, mpi_state_t *st, const char *send,
                                   const size_t *sc, const size_t *sd, char *recv,
                                   const size_t *rc, const size_t *rd, size_t uniform,
                                   int64_t deadline) {
  const int w = comm->world_size, me = comm->rank;
#define SCOUNT(p) (sc ? sc[p] : uniform)
#define SDISPL(p) (sd ? sd[p] : (size_t)(p)*uniform)
#define RCOUNT(p) (rc ? rc[p] : uniform)
#define RDISPL(p) (rd ? rd[p] : (size_t)(p)*uniform)
  disco_result_t res = DISCO_SUCCESS;
  /* Self-traffic never touches MPI. */
  size_t self = SCOUNT(me) < RCOUNT(me) ? SCOUNT(me) : RCOUNT(me);
  if (self > 0) memmove(recv + RDISPL(me), send + SDISPL(me), self);
  for (size_t off = 0;; off += st->chunk) {
    int n = 0;
    for (int i = 1; i < w; i++) {
      int p = (me + w - i) % w; /* receive from the left, send to the right */
      if (RCOUNT(p) <= off) continue;
      size_t len = RCOUNT(p) - off < st->chunk ? RCOUNT(p) - off : st->chunk;
      int e = MPI_Irecv(recv + RDISPL(p) + off, (int)len, MPI_BYTE, p, MPI_P2P_TAG,
                        st->comm, &st->reqs[n]);
      if (e != MPI_SUCCESS) return mpi_fail(st, e, "MPI_Irecv", me);
      n++;
    }
    for (int i = 1; i < w; i++) {
      int p = (me + i) % w;
      if (SCOUNT(p) <= off) continue;
      size_t len = SCOUNT(p) - off < st->chunk ? SCOUNT(p) - off : st->chunk;
      int e = MPI_Isend(send + SDISPL(p) + off, (int)len, MPI_BYTE, p, MPI_P2P_TAG,
                        st->comm, &st->reqs[n]);
      if (e != MPI_SUCCESS) return mpi_fail(st, e, "MPI_Isend", me);
      n++;
    }
    if (n == 0) break;
    res = wait_all(st, n, st->reqs, st->statuses, deadline, "point-to-point exchange", me,
                   comm->timeout_ms);
    if (res != DISCO_SUCCESS) return res;
  }
  if (SCOUNT(me) != RCOUNT(me)) {
    st->broken = DISCO_ERR_INTERNAL;
    res = disco_error(DISCO_ERR_INTERNAL,
                      "mpi backend: rank %d sends itself %zu bytes but expects %zu", me,
                      SCOUNT(me), RCOUNT(me));
  }
#undef SCOUNT
#undef SDISPL
#undef RCOUNT
#undef RDISPL
  return res;
}

static disco_result_t mpi_alltoall(disco_comm_t *comm, const void *send, void *recv,
                                   size_t bytes) {
  mpi_state_t *st = (mpi_state_t *)comm->backend_state;
  disco_result_t res = check_usable(comm, st);
  if (res != DISCO_SUCCESS) return res;
  int64_t deadline = deadline_after(comm->timeout_ms);
  /* `bytes` is the same on every rank, so this choice is collective. */
  if (st->use_p2p || bytes > (size_t)INT_MAX) {
    return p2p_exchange(comm, st, (const char *)send, NULL, NULL, (char *)recv, NULL,
                        NULL, bytes, deadline);
  }
  MPI_Request req = MPI_REQUEST_NULL;
  int e = MPI_Ialltoall(send, (int)bytes, MPI_BYTE, recv, (int)bytes, MPI_BYTE, st->comm,
                        &req);
  if (e != MPI_SUCCESS) return mpi_fail(st, e, "MPI_Ialltoall", comm->rank);
  return wait_all(st, 1, &req, MPI_STATUSES_IGNORE, deadline, "MPI_Ialltoall", comm->rank,
                  comm->timeout_ms);
}

static disco_result_t mpi_alltoallv(disco_comm_t *comm, const void *send,
                                    const size_t *send_counts, const size_t *send_displs,
                                    void *recv, const size_t *recv_counts,
                                    const size_t *recv_displs) {
  mpi_state_t *st = (mpi_state_t *)comm->backend_state;
  disco_result_t res = check_usable(comm, st);
  if (res != DISCO_SUCCESS) return res;
  int64_t deadline = deadline_after(comm->timeout_ms);
  if (st->use_p2p) {
    return p2p_exchange(comm, st, (const char *)send, send_counts, send_displs,
                        (char *)recv, recv_counts, recv_displs, 0, deadline);
  }
  const int w = comm->world_size;
  const size_t *src[4] = {send_counts, send_displs, recv_counts, recv_displs};
  for (int a = 0; a < 4; a++) {
    for (int p = 0; p < w; p++) {
      /* Creation chose use_p2p whenever the config allows counts this large,
       * so this is a bug in that bound; peers will time out. */
      if (src[a][p] > (size_t)INT_MAX) {
        st->broken = DISCO_ERR_INTERNAL;
        return disco_error(DISCO_ERR_INTERNAL,
                           "mpi backend: rank %d: alltoallv count %zu exceeds INT_MAX"
                           " but the config bound said it could not",
                           comm->rank, src[a][p]);
      }
      st->counts[a * w + p] = (int)src[a][p];
    }
  }
  MPI_Request req = MPI_REQUEST_NULL;
  int e =
      MPI_Ialltoallv(send, st->counts, st->counts + w, MPI_BYTE, recv, st->counts + 2 * w,
                     st->counts + 3 * w, MPI_BYTE, st->comm, &req);
  if (e != MPI_SUCCESS) return mpi_fail(st, e, "MPI_Ialltoallv", comm->rank);
  return wait_all(st, 1, &req, MPI_STATUSES_IGNORE, deadline, "MPI_Ialltoallv",
                  comm->rank, comm->timeout_ms);
}

static void mpi_destroy(disco_comm_t *comm) {
  mpi_state_t *st = (mpi_state_t *)comm->backend_state;
  if (!st) return;
  int finalized = 1;
  MPI_Finalized(&finalized);
  if (st->broken == DISCO_SUCCESS && !finalized && st->comm != MPI_COMM_NULL) {
    MPI_Comm_free(&st->comm);
  }
  /* A broken comm may still have an operation in flight on its duplicate and
   * on the host workspace: leak both rather than let MPI write into freed
   * memory. */
  if (st->broken != DISCO_SUCCESS) comm->host_ws = NULL;
  free(st->reqs);
  free(st->statuses);
  free(st->counts);
  free(st);
  comm->backend_state = NULL;
}

static const disco_backend_ops_t mpi_ops = {
    .name = "mpi",
    .device_memory = 0,
    .alltoall = mpi_alltoall,
    .alltoallv = mpi_alltoallv,
    .dispatch = NULL,
    .combine = NULL,
    .handle_init = NULL,
    .handle_fini = NULL,
    .destroy = mpi_destroy,
};

/* Timeout for creation, before the config is validated: the config's value
 * if readable, else the documented default path. */
static int creation_timeout_ms(const disco_config_t *config) {
  if (config && config->magic == DISCO_CONFIG_MAGIC &&
      config->size >= offsetof(disco_config_t, timeout_ms) + sizeof(int32_t) &&
      config->timeout_ms > 0) {
    return config->timeout_ms;
  }
  const char *env = getenv("DISCO_TIMEOUT_MS");
  long v = env ? strtol(env, NULL, 10) : 0;
  return v > 0 && v <= INT_MAX ? (int)v : DISCO_DEFAULT_TIMEOUT_MS;
}

/* Hash of the config fields that must agree on every rank (not timeout_ms),
 * kept below 2^62 so it and its negation fit an int64 MAX-reduction. */
static int64_t config_hash(const disco_config_t *c) {
  int64_t f[6] = {c->num_experts, c->top_k, c->hidden,
                  c->max_tokens,  c->dtype, c->combine_wire};
  uint64_t h = 1469598103934665603ull;
  for (int i = 0; i < 6; i++) {
    for (int b = 0; b < 8; b++) {
      h ^= ((uint64_t)f[i] >> (8 * b)) & 0xffu;
      h *= 1099511628211ull;
    }
  }
  return (int64_t)(h >> 2);
}

/* True if an alltoallv count or displacement of this comm could exceed
 * INT_MAX. Every exchange of the host path stays inside its workspace
 * buffers, so their sizes bound it. */
static int config_needs_p2p(const disco_comm_t *c) {
  const disco_host_ws_t *ws = (const disco_host_ws_t *)c->host_ws;
  size_t unit = ws->rec_bytes > ws->part_bytes ? ws->rec_bytes : ws->part_bytes;
  int64_t rows =
      ws->max_recv_rows > ws->max_send_rows ? ws->max_recv_rows : ws->max_send_rows;
  size_t bytes;
  if (__builtin_mul_overflow((size_t)rows, unit, &bytes)) return 1;
  return bytes > (size_t)INT_MAX;
}

static size_t env_size(const char *name) {
  const char *env = getenv(name);
  long long v = env ? strtoll(env, NULL, 10) : 0;
  return v > 0 ? (size_t)v : 0;
}

static disco_result_t state_create(disco_comm_t *c, MPI_Comm dup) {
  mpi_state_t *st = (mpi_state_t *)calloc(1, sizeof(*st));
  if (!st) goto oom;
  c->backend_state = st;
  c->ops = &mpi_ops;
  st->comm = dup;
  st->chunk = MPI_DEFAULT_CHUNK;
  size_t w = (size_t)c->world_size;
  st->reqs = (MPI_Request *)calloc(2 * w, sizeof(MPI_Request));
  st->statuses = (MPI_Status *)calloc(2 * w, sizeof(MPI_Status));
  st->counts = (int *)calloc(4 * w, sizeof(int));
  if (!st->reqs || !st->statuses || !st->counts) goto oom;
  return DISCO_SUCCESS;
oom:
  return disco_error(DISCO_ERR_OUT_OF_MEMORY,
                     "disco_comm_create_mpi: backend state allocation failed on rank %d",
                     c->rank);
}

/* Agreement vector, reduced with MPI_MAX over all ranks. */
enum { AG_FAILED, AG_RANK, AG_HASH, AG_NEG_HASH, AG_P2P, AG_CHUNK, AG_COUNT };

disco_result_t disco_comm_create_mpi(MPI_Comm mpi_comm, const disco_config_t *config,
                                     disco_comm_t **comm) {
  static _Thread_local int64_t agree_fallback[AG_COUNT];
  disco_error_clear();
  if (comm) *comm = NULL;
  int initialized = 0, finalized = 0, e;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (!initialized || finalized) {
    return disco_error(DISCO_ERR_INVALID_USAGE, "disco_comm_create_mpi: MPI is %s",
                       finalized ? "already finalized" : "not initialized");
  }
  /* These two are the same on every rank, so returning early is collective. */
  if (mpi_comm == MPI_COMM_NULL) {
    return disco_error(DISCO_ERR_INVALID_ARGUMENT,
                       "disco_comm_create_mpi: mpi_comm is MPI_COMM_NULL");
  }
  int inter = 0, rank = 0, size = 0;
  char msg[MPI_MAX_ERROR_STRING];
  if ((e = MPI_Comm_test_inter(mpi_comm, &inter)) != MPI_SUCCESS ||
      (e = MPI_Comm_rank(mpi_comm, &rank)) != MPI_SUCCESS ||
      (e = MPI_Comm_size(mpi_comm, &size)) != MPI_SUCCESS) {
    return disco_error(DISCO_ERR_BACKEND, "disco_comm_create_mpi: bad mpi_comm: %s",
                       mpi_err_string(e, msg));
  }
  if (inter) {
    return disco_error(DISCO_ERR_INVALID_ARGUMENT,
                       "disco_comm_create_mpi: mpi_comm is an inter-communicator");
  }

  const int timeout_ms = creation_timeout_ms(config);
  const int64_t deadline = deadline_after(timeout_ms);
  disco_result_t res = DISCO_SUCCESS, own = DISCO_SUCCESS;
  disco_comm_t *c = NULL;
  MPI_Comm dup = MPI_COMM_NULL;
  MPI_Request req = MPI_REQUEST_NULL;
  /* Heap, so a timed-out reduction can be leaked instead of writing into a
   * dead stack frame later. */
  int64_t *agree = (int64_t *)calloc(AG_COUNT, sizeof(int64_t));
  if (!agree) agree = agree_fallback;

  if ((e = MPI_Comm_idup(mpi_comm, &dup, &req)) != MPI_SUCCESS) {
    res = mpi_fail(NULL, e, "MPI_Comm_idup", rank);
    goto cleanup;
  }
  res = wait_all(NULL, 1, &req, MPI_STATUSES_IGNORE, deadline, "MPI_Comm_idup", rank,
                 timeout_ms);
  if (res != DISCO_SUCCESS) {
    dup = MPI_COMM_NULL; /* still being created: leak it */
    goto cleanup;
  }
  if ((e = MPI_Comm_set_errhandler(dup, MPI_ERRORS_RETURN)) != MPI_SUCCESS) {
    res = mpi_fail(NULL, e, "MPI_Comm_set_errhandler", rank);
    goto cleanup; /* same on every rank in practice; peers would time out */
  }

  /* Local part; its outcome is shared below so all ranks agree. */
  if (!comm) {
    own = disco_error(DISCO_ERR_NULL_POINTER,
                      "disco_comm_create_mpi: comm is NULL on rank %d", rank);
  } else {
    own = disco_comm_alloc(config, rank, size, "disco_comm_create_mpi", &c);
    if (own == DISCO_SUCCESS) own = state_create(c, dup);
    if (own == DISCO_SUCCESS) own = disco_host_path_init(c);
  }
  memset(agree, 0, AG_COUNT * sizeof(int64_t));
  agree[AG_FAILED] = own != DISCO_SUCCESS;
  agree[AG_RANK] = own != DISCO_SUCCESS ? rank : -1;
  if (own == DISCO_SUCCESS) {
    agree[AG_HASH] = config_hash(&c->config);
    agree[AG_NEG_HASH] = -agree[AG_HASH];
    /* Test hooks (e.g. mpirun -x DISCO_MPI_P2P=1): the reduction makes them
     * consistent even if only some ranks set them. */
    agree[AG_P2P] = config_needs_p2p(c) || env_size("DISCO_MPI_P2P") > 0;
    agree[AG_CHUNK] = (int64_t)env_size("DISCO_MPI_CHUNK_BYTES");
  }
  if ((e = MPI_Iallreduce(MPI_IN_PLACE, agree, AG_COUNT, MPI_INT64_T, MPI_MAX, dup,
                          &req)) != MPI_SUCCESS) {
    res = mpi_fail(NULL, e, "MPI_Iallreduce", rank);
    goto cleanup;
  }
  res = wait_all(NULL, 1, &req, MPI_STATUSES_IGNORE, deadline, "MPI_Iallreduce", rank,
                 timeout_ms);
  if (res != DISCO_SUCCESS) {
    if (agree != agree_fallback) agree = NULL; /* leak: the reduction may still land */
    if (c && c->backend_state) ((mpi_state_t *)c->backend_state)->broken = res;
    dup = MPI_COMM_NULL; /* leaked by mpi_destroy or here */
    goto cleanup;
  }
  if (own != DISCO_SUCCESS) {
    res = own; /* keeps this rank's own message */
  } else if (agree[AG_FAILED]) {
    res = disco_error(DISCO_ERR_REMOTE,
                      "disco_comm_create_mpi: rank %lld failed to create its communicator"
                      " (seen on rank %d)",
                      (long long)agree[AG_RANK], rank);
  } else if (agree[AG_HASH] != -agree[AG_NEG_HASH]) {
    res =
        disco_error(DISCO_ERR_INVALID_ARGUMENT,
                    "disco_comm_create_mpi: config differs across ranks (num_experts,"
                    " top_k, hidden, max_tokens, dtype or combine_wire; seen on rank %d)",
                    rank);
  } else {
    mpi_state_t *st = (mpi_state_t *)c->backend_state;
    st->use_p2p = agree[AG_P2P] != 0;
    if (agree[AG_CHUNK] > 0 && (uint64_t)agree[AG_CHUNK] < MPI_DEFAULT_CHUNK) {
      st->chunk = (size_t)agree[AG_CHUNK];
    }
    *comm = c;
    c = NULL;
    dup = MPI_COMM_NULL; /* owned by the comm now */
  }

cleanup:
  if (c) {
    mpi_state_t *st = (mpi_state_t *)c->backend_state;
    if (st && st->comm == dup) dup = MPI_COMM_NULL; /* freed by mpi_destroy */
    if (c->ops && c->ops->destroy) c->ops->destroy(c);
    disco_comm_free(c);
  }
  if (dup != MPI_COMM_NULL) MPI_Comm_free(&dup);
  if (agree != agree_fallback) free(agree);
  return res;
}
