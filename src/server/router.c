/* The route table (router.h): path patterns, the API-key check, 404 / 405. */
#include "server/router.h"

#include <llhttp.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

int ds_router_init(ds_router *r, const char *api_key, const ds_route_table *const *tables, int32_t n_tables) {
    memset(r, 0, sizeof *r);
    if (n_tables < 0 || n_tables > DS_ROUTER_MAX_TABLES) return DS_ERANGE;
    if (api_key && strlen(api_key) >= sizeof r->api_key) return DS_ERANGE;
    if (api_key) snprintf(r->api_key, sizeof r->api_key, "%s", api_key);
    for (int32_t i = 0; i < n_tables; i++) r->tables[i] = tables[i];
    r->n_tables = n_tables;
    return 0;
}
/* Matches path against pattern segment by segment; "{x}" takes one non-empty segment, copied
 * NUL-terminated into req->params_buf_ (when req is not NULL). */
static bool route_match(const char *pattern, const char *path, ds_http_req *req) {
    size_t used = 0;
    int32_t np = 0;
    while (*pattern && *path) {
        if (*pattern == '{') {
            const char *pe = strchr(pattern, '}');
            size_t seg = strcspn(path, "/");
            if (!pe || seg == 0 || np >= 4 || used + seg + 1 > sizeof req->params_buf_) return false;
            if (req) {
                memcpy(req->params_buf_ + used, path, seg);
                req->params_buf_[used + seg] = '\0';
                req->params[np] = req->params_buf_ + used;
            }
            np++;
            used += seg + 1;
            pattern = pe + 1;
            path += seg;
        } else if (*pattern++ != *path++) {
            return false;
        }
    }
    if (*pattern || *path) return false;
    if (req) req->n_params = np;
    return true;
}

/* Constant-time comparison so the key cannot be guessed byte by byte from response times. */
static bool key_equal(const char *given, size_t given_len, const char *key) {
    size_t key_len = strlen(key);
    unsigned diff = (unsigned)(given_len ^ key_len);
    for (size_t i = 0; i < key_len; i++) diff |= (unsigned char)key[i] ^ (unsigned char)(i < given_len ? given[i] : 0);
    return diff == 0;
}

static bool authorized(const ds_router *rt, const ds_http_req *req) {
    if (!rt->api_key[0]) return true;
    const char *h = ds_http_req_header(req, "authorization");
    if (!h || strncasecmp(h, "Bearer ", 7) != 0) return false;
    h += 7;
    while (*h == ' ') h++;
    return key_equal(h, strlen(h), rt->api_key);
}

ds_route_result ds_router_find(const ds_router *rt, ds_http_req *req, const ds_route **route, char allow[64]) {
    const ds_route *hit = NULL, *any = NULL;
    bool public_path = false;
    allow[0] = '\0';
    for (int32_t t = 0; t < rt->n_tables; t++) {
        for (size_t i = 0; i < rt->tables[t]->n_routes; i++) {
            const ds_route *r = &rt->tables[t]->routes[i];
            if (!route_match(r->pattern, req->path, NULL)) continue;
            if (!any) any = r;
            public_path |= (r->flags & DS_ROUTE_PUBLIC) != 0;
            if (r->method == req->method && !hit) hit = r;
            else if (strlen(allow) + 10 < 64)
                snprintf(allow + strlen(allow), 64 - strlen(allow), "%s%s", allow[0] ? ", " : "",
                         llhttp_method_name((llhttp_method_t)r->method));
        }
    }
    *route = any;
    if (!public_path && !authorized(rt, req)) return DS_ROUTE_UNAUTHORIZED;
    if (!any) return DS_ROUTE_NOT_FOUND;
    if (!hit) return DS_ROUTE_BAD_METHOD;
    *route = hit;
    route_match(hit->pattern, req->path, req);
    return DS_ROUTE_FOUND;
}
