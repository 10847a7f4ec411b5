/*
 * Copyright (C) ngx_anythingllm authors
 *
 * OpenAI <-> AnythingLLM JSON translation: the chat completions
 * request, the workspace chat answer and errors, and the workspace
 * list as models.
 */


#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "alm_core.h"


#define ALM_BAD_JSON                                                         \
    "We could not parse the JSON body of your request. (HINT: This likely " \
    "means you aren't using your HTTP library correctly. The API expects a " \
    "JSON object as the body.)"

#define ALM_BAD_TEXT                                                         \
    "We could not parse the JSON body of your request: %s (at byte %zu). "   \
    "The API expects a JSON object encoded in UTF-8."

#define ALM_TRANSCRIPT_HEAD    "Conversation so far:\n"
#define ALM_TRANSCRIPT_USER    "user: "
#define ALM_TRANSCRIPT_IMAGE   "[image]"


/*
 * Text is produced in two passes over the same builder: the first with
 * out NULL only counts, the second writes into a buffer of that size.
 */

typedef struct {
    char    *out;
    size_t   len;
} alm_w_t;


typedef struct {
    const char  *name;
    unsigned     types;
} alm_param_t;


#define ALM_T_NUM   0x01
#define ALM_T_STR   0x02
#define ALM_T_BOOL  0x04
#define ALM_T_ARR   0x08
#define ALM_T_OBJ   0x10


/*
 * Sampling and bookkeeping parameters that AnythingLLM has no use for
 * (the workspace's own settings apply): accepted when null or of the
 * right type, and dropped.
 */

static const alm_param_t  alm_ignored_params[] = {
    { "temperature",            ALM_T_NUM },
    { "top_p",                  ALM_T_NUM },
    { "max_tokens",             ALM_T_NUM },
    { "max_completion_tokens",  ALM_T_NUM },
    { "presence_penalty",       ALM_T_NUM },
    { "frequency_penalty",      ALM_T_NUM },
    { "stop",                   ALM_T_STR | ALM_T_ARR },
    { "seed",                   ALM_T_NUM },
    { "user",                   ALM_T_STR },
    { "logit_bias",             ALM_T_OBJ },
    { "metadata",               ALM_T_OBJ },
    { "store",                  ALM_T_BOOL },
    { "parallel_tool_calls",    ALM_T_BOOL },
    { "reasoning_effort",       ALM_T_STR },
    { "service_tier",           ALM_T_STR },
    { "top_logprobs",           ALM_T_NUM },
    { NULL, 0 }
};


/*
 * The ranges OpenAI enforces on some of them: a value outside is a
 * 400 naming the parameter, with OpenAI's own wording and code, even
 * though the value would be dropped.
 */

typedef struct {
    const char  *name;
    double       min;
    double       max;
    int          integer;       /* OpenAI says "integer", not "decimal" */
} alm_range_t;


static const alm_range_t  alm_ranges[] = {
    { "temperature",            0.0,  2.0,      0 },
    { "top_p",                  0.0,  1.0,      0 },
    { "presence_penalty",      -2.0,  2.0,      0 },
    { "frequency_penalty",     -2.0,  2.0,      0 },
    { "max_tokens",             1.0,  INFINITY, 1 },
    { "max_completion_tokens",  1.0,  INFINITY, 1 },
    { NULL, 0.0, 0.0, 0 }
};


#define ALM_STOP_MAX  4


static void
alm_w_raw(alm_w_t *w, const char *s, size_t n)
{
    if (w->out) {
        memcpy(w->out + w->len, s, n);
    }

    w->len += n;
}


static void
alm_w_str(alm_w_t *w, const char *s)
{
    alm_w_raw(w, s, strlen(s));
}


static void
alm_w_esc(alm_w_t *w, const char *s, size_t n)
{
    w->len += alm_json_escape(w->out ? w->out + w->len : NULL, s, n);
}


static char *
alm_strndup(const char *s, size_t n)
{
    char  *p;

    p = malloc(n + 1);
    if (p == NULL) {
        return NULL;
    }

    if (n) {
        memcpy(p, s, n);
    }

    p[n] = '\0';

    return p;
}


static int
alm_hex4(const unsigned char *p, const unsigned char *end, unsigned *v)
{
    int            i;
    unsigned char  c;

    if (end - p < 4) {
        return 0;
    }

    *v = 0;

    for (i = 0; i < 4; i++) {
        c = p[i];

        if (c >= '0' && c <= '9') {
            *v = (*v << 4) | (unsigned) (c - '0');

        } else if ((c | 0x20) >= 'a' && (c | 0x20) <= 'f') {
            *v = (*v << 4) | (unsigned) ((c | 0x20) - 'a' + 10);

        } else {
            return 0;
        }
    }

    return 1;
}


/*
 * What cJSON would let through silently, checked on the raw body
 * before it is parsed: bytes that are not strict UTF-8 (cJSON copies
 * them into strings as they are, and they would reach AnythingLLM as
 * U+FFFD), a \u0000 escape (it would cut a string short: cJSON's
 * strings end at the first NUL), a \u escape without 4 hex digits
 * (cJSON reads it as \u0000) and a lone UTF-16 surrogate escape (no
 * character; cJSON refuses it as well, but the rule is ours).
 * Anything else that is not JSON is left to the parser.
 *
 * Strings are followed only to tell an escape's backslash from a
 * quote; a UTF-8 sequence never holds a byte below 0x80, so looking
 * at one byte at a time cannot be fooled.
 */

