/* The fine-tuning API's hyperparameters of method "bottleneck" (AdapterHub bottleneck adapters,
 * src/train/train_bn.c): reduction_factor, placement, non_linearity, scaling, init_weights — read
 * from a job's hyperparameters object and written back in the job object. */
#include <cjson/cJSON.h>
#include <math.h>
#include <string.h>

#include "ds/train.h"
#include "server/handlers.h"

#define EP_JOBS "/v1/fine_tuning/jobs"

static const cJSON *item(const cJSON *hp, const char *key) {
    const cJSON *v = hp ? cJSON_GetObjectItemCaseSensitive(hp, key) : NULL;
    return v && !cJSON_IsNull(v) && !(cJSON_IsString(v) && !strcmp(v->valuestring, "auto")) ? v : NULL;
}

/* A string option through its parser; false after answering 400. */
static bool str_opt(ds_http_req *req, const cJSON *hp, const char *key, int (*parse)(const char *, void *, ds_err *),
                    void *out) {
    const cJSON *v = item(hp, key);
    if (!v) return true;
    ds_err err = {{0}};
    const int rc = cJSON_IsString(v) ? parse(v->valuestring, out, &err)
                                     : ds_err_set(&err, DS_EINVAL, "'%s' must be a string", key);
    if (!rc) return true;
    ds_server_reply_errorf(req, EP_JOBS, 400, key, rc == DS_EUNSUPPORTED ? "unsupported" : NULL, "%s", err.msg);
    return false;
}

static int parse_placement(const char *s, void *o, ds_err *e) { return ds_train_bn_placement_parse(s, o, e); }
static int parse_act(const char *s, void *o, ds_err *e) { return ds_train_bn_act_parse(s, o, e); }
static int parse_init(const char *s, void *o, ds_err *e) { return ds_train_bn_init_parse(s, o, e); }

bool ds_handlers_ft_bn_parse(ds_http_req *req, const struct cJSON *hp, ds_train_bn_opts *o) {
    *o = ds_train_bn_default_opts();
    const cJSON *rf = item(hp, "reduction_factor"), *sc = item(hp, "scaling");
    if (rf && (!cJSON_IsNumber(rf) || rf->valuedouble != floor(rf->valuedouble) || rf->valuedouble < 1 ||
               rf->valuedouble > 65536)) {
        ds_server_reply_errorf(req, EP_JOBS, 400, "reduction_factor", NULL,
                               "'reduction_factor' must be an integer >= 1 (bottleneck width = hidden size / it)");
        return false;
    }
    if (rf) o->reduction_factor = (int32_t)rf->valuedouble;
    if (sc && (!cJSON_IsNumber(sc) || !(sc->valuedouble > 0) || sc->valuedouble > 1e4)) {
        ds_server_reply_errorf(req, EP_JOBS, 400, "scaling", cJSON_IsString(sc) ? "unsupported" : NULL,
                               "'scaling' must be a number in (0, 10000] (a learned or channel scaling cannot be "
                               "trained)");
        return false;
    }
    if (sc) o->scaling = (float)sc->valuedouble;
    if (!str_opt(req, hp, "placement", parse_placement, &o->placement) ||
        !str_opt(req, hp, "non_linearity", parse_act, &o->act) ||
        !str_opt(req, hp, "init_weights", parse_init, &o->init))
        return false;
    ds_train_bn_resolve(o);
    return true;
}

void ds_handlers_ft_bn_json(ds_sb *b, const ds_train_bn_opts *o) {
    const char *act = ds_train_bn_act_name(o->act);
    ds_sb_printf(b, ",\"reduction_factor\":%d,\"placement\":\"%s\",\"non_linearity\":\"%s\",\"scaling\":",
                 (int)o->reduction_factor, ds_train_bn_placement_name(o->placement), act ? act : "relu");
    ds_sb_json_num(b, o->scaling);
    ds_sb_printf(b, ",\"init_weights\":\"%s\"", ds_train_bn_init_name(o->init));
}
