/* Shared helpers of the unit tests: CHECK macros and a W-thread runner for the
 * local backend. A failed CHECK prints file:line and the message, and the
 * test returns non-zero. */
#ifndef DISCO_TESTS_UNIT_UTIL_H_
#define DISCO_TESTS_UNIT_UTIL_H_

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "disco.h"

static int unit_failures = 0;

#define CHECK(cond, ...)                                              \
  do {                                                                \
    if (!(cond)) {                                                    \
      fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      fprintf(stderr, __VA_ARGS__);                                   \
      fprintf(stderr, "\n");                                          \
      __atomic_add_fetch(&unit_failures, 1, __ATOMIC_RELAXED);        \
    }                                                                 \
  } while (0)

/* The call returns `code` and disco_last_error() contains `needle`. */
#define CHECK_ERR(call, code, needle)                                              \
  do {                                                                             \
    disco_result_t rc_ = (call);                                                   \
    CHECK(rc_ == (code), "got %s, want %s (%s)", disco_result_name(rc_),           \
          disco_result_name(code), disco_last_error());                            \
    CHECK(strstr(disco_last_error(), (needle)) != NULL, "message '%s' lacks '%s'", \
          disco_last_error(), (needle));                                           \
  } while (0)

#define CHECK_OK(call)                                                                 \
  do {                                                                                 \
    disco_result_t rc_ = (call);                                                       \
    CHECK(rc_ == DISCO_SUCCESS, "%s: %s", disco_result_name(rc_), disco_last_error()); \
  } while (0)

typedef struct unit_rank {
  int rank;
  void *ctx;
  void (*fn)(int rank, void *ctx);
} unit_rank_t;

static inline void *unit_rank_main(void *p) {
  unit_rank_t *r = p;
  r->fn(r->rank, r->ctx);
  return NULL;
}

/* Runs fn(rank, ctx) on W threads and joins them. */
static inline void unit_run_ranks(int world, void (*fn)(int, void *), void *ctx) {
  pthread_t *th = calloc((size_t)world, sizeof(*th));
  unit_rank_t *rk = calloc((size_t)world, sizeof(*rk));
  if (th == NULL || rk == NULL) {
    fprintf(stderr, "FAIL: out of memory for %d threads\n", world);
    unit_failures++;
    free(th);
    free(rk);
    return;
  }
  for (int i = 0; i < world; i++) {
    rk[i].rank = i;
    rk[i].ctx = ctx;
    rk[i].fn = fn;
    if (pthread_create(&th[i], NULL, unit_rank_main, &rk[i]) != 0) {
      fprintf(stderr, "FAIL: pthread_create\n");
      exit(2);
    }
  }
  for (int i = 0; i < world; i++) pthread_join(th[i], NULL);
  free(th);
  free(rk);
}

static inline int unit_finish(const char *name) {
  if (unit_failures) {
    fprintf(stderr, "%s: %d check(s) FAILED\n", name, unit_failures);
    return 1;
  }
  printf("%s: all checks passed\n", name);
  return 0;
}

#endif /* DISCO_TESTS_UNIT_UTIL_H_ */