static int
alm_json_text_check(const char *body, size_t len, alm_error_t *err)
{
    int                   in_string;
    size_t                n;
    unsigned              u, lo;
    const char           *what;
    const unsigned char  *p, *start, *end;

    if (len == 0) {
        return ALM_OK;
    }

    start = (const unsigned char *) body;
    end = start + len;
    p = start;
    in_string = 0;

    while (p < end) {

        if (*p >= 0x80) {
            n = alm_utf8_len(p, end - p);

            if (n == 0) {
                what = "it is not valid UTF-8";
                goto bad;
            }

            p += n;
            continue;
        }

        if (*p == '"') {
            in_string = !in_string;
            p++;
            continue;
        }

        if (!in_string || *p != '\\') {
            p++;
            continue;
        }

        /* an escape inside a string */

        if (end - p < 2 || p[1] != 'u') {
            /*
             * another escape, or a broken one the parser refuses; a
             * byte past the backslash that is not ASCII is still
             * checked as UTF-8
             */
            p += (end - p >= 2 && p[1] < 0x80) ? 2 : 1;
            continue;
        }

        if (!alm_hex4(p + 2, end, &u)) {
            /* cJSON would read "\uZZZZ" as U+0000 */
            what = "a string holds a \\u escape without 4 hex digits";
            goto bad;
        }

        if (u == 0) {
            what = "a string holds \\u0000, which is refused";
            goto bad;
        }

        if (u >= 0xdc00 && u <= 0xdfff) {
            what = "a string holds a lone UTF-16 surrogate escape";
            goto bad;
        }

        if (u >= 0xd800 && u <= 0xdbff) {

            /* a high surrogate must be followed by a low one */

            if (end - p < 12 || p[6] != '\\' || p[7] != 'u'
                || !alm_hex4(p + 8, end, &lo) || lo < 0xdc00 || lo > 0xdfff)
            {
                what = "a string holds a lone UTF-16 surrogate escape";
                goto bad;
            }

            p += 12;
            continue;
        }

        p += 6;
    }

    return ALM_OK;

bad:

    alm_error_set(err, 400, "invalid_request_error", NULL, NULL,
                  ALM_BAD_TEXT, what, (size_t) (p - start));
    return ALM_ERROR;
}


/* a whole JSON text: only white space may follow the value */

static cJSON *
alm_json_parse(const char *p, size_t len)
{
    cJSON       *root;
    const char  *end;

    if (p == NULL || len == 0) {
        return NULL;
    }

    end = NULL;
    root = cJSON_ParseWithLengthOpts(p, len, &end, 0);

    if (root == NULL) {
        return NULL;
    }

    while (end < p + len
           && (*end == ' ' || *end == '\t' || *end == '\r' || *end == '\n'))
    {
        end++;
    }

    if (end != p + len) {
        cJSON_Delete(root);
        return NULL;
    }

    return root;
}


static int
alm_is_absent(const cJSON *item)
{
    return item == NULL || cJSON_IsNull(item);
}


static int
alm_role_known(const char *role)
{
    return strcmp(role, "system") == 0 || strcmp(role, "developer") == 0
           || strcmp(role, "user") == 0 || strcmp(role, "assistant") == 0
           || strcmp(role, "tool") == 0;
}


/* ------------------------------------------------------------------ */
/* content parts                                                      */

/* the URL of an image part: {"image_url":{"url":..}} or {"image_url":..} */

static const char *
alm_part_image_url(const cJSON *part)
{
    const cJSON  *iu;

    iu = cJSON_GetObjectItemCaseSensitive(part, "image_url");

    if (cJSON_IsString(iu)) {
        return iu->valuestring;
    }

    if (cJSON_IsObject(iu)) {
        iu = cJSON_GetObjectItemCaseSensitive(iu, "url");
        if (cJSON_IsString(iu)) {
            return iu->valuestring;
        }
    }

    return NULL;
}


static int
alm_part_is(const cJSON *part, const char *type)
{
    const cJSON  *t;

    t = cJSON_GetObjectItemCaseSensitive(part, "type");

    return cJSON_IsString(t) && strcmp(t->valuestring, type) == 0;
}


/*
 * Checks "data:<type>/<subtype>;base64,<base64>" with an image type.
 * Gives the MIME type and the extension for the attachment's name.
 */

static int
alm_data_uri(const char *url, const char **mime, size_t *mime_len,
    char *ext, size_t ext_size)
{
    size_t       n, i, sub;
    const char  *p;
    char         c;

    if (strncmp(url, "data:image/", 11) != 0) {
        return 0;
    }

    p = url + 5;
    n = 0;
    sub = 0;

    while (p[n] != ';') {
        c = p[n];

        if (c == '/') {
            sub = n + 1;

        } else if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
                     || (c >= '0' && c <= '9') || c == '.' || c == '+'
                     || c == '-'))
        {
            return 0;
        }

        n++;
    }

    if (n == 6 || strncmp(p + n, ";base64,", 8) != 0) {
        return 0;
    }

    *mime = p;
    *mime_len = n;

    for (i = n + 8; p[i]; i++) {
        c = p[i];

        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
              || (c >= '0' && c <= '9') || c == '+' || c == '/' || c == '='))
        {
            return 0;
        }
    }

    if (i == n + 8) {
        return 0;
    }

    /* the extension: the subtype up to a "+" suffix, jpeg as jpg */

    for (i = 0; sub + i < n && p[sub + i] != '+' && i + 1 < ext_size; i++) {
        c = p[sub + i];
        ext[i] = (c >= 'A' && c <= 'Z') ? (char) (c | 0x20) : c;
    }

    ext[i] = '\0';

    if (strcmp(ext, "jpeg") == 0) {
        strcpy(ext, "jpg");

    } else if (i == 0 || (sub + i < n && p[sub + i] != '+')) {
        strcpy(ext, "bin");
    }

    return 1;
}


/*
 * Validates the content of messages[i]; sets *images to the number of
 * image parts.
 */

