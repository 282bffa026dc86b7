/* ds_adapter_resolve_path: client paths stay inside the adapter directory, symlinks included. */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ds/adapter.h"
#include "ds_test.h"

static char g_base[PATH_MAX]; /* realpath of the temp dir: base/root is the adapter dir */
static char g_root[PATH_MAX + 16];

static void touch(const char *path) {
    FILE *f = fopen(path, "w");
    if (f) fclose(f);
}

static const char *at(const char *fmt, const char *arg) {
    static char buf[4][PATH_MAX + 64];
    static int k;
    char *b = buf[k++ % 4];
    snprintf(b, sizeof buf[0], fmt, arg);
    return b;
}

/* Resolves rel and checks the status; on success the result must equal `want` (when given). */
static void expect(const char *rel, int status, const char *want) {
    char *out = (char *)"sentinel";
    ds_err err = {{0}};
    int rc = ds_adapter_resolve_path(g_root, rel, &out, &err);
    CHECK_MSG(rc == status, "'%s': got %s (%s), want %s", rel, ds_strerror(rc), err.msg, ds_strerror(status));
    if (rc == 0) {
        if (want) CHECK_MSG(out && !strcmp(out, want), "'%s' resolved to '%s', want '%s'", rel, out, want);
        free(out);
    } else {
        CHECK(out == NULL);
        /* the message names a relative path (empty/control-character ones excepted); an absolute one
         * is never echoed (no error names a server path) */
        if (*rel == '/') CHECK_MSG(!strstr(err.msg, "'/"), "message '%s' names an absolute path", err.msg);
        else if (*rel && !strchr(rel, '\n'))
            CHECK_MSG(strstr(err.msg, rel) != NULL, "message '%s' lacks '%s'", err.msg, rel);
    }
}

int main(void) {
    char tmpl[] = "/tmp/ds_adapter_path_XXXXXX";
    if (!mkdtemp(tmpl)) SKIP("cannot create a temp dir");
    if (!realpath(tmpl, g_base)) SKIP("realpath failed");
    snprintf(g_root, sizeof g_root, "%s/root", g_base);
    /* base/root/{a/adapter_config.json, b/, link-in -> a, link-out -> ../outside, abs-out -> /etc,
     *            dangling -> ../nowhere}; base/outside/secret; base/root-evil/ (prefix trap) */
    mkdir(g_root, 0700);
    mkdir(at("%s/root/a", g_base), 0700);
    mkdir(at("%s/root/b", g_base), 0700);
    touch(at("%s/root/a/adapter_config.json", g_base));
    mkdir(at("%s/outside", g_base), 0700);
    touch(at("%s/outside/secret", g_base));
    mkdir(at("%s/root-evil", g_base), 0700);
    CHECK(symlink("a", at("%s/root/link-in", g_base)) == 0);
    CHECK(symlink("../outside", at("%s/root/link-out", g_base)) == 0);
    CHECK(symlink("/etc", at("%s/root/abs-out", g_base)) == 0);
    CHECK(symlink("../nowhere", at("%s/root/dangling", g_base)) == 0);

    /* inside */
    expect("a", 0, at("%s/root/a", g_base));
    expect("a/", 0, at("%s/root/a", g_base));
    expect("./a/adapter_config.json", 0, at("%s/root/a/adapter_config.json", g_base));
    expect("b//", 0, at("%s/root/b", g_base));
    expect("link-in", 0, at("%s/root/a", g_base)); /* symlink within the root */
    expect(at("%s/root/a", g_base), 0, at("%s/root/a", g_base)); /* absolute, inside */
    /* escapes */
    expect("../outside/secret", DS_EPERM, NULL);
    expect("a/../../outside", DS_EPERM, NULL);
    expect("a/..", DS_EPERM, NULL); /* '..' is refused even when it would stay inside */
    expect("..", DS_EPERM, NULL);
    expect(at("%s/outside/secret", g_base), DS_EPERM, NULL); /* absolute, outside */
    expect(at("%s/root-evil", g_base), DS_EPERM, NULL);      /* shares the root's prefix */
    expect("/etc/passwd", DS_EPERM, NULL);
    expect("/", DS_EPERM, NULL);
    expect("link-out", DS_EPERM, NULL); /* symlink leading outside */
    expect("link-out/secret", DS_EPERM, NULL);
    expect("abs-out", DS_EPERM, NULL);
    expect("link-out/missing", DS_EPERM, NULL); /* missing, but below a symlink that leaves */
    expect(at("%s/outside/missing", g_base), DS_EPERM, NULL);
    expect("/definitely/not/here", DS_EPERM, NULL);
    /* not found inside */
    expect("missing", DS_ENOTFOUND, NULL);
    expect("a/missing/deeper", DS_ENOTFOUND, NULL);
    expect("a/adapter_config.json/x", DS_ENOTFOUND, NULL);
    expect("dangling", DS_ENOTFOUND, NULL);
    /* malformed */
    expect("", DS_EINVAL, NULL);
    expect("a\nb", DS_EINVAL, NULL);
    /* argument checks */
    char *out;
    ds_err err;
    CHECK(ds_adapter_resolve_path(NULL, "a", &out, &err) == DS_EINVAL && out == NULL);
    CHECK(ds_adapter_resolve_path(g_root, NULL, &out, &err) == DS_EINVAL);
    CHECK(ds_adapter_resolve_path(at("%s/no-such-root", g_base), "a", &out, &err) == DS_ENOTFOUND);

    char cmd[PATH_MAX + 32];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_base);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", g_base);
    return ds_test_result();
}
