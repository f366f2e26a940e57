/* disco-bench: deterministic inputs and the synthetic expert function.
 *
 * Every rank's inputs are a pure function of (--seed, the case's tokens,
 * hidden, top-k, experts, dtype and routing, the rank), so any process can
 * regenerate any rank's inputs for the reference check. Layout, alignment and
 * combine wire do not change the inputs.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"
#include "core/dtype.h"

typedef struct rng {
  uint64_t s;
} rng_t;

static uint64_t splitmix64(uint64_t *s) {
  uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

static uint64_t mix(uint64_t h, uint64_t v) {
  uint64_t s = h ^ (v * 0xd6e8feb86659fd93ull);
  return splitmix64(&s);
}

static uint64_t rng_next(rng_t *r) {
  return splitmix64(&r->s);
}

/* Uniform in [0, 1) with 53 bits. */
static double rng_unit(rng_t *r) {
  return (double)(rng_next(r) >> 11) * 0x1p-53;
}

/* Uniform integer in [0, n), n >= 1 (modulo bias below n / 2^64). */
static int64_t rng_below(rng_t *r, int64_t n) {
  return (int64_t)(rng_next(r) % (uint64_t)n);
}

static uint64_t hash_str(uint64_t h, const char *s) {
  for (; *s; s++) h = mix(h, (unsigned char)*s);
  return h;
}

uint64_t rng_seed_for(uint64_t seed, const bench_case_t *bc, int rank, uint64_t stream) {
  uint64_t h = mix(0x6469736362656e63ull, seed);
  h = mix(h, (uint64_t)bc->tokens);
  h = mix(h, (uint64_t)bc->hidden);
  h = mix(h, (uint64_t)bc->topk);
  h = mix(h, (uint64_t)bc->experts);
  h = mix(h, (uint64_t)bc->dtype);
  h = hash_str(h, bc->routing.name);
  h = mix(h, (uint64_t)rank);
  return mix(h, stream);
}

/* ---- routing generators: one token's K slots ---- */

static void shuffle_slots(rng_t *r, int64_t *v, int k) {
  for (int i = k - 1; i > 0; i--) {
    int j = (int)rng_below(r, i + 1);
    int64_t t = v[i];
    v[i] = v[j];
    v[j] = t;
  }
}

static int contains(const int64_t *v, int n, int64_t e) {
  for (int i = 0; i < n; i++)
    if (v[i] == e) return 1;
  return 0;
}

/* Floyd's algorithm: m distinct values of [base, base + n), m <= n. */
static void pick_distinct(rng_t *r, int64_t base, int64_t n, int m, int64_t *out) {
  int got = 0;
  for (int64_t j = n - m; j < n; j++) {
    int64_t t = rng_below(r, j + 1);
    out[got] = contains(out, got, base + t) ? base + j : base + t;
    got++;
  }
}

/* Zipf popularity: expert perm[i] has weight 1/(i+1)^s; the permutation is the
 * same on every rank (seeded without the rank), so hot experts are spread over
 * ranks the way a real router's are. */
typedef struct zipf_table {
  int n;
  double *w; /* [n] by expert id */
} zipf_table_t;

static int zipf_init(zipf_table_t *z, const options_t *opt, const bench_case_t *bc) {
  int n = bc->experts;
  int *perm = malloc(sizeof(int) * (size_t)n);
  z->n = n;
  z->w = malloc(sizeof(double) * (size_t)n);
  if (!perm || !z->w) {
    free(perm);
    free(z->w);
    z->w = NULL;
    return -1;
  }
  rng_t r = {rng_seed_for(opt->seed, bc, -1, 7)};
  for (int i = 0; i < n; i++) perm[i] = i;
  for (int i = n - 1; i > 0; i--) {
    int j = (int)rng_below(&r, i + 1);
    int t = perm[i];
    perm[i] = perm[j];
    perm[j] = t;
  }
  for (int i = 0; i < n; i++)
    z->w[perm[i]] = 1.0 / pow((double)(i + 1), bc->routing.zipf_s);
  free(perm);
  return 0;
}

/* K distinct experts drawn without replacement by popularity. */
static void zipf_pick(rng_t *r, const zipf_table_t *z, int k, double *avail,
                      int64_t *out) {
  memcpy(avail, z->w, sizeof(double) * (size_t)z->n);
  for (int j = 0; j < k; j++) {
    double total = 0.0;
    for (int e = 0; e < z->n; e++) total += avail[e];
    double u = rng_unit(r) * total;
    int pick = -1;
    for (int e = 0; e < z->n; e++) {
      if (avail[e] <= 0.0) continue;
      pick = e;
      if (u < avail[e]) break;
      u -= avail[e];
    }
    out[j] = pick;
    avail[pick] = 0.0;
  }
}