static int
alm_content_check(const cJSON *content, const char *role, int i,
    int *images, alm_error_t *err)
{
    int           k;
    const cJSON  *part, *text;
    const char   *url, *mime;
    size_t        mime_len;
    char          ext[16];

    *images = 0;

    if (alm_is_absent(content)) {
        if (strcmp(role, "assistant") == 0) {
            return ALM_OK;
        }

        alm_error_set(err, 400, "invalid_request_error", "messages", NULL,
                      "Invalid value for 'messages[%d].content': a %s "
                      "message needs content.", i, role);
        return ALM_ERROR;
    }

    if (cJSON_IsString(content)) {
        return ALM_OK;
    }

    if (!cJSON_IsArray(content)) {
        alm_error_set(err, 400, "invalid_request_error", "messages", NULL,
                      "Invalid type for 'messages[%d].content': expected a "
                      "string or an array of content parts.", i);
        return ALM_ERROR;
    }

    k = 0;

    cJSON_ArrayForEach(part, content) {

        if (!cJSON_IsObject(part)) {
            alm_error_set(err, 400, "invalid_request_error", "messages",
                          NULL, "Invalid type for 'messages[%d].content[%d]'"
                          ": expected an object.", i, k);
            return ALM_ERROR;
        }

        if (alm_part_is(part, "text")) {
            text = cJSON_GetObjectItemCaseSensitive(part, "text");

            if (!cJSON_IsString(text)) {
                alm_error_set(err, 400, "invalid_request_error", "messages",
                              NULL, "Invalid type for 'messages[%d]."
                              "content[%d].text': expected a string.", i, k);
                return ALM_ERROR;
            }

        } else if (alm_part_is(part, "image_url")) {

            if (strcmp(role, "user") != 0) {
                alm_error_set(err, 400, "invalid_request_error", "messages",
                              NULL, "Invalid value for 'messages[%d]."
                              "content[%d]': image parts are only accepted "
                              "in user messages.", i, k);
                return ALM_ERROR;
            }

            url = alm_part_image_url(part);

            if (url == NULL) {
                alm_error_set(err, 400, "invalid_request_error", "messages",
                              NULL, "Invalid value for 'messages[%d]."
                              "content[%d].image_url': expected an object "
                              "with a string 'url'.", i, k);
                return ALM_ERROR;
            }

            if (!alm_data_uri(url, &mime, &mime_len, ext, sizeof(ext))) {
                alm_error_set(err, 400, "invalid_request_error", "messages",
                              NULL, "Invalid value for 'messages[%d]."
                              "content[%d].image_url': only data URLs of "
                              "images (data:image/...;base64,...) are "
                              "accepted; the gateway does not fetch image "
                              "URLs.", i, k);
                return ALM_ERROR;
            }

            (*images)++;

        } else {
            alm_error_set(err, 400, "invalid_request_error", "messages",
                          NULL, "Invalid value for 'messages[%d].content[%d]"
                          ".type': only 'text' and 'image_url' parts are "
                          "supported.", i, k);
            return ALM_ERROR;
        }

        k++;
    }

    return ALM_OK;
}


/* feeds the canonical content of a checked message into the digest */

static void
alm_content_hash(alm_conv_hash_t *h, const cJSON *content)
{
    const cJSON  *part, *text;
    const char   *url;

    if (cJSON_IsString(content)) {
        alm_conv_hash_update(h, content->valuestring,
                             strlen(content->valuestring));
        return;
    }

    if (!cJSON_IsArray(content)) {
        return;
    }

    cJSON_ArrayForEach(part, content) {

        if (alm_part_is(part, "text")) {
            text = cJSON_GetObjectItemCaseSensitive(part, "text");
            alm_conv_hash_update(h, text->valuestring,
                                 strlen(text->valuestring));

        } else {
            url = alm_part_image_url(part);
            alm_conv_hash_update(h, "\x01", 1);
            alm_conv_hash_update(h, url, strlen(url));
        }
    }
}


/*
 * The text of a checked content: text parts joined with "\n", empty
 * parts skipped; images are skipped, or written as "[image]" when
 * "placeholder" is set.
 */

static void
alm_content_text(alm_w_t *w, const cJSON *content, int placeholder)
{
    int           first;
    const cJSON  *part, *text;
    const char   *s;

    if (cJSON_IsString(content)) {
        alm_w_str(w, content->valuestring);
        return;
    }

    if (!cJSON_IsArray(content)) {
        return;
    }

    first = 1;

    cJSON_ArrayForEach(part, content) {

        if (alm_part_is(part, "text")) {
            text = cJSON_GetObjectItemCaseSensitive(part, "text");
            s = text->valuestring;

        } else {
            s = placeholder ? ALM_TRANSCRIPT_IMAGE : "";
        }

        if (*s == '\0') {
            continue;
        }

        if (!first) {
            alm_w_raw(w, "\n", 1);
        }

        alm_w_str(w, s);
        first = 0;
    }
}


/*
 * The transcript of the messages before the last: user and assistant
 * turns only.  System and developer messages stay out of it (the
 * workspace has its own system prompt), as do tool results.
 */

static void
alm_transcript(alm_w_t *w, const cJSON *messages, int last)
{
    int           i;
    alm_w_t       count;
    const cJSON  *msg, *role, *content;

    alm_w_str(w, ALM_TRANSCRIPT_HEAD);

    i = 0;

    cJSON_ArrayForEach(msg, messages) {

        if (i++ == last) {
            break;
        }

        role = cJSON_GetObjectItemCaseSensitive(msg, "role");

        if (strcmp(role->valuestring, "user") != 0
            && strcmp(role->valuestring, "assistant") != 0)
        {
            continue;
        }

        content = cJSON_GetObjectItemCaseSensitive(msg, "content");

        /* a turn with nothing to show is left out */

        count.out = NULL;
        count.len = 0;
        alm_content_text(&count, content, 1);

        if (count.len == 0) {
            continue;
        }

        alm_w_str(w, role->valuestring);
        alm_w_raw(w, ": ", 2);
        alm_content_text(w, content, 1);
        alm_w_raw(w, "\n", 1);
    }

    alm_w_raw(w, "\n", 1);
}


static void
alm_attachments(alm_w_t *w, const cJSON *content)
{
    unsigned      k;
    char          name[64], ext[16];
    const char   *url, *mime;
    size_t        mime_len;
    const cJSON  *part;

    alm_w_raw(w, "[", 1);
    k = 0;

    cJSON_ArrayForEach(part, content) {

        if (!alm_part_is(part, "image_url")) {
            continue;
        }

        url = alm_part_image_url(part);
        (void) alm_data_uri(url, &mime, &mime_len, ext, sizeof(ext));

        k++;
        snprintf(name, sizeof(name), "image-%u.%s", k, ext);

        alm_w_str(w, k > 1 ? ",{\"name\":\"" : "{\"name\":\"");
        alm_w_esc(w, name, strlen(name));
        alm_w_str(w, "\",\"mime\":\"");
        alm_w_esc(w, mime, mime_len);
        alm_w_str(w, "\",\"contentString\":\"");
        alm_w_esc(w, url, strlen(url));
        alm_w_str(w, "\"}");
    }

    alm_w_raw(w, "]", 1);
}


