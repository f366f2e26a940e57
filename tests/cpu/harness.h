/* Test harness for the CPU tests: W ranks on W threads, guard-byte buffers,
 * poisoned outputs, deterministic input generators and bitwise comparisons
 * that print the first mismatch. Public API only (disco.h). */
#ifndef DISCO_TESTS_CPU_HARNESS_H_
#define DISCO_TESTS_CPU_HARNESS_H_

#include <stddef.h>
#include <stdint.h>

#include "disco.h"

/* 1 in sanitizer builds (several times slower): tests shrink their sizes. */
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define TH_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define TH_SANITIZED 1
#endif
#endif
#ifndef TH_SANITIZED
#define TH_SANITIZED 0
#endif

/* ---- failure accounting --------------------------------------------------- */
/* Records one failure (thread-safe) and prints "file:line: message". */
void th_fail(const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
int th_failures(void);
/* Prints a summary line and returns the process exit status (0 = passed). */
int th_finish(const char *test_name);

#define TH_CHECK(cond, ...)                                \
  do {                                                     \
    if (!(cond)) th_fail(__FILE__, __LINE__, __VA_ARGS__); \
  } while (0)

/* Expects the disco call `expr` to return `want`; the rest is a printf
 * context for the failure message, which also shows disco_last_error(). */
#define TH_EXPECT_RC(expr, want, ...)                                     \
  do {                                                                    \
    disco_result_t th_rc_ = (expr);                                       \
    if (th_rc_ != (want))                                                 \
      th_expect_rc_fail(__FILE__, __LINE__, th_rc_, (want), __VA_ARGS__); \
  } while (0)
void th_expect_rc_fail(const char *file, int line, disco_result_t got,
                       disco_result_t want, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

/* ---- threads ---------------------------------------------------------------- */
typedef void (*th_rank_fn)(int rank, void *ctx);
/* Runs fn(rank, ctx) on `world` threads (rank 0..world-1) and joins them. */
void th_run(int world, th_rank_fn fn, void *ctx);

typedef struct th_barrier th_barrier_t;
th_barrier_t *th_barrier_create(int count);
void th_barrier_wait(th_barrier_t *b);
void th_barrier_destroy(th_barrier_t *b);

/* ---- guard-byte buffers ---------------------------------------------------- */
#define TH_GUARD_BYTES 64
#define TH_POISON_BYTE 0xCD

/* ptr = a 64-byte aligned address + misalign, with TH_GUARD_BYTES guard bytes
 * of a known pattern before it and after ptr + bytes. ptr is never NULL, even
 * for 0 bytes. */
typedef struct th_buf {
  unsigned char *raw;
  unsigned char *ptr;
  size_t bytes;
  size_t pre; /* guard bytes before ptr (TH_GUARD_BYTES + misalign) */
} th_buf_t;

void th_buf_init(th_buf_t *b, size_t bytes, size_t misalign);
void th_buf_free(th_buf_t *b);
void th_buf_poison(th_buf_t *b);
/* 1 if intact; otherwise prints the first changed byte and records a failure. */
int th_buf_guards_ok(const th_buf_t *b, const char *what, int rank);
int th_buf_poison_ok(const th_buf_t *b, const char *what, int rank);

/* ---- comparisons ------------------------------------------------------------- */
/* Bitwise compare of rows x cols elements of elem bytes (1, 2, 4 or 8). On a
 * mismatch prints "what[row][col]: got 0x.., want 0x.. (n of m differ)" and
 * records a failure; returns 1 if equal. */
int th_cmp(const char *what, int rank, const void *got, const void *want, int64_t rows,
           int64_t cols, size_t elem);

/* 1 if `msg` contains one of the '|'-separated identifiers in `names` as a
 * whole identifier (not inside a longer one: "x" does not match "recv_x"). */
int th_msg_names(const char *msg, const char *names);

/* ---- generators ----------------------------------------------------------------- */
uint64_t th_rng(uint64_t *state); /* splitmix64 */
uint64_t th_seed(uint64_t a, uint64_t b);
size_t th_elem_size(disco_dtype_t dtype);
const char *th_dtype_name(disco_dtype_t dtype);

/* n random finite values of `dtype` (magnitudes ~2^-8..2^7, both signs); with
 * `specials`, about one element in 8 is -0.0, +0.0, +-inf, NaN, a subnormal or
 * the largest finite value. */
void th_gen_x(void *x, int64_t n, disco_dtype_t dtype, uint64_t seed, int specials);
/* n weights in [-2, 2) with random mantissas (never exactly 0 or 1). */
void th_gen_weights(float *w, int64_t n, uint64_t seed);

typedef enum th_route {
  TH_ROUTE_UNIFORM = 0,    /* K distinct experts uniformly */
  TH_ROUTE_ZIPF = 1,       /* skewed: expert popularity ~ 1/(i+1)^1.5 */
  TH_ROUTE_ONE_EXPERT = 2, /* slot 0 = one fixed expert, other slots -1 */
  TH_ROUTE_HOLES = 3,      /* uniform with ~1/3 slots -1, some rows all -1 */
  TH_ROUTE_COUNT_
} th_route_t;
const char *th_route_name(th_route_t route);

/* idx[T][K] with distinct valid ids per row (duplicates only of -1). */
void th_gen_topk(int64_t *idx, int64_t num_tokens, int top_k, int num_experts,
                 th_route_t route, uint64_t seed);

void *th_xmalloc(size_t bytes); /* 64-byte aligned, never NULL (aborts the test) */

#endif /* DISCO_TESTS_CPU_HARNESS_H_ */
