/*
 * Copyright (C) ngx_anythingllm authors
 *
 * The workspace list: filtered by a key's workspaces, and written as
 * OpenAI models (with the ISO dates of createdAt read as unix time).
 */


#include <string.h>

#include "alm_json.h"


static int
alm_digits(const char **pp, const char *end, int n, int *v)
{
    const char  *p;

    p = *pp;
    *v = 0;

    if (end - p < n) {
        return 0;
    }

    while (n--) {
        if (*p < '0' || *p > '9') {
            return 0;
        }

        *v = *v * 10 + (*p++ - '0');
    }

    *pp = p;

    return 1;
}


/* days since 1970-01-01 of a proleptic Gregorian date */

static long
alm_days(long y, int m, int d)
{
    long  era, yoe, doy, doe;

    y -= m <= 2;
    era = (y >= 0 ? y : y - 399) / 400;
    yoe = y - era * 400;
    doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;

    return era * 146097 + doe - 719468;
}


/*
 * "YYYY-MM-DD[(T| )HH:MM[:SS[.frac]]][Z|(+|-)HH[:]MM]", as Prisma
 * sends createdAt, to unix seconds; -1 when it is not such a date.
 */

static long
alm_iso_time(const char *s)
{
    int          y, mo, d, h, mi, sec, oh, om, sign;
    long         t;
    const char  *p, *end;

    p = s;
    end = s + strlen(s);
    h = mi = sec = 0;

    if (!alm_digits(&p, end, 4, &y) || p == end || *p++ != '-'
        || !alm_digits(&p, end, 2, &mo) || p == end || *p++ != '-'
        || !alm_digits(&p, end, 2, &d))
    {
        return -1;
    }

    if (mo < 1 || mo > 12 || d < 1 || d > 31) {
        return -1;
    }

    if (p < end && (*p == 'T' || *p == 't' || *p == ' ')) {
        p++;

        if (!alm_digits(&p, end, 2, &h) || p == end || *p++ != ':'
            || !alm_digits(&p, end, 2, &mi))
        {
            return -1;
        }

        if (p < end && *p == ':') {
            p++;

            if (!alm_digits(&p, end, 2, &sec)) {
                return -1;
            }

            if (p < end && *p == '.') {
                p++;
                while (p < end && *p >= '0' && *p <= '9') {
                    p++;
                }
            }
        }

        if (h > 23 || mi > 59 || sec > 60) {
            return -1;
        }
    }

    t = alm_days(y, mo, d) * 86400L + h * 3600L + mi * 60L + sec;

    if (p < end && (*p == 'Z' || *p == 'z')) {
        p++;

    } else if (p < end && (*p == '+' || *p == '-')) {
        sign = (*p++ == '-') ? -1 : 1;

        if (!alm_digits(&p, end, 2, &oh)) {
            return -1;
        }

        if (p < end && *p == ':') {
            p++;
        }

        if (!alm_digits(&p, end, 2, &om)) {
            return -1;
        }

        t -= sign * (oh * 3600L + om * 60L);
    }

    if (p != end || t < 0) {
        return -1;
    }

    return t;
}


static time_t
alm_workspace_created(const cJSON *ws, time_t now)
{
    long          t;
    double        d;
    const cJSON  *c;

    c = cJSON_GetObjectItemCaseSensitive(ws, "createdAt");

    if (cJSON_IsString(c)) {
        t = alm_iso_time(c->valuestring);
        return t >= 0 ? (time_t) t : now;
    }

    if (cJSON_IsNumber(c)) {
        d = c->valuedouble;

        /* milliseconds, as JavaScript counts them */
        if (d > 1e11) {
            d /= 1000;
        }

        if (d >= 0 && d < 1e11) {
            return (time_t) d;
        }
    }

    return now;
}


static const char *
alm_workspace_slug(const cJSON *ws)
{
    const cJSON  *slug;

    slug = cJSON_GetObjectItemCaseSensitive(ws, "slug");

    return cJSON_IsString(slug) ? slug->valuestring : NULL;
}


/* the workspaces array of a GET /api/v1/workspaces answer, or NULL */