/* ------------------------------------------------------------------ */
/* the request                                                        */

static int
alm_check_type(const cJSON *item, unsigned types)
{
    if (alm_is_absent(item)) {
        return 1;
    }

    return ((types & ALM_T_NUM) && cJSON_IsNumber(item))
           || ((types & ALM_T_STR) && cJSON_IsString(item))
           || ((types & ALM_T_BOOL) && cJSON_IsBool(item))
           || ((types & ALM_T_ARR) && cJSON_IsArray(item))
           || ((types & ALM_T_OBJ) && cJSON_IsObject(item));
}


/* the parameters that change the answer in ways the gateway cannot give */

static int
alm_check_refused(const cJSON *root, alm_error_t *err)
{
    const cJSON  *item, *v;

    item = cJSON_GetObjectItemCaseSensitive(root, "n");

    if (!alm_is_absent(item)
        && !(cJSON_IsNumber(item) && item->valuedouble == 1))
    {
        alm_error_set(err, 400, "invalid_request_error", "n", NULL,
                      "Only one choice can be generated: 'n' must be 1.");
        return ALM_ERROR;
    }

    item = cJSON_GetObjectItemCaseSensitive(root, "tools");

    if (!alm_is_absent(item)
        && !(cJSON_IsArray(item) && cJSON_GetArraySize(item) == 0))
    {
        alm_error_set(err, 400, "invalid_request_error", "tools", NULL,
                      "Tool calling is not supported: AnythingLLM runs its "
                      "own agents.  Remove 'tools'.");
        return ALM_ERROR;
    }

    item = cJSON_GetObjectItemCaseSensitive(root, "functions");

    if (!alm_is_absent(item)
        && !(cJSON_IsArray(item) && cJSON_GetArraySize(item) == 0))
    {
        alm_error_set(err, 400, "invalid_request_error", "functions", NULL,
                      "Function calling is not supported: AnythingLLM runs "
                      "its own agents.  Remove 'functions'.");
        return ALM_ERROR;
    }

    item = cJSON_GetObjectItemCaseSensitive(root, "tool_choice");

    if (!alm_is_absent(item)
        && !(cJSON_IsString(item) && strcmp(item->valuestring, "none") == 0))
    {
        alm_error_set(err, 400, "invalid_request_error", "tool_choice", NULL,
                      "Tool calling is not supported: 'tool_choice' can "
                      "only be \"none\".");
        return ALM_ERROR;
    }

    item = cJSON_GetObjectItemCaseSensitive(root, "logprobs");

    if (!alm_is_absent(item) && !cJSON_IsFalse(item)) {
        alm_error_set(err, 400, "invalid_request_error", "logprobs", NULL,
                      "Log probabilities are not available: 'logprobs' "
                      "must be false.");
        return ALM_ERROR;
    }

    item = cJSON_GetObjectItemCaseSensitive(root, "response_format");

    if (!alm_is_absent(item)) {
        v = cJSON_GetObjectItemCaseSensitive(item, "type");

        if (!cJSON_IsObject(item) || !cJSON_IsString(v)
            || strcmp(v->valuestring, "text") != 0)
        {
            alm_error_set(err, 400, "invalid_request_error",
                          "response_format", NULL,
                          "Only the 'text' response format is supported.");
            return ALM_ERROR;
        }
    }

    item = cJSON_GetObjectItemCaseSensitive(root, "audio");

    if (!alm_is_absent(item)) {
        alm_error_set(err, 400, "invalid_request_error", "modalities", NULL,
                      "Audio output is not supported: remove 'audio'.");
        return ALM_ERROR;
    }

    item = cJSON_GetObjectItemCaseSensitive(root, "modalities");

    if (!alm_is_absent(item)) {

        if (!cJSON_IsArray(item)) {
            goto modalities;
        }

        cJSON_ArrayForEach(v, item) {
            if (!cJSON_IsString(v) || strcmp(v->valuestring, "text") != 0) {
                goto modalities;
            }
        }
    }

    return ALM_OK;

modalities:

    alm_error_set(err, 400, "invalid_request_error", "modalities", NULL,
                  "Only text output is supported: 'modalities' can only "
                  "be [\"text\"].");
    return ALM_ERROR;
}


/* a number as short as it can be written and read back the same */

static void
alm_number_text(char *buf, size_t size, double v)
{
    int  prec;

    for (prec = 1; prec < 17; prec++) {
        snprintf(buf, size, "%.*g", prec, v);

        if (strtod(buf, NULL) == v) {
            return;
        }
    }

    snprintf(buf, size, "%.17g", v);
}


/* the ranges and lengths OpenAI refuses to go beyond */

