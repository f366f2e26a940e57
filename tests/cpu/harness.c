#include "harness.h"

#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- failure accounting --------------------------------------------------- */
#define TH_MAX_PRINTED 40

static atomic_int g_failures;
static atomic_llong g_compared_bytes, g_compares;
static pthread_mutex_t g_print_lock = PTHREAD_MUTEX_INITIALIZER;

void th_fail(const char *file, int line, const char *fmt, ...) {
  int n = atomic_fetch_add(&g_failures, 1);
  if (n >= TH_MAX_PRINTED) return;
  pthread_mutex_lock(&g_print_lock);
  fprintf(stderr, "FAIL %s:%d: ", file, line);
  va_list ap;
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
  if (n == TH_MAX_PRINTED - 1) fprintf(stderr, "(further failures not printed)\n");
  pthread_mutex_unlock(&g_print_lock);
}

void th_expect_rc_fail(const char *file, int line, disco_result_t got,
                       disco_result_t want, const char *fmt, ...) {
  char msg[512], ctx[256];
  snprintf(msg, sizeof(msg), "%s", disco_last_error());
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(ctx, sizeof(ctx), fmt, ap);
  va_end(ap);
  th_fail(file, line, "%s: got %s, want %s (last error: \"%s\")", ctx,
          disco_result_name(got), disco_result_name(want), msg);
}

int th_failures(void) {
  return atomic_load(&g_failures);
}

int th_finish(const char *test_name) {
  int n = th_failures();
  if (n == 0) {
    printf("%s: PASSED (%lld comparisons, %lld bytes compared)\n", test_name,
           (long long)atomic_load(&g_compares),
           (long long)atomic_load(&g_compared_bytes));
    return 0;
  }
  printf("%s: FAILED (%d failed checks)\n", test_name, n);
  return 1;
}

/* ---- threads ---------------------------------------------------------------- */
typedef struct th_thread_arg {
  th_rank_fn fn;
  void *ctx;
  int rank;
} th_thread_arg_t;

static void *th_thread_main(void *p) {
  th_thread_arg_t *a = p;
  a->fn(a->rank, a->ctx);
  return NULL;
}

void th_run(int world, th_rank_fn fn, void *ctx) {
  pthread_t *threads = calloc((size_t)world, sizeof(*threads));
  th_thread_arg_t *args = calloc((size_t)world, sizeof(*args));
  if (!threads || !args) {
    fprintf(stderr, "th_run: out of memory\n");
    exit(2);
  }
  for (int r = 0; r < world; r++) {
    args[r] = (th_thread_arg_t){fn, ctx, r};
    if (pthread_create(&threads[r], NULL, th_thread_main, &args[r]) != 0) {
      fprintf(stderr, "th_run: pthread_create failed for rank %d\n", r);
      exit(2);
    }
  }
  for (int r = 0; r < world; r++) pthread_join(threads[r], NULL);
  free(threads);
  free(args);
}

struct th_barrier {
  pthread_barrier_t b;
};

th_barrier_t *th_barrier_create(int count) {
  th_barrier_t *b = th_xmalloc(sizeof(*b));
  pthread_barrier_init(&b->b, NULL, (unsigned)count);
  return b;
}

void th_barrier_wait(th_barrier_t *b) {
  pthread_barrier_wait(&b->b);
}

void th_barrier_destroy(th_barrier_t *b) {
  if (!b) return;
  pthread_barrier_destroy(&b->b);
  free(b);
}

/* ---- guard-byte buffers ---------------------------------------------------- */
static unsigned char th_guard_byte(size_t i) {
  return (unsigned char)(0x5A ^ (i * 31u));
}

void *th_xmalloc(size_t bytes) {
  size_t rounded = (bytes + 63) / 64 * 64;
  void *p = aligned_alloc(64, rounded ? rounded : 64);
  if (!p) {
    fprintf(stderr, "th_xmalloc: out of memory (%zu bytes)\n", bytes);
    exit(2);
  }
  return p;
}

void th_buf_init(th_buf_t *b, size_t bytes, size_t misalign) {
  b->pre = TH_GUARD_BYTES + misalign;
  b->bytes = bytes;
  b->raw = th_xmalloc(b->pre + bytes + TH_GUARD_BYTES);
  b->ptr = b->raw + b->pre;
  for (size_t i = 0; i < b->pre; i++) b->raw[i] = th_guard_byte(i);
  for (size_t i = 0; i < TH_GUARD_BYTES; i++) b->ptr[bytes + i] = th_guard_byte(i + 7);
  th_buf_poison(b);
}

void th_buf_free(th_buf_t *b) {
  free(b->raw);
  memset(b, 0, sizeof(*b));
}

void th_buf_poison(th_buf_t *b) {
  memset(b->ptr, TH_POISON_BYTE, b->bytes);
}

