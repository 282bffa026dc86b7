/* Crash-safe writes (durable.h): temporary + fsync + rename + fsync of the directory, as SQLite
 * and git do; write(2) is checked byte for byte, because a full disk (ENOSPC), a quota (EDQUOT) or
 * a file-size limit (EFBIG) may surface on any write or only at fsync. */
#include "util/durable.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static void split(const char *name, char *subdir, size_t cap, const char **base) {
    const char *slash = strrchr(name, '/');
    *base = slash ? slash + 1 : name;
    snprintf(subdir, cap, "%.*s", slash ? (int)(slash - name) : 0, name);
}

static void fsync_dir(const char *path) {
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) fsync(fd), close(fd); /* best effort: some file systems refuse fsync on directories */
}

static int write_all(int fd, const void *data, size_t len) {
    const char *p = data;
    while (len) {
        ssize_t w = write(fd, p, len);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return w == 0 ? (errno = ENOSPC) : errno;
        p += w, len -= (size_t)w;
    }
    return 0;
}

int ds_durable_write(const char *dir, const char *name, const ds_iovec *parts, int n, ds_err *err) {
    char sub[512], final[4096], tmp[4096], parent[4096];
    const char *base;
    split(name, sub, sizeof sub, &base);
    const int lp = snprintf(parent, sizeof parent, "%s%s%s", dir, sub[0] ? "/" : "", sub);
    const int lf = snprintf(final, sizeof final, "%s/%s", parent, base);
    if (lp >= (int)sizeof parent || lf >= (int)sizeof final ||
        snprintf(tmp, sizeof tmp, "%s/.%s.tmp", parent, base) >= (int)sizeof tmp)
        return ds_err_set(err, DS_EIO, "%s: path too long", name);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return ds_err_set(err, DS_EIO, "%s: %s", name, strerror(errno));
    int e = 0;
    for (int i = 0; i < n && !e; i++) e = write_all(fd, parts[i].data, parts[i].len);
    if (!e && fsync(fd) != 0) e = errno;
    if (close(fd) != 0 && !e) e = errno;
    if (!e && rename(tmp, final) != 0) e = errno;
    if (e) {
        unlink(tmp);
        return ds_err_set(err, DS_EIO, "%s: %s", name, strerror(e));
    }
    fsync_dir(parent);
    return 0;
}

int ds_durable_mkdir(const char *dir, const char *sub, ds_err *err) {
    char path[4096];
    int len = snprintf(path, sizeof path, "%s%s%s", dir, sub && sub[0] ? "/" : "", sub ? sub : "");
    if (len >= (int)sizeof path) return ds_err_set(err, DS_EIO, "data directory path too long");
    for (char *p = path + 1; ; p++) {
        const bool end = *p == '\0';
        if (*p != '/' && !end) continue;
        *p = '\0';
        struct stat st;
        if (mkdir(path, 0755) != 0 && errno != EEXIST) {
            const int e = errno;
            return ds_err_set(err, DS_EIO, "cannot create %s: %s", sub && sub[0] ? sub : "the data directory",
                              strerror(e));
        }
        if (stat(path, &st) != 0 || !S_ISDIR(st.st_mode))
            return ds_err_set(err, DS_EIO, "cannot create %s: %s", sub && sub[0] ? sub : "the data directory",
                              strerror(ENOTDIR));
        if (end) break;
        *p = '/';
    }
    return 0;
}

int ds_durable_sweep(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return 0;
    int n = 0;
    for (struct dirent *de; (de = readdir(d));) {
        size_t l = strlen(de->d_name);
        if (de->d_name[0] != '.' || l < 6 || strcmp(de->d_name + l - 4, ".tmp")) continue;
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
        if (unlink(path) == 0) n++;
    }
    closedir(d);
    return n;
}

void ds_durable_remove_dir(const char *dir, const char *sub) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, sub);
    DIR *d = opendir(path);
    if (d) {
        for (struct dirent *de; (de = readdir(d));) {
            if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
            char f[4096 + 512];
            snprintf(f, sizeof f, "%s/%s", path, de->d_name);
            unlink(f);
        }
        closedir(d);
    }
    rmdir(path);
}

void ds_scrub_path(char *msg, const char *root) {
    char r[4096];
    size_t rl = root ? strlen(root) : 0;
    while (rl > 1 && root[rl - 1] == '/') rl--;
    if (!rl || rl >= sizeof r) return;
    memcpy(r, root, rl), r[rl] = '\0';
    for (char *p = msg; (p = strstr(p, r));) {
        const char next = p[rl];
        if (next == '/') { /* root/x → x */
            size_t cut = rl;
            while (p[cut] == '/') cut++;
            memmove(p, p + cut, strlen(p + cut) + 1);
        } else if (isalnum((unsigned char)next) || next == '-' || next == '_' || next == '.') {
            p += rl; /* a longer name that starts like root */
        } else { /* root itself → . */
            p[0] = '.';
            memmove(p + 1, p + rl, strlen(p + rl) + 1);
            p++;
        }
    }
}
