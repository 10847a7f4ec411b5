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
 * conversation continues that conversation's AnythingLLM session; the
 * lookup is an asynchronous Redis read-and-delete, the store a SET once
 * the answer is complete.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <openssl/rand.h>
#include <hiredis/hiredis.h>

#include "ngx_http_anythingllm_module.h"


#define NGX_HTTP_ANYTHINGLLM_SESSION_MAX  64

/*
 * The most a chat request body may hold when client_max_body_size is 0
 * (no limit): the body is read into memory and parsed whole.
 */
#define NGX_HTTP_ANYTHINGLLM_BODY_MAX     (64 * 1024 * 1024)

/*
 * Conversations in Redis: "<prefix>conv:<hex>" holds a session id and
 * expires after anythingllm_conversation_ttl; the sorted set
 * "<prefix>convs" holds every stored <hex>, scored by the time it was
 * stored.  The set bounds the records to anythingllm_conversation_max:
 * each store drops the entries older than the TTL, then the oldest
 * records beyond the cap, and adds its own.  It all runs in one
 * script, so no client ever sees the count above the cap.
 *
 * The SET is the script's first write on purpose: under maxmemory with
 * "noeviction", Redis refuses a script's first write that needs memory
 * (OOM, and the script changes nothing), but lets a script that has
 * already written go on.  A full Redis thus gets no record, rather
 * than one more.  Other keys (key records, rate-limit counters) are
 * never touched.
 *
 * KEYS: record, index.  ARGV: session id, ttl, cap, now, <hex>, the
 * records' key prefix "<prefix>conv:".
 */

#define NGX_HTTP_ANYTHINGLLM_STORE_SCRIPT                                     \
    "local idx, now, ttl = KEYS[2], tonumber(ARGV[4]), tonumber(ARGV[2]) "   \
    "redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl) "                        \
    "redis.call('ZREMRANGEBYSCORE', idx, '-inf', now - ttl) "                \
    "local over = redis.call('ZCARD', idx) - tonumber(ARGV[3]) "             \
    "if not redis.call('ZSCORE', idx, ARGV[5]) then over = over + 1 end "    \
    "if over > 0 then "                                                      \
    "local old = redis.call('ZRANGE', idx, 0, over - 1) "                    \
    "for i = 1, #old do "                                                    \
    "if old[i] ~= ARGV[5] then redis.call('DEL', ARGV[6] .. old[i]) end "    \
    "end "                                                                   \
    "redis.call('ZREMRANGEBYRANK', idx, 0, over - 1) "                       \
    "end "                                                                   \
    "redis.call('ZADD', idx, now, ARGV[5]) "                                 \
    "redis.call('EXPIRE', idx, ttl) "                                        \
    "return over"

/*
 * GETDEL for any Redis from 2.6 on, the index entry removed with the
 * record.  KEYS: record, index.  ARGV: <hex>.
 */

#define NGX_HTTP_ANYTHINGLLM_TAKE_SCRIPT                                      \
    "local v = redis.call('GET', KEYS[1]) "                                   \
    "if v then redis.call('DEL', KEYS[1]) "                                   \
    "redis.call('ZREM', KEYS[2], ARGV[1]) end return v"

/* a failed store is logged at most this often (seconds) per worker */
#define NGX_HTTP_ANYTHINGLLM_STORE_LOG_EVERY  60


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
static void ngx_http_anythingllm_openai_conv_handler(void *data,
    void *reply);
static ngx_int_t ngx_http_anythingllm_openai_conv_eval(ngx_http_request_t *r,
    const char *script, size_t script_len, const char *hex,
    const char **argv, size_t *argvlen);
