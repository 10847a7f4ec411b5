/*
 * Copyright (C) ngx_anythingllm authors
 *
 * The chat completions request: validation, the conversation digest,
 * the transcript of earlier turns, image attachments and the body of
 * the workspace chat call.
 */


#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alm_json.h"


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


typedef struct {
    const char  *name;
    size_t       len;
    unsigned     types;
} alm_param_t;


/* a table's name and its length */
#define alm_name(s)  s, sizeof(s) - 1


#define ALM_T_NUM   0x01
#define ALM_T_STR   0x02
#define ALM_T_BOOL  0x04
#define ALM_T_ARR   0x08
#define ALM_T_OBJ   0x10


#define alm_nelts(a)  (sizeof(a) / sizeof((a)[0]))


/*
 * Sampling and bookkeeping parameters that AnythingLLM has no use for
 * (the workspace's own settings apply): accepted when null or of the
 * right type, and dropped.  Their types are checked in this order.
 */

enum {
    ALM_P_TEMPERATURE = 0,
    ALM_P_TOP_P,
    ALM_P_MAX_TOKENS,
    ALM_P_MAX_COMPLETION_TOKENS,
    ALM_P_PRESENCE_PENALTY,
    ALM_P_FREQUENCY_PENALTY,
    ALM_P_STOP,
    ALM_P_SEED,
    ALM_P_USER,
    ALM_P_LOGIT_BIAS,
    ALM_P_METADATA,
    ALM_P_STORE,
    ALM_P_PARALLEL_TOOL_CALLS,
    ALM_P_REASONING_EFFORT,
    ALM_P_SERVICE_TIER,
    ALM_P_TOP_LOGPROBS,
    ALM_P_N
};


static const alm_param_t  alm_ignored_params[ALM_P_N] = {
    [ALM_P_TEMPERATURE] =
        { alm_name("temperature"),                ALM_T_NUM },
    [ALM_P_TOP_P] =
        { alm_name("top_p"),                      ALM_T_NUM },
    [ALM_P_MAX_TOKENS] =
        { alm_name("max_tokens"),                 ALM_T_NUM },
    [ALM_P_MAX_COMPLETION_TOKENS] =
        { alm_name("max_completion_tokens"),      ALM_T_NUM },
    [ALM_P_PRESENCE_PENALTY] =
        { alm_name("presence_penalty"),           ALM_T_NUM },
    [ALM_P_FREQUENCY_PENALTY] =
        { alm_name("frequency_penalty"),          ALM_T_NUM },
    [ALM_P_STOP] =
        { alm_name("stop"),                       ALM_T_STR | ALM_T_ARR },
    [ALM_P_SEED] =
        { alm_name("seed"),                       ALM_T_NUM },
    [ALM_P_USER] =
        { alm_name("user"),                       ALM_T_STR },
    [ALM_P_LOGIT_BIAS] =
        { alm_name("logit_bias"),                 ALM_T_OBJ },
    [ALM_P_METADATA] =
        { alm_name("metadata"),                   ALM_T_OBJ },
    [ALM_P_STORE] =
        { alm_name("store"),                      ALM_T_BOOL },
    [ALM_P_PARALLEL_TOOL_CALLS] =
        { alm_name("parallel_tool_calls"),        ALM_T_BOOL },
    [ALM_P_REASONING_EFFORT] =
        { alm_name("reasoning_effort"),           ALM_T_STR },
    [ALM_P_SERVICE_TIER] =
        { alm_name("service_tier"),               ALM_T_STR },
    [ALM_P_TOP_LOGPROBS] =
        { alm_name("top_logprobs"),               ALM_T_NUM }
};


/*
 * The ranges OpenAI enforces on some of them: a value outside is a
 * 400 naming the parameter, with OpenAI's own wording and code, even
 * though the value would be dropped.
 */

typedef struct {
    int          param;         /* ALM_P_* */
    double       min;
    double       max;
    int          integer;       /* OpenAI says "integer", not "decimal" */
} alm_range_t;


/* checked in this order */