int th_buf_guards_ok(const th_buf_t *b, const char *what, int rank) {
  for (size_t i = 0; i < b->pre; i++) {
    if (b->raw[i] != th_guard_byte(i)) {
      th_fail(__FILE__, __LINE__,
              "rank %d: %s: guard byte %zd before the buffer overwritten (0x%02x)", rank,
              what, (ptrdiff_t)i - (ptrdiff_t)b->pre, b->raw[i]);
      return 0;
    }
  }
  for (size_t i = 0; i < TH_GUARD_BYTES; i++) {
    if (b->ptr[b->bytes + i] != th_guard_byte(i + 7)) {
      th_fail(__FILE__, __LINE__,
              "rank %d: %s: guard byte %zu past the end (size %zu) overwritten (0x%02x)",
              rank, what, i, b->bytes, b->ptr[b->bytes + i]);
      return 0;
    }
  }
  return 1;
}

int th_buf_poison_ok(const th_buf_t *b, const char *what, int rank) {
  for (size_t i = 0; i < b->bytes; i++) {
    if (b->ptr[i] != TH_POISON_BYTE) {
      th_fail(__FILE__, __LINE__,
              "rank %d: %s: output byte %zu of %zu written (0x%02x) by a failed call",
              rank, what, i, b->bytes, b->ptr[i]);
      return 0;
    }
  }
  return th_buf_guards_ok(b, what, rank);
}

/* ---- comparisons ------------------------------------------------------------- */
static uint64_t th_load_bits(const void *p, int64_t i, size_t elem) {
  const unsigned char *c = (const unsigned char *)p + (size_t)i * elem;
  switch (elem) {
    case 1:
      return *c;
    case 2: {
      uint16_t v;
      memcpy(&v, c, 2);
      return v;
    }
    case 4: {
      uint32_t v;
      memcpy(&v, c, 4);
      return v;
    }
    default: {
      uint64_t v;
      memcpy(&v, c, 8);
      return v;
    }
  }
}

int th_cmp(const char *what, int rank, const void *got, const void *want, int64_t rows,
           int64_t cols, size_t elem) {
  int64_t n = rows * cols;
  atomic_fetch_add(&g_compares, 1);
  atomic_fetch_add(&g_compared_bytes, (long long)n * (long long)elem);
  if (n == 0) return 1;
  if (memcmp(got, want, (size_t)n * elem) == 0) return 1;
  int64_t first = -1, bad = 0;
  for (int64_t i = 0; i < n; i++) {
    if (th_load_bits(got, i, elem) != th_load_bits(want, i, elem)) {
      if (first < 0) first = i;
      bad++;
    }
  }
  th_fail(__FILE__, __LINE__,
          "rank %d: %s[%lld][%lld]: got 0x%0*llx, want 0x%0*llx (%lld of %lld elements "
          "differ)",
          rank, what, (long long)(first / cols), (long long)(first % cols), (int)elem * 2,
          (unsigned long long)th_load_bits(got, first, elem), (int)elem * 2,
          (unsigned long long)th_load_bits(want, first, elem), (long long)bad,
          (long long)n);
  return 0;
}

static int th_ident_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
         c == '_';
}

int th_msg_names(const char *msg, const char *names) {
  const char *name = names;
  while (*name) {
    size_t len = strcspn(name, "|");
    for (const char *p = msg; *p; p++) {
      if (strncmp(p, name, len) != 0) continue;
      int before_ok = p == msg || !th_ident_char(p[-1]);
      int after_ok = !th_ident_char(p[len]);
      if (before_ok && after_ok) return 1;
    }
    name += len;
    if (*name == '|') name++;
  }
  return 0;
}