static void ngx_http_anythingllm_openai_conv_stored(void *data, void *reply);
static ngx_int_t ngx_http_anythingllm_openai_upstream(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx);
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
static void ngx_http_anythingllm_openai_free(void *data);


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
ngx_http_anythingllm_openai_models(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, alm_oai_route_e route, const char *id,
    size_t id_len)
{
    alm_error_t  err;
    ngx_str_t    slug;

    if (r->method != NGX_HTTP_GET) {
        return ngx_http_anythingllm_error(r, NGX_HTTP_NOT_ALLOWED,
                                          "Only GET is allowed here.",
                                          "invalid_request_error", NULL,
                                          "method_not_allowed");
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
    ngx_int_t            rc;
    ngx_pool_cleanup_t  *cln;

    if (r->method != NGX_HTTP_POST) {
        return ngx_http_anythingllm_error(r, NGX_HTTP_NOT_ALLOWED,
                                          "Only POST is allowed here.",
                                          "invalid_request_error", NULL,
                                          "method_not_allowed");
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

    cln = ngx_pool_cleanup_add(r->pool, 0);
    if (cln == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    cln->handler = ngx_http_anythingllm_openai_cleanup;
    cln->data = ctx;

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
    off_t                              max;
    ngx_int_t                          rc;
    ngx_str_t                          body;
    const char                        *argv[6];
    size_t                             argvlen[6];
    alm_error_t                        err;
    alm_chat_req_t                    *chat;
    ngx_http_anythingllm_main_conf_t  *amcf;

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

    amcf = ngx_http_get_module_main_conf(r, ngx_http_anythingllm_module);

    if (!chat->has_history || amcf->redis_addr.len == 0
        || amcf->conversation_ttl <= 0 || amcf->conversation_max == 0)
    {
        return ngx_http_anythingllm_openai_upstream(r, ctx);
    }

    /*
     * <prefix>conv:<digest of the earlier messages>, read and deleted
     * at once: a session goes on along one branch only.  Two
     * conversations that began alike, or a turn sent again, cannot
     * both continue it; the second starts a new session.
     */

    if (ngx_http_anythingllm_openai_conv_eval(r,
                                    NGX_HTTP_ANYTHINGLLM_TAKE_SCRIPT,
                                    sizeof(NGX_HTTP_ANYTHINGLLM_TAKE_SCRIPT)
                                    - 1, chat->prefix_hex, argv, argvlen)
        != NGX_OK)
    {
        return ngx_http_anythingllm_openai_upstream(r, ctx);
    }

    argv[5] = chat->prefix_hex;
    argvlen[5] = ALM_DIGEST_HEX_LEN;

    ctx->conv_pending = ngx_http_anythingllm_redis_command(
                                       ngx_http_anythingllm_openai_conv_handler,
                                       r, 6, argv, argvlen);

    if (ctx->conv_pending == NULL) {
        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "anythingllm: conversation lookup not possible, "
                      "Redis is unreachable: a new session is started");

        return ngx_http_anythingllm_openai_upstream(r, ctx);
    }

    return NGX_AGAIN;
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


/*
 * The Redis reply to the conversation lookup.  The request is alive:
 * its cleanup cancels the command before the request goes away.
 */

static void
ngx_http_anythingllm_openai_conv_handler(void *data, void *reply)
{
    ngx_http_request_t *r = data;

    u_char                       ch;
    size_t                       i;
    ngx_int_t                    rc;
    ngx_connection_t            *c;
    redisReply                  *rep;
    ngx_http_anythingllm_ctx_t  *ctx;

    c = r->connection;
    ctx = ngx_http_get_module_ctx(r, ngx_http_anythingllm_module);

    ctx->conv_pending = NULL;

    rep = reply;

    if (rep && rep->type == REDIS_REPLY_STRING && rep->len > 0
        && rep->len <= NGX_HTTP_ANYTHINGLLM_SESSION_MAX)
    {
        for (i = 0; i < (size_t) rep->len; i++) {
            ch = (u_char) rep->str[i];

            if (!((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'z')
                  || (ch >= 'A' && ch <= 'Z') || ch == '-'))
            {
                break;
            }
        }

        if (i == (size_t) rep->len) {
            ctx->session_id.data = ngx_pnalloc(r->pool, rep->len);

            if (ctx->session_id.data) {
                ngx_memcpy(ctx->session_id.data, rep->str, rep->len);
                ctx->session_id.len = rep->len;
                ctx->continuing = 1;
            }
        }

    } else if (rep == NULL || rep->type == REDIS_REPLY_ERROR) {
        ngx_log_error(NGX_LOG_INFO, c->log, 0,
                      "anythingllm: conversation lookup failed: "
                      "a new session is started");
    }

    ngx_log_debug1(NGX_LOG_DEBUG_HTTP, c->log, 0,
                   "anythingllm conversation %s",
                   ctx->continuing ? "continued" : "not found");

    rc = ngx_http_anythingllm_openai_upstream(r, ctx);

    ngx_http_anythingllm_openai_resume(r, ctx, rc);

    ngx_http_run_posted_requests(c);
}


/*
 * Turns the request into the workspace chat call: the new body, its
 * length and type, the method and the path.
 */

static ngx_int_t
ngx_http_anythingllm_openai_upstream(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx)
{
    u_char                           *p, rnd[16];
    char                             *json;
    size_t                            len;
    ngx_buf_t                        *b;
    ngx_str_t                         v, slug;
    alm_error_t                       err;
    ngx_chain_t                      *cl;
    alm_chat_req_t                   *chat;
    ngx_pool_cleanup_t               *cln;
    ngx_http_request_body_t          *rb;
    ngx_http_anythingllm_loc_conf_t  *alcf;

    chat = ctx->chat;

    if (!ctx->continuing) {

        /* a new session: a random UUID, version 4 */

        p = ngx_pnalloc(r->pool, 36);
        if (p == NULL) {
            goto nomem;
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
    }

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_anythingllm_module);

    json = alm_chat_req_upstream_body(chat, (alm_mode_e) alcf->chat_mode,
                                      (const char *) ctx->session_id.data,
                                      ctx->session_id.len, ctx->continuing,
                                      &len);
    if (json == NULL) {
        goto nomem;
    }

    cln = ngx_pool_cleanup_add(r->pool, 0);
    if (cln == NULL) {
        free(json);
        goto nomem;
    }

    cln->handler = ngx_http_anythingllm_openai_free;
    cln->data = json;

    /* the new body replaces the client's, in memory, as it is */

    b = ngx_calloc_buf(r->pool);
    if (b == NULL) {
        goto nomem;
    }

    b->start = (u_char *) json;
    b->pos = b->start;
    b->last = b->start + len;
    b->end = b->last;
    b->memory = 1;
    b->last_buf = 1;
    b->last_in_chain = 1;

    cl = ngx_alloc_chain_link(r->pool);
    if (cl == NULL) {
        goto nomem;
    }

    cl->buf = b;
    cl->next = NULL;

    rb = r->request_body;
    rb->bufs = cl;

    r->headers_in.content_length_n = len;
    r->headers_in.chunked = 0;

    /* the proxy sends its own Content-Length: this is for the others */

    p = ngx_pnalloc(r->pool, NGX_SIZE_T_LEN);
    if (p == NULL) {
        goto nomem;
    }

    v.data = p;
    v.len = ngx_sprintf(p, "%uz", len) - p;

    if (ngx_http_anythingllm_set_header_in(r, &r->headers_in.content_length,
                                           "Content-Length", "content-length",
                                           &v, 0)
        != NGX_OK)
    {
        goto nomem;
    }

    ngx_str_set(&v, "application/json");

    if (ngx_http_anythingllm_set_header_in(r, &r->headers_in.content_type,
                                           "Content-Type", "content-type",
                                           &v, 1)
        != NGX_OK)
    {
        goto nomem;
    }

    if (ngx_http_anythingllm_identity_encoding(r) != NGX_OK) {
        goto nomem;
    }

    slug = ctx->model;

    if (chat->stream) {
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

    /* "chatcmpl-" and 32 random hex digits */

    p = ngx_pnalloc(r->pool, sizeof("chatcmpl-") - 1 + 2 * sizeof(rnd));
    if (p == NULL) {
        goto nomem;
    }

    ngx_http_anythingllm_openai_random(rnd, sizeof(rnd));

    ctx->completion_id.data = p;
    p = ngx_cpymem(p, "chatcmpl-", sizeof("chatcmpl-") - 1);
    p = ngx_hex_dump(p, rnd, sizeof(rnd));
    ctx->completion_id.len = p - ctx->completion_id.data;

    ctx->created = ngx_time();

    ngx_log_debug3(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "anythingllm chat \"%V\" session \"%V\" continuing:%d",
                   &r->uri, &ctx->session_id, ctx->continuing);

    return NGX_DECLINED;

nomem:

    alm_error_set(&err, NGX_HTTP_INTERNAL_SERVER_ERROR, "server_error", NULL,
                  NULL, "The gateway ran out of memory.");

    return ngx_http_anythingllm_openai_fail(r, ctx, &err);
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

    if (err->message == err->buf) {
        e->message = e->buf;
    }

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
 * The first five words of both conversation scripts' EVAL: the script,
 * and its two keys "<prefix>conv:<hex>" (the record) and "<prefix>convs"
 * (the index).  The record's key ends with the hex digits, so that
 * argv[3] with argvlen[3] - ALM_DIGEST_HEX_LEN is "<prefix>conv:".
 */

static ngx_int_t
ngx_http_anythingllm_openai_conv_eval(ngx_http_request_t *r,
    const char *script, size_t script_len, const char *hex,
    const char **argv, size_t *argvlen)
{
    u_char                            *p;
    ngx_http_anythingllm_main_conf_t  *amcf;

    amcf = ngx_http_get_module_main_conf(r, ngx_http_anythingllm_module);

    argvlen[3] = amcf->prefix.len + sizeof("conv:") - 1 + ALM_DIGEST_HEX_LEN;
    argvlen[4] = amcf->prefix.len + sizeof("convs") - 1;

    p = ngx_pnalloc(r->pool, argvlen[3] + argvlen[4]);
    if (p == NULL) {
        return NGX_ERROR;
    }

    argv[0] = "EVAL";
    argvlen[0] = sizeof("EVAL") - 1;
    argv[1] = script;
    argvlen[1] = script_len;
    argv[2] = "2";
    argvlen[2] = 1;

    argv[3] = (const char *) p;
    p = ngx_cpymem(p, amcf->prefix.data, amcf->prefix.len);
    p = ngx_cpymem(p, "conv:", sizeof("conv:") - 1);
    p = ngx_cpymem(p, hex, ALM_DIGEST_HEX_LEN);

    argv[4] = (const char *) p;
    p = ngx_cpymem(p, amcf->prefix.data, amcf->prefix.len);
    ngx_memcpy(p, "convs", sizeof("convs") - 1);

    return NGX_OK;
}


/*
 * Stores "<prefix>conv:<digest of every message and the answer>" ->
 * session id, so that the next turn of this conversation continues
 * the session, within the cap of anythingllm_conversation_max (see
 * NGX_HTTP_ANYTHINGLLM_STORE_SCRIPT).  Nothing waits for the reply: a
 * store that fails leaves the next turn to the transcript.
 */

void
ngx_http_anythingllm_openai_conv_store(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx)
{
    u_char                            *p, hex[ALM_DIGEST_HEX_LEN];
    u_char                             num[3 * NGX_TIME_T_LEN + 3];
    const char                        *argv[11];
    size_t                             argvlen[11];
    ngx_http_anythingllm_main_conf_t  *amcf;

    if (ctx->chat == NULL || ctx->session_id.len == 0 || ctx->conv_stored) {
        return;
    }

    ctx->conv_stored = 1;

    amcf = ngx_http_get_module_main_conf(r, ngx_http_anythingllm_module);

    if (amcf->conversation_ttl <= 0 || amcf->conversation_max == 0
        || amcf->redis_addr.len == 0
        || ctx->session_id.len > NGX_HTTP_ANYTHINGLLM_SESSION_MAX)
    {
        return;
    }

    alm_conv_hash_hex(&ctx->chat->full, (char *) hex);

    if (ngx_http_anythingllm_openai_conv_eval(r,
                                   NGX_HTTP_ANYTHINGLLM_STORE_SCRIPT,
                                   sizeof(NGX_HTTP_ANYTHINGLLM_STORE_SCRIPT)
                                   - 1, (const char *) hex, argv, argvlen)
        != NGX_OK)
    {
        return;
    }

    argv[5] = (const char *) ctx->session_id.data;
    argvlen[5] = ctx->session_id.len;

    /* ttl, cap and now, one after the other in num */

    p = num;
    argv[6] = (const char *) p;
    p = ngx_sprintf(p, "%T", amcf->conversation_ttl);
    argvlen[6] = p - (u_char *) argv[6];

    argv[7] = (const char *) p;
    p = ngx_sprintf(p, "%i", amcf->conversation_max);
    argvlen[7] = p - (u_char *) argv[7];

    argv[8] = (const char *) p;
    p = ngx_sprintf(p, "%T", ngx_time());
    argvlen[8] = p - (u_char *) argv[8];

    argv[9] = (const char *) hex;
    argvlen[9] = ALM_DIGEST_HEX_LEN;
    argv[10] = argv[3];
    argvlen[10] = argvlen[3] - ALM_DIGEST_HEX_LEN;

    if (ngx_http_anythingllm_redis_command(
                                    ngx_http_anythingllm_openai_conv_stored,
                                    NULL, 11, argv, argvlen)
        == NULL)
    {
        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "anythingllm: conversation not stored, "
                      "Redis is unreachable");
        return;
    }

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "anythingllm conversation stored: \"%*s\"",
                   argvlen[3], argv[3]);
}


/*
 * A store that Redis refused (an OOM error under maxmemory, a script
 * error) or did not answer in time.  The client never learns of it;
 * the operator does, once a minute per worker at most, since under a
 * full Redis every completion fails alike.
 */

static void
ngx_http_anythingllm_openai_conv_stored(void *data, void *reply)
{
    size_t       len;
    time_t       now;
    const char  *why;
    redisReply  *rep;

    static time_t  logged;

    rep = reply;

    if (rep != NULL && rep->type != REDIS_REPLY_ERROR) {
        return;
    }

    now = ngx_time();

    if (logged && now - logged < NGX_HTTP_ANYTHINGLLM_STORE_LOG_EVERY) {
        return;
    }

    logged = now;

    if (rep) {
        why = rep->str;
        len = ngx_min((size_t) rep->len, 200);

    } else {
        why = "no answer in time, or the connection was lost";
        len = ngx_strlen(why);
    }

    ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                  "anythingllm: conversations could not be stored "
                  "(Redis: %*s); clients go on in transcript mode",
                  len, why);
}


static void
ngx_http_anythingllm_openai_random(u_char *buf, size_t len)
{
    size_t    i;
    uint32_t  v;

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

    if (ctx->conv_pending) {
        ngx_http_anythingllm_redis_cancel(ctx->conv_pending);
        ctx->conv_pending = NULL;
    }

    if (ctx->chat) {
        alm_chat_req_free(ctx->chat);
        ctx->chat = NULL;
    }
}


static void
ngx_http_anythingllm_openai_free(void *data)
{
    free(data);
}