static const alm_range_t  alm_ranges[] = {
    { ALM_P_TEMPERATURE,            0.0,  2.0,      0 },
    { ALM_P_TOP_P,                  0.0,  1.0,      0 },
    { ALM_P_PRESENCE_PENALTY,      -2.0,  2.0,      0 },
    { ALM_P_FREQUENCY_PENALTY,     -2.0,  2.0,      0 },
    { ALM_P_MAX_TOKENS,             1.0,  INFINITY, 1 },
    { ALM_P_MAX_COMPLETION_TOKENS,  1.0,  INFINITY, 1 }
};


#define ALM_STOP_MAX  4


static const char *const  alm_roles[] = {
    "system", "developer", "user", "assistant", "tool"
};


/* role: len bytes, not NUL-terminated; the tree passes strlen() */

static int
alm_role_known(const char *role, size_t len)
{
    size_t  i;

    for (i = 0; i < sizeof(alm_roles) / sizeof(alm_roles[0]); i++) {
        if (strlen(alm_roles[i]) == len
            && memcmp(alm_roles[i], role, len) == 0)
        {
            return 1;
        }
    }

    return 0;
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

    if (alm_json_absent(content)) {
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
alm_content_text(alm_buf_t *w, const cJSON *content, int placeholder)
{
    int           first;
    const cJSON  *part, *text;
    const char   *s;

    if (cJSON_IsString(content)) {
        alm_buf_str(w, content->valuestring);
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
            alm_buf_raw(w, "\n", 1);
        }

        alm_buf_str(w, s);
        first = 0;
    }
}


/*
 * The transcript of the messages before the last: user and assistant
 * turns only.  System and developer messages stay out of it (the
 * workspace has its own system prompt), as do tool results.
 */

static void
alm_transcript(alm_buf_t *w, const cJSON *messages, int last)
{
    int           i;
    size_t        mark, text;
    const cJSON  *msg, *role, *content;

    alm_buf_str(w, ALM_TRANSCRIPT_HEAD);

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

        mark = w->len;
        alm_buf_str(w, role->valuestring);
        alm_buf_raw(w, ": ", 2);
        text = w->len;
        alm_content_text(w, content, 1);

        /* a turn with nothing to show is left out */

        if (w->len == text) {
            w->len = mark;
            continue;
        }

        alm_buf_raw(w, "\n", 1);
    }

    alm_buf_raw(w, "\n", 1);
}


static void
alm_attachments(alm_buf_t *w, const cJSON *content)
{
    unsigned      k;
    char          name[64], ext[16];
    const char   *url, *mime;
    size_t        mime_len;
    const cJSON  *part;

    alm_buf_raw(w, "[", 1);
    k = 0;

    cJSON_ArrayForEach(part, content) {

        if (!alm_part_is(part, "image_url")) {
            continue;
        }

        url = alm_part_image_url(part);
        (void) alm_data_uri(url, &mime, &mime_len, ext, sizeof(ext));

        k++;
        snprintf(name, sizeof(name), "image-%u.%s", k, ext);

        alm_buf_str(w, k > 1 ? ",{\"name\":\"" : "{\"name\":\"");
        alm_buf_esc(w, name, strlen(name));
        alm_buf_str(w, "\",\"mime\":\"");
        alm_buf_esc(w, mime, mime_len);
        alm_buf_str(w, "\",\"contentString\":\"");
        alm_buf_esc(w, url, strlen(url));
        alm_buf_str(w, "\"}");
    }

    alm_buf_raw(w, "]", 1);
}


/* ------------------------------------------------------------------ */
/* the request                                                        */

static int
alm_check_type(const cJSON *item, unsigned types)
{
    if (alm_json_absent(item)) {
        return 1;
    }

    return ((types & ALM_T_NUM) && cJSON_IsNumber(item))
           || ((types & ALM_T_STR) && cJSON_IsString(item))
           || ((types & ALM_T_BOOL) && cJSON_IsBool(item))
           || ((types & ALM_T_ARR) && cJSON_IsArray(item))
           || ((types & ALM_T_OBJ) && cJSON_IsObject(item));
}


