/*
 * Copyright (C) ngx_anythingllm authors
 *
 * The precontent phase of an "anythingllm_openai on" location: the
 * OpenAI routes, matched by suffix, are turned into AnythingLLM calls
 * that the location's proxy_pass then makes.
 *
 *   .../models             GET /api/v1/workspaces, answer as models
 *   .../models/{id}        GET /api/v1/workspaces, answer as one model
 *   .../chat/completions   POST /api/v1/workspace/<slug>/stream-chat
 *                          (or /chat), with the body rewritten
 *
 * The response filter (ngx_http_anythingllm_filter.c) translates the
 * answers.  A chat request whose earlier messages hash to a stored
 * conversation continues that conversation's AnythingLLM session (see
 * ngx_http_anythingllm_conv.c).
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <openssl/rand.h>

#include "ngx_http_anythingllm_module.h"


/*
 * The most a chat request body may hold when client_max_body_size is 0
 * (no limit): the body is read into memory and parsed whole.
 */
#define NGX_HTTP_ANYTHINGLLM_BODY_MAX     (64 * 1024 * 1024)

static ngx_int_t ngx_http_anythingllm_openai_not_allowed(
    ngx_http_request_t *r, const char *message);
static ngx_int_t ngx_http_anythingllm_openai_models(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, alm_oai_route_e route, const char *id,
    size_t id_len);
static ngx_int_t ngx_http_anythingllm_openai_chat(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx);
static void ngx_http_anythingllm_openai_body_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_anythingllm_openai_prepare(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx);
static off_t ngx_http_anythingllm_openai_body_max(ngx_http_request_t *r);
static ngx_int_t ngx_http_anythingllm_openai_read_body(ngx_http_request_t *r,
    ngx_str_t *body, off_t max);
static void ngx_http_anythingllm_openai_continue(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx);
static ngx_int_t ngx_http_anythingllm_openai_upstream(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx);
static ngx_int_t ngx_http_anythingllm_openai_session(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx);
static ngx_int_t ngx_http_anythingllm_openai_body(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx);
static ngx_int_t ngx_http_anythingllm_openai_completion_id(
    ngx_http_request_t *r, ngx_http_anythingllm_ctx_t *ctx);
static void ngx_http_anythingllm_openai_resume(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, ngx_int_t rc);
static ngx_int_t ngx_http_anythingllm_openai_fail(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, alm_error_t *err);
static ngx_int_t ngx_http_anythingllm_openai_set_uri(ngx_http_request_t *r,
    const char *tail, size_t tail_len, ngx_str_t *slug);
static ngx_uint_t ngx_http_anythingllm_openai_model_ok(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, const char *id, size_t len);
static void ngx_http_anythingllm_openai_random(u_char *buf, size_t len);
static void ngx_http_anythingllm_openai_cleanup(void *data);


ngx_int_t
ngx_http_anythingllm_openai_handler(ngx_http_request_t *r)
{
    size_t                       id_len;
    const char                  *id;
    alm_error_t                  err, *e;
    alm_oai_route_e              route;
    ngx_http_anythingllm_ctx_t  *ctx;

    ctx = ngx_http_anythingllm_get_ctx(r);
    if (ctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (ctx->openai_done) {
        e = ctx->openai_error;

        if (e) {
            ctx->openai_error = NULL;
            ctx->openai_status = NGX_DONE;

            return ngx_http_anythingllm_alm_error(r, e);
        }

        return ctx->openai_status;
    }

    if (ctx->openai_waiting) {
        /* the body or the conversation lookup is not there yet */
        return NGX_DONE;
    }

    route = alm_oai_route((const char *) r->uri.data, r->uri.len, &id,
                          &id_len);

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "anythingllm openai route %d \"%V\"", route, &r->uri);

    switch (route) {

    case ALM_OAI_MODELS:
    case ALM_OAI_MODEL:
        return ngx_http_anythingllm_openai_models(r, ctx, route, id, id_len);

    case ALM_OAI_CHAT:
        return ngx_http_anythingllm_openai_chat(r, ctx);

    default:
        alm_error_set(&err, NGX_HTTP_NOT_FOUND, "invalid_request_error",
                      NULL, "unknown_url", "Invalid URL (%.*s %.*s).",
                      (int) r->method_name.len,
                      (const char *) r->method_name.data,
                      (int) ngx_min(r->uri.len, 128),
                      (const char *) r->uri.data);

        return ngx_http_anythingllm_alm_error(r, &err);
    }
}