static int
alm_check_ranges(const cJSON *root, alm_error_t *err)
{
    int                 n;
    char                num[32];
    double              v;
    const cJSON        *item, *s;
    const alm_range_t  *rg;

    for (rg = alm_ranges; rg->name; rg++) {
        item = cJSON_GetObjectItemCaseSensitive(root, rg->name);

        if (!cJSON_IsNumber(item)) {
            continue;
        }

        v = item->valuedouble;
        alm_number_text(num, sizeof(num), v);

        if (v < rg->min) {
            alm_error_set(err, 400, "invalid_request_error", rg->name,
                          rg->integer ? "integer_below_min_value"
                                      : "decimal_below_min_value",
                          "Invalid '%s': %s below minimum value. Expected "
                          "a value >= %g, but got %s instead.", rg->name,
                          rg->integer ? "integer" : "decimal", rg->min, num);
            return ALM_ERROR;
        }

        if (v > rg->max) {
            alm_error_set(err, 400, "invalid_request_error", rg->name,
                          rg->integer ? "integer_above_max_value"
                                      : "decimal_above_max_value",
                          "Invalid '%s': %s above maximum value. Expected "
                          "a value <= %g, but got %s instead.", rg->name,
                          rg->integer ? "integer" : "decimal", rg->max, num);
            return ALM_ERROR;
        }
    }

    item = cJSON_GetObjectItemCaseSensitive(root, "stop");

    if (!cJSON_IsArray(item)) {
        return ALM_OK;
    }

    n = 0;

    cJSON_ArrayForEach(s, item) {

        if (!cJSON_IsString(s)) {
            alm_error_set(err, 400, "invalid_request_error", "stop", NULL,
                          "Invalid type for 'stop[%d]': expected a string.",
                          n);
            return ALM_ERROR;
        }

        n++;
    }

    if (n > ALM_STOP_MAX) {
        alm_error_set(err, 400, "invalid_request_error", "stop",
                      "array_above_max_length",
                      "Invalid 'stop': array too long. Expected an array "
                      "with maximum length %d, but got an array with length "
                      "%d instead.", ALM_STOP_MAX, n);
        return ALM_ERROR;
    }

    return ALM_OK;
}


static int
alm_check_options(const cJSON *root, alm_chat_req_t *req, alm_error_t *err)
{
    const cJSON        *item, *v;
    const alm_param_t  *prm;

    item = cJSON_GetObjectItemCaseSensitive(root, "stream");

    if (!alm_is_absent(item) && !cJSON_IsBool(item)) {
        alm_error_set(err, 400, "invalid_request_error", "stream", NULL,
                      "Invalid type for 'stream': expected a boolean.");
        return ALM_ERROR;
    }

    req->stream = cJSON_IsTrue(item) ? 1 : 0;

    item = cJSON_GetObjectItemCaseSensitive(root, "stream_options");

    if (!alm_is_absent(item)) {
        v = cJSON_GetObjectItemCaseSensitive(item, "include_usage");

        if (!cJSON_IsObject(item) || !alm_check_type(v, ALM_T_BOOL)) {
            alm_error_set(err, 400, "invalid_request_error",
                          "stream_options", NULL,
                          "Invalid 'stream_options': expected an object "
                          "with an optional boolean 'include_usage'.");
            return ALM_ERROR;
        }

        /* like OpenAI: only a stream carries a usage chunk */
        req->include_usage = (req->stream && cJSON_IsTrue(v)) ? 1 : 0;
    }

    if (alm_check_refused(root, err) != ALM_OK) {
        return ALM_ERROR;
    }

    for (prm = alm_ignored_params; prm->name; prm++) {
        item = cJSON_GetObjectItemCaseSensitive(root, prm->name);

        if (!alm_check_type(item, prm->types)) {
            alm_error_set(err, 400, "invalid_request_error", prm->name, NULL,
                          "Invalid type for '%s'.", prm->name);
            return ALM_ERROR;
        }
    }

    return alm_check_ranges(root, err);
}


static int
alm_check_messages(const cJSON *messages, int *images, alm_error_t *err)
{
    int           i;
    const cJSON  *msg, *role;

    if (!cJSON_IsArray(messages) || cJSON_GetArraySize(messages) == 0) {
        alm_error_set(err, 400, "invalid_request_error", "messages", NULL,
                      "'messages' must be a non-empty array of messages.");
        return ALM_ERROR;
    }

    i = 0;
    role = NULL;

    cJSON_ArrayForEach(msg, messages) {

        if (!cJSON_IsObject(msg)) {
            alm_error_set(err, 400, "invalid_request_error", "messages", NULL,
                          "Invalid type for 'messages[%d]': expected an "
                          "object.", i);
            return ALM_ERROR;
        }

        role = cJSON_GetObjectItemCaseSensitive(msg, "role");

        if (!cJSON_IsString(role) || !alm_role_known(role->valuestring)) {
            alm_error_set(err, 400, "invalid_request_error", "messages", NULL,
                          "Invalid value for 'messages[%d].role': expected "
                          "one of 'system', 'developer', 'user', "
                          "'assistant' or 'tool'.", i);
            return ALM_ERROR;
        }

        if (alm_content_check(cJSON_GetObjectItemCaseSensitive(msg,
                                                               "content"),
                              role->valuestring, i, images, err)
            != ALM_OK)
        {
            return ALM_ERROR;
        }

        i++;
    }

    if (strcmp(role->valuestring, "user") != 0) {
        alm_error_set(err, 400, "invalid_request_error", "messages", NULL,
                      "The last message must have the role 'user': "
                      "AnythingLLM answers a user message.");
        return ALM_ERROR;
    }

    /* *images now counts the image parts of the last message */

    return ALM_OK;
}


static char *
alm_build_text(const cJSON *content, size_t *len)
{
    alm_w_t   w;
    char     *p;

    w.out = NULL;
    w.len = 0;
    alm_content_text(&w, content, 0);

    p = malloc(w.len + 1);
    if (p == NULL) {
        return NULL;
    }

    w.out = p;
    w.len = 0;
    alm_content_text(&w, content, 0);
    p[w.len] = '\0';

    *len = w.len;

    return p;
}


