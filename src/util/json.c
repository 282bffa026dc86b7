/* Strict JSON parsing (json.h). */
#include "util/json.h"

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

/* Whether the JSON text holds a NUL: a raw byte, or "\u0000" (a backslash only occurs inside
 * strings, and "\\u0000" is an escaped backslash followed by text, so escapes are skipped pairwise). */
static bool has_nul(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (s[i] == 0) return true;
        if (s[i] != '\\' || i + 1 >= n) continue;
        if (s[i + 1] == 'u' && i + 5 < n && !memcmp(s + i + 2, "0000", 4)) return true;
        i++;
    }
    return false;
}

cJSON *ds_json_parse_strict(const char *s, size_t len, char *why, size_t why_len) {
    if (has_nul(s, len)) {
        snprintf(why, why_len, "contains a NUL character (\\u0000), which no field accepts");
        return NULL;
    }
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(s, len, &end, false);
    if (!root) {
        snprintf(why, why_len, "is not valid JSON");
        return NULL;
    }
    for (const char *p = end; p < s + len; p++)
        if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') {
            cJSON_Delete(root);
            snprintf(why, why_len, "has data after the JSON value (at byte %zu)", (size_t)(p - s));
            return NULL;
        }
    return root;
}
