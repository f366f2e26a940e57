/* disco-bench: benchmark and validator for disco dispatch/combine.
 *
 * Options, sweep enumeration, the per-rank driver loop and the exit code:
 * 0 all good, 1 a wrong element or a failed call, 2 bad usage.
 */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"
#include "core/dtype.h"

#ifdef DISCO_HAVE_MPI
#include <mpi.h>
#endif

machine_info_t bench_machine;

/* Rank 0's table rows, kept for --json. */
static case_result_t *g_rows;
static int g_nrows, g_caprows;

static const char usage_text[] =
    "usage: disco-bench [options]\n"
    "Sweeps the product of every list (comma-separated) and prints one row per case.\n"
    "  -b, --backend LIST    local | mpi | nccl | nccl_device (default: nccl when built\n"
    "                        with NCCL and >= 2 GPUs or launched by mpirun; mpi under\n"
    "                        mpirun without GPUs; else local). nccl and nccl_device\n"
    "                        may be listed together (nccl,nccl_device): each case runs\n"
    "                        on both, one row each, on the same NCCL comms\n"
    "  -w, --world N         ranks for local (default 4) and for single-process nccl\n"
    "                        (default: all GPUs); under MPI the MPI world size\n"
    "  -t, --tokens LIST     tokens per rank            (default 128,4096)\n"
    "  -H, --hidden LIST     hidden size                (default 7168)\n"
    "  -k, --topk LIST       experts per token          (default 8)\n"
    "  -e, --experts LIST    experts in total           (default 256)\n"
    "  -d, --dtype LIST      bf16 | fp16 | fp32         (default bf16)\n"
    "  -l, --layout LIST     expert | rank              (default expert)\n"
    "  -r, --routing LIST    uniform | zipf:S | all-to-one, each optionally\n"
    "                        +holes:P (fraction P of -1 slots), e.g. uniform+holes:0.2\n"
    "                        (default uniform)\n"
    "  -a, --align LIST      expert-major row alignment (default 1 = none)\n"
    "  -c, --wire LIST       combine wire: fp32 | dtype (default fp32)\n"
    "      --index T         int64 | int32 topk_idx     (default int64)\n"
    "      --unweighted      dispatch without topk_weights (plain-sum combine)\n"
    "  -n, --iters N         timed iterations           (default 20)\n"
    "  -W, --warmup N        warm-up iterations         (default 5)\n"
    "      --check           compare every output with the reference (default)\n"
    "      --no-check        skip the comparison\n"
    "      --graph           time replays of a CUDA graph of each call (nccl_device;\n"
    "                        the plain exchange too) instead of the calls\n"
    "      --back-to-back    time iterations issued back to back, no sync or barrier\n"
    "                        between them (as the DeepEP/NCCL EP figures were taken)\n"
    "      --lsa             also time the same per-peer bytes pushed by SM stores\n"
    "                        into the peers' NCCL symmetric windows (GPU backends,\n"
    "                        one NVLink domain): the device path's ceiling\n"
    "  -j, --json FILE       also write the results as a JSON array\n"
    "  -s, --seed N          input seed                 (default 1)\n"
    "      --timeout-ms N    disco config timeout_ms    (default 0 = library's)\n"
    "      --corrupt N       testing aid: flip a bit in N elements that rank 0 "
    "received,\n"
    "                        before the check (the run must then exit 1)\n"
    "  -h, --help            this text\n"
    "Exit status: 0 ok, 1 wrong elements or a failed call, 2 bad usage.\n";

static void usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void usage_error(const char *fmt, ...) {
  va_list ap;
  fprintf(stderr, "disco-bench: ");
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fprintf(stderr, "\n%s", usage_text);
  exit(BENCH_EXIT_USAGE);
}

