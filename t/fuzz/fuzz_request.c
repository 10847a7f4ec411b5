/*
 * Copyright (C) ngx_anythingllm authors
 *
 * libFuzzer target for the JSON translations and the classifiers.
 * The first byte chooses what the rest is fed to:
 *
 *   0  alm_chat_req_parse(), the same as alm_chat_req_tree(), +
 *      alm_chat_req_upstream_body()
 *   1  alm_chat_response_translate(), the same as
 *      alm_chat_response_tree()
 *   2  alm_chat_error_translate() (the next byte gives the status)
 *   3  alm_workspaces_filter() and alm_workspaces_to_models()
 *   4  alm_route_classify(), alm_oai_route(), the list parsers and
 *      alm_error_json()
 *
 * The first byte divided by 5 picks the variant where there are
 * several (the workspace list and model of 3, the method of 4): one
 * call of each per input keeps the fuzzer fast, and it mutates that
 * byte like any other.
 * t/fuzz/fuzz_route.c checks the classifiers' properties in depth.
 *
 * Whatever the input, results must be valid JSON of the right shape.
 */


#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "fuzz_common.h"


#define KEY  "0123456789abcdef0123456789abcdef" \
             "0123456789abcdef0123456789abcdef"


static cJSON *
must_parse(const char *p, size_t len)
{
    cJSON  *j;

    if (p == NULL || strlen(p) != len) {
        abort();
    }

    j = cJSON_ParseWithLength(p, len);
    if (j == NULL) {
        fprintf(stderr, "not JSON: %.*s\n", (int) len, p);
        abort();
    }

    return j;
}


static void
check_error(const alm_error_t *err)
{
    char    *buf;
    size_t   n;
    cJSON   *j;

    if (err->status < 400 || err->status > 599 || err->type == NULL
        || memchr(err->message, '\0', sizeof(err->message)) == NULL)
    {
        abort();
    }

    n = alm_error_json(NULL, 0, err->message, err->type, err->param,
                       err->code);
    buf = malloc(n + 1);
    if (buf == NULL) {
        abort();
    }

    if (alm_error_json(buf, n + 1, err->message, err->type, err->param,
                       err->code) != n)
    {
        abort();
    }

    j = must_parse(buf, n);
    cJSON_Delete(j);
    free(buf);
}


static int
same_text(const char *a, const char *b)
{
    return (a == NULL) ? (b == NULL) : (b != NULL && strcmp(a, b) == 0);
}


/*
 * The request read in place (or as a tree, past what that reads) must
 * equal the request read as a tree: result, fields, digests, error.
 */

static void
same_request_as_tree(const char *p, size_t len, int rc,
    const alm_chat_req_t *req, const alm_error_t *err)
{
    char            a[ALM_DIGEST_HEX_LEN], b[ALM_DIGEST_HEX_LEN];
    alm_error_t     terr;
    alm_chat_req_t  t;

    if (alm_chat_req_tree(p, len, KEY, &t, &terr) != rc) {
        abort();
    }

    if (rc != ALM_OK) {
        if (err->status != terr.status
            || strcmp(err->message, terr.message) != 0
            || !same_text(err->param, terr.param)
            || !same_text(err->code, terr.code))
        {
            abort();
        }

        return;
    }

    alm_conv_hash_hex(&req->full, a);
    alm_conv_hash_hex(&t.full, b);

    if (!same_text(req->model, t.model) || req->model_len != t.model_len
        || !same_text(req->message, t.message)
        || req->message_len != t.message_len
        || !same_text(req->attachments, t.attachments)
        || !same_text(req->transcript, t.transcript)
        || req->stream != t.stream || req->include_usage != t.include_usage
        || req->has_history != t.has_history
        || memcmp(req->prefix_hex, t.prefix_hex, ALM_DIGEST_HEX_LEN) != 0
        || memcmp(a, b, ALM_DIGEST_HEX_LEN) != 0)
    {
        fprintf(stderr, "in place and tree differ: %.*s\n", (int) len, p);
        abort();
    }

    alm_chat_req_free(&t);
}


static void
fuzz_request(const char *p, size_t len)
{
    int             rc, continuing;
    char           *body, hex[ALM_DIGEST_HEX_LEN];
    size_t          n;
    cJSON          *j, *msg;
    alm_error_t     err;
    alm_chat_req_t  req;

    rc = alm_chat_req_parse(p, len, KEY, &req, &err);

    same_request_as_tree(p, len, rc, &req, &err);

    if (rc != ALM_OK) {
        if (err.status != 400) {
            abort();
        }

        check_error(&err);
        alm_chat_req_free(&req);
        return;
    }

    if (req.model == NULL || req.message == NULL
        || !alm_slug_valid(req.model, req.model_len)
        || strlen(req.message) > req.message_len || req.message_len == 0
        || (req.has_history && req.transcript == NULL))
    {
        abort();
    }

    alm_conv_hash_hex(&req.full, hex);

    if (req.attachments) {
        j = must_parse(req.attachments, strlen(req.attachments));
        if (!cJSON_IsArray(j) || cJSON_GetArraySize(j) == 0) {
            abort();
        }
        cJSON_Delete(j);
    }

    for (continuing = 0; continuing < 2; continuing++) {
        body = alm_chat_req_upstream_body(&req, (alm_mode_e) continuing,
                                          "sess", 4, continuing, &n);
        if (body == NULL) {
            abort();
        }

        j = must_parse(body, n);
        msg = cJSON_GetObjectItemCaseSensitive(j, "message");

        if (!cJSON_IsString(msg) || msg->valuestring[0] == '\0') {
            abort();
        }

        cJSON_Delete(j);
        free(body);
    }

    alm_chat_req_free(&req);
    alm_chat_req_free(&req);
}


