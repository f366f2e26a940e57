/* Internal: thread-local error message and the helpers every file uses. */
#ifndef DISCO_CORE_ERROR_H_
#define DISCO_CORE_ERROR_H_

#include "disco.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Records a formatted message for disco_last_error() on this thread and
 * returns `code`, so call sites read `return disco_error(CODE, "...", ...);`.
 * Messages name the function, the argument, the rank and the row. */
disco_result_t disco_error(disco_result_t code, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Clears this thread's message (start of every public entry point). */
void disco_error_clear(void);

#ifdef __cplusplus
}
#endif

#endif /* DISCO_CORE_ERROR_H_ */
