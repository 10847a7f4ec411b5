/*
 * Copyright (C) ngx_anythingllm authors
 *
 * The usage of AnythingLLM's native chat answers, read as they pass:
 * the "metrics" object of a whole answer, or of the stream's frames
 * (the last one that has counts wins: finalizeResponseStream, or an
 * agent's usageMetrics).  Nothing here changes the bytes it is given.
 */


#include <string.h>

#include "alm_json.h"


static void alm_usage_line(alm_usage_scan_t *s, const char *p, size_t len);
static int alm_usage_names(const char *p, size_t len, const char *name);


void
alm_usage_scan_init(alm_usage_scan_t *s, char *buf, size_t size)
{
    memset(s, 0, sizeof(alm_usage_scan_t));

    s->buf = buf;
    s->size = size;
}


int
alm_usage_answer(const char *json, size_t len, alm_usage_t *usage)
{
    int     found;
    cJSON  *root;

    memset(usage, 0, sizeof(alm_usage_t));

    root = cJSON_ParseWithLength(json, len);
    if (root == NULL) {
        return 0;
    }

    found = alm_usage_read(cJSON_GetObjectItemCaseSensitive(root, "metrics"),
                           usage);

    cJSON_Delete(root);

    return found;
}


/*
 * SSE lines are gathered in s->buf; a line longer than the buffer is
 * passed over whole (it cannot be the short final frame's JSON read
 * right anyway), so that memory stays bounded by the buffer.
 */

void
alm_usage_scan(alm_usage_scan_t *s, const char *p, size_t len)
{
    size_t       n;
    const char  *nl;

    while (len) {
        nl = memchr(p, '\n', len);
        n = nl ? (size_t) (nl - p) : len;

        if (!s->skip) {
            if (s->len + n > s->size) {
                s->skip = 1;

            } else {
                memcpy(s->buf + s->len, p, n);
                s->len += n;
            }
        }

        if (nl == NULL) {
            return;
        }

        if (!s->skip) {
            alm_usage_line(s, s->buf, s->len);
        }

        s->len = 0;
        s->skip = 0;

        p = nl + 1;
        len -= n + 1;
    }
}


static void
alm_usage_line(alm_usage_scan_t *s, const char *p, size_t len)
{
    alm_usage_t  usage;

    if (len && p[len - 1] == '\r') {
        len--;
    }

    if (len < 5 || memcmp(p, "data:", 5) != 0) {
        return;
    }

    p += 5;
    len -= 5;

    /* most frames are tokens: only those naming metrics are parsed */

    if (!alm_usage_names(p, len, "\"metrics\"")) {
        if (alm_usage_names(p, len, "\"textResponseChunk\"")) {
            s->pieces++;
        }

        return;
    }

    if (alm_usage_answer(p, len, &usage)) {
        s->usage = usage;
    }
}


/* "name" (quoted) is in the frame, as a string somewhere */

static int
alm_usage_names(const char *p, size_t len, const char *name)
{
    size_t       n;
    const char  *q;

    n = strlen(name);

    while (len >= n) {
        q = memchr(p, '"', len - n + 1);
        if (q == NULL) {
            return 0;
        }

        if (memcmp(q, name, n) == 0) {
            return 1;
        }

        len -= (size_t) (q - p) + 1;
        p = q + 1;
    }

    return 0;
}


static const char  *alm_auth_added[] = {
    "id", "name", "scopes", "workspaces", "limits", "usage", NULL
};


char *
alm_auth_answer(const char *json, size_t len, const alm_key_info_t *key,
    size_t *out_len)
{
    size_t        i;
    cJSON        *root, *item;
    alm_buf_t     b;
    const char   *sep;

    root = cJSON_ParseWithLength(json, len);

    if (!cJSON_IsObject(root)
        || !cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(root,
                                                          "authenticated")))
    {
        cJSON_Delete(root);
        return NULL;
    }

    memset(&b, 0, sizeof(alm_buf_t));
    sep = "{";

    for (item = root->child; item; item = item->next) {

        for (i = 0; alm_auth_added[i]; i++) {
            if (strcmp(item->string, alm_auth_added[i]) == 0) {
                break;
            }
        }

        if (alm_auth_added[i]) {
            continue;
        }

        alm_buf_str(&b, sep);
        alm_json_string(&b, item->string);
        alm_buf_raw(&b, ":", 1);
        alm_json_value(&b, item);
        sep = ",";
    }

    cJSON_Delete(root);

    alm_buf_str(&b, sep);
    alm_buf_str(&b, "\"id\":\"");
    alm_buf_raw(&b, key->id, ALM_KEY_ID_LEN);
    alm_buf_str(&b, "\",\"name\":\"");
    alm_buf_esc(&b, key->name, key->name_len);
    alm_buf_str(&b, "\",\"scopes\":");
    alm_scopes_json(&b, key->scopes);
    alm_buf_str(&b, ",\"workspaces\":");
    alm_workspaces_json(&b, key->workspaces, key->workspaces_len);
    alm_buf_str(&b, ",\"limits\":{\"rpm\":");
    alm_buf_int(&b, key->rpm);
    alm_buf_str(&b, ",\"tpm\":");
    alm_buf_int(&b, key->tpm);
    alm_buf_str(&b, ",\"tpd\":");
    alm_buf_int(&b, key->tpd);
    alm_buf_str(&b, "},\"usage\":");

    if (key->usage_known) {
        alm_buf_str(&b, "{\"date\":");
        alm_buf_json_str(&b, key->date);
        alm_buf_str(&b, ",\"requests\":");
        alm_buf_int(&b, key->requests);
        alm_buf_str(&b, ",\"prompt_tokens\":");
        alm_buf_int(&b, key->prompt_tokens);
        alm_buf_str(&b, ",\"completion_tokens\":");
        alm_buf_int(&b, key->completion_tokens);
        alm_buf_str(&b, ",\"total_tokens\":");
        alm_buf_int(&b, key->prompt_tokens + key->completion_tokens);
        alm_buf_str(&b, "}");

    } else {
        alm_buf_str(&b, "null");
    }

    alm_buf_str(&b, "}");

    return alm_buf_take(&b, out_len);
}