/* ---- generators ----------------------------------------------------------------- */
uint64_t th_rng(uint64_t *state) {
  uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint64_t th_seed(uint64_t a, uint64_t b) {
  uint64_t s = a * 0x100000001B3ull ^ (b + 0x51ED27ull);
  return th_rng(&s);
}

size_t th_elem_size(disco_dtype_t dtype) {
  return dtype == DISCO_DTYPE_FP32 ? 4 : 2;
}

const char *th_dtype_name(disco_dtype_t dtype) {
  switch (dtype) {
    case DISCO_DTYPE_BF16:
      return "bf16";
    case DISCO_DTYPE_FP16:
      return "fp16";
    case DISCO_DTYPE_FP32:
      return "fp32";
  }
  return "?";
}

static const uint16_t k_special_bf16[] = {0x8000, 0x0000, 0x7f80, 0xff80,
                                          0x7fc0, 0x0001, 0x807f, 0x7f7f};
static const uint16_t k_special_fp16[] = {0x8000, 0x0000, 0x7c00, 0xfc00,
                                          0x7e00, 0x0001, 0x83ff, 0x7bff};
static const uint32_t k_special_fp32[] = {0x80000000u, 0x00000000u, 0x7f800000u,
                                          0xff800000u, 0x7fc00000u, 0x00000001u,
                                          0x807fffffu, 0x7f7fffffu};

void th_gen_x(void *x, int64_t n, disco_dtype_t dtype, uint64_t seed, int specials) {
  uint64_t s = th_seed(seed, 0x7831);
  for (int64_t i = 0; i < n; i++) {
    uint64_t r = th_rng(&s);
    uint32_t sign = (uint32_t)(r & 1);
    uint32_t ex = (uint32_t)((r >> 1) & 15);
    uint32_t mant = (uint32_t)(r >> 8);
    int special = specials && ((r >> 40) & 7) == 0;
    uint32_t pick = (uint32_t)((r >> 44) & 7);
    if (dtype == DISCO_DTYPE_FP32) {
      uint32_t v = special ? k_special_fp32[pick]
                           : (sign << 31) | ((119 + ex) << 23) | (mant & 0x7fffffu);
      ((uint32_t *)x)[i] = v;
    } else if (dtype == DISCO_DTYPE_BF16) {
      uint32_t v = special ? k_special_bf16[pick]
                           : (sign << 15) | ((119 + ex) << 7) | (mant & 0x7fu);
      ((uint16_t *)x)[i] = (uint16_t)v;
    } else {
      uint32_t v = special ? k_special_fp16[pick]
                           : (sign << 15) | ((7 + ex) << 10) | (mant & 0x3ffu);
      ((uint16_t *)x)[i] = (uint16_t)v;
    }
  }
}

void th_gen_weights(float *w, int64_t n, uint64_t seed) {
  uint64_t s = th_seed(seed, 0x77);
  for (int64_t i = 0; i < n; i++) {
    uint64_t r = th_rng(&s);
    uint32_t bits = (uint32_t)(r & 1) << 31 | (uint32_t)(120 + ((r >> 1) & 7)) << 23 |
                    ((uint32_t)(r >> 8) & 0x7fffffu) | 1u;
    memcpy(&w[i], &bits, 4);
  }
}

const char *th_route_name(th_route_t route) {
  switch (route) {
    case TH_ROUTE_UNIFORM:
      return "uniform";
    case TH_ROUTE_ZIPF:
      return "zipf";
    case TH_ROUTE_ONE_EXPERT:
      return "one-expert";
    case TH_ROUTE_HOLES:
      return "holes";
    default:
      return "?";
  }
}

void th_gen_topk(int64_t *idx, int64_t num_tokens, int top_k, int num_experts,
                 th_route_t route, uint64_t seed) {
  uint64_t s = th_seed(seed, 0x70b);
  int *perm = th_xmalloc(sizeof(int) * (size_t)num_experts);
  double *pop = th_xmalloc(sizeof(double) * (size_t)num_experts);
  double *left = th_xmalloc(sizeof(double) * (size_t)num_experts);
  for (int e = 0; e < num_experts; e++) perm[e] = e;
  for (int e = num_experts - 1; e > 0; e--) { /* popularity order for zipf */
    int j = (int)(th_rng(&s) % (uint64_t)(e + 1));
    int t = perm[e];
    perm[e] = perm[j];
    perm[j] = t;
  }
  for (int i = 0; i < num_experts; i++) {
    double rank1 = (double)i + 1.0;
    pop[perm[i]] = 1.0 / (rank1 * sqrt(rank1));
  }
  int hot = (int)(th_seed(seed, 3) % (uint64_t)num_experts);
  for (int64_t t = 0; t < num_tokens; t++) {
    int64_t *row = idx + t * top_k;
    if (route == TH_ROUTE_ONE_EXPERT) {
      for (int j = 0; j < top_k; j++) row[j] = -1;
      row[t % top_k] = hot;
      continue;
    }
    if (route == TH_ROUTE_ZIPF) {
      double total = 0;
      for (int e = 0; e < num_experts; e++) total += (left[e] = pop[e]);
      for (int j = 0; j < top_k; j++) {
        double u = (double)(th_rng(&s) >> 11) * 0x1.0p-53 * total;
        int pick = -1;
        for (int e = 0; e < num_experts; e++) {
          if (left[e] == 0) continue;
          pick = e;
          if (u < left[e]) break;
          u -= left[e];
        }
        row[j] = pick;
        total -= left[pick];
        left[pick] = 0;
      }
      continue;
    }
    for (int j = 0; j < top_k; j++) { /* partial Fisher-Yates: distinct ids */
      int k = j + (int)(th_rng(&s) % (uint64_t)(num_experts - j));
      int tmp = perm[j];
      perm[j] = perm[k];
      perm[k] = tmp;
      row[j] = perm[j];
    }
    if (route == TH_ROUTE_HOLES) {
      int all_holes = th_rng(&s) % 10 == 0;
      for (int j = 0; j < top_k; j++)
        if (all_holes || th_rng(&s) % 3 == 0) row[j] = -1;
    }
  }
  free(perm);
  free(pop);
  free(left);
}
