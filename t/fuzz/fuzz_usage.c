/*
 * Copyright (C) ngx_anythingllm authors
 *
 * libFuzzer target for the reading of usage in AnythingLLM's native
 * chat answers as they pass, and for the GET /api/v1/auth answer.
 * The stream scanner fed the whole input at once and fed it in pieces
 * cut where the input says (and byte by byte for short inputs) must
 * find the same usage and the same count of text frames; a whole
 * answer's reading must not fail in any other way than "not found";
 * the auth answer is NULL or a JSON object that keeps "authenticated"
 * true and carries the key's own id.
 *
 * Input: bufsize(1) step(1) answer(...)
 */


#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "fuzz_common.h"


#define EACH_MAX  512


static void
scan(const char *p, size_t len, size_t size, size_t step,
    alm_usage_scan_t *s)
{
    size_t   n;
    char    *buf;

    buf = malloc(size ? size : 1);
    if (buf == NULL) {
        abort();
    }

    alm_usage_scan_init(s, buf, size);

    while (len) {
        n = (step && step < len) ? step : len;
        alm_usage_scan(s, p, n);
        p += n;
        len -= n;
    }

    free(buf);
}


static void
same(const alm_usage_scan_t *a, const alm_usage_scan_t *b)
{
    if (a->pieces != b->pieces
        || a->usage.present != b->usage.present
        || a->usage.prompt_tokens != b->usage.prompt_tokens
        || a->usage.completion_tokens != b->usage.completion_tokens
        || a->usage.total_tokens != b->usage.total_tokens)
    {
        abort();
    }
}


static void
auth_answer(const char *p, size_t len)
{
    char            *out;
    size_t           out_len;
    cJSON           *root, *id;
    alm_key_info_t   key;

    memset(&key, 0, sizeof(alm_key_info_t));
    key.id = "0123456789ab";
    key.name = "a \"key\"\n";
    key.name_len = strlen(key.name);
    key.scopes = ALM_SCOPE_CHAT | ALM_SCOPE_READ;
    key.workspaces = "sales, support";
    key.workspaces_len = strlen(key.workspaces);
    key.rpm = 60;
    key.tpm = 1000;
    key.date = "2026-11-30";
    key.usage_known = (len & 1);
    key.requests = 3;
    key.prompt_tokens = 10;
    key.completion_tokens = 20;

    out = alm_auth_answer(p, len, &key, &out_len);
    if (out == NULL) {
        return;
    }

    root = cJSON_ParseWithLength(out, out_len);
    if (!cJSON_IsObject(root)
        || !cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(root,
                                                          "authenticated")))
    {
        abort();
    }

    id = cJSON_GetObjectItemCaseSensitive(root, "id");
    if (!cJSON_IsString(id) || strcmp(id->valuestring, key.id) != 0) {
        abort();
    }

    cJSON_Delete(root);
    free(out);
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int                found;
    size_t             bufsize, step, len;
    const char        *p;
    alm_usage_t        usage;
    alm_usage_scan_t   whole, cut, each;

    if (size < 2) {
        return 0;
    }

    bufsize = (size_t) data[0] * 4;
    step = data[1];
    p = (const char *) data + 2;
    len = size - 2;

    scan(p, len, bufsize, 0, &whole);
    scan(p, len, bufsize, step, &cut);
    same(&whole, &cut);

    if (len <= EACH_MAX) {
        scan(p, len, bufsize, 1, &each);
        same(&whole, &each);
    }

    found = alm_usage_answer(p, len, &usage);
    if (found != 0 && found != 1) {
        abort();
    }

    auth_answer(p, len);

    return 0;
}