static int
alm_chat_req_read(const cJSON *root, const char *key_digest_hex,
    alm_chat_req_t *req, alm_error_t *err)
{
    int           i, n, images;
    alm_w_t       w;
    const cJSON  *model, *messages, *msg, *role, *content;

    model = cJSON_GetObjectItemCaseSensitive(root, "model");

    if (alm_is_absent(model)) {
        alm_error_set(err, 400, "invalid_request_error", "model", NULL,
                      "You must provide a model parameter (the slug of an "
                      "AnythingLLM workspace).");
        return ALM_ERROR;
    }

    if (!cJSON_IsString(model)) {
        alm_error_set(err, 400, "invalid_request_error", "model", NULL,
                      "Invalid type for 'model': expected a string.");
        return ALM_ERROR;
    }

    if (!alm_slug_valid(model->valuestring, strlen(model->valuestring))) {
        alm_error_set(err, 400, "invalid_request_error", "model", NULL,
                      "Invalid 'model': a model is the slug of an "
                      "AnythingLLM workspace (1 to 255 of A-Z a-z 0-9 _ . "
                      "-).");
        return ALM_ERROR;
    }

    messages = cJSON_GetObjectItemCaseSensitive(root, "messages");

    if (alm_check_messages(messages, &images, err) != ALM_OK) {
        return ALM_ERROR;
    }

    if (alm_check_options(root, req, err) != ALM_OK) {
        return ALM_ERROR;
    }

    n = cJSON_GetArraySize(messages);

    /* the digest: "prefix" stops before the last message */

    alm_conv_hash_init(&req->full, key_digest_hex, model->valuestring,
                       strlen(model->valuestring));

    i = 0;
    content = NULL;

    cJSON_ArrayForEach(msg, messages) {
        role = cJSON_GetObjectItemCaseSensitive(msg, "role");
        content = cJSON_GetObjectItemCaseSensitive(msg, "content");

        if (i == n - 1) {
            alm_conv_hash_hex(&req->full, req->prefix_hex);

        } else if (strcmp(role->valuestring, "user") == 0
                   || strcmp(role->valuestring, "assistant") == 0)
        {
            req->has_history = 1;
        }

        alm_conv_hash_message_begin(&req->full, role->valuestring,
                                    strlen(role->valuestring));
        alm_content_hash(&req->full, content);
        alm_conv_hash_message_end(&req->full);

        i++;
    }

    /* "content" is the last message's now */

    req->message = alm_build_text(content, &req->message_len);
    if (req->message == NULL) {
        goto nomem;
    }

    if (req->message_len == 0) {

        if (images == 0) {
            alm_error_set(err, 400, "invalid_request_error", "messages", NULL,
                          "The last user message has no text.");
            return ALM_ERROR;
        }

        /*
         * AnythingLLM refuses an empty message: an image alone goes
         * with a blank one
         */

        free(req->message);
        req->message = alm_strndup(" ", 1);
        if (req->message == NULL) {
            goto nomem;
        }

        req->message_len = 1;
    }

    if (images) {
        w.out = NULL;
        w.len = 0;
        alm_attachments(&w, content);

        req->attachments = malloc(w.len + 1);
        if (req->attachments == NULL) {
            goto nomem;
        }

        w.out = req->attachments;
        w.len = 0;
        alm_attachments(&w, content);
        req->attachments[w.len] = '\0';
    }

    if (req->has_history) {
        w.out = NULL;
        w.len = 0;
        alm_transcript(&w, messages, n - 1);

        req->transcript = malloc(w.len + 1);
        if (req->transcript == NULL) {
            goto nomem;
        }

        w.out = req->transcript;
        w.len = 0;
        alm_transcript(&w, messages, n - 1);
        req->transcript[w.len] = '\0';
    }

    req->model_len = strlen(model->valuestring);
    req->model = alm_strndup(model->valuestring, req->model_len);
    if (req->model == NULL) {
        goto nomem;
    }

    return ALM_OK;

nomem:

    alm_error_set(err, 500, "server_error", NULL, NULL,
                  "The gateway ran out of memory.");
    return ALM_ERROR;
}


int
alm_chat_req_parse(const char *body, size_t len, const char *key_digest_hex,
    alm_chat_req_t *req, alm_error_t *err)
{
    int     rc;
    cJSON  *root;

    memset(req, 0, sizeof(alm_chat_req_t));

    if (alm_json_text_check(body, len, err) != ALM_OK) {
        return ALM_ERROR;
    }

    root = alm_json_parse(body, len);

    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        alm_error_set(err, 400, "invalid_request_error", NULL, NULL, "%s",
                      ALM_BAD_JSON);
        return ALM_ERROR;
    }

    rc = alm_chat_req_read(root, key_digest_hex, req, err);

    cJSON_Delete(root);

    if (rc != ALM_OK) {
        alm_chat_req_free(req);
    }

    return rc;
}


void
alm_chat_req_free(alm_chat_req_t *req)
{
    free(req->model);
    free(req->message);
    free(req->attachments);
    free(req->transcript);

    memset(req, 0, sizeof(alm_chat_req_t));
}


static void
alm_upstream_body(alm_w_t *w, const alm_chat_req_t *req, const char *mode,
    const char *session_id, size_t session_id_len, int with_transcript)
{
    alm_w_str(w, "{\"message\":\"");

    if (with_transcript) {
        alm_w_esc(w, req->transcript, strlen(req->transcript));
        alm_w_str(w, ALM_TRANSCRIPT_USER);
    }

    alm_w_esc(w, req->message, req->message_len);
    alm_w_str(w, "\",\"mode\":\"");
    alm_w_str(w, mode);
    alm_w_str(w, "\"");

    if (session_id && session_id_len) {
        alm_w_str(w, ",\"sessionId\":\"");
        alm_w_esc(w, session_id, session_id_len);
        alm_w_str(w, "\"");
    }

    if (req->attachments) {
        alm_w_str(w, ",\"attachments\":");
        alm_w_str(w, req->attachments);
    }

    alm_w_str(w, "}");
}


char *
alm_chat_req_upstream_body(const alm_chat_req_t *req, alm_mode_e mode,
    const char *session_id, size_t session_id_len, int continuing,
    size_t *len)
{
    int          tr;
    char        *p;
    alm_w_t      w;
    const char  *m;

    if (req->message == NULL) {
        return NULL;
    }

    switch (mode) {
    case ALM_MODE_QUERY:
        m = "query";
        break;
    case ALM_MODE_AUTOMATIC:
        m = "automatic";
        break;
    default:
        m = "chat";
        break;
    }

    tr = (!continuing && req->transcript != NULL);

    w.out = NULL;
    w.len = 0;
    alm_upstream_body(&w, req, m, session_id, session_id_len, tr);

    p = malloc(w.len + 1);
    if (p == NULL) {
        return NULL;
    }

    w.out = p;
    w.len = 0;
    alm_upstream_body(&w, req, m, session_id, session_id_len, tr);
    p[w.len] = '\0';

    if (len) {
        *len = w.len;
    }

    return p;
}


