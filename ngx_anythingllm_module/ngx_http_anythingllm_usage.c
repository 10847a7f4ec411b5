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
 *
 * Token limits: a key's "tpm" counts in "<prefix>tpm:<digest>:<unix
 * minute>" (INCRBY of the answer's tokens when it is counted, expires
 * after 120 s), its "tpd" in the day's hash.  Before a request of a
 * key with a token limit goes upstream (and before GET /api/v1/auth,
 * which shows the day's use) one script reads both; a chat whose
 * window has reached its limit is refused there.  An answer adds its
 * tokens when it ends, so requests already under way may carry a
 * window past its limit: the limit refuses what starts after.
 *
 * Every answer to a key with limits carries OpenAI's x-ratelimit-*
 * headers, and AnythingLLM's answer to GET /api/v1/auth gets the
 * key's own record and the day's use added.
 */


#include "ngx_http_anythingllm_module.h"


/* counters outlive a year: 400 days */
#define NGX_HTTP_ANYTHINGLLM_USAGE_TTL  "34560000"

/* the token counter of a minute: kept over the next minute */
#define NGX_HTTP_ANYTHINGLLM_TPM_TTL    "120"

/* the first bytes of a whole answer's buffer, doubled as it fills */
#define NGX_HTTP_ANYTHINGLLM_USAGE_CHUNK  4096


/*
 * The counts of one turn of the worker's event loop go to Redis
 * together, as one script run: answers of the same key in the same
 * minute are summed into one entry first.  KEYS: each entry's day
 * hash in turn, followed by its minute's token counter when the key
 * has a tpm.  ARGV: the hash's time to live, the counter's, then for
 * each entry its requests, prompt tokens, completion tokens and "1"
 * when its minute's counter follows in KEYS, else "0".
 */
#define NGX_HTTP_ANYTHINGLLM_USAGE_SCRIPT                                     \
    "local k = 0 "                                                            \
    "for a = 3, #ARGV, 4 do "                                                 \
    "k = k + 1 "                                                              \
    "redis.call('HINCRBY', KEYS[k], 'requests', ARGV[a]) "                    \
    "redis.call('HINCRBY', KEYS[k], 'prompt_tokens', ARGV[a + 1]) "           \
    "redis.call('HINCRBY', KEYS[k], 'completion_tokens', ARGV[a + 2]) "       \
    "redis.call('EXPIRE', KEYS[k], ARGV[1]) "                                 \
    "if ARGV[a + 3] == '1' then "                                             \
    "k = k + 1 "                                                              \
    "redis.call('INCRBY', KEYS[k], ARGV[a + 1] + ARGV[a + 2]) "               \
    "redis.call('EXPIRE', KEYS[k], ARGV[2]) "                                 \
    "end "                                                                    \
    "end "                                                                    \
    "return k"

/* the most entries sent in one script run */
#define NGX_HTTP_ANYTHINGLLM_USAGE_BATCH  32

/* EVAL, script, numkeys, the two ttls; up to 2 keys, 4 counts an entry */
#define NGX_HTTP_ANYTHINGLLM_USAGE_ARGS                                       \
    (5 + 6 * NGX_HTTP_ANYTHINGLLM_USAGE_BATCH)


/*
 * KEYS[1] the day's hash, KEYS[2] the minute's token counter: today's
 * requests, prompt and completion tokens and the minute's tokens, as
 * the strings Redis holds (integers in an array would not reach the
 * caller)
 */
#define NGX_HTTP_ANYTHINGLLM_USED_SCRIPT                                      \
    "local d=redis.call('HMGET',KEYS[1],'requests','prompt_tokens',"          \
    "'completion_tokens') "                                                   \
    "return {d[1] or '0',d[2] or '0',d[3] or '0',"                            \
    "redis.call('GET',KEYS[2]) or '0'}"

#define ngx_http_anythingllm_usage_limited(key)                               \
    ((key)->rpm || (key)->tpm || (key)->tpd)

/* the room ngx_http_anythingllm_usage_names() writes in */
#define ngx_http_anythingllm_usage_names_len(prefix)                          \
    (2 * (prefix)->len + sizeof("usage:") - 1 + sizeof("tpm:") - 1            \
     + 2 * ALM_DIGEST_HEX_LEN + sizeof(":YYYYMMDD") - 1 + 1 + NGX_TIME_T_LEN)


typedef struct {
    alm_usage_scan_t            scan;           /* a stream */
    u_char                     *body;           /* a whole answer */
    size_t                      len;
    size_t                      size;
    size_t                      max;
    unsigned                    whole:1;
    unsigned                    auth:1;         /* held, then rewritten */
    unsigned                    too_long:1;
} ngx_http_anythingllm_usage_read_t;


/* a key's answers of one minute, summed */

typedef struct {
    u_char                             digest[ALM_DIGEST_HEX_LEN];
    time_t                             minute;        /* unix minute */
    ngx_uint_t                         tpm;           /* 1: count it */
    int64_t                            requests;
    int64_t                            prompt;
    int64_t                            completion;
} ngx_http_anythingllm_usage_entry_t;


/*
 * The counts waiting for the end of the event loop's turn, in the
 * worker's own memory: they outlive their requests.  "answers" is
 * the number of answers the entries hold, counted as errors when the
 * batch is not taken.
 */

typedef struct {
    ngx_http_anythingllm_main_conf_t    *amcf;
    ngx_uint_t                           n;
    ngx_uint_t                           answers;
    ngx_event_t                          event;
    ngx_http_anythingllm_usage_entry_t   entries[
                                             NGX_HTTP_ANYTHINGLLM_USAGE_BATCH];
} ngx_http_anythingllm_usage_batch_t;


static ngx_http_anythingllm_usage_batch_t  ngx_http_anythingllm_usage_batch;


static void ngx_http_anythingllm_usage_read(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, ngx_http_anythingllm_usage_read_t *ur,
    u_char *p, size_t len);
static void ngx_http_anythingllm_usage_add(
    ngx_http_anythingllm_main_conf_t *amcf, ngx_http_anythingllm_ctx_t *ctx,
    long completion);
static void ngx_http_anythingllm_usage_flush_event(ngx_event_t *ev);
static void ngx_http_anythingllm_usage_flush(
    ngx_http_anythingllm_usage_batch_t *batch);
static void ngx_http_anythingllm_usage_counted(void *data,
    ngx_http_anythingllm_redis_reply_t *reply);
static u_char *ngx_http_anythingllm_usage_names(u_char *p, ngx_str_t *prefix,
    u_char *digest, time_t minute, ngx_str_t *day, ngx_str_t *tpm);
static ngx_int_t ngx_http_anythingllm_usage_keys(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, ngx_str_t *day, ngx_str_t *minute);
static ngx_int_t ngx_http_anythingllm_usage_ask(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx);
static void ngx_http_anythingllm_usage_answered(void *data,
    ngx_http_anythingllm_redis_reply_t *reply);
static void ngx_http_anythingllm_usage_cleanup(void *data);
static ngx_uint_t ngx_http_anythingllm_usage_is_chat(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx);
static ngx_int_t ngx_http_anythingllm_usage_refuse(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx);
static ngx_int_t ngx_http_anythingllm_usage_headers(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx);
static ngx_int_t ngx_http_anythingllm_usage_header(ngx_http_request_t *r,
    const char *name, ngx_uint_t n, ngx_msec_t reset);
static ngx_int_t ngx_http_anythingllm_usage_auth_send(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, ngx_http_anythingllm_usage_read_t *ur);


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

    if (ctx == NULL || !ctx->key.valid) {
        return ngx_http_next_header_filter(r);
    }

    if (ngx_http_anythingllm_usage_headers(r, ctx) != NGX_OK) {
        return NGX_ERROR;
    }

    if (ctx->usage_read != NULL || r->upstream == NULL
        || r->err_status != 0 || r->headers_out.status != NGX_HTTP_OK
        || ctx->auth_result == NGX_HTTP_ANYTHINGLLM_AUTH_FAIL_OPEN
        || (ctx->native_chat == ALM_CHAT_NONE
            && (ctx->auth_route != ALM_ROUTE_AUTH
                || r->method != NGX_HTTP_GET || r->header_only)))
    {
        return ngx_http_next_header_filter(r);
    }

    ur = ngx_pcalloc(r->pool, sizeof(ngx_http_anythingllm_usage_read_t));
    if (ur == NULL) {
        return NGX_ERROR;
    }

    if (ctx->native_chat == ALM_CHAT_NONE) {
        /* GET /api/v1/auth: the header waits for the rewritten answer */
        ur->whole = 1;
        ur->auth = 1;
        ur->max = alcf->max_response;
        ctx->usage_read = ur;
        r->filter_need_in_memory = 1;

        ngx_http_clear_content_length(r);
        ngx_http_clear_etag(r);
        ngx_http_clear_last_modified(r);
        ngx_http_clear_accept_ranges(r);

        return NGX_OK;
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

        if (ur->auth) {
            /* taken: what goes on is the rewritten answer */
            b->pos = b->last;

            if (b->last_buf) {
                return ngx_http_anythingllm_usage_auth_send(r, ctx, ur);
            }

            continue;
        }

        if (b->last_buf && ur->whole && !ur->too_long && ur->len) {
            (void) alm_usage_answer((const char *) ur->body, ur->len,
                                    &ctx->usage);
        }
    }

    if (ur->auth) {
        return NGX_OK;
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

        ctx->pieces = ur->scan.pieces;

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
    long                                completion;
    ngx_http_anythingllm_ctx_t         *ctx;
    ngx_http_anythingllm_loc_conf_t    *alcf;
    ngx_http_anythingllm_main_conf_t   *amcf;

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_anythingllm_module);

    if (!alcf->enabled) {
        return NGX_OK;
    }

    ctx = ngx_http_get_module_ctx(r, ngx_http_anythingllm_module);

    /* a key let through with Redis away is not known to be ours */

    if (ctx == NULL || !ctx->key.valid || r->upstream == NULL
        || ctx->auth_result == NGX_HTTP_ANYTHINGLLM_AUTH_FAIL_OPEN
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

    /*
     * A stream the client left before AnythingLLM's last frame has no
     * counts: what was generated until then is its text pieces, each
     * of them a token as the stream sends them.
     */

    completion = ctx->usage.completion_tokens;

    if (!ctx->usage.present && ctx->pieces) {
        completion = (long) ctx->pieces;
    }

    ngx_log_debug4(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "anythingllm usage to count: %*s %l+%l",
                   (size_t) ALM_KEY_ID_LEN, ctx->key.digest,
                   ctx->usage.prompt_tokens, completion);

    ngx_http_anythingllm_usage_add(amcf, ctx, completion);

    return NGX_OK;
}


/*
 * The answer joins the batch: added to its key's entry of this
 * minute, or a new entry.  The batch goes to Redis once the event
 * loop has handled the turn's events (a posted event), or at once
 * when it is full.
 */

static void
ngx_http_anythingllm_usage_add(ngx_http_anythingllm_main_conf_t *amcf,
    ngx_http_anythingllm_ctx_t *ctx, long completion)
{
    time_t                               minute;
    ngx_uint_t                           i, tpm;
    ngx_http_anythingllm_usage_entry_t  *e;
    ngx_http_anythingllm_usage_batch_t  *batch;

    batch = &ngx_http_anythingllm_usage_batch;

    if (batch->n && batch->amcf != amcf) {
        ngx_http_anythingllm_usage_flush(batch);
    }

    batch->amcf = amcf;

    minute = ngx_time() / 60;
    tpm = ctx->key.tpm ? 1 : 0;

    for (i = 0; i < batch->n; i++) {
        e = &batch->entries[i];

        if (e->minute == minute && e->tpm == tpm
            && ngx_memcmp(e->digest, ctx->key.digest, ALM_DIGEST_HEX_LEN)
               == 0)
        {
            goto found;
        }
    }

    if (batch->n == NGX_HTTP_ANYTHINGLLM_USAGE_BATCH) {
        ngx_http_anythingllm_usage_flush(batch);
    }

    e = &batch->entries[batch->n++];

    ngx_memcpy(e->digest, ctx->key.digest, ALM_DIGEST_HEX_LEN);
    e->minute = minute;
    e->tpm = tpm;
    e->requests = 0;
    e->prompt = 0;
    e->completion = 0;

found:

    e->requests++;
    e->prompt += ctx->usage.prompt_tokens;
    e->completion += completion;
    batch->answers++;

    ngx_http_anythingllm_post_turn_end(&batch->event,
                                       ngx_http_anythingllm_usage_flush_event,
                                       batch);
}


static void
ngx_http_anythingllm_usage_flush_event(ngx_event_t *ev)
{
    ngx_http_anythingllm_usage_flush(ev->data);
}


/*
 * One EVAL for every entry of the batch; the batch is empty after it.
 * Each entry's keys are those ngx_http_anythingllm_usage_names()
 * writes for its minute.
 */

static void
ngx_http_anythingllm_usage_flush(ngx_http_anythingllm_usage_batch_t *batch)
{
    u_char                               *buf, *p;
    size_t                                one, argvlen[
                                              NGX_HTTP_ANYTHINGLLM_USAGE_ARGS];
    ngx_str_t                            *prefix, day, minute;
    ngx_uint_t                            i, n, answers, argc;
    const char                           *argv[
                                              NGX_HTTP_ANYTHINGLLM_USAGE_ARGS];
    ngx_http_anythingllm_usage_entry_t   *e;

    n = batch->n;
    answers = batch->answers;
    prefix = &batch->amcf->prefix;
    batch->n = 0;
    batch->answers = 0;

    if (batch->event.posted) {
        ngx_delete_posted_event(&batch->event);
    }

    if (n == 0) {
        return;
    }

    /* an entry's keys and four numbers, and numkeys */

    one = ngx_http_anythingllm_usage_names_len(prefix) + 4 * NGX_INT64_LEN;

    buf = ngx_alloc(n * one + NGX_INT_T_LEN, ngx_cycle->log);
    if (buf == NULL) {
        ngx_http_anythingllm_metrics_add(NGX_HTTP_ANYTHINGLLM_M_USAGE_ERRORS,
                                         answers);
        return;
    }

    argv[0] = "EVAL";
    argvlen[0] = sizeof("EVAL") - 1;
    argv[1] = NGX_HTTP_ANYTHINGLLM_USAGE_SCRIPT;
    argvlen[1] = sizeof(NGX_HTTP_ANYTHINGLLM_USAGE_SCRIPT) - 1;

    p = buf;
    argc = 3;

    for (i = 0; i < n; i++) {
        e = &batch->entries[i];

        p = ngx_http_anythingllm_usage_names(p, prefix, e->digest, e->minute,
                                             &day, &minute);

        argv[argc] = (const char *) day.data;
        argvlen[argc++] = day.len;

        if (e->tpm) {
            argv[argc] = (const char *) minute.data;
            argvlen[argc++] = minute.len;
        }
    }

    /* numkeys: the keys so far */

    argv[2] = (const char *) p;
    p = ngx_sprintf(p, "%ui", argc - 3);
    argvlen[2] = p - (u_char *) argv[2];

    argv[argc] = NGX_HTTP_ANYTHINGLLM_USAGE_TTL;
    argvlen[argc++] = sizeof(NGX_HTTP_ANYTHINGLLM_USAGE_TTL) - 1;
    argv[argc] = NGX_HTTP_ANYTHINGLLM_TPM_TTL;
    argvlen[argc++] = sizeof(NGX_HTTP_ANYTHINGLLM_TPM_TTL) - 1;

    for (i = 0; i < n; i++) {
        e = &batch->entries[i];

        argv[argc] = (const char *) p;
        p = ngx_sprintf(p, "%L", e->requests);
        argvlen[argc] = p - (u_char *) argv[argc];
        argc++;

        argv[argc] = (const char *) p;
        p = ngx_sprintf(p, "%L", e->prompt);
        argvlen[argc] = p - (u_char *) argv[argc];
        argc++;

        argv[argc] = (const char *) p;
        p = ngx_sprintf(p, "%L", e->completion);
        argvlen[argc] = p - (u_char *) argv[argc];
        argc++;

        argv[argc] = e->tpm ? "1" : "0";
        argvlen[argc++] = 1;
    }

    if (ngx_http_anythingllm_redis_command(
                                         ngx_http_anythingllm_usage_counted,
                                         (void *) (uintptr_t) answers,
                                         (int) argc, argv, argvlen)
        == NULL)
    {
        ngx_http_anythingllm_metrics_add(NGX_HTTP_ANYTHINGLLM_M_USAGE_ERRORS,
                                         answers);
        ngx_log_error(NGX_LOG_INFO, ngx_cycle->log, 0,
                      "anythingllm: usage of %ui answer(s) not counted: "
                      "redis unreachable", answers);

    } else {
        ngx_log_debug2(NGX_LOG_DEBUG_HTTP, ngx_cycle->log, 0,
                       "anythingllm usage counted: %ui answer(s) in %ui "
                       "entries", answers, n);
    }

    ngx_free(buf);
}


/* runs after the requests are gone: data is the batch's answers */

static void
ngx_http_anythingllm_usage_counted(void *data,
    ngx_http_anythingllm_redis_reply_t *reply)
{
    if (reply->type == NGX_HTTP_ANYTHINGLLM_REDIS_NONE
        || reply->type == NGX_HTTP_ANYTHINGLLM_REDIS_ERROR)
    {
        ngx_http_anythingllm_metrics_add(NGX_HTTP_ANYTHINGLLM_M_USAGE_ERRORS,
                                         (uintptr_t) data);
    }
}


/*
 * "<prefix>usage:<digest>:<YYYYMMDD>" of the minute's day (UTC) into
 * day, and "<prefix>tpm:<digest>:<unix minute>" into tpm, one after
 * the other from p (ngx_http_anythingllm_usage_names_len() bytes at
 * most); returns the end of the second
 */

static u_char *
ngx_http_anythingllm_usage_names(u_char *p, ngx_str_t *prefix,
    u_char *digest, time_t minute, ngx_str_t *day, ngx_str_t *tpm)
{
    ngx_tm_t  tm;

    ngx_gmtime(minute * 60, &tm);

    day->data = p;
    p = ngx_cpymem(p, prefix->data, prefix->len);
    p = ngx_cpymem(p, "usage:", sizeof("usage:") - 1);
    p = ngx_cpymem(p, digest, ALM_DIGEST_HEX_LEN);
    p = ngx_sprintf(p, ":%04d%02d%02d", tm.ngx_tm_year, tm.ngx_tm_mon,
                    tm.ngx_tm_mday);
    day->len = p - day->data;

    tpm->data = p;
    p = ngx_cpymem(p, prefix->data, prefix->len);
    p = ngx_cpymem(p, "tpm:", sizeof("tpm:") - 1);
    p = ngx_cpymem(p, digest, ALM_DIGEST_HEX_LEN);
    p = ngx_sprintf(p, ":%T", minute);
    tpm->len = p - tpm->data;

    return p;
}


/* the key's day hash of today and token counter of this minute */

static ngx_int_t
ngx_http_anythingllm_usage_keys(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, ngx_str_t *day, ngx_str_t *minute)
{
    u_char                            *p;
    ngx_http_anythingllm_main_conf_t  *amcf;

    amcf = ngx_http_get_module_main_conf(r, ngx_http_anythingllm_module);

    p = ngx_pnalloc(r->pool,
                    ngx_http_anythingllm_usage_names_len(&amcf->prefix));
    if (p == NULL) {
        return NGX_ERROR;
    }

    (void) ngx_http_anythingllm_usage_names(p, &amcf->prefix,
                                            (u_char *) ctx->key.digest,
                                            ngx_time() / 60, day, minute);

    return NGX_OK;
}


ngx_int_t
ngx_http_anythingllm_usage_handler(ngx_http_request_t *r)
{
    ngx_http_anythingllm_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_anythingllm_module);

    if (r != r->main || ctx == NULL || !ctx->key.valid
        || (ctx->auth_result != NGX_HTTP_ANYTHINGLLM_AUTH_CACHED
            && ctx->auth_result != NGX_HTTP_ANYTHINGLLM_AUTH_REDIS))
    {
        return NGX_DECLINED;
    }

    if (ctx->used_pending) {
        return NGX_AGAIN;
    }

    if (!ctx->used_asked) {
        if (ctx->key.tpm == 0 && ctx->key.tpd == 0
            && ctx->auth_route != ALM_ROUTE_AUTH)
        {
            return NGX_DECLINED;
        }

        ctx->used_asked = 1;

        return ngx_http_anythingllm_usage_ask(r, ctx);
    }

    if (!ctx->used_known || !ngx_http_anythingllm_usage_is_chat(r, ctx)) {
        return NGX_DECLINED;
    }

    return ngx_http_anythingllm_usage_refuse(r, ctx);
}


