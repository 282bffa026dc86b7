/* Confines client-supplied adapter paths to the adapter directory (README "Adapters at run time": nothing a client sends
 * may reach files outside --adapter-dir).
 *
 * `..` components are refused lexically, before the file system is consulted, so a client cannot
 * probe which paths exist outside the root; everything else is decided on realpath()s, so symlinks
 * are followed and judged by where they really lead. That holds for the files inside an adapter
 * directory too (the loaders open them by name): a link there that leads out of the root refuses
 * the whole path. The check runs before the loaders open anything; whoever can rewrite links inside
 * --adapter-dir between the two steps is the operator, not a client. */
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "ds/adapter.h"

/* Whether `p` (a realpath) is `root` (a realpath) or below it: the prefix must end at a '/'. */
static bool inside(const char *root, const char *p) {
    size_t n = strlen(root);
    if (n == 1 && root[0] == '/') return p[0] == '/';
    return !strncmp(root, p, n) && (p[n] == '/' || p[n] == 0);
}

static bool has_dotdot(const char *s) {
    for (const char *c = s; (c = strstr(c, "..")); c += 2)
        if ((c == s || c[-1] == '/') && (c[2] == '/' || c[2] == 0)) return true;
    return false;
}

/* The path does not exist: say "not found" only when its deepest existing ancestor lies inside the
 * root, so that missing files outside the root still read as "outside". */
static int classify_missing(const char *root, char *cand, const char *rel, ds_err *err) {
    for (char *slash = strrchr(cand, '/'); slash; slash = strrchr(cand, '/')) {
        if (slash == cand) slash[1] = 0; /* keep "/" */
        else *slash = 0;
        char *real = realpath(cand, NULL);
        if (real || (errno != ENOENT && errno != ENOTDIR)) {
            bool in = real && inside(root, real);
            free(real);
            if (in) return ds_err_set(err, DS_ENOTFOUND, "adapter path '%s' does not exist", rel);
            return ds_err_set(err, DS_EPERM, "adapter path '%s' is outside the adapter directory", rel);
        }
        if (slash == cand) break;
    }
    return ds_err_set(err, DS_EPERM, "adapter path '%s' is outside the adapter directory", rel);
}

/* Every entry of the directory `dir` (a realpath inside root) that is a symlink must lead inside
 * root; dangling links are left to the loaders (opening them fails). Sub-directories are not
 * entered: no loader reads below an adapter directory. */
static int check_entries(const char *root, const char *dir, const char *rel, ds_err *err) {
    DIR *d = opendir(dir);
    if (!d) return ds_err_set(err, DS_EIO, "adapter path '%s': cannot list: %s", rel, strerror(errno));
    int rc = 0;
    size_t dl = strlen(dir);
    char *p = malloc(dl + 258);
    if (!p) rc = ds_err_set(err, DS_ENOMEM, "out of memory");
    for (struct dirent *de; !rc && (de = readdir(d));) {
        if (de->d_type != DT_LNK && de->d_type != DT_UNKNOWN) continue;
        snprintf(p, dl + 258, "%s/%s", dir, de->d_name);
        struct stat st;
        if (lstat(p, &st) != 0 || !S_ISLNK(st.st_mode)) continue;
        char *real = realpath(p, NULL);
        if (real && !inside(root, real))
            rc = ds_err_set(err, DS_EPERM, "adapter path '%s': '%.100s' is a link that leads outside the adapter "
                            "directory", rel, de->d_name);
        free(real);
    }
    free(p);
    closedir(d);
    return rc;
}

/* How a client's path is named in messages: never absolute (no error names a server path), so an
 * absolute one below the root reads relative to it, and any other reads "(absolute path)". */
static const char *shown_path(const char *root, const char *rel) {
    if (rel[0] != '/') return rel;
    size_t n = strlen(root);
    if (n > 1 && !strncmp(rel, root, n) && rel[n] == '/' && rel[n + 1]) return rel + n + 1;
    return "(absolute path)";
}

static int resolve(const char *root, const char *path, char **out, ds_err *err) {
    size_t n = strlen(root) + strlen(path) + 2;
    char *cand = malloc(n);
    if (!cand) return ds_err_set(err, DS_ENOMEM, "out of memory");
    if (path[0] == '/') snprintf(cand, n, "%s", path);
    else snprintf(cand, n, "%s/%s", root, path);
    const char *rel = shown_path(root, path);
    char *real = realpath(cand, NULL);
    int rc = 0;
    if (!real && (errno == ENOENT || errno == ENOTDIR)) rc = classify_missing(root, cand, rel, err);
    else if (!real && errno == ELOOP) rc = ds_err_set(err, DS_EPERM, "adapter path '%s': too many symlinks", rel);
    else if (!real) rc = ds_err_set(err, DS_EIO, "adapter path '%s': %s", rel, strerror(errno));
    else if (!inside(root, real)) rc = ds_err_set(err, DS_EPERM, "adapter path '%s' is outside the adapter directory", rel);
    else {
        struct stat st;
        if (stat(real, &st) == 0 && S_ISDIR(st.st_mode)) rc = check_entries(root, real, rel, err);
    }
    free(cand);
    if (rc) free(real);
    else *out = real;
    return rc;
}

int ds_adapter_resolve_path(const char *root, const char *rel, char **out, ds_err *err) {
    *out = NULL;
    if (!root || !*root) return ds_err_set(err, DS_EINVAL, "no adapter directory configured");
    if (!rel || !*rel) return ds_err_set(err, DS_EINVAL, "empty adapter path");
    for (const unsigned char *c = (const unsigned char *)rel; *c; c++)
        if (*c < 0x20 || *c == 0x7f) return ds_err_set(err, DS_EINVAL, "adapter path contains a control character");
    if (strlen(rel) >= PATH_MAX) return ds_err_set(err, DS_EINVAL, "adapter path is too long");
    if (has_dotdot(rel)) return ds_err_set(err, DS_EPERM, "adapter path '%s' contains '..'", shown_path(root, rel));
    char *root_real = realpath(root, NULL);
    if (!root_real)
        return ds_err_set(err, errno == ENOENT ? DS_ENOTFOUND : DS_EIO, "the adapter directory: %s", strerror(errno));
    int rc = resolve(root_real, rel, out, err);
    free(root_real);
    return rc;
}
