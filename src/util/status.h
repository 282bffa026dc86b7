/* deltaserve — status-code plumbing for functions that return 0 or a negative DS_E* (ds/common.h). */
#ifndef DS_UTIL_STATUS_H
#define DS_UTIL_STATUS_H

/* Evaluates `expr` (an int status) once and returns it from the enclosing function when non-zero:
 *   DS_TRY(step_one(x));
 *   DS_TRY(step_two(x));
 * Only where nothing needs cleaning up on the way out. */
#define DS_TRY(expr)                                                                               \
    do {                                                                                           \
        int ds_try_st_ = (expr);                                                                   \
        if (ds_try_st_) return ds_try_st_;                                                         \
    } while (0)

#endif