const char *backend_name(backend_kind_t b) {
  return b == BACKEND_MPI           ? "mpi"
         : b == BACKEND_NCCL        ? "nccl"
         : b == BACKEND_NCCL_DEVICE ? "nccl_device"
                                    : "local";
}
const char *dtype_name(disco_dtype_t d) {
  return d == DISCO_DTYPE_FP32 ? "fp32" : d == DISCO_DTYPE_FP16 ? "fp16" : "bf16";
}
const char *layout_name(disco_layout_t l) {
  return l == DISCO_LAYOUT_RANK_MAJOR ? "rank" : "expert";
}
const char *wire_name(disco_combine_wire_t w) {
  return w == DISCO_COMBINE_WIRE_DTYPE ? "dtype" : "fp32";
}

void fail_disco(rank_ctx_t *c, const char *what, disco_result_t rc, const char *msg) {
  fprintf(stderr, "disco-bench: rank %d: %s failed: %s: %s\n", c->rank, what,
          disco_result_name(rc), msg ? msg : disco_last_error());
  c->g->abort(c, 1);
}

void fail_msg(rank_ctx_t *c, const char *fmt, ...) {
  va_list ap;
  fprintf(stderr, "disco-bench: rank %d: ", c->rank);
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
  c->g->abort(c, 1);
}

/* ---- option parsing ------------------------------------------------------------ */

static int64_t parse_int(const char *opt, const char *s, int64_t lo, int64_t hi) {
  char *end;
  errno = 0;
  long long v = strtoll(s, &end, 10);
  if (errno || end == s || *end || v < lo || v > hi)
    usage_error("%s: '%s' is not an integer in [%lld, %lld]", opt, s, (long long)lo,
                (long long)hi);
  return v;
}

static double parse_real(const char *opt, const char *s, double lo, double hi) {
  char *end;
  errno = 0;
  double v = strtod(s, &end);
  if (errno || end == s || *end || !isfinite(v) || v < lo || v > hi)
    usage_error("%s: '%s' is not a number in [%g, %g]", opt, s, lo, hi);
  return v;
}

/* Splits a comma list into at most BENCH_MAX_LIST items (in place in a copy). */
static int split_list(const char *opt, const char *arg, char *buf, size_t bufsz,
                      char **items) {
  int n = 0;
  if (strlen(arg) >= bufsz) usage_error("%s: list too long", opt);
  strcpy(buf, arg);
  for (char *p = buf;;) {
    char *comma = strchr(p, ',');
    if (comma) *comma = '\0';
    if (!*p) usage_error("%s: empty item in '%s'", opt, arg);
    if (n == BENCH_MAX_LIST) usage_error("%s: more than %d items", opt, BENCH_MAX_LIST);
    items[n++] = p;
    if (!comma) break;
    p = comma + 1;
  }
  return n;
}

static void parse_routing(const char *opt, const char *item, routing_t *r) {
  char buf[128], *save = NULL;
  int have_base = 0, have_holes = 0;
  if (strlen(item) >= sizeof(buf)) usage_error("%s: '%s' too long", opt, item);
  strcpy(buf, item);
  memset(r, 0, sizeof(*r));
  r->kind = ROUTE_UNIFORM;
  for (char *t = strtok_r(buf, "+", &save); t; t = strtok_r(NULL, "+", &save)) {
    if (!strcmp(t, "uniform") || !strcmp(t, "all-to-one") || !strncmp(t, "zipf:", 5)) {
      if (have_base) usage_error("%s: '%s' names two distributions", opt, item);
      have_base = 1;
      if (t[0] == 'z') {
        r->kind = ROUTE_ZIPF;
        r->zipf_s = parse_real(opt, t + 5, 0.0, 100.0);
      } else {
        r->kind = t[0] == 'u' ? ROUTE_UNIFORM : ROUTE_ALL_TO_ONE;
      }
    } else if (!strncmp(t, "holes:", 6)) {
      if (have_holes) usage_error("%s: '%s' has holes twice", opt, item);
      have_holes = 1;
      r->holes = parse_real(opt, t + 6, 0.0, 1.0);
    } else {
      usage_error("%s: unknown routing '%s' (uniform, zipf:S, all-to-one, holes:P)", opt,
                  t);
    }
  }
  if (!have_base && !have_holes) usage_error("%s: empty routing '%s'", opt, item);
  int len =
      r->kind == ROUTE_ZIPF ? snprintf(r->name, sizeof(r->name), "zipf:%g", r->zipf_s)
      : r->kind == ROUTE_ALL_TO_ONE ? snprintf(r->name, sizeof(r->name), "all-to-one")
                                    : snprintf(r->name, sizeof(r->name), "uniform");
  if (have_holes && r->holes > 0.0)
    snprintf(r->name + len, sizeof(r->name) - (size_t)len, "+holes:%g", r->holes);
}