/*
 * The parameters that change the answer in ways the gateway cannot
 * give: each is refused, param named, unless it is absent (or null)
 * or holds the one value that asks for nothing more than a plain
 * answer.  Checked in this order: the first refused one is reported.
 */

typedef struct {
    const char  *name;
    size_t       len;
    const char  *param;         /* named in the error */
    int        (*accept)(const cJSON *item);
    const char  *message;
} alm_refused_t;


static int
alm_accept_one(const cJSON *item)
{
    return cJSON_IsNumber(item) && item->valuedouble == 1;
}


static int
alm_accept_empty(const cJSON *item)
{
    return cJSON_IsArray(item) && cJSON_GetArraySize(item) == 0;
}


static int
alm_accept_none(const cJSON *item)
{
    return cJSON_IsString(item) && strcmp(item->valuestring, "none") == 0;
}


static int
alm_accept_false(const cJSON *item)
{
    return cJSON_IsFalse(item);
}


static int
alm_accept_text_format(const cJSON *item)
{
    const cJSON  *type;

    type = cJSON_GetObjectItemCaseSensitive(item, "type");

    return cJSON_IsObject(item) && cJSON_IsString(type)
           && strcmp(type->valuestring, "text") == 0;
}


static int
alm_accept_nothing(const cJSON *item)
{
    (void) item;
    return 0;
}


static int
alm_accept_text_only(const cJSON *item)
{
    const cJSON  *v;

    if (!cJSON_IsArray(item)) {
        return 0;
    }

    cJSON_ArrayForEach(v, item) {
        if (!cJSON_IsString(v) || strcmp(v->valuestring, "text") != 0) {
            return 0;
        }
    }

    return 1;
}


static const alm_refused_t  alm_refused[] = {
    { alm_name("n"), "n", alm_accept_one,
      "Only one choice can be generated: 'n' must be 1." },
    { alm_name("tools"), "tools", alm_accept_empty,
      "Tool calling is not supported: AnythingLLM runs its own agents.  "
      "Remove 'tools'." },
    { alm_name("functions"), "functions", alm_accept_empty,
      "Function calling is not supported: AnythingLLM runs its own "
      "agents.  Remove 'functions'." },
    { alm_name("tool_choice"), "tool_choice", alm_accept_none,
      "Tool calling is not supported: 'tool_choice' can only be "
      "\"none\"." },
    { alm_name("logprobs"), "logprobs", alm_accept_false,
      "Log probabilities are not available: 'logprobs' must be false." },
    { alm_name("response_format"), "response_format", alm_accept_text_format,
      "Only the 'text' response format is supported." },
    { alm_name("audio"), "modalities", alm_accept_nothing,
      "Audio output is not supported: remove 'audio'." },
    { alm_name("modalities"), "modalities", alm_accept_text_only,
      "Only text output is supported: 'modalities' can only be "
      "[\"text\"]." }
};


/*
 * The members of the request that the tables name, found in one pass
 * over its members: the first of each name, the one that
 * cJSON_GetObjectItemCaseSensitive() would find.  NULL when absent.
 */

typedef struct {
    const cJSON  *refused[alm_nelts(alm_refused)];
    const cJSON  *ignored[ALM_P_N];
} alm_options_t;


static void
alm_options_find(const cJSON *root, alm_options_t *o)
{
    size_t        i, len;
    const char   *name;
    const cJSON  *m;

    memset(o, 0, sizeof(alm_options_t));

    cJSON_ArrayForEach(m, root) {
        name = m->string;

        if (name == NULL) {
            continue;
        }

        len = strlen(name);

        for (i = 0; i < alm_nelts(alm_refused); i++) {
            if (len == alm_refused[i].len && o->refused[i] == NULL
                && memcmp(name, alm_refused[i].name, len) == 0)
            {
                o->refused[i] = m;
            }
        }

        for (i = 0; i < ALM_P_N; i++) {
            if (len == alm_ignored_params[i].len && o->ignored[i] == NULL
                && memcmp(name, alm_ignored_params[i].name, len) == 0)
            {
                o->ignored[i] = m;
            }
        }
    }
}


