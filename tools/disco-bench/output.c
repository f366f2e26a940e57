/* disco-bench: the stdout table and the --json file. */
#include <stdio.h>
#include <string.h>

#include "bench.h"

static void routing_list(char *buf, size_t n, const options_t *o) {
  size_t len = 0;
  buf[0] = '\0';
  for (int i = 0; i < o->n_routings && len < n; i++)
    len +=
        (size_t)snprintf(buf + len, n - len, "%s%s", i ? "," : "", o->routings[i].name);
}

static void backend_list(char *buf, size_t n, const options_t *o) {
  size_t len = 0;
  buf[0] = '\0';
  for (int i = 0; i < o->n_backends && len < n; i++)
    len += (size_t)snprintf(buf + len, n - len, "%s%s", i ? "," : "",
                            backend_name(o->backends[i]));
}

void output_header(FILE *f, const options_t *o, int world, int plain) {
  char routes[256], backends[256];
  routing_list(routes, sizeof(routes), o);
  backend_list(backends, sizeof(backends), o);
  fprintf(f,
          "# disco-bench: backend %s, world %d, iters %d, warmup %d, check %s, seed %llu,"
          " index %s, %s\n",
          backends, world, o->iters, o->warmup, o->check ? "on" : "off",
          (unsigned long long)o->seed,
          o->index_type == DISCO_INDEX_INT32 ? "int32" : "int64",
          o->weighted ? "weighted" : "unweighted");
  if (o->back_to_back)
    fprintf(f, "# timing: back to back (no stream sync or barrier between iterations)\n");
  else
    fprintf(f, "# timing: idle stream (stream sync and barrier before each iteration)\n");
  if (o->graph)
    fprintf(f, "# timing: CUDA graph replays where the backend can be captured\n");
  if (bench_machine.gpu[0])
    fprintf(f, "# host %s, GPU %s (x%d)\n", bench_machine.host, bench_machine.gpu,
            bench_machine.num_gpus);
  else
    fprintf(f, "# host %s\n", bench_machine.host);
  fprintf(
      f,
      "# tokens per rank; us = median over iterations, slowest rank; GB/s = bytes that"
      " rank receives in\n# dispatch / sends in combine (tokens x hidden x dtype, own"
      " tokens included) / time\n");
  if (plain)
    fprintf(f,
            "# nccl_*: grouped ncclSend/ncclRecv of the same per-peer bytes; x = disco /"
            " nccl time\n");
  if (plain & 2)
    fprintf(f,
            "# lsa_*: the same per-peer bytes stored by SM threads into the peers' NCCL"
            " windows, one flag each\n");
  fprintf(f, "#\n");
  fprintf(f, "#");
  if (o->n_backends > 1) fprintf(f, " %-11s", "backend");
  fprintf(f, " %7s %6s %3s %5s %5s %6s %-18s %5s %5s %10s %10s %9s %9s", "tokens",
          "hidden", "K", "E", "dtype", "layout", "routing", "align", "wire", "disp_us",
          "comb_us", "disp_GB/s", "comb_GB/s");
  if (plain)
    fprintf(f, " %10s %10s %7s %7s", "nccl_d_us", "nccl_c_us", "disp_x", "comb_x");
  if (plain & 2) fprintf(f, " %10s %10s", "lsa_d_us", "lsa_c_us");
  fprintf(f, " %8s\n", "#wrong");
  fflush(f);
}

void output_row(FILE *f, const case_result_t *r, int plain, int show_backend) {
  const bench_case_t *c = &r->c;
  fprintf(f, " ");
  if (show_backend) fprintf(f, " %-11s", backend_name(c->backend));
  fprintf(f, " %7lld %6lld %3d %5d %5s %6s %-18s %5d %5s %10.1f %10.1f %9.2f %9.2f",
          (long long)c->tokens, (long long)c->hidden, c->topk, c->experts,
          dtype_name(c->dtype), layout_name(c->layout), c->routing.name, c->align,
          wire_name(c->wire), r->disp_us, r->comb_us, r->disp_gbps, r->comb_gbps);
  if (plain) {
    if (r->plain_disp_us > 0 && r->plain_comb_us > 0)
      fprintf(f, " %10.1f %10.1f %7.2f %7.2f", r->plain_disp_us, r->plain_comb_us,
              r->disp_us / r->plain_disp_us, r->comb_us / r->plain_comb_us);
    else
      fprintf(f, " %10s %10s %7s %7s", "-", "-", "-", "-");
  }
  if (plain & 2) {
    if (r->lsa_disp_us > 0 && r->lsa_comb_us > 0)
      fprintf(f, " %10.1f %10.1f", r->lsa_disp_us, r->lsa_comb_us);
    else
      fprintf(f, " %10s %10s", "-", "-");
  }
  if (r->wrong < 0)
    fprintf(f, " %8s\n", "-");
  else
    fprintf(f, " %8lld\n", (long long)r->wrong);
  fflush(f);
}

void output_skip(FILE *f, const bench_case_t *c, const char *why) {
  fprintf(f, "# skip: tokens %lld hidden %lld K %d E %d %s %s %s: %s\n",
          (long long)c->tokens, (long long)c->hidden, c->topk, c->experts,
          dtype_name(c->dtype), layout_name(c->layout), c->routing.name, why);
  fflush(f);
}

static void json_str(FILE *f, const char *s) {
  fputc('"', f);
  for (; *s; s++) {
    unsigned char ch = (unsigned char)*s;
    if (ch == '"' || ch == '\\')
      fprintf(f, "\\%c", ch);
    else if (ch < 0x20)
      fprintf(f, "\\u%04x", ch);
    else
      fputc(ch, f);
  }
  fputc('"', f);
}