/*
 * The answer read in place must equal the answer read as a tree:
 * bytes, error, usage and digest.
 */

static void
same_as_tree(const char *p, size_t len, const alm_completion_meta_t *meta,
    const char *out, size_t n, const alm_error_t *err,
    const alm_usage_t *usage, const alm_conv_hash_t *conv)
{
    char              *tree, a[ALM_DIGEST_HEX_LEN], b[ALM_DIGEST_HEX_LEN];
    size_t             tn;
    alm_error_t        terr;
    alm_usage_t        tus;
    alm_conv_hash_t    tconv;

    alm_conv_hash_init(&tconv, KEY, "m", 1);
    tn = 0;

    tree = alm_chat_response_tree(p, len, meta, &tus, &tconv, &tn, &terr);

    if ((out == NULL) != (tree == NULL)
        || (out && (n != tn || memcmp(out, tree, n) != 0))
        || (out == NULL && (err->status != terr.status
                            || strcmp(err->message, terr.message) != 0))
        || memcmp(usage, &tus, sizeof(alm_usage_t)) != 0)
    {
        fprintf(stderr, "in place: %s\ntree:     %s\n",
                out ? out : err->message, tree ? tree : terr.message);
        abort();
    }

    alm_conv_hash_hex(conv, a);
    alm_conv_hash_hex(&tconv, b);

    if (memcmp(a, b, ALM_DIGEST_HEX_LEN) != 0) {
        abort();
    }

    free(tree);
}


static void
fuzz_response(const char *p, size_t len)
{
    char                   *out;
    size_t                  n;
    cJSON                  *j;
    alm_error_t             err;
    alm_usage_t             usage;
    alm_conv_hash_t         conv;
    alm_completion_meta_t   meta;

    fuzz_meta(&meta, "chatcmpl-x", "m\"w", 1);

    alm_conv_hash_init(&conv, KEY, "m", 1);
    n = 0;

    out = alm_chat_response_translate(p, len, &meta, &usage, &conv, &n,
                                      &err);

    same_as_tree(p, len, &meta, out, n, &err, &usage, &conv);

    if (out == NULL) {
        check_error(&err);
        return;
    }

    j = must_parse(out, n);
    if (!cJSON_IsObject(j)
        || !cJSON_IsArray(cJSON_GetObjectItemCaseSensitive(j, "choices"))
        || usage.prompt_tokens < 0 || usage.total_tokens < 0)
    {
        abort();
    }

    cJSON_Delete(j);
    free(out);
}


static void
fuzz_error(const char *p, size_t len)
{
    alm_error_t  err;

    if (len < 1) {
        return;
    }

    alm_chat_error_translate(300 + (unsigned char) p[0], p + 1, len - 1,
                             "mo\"del", 6, &err);
    check_error(&err);
}


static void
fuzz_workspaces(const char *p, size_t len, unsigned variant)
{
    static const char  *lists[] = { "*", "", "a,b", " ws , x ,", "a" };

    char         *out;
    size_t        n, i;
    cJSON        *j;
    alm_error_t   err;

    i = variant % (sizeof(lists) / sizeof(lists[0]));

    out = alm_workspaces_filter(p, len, lists[i], strlen(lists[i]), &n);
    if (out) {
        j = must_parse(out, n);
        cJSON_Delete(j);
        free(out);
    }

    out = alm_workspaces_to_models(p, len, lists[i], strlen(lists[i]),
                                   variant & 8 ? "a" : NULL,
                                   variant & 8 ? 1 : 0, 99, &n, &err);
    if (out) {
        j = must_parse(out, n);
        cJSON_Delete(j);
        free(out);

    } else {
        check_error(&err);
    }
}


static void
fuzz_misc(const char *p, size_t len, unsigned variant)
{
    size_t         n, id_len, cut;
    char          *buf;
    cJSON         *j;
    const char    *id;
    alm_route_t    rt;

    static const char  *methods[] = { "GET", "POST", "DELETE", "HEAD" };

    n = variant % 4;

    alm_route_classify(methods[n], strlen(methods[n]), p, len, &rt);

    if (rt.slug && (rt.slug < p || rt.slug + rt.slug_len > p + len
                    || !alm_slug_valid(rt.slug, rt.slug_len)))
    {
        abort();
    }

    if ((rt.kind == ALM_ROUTE_NONE || rt.kind == ALM_ROUTE_BAD)
        && (rt.scope || rt.slug))
    {
        abort();
    }

    if (alm_oai_route(p, len, &id, &id_len) == ALM_OAI_MODEL
        && (id_len == 0 || memchr(id, '/', id_len)))
    {
        abort();
    }

    (void) alm_scopes_parse(p, len);

    cut = len / 2;
    (void) alm_workspace_allowed(p, cut, p + cut, len - cut);

    /* escaping gives valid JSON strings */
    n = alm_json_escape(NULL, p, len);
    buf = malloc(n + 3);
    if (buf == NULL) {
        abort();
    }

    buf[0] = '"';
    if (alm_json_escape(buf + 1, p, len) != n) {
        abort();
    }
    buf[n + 1] = '"';
    buf[n + 2] = '\0';

    j = must_parse(buf, n + 2);
    cJSON_Delete(j);
    free(buf);
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char  *p;

    if (size < 1) {
        return 0;
    }

    p = (const char *) data + 1;
    size--;

    switch (data[0] % 5) {
    case 0:
        fuzz_request(p, size);
        break;
    case 1:
        fuzz_response(p, size);
        break;
    case 2:
        fuzz_error(p, size);
        break;
    case 3:
        fuzz_workspaces(p, size, data[0] / 5);
        break;
    default:
        fuzz_misc(p, size, data[0] / 5);
        break;
    }

    return 0;
}