enum {
  OPT_CHECK = 256,
  OPT_NO_CHECK,
  OPT_GRAPH,
  OPT_BACK_TO_BACK,
  OPT_LSA,
  OPT_INDEX,
  OPT_UNWEIGHTED,
  OPT_TIMEOUT,
  OPT_CORRUPT,
};

static void parse_options(int argc, char **argv, options_t *o) {
  static const struct option longopts[] = {
      {"backend", required_argument, NULL, 'b'},
      {"world", required_argument, NULL, 'w'},
      {"tokens", required_argument, NULL, 't'},
      {"hidden", required_argument, NULL, 'H'},
      {"topk", required_argument, NULL, 'k'},
      {"top-k", required_argument, NULL, 'k'},
      {"experts", required_argument, NULL, 'e'},
      {"dtype", required_argument, NULL, 'd'},
      {"layout", required_argument, NULL, 'l'},
      {"routing", required_argument, NULL, 'r'},
      {"align", required_argument, NULL, 'a'},
      {"alignment", required_argument, NULL, 'a'},
      {"wire", required_argument, NULL, 'c'},
      {"combine-wire", required_argument, NULL, 'c'},
      {"index", required_argument, NULL, OPT_INDEX},
      {"unweighted", no_argument, NULL, OPT_UNWEIGHTED},
      {"iters", required_argument, NULL, 'n'},
      {"warmup", required_argument, NULL, 'W'},
      {"check", no_argument, NULL, OPT_CHECK},
      {"no-check", no_argument, NULL, OPT_NO_CHECK},
      {"graph", no_argument, NULL, OPT_GRAPH},
      {"back-to-back", no_argument, NULL, OPT_BACK_TO_BACK},
      {"lsa", no_argument, NULL, OPT_LSA},
      {"json", required_argument, NULL, 'j'},
      {"seed", required_argument, NULL, 's'},
      {"timeout-ms", required_argument, NULL, OPT_TIMEOUT},
      {"corrupt", required_argument, NULL, OPT_CORRUPT},
      {"help", no_argument, NULL, 'h'},
      {NULL, 0, NULL, 0},
  };
  char buf[4096], *items[BENCH_MAX_LIST];
  int ch, n;
  memset(o, 0, sizeof(*o));
  o->tokens[0] = 128;
  o->tokens[1] = 4096;
  o->n_tokens = 2;
  o->hidden[0] = 7168;
  o->n_hidden = 1;
  o->topk[0] = 8;
  o->n_topk = 1;
  o->experts[0] = 256;
  o->n_experts = 1;
  o->dtypes[0] = DISCO_DTYPE_BF16;
  o->n_dtypes = 1;
  o->layouts[0] = DISCO_LAYOUT_EXPERT_MAJOR;
  o->n_layouts = 1;
  parse_routing("--routing", "uniform", &o->routings[0]);
  o->n_routings = 1;
  o->aligns[0] = 1;
  o->n_aligns = 1;
  o->wires[0] = DISCO_COMBINE_WIRE_FP32;
  o->n_wires = 1;
  o->index_type = DISCO_INDEX_INT64;
  o->iters = 20;
  o->warmup = 5;
  o->check = 1;
  o->weighted = 1;
  o->seed = 1;
  opterr = 1;
  while ((ch = getopt_long(argc, argv, "b:w:t:H:k:e:d:l:r:a:c:n:W:j:s:h", longopts,
                           NULL)) != -1) {
    const char *name = "option";
    for (int i = 0; longopts[i].name; i++)
      if (longopts[i].val == ch) {
        name = longopts[i].name;
        break;
      }
    switch (ch) {
      case 'b':
        n = o->n_backends = split_list(name, optarg, buf, sizeof(buf), items);
        for (int i = 0; i < n; i++) {
          if (!strcmp(items[i], "local"))
            o->backends[i] = BACKEND_LOCAL;
          else if (!strcmp(items[i], "mpi"))
            o->backends[i] = BACKEND_MPI;
          else if (!strcmp(items[i], "nccl"))
            o->backends[i] = BACKEND_NCCL;
          else if (!strcmp(items[i], "nccl_device"))
            o->backends[i] = BACKEND_NCCL_DEVICE;
          else
            usage_error("--backend: unknown backend '%s' (local, mpi, nccl, nccl_device)",
                        items[i]);
          for (int j = 0; j < i; j++)
            if (o->backends[j] == o->backends[i])
              usage_error("--backend: '%s' listed twice", items[i]);
        }
        /* local and mpi have their own process groups: one run each */
        for (int i = 0; i < n; i++)
          if (n > 1 && (o->backends[i] == BACKEND_LOCAL || o->backends[i] == BACKEND_MPI))
            usage_error("--backend: %s cannot be combined with other backends in one run",
                        backend_name(o->backends[i]));
        o->backend =
            o->backends[0] == BACKEND_NCCL_DEVICE ? BACKEND_NCCL : o->backends[0];
        o->backend_given = 1;
        break;
      case 'w':
        o->world = (int)parse_int("--world", optarg, 1, BENCH_MAX_WORLD);
        break;
      case 't':
        n = o->n_tokens = split_list(name, optarg, buf, sizeof(buf), items);
        for (int i = 0; i < n; i++) o->tokens[i] = parse_int(name, items[i], 0, 1 << 24);
        break;
      case 'H':
        n = o->n_hidden = split_list(name, optarg, buf, sizeof(buf), items);
        for (int i = 0; i < n; i++) o->hidden[i] = parse_int(name, items[i], 1, 1 << 20);
        break;
      case 'k':
        n = o->n_topk = split_list(name, optarg, buf, sizeof(buf), items);
        for (int i = 0; i < n; i++)
          o->topk[i] = (int)parse_int(name, items[i], 1, DISCO_MAX_TOP_K);
        break;
      case 'e':
        n = o->n_experts = split_list(name, optarg, buf, sizeof(buf), items);
        for (int i = 0; i < n; i++)
          o->experts[i] = (int)parse_int(name, items[i], 1, 1 << 20);
        break;
      case 'd':
        n = o->n_dtypes = split_list(name, optarg, buf, sizeof(buf), items);
        for (int i = 0; i < n; i++) {
          if (!strcmp(items[i], "bf16"))
            o->dtypes[i] = DISCO_DTYPE_BF16;
          else if (!strcmp(items[i], "fp16"))
            o->dtypes[i] = DISCO_DTYPE_FP16;
          else if (!strcmp(items[i], "fp32"))
            o->dtypes[i] = DISCO_DTYPE_FP32;
          else
            usage_error("--dtype: unknown dtype '%s' (bf16, fp16, fp32)", items[i]);
        }
        break;
      case 'l':
        n = o->n_layouts = split_list(name, optarg, buf, sizeof(buf), items);
        for (int i = 0; i < n; i++) {
          if (!strcmp(items[i], "expert"))
            o->layouts[i] = DISCO_LAYOUT_EXPERT_MAJOR;
          else if (!strcmp(items[i], "rank"))
            o->layouts[i] = DISCO_LAYOUT_RANK_MAJOR;
          else
            usage_error("--layout: unknown layout '%s' (expert, rank)", items[i]);
        }
        break;
      case 'r':
        n = o->n_routings = split_list(name, optarg, buf, sizeof(buf), items);
        for (int i = 0; i < n; i++) parse_routing("--routing", items[i], &o->routings[i]);
        break;
      case 'a':
        n = o->n_aligns = split_list(name, optarg, buf, sizeof(buf), items);
        for (int i = 0; i < n; i++)
          o->aligns[i] = (int)parse_int(name, items[i], 0, 1 << 16);
        break;
      case 'c':
        n = o->n_wires = split_list(name, optarg, buf, sizeof(buf), items);
        for (int i = 0; i < n; i++) {
          if (!strcmp(items[i], "fp32"))
            o->wires[i] = DISCO_COMBINE_WIRE_FP32;
          else if (!strcmp(items[i], "dtype"))
            o->wires[i] = DISCO_COMBINE_WIRE_DTYPE;
          else
            usage_error("--wire: unknown combine wire '%s' (fp32, dtype)", items[i]);
        }
        break;
      case OPT_INDEX:
        if (!strcmp(optarg, "int64"))
          o->index_type = DISCO_INDEX_INT64;
        else if (!strcmp(optarg, "int32"))
          o->index_type = DISCO_INDEX_INT32;
        else
          usage_error("--index: unknown index type '%s' (int64, int32)", optarg);
        break;
      case OPT_UNWEIGHTED:
        o->weighted = 0;
        break;
      case 'n':
        o->iters = (int)parse_int("--iters", optarg, 1, 1000000);
        break;
      case 'W':
        o->warmup = (int)parse_int("--warmup", optarg, 0, 1000000);
        break;
      case OPT_CHECK:
        o->check = 1;
        break;
      case OPT_NO_CHECK:
        o->check = 0;
        break;
      case OPT_GRAPH:
        o->graph = 1;
        break;
      case OPT_BACK_TO_BACK:
        o->back_to_back = 1;
        break;
      case OPT_LSA:
        o->lsa = 1;
        break;
      case 'j':
        if (!*optarg) usage_error("--json: empty file name");
        o->json_path = optarg;
        break;
      case 's':
        o->seed = (uint64_t)parse_int("--seed", optarg, 0, INT64_MAX);
        break;
      case OPT_TIMEOUT:
        o->timeout_ms = (int)parse_int("--timeout-ms", optarg, 0, INT32_MAX);
        break;
      case OPT_CORRUPT:
        o->corrupt = parse_int("--corrupt", optarg, 0, INT64_MAX);
        break;
      case 'h':
        fputs(usage_text, stdout);
        exit(0);
      default: /* getopt_long already named the bad option */
        fputs(usage_text, stderr);
        exit(BENCH_EXIT_USAGE);
    }
  }
  if (optind < argc) usage_error("unexpected argument '%s'", argv[optind]);
}