/* ------------------------------------------------------------------ */
/* answers                                                            */

static long
alm_json_long(const cJSON *item, int *found)
{
    double  d;

    if (!cJSON_IsNumber(item)) {
        return 0;
    }

    *found = 1;
    d = item->valuedouble;

    /* NaN fails both tests */

    if (!(d >= 0)) {
        return 0;
    }

    if (!(d < 1e15)) {
        return (long) 1e15;
    }

    return (long) d;
}


static void
alm_usage_read(const cJSON *metrics, alm_usage_t *usage)
{
    int  found;

    usage->prompt_tokens = 0;
    usage->completion_tokens = 0;
    usage->total_tokens = 0;
    usage->present = 0;

    if (!cJSON_IsObject(metrics)) {
        return;
    }

    found = 0;

    usage->prompt_tokens = alm_json_long(
        cJSON_GetObjectItemCaseSensitive(metrics, "prompt_tokens"), &found);
    usage->completion_tokens = alm_json_long(
        cJSON_GetObjectItemCaseSensitive(metrics, "completion_tokens"),
        &found);
    usage->total_tokens = alm_json_long(
        cJSON_GetObjectItemCaseSensitive(metrics, "total_tokens"), &found);

    if (usage->total_tokens == 0) {
        usage->total_tokens = usage->prompt_tokens + usage->completion_tokens;
    }

    usage->present = found;
}


static const char *
alm_upstream_error(const cJSON *root)
{
    const cJSON  *e;

    e = cJSON_GetObjectItemCaseSensitive(root, "error");

    if (cJSON_IsString(e) && e->valuestring[0] != '\0') {
        return e->valuestring;
    }

    return NULL;
}


static cJSON *
alm_completion_new(const alm_completion_meta_t *meta, const char *object)
{
    int     ok;
    char   *s;
    cJSON  *o;

    o = cJSON_CreateObject();
    if (o == NULL) {
        return NULL;
    }

    ok = 1;

    s = alm_strndup(meta->id ? meta->id : "", meta->id ? meta->id_len : 0);
    ok = ok && s && cJSON_AddStringToObject(o, "id", s);
    free(s);

    ok = ok && cJSON_AddStringToObject(o, "object", object);
    ok = ok && cJSON_AddNumberToObject(o, "created", (double) meta->created);

    s = alm_strndup(meta->model ? meta->model : "",
                    meta->model ? meta->model_len : 0);
    ok = ok && s && cJSON_AddStringToObject(o, "model", s);
    free(s);

    if (!ok) {
        cJSON_Delete(o);
        return NULL;
    }

    return o;
}


char *
alm_chat_response_translate(const char *json, size_t len,
    const alm_completion_meta_t *meta, alm_usage_t *usage,
    alm_conv_hash_t *conv, size_t *out_len, alm_error_t *err)
{
    int           ok;
    char         *out;
    cJSON        *root, *o, *choices, *choice, *msg, *u, *sources;
    const cJSON  *type, *text;
    const char   *content, *e;
    alm_usage_t   us;

    if (usage) {
        memset(usage, 0, sizeof(alm_usage_t));
    }

    root = alm_json_parse(json, len);

    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        alm_error_set(err, 502, "server_error", NULL, NULL,
                      "AnythingLLM sent an answer the gateway could not "
                      "read.");
        return NULL;
    }

    type = cJSON_GetObjectItemCaseSensitive(root, "type");
    e = alm_upstream_error(root);

    if (e || (cJSON_IsString(type) && strcmp(type->valuestring, "abort") == 0))
    {
        alm_error_set(err, 502, "server_error", NULL, NULL,
                      "AnythingLLM could not answer: %s",
                      e ? e : "the answer was aborted.");
        cJSON_Delete(root);
        return NULL;
    }

    text = cJSON_GetObjectItemCaseSensitive(root, "textResponse");
    if (!cJSON_IsString(text)) {
        text = cJSON_GetObjectItemCaseSensitive(root, "textChunk");
    }

    content = cJSON_IsString(text) ? text->valuestring : "";

    alm_usage_read(cJSON_GetObjectItemCaseSensitive(root, "metrics"), &us);

    o = alm_completion_new(meta, "chat.completion");
    if (o == NULL) {
        goto nomem;
    }

    ok = 1;

    choices = cJSON_AddArrayToObject(o, "choices");
    choice = cJSON_CreateObject();
    ok = ok && choices && choice && cJSON_AddItemToArray(choices, choice);

    if (!ok) {
        cJSON_Delete(choice);
        goto fail;
    }

    msg = NULL;

    ok = ok && cJSON_AddNumberToObject(choice, "index", 0);
    ok = ok && (msg = cJSON_AddObjectToObject(choice, "message"));
    ok = ok && cJSON_AddStringToObject(msg, "role", "assistant");
    ok = ok && cJSON_AddStringToObject(msg, "content", content);
    ok = ok && cJSON_AddNullToObject(msg, "refusal");
    ok = ok && cJSON_AddNullToObject(choice, "logprobs");
    ok = ok && cJSON_AddStringToObject(choice, "finish_reason", "stop");

    u = NULL;

    ok = ok && (u = cJSON_AddObjectToObject(o, "usage"));
    ok = ok && cJSON_AddNumberToObject(u, "prompt_tokens",
                                       (double) us.prompt_tokens);
    ok = ok && cJSON_AddNumberToObject(u, "completion_tokens",
                                       (double) us.completion_tokens);
    ok = ok && cJSON_AddNumberToObject(u, "total_tokens",
                                       (double) us.total_tokens);

    if (!ok) {
        goto fail;
    }

    /* the retrieval sources move over as they are */

    sources = cJSON_DetachItemFromObjectCaseSensitive(root, "sources");

    if (!cJSON_IsArray(sources)) {
        cJSON_Delete(sources);
        sources = cJSON_CreateArray();
    }

    if (sources == NULL || !cJSON_AddItemToObject(o, "sources", sources)) {
        cJSON_Delete(sources);
        goto fail;
    }

    out = cJSON_PrintUnformatted(o);
    if (out == NULL) {
        goto fail;
    }

    if (conv) {
        alm_conv_hash_message_begin(conv, "assistant", 9);
        alm_conv_hash_update(conv, content, strlen(content));
        alm_conv_hash_message_end(conv);
    }

    if (usage) {
        *usage = us;
    }

    if (out_len) {
        *out_len = strlen(out);
    }

    cJSON_Delete(o);
    cJSON_Delete(root);

    return out;

