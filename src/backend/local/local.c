/* Local backend: W ranks as threads of one process over shared host memory.
 *
 * The W comms share one refcounted group. A collective publishes this rank's
 * send buffer and counts in its slot, meets the others at a barrier, copies
 * its incoming pieces straight from the peers' send buffers, and meets them
 * at a second barrier so no sender reuses its buffer while a peer reads it.
 *
 * Timeouts: every barrier wait is bounded by timeout_ms. A rank that times out
 * marks the group broken and names the ranks that did not arrive; from then
 * on every collective on every comm of the group fails fast with
 * DISCO_ERR_TIMEOUT (recreate the communicators). Destroying one comm also
 * breaks the group, so peers still waiting on it fail fast instead of waiting
 * for the timeout. Not a transport for production. */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/comm.h"
#include "core/config.h"
#include "core/error.h"

#define LOCAL_MAX_WORLD 1024

enum { KIND_ALLTOALL = 1, KIND_ALLTOALLV = 2 };

typedef struct local_slot {
  int kind;
  const unsigned char *send;
  size_t bytes;              /* alltoall */
  const size_t *send_counts; /* alltoallv */
  const size_t *send_displs;
} local_slot_t;

typedef struct local_group {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int world;
  int refs;
  int timeout_ms;
  int broken;
  char broken_msg[256];
  uint64_t gen;           /* completed barriers */
  int arrived;            /* ranks in the current barrier */
  int acc_err;            /* worst error brought to the current barrier */
  int result_err;         /* worst error of the last completed barrier */
  unsigned char *present; /* [world] arrived in the current barrier */
  local_slot_t *slots;    /* [world] published by each rank */
} local_group_t;

static void group_free(local_group_t *g) {
  pthread_cond_destroy(&g->cv);
  pthread_mutex_destroy(&g->mu);
  free(g->present);
  free(g->slots);
  free(g);
}

static void group_unref(local_group_t *g, int rank) {
  int last;
  pthread_mutex_lock(&g->mu);
  last = --g->refs == 0;
  if (!last && !g->broken && rank >= 0) {
    g->broken = 1;
    snprintf(g->broken_msg, sizeof(g->broken_msg), "rank %d destroyed its communicator",
             rank);
    pthread_cond_broadcast(&g->cv);
  }
  pthread_mutex_unlock(&g->mu);
  if (last) group_free(g);
}

static void broken_error(local_group_t *g, int rank, const char *what) {
  disco_error(DISCO_ERR_TIMEOUT, "disco local %s on rank %d: the group is broken (%s)",
              what, rank, g->broken_msg);
}

/* Waits until all ranks arrive. `err_in` is OR-ed into *err_out of every rank
 * (the worst value), so all ranks agree on a mismatch one of them saw. */
static disco_result_t barrier(local_group_t *g, int rank, int err_in, int *err_out,
                              const char *what, int timeout_ms) {
  struct timespec deadline;
  clock_gettime(CLOCK_MONOTONIC, &deadline);
  deadline.tv_sec += timeout_ms / 1000;
  deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
  if (deadline.tv_nsec >= 1000000000L) {
    deadline.tv_sec++;
    deadline.tv_nsec -= 1000000000L;
  }

  pthread_mutex_lock(&g->mu);
  if (g->broken) goto broken;
  uint64_t my_gen = g->gen;
  g->present[rank] = 1;
  if (err_in > g->acc_err) g->acc_err = err_in;
  if (++g->arrived == g->world) {
    g->result_err = g->acc_err;
    g->acc_err = 0;
    g->arrived = 0;
    memset(g->present, 0, (size_t)g->world);
    g->gen++;
    *err_out = g->result_err;
    pthread_cond_broadcast(&g->cv);
    pthread_mutex_unlock(&g->mu);
    return DISCO_SUCCESS;
  }
  while (g->gen == my_gen && !g->broken) {
    int r = pthread_cond_timedwait(&g->cv, &g->mu, &deadline);
    if (r == ETIMEDOUT && g->gen == my_gen && !g->broken) {
      int n =
          snprintf(g->broken_msg, sizeof(g->broken_msg),
                   "rank %d waited %d ms in %s; missing ranks:", rank, timeout_ms, what);
      for (int q = 0; q < g->world && n > 0 && (size_t)n < sizeof(g->broken_msg); q++)
        if (!g->present[q])
          n += snprintf(g->broken_msg + n, sizeof(g->broken_msg) - (size_t)n, " %d", q);
      g->broken = 1;
      pthread_cond_broadcast(&g->cv);
    }
  }
  /* A completed barrier wins over a later break. */
  if (g->gen != my_gen) {
    *err_out = g->result_err;
    pthread_mutex_unlock(&g->mu);
    return DISCO_SUCCESS;
  }
broken:
  broken_error(g, rank, what);
  pthread_mutex_unlock(&g->mu);
  return DISCO_ERR_TIMEOUT;
}

