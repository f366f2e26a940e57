/* nccl_device: opt-in phase timing (DISCO_ND_TRACE=1). The kernels store
 * %globaltimer at the end of each phase of the last DISCO_ND_TRACE_CALLS
 * calls; destroying the comm prints the median length of every phase to
 * stderr, one line per kind and rank. A tuning aid for where the time goes
 * (docs/nccl_device.md): the GPU machines have no profiler. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/nccl/nccl_backend.h"
#include "backend/nccl_device/nd_backend.h"

#define ND_TRACE_WORDS \
  ((size_t)DISCO_ND_TRACE_KINDS * DISCO_ND_TRACE_CALLS * DISCO_ND_TRACE_SLOTS)

disco_result_t disco_nd_trace_init(disco_nd_state_t *st, int rank, const char *fn) {
  const char *env = getenv("DISCO_ND_TRACE");
  unsigned long long *t = NULL;
  disco_result_t rc;
  if (env == NULL || atoi(env) <= 0) return DISCO_SUCCESS;
  rc = disco_nccl_cuda(cudaMalloc((void **)&t, ND_TRACE_WORDS * 8u), fn,
                       "cudaMalloc(trace)", rank);
  if (rc == DISCO_SUCCESS)
    rc = disco_nccl_cuda(cudaMemset(t, 0, ND_TRACE_WORDS * 8u), fn, "cudaMemset", rank);
  if (rc != DISCO_SUCCESS) {
    cudaFree(t);
    return rc;
  }
  st->nd.trace = t;
  return DISCO_SUCCESS;
}

static int nd_cmp_u64(const void *a, const void *b) {
  const unsigned long long x = *(const unsigned long long *)a;
  const unsigned long long y = *(const unsigned long long *)b;
  return x < y ? -1 : x > y;
}

/* Median over calls c of call c's slot i - call (c - back)'s slot j in us,
 * where both are set. back 1, slot 0 against the last: the time from one
 * call's end to the next one's start (calls back to back: the launch and
 * stream work between two kernels, which the host-observed time includes
 * and the kernel's does not). */
static double nd_median(const unsigned long long *ring, unsigned long long first,
                        unsigned long long last, int i, int j, unsigned back,
                        unsigned long long *tmp) {
  int n = 0;
  for (unsigned long long c = first + back; c <= last; c++) {
    const unsigned long long *e =
        ring + (c % DISCO_ND_TRACE_CALLS) * DISCO_ND_TRACE_SLOTS;
    const unsigned long long *f =
        ring + ((c - back) % DISCO_ND_TRACE_CALLS) * DISCO_ND_TRACE_SLOTS;
    if (e[i] != 0ull && f[j] != 0ull && e[i] >= f[j]) tmp[n++] = e[i] - f[j];
  }
  if (n == 0) return -1.0;
  qsort(tmp, (size_t)n, sizeof(*tmp), nd_cmp_u64);
  return (double)tmp[n / 2] / 1000.0;
}

void disco_nd_trace_report(disco_nd_state_t *st, int rank) {
  /* phase i = slot i - slot i-1 ("+": after block 0, until the last block);
   * a name starting with '@' is slot i - slot 0 instead */
  static const char *const names[DISCO_ND_TRACE_KINDS][DISCO_ND_TRACE_SLOTS] = {
      {"", "ack-wait", "@counts-in", "@sent", "@flags-in", "@go", "@expand", "@done",
       /* the latest block: past the acks, out of its sends, into and out of
        * the expand (the spread of the blocks behind @sent and @done) */
       "@all-past-ack", "@all-sent", "@all-expanding", "@all-expanded"},
      {"", "ack-wait", "send", "+last-send", "+flags", "token", "+last-token", ""},
      {"", "ack-wait", "counts+plan", "own-expand", "expand-until-last-flag",
       "last-source-expand", "+last-expand", "@senders-done"},
      {"", "ack-wait", "@status-in", "@last-send", "@block0-tokens", "@last-token", "",
       ""}};
  static const int last[DISCO_ND_TRACE_KINDS] = {7, 6, 6, 5};
  static const char *const kinds[DISCO_ND_TRACE_KINDS] = {
      "dispatch", "combine", "dispatch(pipelined)", "combine(pipelined)"};
  unsigned long long *ring = malloc(ND_TRACE_WORDS * 8u), seq[2],
                     tmp[DISCO_ND_TRACE_CALLS];
  if (ring == NULL ||
      cudaMemcpy(seq, st->nd.seq, sizeof(seq), cudaMemcpyDeviceToHost) != cudaSuccess ||
      cudaMemcpy(ring, st->nd.trace, ND_TRACE_WORDS * 8u, cudaMemcpyDeviceToHost) !=
          cudaSuccess) {
    free(ring);
    return;
  }
  for (int k = 0; k < DISCO_ND_TRACE_KINDS; k++) {
    const unsigned long long sq = seq[k == 1 || k == 3]; /* seq[0]: both dispatch kinds */
    const unsigned long long n = sq < DISCO_ND_TRACE_CALLS ? sq : DISCO_ND_TRACE_CALLS;
    /* the first few calls warm up: skipped when there are enough */
    const unsigned long long skip = n > 8 ? 3 : 0, first = sq - n + 1 + skip;
    const unsigned long long *r =
        ring + (size_t)k * DISCO_ND_TRACE_CALLS * DISCO_ND_TRACE_SLOTS;
    if (n == 0 || nd_median(r, first, sq, last[k], 0, 0, tmp) < 0.0)
      continue; /* not this kind */
    if (n == 0) continue;
    /* one write per line: ranks in threads or processes do not interleave */
    char line[512];
    int len = snprintf(line, sizeof(line),
                       "disco trace rank %d %s, median us of %llu calls:", rank, kinds[k],
                       n - skip);
    for (int i = 1; i < DISCO_ND_TRACE_SLOTS && len < (int)sizeof(line); i++)
      if (names[k][i] != NULL && names[k][i][0] != '\0')
        len += snprintf(
            line + len, sizeof(line) - (size_t)len, " %s %.1f", names[k][i],
            nd_median(r, first, sq, i, names[k][i][0] == '@' ? 0 : i - 1, 0, tmp));
    if (len < (int)sizeof(line))
      snprintf(line + len, sizeof(line) - (size_t)len, " | kernel %.1f gap %.1f\n",
               nd_median(r, first, sq, last[k], 0, 0, tmp),
               nd_median(r, first, sq, 0, last[k], 1, tmp));
    fputs(line, stderr);
  }
  free(ring);
}
