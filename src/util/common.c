/* Error strings, logging, assertions, time, fp16/bf16 conversion. */
#include "ds/common.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

const char *ds_strerror(int status) {
    switch (status) {
    case DS_OK: return "ok";
    case DS_EINVAL: return "invalid argument";
    case DS_ENOMEM: return "out of memory";
    case DS_EIO: return "i/o error";
    case DS_EFORMAT: return "bad format";
    case DS_EUNSUPPORTED: return "unsupported";
    case DS_ENOTFOUND: return "not found";
    case DS_EBUSY: return "busy";
    case DS_EDEVICE: return "device error";
    case DS_ERANGE: return "out of range";
    case DS_EPERM: return "not permitted";
    case DS_ECANCELED: return "cancelled";
    default: return "unknown error";
    }
}

int ds_err_set(ds_err *err, int status, const char *fmt, ...) {
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
    }
    return status;
}

static int g_log_level = -1;
static pthread_mutex_t g_log_mu = PTHREAD_MUTEX_INITIALIZER;

static int log_level_from_env(void) {
    const char *e = getenv("DS_LOG");
    if (!e) return DS_LOG_INFO;
    if (!strcmp(e, "error")) return DS_LOG_ERROR;
    if (!strcmp(e, "warn")) return DS_LOG_WARN;
    if (!strcmp(e, "debug")) return DS_LOG_DEBUG;
    return DS_LOG_INFO;
}

void ds_log_set_level(ds_log_level level) { __atomic_store_n(&g_log_level, (int)level, __ATOMIC_RELAXED); }

ds_log_level ds_log_get_level(void) {
    int l = __atomic_load_n(&g_log_level, __ATOMIC_RELAXED);
    if (l < 0) {
        l = log_level_from_env();
        __atomic_store_n(&g_log_level, l, __ATOMIC_RELAXED);
    }
    return (ds_log_level)l;
}

void ds_log(ds_log_level level, const char *fmt, ...) {
    if ((int)level > (int)ds_log_get_level()) return;
    static const char *names[] = {"ERROR", "WARN", "INFO", "DEBUG"};
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    char line[2048];
    int n = snprintf(line, sizeof line, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %-5s ", tm.tm_year + 1900,
                     tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000,
                     names[level]);
    va_list ap;
    va_start(ap, fmt);
    if (n > 0 && (size_t)n < sizeof line) vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
    va_end(ap);
    pthread_mutex_lock(&g_log_mu);
    fputs(line, stderr);
    fputc('\n', stderr);
    pthread_mutex_unlock(&g_log_mu);
}

void ds_assert_fail(const char *expr, const char *file, int line) {
    fprintf(stderr, "deltaserve: assertion failed: %s (%s:%d)\n", expr, file, line);
    abort();
}

double ds_time_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

uint64_t ds_time_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

float ds_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: renormalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) {
                man <<= 1;
                exp--;
            }
            man &= 0x3ff;
            bits = sign | (exp << 23) | (man << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t ds_f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000;
    int32_t exp = (int32_t)((x >> 23) & 0xff) - 127 + 15;
    uint32_t man = x & 0x7fffff;
    if (((x >> 23) & 0xff) == 0xff) return (uint16_t)(sign | 0x7c00 | (man ? 0x200 : 0));
    if (exp >= 31) return (uint16_t)(sign | 0x7c00);
    if (exp <= 0) {
        if (exp < -10) return (uint16_t)sign;
        man |= 0x800000;
        uint32_t shift = (uint32_t)(14 - exp);
        uint32_t half = man >> shift;
        uint32_t rem = man & ((1u << shift) - 1);
        uint32_t mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t h = sign | ((uint32_t)exp << 10) | (man >> 13);
    uint32_t rem = man & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;
    return (uint16_t)h;
}

float ds_bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t ds_f32_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffff) > 0x7f800000) return (uint16_t)((x >> 16) | 0x40); /* quiet NaN */
    x += 0x7fff + ((x >> 16) & 1);
    return (uint16_t)(x >> 16);
}