static disco_result_t local_finish(disco_comm_t *comm, local_group_t *g, int err,
                                   const char *what) {
  int worst = 0;
  disco_result_t rc = barrier(g, comm->rank, err, &worst, what, comm->timeout_ms);
  if (rc != DISCO_SUCCESS) return rc;
  if (worst != 0)
    return disco_error(DISCO_ERR_BACKEND,
                       "disco local %s on rank %d: ranks disagree on the call (different "
                       "operation or sizes); nothing received",
                       what, comm->rank);
  return DISCO_SUCCESS;
}

static disco_result_t local_alltoall(disco_comm_t *comm, const void *send, void *recv,
                                     size_t bytes) {
  local_group_t *g = comm->backend_state;
  const int r = comm->rank;
  local_slot_t *me = &g->slots[r];
  int worst = 0, err = 0;
  me->kind = KIND_ALLTOALL;
  me->send = send;
  me->bytes = bytes;
  disco_result_t rc = barrier(g, r, 0, &worst, "alltoall", comm->timeout_ms);
  if (rc != DISCO_SUCCESS) return rc;
  for (int q = 0; q < g->world; q++)
    if (g->slots[q].kind != KIND_ALLTOALL || g->slots[q].bytes != bytes) err = 1;
  if (!err && bytes > 0)
    for (int q = 0; q < g->world; q++)
      memcpy((unsigned char *)recv + (size_t)q * bytes,
             g->slots[q].send + (size_t)r * bytes, bytes);
  return local_finish(comm, g, err, "alltoall");
}

static disco_result_t local_alltoallv(disco_comm_t *comm, const void *send,
                                      const size_t *send_counts,
                                      const size_t *send_displs, void *recv,
                                      const size_t *recv_counts,
                                      const size_t *recv_displs) {
  local_group_t *g = comm->backend_state;
  const int r = comm->rank;
  local_slot_t *me = &g->slots[r];
  int worst = 0, err = 0;
  me->kind = KIND_ALLTOALLV;
  me->send = send;
  me->send_counts = send_counts;
  me->send_displs = send_displs;
  disco_result_t rc = barrier(g, r, 0, &worst, "alltoallv", comm->timeout_ms);
  if (rc != DISCO_SUCCESS) return rc;
  /* Check every incoming piece before copying any, so a mismatch never
   * reads or writes past a buffer. */
  for (int q = 0; q < g->world && !err; q++) {
    const local_slot_t *s = &g->slots[q];
    if (s->kind != KIND_ALLTOALLV || s->send_counts[r] != recv_counts[q]) err = 1;
  }
  if (!err)
    for (int q = 0; q < g->world; q++) {
      const local_slot_t *s = &g->slots[q];
      if (recv_counts[q] == 0) continue;
      memcpy((unsigned char *)recv + recv_displs[q], s->send + s->send_displs[r],
             recv_counts[q]);
    }
  return local_finish(comm, g, err, "alltoallv");
}

