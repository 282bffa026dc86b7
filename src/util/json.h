/* deltaserve — strict JSON parsing for everything a client or a file hands us (request bodies,
 * dataset lines, persisted records): exactly one JSON value, nothing but JSON whitespace after it,
 * and no NUL anywhere (a raw 0 byte or the escape \u0000, which cJSON would turn into a silently
 * truncated string). Thread-safe (no state). */
#ifndef DS_UTIL_JSON_H
#define DS_UTIL_JSON_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

struct cJSON;

/* The tree (the caller cJSON_Deletes it), or NULL with a reason in why[why_len] ("is not valid
 * JSON", "has data after the JSON value (at byte 12)", "contains a NUL character (\u0000)"),
 * phrased to follow the name of what was parsed. */
struct cJSON *ds_json_parse_strict(const char *s, size_t len, char *why, size_t why_len);

#ifdef __cplusplus
}
#endif
#endif