static cJSON *
alm_workspaces_parse(const char *json, size_t len, cJSON **array)
{
    cJSON  *root;

    root = alm_json_parse(json, len, NULL);

    *array = cJSON_GetObjectItemCaseSensitive(root, "workspaces");

    if (!cJSON_IsObject(root) || !cJSON_IsArray(*array)) {
        cJSON_Delete(root);
        return NULL;
    }

    return root;
}


/*
 * An answer that is not the expected list gives NULL: the caller must
 * then fail closed rather than pass the unfiltered answer on.
 */

char *
alm_workspaces_filter(const char *json, size_t len, const char *list,
    size_t list_len, size_t *out_len)
{
    cJSON       *root, *array, *ws, *next;
    alm_buf_t    b;
    const char  *slug;

    root = alm_workspaces_parse(json, len, &array);
    if (root == NULL) {
        return NULL;
    }

    for (ws = array->child; ws; ws = next) {
        next = ws->next;
        slug = alm_workspace_slug(ws);

        if (slug == NULL
            || !alm_workspace_allowed(list, list_len, slug, strlen(slug)))
        {
            cJSON_Delete(cJSON_DetachItemViaPointer(array, ws));
        }
    }

    memset(&b, 0, sizeof(alm_buf_t));
    alm_json_value(&b, root);

    cJSON_Delete(root);

    return alm_buf_take(&b, out_len);
}


/* a model object, the fields in OpenAI's order */

static void
alm_model(alm_buf_t *b, const char *slug, time_t created)
{
    alm_buf_str(b, "{\"id\":");
    alm_json_string(b, slug);
    alm_buf_str(b, ",\"object\":\"model\",\"created\":");
    alm_json_number(b, (double) created);
    alm_buf_str(b, ",\"owned_by\":\"anythingllm\"}");
}


/* the workspace of a model id, if the list allows it, or NULL */

static const cJSON *
alm_workspace_find(const cJSON *array, const char *list, size_t list_len,
    const char *one, size_t one_len)
{
    size_t        n;
    const cJSON  *ws;
    const char   *slug;

    cJSON_ArrayForEach(ws, array) {
        slug = alm_workspace_slug(ws);

        if (slug == NULL) {
            continue;
        }

        n = strlen(slug);

        if (n == one_len && memcmp(slug, one, n) == 0
            && alm_workspace_allowed(list, list_len, slug, n))
        {
            return ws;
        }
    }

    return NULL;
}


char *
alm_workspaces_to_models(const char *json, size_t len, const char *list,
    size_t list_len, const char *one, size_t one_len, time_t now,
    size_t *out_len, alm_error_t *err)
{
    int           mlen, first;
    char         *out;
    cJSON        *root, *array;
    alm_buf_t     b;
    const cJSON  *ws;
    const char   *slug;

    root = alm_workspaces_parse(json, len, &array);

    if (root == NULL) {
        alm_error_set(err, 502, "server_error", NULL, NULL,
                      "AnythingLLM sent a workspace list the gateway could "
                      "not read.");
        return NULL;
    }

    memset(&b, 0, sizeof(alm_buf_t));

    if (one) {
        ws = alm_workspace_find(array, list, list_len, one, one_len);

        if (ws == NULL) {
            cJSON_Delete(root);
            mlen = one_len > 128 ? 128 : (int) one_len;
            alm_error_set(err, 404, "invalid_request_error", NULL,
                          "model_not_found", "The model `%.*s` does not "
                          "exist or you do not have access to it.", mlen,
                          one);
            return NULL;
        }

        alm_model(&b, alm_workspace_slug(ws),
                  alm_workspace_created(ws, now));

    } else {
        alm_buf_str(&b, "{\"object\":\"list\",\"data\":[");
        first = 1;

        cJSON_ArrayForEach(ws, array) {
            slug = alm_workspace_slug(ws);

            if (slug == NULL
                || !alm_workspace_allowed(list, list_len, slug,
                                          strlen(slug)))
            {
                continue;
            }

            if (!first) {
                alm_buf_raw(&b, ",", 1);
            }

            alm_model(&b, slug, alm_workspace_created(ws, now));
            first = 0;
        }

        alm_buf_str(&b, "]}");
    }

    cJSON_Delete(root);

    out = alm_buf_take(&b, out_len);

    if (out == NULL) {
        alm_error_set(err, 500, "server_error", NULL, NULL, ALM_NOMEM);
    }

    return out;
}
