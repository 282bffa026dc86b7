/* deltaserve — shared basics: error codes, error buffers, logging, assertions, file mapping.
 * Every function here is thread-safe unless it says otherwise. */
#ifndef DS_COMMON_H
#define DS_COMMON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Status codes: 0 on success, negative on failure. */
enum {
    DS_OK = 0,
    DS_EINVAL = -1,       /* bad argument or malformed input */
    DS_ENOMEM = -2,       /* host allocation failed */
    DS_EIO = -3,          /* read/write/open failed */
    DS_EFORMAT = -4,      /* file is not of the expected format, or corrupt */
    DS_EUNSUPPORTED = -5, /* valid, but not something deltaserve supports */
    DS_ENOTFOUND = -6,    /* named thing does not exist */
    DS_EBUSY = -7,        /* resource in use / temporarily full */
    DS_EDEVICE = -8,      /* backend device failure (incl. device OOM) */
    DS_ERANGE = -9,       /* value out of range (e.g. context too long) */
    DS_EPERM = -10,       /* not allowed (e.g. path outside the adapter directory) */
    DS_ECANCELED = -11,   /* operation cancelled */
};

/* Returns a static string naming a status code. */
const char *ds_strerror(int status);

/* Caller-provided error message buffer. Functions that return NULL or a negative status
 * write a human-readable reason here when the pointer is not NULL. */
typedef struct ds_err {
    char msg[512];
} ds_err;

/* Formats into err->msg (no-op when err is NULL). Always returns `status` for tail calls:
 *   return ds_err_set(err, DS_EFORMAT, "%s: bad magic", path); */
int ds_err_set(ds_err *err, int status, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Logging to stderr with a timestamp. Level filter from ds_log_set_level or DS_LOG env
 * (error|warn|info|debug). */
typedef enum { DS_LOG_ERROR = 0, DS_LOG_WARN = 1, DS_LOG_INFO = 2, DS_LOG_DEBUG = 3 } ds_log_level;
void ds_log_set_level(ds_log_level level);
ds_log_level ds_log_get_level(void);
void ds_log(ds_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#define DS_LOGE(...) ds_log(DS_LOG_ERROR, __VA_ARGS__)
#define DS_LOGW(...) ds_log(DS_LOG_WARN, __VA_ARGS__)
#define DS_LOGI(...) ds_log(DS_LOG_INFO, __VA_ARGS__)
#define DS_LOGD(...) ds_log(DS_LOG_DEBUG, __VA_ARGS__)

/* For programmer bugs only: prints and aborts. Never for bad input. */
#define DS_ASSERT(cond)                                                                      \
    do {                                                                                     \
        if (!(cond)) ds_assert_fail(#cond, __FILE__, __LINE__);                              \
    } while (0)
#ifdef __cplusplus
[[noreturn]] void ds_assert_fail(const char *expr, const char *file, int line);
#else
_Noreturn void ds_assert_fail(const char *expr, const char *file, int line);
#endif

/* Read-only whole-file mapping. `data` is valid until ds_file_unmap. */
typedef struct ds_file_map {
    const uint8_t *data;
    size_t size;
    int fd;
} ds_file_map;
/* Returns 0, or DS_EIO with a message naming the path. Empty files map with data == NULL. */
int ds_file_map_open(ds_file_map *m, const char *path, ds_err *err);
void ds_file_map_close(ds_file_map *m);
/* Drops the whole pages inside [p, p + n) of a read-only private mapping from the resident set
 * (MADV_DONTNEED: a later read faults them in from the file again). For bytes that were copied or
 * repacked and are not read in place. */
void ds_file_map_release(const void *p, size_t n);

/* Reads a whole file into a NUL-terminated malloc'd buffer (caller frees). Refuses files
 * larger than max_bytes with DS_ERANGE. */
int ds_file_read_all(const char *path, size_t max_bytes, char **out, size_t *out_len, ds_err *err);

/* Monotonic clock in seconds / nanoseconds. */
double ds_time_s(void);
uint64_t ds_time_ns(void);

/* Checked size arithmetic: returns false on overflow. */
static inline bool ds_mul_ok(size_t a, size_t b, size_t *out) {
    return !__builtin_mul_overflow(a, b, out);
}
static inline bool ds_add_ok(size_t a, size_t b, size_t *out) {
    return !__builtin_add_overflow(a, b, out);
}

/* fp16 / bf16 conversions (round-to-nearest-even for the narrowing ones). */
float ds_f16_to_f32(uint16_t h);
uint16_t ds_f32_to_f16(float f);
float ds_bf16_to_f32(uint16_t h);
uint16_t ds_f32_to_bf16(float f);

#ifdef __cplusplus
}
#endif
#endif