static void gen_routing(const options_t *opt, const bench_case_t *bc, int world, int rank,
                        int64_t *idx, float *weights) {
  const int k = bc->topk;
  const int e_loc = bc->experts / world;
  rng_t r = {rng_seed_for(opt->seed, bc, rank, 1)};
  zipf_table_t z = {0, NULL};
  double *avail = NULL;
  if (bc->routing.kind == ROUTE_ZIPF) {
    avail = malloc(sizeof(double) * (size_t)bc->experts);
    if (!avail || zipf_init(&z, opt, bc) != 0) {
      /* Out of memory: fall back to uniform so the inputs stay valid. */
      free(avail);
      avail = NULL;
    }
  }
  for (int64_t t = 0; t < bc->tokens; t++) {
    int64_t *row = idx + t * k;
    switch (bc->routing.kind) {
      case ROUTE_ZIPF:
        if (avail) {
          zipf_pick(&r, &z, k, avail, row);
          break;
        }
        /* fall through */
      case ROUTE_UNIFORM:
        pick_distinct(&r, 0, bc->experts, k, row);
        shuffle_slots(&r, row, k);
        break;
      case ROUTE_ALL_TO_ONE: {
        int m = k < e_loc ? k : e_loc;
        pick_distinct(&r, 0, e_loc, m, row);
        for (int j = m; j < k; j++) row[j] = -1;
        shuffle_slots(&r, row, k);
        break;
      }
    }
    for (int j = 0; j < k; j++) {
      if (bc->routing.holes > 0.0 && rng_unit(&r) < bc->routing.holes) row[j] = -1;
      /* weights in (0, 1], 24 bits: exact in fp32 */
      float w = (float)((rng_next(&r) >> 40) + 1) * 0x1p-24f;
      if (weights) weights[t * k + j] = row[j] < 0 ? 0.0f : w;
    }
  }
  free(avail);
  free(z.w);
}

static void gen_x(const options_t *opt, const bench_case_t *bc, int rank, void *x) {
  rng_t r = {rng_seed_for(opt->seed, bc, rank, 2)};
  const int64_t n = bc->tokens * bc->hidden;
  for (int64_t i = 0; i < n; i++) {
    /* [-4, 4) in steps of 2^-20; rounded to the dtype (finite, never NaN) */
    uint64_t u = rng_next(&r);
    float v = (float)((int64_t)(u >> 41) - (1 << 22)) * 0x1p-20f;
    disco_store_f32(x, i, v, bc->dtype);
  }
}

void world_slot_free(world_slot_t *s) {
  free(s->x);
  free(s->idx);
  free(s->weights);
  if (s->have_ref) disco_ref_output_free(&s->ref);
  free(s->ref_y);
  memset(s, 0, sizeof(*s));
}

static void *alloc_bytes(size_t n) {
  /* 64-byte aligned, never a zero-size request */
  size_t sz = (n + 63) / 64 * 64;
  return aligned_alloc(64, sz ? sz : 64);
}

int gen_rank_inputs(world_slot_t *s, const options_t *opt, const bench_case_t *bc,
                    int world, int rank, int with_x) {
  const size_t elem = disco_dtype_size(bc->dtype);
  const size_t slots = (size_t)bc->tokens * (size_t)bc->topk;
  world_slot_free(s);
  s->tokens = bc->tokens;
  s->idx = alloc_bytes(slots * sizeof(int64_t));
  s->weights = opt->weighted ? alloc_bytes(slots * sizeof(float)) : NULL;
  if (!s->idx || (opt->weighted && !s->weights)) goto oom;
  gen_routing(opt, bc, world, rank, s->idx, s->weights);
  if (with_x) {
    s->x = alloc_bytes((size_t)bc->tokens * (size_t)bc->hidden * elem);
    if (!s->x) goto oom;
    gen_x(opt, bc, rank, s->x);
  }
  return 0;
oom:
  world_slot_free(s);
  return -1;
}

static int64_t pad_up(int64_t n, int a) {
  return a > 1 ? (n + a - 1) / a * a : n;
}

int64_t expected_recv_rows(const world_t *wd, const bench_case_t *bc, int rank) {
  const int e_loc = bc->experts / wd->size;
  const int64_t lo = (int64_t)rank * e_loc, hi = lo + e_loc;
  int64_t rows = 0;
  int64_t *per_expert = calloc((size_t)e_loc + 1, sizeof(int64_t));
  if (!per_expert) return -1;
  for (int s = 0; s < wd->size; s++) {
    const world_slot_t *sl = &wd->slot[s];
    for (int64_t t = 0; t < sl->tokens; t++) {
      int hit = 0;
      for (int j = 0; j < bc->topk; j++) {
        int64_t e = sl->idx[t * bc->topk + j];
        if (e < lo || e >= hi) continue;
        hit = 1;
        per_expert[e - lo]++;
      }
      rows += hit;
    }
  }
  if (bc->layout == DISCO_LAYOUT_EXPERT_MAJOR) {
    rows = 0;
    for (int l = 0; l < e_loc; l++) rows += pad_up(per_expert[l], bc->align);
  }
  free(per_expert);
  return rows;
}

/* Scale of local expert l: one of 1/8 .. 8/8, exact in every dtype. */
static float expert_scale(int64_t l) {
  return (float)(l % 8 + 1) * 0.125f;
}

void expert_outputs(const bench_case_t *bc, int world, int rank, int64_t rows,
                    const void *recv_x, const int32_t *recv_expert,
                    const float *recv_weight, void *y) {
  const int64_t h = bc->hidden;
  const int k = bc->topk;
  const int e_loc = bc->experts / world;
  for (int64_t i = 0; i < rows; i++) {
    float s = 0.0f;
    int any = 0;
    if (bc->layout == DISCO_LAYOUT_EXPERT_MAJOR) {
      int32_t e = recv_expert[i];
      if (e >= 0) {
        s = expert_scale(e - (int64_t)rank * e_loc);
        any = 1;
      }
    } else {
      /* The caller's own reduction over its local experts, weighted, in slot
       * order: s = fold_j w_j * scale(l_j). */
      for (int j = 0; j < k; j++) {
        int32_t l = recv_expert[i * k + j];
        if (l < 0) continue;
        float term = recv_weight[i * k + j] * expert_scale(l);
        s = any ? s + term : term;
        any = 1;
      }
    }
    for (int64_t c = 0; c < h; c++) {
      float v = any ? disco_load_f32(recv_x, i * h + c, bc->dtype) * s : 0.0f;
      disco_store_f32(y, i * h + c, v, bc->dtype);
    }
  }
}