/* ---- the sweep ------------------------------------------------------------------- */

static const char *skip_reason(const bench_case_t *bc, int world, char *buf, size_t n) {
  if (bc->experts % world) {
    snprintf(buf, n, "experts %d not a multiple of world %d", bc->experts, world);
    return buf;
  }
  if (bc->topk > bc->experts && bc->routing.kind != ROUTE_ALL_TO_ONE) {
    snprintf(buf, n, "top-k %d > experts %d", bc->topk, bc->experts);
    return buf;
  }
  if (bc->hidden * (int64_t)disco_dtype_size(bc->dtype) % 16) {
    snprintf(buf, n, "hidden %lld * %zu bytes not a multiple of 16",
             (long long)bc->hidden, disco_dtype_size(bc->dtype));
    return buf;
  }
  return NULL;
}

static void summarize(case_result_t *cr, const bench_case_t *bc, int world,
                      const rank_result_t *all, int check) {
  memset(cr, 0, sizeof(*cr));
  cr->c = *bc;
  cr->world = world;
  cr->plain_disp_us = cr->plain_comb_us = -1.0;
  cr->lsa_disp_us = cr->lsa_comb_us = -1.0;
  cr->wrong = check ? 0 : -1;
  for (int r = 0; r < world; r++) {
    const rank_result_t *x = &all[r];
    if (x->disp_us > all[cr->slow_disp_rank].disp_us) cr->slow_disp_rank = r;
    if (x->comb_us > all[cr->slow_comb_rank].comb_us) cr->slow_comb_rank = r;
    if (x->plain_disp_us > cr->plain_disp_us) cr->plain_disp_us = x->plain_disp_us;
    if (x->plain_comb_us > cr->plain_comb_us) cr->plain_comb_us = x->plain_comb_us;
    if (x->lsa_disp_us > cr->lsa_disp_us) cr->lsa_disp_us = x->lsa_disp_us;
    if (x->lsa_comb_us > cr->lsa_comb_us) cr->lsa_comb_us = x->lsa_comb_us;
    if (check)
      cr->wrong += (x->wrong_disp > 0 ? x->wrong_disp : 0) +
                   (x->wrong_comb > 0 ? x->wrong_comb : 0);
  }
  const rank_result_t *sd = &all[cr->slow_disp_rank], *sc = &all[cr->slow_comb_rank];
  cr->disp_us = sd->disp_us;
  cr->comb_us = sc->comb_us;
  cr->disp_gbps = sd->disp_us > 0 ? (double)sd->disp_bytes / (sd->disp_us * 1e3) : 0.0;
  cr->comb_gbps = sc->comb_us > 0 ? (double)sc->comb_bytes / (sc->comb_us * 1e3) : 0.0;
}

