/* deltaserve — the route table: which handler serves a method and path, with the API-key check.
 *
 * Routes are static tables, one per handler file (handlers.h lists them); the router only looks
 * them up. It sends nothing itself: ds_router_find says what it found and the caller (the server
 * facade, server.c) replies, so every reply, routing errors included, goes through one path.
 *
 * Threading: the tables are constant; ds_router_find only reads the router. Loop thread. */
#ifndef DS_SERVER_ROUTER_H
#define DS_SERVER_ROUTER_H

#include "server/http.h"

#ifdef __cplusplus
extern "C" {
#endif

#define DS_ROUTE_PUBLIC 1u /* no API key needed (/health) */

typedef struct ds_route {
    int method;            /* llhttp_method_t */
    const char *pattern;   /* "/v1/models", "/v1/fine_tuning/jobs/{id}/cancel": "{name}" matches one
                              non-empty path segment (up to 4 per route, delivered in req->params) */
    ds_http_handler_fn fn; /* called as fn(req, arg) */
    void *arg;             /* constant per route (e.g. completion vs chat); not the server: handlers
                              get that from ds_server_of(req) */
    unsigned flags;        /* DS_ROUTE_* */
} ds_route;

typedef struct ds_route_table {
    const ds_route *routes;
    size_t n_routes;
} ds_route_table;

#define DS_ROUTER_MAX_TABLES 8

typedef struct ds_router {
    const ds_route_table *tables[DS_ROUTER_MAX_TABLES]; /* borrowed; static in practice */
    int32_t n_tables;
    char api_key[256]; /* "" → no authentication */
} ds_router;

/* `api_key` NULL or "" disables authentication; the key is copied. Returns 0, or DS_ERANGE when
 * there are more than DS_ROUTER_MAX_TABLES tables or the key is longer than 255 bytes. The tables
 * must outlive the router. */
int ds_router_init(ds_router *r, const char *api_key, const ds_route_table *const *tables, int32_t n_tables);

typedef enum {
    DS_ROUTE_FOUND = 0,    /* *route is the handler's route; req->params are filled */
    DS_ROUTE_UNAUTHORIZED, /* 401: the path is not public and the key is missing or wrong (checked
                              before 404 so that the table is not visible without the key) */
    DS_ROUTE_NOT_FOUND,    /* 404: no route has this path (*route is NULL) */
    DS_ROUTE_BAD_METHOD,   /* 405: the path exists with other methods, listed in `allow` */
} ds_route_result;

/* Looks up req's method and path. *route is set to the matching route (FOUND) or to a route with the
 * same path (UNAUTHORIZED, BAD_METHOD; NULL when none), whose pattern labels the request in
 * /metrics. `allow` ("GET, POST") is filled for BAD_METHOD. */
ds_route_result ds_router_find(const ds_router *r, ds_http_req *req, const ds_route **route, char allow[64]);

#ifdef __cplusplus
}
#endif
#endif