fail:

    cJSON_Delete(o);

nomem:

    cJSON_Delete(root);
    alm_error_set(err, 500, "server_error", NULL, NULL,
                  "The gateway ran out of memory.");
    return NULL;
}


void
alm_chat_error_translate(int status, const char *body, size_t len,
    const char *model, size_t model_len, alm_error_t *err)
{
    cJSON       *root;
    const char  *e;
    int          mlen;

    root = alm_json_parse(body, len);
    e = NULL;

    if (cJSON_IsObject(root)) {
        e = alm_upstream_error(root);

        if (e == NULL) {
            e = cJSON_GetStringValue(
                    cJSON_GetObjectItemCaseSensitive(root, "message"));
            if (e && *e == '\0') {
                e = NULL;
            }
        }
    }

    mlen = model_len > 128 ? 128 : (int) model_len;

    if (status == 400 && e && strstr(e, "is not a valid workspace")) {
        alm_error_set(err, 404, "invalid_request_error", NULL,
                      "model_not_found", "The model `%.*s` does not exist "
                      "or you do not have access to it.", mlen,
                      model ? model : "");

    } else if (status == 403) {
        alm_error_set(err, 502, "server_error", NULL, NULL,
                      "AnythingLLM refused the gateway's upstream key: check "
                      "anythingllm_upstream_key.");

    } else if (status >= 400 && status < 500) {
        if (e) {
            alm_error_set(err, 400, "invalid_request_error", NULL, NULL,
                          "AnythingLLM rejected the request: %s", e);
        } else {
            alm_error_set(err, 400, "invalid_request_error", NULL, NULL,
                          "AnythingLLM rejected the request (HTTP %d).",
                          status);
        }

    } else if (e) {
        alm_error_set(err, 502, "server_error", NULL, NULL,
                      "AnythingLLM failed to answer: %s", e);

    } else {
        alm_error_set(err, 502, "server_error", NULL, NULL,
                      "AnythingLLM failed to answer (HTTP %d).", status);
    }

    cJSON_Delete(root);
}


/* ------------------------------------------------------------------ */
/* workspaces and models                                              */

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

    root = alm_json_parse(json, len);

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
    char        *out;
    cJSON       *root, *array, *ws, *next;
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

    out = cJSON_PrintUnformatted(root);

    cJSON_Delete(root);

    if (out && out_len) {
        *out_len = strlen(out);
    }

    return out;
}


static cJSON *
alm_model_new(const char *slug, time_t created)
{
    int     ok;
    cJSON  *m;

    m = cJSON_CreateObject();
    if (m == NULL) {
        return NULL;
    }

    ok = cJSON_AddStringToObject(m, "id", slug) != NULL;
    ok = ok && cJSON_AddStringToObject(m, "object", "model");
    ok = ok && cJSON_AddNumberToObject(m, "created", (double) created);
    ok = ok && cJSON_AddStringToObject(m, "owned_by", "anythingllm");

    if (!ok) {
        cJSON_Delete(m);
        return NULL;
    }

    return m;
}


char *
alm_workspaces_to_models(const char *json, size_t len, const char *list,
    size_t list_len, const char *one, size_t one_len, time_t now,
    size_t *out_len, alm_error_t *err)
{
    int           mlen;
    char         *out;
    cJSON        *root, *array, *o, *data, *m;
    const cJSON  *ws;
    const char   *slug;
    size_t        n;

    root = alm_workspaces_parse(json, len, &array);

    if (root == NULL) {
        alm_error_set(err, 502, "server_error", NULL, NULL,
                      "AnythingLLM sent a workspace list the gateway could "
                      "not read.");
        return NULL;
    }

    o = NULL;

    if (one) {
        cJSON_ArrayForEach(ws, array) {
            slug = alm_workspace_slug(ws);

            if (slug == NULL) {
                continue;
            }

            n = strlen(slug);

            if (n == one_len && memcmp(slug, one, n) == 0
                && alm_workspace_allowed(list, list_len, slug, n))
            {
                o = alm_model_new(slug, alm_workspace_created(ws, now));
                if (o == NULL) {
                    goto nomem;
                }

                break;
            }
        }

        if (o == NULL) {
            cJSON_Delete(root);
            mlen = one_len > 128 ? 128 : (int) one_len;
            alm_error_set(err, 404, "invalid_request_error", NULL,
                          "model_not_found", "The model `%.*s` does not "
                          "exist or you do not have access to it.", mlen,
                          one);
            return NULL;
        }

    } else {
        o = cJSON_CreateObject();
        if (o == NULL) {
            goto nomem;
        }

        data = NULL;

        if (!cJSON_AddStringToObject(o, "object", "list")
            || (data = cJSON_AddArrayToObject(o, "data")) == NULL)
        {
            goto fail;
        }

        cJSON_ArrayForEach(ws, array) {
            slug = alm_workspace_slug(ws);

            if (slug == NULL
                || !alm_workspace_allowed(list, list_len, slug,
                                          strlen(slug)))
            {
                continue;
            }

            m = alm_model_new(slug, alm_workspace_created(ws, now));

            if (m == NULL || !cJSON_AddItemToArray(data, m)) {
                cJSON_Delete(m);
                goto fail;
            }
        }
    }

    out = cJSON_PrintUnformatted(o);
    if (out == NULL) {
        goto fail;
    }

    cJSON_Delete(o);
    cJSON_Delete(root);

    if (out_len) {
        *out_len = strlen(out);
    }

    return out;

fail:

    cJSON_Delete(o);

nomem:

    cJSON_Delete(root);
    alm_error_set(err, 500, "server_error", NULL, NULL,
                  "The gateway ran out of memory.");
    return NULL;
}