static void record_row(rank_ctx_t *c, const case_result_t *cr, const rank_result_t *all) {
  if (g_nrows == g_caprows) {
    int ncap = g_caprows ? 2 * g_caprows : 64;
    case_result_t *p = realloc(g_rows, sizeof(*p) * (size_t)ncap);
    if (!p) fail_msg(c, "out of host memory");
    g_rows = p;
    g_caprows = ncap;
  }
  case_result_t *dst = &g_rows[g_nrows++];
  *dst = *cr;
  dst->per_rank = malloc(sizeof(rank_result_t) * (size_t)c->world);
  if (!dst->per_rank) fail_msg(c, "out of host memory");
  memcpy(dst->per_rank, all, sizeof(rank_result_t) * (size_t)c->world);
}

void rank_main(rank_ctx_t *c) {
  const options_t *o = c->opt;
  const int plain =
      (c->d->plain_exchange != NULL) | (o->lsa && c->d->lsa_exchange != NULL ? 2 : 0);
  rank_result_t *all = NULL;
  int index = 0;
  char why[160];
  if (c->rank == 0) {
    all = calloc((size_t)c->world, sizeof(*all));
    if (!all) fail_msg(c, "out of host memory");
    output_header(stdout, o, c->world, plain);
  }
  for (int id = 0; id < o->n_dtypes; id++)
    for (int il = 0; il < o->n_layouts; il++)
      for (int ir = 0; ir < o->n_routings; ir++)
        for (int iw = 0; iw < o->n_wires; iw++)
          for (int ia = 0; ia < o->n_aligns; ia++)
            for (int ie = 0; ie < o->n_experts; ie++)
              for (int ik = 0; ik < o->n_topk; ik++)
                for (int ih = 0; ih < o->n_hidden; ih++)
                  for (int it = 0; it < o->n_tokens; it++) {
                    bench_case_t bc = {index,          o->tokens[it],   o->hidden[ih],
                                       o->topk[ik],    o->experts[ie],  o->dtypes[id],
                                       o->layouts[il], o->routings[ir], o->aligns[ia],
                                       o->wires[iw],   o->backends[0]};
                    rank_result_t mine;
                    if (skip_reason(&bc, c->world, why, sizeof(why))) {
                      if (c->rank == 0) output_skip(stdout, &bc, why);
                      index++;
                      continue;
                    }
                    for (int ib = 0; ib < o->n_backends; ib++) { /* side by side */
                      bc.index = index++;
                      bc.backend = c->backend = o->backends[ib];
                      bench_case_run(c, &bc, &mine);
                      c->g->gather(c, &mine, all, sizeof(mine));
                      if (c->rank == 0) {
                        case_result_t cr;
                        summarize(&cr, &bc, c->world, all, o->check);
                        output_row(stdout, &cr, plain, o->n_backends > 1);
                        record_row(c, &cr, all);
                        if (cr.wrong > 0) c->exit_code = BENCH_EXIT_WRONG;
                      }
                    }
                  }
  if (c->rank == 0) {
    int64_t wrong = 0;
    for (int i = 0; i < g_nrows; i++) wrong += g_rows[i].wrong > 0 ? g_rows[i].wrong : 0;
    printf("# %d case(s), %s\n", g_nrows,
           !o->check ? "not checked"
           : wrong   ? "WRONG ELEMENTS FOUND"
                     : "all outputs match the reference");
    if (wrong) printf("# total wrong elements: %lld\n", (long long)wrong);
    fflush(stdout);
    if (o->json_path &&
        output_json(o->json_path, o, &bench_machine, g_rows, g_nrows) != 0) {
      fprintf(stderr, "disco-bench: cannot write %s\n", o->json_path);
      c->exit_code = 1;
    }
    for (int i = 0; i < g_nrows; i++) free(g_rows[i].per_rank);
    free(g_rows);
    g_rows = NULL;
    g_nrows = g_caprows = 0;
  }
  free(all);
}