/*
 * When Redis cannot be reached the request passes with its use
 * unknown, as a cached key's rate then passes uncounted.
 */

static ngx_int_t
ngx_http_anythingllm_usage_ask(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx)
{
    ngx_str_t                          day, minute;
    const char                        *argv[5];
    size_t                             argvlen[5];
    ngx_http_anythingllm_main_conf_t  *amcf;

    amcf = ngx_http_get_module_main_conf(r, ngx_http_anythingllm_module);

    if (amcf->redis_addr.len == 0) {
        return NGX_DECLINED;
    }

    if (ngx_http_anythingllm_usage_keys(r, ctx, &day, &minute) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    /* a pending reply must not reach a request that is gone */

    if (!ctx->used_cleanup) {
        if (ngx_http_anythingllm_cleanup_request(r,
                                       ngx_http_anythingllm_usage_cleanup,
                                       ctx)
            != NGX_OK)
        {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        ctx->used_cleanup = 1;
    }

    ngx_http_anythingllm_redis_eval2(argv, argvlen,
                                     NGX_HTTP_ANYTHINGLLM_USED_SCRIPT,
                                     sizeof(NGX_HTTP_ANYTHINGLLM_USED_SCRIPT)
                                     - 1, &day, &minute);

    ctx->used_pending = ngx_http_anythingllm_redis_command(
                                      ngx_http_anythingllm_usage_answered,
                                      r, 5, argv, argvlen);

    if (ctx->used_pending == NULL) {
        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "anythingllm: use of key %*s not read: "
                      "redis unreachable",
                      (size_t) ALM_KEY_ID_LEN, ctx->key.digest);
        return NGX_DECLINED;
    }

    /* notices a client that goes away; nothing else runs meanwhile */

    r->read_event_handler = ngx_http_test_reading;
    r->write_event_handler = ngx_http_request_empty_handler;

    return NGX_AGAIN;
}


static void
ngx_http_anythingllm_usage_answered(void *data,
    ngx_http_anythingllm_redis_reply_t *rp)
{
    ngx_http_request_t *r = data;

    off_t                        n;
    int64_t                     *v[4];
    ngx_uint_t                   i;
    ngx_connection_t            *c;
    ngx_http_anythingllm_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_anythingllm_module);
    c = r->connection;

    ctx->used_pending = NULL;

    if (rp->type == NGX_HTTP_ANYTHINGLLM_REDIS_ARRAY && rp->nelts == 4) {
        v[0] = &ctx->used.requests;
        v[1] = &ctx->used.prompt_tokens;
        v[2] = &ctx->used.completion_tokens;
        v[3] = &ctx->used.minute_tokens;

        /* what does not read as a count counts as none */

        for (i = 0; i < 4; i++) {
            n = (rp->elts[i].data && rp->elts[i].len)
                ? ngx_atoof(rp->elts[i].data, rp->elts[i].len) : 0;
            *v[i] = (n > 0) ? (int64_t) n : 0;
        }

        ctx->used_known = 1;

    } else {
        ngx_log_error(NGX_LOG_INFO, c->log, 0,
                      "anythingllm: use of key %*s not read: redis %s",
                      (size_t) ALM_KEY_ID_LEN, ctx->key.digest,
                      rp->type == NGX_HTTP_ANYTHINGLLM_REDIS_NONE
                      ? "unreachable" : "answered an error");
    }

    r->read_event_handler = ngx_http_block_reading;
    r->write_event_handler = ngx_http_core_run_phases;

    ngx_http_core_run_phases(r);

    ngx_http_run_posted_requests(c);
}


