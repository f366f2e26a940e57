/* Concurrency (run under TSan in CI): two independent local groups of W=4
 * ranks do dispatch/combine rounds at the same time, each checked against
 * disco_ref; handles are reused across rounds and layouts. */
#include <pthread.h>
#include <stdio.h>

#include "harness.h"
#include "world.h"

#define ROUNDS 6

typedef struct group {
  int id;
  disco_config_t cfg;
} group_t;

static void group_main(int gid, void *p) {
  group_t *g = &((group_t *)p)[gid];
  const int world = 4;
  disco_comm_t *comms[4];
  disco_handle_t *handles[4] = {NULL, NULL, NULL, NULL};
  if (th_comms_create(world, &g->cfg, comms) != 0) return;
  for (int r = 0; r < world; r++)
    TH_EXPECT_RC(disco_handle_create(comms[r], &handles[r]), DISCO_SUCCESS,
                 "group %d handle %d", g->id, r);
  for (int it = 0; it < ROUNDS; it++) {
    int64_t tokens[4];
    for (int r = 0; r < world; r++) tokens[r] = (it + r + g->id) % 5 == 0 ? 0 : 24 - it;
    th_world_t w;
    th_world_init(&w, &g->cfg, world, tokens,
                  (th_route_t)((it + g->id) % TH_ROUTE_COUNT_), it % 2, 0,
                  th_seed((uint64_t)g->id, (uint64_t)it));
    th_round_opts_t o = {0};
    o.layout = (disco_layout_t)(it % 2);
    o.expert_alignment = it % 3 + 1;
    o.combine_weighted = 1;
    o.reuse = (th_reuse_t)(it % 3);
    o.combines = 2;
    th_round_run(&w, comms, handles, &o, th_seed(7, (uint64_t)it));
    th_world_free(&w);
  }
  th_comms_destroy(world, comms, handles);
}

int main(void) {
  group_t groups[2];
  for (int g = 0; g < 2; g++) {
    disco_config_t cfg = DISCO_CONFIG_INIT;
    cfg.num_experts = g ? 16 : 8;
    cfg.top_k = g ? 4 : 2;
    cfg.hidden = g ? 16 : 8;
    cfg.max_tokens = 24;
    cfg.dtype = g ? DISCO_DTYPE_BF16 : DISCO_DTYPE_FP32;
    cfg.combine_wire = (disco_combine_wire_t)g;
    groups[g] = (group_t){g, cfg};
  }
  th_run(2, group_main, groups); /* both groups at once */
  return th_finish("test_threads");
}