/* ---- main -------------------------------------------------------------------------- */

/* World size announced by an MPI launcher, 0 when not launched by one. */
static int launcher_world(void) {
  static const char *vars[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE",
                               "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS"};
  for (size_t i = 0; i < sizeof(vars) / sizeof(vars[0]); i++) {
    const char *v = getenv(vars[i]);
    if (v && atoi(v) > 0) return atoi(v);
  }
  return 0;
}

int main(int argc, char **argv) {
  options_t opt;
  int exit_code = 0, rc = 0;
  int under_mpi;
  parse_options(argc, argv, &opt);
  under_mpi = launcher_world() > 1;
  host_machine_info(&bench_machine);

  if (!opt.backend_given) {
    opt.backend = BACKEND_LOCAL;
    opt.n_backends = 1;
#ifdef DISCO_HAVE_NCCL
    int ngpu = nccl_device_count();
#ifdef DISCO_HAVE_MPI
    if (under_mpi && ngpu >= 1) opt.backend = BACKEND_NCCL;
#endif
    if (!under_mpi && ngpu >= 2) opt.backend = BACKEND_NCCL;
#endif
#ifdef DISCO_HAVE_MPI
    if (under_mpi && opt.backend == BACKEND_LOCAL) opt.backend = BACKEND_MPI;
#endif
    opt.backends[0] = opt.backend;
  }

  switch (opt.backend) {
    case BACKEND_LOCAL:
      rc = run_local(&opt, opt.world ? opt.world : 4, &exit_code);
      break;
    case BACKEND_MPI:
#ifdef DISCO_HAVE_MPI
      MPI_Init(&argc, &argv);
      {
        int size;
        MPI_Comm_size(MPI_COMM_WORLD, &size);
        if (opt.world && opt.world != size) {
          int rank;
          MPI_Comm_rank(MPI_COMM_WORLD, &rank);
          if (rank == 0)
            fprintf(stderr,
                    "disco-bench: --world %d differs from the MPI world size %d\n%s",
                    opt.world, size, usage_text);
          MPI_Finalize();
          return BENCH_EXIT_USAGE;
        }
      }
      rc = run_mpi(&opt, &exit_code);
      MPI_Finalize();
#else
      usage_error("--backend mpi: this build has no MPI backend");
#endif
      break;
    case BACKEND_NCCL:
    case BACKEND_NCCL_DEVICE: /* not set: nccl_device runs in the nccl environment */
#ifdef DISCO_HAVE_NCCL
#ifdef DISCO_HAVE_MPI
      if (under_mpi) {
        MPI_Init(&argc, &argv);
        rc = run_nccl(&opt, 1, &exit_code);
        MPI_Finalize();
        break;
      }
#endif
      rc = run_nccl(&opt, 0, &exit_code);
#else
      usage_error("--backend %s: this build has no NCCL backend",
                  backend_name(opt.backends[0]));
#endif
      break;
  }
  (void)under_mpi;
  if (rc != 0) return rc;
  return exit_code;
}