static ngx_int_t
ngx_http_anythingllm_openai_not_allowed(ngx_http_request_t *r,
    const char *message)
{
    return ngx_http_anythingllm_error(r, NGX_HTTP_NOT_ALLOWED, message,
                                      "invalid_request_error", NULL,
                                      "method_not_allowed");
}


static ngx_int_t
ngx_http_anythingllm_openai_models(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, alm_oai_route_e route, const char *id,
    size_t id_len)
{
    alm_error_t  err;
    ngx_str_t    slug;

    if (r->method != NGX_HTTP_GET) {
        return ngx_http_anythingllm_openai_not_allowed(r,
                                                 "Only GET is allowed here.");
    }

    if (r->headers_in.content_length_n > 0 || r->headers_in.chunked) {
        return ngx_http_anythingllm_error(r, NGX_HTTP_BAD_REQUEST,
                                          "A GET request carries no body.",
                                          "invalid_request_error", NULL,
                                          NULL);
    }

    if (route == ALM_OAI_MODEL) {

        if (!ngx_http_anythingllm_openai_model_ok(r, ctx, id, id_len)) {
            alm_error_set(&err, NGX_HTTP_NOT_FOUND, "invalid_request_error",
                          NULL, "model_not_found", "The model `%.*s` "
                          "does not exist or you do not have access to it.",
                          (int) ngx_min(id_len, 128), id);

            return ngx_http_anythingllm_alm_error(r, &err);
        }

        ctx->model.data = ngx_pnalloc(r->pool, id_len);
        if (ctx->model.data == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        ngx_memcpy(ctx->model.data, id, id_len);
        ctx->model.len = id_len;
    }

    /* nothing to read: the connection stays usable */

    r->headers_in.content_length_n = -1;

    if (ngx_http_anythingllm_identity_encoding(r) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ngx_str_null(&slug);

    if (ngx_http_anythingllm_openai_set_uri(r, NULL, 0, &slug) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx->resp = (route == ALM_OAI_MODEL) ? NGX_HTTP_ANYTHINGLLM_RESP_MODEL
                                         : NGX_HTTP_ANYTHINGLLM_RESP_MODELS;
    ctx->openai_done = 1;
    ctx->openai_status = NGX_DECLINED;

    return NGX_DECLINED;
}


/*
 * The body is read first, as ngx_http_mirror_module does in this
 * phase: the handler resumes the phases once it is there, and this
 * handler, run again, returns the verdict kept in the context.
 */

static ngx_int_t
ngx_http_anythingllm_openai_chat(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx)
{
    ngx_int_t  rc;

    if (r->method != NGX_HTTP_POST) {
        return ngx_http_anythingllm_openai_not_allowed(r,
                                                "Only POST is allowed here.");
    }

    if (r->headers_in.content_length_n
        > ngx_http_anythingllm_openai_body_max(r))
    {
        /* as nginx does for client_max_body_size */
        r->expect_tested = 1;
        (void) ngx_http_discard_request_body(r);

        return ngx_http_anythingllm_error(r,
                                          NGX_HTTP_REQUEST_ENTITY_TOO_LARGE,
                                          "The request body is too large.",
                                          "invalid_request_error", NULL,
                                          NULL);
    }

    if (ngx_http_anythingllm_cleanup_add(r->pool,
                                         ngx_http_anythingllm_openai_cleanup,
                                         ctx)
        != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx->openai_waiting = 1;
    ctx->openai_status = NGX_DONE;

    rc = ngx_http_read_client_request_body(r,
                                      ngx_http_anythingllm_openai_body_handler);

    if (rc >= NGX_HTTP_SPECIAL_RESPONSE) {
        ctx->openai_waiting = 0;
        ctx->openai_done = 1;

        /* what is left of the body is not read: no keepalive */
        r->keepalive = 0;

        switch (rc) {

        case NGX_HTTP_REQUEST_ENTITY_TOO_LARGE:
            return ngx_http_anythingllm_error(r, rc,
                                          "The request body is too large.",
                                          "invalid_request_error", NULL,
                                          NULL);

        case NGX_HTTP_BAD_REQUEST:
            return ngx_http_anythingllm_error(r, rc,
                                          "The request body could not be "
                                          "read.", "invalid_request_error",
                                          NULL, NULL);

        default:
            return rc;
        }
    }

    ngx_http_finalize_request(r, NGX_DONE);

    return NGX_DONE;
}


static void
ngx_http_anythingllm_openai_body_handler(ngx_http_request_t *r)
{
    ngx_int_t                    rc;
    ngx_http_anythingllm_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_anythingllm_module);

    ctx->body_read = 1;

    rc = ngx_http_anythingllm_openai_prepare(r, ctx);

    if (rc == NGX_AGAIN) {

        /* the conversation lookup is under way */

        r->read_event_handler = ngx_http_test_reading;
        r->write_event_handler = ngx_http_request_empty_handler;
        return;
    }

    ngx_http_anythingllm_openai_resume(r, ctx, rc);
}


/*
 * Reads the chat request.  Returns NGX_DECLINED when the request goes
 * upstream, NGX_AGAIN while Redis is asked for the conversation, or
 * NGX_DONE with ctx->openai_error set.
 */

static ngx_int_t
ngx_http_anythingllm_openai_prepare(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx)
{
    off_t            max;
    ngx_int_t        rc;
    ngx_str_t        body;
    alm_error_t      err;
    alm_chat_req_t  *chat;

    max = ngx_http_anythingllm_openai_body_max(r);

    rc = ngx_http_anythingllm_openai_read_body(r, &body, max);

    switch (rc) {

    case NGX_OK:
        break;

    case NGX_DECLINED:
        alm_error_set(&err, NGX_HTTP_REQUEST_ENTITY_TOO_LARGE,
                      "invalid_request_error", NULL, NULL,
                      "The request body is too large.");
        return ngx_http_anythingllm_openai_fail(r, ctx, &err);

    default:
        alm_error_set(&err, NGX_HTTP_INTERNAL_SERVER_ERROR, "server_error",
                      NULL, NULL, "The request body could not be read.");
        return ngx_http_anythingllm_openai_fail(r, ctx, &err);
    }

    if (body.len == 0) {
        alm_error_set(&err, NGX_HTTP_BAD_REQUEST, "invalid_request_error",
                      NULL, NULL, "The request body is empty: a chat "
                      "completion request is a JSON object.");
        return ngx_http_anythingllm_openai_fail(r, ctx, &err);
    }

    chat = ngx_pcalloc(r->pool, sizeof(alm_chat_req_t));
    if (chat == NULL) {
        alm_error_set(&err, NGX_HTTP_INTERNAL_SERVER_ERROR, "server_error",
                      NULL, NULL, "The gateway ran out of memory.");
        return ngx_http_anythingllm_openai_fail(r, ctx, &err);
    }

    if (alm_chat_req_parse((const char *) body.data, body.len,
                           ctx->key.valid ? ctx->key.digest : NULL, chat,
                           &err)
        != ALM_OK)
    {
        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "anythingllm: chat request refused: %s", err.message);

        return ngx_http_anythingllm_openai_fail(r, ctx, &err);
    }

    /* freed by the cleanup from now on */
    ctx->chat = chat;

    ctx->model.data = (u_char *) chat->model;
    ctx->model.len = chat->model_len;

    if (ctx->workspace.len == 0) {
        ctx->workspace = ctx->model;
    }

    if (!ngx_http_anythingllm_openai_model_ok(r, ctx, chat->model,
                                              chat->model_len))
    {
        alm_error_set(&err, NGX_HTTP_NOT_FOUND, "invalid_request_error",
                      NULL, "model_not_found", "The model `%.*s` does "
                      "not exist or you do not have access to it.",
                      (int) ngx_min(chat->model_len, 128), chat->model);

        return ngx_http_anythingllm_openai_fail(r, ctx, &err);
    }

    rc = ngx_http_anythingllm_conv_lookup(r, ctx,
                                          ngx_http_anythingllm_openai_continue);

    if (rc == NGX_AGAIN) {
        return NGX_AGAIN;
    }

    return ngx_http_anythingllm_openai_upstream(r, ctx);
}


static off_t
ngx_http_anythingllm_openai_body_max(ngx_http_request_t *r)
{
    ngx_http_core_loc_conf_t  *clcf;

    clcf = ngx_http_get_module_loc_conf(r, ngx_http_core_module);

    if (clcf->client_max_body_size == 0) {
        return NGX_HTTP_ANYTHINGLLM_BODY_MAX;
    }

    return clcf->client_max_body_size;
}


/*
 * The body in one piece, whatever shape nginx left it in: one or more
 * memory buffers (a chunked or HTTP/2 body comes in several, some of
 * them empty), a temporary file (client_body_buffer_size exceeded, or
 * client_body_in_file_only), or a mix of both.  The buffer that ends a
 * chunked or HTTP/2 body has last_buf set and holds neither memory nor
 * a file: it carries no data.  Returns NGX_OK, NGX_DECLINED when the
 * body is larger than "max" (nothing is read then), or NGX_ERROR.
 */

static ngx_int_t
ngx_http_anythingllm_openai_read_body(ngx_http_request_t *r,
    ngx_str_t *body, off_t max)
{
    off_t                     len, size, pos;
    u_char                   *p;
    ssize_t                   n;
    ngx_buf_t                *b, *one;
    ngx_chain_t              *cl;
    ngx_http_request_body_t  *rb;

    ngx_str_null(body);

    rb = r->request_body;

    if (rb == NULL) {
        return NGX_OK;
    }

    len = 0;
    one = NULL;

    for (cl = rb->bufs; cl; cl = cl->next) {
        b = cl->buf;

        if (ngx_buf_in_memory(b)) {
            size = b->last - b->pos;

        } else if (b->in_file && b->file) {
            size = b->file_last - b->file_pos;

        } else {
            continue;
        }

        if (size <= 0) {
            continue;
        }

        /* the only buffer with data, if it stays so and is in memory */
        one = (len == 0 && ngx_buf_in_memory(b)) ? b : NULL;

        len += size;

        if (len > max) {
            return NGX_DECLINED;
        }
    }

    if (len == 0) {
        return NGX_OK;
    }

    if (one) {
        body->data = one->pos;
        body->len = (size_t) len;
        return NGX_OK;
    }

    p = ngx_pnalloc(r->pool, (size_t) len);
    if (p == NULL) {
        return NGX_ERROR;
    }

    body->data = p;
    body->len = (size_t) len;

    for (cl = rb->bufs; cl; cl = cl->next) {
        b = cl->buf;

        if (ngx_buf_in_memory(b)) {
            p = ngx_cpymem(p, b->pos, b->last - b->pos);
            continue;
        }

        if (!b->in_file || b->file == NULL) {
            continue;
        }

        /*
         * A local temporary file just written, at most "max" bytes:
         * the read comes from the page cache.
         */

        for (pos = b->file_pos; pos < b->file_last; pos += n) {
            size = b->file_last - pos;

            n = ngx_read_file(b->file, p, (size_t) size, pos);

            if (n == NGX_ERROR) {
                return NGX_ERROR;
            }

            if (n == 0) {
                ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                              "anythingllm: the request body file \"%V\" "
                              "ended %O bytes early", &b->file->name, size);
                return NGX_ERROR;
            }

            p += n;
        }
    }

    return NGX_OK;
}


/* the conversation lookup is answered: the request goes on */

static void
ngx_http_anythingllm_openai_continue(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx)
{
    ngx_int_t  rc;

    rc = ngx_http_anythingllm_openai_upstream(r, ctx);

    ngx_http_anythingllm_openai_resume(r, ctx, rc);
}


/*
 * Turns the request into the workspace chat call: the new body, its
 * length and type, the method and the path.
 */

static ngx_int_t
ngx_http_anythingllm_openai_upstream(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx)
{
    ngx_str_t     slug;
    alm_error_t   err;

    if (!ctx->continuing
        && ngx_http_anythingllm_openai_session(r, ctx) != NGX_OK)
    {
        goto nomem;
    }

    if (ngx_http_anythingllm_openai_body(r, ctx) != NGX_OK) {
        goto nomem;
    }

    slug = ctx->model;

    if (ctx->chat->stream) {
        if (ngx_http_anythingllm_openai_set_uri(r, "/stream-chat",
                                                sizeof("/stream-chat") - 1,
                                                &slug)
            != NGX_OK)
        {
            goto nomem;
        }

        ctx->resp = NGX_HTTP_ANYTHINGLLM_RESP_STREAM;

    } else {
        if (ngx_http_anythingllm_openai_set_uri(r, "/chat",
                                                sizeof("/chat") - 1, &slug)
            != NGX_OK)
        {
            goto nomem;
        }

        ctx->resp = NGX_HTTP_ANYTHINGLLM_RESP_CHAT;
    }

    if (ngx_http_anythingllm_openai_completion_id(r, ctx) != NGX_OK) {
        goto nomem;
    }

    ngx_log_debug3(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "anythingllm chat \"%V\" session \"%V\" continuing:%d",
                   &r->uri, &ctx->session_id, ctx->continuing);

    return NGX_DECLINED;

nomem:

    alm_error_set(&err, NGX_HTTP_INTERNAL_SERVER_ERROR, "server_error", NULL,
                  NULL, "The gateway ran out of memory.");

    return ngx_http_anythingllm_openai_fail(r, ctx, &err);
}


/* a new session: a random UUID, version 4 */

static ngx_int_t
ngx_http_anythingllm_openai_session(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx)
{
    u_char  *p, rnd[16];

    p = ngx_pnalloc(r->pool, 36);
    if (p == NULL) {
        return NGX_ERROR;
    }

    ngx_http_anythingllm_openai_random(rnd, sizeof(rnd));

    rnd[6] = (u_char) ((rnd[6] & 0x0f) | 0x40);
    rnd[8] = (u_char) ((rnd[8] & 0x3f) | 0x80);

    ctx->session_id.data = p;
    ctx->session_id.len = 36;

    p = ngx_hex_dump(p, rnd, 4);
    *p++ = '-';
    p = ngx_hex_dump(p, rnd + 4, 2);
    *p++ = '-';
    p = ngx_hex_dump(p, rnd + 6, 2);
    *p++ = '-';
    p = ngx_hex_dump(p, rnd + 8, 2);
    *p++ = '-';
    (void) ngx_hex_dump(p, rnd + 10, 6);

    return NGX_OK;
}


/*
 * The workspace chat body replaces the client's, in memory, as it is,
 * with its length and type; the answer is asked for uncompressed.
 */

static ngx_int_t
ngx_http_anythingllm_openai_body(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx)
{
    u_char                           *p;
    char                             *json;
    size_t                            len;
    ngx_str_t                         v;
    ngx_chain_t                      *cl;
    ngx_http_anythingllm_loc_conf_t  *alcf;

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_anythingllm_module);

    json = alm_chat_req_upstream_body(ctx->chat,
                                      (alm_mode_e) alcf->chat_mode,
                                      (const char *) ctx->session_id.data,
                                      ctx->session_id.len, ctx->continuing,
                                      &len);
    if (json == NULL) {
        return NGX_ERROR;
    }

    if (ngx_http_anythingllm_free_on_cleanup(r->pool, json) != NGX_OK) {
        return NGX_ERROR;
    }

    cl = ngx_alloc_chain_link(r->pool);
    if (cl == NULL) {
        return NGX_ERROR;
    }

    v.data = (u_char *) json;
    v.len = len;

    cl->buf = ngx_http_anythingllm_body_buf(r->pool, &v);
    if (cl->buf == NULL) {
        return NGX_ERROR;
    }

    cl->next = NULL;

    r->request_body->bufs = cl;

    r->headers_in.content_length_n = len;
    r->headers_in.chunked = 0;

    /* the proxy sends its own Content-Length: this is for the others */

    p = ngx_pnalloc(r->pool, NGX_SIZE_T_LEN);
    if (p == NULL) {
        return NGX_ERROR;
    }

    v.data = p;
    v.len = ngx_sprintf(p, "%uz", len) - p;

    if (ngx_http_anythingllm_set_header(r, &r->headers_in.content_length,
                                        "Content-Length", "content-length",
                                        &v, 0)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    ngx_str_set(&v, "application/json");

    if (ngx_http_anythingllm_set_header(r, &r->headers_in.content_type,
                                        "Content-Type", "content-type", &v,
                                        NGX_HTTP_ANYTHINGLLM_HEADER_ADD)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    return ngx_http_anythingllm_identity_encoding(r);
}


/* "chatcmpl-" and 32 random hex digits, and the time of the answer */

static ngx_int_t
ngx_http_anythingllm_openai_completion_id(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx)
{
    u_char  *p, rnd[16];

    p = ngx_pnalloc(r->pool, sizeof("chatcmpl-") - 1 + 2 * sizeof(rnd));
    if (p == NULL) {
        return NGX_ERROR;
    }

    ngx_http_anythingllm_openai_random(rnd, sizeof(rnd));

    ctx->completion_id.data = p;
    p = ngx_cpymem(p, "chatcmpl-", sizeof("chatcmpl-") - 1);
    p = ngx_hex_dump(p, rnd, sizeof(rnd));
    ctx->completion_id.len = p - ctx->completion_id.data;

    ctx->created = ngx_time();

    return NGX_OK;
}


static void
ngx_http_anythingllm_openai_resume(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, ngx_int_t rc)
{
    ctx->openai_waiting = 0;
    ctx->openai_done = 1;
    ctx->openai_status = rc;

    r->read_event_handler = ngx_http_block_reading;
    r->write_event_handler = ngx_http_core_run_phases;

    ngx_http_core_run_phases(r);
}


/* keeps an error as the verdict: the handler sends it when run again */

static ngx_int_t
ngx_http_anythingllm_openai_fail(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, alm_error_t *err)
{
    alm_error_t  *e;

    e = ngx_palloc(r->pool, sizeof(alm_error_t));
    if (e == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    *e = *err;

    ctx->resp = NGX_HTTP_ANYTHINGLLM_RESP_NONE;
    ctx->openai_error = e;

    return NGX_DONE;
}


/*
 * r->uri becomes /api/v1/workspaces, or /api/v1/workspace/<slug><tail>:
 * the proxy, whose proxy_pass has no URI part, sends it as it is.
 */

static ngx_int_t
ngx_http_anythingllm_openai_set_uri(ngx_http_request_t *r, const char *tail,
    size_t tail_len, ngx_str_t *slug)
{
    u_char  *p;
    size_t   len;

    static const char  workspaces[] = "/api/v1/workspaces";
    static const char  workspace[] = "/api/v1/workspace/";

    if (slug->len == 0) {
        r->uri.data = (u_char *) workspaces;
        r->uri.len = sizeof(workspaces) - 1;

    } else {
        len = sizeof(workspace) - 1 + slug->len + tail_len;

        p = ngx_pnalloc(r->pool, len);
        if (p == NULL) {
            return NGX_ERROR;
        }

        r->uri.data = p;
        r->uri.len = len;

        p = ngx_cpymem(p, workspace, sizeof(workspace) - 1);
        p = ngx_cpymem(p, slug->data, slug->len);
        ngx_memcpy(p, tail, tail_len);
    }

    r->valid_unparsed_uri = 0;
    r->quoted_uri = 0;
    r->args_start = NULL;
    ngx_str_null(&r->args);

    return NGX_OK;
}




/*
 * A model is a workspace slug the key may use.  A slug of dots alone
 * would be a path segment "." or "..": never a workspace.
 */

static ngx_uint_t
ngx_http_anythingllm_openai_model_ok(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, const char *id, size_t len)
{
    size_t  i;

    if (!alm_slug_valid(id, len)) {
        return 0;
    }

    for (i = 0; i < len; i++) {
        if (id[i] != '.') {
            break;
        }
    }

    if (i == len) {
        return 0;
    }

    if (ctx->key.valid
        && !alm_workspace_allowed((const char *) ctx->key.workspaces.data,
                                  ctx->key.workspaces.len, id, len))
    {
        return 0;
    }

    return 1;
}


/*
 * Session and completion ids take 32 random bytes a request.  They are
 * drawn from a per-worker pool that OpenSSL's generator refills 4 KiB
 * at a time: one RAND_bytes() call (with its fork check, a getpid()
 * system call) serves 128 requests.  A byte is handed out once, and
 * the pool is filled in the process that uses it: a pool filled before
 * a fork is thrown away, so that two workers never share bytes.
 */

#define NGX_HTTP_ANYTHINGLLM_RANDOM_POOL  4096

static void
ngx_http_anythingllm_openai_random(u_char *buf, size_t len)
{
    size_t    i;
    uint32_t  v;

    static ngx_pid_t  pid;
    static size_t     left;
    static u_char     pool[NGX_HTTP_ANYTHINGLLM_RANDOM_POOL];

    if (pid != ngx_pid) {
        pid = ngx_pid;
        left = 0;
    }

    if (left < len && len <= sizeof(pool)) {
        if (RAND_bytes(pool, (int) sizeof(pool)) == 1) {
            left = sizeof(pool);

        } else {
            left = 0;
        }
    }

    if (left >= len) {
        /* taken from the end, and wiped once taken */
        left -= len;
        ngx_memcpy(buf, pool + left, len);
        ngx_memzero(pool + left, len);
        return;
    }

    if (RAND_bytes(buf, (int) len) == 1) {
        return;
    }

    for (i = 0; i < len; i++) {
        v = (uint32_t) ngx_random();
        buf[i] = (u_char) (v >> 8);
    }
}


static void
ngx_http_anythingllm_openai_cleanup(void *data)
{
    ngx_http_anythingllm_ctx_t *ctx = data;

    ngx_http_anythingllm_redis_cancel(&ctx->conv_pending);

    if (ctx->chat) {
        alm_chat_req_free(ctx->chat);
        ctx->chat = NULL;
    }
}

