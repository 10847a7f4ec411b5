/*
 * Copyright (C) ngx_anythingllm authors
 *
 * AnythingLLM's answers in OpenAI's words: a whole workspace chat
 * answer as a chat.completion, and an upstream error as an OpenAI
 * error.
 */


#include <stdlib.h>
#include <string.h>

#include "alm_json.h"


/*
 * A chat.completion's own text around its id, model, content and
 * sources, with its numbers at their longest, and a margin
 */
#define ALM_COMPLETION_ROOM  448


static long alm_count(double d);
static char *alm_chat_response_read(const char *json, size_t len,
    const alm_completion_meta_t *meta, alm_usage_t *usage,
    alm_conv_hash_t *conv, size_t *out_len, alm_error_t *err,
    int *done);
static void alm_chat_completion_head(alm_buf_t *b,
    const alm_completion_meta_t *meta);
static void alm_chat_completion_tail(alm_buf_t *b, const alm_usage_t *us);


/* a token count: negative and NaN count as 0, no overflow converting */

static long
alm_json_long(const cJSON *item, int *found)
{
    if (!cJSON_IsNumber(item)) {
        return 0;
    }

    *found = 1;

    return alm_count(item->valuedouble);
}


static long
alm_count(double d)
{
    /* NaN fails both tests */

    if (!(d >= 0)) {
        return 0;
    }

    if (!(d < 1e15)) {
        return (long) 1e15;
    }

    return (long) d;
}