static void json_num(FILE *f, double v) {
  if (v < 0)
    fputs("null", f);
  else
    fprintf(f, "%.3f", v);
}

static void json_machine(FILE *f, const machine_info_t *m) {
  fputs("{\"host\": ", f);
  json_str(f, m->host);
  fputs(", \"gpu\": ", f);
  if (m->gpu[0])
    json_str(f, m->gpu);
  else
    fputs("null", f);
  fprintf(f,
          ", \"num_gpus\": %d, \"cuda_runtime\": %d, \"cuda_driver\": %d, "
          "\"nccl_version\": %d, \"disco_version\": %d}",
          m->num_gpus, m->cuda_runtime, m->cuda_driver, m->nccl_version,
          disco_get_version());
}

int output_json(const char *path, const options_t *o, const machine_info_t *m,
                const case_result_t *rows, int n) {
  FILE *f = fopen(path, "w");
  int rc = -1;
  if (!f) return -1;
  fputs("[\n", f);
  for (int i = 0; i < n; i++) {
    const case_result_t *r = &rows[i];
    const bench_case_t *c = &r->c;
    fprintf(f,
            "  {\"backend\": \"%s\", \"world\": %d, \"tokens\": %lld, \"hidden\": %lld, "
            "\"top_k\": %d, \"experts\": %d, \"dtype\": \"%s\", \"layout\": \"%s\", "
            "\"routing\": ",
            backend_name(c->backend), r->world, (long long)c->tokens,
            (long long)c->hidden, c->topk, c->experts, dtype_name(c->dtype),
            layout_name(c->layout));
    json_str(f, c->routing.name);
    fprintf(f,
            ", \"alignment\": %d, \"combine_wire\": \"%s\", \"index_type\": \"%s\", "
            "\"weighted\": %s, \"iters\": %d, \"warmup\": %d, \"seed\": %llu, "
            "\"check\": %s, \"timing\": \"%s\",\n   ",
            c->align, wire_name(c->wire),
            o->index_type == DISCO_INDEX_INT32 ? "int32" : "int64",
            o->weighted ? "true" : "false", o->iters, o->warmup,
            (unsigned long long)o->seed, o->check ? "true" : "false",
            o->back_to_back ? "back_to_back" : "idle");
    fputs("\"dispatch_us\": ", f);
    json_num(f, r->disp_us);
    fputs(", \"combine_us\": ", f);
    json_num(f, r->comb_us);
    fputs(", \"dispatch_gbps\": ", f);
    json_num(f, r->disp_gbps);
    fputs(", \"combine_gbps\": ", f);
    json_num(f, r->comb_gbps);
    fputs(", \"nccl_dispatch_us\": ", f);
    json_num(f, r->plain_disp_us);
    fputs(", \"nccl_combine_us\": ", f);
    json_num(f, r->plain_comb_us);
    fputs(", \"lsa_dispatch_us\": ", f);
    json_num(f, r->lsa_disp_us);
    fputs(", \"lsa_combine_us\": ", f);
    json_num(f, r->lsa_comb_us);
    fputs(", \"dispatch_ratio\": ", f);
    json_num(f, r->plain_disp_us > 0 ? r->disp_us / r->plain_disp_us : -1.0);
    fputs(", \"combine_ratio\": ", f);
    json_num(f, r->plain_comb_us > 0 ? r->comb_us / r->plain_comb_us : -1.0);
    if (r->wrong < 0)
      fputs(", \"wrong\": null", f);
    else
      fprintf(f, ", \"wrong\": %lld", (long long)r->wrong);
    fprintf(f, ", \"slowest_dispatch_rank\": %d, \"slowest_combine_rank\": %d,\n   ",
            r->slow_disp_rank, r->slow_comb_rank);
    fputs("\"machine\": ", f);
    json_machine(f, m);
    fputs(",\n   \"per_rank\": [", f);
    for (int k = 0; k < r->world; k++) {
      const rank_result_t *p = &r->per_rank[k];
      fprintf(f, "%s\n    {\"rank\": %d, \"dispatch_us\": ", k ? "," : "", k);
      json_num(f, p->disp_us);
      fputs(", \"combine_us\": ", f);
      json_num(f, p->comb_us);
      fputs(", \"nccl_dispatch_us\": ", f);
      json_num(f, p->plain_disp_us);
      fputs(", \"nccl_combine_us\": ", f);
      json_num(f, p->plain_comb_us);
      fputs(", \"lsa_dispatch_us\": ", f);
      json_num(f, p->lsa_disp_us);
      fputs(", \"lsa_combine_us\": ", f);
      json_num(f, p->lsa_comb_us);
      fprintf(
          f, ", \"dispatch_bytes\": %lld, \"combine_bytes\": %lld, \"recv_rows\": %lld",
          (long long)p->disp_bytes, (long long)p->comb_bytes, (long long)p->recv_rows);
      fprintf(f, ", \"graph\": %s", p->graph ? "true" : "false");
      if (p->wrong_disp < 0)
        fputs(", \"wrong_dispatch\": null, \"wrong_combine\": null}", f);
      else
        fprintf(f, ", \"wrong_dispatch\": %lld, \"wrong_combine\": %lld}",
                (long long)p->wrong_disp, (long long)p->wrong_comb);
    }
    fprintf(f, "]}%s\n", i + 1 < n ? "," : "");
  }
  fputs("]\n", f);
  rc = ferror(f) ? -1 : 0;
  if (fclose(f) != 0) rc = -1;
  return rc;
}