static int
alm_check_refused(const alm_options_t *o, alm_error_t *err)
{
    size_t                i;
    const cJSON          *item;
    const alm_refused_t  *rf;

    for (i = 0; i < alm_nelts(alm_refused); i++) {
        rf = &alm_refused[i];
        item = o->refused[i];

        if (!alm_json_absent(item) && !rf->accept(item)) {
            alm_error_set(err, 400, "invalid_request_error", rf->param,
                          NULL, "%s", rf->message);
            return ALM_ERROR;
        }
    }

    return ALM_OK;
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


/* OpenAI's words for a value out of range: "above" or below */

static void
alm_range_error(alm_error_t *err, const alm_range_t *rg, int above,
    const char *num)
{
    const char  *name;

    static const char  *codes[2][2] = {
        { "decimal_below_min_value", "decimal_above_max_value" },
        { "integer_below_min_value", "integer_above_max_value" }
    };

    name = alm_ignored_params[rg->param].name;

    alm_error_set(err, 400, "invalid_request_error", name,
                  codes[rg->integer ? 1 : 0][above ? 1 : 0],
                  "Invalid '%s': %s %s value. Expected a value %s %g, but "
                  "got %s instead.", name,
                  rg->integer ? "integer" : "decimal",
                  above ? "above maximum" : "below minimum",
                  above ? "<=" : ">=", above ? rg->max : rg->min, num);
}


/* the ranges and lengths OpenAI refuses to go beyond */

static int
alm_check_ranges(const alm_options_t *o, alm_error_t *err)
{
    int                 n;
    char                num[32];
    size_t              i;
    double              v;
    const cJSON        *item, *s;
    const alm_range_t  *rg;

    for (i = 0; i < alm_nelts(alm_ranges); i++) {
        rg = &alm_ranges[i];
        item = o->ignored[rg->param];

        if (!cJSON_IsNumber(item)) {
            continue;
        }

        v = item->valuedouble;
        alm_number_text(num, sizeof(num), v);

        if (v < rg->min || v > rg->max) {
            alm_range_error(err, rg, v > rg->max, num);
            return ALM_ERROR;
        }
    }

    item = o->ignored[ALM_P_STOP];

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
    size_t          i;
    const cJSON    *item, *v;
    alm_options_t   o;

    item = cJSON_GetObjectItemCaseSensitive(root, "stream");

    if (!alm_json_absent(item) && !cJSON_IsBool(item)) {
        alm_error_set(err, 400, "invalid_request_error", "stream", NULL,
                      "Invalid type for 'stream': expected a boolean.");
        return ALM_ERROR;
    }

    req->stream = cJSON_IsTrue(item) ? 1 : 0;

    item = cJSON_GetObjectItemCaseSensitive(root, "stream_options");

    if (!alm_json_absent(item)) {
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

    alm_options_find(root, &o);

    if (alm_check_refused(&o, err) != ALM_OK) {
        return ALM_ERROR;
    }

    for (i = 0; i < ALM_P_N; i++) {
        if (!alm_check_type(o.ignored[i], alm_ignored_params[i].types)) {
            alm_error_set(err, 400, "invalid_request_error",
                          alm_ignored_params[i].name, NULL,
                          "Invalid type for '%s'.",
                          alm_ignored_params[i].name);
            return ALM_ERROR;
        }
    }

    return alm_check_ranges(&o, err);
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

        if (!cJSON_IsString(role)
            || !alm_role_known(role->valuestring, strlen(role->valuestring)))
        {
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


/* the model, a workspace slug */

static const char *
alm_chat_req_model(const cJSON *root, alm_error_t *err)
{
    const cJSON  *model;

    model = cJSON_GetObjectItemCaseSensitive(root, "model");

    if (alm_json_absent(model)) {
        alm_error_set(err, 400, "invalid_request_error", "model", NULL,
                      "You must provide a model parameter (the slug of an "
                      "AnythingLLM workspace).");
        return NULL;
    }

    if (!cJSON_IsString(model)) {
        alm_error_set(err, 400, "invalid_request_error", "model", NULL,
                      "Invalid type for 'model': expected a string.");
        return NULL;
    }

    if (!alm_slug_valid(model->valuestring, strlen(model->valuestring))) {
        alm_error_set(err, 400, "invalid_request_error", "model", NULL,
                      "Invalid 'model': a model is the slug of an "
                      "AnythingLLM workspace (1 to 255 of A-Z a-z 0-9 _ . "
                      "-).");
        return NULL;
    }

    return model->valuestring;
}


/*
 * The digest of checked messages: "prefix" stops before the last
 * message.  Returns the last message's content.
 */

static const cJSON *
alm_chat_req_digest(alm_chat_req_t *req, const cJSON *messages,
    const char *key_digest_hex, const char *model)
{
    int           i, n;
    const cJSON  *msg, *role, *content;

    n = cJSON_GetArraySize(messages);

    alm_conv_hash_init(&req->full, key_digest_hex, model, strlen(model));

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

    return content;
}


static int
alm_chat_req_read(const cJSON *root, const char *key_digest_hex,
    alm_chat_req_t *req, alm_error_t *err)
{
    int           images;
    alm_buf_t     w;
    const char   *model;
    const cJSON  *messages, *content;

    model = alm_chat_req_model(root, err);
    if (model == NULL) {
        return ALM_ERROR;
    }

    messages = cJSON_GetObjectItemCaseSensitive(root, "messages");
    images = 0;

    if (alm_check_messages(messages, &images, err) != ALM_OK) {
        return ALM_ERROR;
    }

    if (alm_check_options(root, req, err) != ALM_OK) {
        return ALM_ERROR;
    }

    content = alm_chat_req_digest(req, messages, key_digest_hex, model);

    memset(&w, 0, sizeof(alm_buf_t));
    alm_content_text(&w, content, 0);

    req->message = alm_buf_take(&w, &req->message_len);
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
        alm_attachments(&w, content);

        req->attachments = alm_buf_take(&w, NULL);
        if (req->attachments == NULL) {
            goto nomem;
        }
    }

    if (req->has_history) {
        alm_transcript(&w, messages, cJSON_GetArraySize(messages) - 1);

        req->transcript = alm_buf_take(&w, NULL);
        if (req->transcript == NULL) {
            goto nomem;
        }
    }

    req->model_len = strlen(model);
    req->model = alm_strndup(model, req->model_len);
    if (req->model == NULL) {
        goto nomem;
    }

    return ALM_OK;

nomem:

    alm_error_set(err, 500, "server_error", NULL, NULL, ALM_NOMEM);
    return ALM_ERROR;
}


/* ------------------------------------------------------------------ */
/* the usual request, read in place                                   */

/* alm_chat_req_in_place(): not a request it reads; cJSON's tree does */
#define ALM_REQ_TREE  1


static const char *const  alm_req_names[] = { "model", "messages", "stream" };
static const char *const  alm_msg_names[] = { "role", "content" };


typedef struct {
    const char  *role;
    size_t       role_len;
    const char  *text;
    size_t       text_len;
    char        *tmp;           /* the text, escapes undone, or NULL */
} alm_msg_text_t;


static int
alm_role_is(const alm_msg_text_t *m, const char *role)
{
    return m->role_len == strlen(role)
           && memcmp(m->role, role, m->role_len) == 0;
}


/*
 * A message with a string "role" of the known ones (without escapes)
 * and a string "content": 1 with m filled (m->tmp for the caller to
 * free), else 0 with nothing to free.
 */

static int
alm_msg_in_place(const alm_json_span_t *v, alm_msg_text_t *m)
{
    char             *tmp;
    alm_json_span_t   f[2];

    m->tmp = NULL;

    if (!alm_json_span_is(v, ALM_SPAN_OBJECT)
        || !alm_json_members(v->p, v->end - v->p, alm_msg_names, 2, f)
        || !alm_json_span_is(&f[0], ALM_SPAN_STRING)
        || !alm_json_span_is(&f[1], ALM_SPAN_STRING))
    {
        return 0;
    }

    m->role = alm_json_span_text(&f[0], &m->role_len, &tmp);

    if (tmp != NULL) {
        free(tmp);
        return 0;
    }

    if (m->role == NULL || !alm_role_known(m->role, m->role_len)) {
        return 0;
    }

    m->text = alm_json_span_text(&f[1], &m->text_len, &m->tmp);

    return m->text != NULL;
}


/*
 * What most clients send, read without cJSON's tree: "model",
 * "messages" whose every message has a string "role" and a string
 * "content", and "stream" true or false, and no other member.  ALM_OK
 * with req filled as alm_chat_req_read() fills it from the tree;
 * ALM_REQ_TREE, req untouched, for anything else (an error too: the
 * tree's reading reports it); ALM_ERROR when memory ran out.
 */

static int
alm_chat_req_in_place(const char *body, size_t len,
    const char *key_digest_hex, alm_chat_req_t *req, alm_error_t *err)
{
    int               last, history, stream;
    char             *tmp;
    size_t            model_len;
    alm_buf_t         w;
    const char       *model, *at;
    alm_json_span_t   f[3], v, next;
    alm_msg_text_t    m;

    if (!alm_json_members_only(body, len, alm_req_names, 3, f)
        || !alm_json_span_is(&f[0], ALM_SPAN_STRING)
        || !alm_json_span_is(&f[1], ALM_SPAN_ARRAY))
    {
        return ALM_REQ_TREE;
    }

    if (f[2].p == NULL) {
        stream = 0;

    } else if (f[2].end - f[2].p == 4 && memcmp(f[2].p, "true", 4) == 0) {
        stream = 1;

    } else if (f[2].end - f[2].p == 5 && memcmp(f[2].p, "false", 5) == 0) {
        stream = 0;

    } else {
        return ALM_REQ_TREE;
    }

    model = alm_json_span_text(&f[0], &model_len, &tmp);

    if (tmp != NULL) {
        free(tmp);
        return ALM_REQ_TREE;
    }

    at = NULL;

    if (model == NULL || !alm_slug_valid(model, model_len)
        || !alm_json_span_next(&f[1], &at, &next))
    {
        return ALM_REQ_TREE;
    }

    alm_conv_hash_init(&req->full, key_digest_hex, model, model_len);
    memset(&w, 0, sizeof(alm_buf_t));
    history = 0;

    /* the messages in turn, as alm_chat_req_digest() and alm_transcript() */

    for ( ;; ) {
        v = next;
        last = !alm_json_span_next(&f[1], &at, &next);

        if (!alm_msg_in_place(&v, &m)) {
            goto tree;
        }

        if (last) {
            alm_conv_hash_hex(&req->full, req->prefix_hex);

        } else if (alm_role_is(&m, "user") || alm_role_is(&m, "assistant")) {

            if (!history) {
                alm_buf_str(&w, ALM_TRANSCRIPT_HEAD);
                history = 1;
            }

            /* a turn with nothing to show is left out */

            if (m.text_len) {
                alm_buf_raw(&w, m.role, m.role_len);
                alm_buf_raw(&w, ": ", 2);
                alm_buf_raw(&w, m.text, m.text_len);
                alm_buf_raw(&w, "\n", 1);
            }
        }

        alm_conv_hash_message_begin(&req->full, m.role, m.role_len);
        alm_conv_hash_update(&req->full, m.text, m.text_len);
        alm_conv_hash_message_end(&req->full);

        if (last) {
            break;
        }

        free(m.tmp);
    }

    if (!alm_role_is(&m, "user") || m.text_len == 0) {
        free(m.tmp);
        goto tree;
    }

    req->stream = stream;
    req->has_history = history;

    if (history) {
        alm_buf_raw(&w, "\n", 1);

        req->transcript = alm_buf_take(&w, NULL);
        if (req->transcript == NULL) {
            free(m.tmp);
            goto nomem;
        }
    }

    /* alm_json_span_text() ends its copy with a NUL */

    req->message = m.tmp ? m.tmp : alm_strndup(m.text, m.text_len);
    req->message_len = m.text_len;
    req->model = alm_strndup(model, model_len);
    req->model_len = model_len;

    if (req->message == NULL || req->model == NULL) {
        goto nomem;
    }

    return ALM_OK;

tree:

    alm_buf_free(&w);
    memset(req, 0, sizeof(alm_chat_req_t));
    return ALM_REQ_TREE;

nomem:

    alm_chat_req_free(req);
    alm_error_set(err, 500, "server_error", NULL, NULL, ALM_NOMEM);
    return ALM_ERROR;
}


/* a checked text read through cJSON's tree */

static int
alm_chat_req_from_tree(const char *body, size_t len,
    const char *key_digest_hex, alm_chat_req_t *req, alm_error_t *err)
{
    int     rc, nomem;
    cJSON  *root;

    root = alm_json_parse(body, len, &nomem);

    if (nomem) {
        alm_error_set(err, 500, "server_error", NULL, NULL, ALM_NOMEM);
        return ALM_ERROR;
    }

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


static int
alm_chat_req_text(const char *body, size_t len, alm_chat_req_t *req,
    alm_error_t *err)
{
    size_t       at;
    const char  *what;

    memset(req, 0, sizeof(alm_chat_req_t));

    what = alm_json_text_check(body, len, &at);

    if (what) {
        alm_error_set(err, 400, "invalid_request_error", NULL, NULL,
                      ALM_BAD_TEXT, what, at);
        return ALM_ERROR;
    }

    return ALM_OK;
}


int
alm_chat_req_parse(const char *body, size_t len, const char *key_digest_hex,
    alm_chat_req_t *req, alm_error_t *err)
{
    int  rc;

    if (alm_chat_req_text(body, len, req, err) != ALM_OK) {
        return ALM_ERROR;
    }

    rc = alm_chat_req_in_place(body, len, key_digest_hex, req, err);

    if (rc != ALM_REQ_TREE) {
        return rc;
    }

    return alm_chat_req_from_tree(body, len, key_digest_hex, req, err);
}


int
alm_chat_req_tree(const char *body, size_t len, const char *key_digest_hex,
    alm_chat_req_t *req, alm_error_t *err)
{
    if (alm_chat_req_text(body, len, req, err) != ALM_OK) {
        return ALM_ERROR;
    }

    return alm_chat_req_from_tree(body, len, key_digest_hex, req, err);
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
alm_upstream_body(alm_buf_t *w, const alm_chat_req_t *req, const char *mode,
    const char *session_id, size_t session_id_len, int with_transcript)
{
    alm_buf_str(w, "{\"message\":\"");

    if (with_transcript) {
        alm_buf_esc(w, req->transcript, strlen(req->transcript));
        alm_buf_str(w, ALM_TRANSCRIPT_USER);
    }

    alm_buf_esc(w, req->message, req->message_len);
    alm_buf_str(w, "\",\"mode\":\"");
    alm_buf_str(w, mode);
    alm_buf_str(w, "\"");

    if (session_id && session_id_len) {
        alm_buf_str(w, ",\"sessionId\":\"");
        alm_buf_esc(w, session_id, session_id_len);
        alm_buf_str(w, "\"");
    }

    if (req->attachments) {
        alm_buf_str(w, ",\"attachments\":");
        alm_buf_str(w, req->attachments);
    }

    alm_buf_str(w, "}");
}


char *
alm_chat_req_upstream_body(const alm_chat_req_t *req, alm_mode_e mode,
    const char *session_id, size_t session_id_len, int continuing,
    size_t *len)
{
    alm_buf_t    w;
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

    memset(&w, 0, sizeof(alm_buf_t));
    alm_upstream_body(&w, req, m, session_id, session_id_len,
                      !continuing && req->transcript != NULL);

    return alm_buf_take(&w, len);
}