static void
ngx_http_anythingllm_usage_cleanup(void *data)
{
    ngx_http_anythingllm_ctx_t *ctx = data;

    ngx_http_anythingllm_redis_cancel(&ctx->used_pending);
}


/* the requests whose answer is counted, and so limited */

static ngx_uint_t
ngx_http_anythingllm_usage_is_chat(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx)
{
    ngx_http_anythingllm_loc_conf_t  *alcf;

    if (ctx->native_chat != ALM_CHAT_NONE) {
        return 1;
    }

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_anythingllm_module);

    return alcf->openai == 1 && r->method == NGX_HTTP_POST
           && alm_oai_route((const char *) r->uri.data, r->uri.len,
                            NULL, NULL)
              == ALM_OAI_CHAT;
}


static ngx_int_t
ngx_http_anythingllm_usage_refuse(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx)
{
    u_char       *p, msg[160];
    time_t        now;
    ngx_str_t     v;
    const char   *per;
    ngx_uint_t    limit;

    now = ngx_time();

    if (ctx->key.tpm && ctx->used.minute_tokens >= (int64_t) ctx->key.tpm) {
        limit = ctx->key.tpm;
        per = "minute";
        ctx->used_retry = 60 - now % 60;

    } else if (ctx->key.tpd
               && ctx->used.prompt_tokens + ctx->used.completion_tokens
                  >= (int64_t) ctx->key.tpd)
    {
        limit = ctx->key.tpd;
        per = "day (UTC)";
        ctx->used_retry = 86400 - now % 86400;

    } else {
        return NGX_DECLINED;
    }

    ctx->used_refused = 1;
    ctx->auth_result = NGX_HTTP_ANYTHINGLLM_AUTH_RATE_LIMITED;

    v.data = ngx_pnalloc(r->pool, NGX_TIME_T_LEN);
    if (v.data == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    v.len = ngx_sprintf(v.data, "%T", ctx->used_retry) - v.data;

    if (ngx_http_anythingllm_push_header(r, "Retry-After", &v) == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = ngx_snprintf(msg, sizeof(msg) - 1, "Rate limit reached: this API "
                     "key may use %ui tokens per %s. Retry after %T "
                     "seconds.", limit, per, ctx->used_retry);
    *p = '\0';

    return ngx_http_anythingllm_error(r, NGX_HTTP_TOO_MANY_REQUESTS,
                                      (const char *) msg, "tokens", NULL,
                                      "rate_limit_exceeded");
}


/*
 * OpenAI's x-ratelimit-* headers: the requests of the key's minute
 * (with an rpm), and its tokens (with a tpm, else a tpd: that of the
 * day) as read before the request went upstream.  A header whose
 * count is not known (Redis away) is left out.
 */

static ngx_int_t
ngx_http_anythingllm_usage_headers(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx)
{
    int64_t        used;
    ngx_msec_t     into_minute, into_day;
    ngx_uint_t     limit;
    ngx_time_t    *tp;

    if (!ngx_http_anythingllm_usage_limited(&ctx->key)
        || ctx->auth_result == NGX_HTTP_ANYTHINGLLM_AUTH_FAIL_OPEN)
    {
        return NGX_OK;
    }

    tp = ngx_timeofday();

    into_minute = (ngx_msec_t) (tp->sec % 60) * 1000 + tp->msec;
    into_day = (ngx_msec_t) (tp->sec % 86400) * 1000 + tp->msec;

    if (ctx->key.rpm && ctx->rate_counted) {
        used = ngx_min(ctx->rate_used, ctx->key.rpm);

        if (ngx_http_anythingllm_usage_header(r,
                "x-ratelimit-limit-requests", ctx->key.rpm, 0)
            != NGX_OK
            || ngx_http_anythingllm_usage_header(r,
                   "x-ratelimit-remaining-requests",
                   ctx->key.rpm - (ngx_uint_t) used, 0)
               != NGX_OK
            || ngx_http_anythingllm_usage_header(r,
                   "x-ratelimit-reset-requests", 0, 60000 - into_minute)
               != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    if ((ctx->key.tpm == 0 && ctx->key.tpd == 0) || !ctx->used_known) {
        return NGX_OK;
    }

    if (ctx->key.tpm) {
        limit = ctx->key.tpm;
        used = ctx->used.minute_tokens;

    } else {
        limit = ctx->key.tpd;
        used = ctx->used.prompt_tokens + ctx->used.completion_tokens;
    }

    used = ngx_min(used, (int64_t) limit);

    if (ngx_http_anythingllm_usage_header(r, "x-ratelimit-limit-tokens",
                                          limit, 0)
        != NGX_OK
        || ngx_http_anythingllm_usage_header(r,
               "x-ratelimit-remaining-tokens", limit - (ngx_uint_t) used, 0)
           != NGX_OK
        || ngx_http_anythingllm_usage_header(r, "x-ratelimit-reset-tokens",
               0, ctx->key.tpm ? 60000 - into_minute : 86400000 - into_day)
           != NGX_OK)
    {
        return NGX_ERROR;
    }

    return NGX_OK;
}


/*
 * A count, or with "reset" a duration as OpenAI writes them: "59ms",
 * "1s", "6m0s", "1h0m0s" (whole seconds rounded up)
 */

static ngx_int_t
ngx_http_anythingllm_usage_header(ngx_http_request_t *r, const char *name,
    ngx_uint_t n, ngx_msec_t reset)
{
    u_char      *p;
    ngx_str_t    v;
    ngx_uint_t   sec;

    p = ngx_pnalloc(r->pool, NGX_INT_T_LEN + sizeof("hms") + 4);
    if (p == NULL) {
        return NGX_ERROR;
    }

    v.data = p;

    if (reset == 0) {
        p = ngx_sprintf(p, "%ui", n);

    } else if (reset < 1000) {
        p = ngx_sprintf(p, "%Mms", reset);

    } else {
        sec = (reset + 999) / 1000;

        if (sec >= 3600) {
            p = ngx_sprintf(p, "%uih", sec / 3600);
            sec %= 3600;
            p = ngx_sprintf(p, "%uim", sec / 60);

        } else if (sec >= 60) {
            p = ngx_sprintf(p, "%uim", sec / 60);
        }

        p = ngx_sprintf(p, "%uis", sec % 60);
    }

    v.len = p - v.data;

    return ngx_http_anythingllm_push_header(r, name, &v) ? NGX_OK
                                                          : NGX_ERROR;
}


/*
 * AnythingLLM's answer to GET /api/v1/auth, read whole, goes on with
 * the key's own record and the day's use added; an answer that is not
 * {"authenticated": true} (or too long to read) goes on as it was.
 */

static ngx_int_t
ngx_http_anythingllm_usage_auth_send(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, ngx_http_anythingllm_usage_read_t *ur)
{
    char            *json, date[sizeof("YYYY-MM-DD")];
    size_t           len;
    ngx_tm_t         tm;
    ngx_str_t        body;
    ngx_buf_t       *b;
    ngx_int_t        rc;
    ngx_chain_t      out;
    alm_key_info_t   info;

    ur->auth = 0;
    json = NULL;
    len = 0;

    if (!ur->too_long && ur->len) {
        ngx_gmtime(ngx_time(), &tm);
        (void) ngx_sprintf((u_char *) date, "%04d-%02d-%02d%Z",
                           tm.ngx_tm_year, tm.ngx_tm_mon, tm.ngx_tm_mday);

        ngx_memzero(&info, sizeof(alm_key_info_t));

        info.id = ctx->key.digest;
        info.name = (const char *) ctx->key.name.data;
        info.name_len = ctx->key.name.len;
        info.scopes = ctx->key.scopes;
        info.workspaces = (const char *) ctx->key.workspaces.data;
        info.workspaces_len = ctx->key.workspaces.len;
        info.rpm = ctx->key.rpm;
        info.tpm = ctx->key.tpm;
        info.tpd = ctx->key.tpd;
        info.date = date;
        info.usage_known = ctx->used_known;
        info.requests = ctx->used.requests;
        info.prompt_tokens = ctx->used.prompt_tokens;
        info.completion_tokens = ctx->used.completion_tokens;

        json = alm_auth_answer((const char *) ur->body, ur->len, &info,
                               &len);
    }

    if (json) {
        body.data = ngx_pnalloc(r->pool, len);
        if (body.data == NULL) {
            free(json);
            return NGX_ERROR;
        }

        ngx_memcpy(body.data, json, len);
        body.len = len;
        free(json);

        ngx_str_set(&r->headers_out.content_type, "application/json");
        r->headers_out.content_type_len = r->headers_out.content_type.len;
        r->headers_out.content_type_lowcase = NULL;
        ngx_str_null(&r->headers_out.charset);

    } else {
        body.data = ur->body;
        body.len = ur->too_long ? 0 : ur->len;

        if (ur->too_long) {
            /* never sent in part: a 502 rather than a cut answer */
            return NGX_ERROR;
        }
    }

    r->headers_out.content_length_n = body.len;

    rc = ngx_http_next_header_filter(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    b = ngx_http_anythingllm_body_buf(r->pool, &body);
    if (b == NULL) {
        return NGX_ERROR;
    }

    if (body.len == 0) {
        b->memory = 0;
        b->sync = 1;
    }

    out.buf = b;
    out.next = NULL;

    return ngx_http_next_body_filter(r, &out);
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
