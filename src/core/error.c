#include "core/error.h"

#include <stdarg.h>
#include <stdio.h>

#define DISCO_ERROR_MSG_LEN 512

static _Thread_local char last_error[DISCO_ERROR_MSG_LEN];

disco_result_t disco_error(disco_result_t code, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(last_error, sizeof(last_error), fmt, ap);
  va_end(ap);
  return code;
}

void disco_error_clear(void) {
  last_error[0] = '\0';
}

const char *disco_last_error(void) {
  return last_error;
}

const char *disco_result_string(disco_result_t result) {
  switch (result) {
#define DISCO_X_STR_(name, value, desc) \
  case name:                            \
    return desc;
    DISCO_RESULT_LIST(DISCO_X_STR_)
#undef DISCO_X_STR_
    default:
      return "unknown result code";
  }
}

const char *disco_result_name(disco_result_t result) {
  switch (result) {
#define DISCO_X_NAME_(name, value, desc) \
  case name:                             \
    return #name;
    DISCO_RESULT_LIST(DISCO_X_NAME_)
#undef DISCO_X_NAME_
    default:
      return "DISCO_ERR_UNKNOWN";
  }
}

int disco_get_version(void) {
  return DISCO_VERSION;
}