static void local_destroy(disco_comm_t *comm) {
  if (comm->backend_state != NULL) group_unref(comm->backend_state, comm->rank);
  comm->backend_state = NULL;
}

static const disco_backend_ops_t local_ops = {
    .name = "local",
    .device_memory = 0,
    .alltoall = local_alltoall,
    .alltoallv = local_alltoallv,
    .destroy = local_destroy,
};

static disco_result_t group_create(int world, int timeout_ms, local_group_t **out) {
  pthread_condattr_t attr;
  local_group_t *g = calloc(1, sizeof(*g));
  if (g == NULL) return DISCO_ERR_OUT_OF_MEMORY;
  g->present = calloc((size_t)world, 1);
  g->slots = calloc((size_t)world, sizeof(local_slot_t));
  if (g->present == NULL || g->slots == NULL) goto fail;
  if (pthread_mutex_init(&g->mu, NULL) != 0) goto fail;
  if (pthread_condattr_init(&attr) != 0) goto fail_mu;
  /* Monotonic, so a wall-clock jump neither fires nor stalls a timeout. */
  if (pthread_condattr_setclock(&attr, CLOCK_MONOTONIC) != 0 ||
      pthread_cond_init(&g->cv, &attr) != 0) {
    pthread_condattr_destroy(&attr);
    goto fail_mu;
  }
  pthread_condattr_destroy(&attr);
  g->world = world;
  g->timeout_ms = timeout_ms;
  *out = g;
  return DISCO_SUCCESS;
fail_mu:
  pthread_mutex_destroy(&g->mu);
fail:
  free(g->present);
  free(g->slots);
  free(g);
  return DISCO_ERR_OUT_OF_MEMORY;
}

disco_result_t disco_comm_create_local(int world_size, const disco_config_t *config,
                                       disco_comm_t **comms) {
  static const char fn[] = "disco_comm_create_local";
  disco_config_t c;
  local_group_t *g = NULL;
  disco_result_t rc;
  int made = 0;

  disco_error_clear();
  if (comms == NULL) return disco_error(DISCO_ERR_NULL_POINTER, "%s: comms is NULL", fn);
  if (world_size < 1 || world_size > LOCAL_MAX_WORLD)
    return disco_error(DISCO_ERR_INVALID_ARGUMENT, "%s: world_size = %d outside [1, %d]",
                       fn, world_size, LOCAL_MAX_WORLD);
  for (int i = 0; i < world_size; i++) comms[i] = NULL;
  rc = disco_config_normalize(config, world_size, fn, &c);
  if (rc != DISCO_SUCCESS) return rc;
  if (group_create(world_size, c.timeout_ms, &g) != DISCO_SUCCESS)
    return disco_error(DISCO_ERR_OUT_OF_MEMORY, "%s: out of memory for %d ranks", fn,
                       world_size);
  for (; made < world_size; made++) {
    disco_comm_t *comm = NULL;
    rc = disco_comm_alloc(&c, made, world_size, fn, &comm);
    if (rc != DISCO_SUCCESS) goto fail;
    comm->ops = &local_ops;
    comm->backend_state = g;
    g->refs++; /* no thread shares the group yet */
    comms[made] = comm;
    rc = disco_host_path_init(comm);
    if (rc != DISCO_SUCCESS) {
      made++;
      goto fail;
    }
  }
  return DISCO_SUCCESS;
fail:
  if (g->refs == 0) group_free(g);
  /* Unref with rank -1: nobody is waiting, no need to mark the group broken. */
  for (int i = 0; i < made; i++) {
    if (comms[i] == NULL) continue;
    group_unref(comms[i]->backend_state, -1);
    comms[i]->backend_state = NULL;
    disco_comm_free(comms[i]);
    comms[i] = NULL;
  }
  return rc;
}