int
alm_usage_read(const cJSON *metrics, alm_usage_t *usage)
{
    int  found;

    memset(usage, 0, sizeof(alm_usage_t));

    if (!cJSON_IsObject(metrics)) {
        return 0;
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

    return found;
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


/* the fields every completion object starts with */

static void
alm_completion_head(alm_buf_t *b, const alm_completion_meta_t *meta,
    const char *object)
{
    alm_buf_str(b, "{\"id\":");
    alm_json_string_n(b, meta->id, meta->id ? meta->id_len : 0);
    alm_buf_str(b, ",\"object\":");
    alm_json_string(b, object);
    alm_buf_str(b, ",\"created\":");
    alm_json_number(b, (double) meta->created);
    alm_buf_str(b, ",\"model\":");
    alm_json_string_n(b, meta->model, meta->model ? meta->model_len : 0);
}


/* the chat.completion up to its message's content */

static void
alm_chat_completion_head(alm_buf_t *b, const alm_completion_meta_t *meta)
{
    alm_completion_head(b, meta, "chat.completion");
    alm_buf_str(b, ",\"choices\":[{\"index\":0,\"message\":"
                   "{\"role\":\"assistant\",\"content\":");
}


/* after the content, up to its sources */

static void
alm_chat_completion_tail(alm_buf_t *b, const alm_usage_t *us)
{
    alm_buf_str(b, ",\"refusal\":null},\"logprobs\":null,"
                   "\"finish_reason\":\"stop\"}],\"usage\":"
                   "{\"prompt_tokens\":");
    alm_json_number(b, (double) us->prompt_tokens);
    alm_buf_str(b, ",\"completion_tokens\":");
    alm_json_number(b, (double) us->completion_tokens);
    alm_buf_str(b, ",\"total_tokens\":");
    alm_json_number(b, (double) us->total_tokens);

    /* the retrieval sources follow, as they are */

    alm_buf_str(b, "},\"sources\":");
}


char *
alm_chat_response_translate(const char *json, size_t len,
    const alm_completion_meta_t *meta, alm_usage_t *usage,
    alm_conv_hash_t *conv, size_t *out_len, alm_error_t *err)
{
    int    done;
    char  *out;

    if (usage) {
        memset(usage, 0, sizeof(alm_usage_t));
    }

    /* the usual answer is read in place; the rest as a tree */

    out = alm_chat_response_read(json, len, meta, usage, conv, out_len, err,
                                 &done);
    if (done) {
        return out;
    }

    return alm_chat_response_tree(json, len, meta, usage, conv, out_len,
                                  err);
}


/*
 * An answer read in place (alm_json_members()): a successful one, no
 * error text, no abort.  *done is 0 when the answer is not one of
 * those, or not read in place: the tree reads it then, and decides.
 */

static char *
alm_chat_response_read(const char *json, size_t len,
    const alm_completion_meta_t *meta, alm_usage_t *usage,
    alm_conv_hash_t *conv, size_t *out_len, alm_error_t *err, int *done)
{
    int               i;
    char             *out, *tmp;
    size_t            content_len, room;
    alm_buf_t         b;
    alm_usage_t       us;
    const char       *content;
    alm_json_span_t   f[6], m[3], *text;

    static const char *const  fields[] = {
        "type", "error", "textResponse", "textChunk", "metrics", "sources"
    };

    static const char *const  counts[] = {
        "prompt_tokens", "completion_tokens", "total_tokens"
    };

    enum { TYPE, ERROR, TEXT, CHUNK, METRICS, SOURCES };

    *done = 0;

    if (!alm_json_members(json, len, fields, 6, f)) {
        return NULL;
    }

    /* "abort" needs no escape: a type with one goes the long way too */

    if (alm_json_span_is(&f[TYPE], ALM_SPAN_STRING)
        && (memchr(f[TYPE].p, '\\', f[TYPE].end - f[TYPE].p) != NULL
            || (f[TYPE].end - f[TYPE].p == 7
                && memcmp(f[TYPE].p, "\"abort\"", 7) == 0)))
    {
        return NULL;
    }

    if (alm_json_span_is(&f[ERROR], ALM_SPAN_STRING)
        && f[ERROR].end - f[ERROR].p > 2)
    {
        return NULL;
    }

    memset(&us, 0, sizeof(alm_usage_t));

    if (alm_json_span_is(&f[METRICS], ALM_SPAN_OBJECT)) {
        (void) alm_json_members(f[METRICS].p, f[METRICS].end - f[METRICS].p,
                                counts, 3, m);

        for (i = 0; i < 3; i++) {
            if (alm_json_span_is(&m[i], ALM_SPAN_NUMBER)) {
                us.present = 1;
            }
        }

        us.prompt_tokens = alm_json_span_is(&m[0], ALM_SPAN_NUMBER)
                           ? alm_count(alm_json_span_number(&m[0])) : 0;
        us.completion_tokens = alm_json_span_is(&m[1], ALM_SPAN_NUMBER)
                               ? alm_count(alm_json_span_number(&m[1])) : 0;
        us.total_tokens = alm_json_span_is(&m[2], ALM_SPAN_NUMBER)
                          ? alm_count(alm_json_span_number(&m[2])) : 0;

        if (us.total_tokens == 0) {
            us.total_tokens = us.prompt_tokens + us.completion_tokens;
        }
    }

    *done = 1;

    text = alm_json_span_is(&f[TEXT], ALM_SPAN_STRING) ? &f[TEXT]
           : alm_json_span_is(&f[CHUNK], ALM_SPAN_STRING) ? &f[CHUNK] : NULL;

    tmp = NULL;
    content = "";
    content_len = 0;

    if (text) {
        content = alm_json_span_text(text, &content_len, &tmp);
        if (content == NULL) {
            goto nomem;
        }
    }

    /*
     * Room at once for the whole completion, unless the model's name
     * needs escapes: the buffer then grows no more.
     */

    memset(&b, 0, sizeof(alm_buf_t));

    room = ALM_COMPLETION_ROOM + (meta->id ? meta->id_len : 0)
           + (meta->model ? meta->model_len : 0)
           + (text ? (size_t) (text->end - text->p) : 0);

    if (alm_json_span_is(&f[SOURCES], ALM_SPAN_ARRAY)) {
        room += f[SOURCES].end - f[SOURCES].p;
    }

    (void) alm_buf_reserve(&b, room);

    alm_chat_completion_head(&b, meta);

    /* the text is escaped again only when the string is not as that */

    if (text == NULL) {
        alm_buf_raw(&b, "\"\"", 2);

    } else if (tmp == NULL || alm_json_span_verbatim(text)) {
        alm_buf_raw(&b, text->p, text->end - text->p);

    } else {
        alm_json_string_n(&b, content, content_len);
    }

    alm_chat_completion_tail(&b, &us);

    if (alm_json_span_is(&f[SOURCES], ALM_SPAN_ARRAY)) {
        alm_json_span_write(&b, &f[SOURCES]);

    } else {
        alm_buf_raw(&b, "[]", 2);
    }

    alm_buf_raw(&b, "}", 1);

    out = alm_buf_take(&b, out_len);

    if (out == NULL) {
        free(tmp);
        goto nomem;
    }

    if (conv) {
        alm_conv_hash_message_begin(conv, "assistant", 9);
        alm_conv_hash_update(conv, content, content_len);
        alm_conv_hash_message_end(conv);
    }

    if (usage) {
        *usage = us;
    }

    free(tmp);

    return out;

nomem:

    alm_error_set(err, 500, "server_error", NULL, NULL, ALM_NOMEM);
    return NULL;
}


/* the same translation through cJSON's tree, for every answer */

char *
alm_chat_response_tree(const char *json, size_t len,
    const alm_completion_meta_t *meta, alm_usage_t *usage,
    alm_conv_hash_t *conv, size_t *out_len, alm_error_t *err)
{
    int           nomem;
    char         *out;
    cJSON        *root;
    alm_buf_t     b;
    alm_usage_t   us;
    const cJSON  *type, *text, *sources;
    const char   *content, *e;

    if (usage) {
        memset(usage, 0, sizeof(alm_usage_t));
    }

    root = alm_json_parse(json, len, &nomem);

    if (nomem) {
        alm_error_set(err, 500, "server_error", NULL, NULL, ALM_NOMEM);
        return NULL;
    }

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

    (void) alm_usage_read(cJSON_GetObjectItemCaseSensitive(root, "metrics"),
                          &us);

    memset(&b, 0, sizeof(alm_buf_t));

    alm_chat_completion_head(&b, meta);
    alm_json_string(&b, content);
    alm_chat_completion_tail(&b, &us);

    sources = cJSON_GetObjectItemCaseSensitive(root, "sources");

    if (cJSON_IsArray(sources)) {
        alm_json_value(&b, sources);

    } else {
        alm_buf_raw(&b, "[]", 2);
    }

    alm_buf_raw(&b, "}", 1);

    out = alm_buf_take(&b, out_len);

    if (out == NULL) {
        cJSON_Delete(root);
        alm_error_set(err, 500, "server_error", NULL, NULL, ALM_NOMEM);
        return NULL;
    }

    if (conv) {
        alm_conv_hash_message_begin(conv, "assistant", 9);
        alm_conv_hash_update(conv, content, strlen(content));
        alm_conv_hash_message_end(conv);
    }

    if (usage) {
        *usage = us;
    }

    cJSON_Delete(root);

    return out;
}


void
alm_chat_error_translate(int status, const char *body, size_t len,
    const char *model, size_t model_len, alm_error_t *err)
{
    cJSON       *root;
    const char  *e;
    int          mlen;

    root = alm_json_parse(body, len, NULL);
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

