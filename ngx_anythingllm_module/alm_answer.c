/*
 * Copyright (C) ngx_anythingllm authors
 *
 * AnythingLLM's answers in OpenAI's words: a whole workspace chat
 * answer as a chat.completion, and an upstream error as an OpenAI
 * error.
 */


#include <string.h>

#include "alm_json.h"


/* a token count: negative and NaN count as 0, no overflow converting */

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


char *
alm_chat_response_translate(const char *json, size_t len,
    const alm_completion_meta_t *meta, alm_usage_t *usage,
    alm_conv_hash_t *conv, size_t *out_len, alm_error_t *err)
{
    char         *out;
    cJSON        *root;
    alm_buf_t     b;
    alm_usage_t   us;
    const cJSON  *type, *text, *sources;
    const char   *content, *e;

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

    (void) alm_usage_read(cJSON_GetObjectItemCaseSensitive(root, "metrics"),
                          &us);

    memset(&b, 0, sizeof(alm_buf_t));

    alm_completion_head(&b, meta, "chat.completion");
    alm_buf_str(&b, ",\"choices\":[{\"index\":0,\"message\":"
                    "{\"role\":\"assistant\",\"content\":");
    alm_json_string(&b, content);
    alm_buf_str(&b, ",\"refusal\":null},\"logprobs\":null,"
                    "\"finish_reason\":\"stop\"}],\"usage\":"
                    "{\"prompt_tokens\":");
    alm_json_number(&b, (double) us.prompt_tokens);
    alm_buf_str(&b, ",\"completion_tokens\":");
    alm_json_number(&b, (double) us.completion_tokens);
    alm_buf_str(&b, ",\"total_tokens\":");
    alm_json_number(&b, (double) us.total_tokens);

    /* the retrieval sources move over as they are */

    alm_buf_str(&b, "},\"sources\":");
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

