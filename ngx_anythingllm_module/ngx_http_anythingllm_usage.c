/*
 * Copyright (C) ngx_anythingllm authors
 *
 * Usage accounting: every chat answer to a known key adds its request
 * and AnythingLLM's token counts to the key's counters of the day in
 * Redis, "<prefix>usage:<digest>:<YYYYMMDD>" (UTC), a hash of
 * "requests", "prompt_tokens" and "completion_tokens".
 *
 * The OpenAI routes have their usage from the filter that translates
 * the answer (ctx->usage).  AnythingLLM's own chat and stream-chat
 * routes pass untouched: a header and body filter of this file reads
 * their "metrics" as the bytes go by, never holding back or changing
 * a buffer.  The count is sent in the log phase, whatever ended the
 * answer (a client gone mid-stream counts what was read until then);
 * nothing waits for Redis, and a count Redis does not take is counted
 * in the metrics (anythingllm_usage_errors_total).
 */


#include "ngx_http_anythingllm_module.h"


/* counters outlive a year: 400 days */
#define NGX_HTTP_ANYTHINGLLM_USAGE_TTL  "34560000"

/* the first bytes of a whole answer's buffer, doubled as it fills */
#define NGX_HTTP_ANYTHINGLLM_USAGE_CHUNK  4096


/*
 * KEYS[1] the day's hash; ARGV: prompt tokens, completion tokens,
 * the hash's time to live
 */
#define NGX_HTTP_ANYTHINGLLM_USAGE_SCRIPT                                     \
    "redis.call('HINCRBY',KEYS[1],'requests',1) "                             \
    "redis.call('HINCRBY',KEYS[1],'prompt_tokens',ARGV[1]) "                  \
    "redis.call('HINCRBY',KEYS[1],'completion_tokens',ARGV[2]) "              \
    "redis.call('EXPIRE',KEYS[1],ARGV[3]) "                                   \
    "return 1"


typedef struct {
    alm_usage_scan_t            scan;           /* a stream */
    u_char                     *body;           /* a whole answer */
    size_t                      len;
    size_t                      size;
    size_t                      max;
    unsigned                    whole:1;
    unsigned                    too_long:1;
} ngx_http_anythingllm_usage_read_t;


static void ngx_http_anythingllm_usage_read(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, ngx_http_anythingllm_usage_read_t *ur,
    u_char *p, size_t len);
static void ngx_http_anythingllm_usage_counted(void *data,
    ngx_http_anythingllm_redis_reply_t *reply);


static ngx_http_output_header_filter_pt  ngx_http_next_header_filter;
static ngx_http_output_body_filter_pt    ngx_http_next_body_filter;


static ngx_int_t
ngx_http_anythingllm_usage_header_filter(ngx_http_request_t *r)
{
    ngx_http_anythingllm_ctx_t         *ctx;
    ngx_http_anythingllm_loc_conf_t    *alcf;
    ngx_http_anythingllm_usage_read_t  *ur;

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_anythingllm_module);

    if (r != r->main || !alcf->enabled) {
        return ngx_http_next_header_filter(r);
    }

    ctx = ngx_http_get_module_ctx(r, ngx_http_anythingllm_module);

    if (ctx == NULL || ctx->native_chat == ALM_CHAT_NONE
        || !ctx->key.valid || ctx->usage_read != NULL
        || r->upstream == NULL || r->err_status != 0
        || r->headers_out.status != NGX_HTTP_OK)
    {
        return ngx_http_next_header_filter(r);
    }

    ur = ngx_pcalloc(r->pool, sizeof(ngx_http_anythingllm_usage_read_t));
    if (ur == NULL) {
        return NGX_ERROR;
    }

    if (ctx->native_chat == ALM_CHAT_WHOLE) {
        ur->whole = 1;
        ur->max = alcf->max_response;

    } else {
        ur->scan.buf = ngx_palloc(r->pool, alcf->max_frame);
        if (ur->scan.buf == NULL) {
            return NGX_ERROR;
        }

        alm_usage_scan_init(&ur->scan, ur->scan.buf, alcf->max_frame);
    }

    ctx->usage_read = ur;

    /* a buffer in a temporary file is read into memory for us */
    r->filter_need_in_memory = 1;

    return ngx_http_next_header_filter(r);
}


static ngx_int_t
ngx_http_anythingllm_usage_body_filter(ngx_http_request_t *r,
    ngx_chain_t *in)
{
    ngx_buf_t                          *b;
    ngx_chain_t                        *cl;
    ngx_http_anythingllm_ctx_t         *ctx;
    ngx_http_anythingllm_usage_read_t  *ur;

    if (r != r->main) {
        return ngx_http_next_body_filter(r, in);
    }

    ctx = ngx_http_get_module_ctx(r, ngx_http_anythingllm_module);

    if (ctx == NULL || ctx->usage_read == NULL) {
        return ngx_http_next_body_filter(r, in);
    }

    ur = ctx->usage_read;

    for (cl = in; cl; cl = cl->next) {
        b = cl->buf;

        if (ngx_buf_in_memory(b) && b->last > b->pos) {
            ngx_http_anythingllm_usage_read(r, ctx, ur, b->pos,
                                            b->last - b->pos);
        }

        if (b->last_buf && ur->whole && !ur->too_long && ur->len) {
            (void) alm_usage_answer((const char *) ur->body, ur->len,
                                    &ctx->usage);
        }
    }

    return ngx_http_next_body_filter(r, in);
}


