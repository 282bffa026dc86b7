/* File mapping and whole-file reads with clear errors.
 *
 * Files are opened with O_NONBLOCK and judged by fstat() before a byte is read: opening a FIFO for
 * reading blocks until a writer appears, and a FIFO (or a device) dropped into an adapter directory
 * must fail the load, not hang a worker thread or the start-up scan (issue 14). Only regular files
 * are read or mapped. */
#include "ds/common.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

int ds_file_map_open(ds_file_map *m, const char *path, ds_err *err) {
    memset(m, 0, sizeof *m);
    m->fd = -1;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) return ds_err_set(err, DS_EIO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return ds_err_set(err, DS_EIO, "%s: cannot stat: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return ds_err_set(err, DS_EIO, "%s: not a regular file", path);
    }
    m->fd = fd;
    m->size = (size_t)st.st_size;
    if (m->size == 0) return DS_OK;
    void *p = mmap(NULL, m->size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
        int e = errno;
        close(fd);
        m->fd = -1;
        return ds_err_set(err, DS_EIO, "%s: cannot mmap: %s", path, strerror(e));
    }
    m->data = p;
    return DS_OK;
}

void ds_file_map_close(ds_file_map *m) {
    if (m->data) munmap((void *)m->data, m->size);
    if (m->fd >= 0) close(m->fd);
    m->data = NULL;
    m->size = 0;
    m->fd = -1;
}

void ds_file_map_release(const void *p, size_t n) {
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    const uintptr_t lo = ((uintptr_t)p + page - 1) & ~(page - 1), hi = ((uintptr_t)p + n) & ~(page - 1);
    if (hi > lo) (void)madvise((void *)lo, hi - lo, MADV_DONTNEED);
}

int ds_file_read_all(const char *path, size_t max_bytes, char **out, size_t *out_len, ds_err *err) {
    *out = NULL;
    if (out_len) *out_len = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) return ds_err_set(err, DS_EIO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return ds_err_set(err, DS_EIO, "%s: not a readable regular file", path);
    }
    if ((size_t)st.st_size > max_bytes) {
        close(fd);
        return ds_err_set(err, DS_ERANGE, "%s: file is %lld bytes, limit is %zu", path, (long long)st.st_size,
                          max_bytes);
    }
    size_t n = (size_t)st.st_size;
    char *buf = malloc(n + 1);
    if (!buf) {
        close(fd);
        return ds_err_set(err, DS_ENOMEM, "%s: out of memory", path);
    }
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        got += (size_t)r;
    }
    close(fd);
    if (got != n) {
        free(buf);
        return ds_err_set(err, DS_EIO, "%s: short read", path);
    }
    buf[n] = 0;
    *out = buf;
    if (out_len) *out_len = n;
    return DS_OK;
}
