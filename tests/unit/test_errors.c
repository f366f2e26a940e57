/* Result codes: every code has a name and a description; the last error is
 * thread-local. */
#include "unit_util.h"

static void *other_thread(void *p) {
  (void)p;
  /* A fresh thread sees no message, and its failure does not leak. */
  CHECK(disco_last_error()[0] == '\0', "fresh thread message '%s'", disco_last_error());
  disco_comm_t *c[1];
  disco_comm_create_local(1, NULL, c);
  CHECK(disco_last_error()[0] != '\0', "no message after a failure");
  return NULL;
}

int main(void) {
  for (int i = 0; i < DISCO_RESULT_COUNT_; i++) {
    const char *n = disco_result_name((disco_result_t)i);
    const char *s = disco_result_string((disco_result_t)i);
    CHECK(n != NULL && strncmp(n, "DISCO_", 6) == 0, "name of %d", i);
    CHECK(s != NULL && s[0] != '\0', "string of %d", i);
    CHECK(strcmp(n, "DISCO_ERR_UNKNOWN") != 0, "code %d has no name", i);
  }
  CHECK(strcmp(disco_result_name(DISCO_ERR_CAPACITY), "DISCO_ERR_CAPACITY") == 0, "name");
  CHECK(disco_result_name((disco_result_t)999) != NULL, "unknown name NULL");
  CHECK(disco_result_string((disco_result_t)-1) != NULL, "unknown string NULL");
  CHECK(disco_get_version() == DISCO_VERSION, "version");

  CHECK(disco_last_error() != NULL && disco_last_error()[0] == '\0', "initial message");
  disco_config_t c = DISCO_CONFIG_INIT; /* num_experts 0 */
  disco_comm_t *comms[1];
  CHECK_ERR(disco_comm_create_local(1, &c, comms), DISCO_ERR_INVALID_ARGUMENT,
            "num_experts");
  char saved[512];
  snprintf(saved, sizeof(saved), "%s", disco_last_error());
  pthread_t th;
  pthread_create(&th, NULL, other_thread, NULL);
  pthread_join(th, NULL);
  CHECK(strcmp(saved, disco_last_error()) == 0, "message changed by another thread");
  /* A successful call clears it. */
  c.num_experts = 2;
  c.top_k = 1;
  c.hidden = 8;
  CHECK_OK(disco_comm_create_local(1, &c, comms));
  CHECK(disco_last_error()[0] == '\0', "message not cleared: '%s'", disco_last_error());
  disco_comm_destroy(comms[0]);
  return unit_finish("test_errors");
}