static void
ngx_http_anythingllm_usage_read(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, ngx_http_anythingllm_usage_read_t *ur,
    u_char *p, size_t len)
{
    u_char  *body;
    size_t   size;

    if (!ur->whole) {
        alm_usage_scan(&ur->scan, (const char *) p, len);

        /* what a stream has told so far, should it end here */

        if (ur->scan.usage.present) {
            ctx->usage = ur->scan.usage;
        }

        return;
    }

    if (ur->too_long) {
        return;
    }

    if (ur->len + len > ur->max) {
        /* as for the OpenAI routes, a longer answer is not read */
        ur->too_long = 1;
        return;
    }

    if (ur->len + len > ur->size) {
        size = ngx_max(ur->size * 2, NGX_HTTP_ANYTHINGLLM_USAGE_CHUNK);
        size = ngx_max(size, ur->len + len);
        size = ngx_min(size, ur->max);

        body = ngx_palloc(r->pool, size);
        if (body == NULL) {
            ur->too_long = 1;
            return;
        }

        if (ur->len) {
            ngx_memcpy(body, ur->body, ur->len);
        }

        ur->body = body;
        ur->size = size;
    }

    ngx_memcpy(ur->body + ur->len, p, len);
    ur->len += len;
}


ngx_int_t
ngx_http_anythingllm_usage_log_handler(ngx_http_request_t *r)
{
    u_char                             *p, num[2 * NGX_INT64_LEN];
    ngx_tm_t                            tm;
    ngx_str_t                           key;
    const char                         *argv[7];
    size_t                              argvlen[7];
    ngx_http_anythingllm_ctx_t         *ctx;
    ngx_http_anythingllm_loc_conf_t    *alcf;
    ngx_http_anythingllm_main_conf_t   *amcf;

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_anythingllm_module);

    if (!alcf->enabled) {
        return NGX_OK;
    }

    ctx = ngx_http_get_module_ctx(r, ngx_http_anythingllm_module);

    if (ctx == NULL || !ctx->key.valid || r->upstream == NULL
        || r->headers_out.status != NGX_HTTP_OK
        || (ctx->native_chat == ALM_CHAT_NONE
            && ctx->resp != NGX_HTTP_ANYTHINGLLM_RESP_CHAT
            && ctx->resp != NGX_HTTP_ANYTHINGLLM_RESP_STREAM))
    {
        return NGX_OK;
    }

    amcf = ngx_http_get_module_main_conf(r, ngx_http_anythingllm_module);

    if (amcf->redis_addr.len == 0) {
        return NGX_OK;
    }

    if (ngx_http_anythingllm_redis_key(r->pool, &amcf->prefix, "usage:",
                                       ctx->key.digest,
                                       sizeof(":YYYYMMDD") - 1, &key)
        != NGX_OK)
    {
        ngx_http_anythingllm_metrics_add(NGX_HTTP_ANYTHINGLLM_M_USAGE_ERRORS,
                                         1);
        return NGX_OK;
    }

    ngx_gmtime(ngx_time(), &tm);

    p = ngx_sprintf(key.data + key.len, ":%04d%02d%02d",
                    tm.ngx_tm_year, tm.ngx_tm_mon, tm.ngx_tm_mday);
    key.len = p - key.data;

    argv[0] = "EVAL";
    argvlen[0] = sizeof("EVAL") - 1;
    argv[1] = NGX_HTTP_ANYTHINGLLM_USAGE_SCRIPT;
    argvlen[1] = sizeof(NGX_HTTP_ANYTHINGLLM_USAGE_SCRIPT) - 1;
    argv[2] = "1";
    argvlen[2] = 1;
    argv[3] = (const char *) key.data;
    argvlen[3] = key.len;

    p = num;
    argv[4] = (const char *) p;
    p = ngx_sprintf(p, "%l", ctx->usage.prompt_tokens);
    argvlen[4] = p - (u_char *) argv[4];

    argv[5] = (const char *) p;
    p = ngx_sprintf(p, "%l", ctx->usage.completion_tokens);
    argvlen[5] = p - (u_char *) argv[5];

    argv[6] = NGX_HTTP_ANYTHINGLLM_USAGE_TTL;
    argvlen[6] = sizeof(NGX_HTTP_ANYTHINGLLM_USAGE_TTL) - 1;

    if (ngx_http_anythingllm_redis_command(
                                         ngx_http_anythingllm_usage_counted,
                                         NULL, 7, argv, argvlen)
        == NULL)
    {
        ngx_http_anythingllm_metrics_add(NGX_HTTP_ANYTHINGLLM_M_USAGE_ERRORS,
                                         1);
        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "anythingllm: usage of key %*s not counted: "
                      "redis unreachable",
                      (size_t) ALM_KEY_ID_LEN, ctx->key.digest);
    }

    return NGX_OK;
}


/* runs after the request is gone: it has only the reply */

static void
ngx_http_anythingllm_usage_counted(void *data,
    ngx_http_anythingllm_redis_reply_t *reply)
{
    if (reply->type == NGX_HTTP_ANYTHINGLLM_REDIS_NONE
        || reply->type == NGX_HTTP_ANYTHINGLLM_REDIS_ERROR)
    {
        ngx_http_anythingllm_metrics_add(NGX_HTTP_ANYTHINGLLM_M_USAGE_ERRORS,
                                         1);
    }
}


ngx_int_t
ngx_http_anythingllm_usage_filter_init(ngx_conf_t *cf)
{
    ngx_http_next_header_filter = ngx_http_top_header_filter;
    ngx_http_top_header_filter = ngx_http_anythingllm_usage_header_filter;

    ngx_http_next_body_filter = ngx_http_top_body_filter;
    ngx_http_top_body_filter = ngx_http_anythingllm_usage_body_filter;

    return NGX_OK;
}
