/*
 * Copyright (C) ngx_anythingllm authors
 *
 * A key's rpm: a fixed window per minute of the wall clock, counted in
 * Redis in "<prefix>rl:<digest>:<unix minute>" (expires after 120 s),
 * one count for every nginx that shares the Redis; the nginx sharing a
 * Redis should keep their clocks in step.
 *
 * A key whose rpm is under 2 * NGX_HTTP_ANYTHINGLLM_LEASE_SHARE, or
 * that is not in the key cache (valid=0), is counted request by
 * request: "INCR" and "EXPIRE", the request waits for the count.
 *
 * Other keys are counted from a lease: one "INCRBY <n>" takes n of the
 * minute's counts at once into the key's cache entry, which every
 * worker of this nginx admits from without asking Redis.  Of a fetch
 * answered with the count T, the numbers T - n + 1 .. T are this
 * nginx's; those above the rpm are given back ("DECRBY") at once, and
 * so is what an entry still holds when it goes.  The numbers held by
 * all nginx together never exceed the rpm, so the lease admits no
 * more than the rpm in a minute, whatever the number of nginx.  What
 * it costs is the other way: counts held by an nginx that gets no more
 * requests of the key are used by nobody until the minute ends (at
 * most a lease and a quarter, NGX_HTTP_ANYTHINGLLM_LEASE_MAX, per
 * nginx and key), and once a fetch finds the minute spent, this nginx
 * refuses the key until the minute ends, without asking Redis, even
 * if another nginx gives counts back meanwhile.
 *
 * When Redis cannot be reached, the request passes uncounted, as a
 * cached key does; when Redis answers with an error (OOM, MISCONF,
 * READONLY, NOAUTH...), the request that asked gets 503, or passes
 * under anythingllm_auth_fail_open: a limit is never lifted silently.
 * Either way the lease starts again from one request.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_anythingllm_module.h"


#define NGX_HTTP_ANYTHINGLLM_RL_EXPIRE  "120"

/* fetches in flight in one worker; more are counted request by request */
#define NGX_HTTP_ANYTHINGLLM_RATE_FETCHES  64


/*
 * A lease asked of Redis.  It lives in the worker, not in a request:
 * the answer is credited to the key's entry even when the request
 * that waited for it is gone.
 */

struct ngx_http_anythingllm_rate_fetch_s {
    ngx_http_request_t         *request;    /* waiting for it, or NULL */
    ngx_http_anythingllm_main_conf_t  *amcf;
    time_t                      minute;
    ngx_uint_t                  size;
    ngx_uint_t                  rpm;
    ngx_uint_t                  gen;
    ngx_uint_t                  busy;
    char                        digest[ALM_DIGEST_HEX_LEN];
};


static ngx_int_t ngx_http_anythingllm_rate_count(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, time_t now);
static void ngx_http_anythingllm_rate_counted(void *data,
    ngx_http_anythingllm_redis_reply_t *reply);
static ngx_int_t ngx_http_anythingllm_rate_fetch(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, ngx_http_anythingllm_lease_t *lease,
    ngx_uint_t wait);
static ngx_int_t ngx_http_anythingllm_rate_send(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, time_t minute, ngx_uint_t size,
    ngx_http_anythingllm_redis_handler_pt handler, void *data,
    ngx_http_anythingllm_redis_req_t **rrp);
static void ngx_http_anythingllm_rate_fetched(void *data,
    ngx_http_anythingllm_redis_reply_t *reply);
static void ngx_http_anythingllm_rate_granted(
    ngx_http_anythingllm_rate_fetch_t *f, ngx_http_request_t *r,
    long long count);
static void ngx_http_anythingllm_rate_refused(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, ngx_http_anythingllm_redis_reply_t *rp);
static void ngx_http_anythingllm_rate_uncounted(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx);
static ngx_int_t ngx_http_anythingllm_rate_wait(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx);
static void ngx_http_anythingllm_rate_resume(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx);
static ngx_int_t ngx_http_anythingllm_rate_set_cleanup(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx);
static void ngx_http_anythingllm_rate_cleanup(void *data);


static ngx_http_anythingllm_rate_fetch_t
    ngx_http_anythingllm_rate_fetches[NGX_HTTP_ANYTHINGLLM_RATE_FETCHES];


/*
 * Errors answered by Redis come with every request while they last:
 * each worker logs them at most once a second, with the count of the
 * ones it left out.
 */

static time_t      ngx_http_anythingllm_rate_logged;
static ngx_uint_t  ngx_http_anythingllm_rate_missed;


ngx_int_t
ngx_http_anythingllm_rate_check(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx)
{
    time_t                             now;
    ngx_http_anythingllm_lease_t       lease;
    ngx_http_anythingllm_main_conf_t  *amcf;

    amcf = ngx_http_get_module_main_conf(r, ngx_http_anythingllm_module);

    now = ngx_time();
    ctx->retry_after = 60 - now % 60;

    lease.minute = now / 60;

    ngx_http_anythingllm_lease_take(amcf->cache_zone, &ctx->key, &lease);

    switch (lease.verdict) {

    case NGX_HTTP_ANYTHINGLLM_LEASE_TAKEN:
        ctx->rate_counted = 1;
        ctx->rate_used = lease.used;

        if (lease.size) {
            /* the next lease, asked before this one runs dry */
            (void) ngx_http_anythingllm_rate_fetch(r, ctx, &lease, 0);
        }

        return NGX_OK;

    case NGX_HTTP_ANYTHINGLLM_LEASE_SPENT:
        ctx->rate_counted = 1;
        ctx->rate_used = ctx->key.rpm;
        ctx->auth_result = NGX_HTTP_ANYTHINGLLM_AUTH_RATE_LIMITED;
        return NGX_OK;

    case NGX_HTTP_ANYTHINGLLM_LEASE_FETCH:
        return ngx_http_anythingllm_rate_fetch(r, ctx, &lease, 1);

    default: /* NGX_HTTP_ANYTHINGLLM_LEASE_COUNT */
        return ngx_http_anythingllm_rate_count(r, ctx, now);
    }
}


/* the request alone: "INCR", and the request waits for the count */

static ngx_int_t
ngx_http_anythingllm_rate_count(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, time_t now)
{
    ngx_int_t  rc;

    if (ngx_http_anythingllm_rate_set_cleanup(r, ctx) != NGX_OK) {
        return NGX_ERROR;
    }

    rc = ngx_http_anythingllm_rate_send(r, ctx, now / 60, 0,
                                        ngx_http_anythingllm_rate_counted, r,
                                        &ctx->pending);
    if (rc != NGX_OK) {
        if (rc == NGX_DECLINED) {
            ngx_http_anythingllm_rate_uncounted(r, ctx);
            return NGX_OK;
        }

        return NGX_ERROR;
    }

    return ngx_http_anythingllm_rate_wait(r, ctx);
}


static void
ngx_http_anythingllm_rate_counted(void *data,
    ngx_http_anythingllm_redis_reply_t *rp)
{
    ngx_http_request_t *r = data;

    ngx_http_anythingllm_ctx_t        *ctx;
    ngx_http_anythingllm_main_conf_t  *amcf;

    ctx = ngx_http_get_module_ctx(r, ngx_http_anythingllm_module);

    ctx->pending = NULL;

    if (rp->type == NGX_HTTP_ANYTHINGLLM_REDIS_NONE) {
        ngx_http_anythingllm_rate_uncounted(r, ctx);

    } else if (rp->type != NGX_HTTP_ANYTHINGLLM_REDIS_INTEGER) {
        ngx_http_anythingllm_rate_refused(r, ctx, rp);

    } else {
        ctx->rate_counted = 1;
        ctx->rate_used = (rp->integer > 0) ? (ngx_uint_t) rp->integer : 0;

        if (rp->integer > (long long) ctx->key.rpm) {
            ctx->auth_result = NGX_HTTP_ANYTHINGLLM_AUTH_RATE_LIMITED;
        }

        if (ctx->key.rpm >= 2 * NGX_HTTP_ANYTHINGLLM_LEASE_SHARE) {
            amcf = ngx_http_get_module_main_conf(r,
                                                 ngx_http_anythingllm_module);

            ngx_http_anythingllm_lease_seen(amcf->cache_zone,
                                            ctx->key.digest,
                                            ngx_time() / 60,
                                            ctx->rate_used);
        }
    }

    ngx_http_anythingllm_rate_resume(r, ctx);
}


/*
 * "INCRBY <size>" for the key's entry.  "wait": the request found the
 * lease empty and waits for the fetch, whose first count is its own.
 * A fetch that cannot be sent clears the entry's mark of one in flight.
 */

static ngx_int_t
ngx_http_anythingllm_rate_fetch(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, ngx_http_anythingllm_lease_t *lease,
    ngx_uint_t wait)
{
    ngx_int_t                           rc;
    ngx_uint_t                          i;
    ngx_http_anythingllm_rate_fetch_t  *f;
    ngx_http_anythingllm_main_conf_t   *amcf;

    amcf = ngx_http_get_module_main_conf(r, ngx_http_anythingllm_module);

    f = NULL;

    for (i = 0; i < NGX_HTTP_ANYTHINGLLM_RATE_FETCHES; i++) {
        if (!ngx_http_anythingllm_rate_fetches[i].busy) {
            f = &ngx_http_anythingllm_rate_fetches[i];
            break;
        }
    }

    if (f == NULL
        || (wait && ngx_http_anythingllm_rate_set_cleanup(r, ctx) != NGX_OK))
    {
        rc = NGX_ERROR;
        goto failed;
    }

    rc = ngx_http_anythingllm_rate_send(r, ctx, lease->minute, lease->size,
                                        ngx_http_anythingllm_rate_fetched, f,
                                        NULL);
    if (rc != NGX_OK) {
        goto failed;
    }

    f->busy = 1;
    f->request = wait ? r : NULL;
    f->amcf = amcf;
    f->minute = lease->minute;
    f->size = lease->size;
    f->rpm = ctx->key.rpm;
    f->gen = lease->gen;
    ngx_memcpy(f->digest, ctx->key.digest, ALM_DIGEST_HEX_LEN);

    if (!wait) {
        return NGX_OK;
    }

    ctx->lease_wait = f;

    return ngx_http_anythingllm_rate_wait(r, ctx);

failed:

    (void) ngx_http_anythingllm_lease_credit(amcf->cache_zone,
                                             ctx->key.digest, lease->gen,
                                             lease->minute, lease->size, 0, 0,
                                             NGX_HTTP_ANYTHINGLLM_LEASE_FAILED);
    if (!wait) {
        return NGX_OK;
    }

    if (rc == NGX_DECLINED) {
        ngx_http_anythingllm_rate_uncounted(r, ctx);
        return NGX_OK;
    }

    /* no room for one more fetch (or no memory): the request alone */

    return ngx_http_anythingllm_rate_count(r, ctx, ngx_time());
}


/*
 * "INCRBY <size>" (size 0: "INCR") and "EXPIRE" of the key's counter
 * of "minute".  NGX_DECLINED: Redis is not reachable now.
 */

static ngx_int_t
ngx_http_anythingllm_rate_send(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, time_t minute, ngx_uint_t size,
    ngx_http_anythingllm_redis_handler_pt handler, void *data,
    ngx_http_anythingllm_redis_req_t **rrp)
{
    u_char                            *p;
    ngx_str_t                          name;
    size_t                             argvlen[3];
    const char                        *argv[3];
    u_char                             num[NGX_INT_T_LEN];
    ngx_http_anythingllm_redis_req_t  *rr;
    ngx_http_anythingllm_main_conf_t  *amcf;

    amcf = ngx_http_get_module_main_conf(r, ngx_http_anythingllm_module);

    if (ngx_http_anythingllm_redis_key(r->pool, &amcf->prefix, "rl:",
                                       ctx->key.digest,
                                       sizeof(":") - 1 + NGX_TIME_T_LEN,
                                       &name)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    p = ngx_sprintf(name.data + name.len, ":%T", minute);

    argv[1] = (const char *) name.data;
    argvlen[1] = p - name.data;

    if (size == 0) {
        argv[0] = "INCR";
        argvlen[0] = sizeof("INCR") - 1;

    } else {
        argv[0] = "INCRBY";
        argvlen[0] = sizeof("INCRBY") - 1;
        argv[2] = (const char *) num;
        argvlen[2] = ngx_sprintf(num, "%ui", size) - num;
    }

    rr = ngx_http_anythingllm_redis_command(handler, data, size ? 3 : 2,
                                            argv, argvlen);
    if (rr == NULL) {
        return NGX_DECLINED;
    }

    if (rrp) {
        *rrp = rr;
    }

    argv[0] = "EXPIRE";
    argvlen[0] = sizeof("EXPIRE") - 1;
    argv[2] = NGX_HTTP_ANYTHINGLLM_RL_EXPIRE;
    argvlen[2] = sizeof(NGX_HTTP_ANYTHINGLLM_RL_EXPIRE) - 1;

    (void) ngx_http_anythingllm_redis_command(NULL, NULL, 3, argv, argvlen);

    return NGX_OK;
}


static void
ngx_http_anythingllm_rate_fetched(void *data,
    ngx_http_anythingllm_redis_reply_t *rp)
{
    ngx_http_anythingllm_rate_fetch_t *f = data;

    ngx_http_request_t          *r;
    ngx_http_anythingllm_ctx_t  *ctx;

    r = f->request;
    f->request = NULL;
    f->busy = 0;

    ctx = r ? ngx_http_get_module_ctx(r, ngx_http_anythingllm_module) : NULL;

    if (ctx) {
        ctx->lease_wait = NULL;
    }

    if (rp->type == NGX_HTTP_ANYTHINGLLM_REDIS_INTEGER) {
        ngx_http_anythingllm_rate_granted(f, r, rp->integer);

    } else {
        (void) ngx_http_anythingllm_lease_credit(f->amcf->cache_zone,
                                             f->digest, f->gen, f->minute,
                                             f->size, 0, 0,
                                             NGX_HTTP_ANYTHINGLLM_LEASE_FAILED);

        if (r == NULL) {
            if (rp->type != NGX_HTTP_ANYTHINGLLM_REDIS_NONE) {
                ngx_log_error(NGX_LOG_INFO, ngx_cycle->log, 0,
                              "anythingllm: lease of key %*s not taken: "
                              "redis answered %V",
                              (size_t) ALM_KEY_ID_LEN, f->digest, &rp->str);
            }

        } else if (rp->type == NGX_HTTP_ANYTHINGLLM_REDIS_NONE) {
            ngx_http_anythingllm_rate_uncounted(r, ctx);

        } else {
            ngx_http_anythingllm_rate_refused(r, ctx, rp);
        }
    }

    if (r) {
        ngx_http_anythingllm_rate_resume(r, ctx);
    }
}


/*
 * Redis counted the fetch: "count" is the minute's count with it.  The
 * numbers count - size + 1 .. count are this nginx's, those within the
 * rpm granted; a waiting request takes the first.
 */

static void
ngx_http_anythingllm_rate_granted(ngx_http_anythingllm_rate_fetch_t *f,
    ngx_http_request_t *r, long long count)
{
    long long                    base;
    ngx_uint_t                   granted, left, back, flags;
    ngx_http_anythingllm_ctx_t  *ctx;

    base = count - (long long) f->size;

    if (base >= (long long) f->rpm) {
        granted = 0;

    } else if (base < 0) {
        /* fewer counts than this fetch: a Redis restarted within it */
        granted = f->size;
        base = 0;

    } else {
        granted = ngx_min(f->size, f->rpm - (ngx_uint_t) base);
    }

    left = granted;

    if (r) {
        ctx = ngx_http_get_module_ctx(r, ngx_http_anythingllm_module);

        ctx->rate_counted = 1;

        if (granted) {
            left--;
            ctx->rate_used = (ngx_uint_t) base + 1;

        } else {
            ctx->rate_used = f->rpm;
            ctx->auth_result = NGX_HTTP_ANYTHINGLLM_AUTH_RATE_LIMITED;
        }
    }

    flags = (granted == f->size) ? NGX_HTTP_ANYTHINGLLM_LEASE_FULL
                                 : NGX_HTTP_ANYTHINGLLM_LEASE_LAST;

    back = ngx_http_anythingllm_lease_credit(f->amcf->cache_zone, f->digest,
                                             f->gen, f->minute, f->size, left,
                                             (ngx_uint_t) base + granted,
                                             flags);

    back += f->size - granted;

    if (back && f->minute == ngx_time() / 60) {
        ngx_http_anythingllm_cache_lease_return(f->amcf, f->digest,
                                                f->minute, back);
    }
}


/*
 * Redis is there but will not count (out of memory under noeviction,
 * a failed save with stop-writes-on-bgsave-error, a read-only replica,
 * a password set since the connection was made): passing would lift
 * every limit for as long as that lasts, so the request is treated as
 * with an unreachable Redis for an uncached key.
 */

static void
ngx_http_anythingllm_rate_refused(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, ngx_http_anythingllm_redis_reply_t *rp)
{
    ngx_str_t                         why;
    ngx_uint_t                        missed;
    ngx_http_anythingllm_loc_conf_t  *alcf;

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_anythingllm_module);

    if (rp->type == NGX_HTTP_ANYTHINGLLM_REDIS_ERROR
        && rp->str.data != NULL)
    {
        why = rp->str;

    } else {
        ngx_str_set(&why, "unexpected reply");
    }

    if (ngx_http_anythingllm_rate_log_due(&missed)) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "anythingllm: rate of key %*s cannot be counted: "
                      "%V; %s (%ui more redis errors in the last second)",
                      (size_t) ALM_KEY_ID_LEN, ctx->key.digest, &why,
                      alcf->auth_fail_open == 1
                      ? "let through (anythingllm_auth_fail_open)"
                      : "refused with 503",
                      missed);
    }

    if (alcf->auth_fail_open == 1) {
        return;
    }

    ctx->auth_result = NGX_HTTP_ANYTHINGLLM_AUTH_REDIS_ERROR;
    ctx->rate_refused = 1;
}


static void
ngx_http_anythingllm_rate_uncounted(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx)
{
    ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                  "anythingllm: rate of key %*s not counted: "
                  "redis unreachable",
                  (size_t) ALM_KEY_ID_LEN, ctx->key.digest);
}


/* 1 when this worker may log a Redis error now; *missed: left out since */

ngx_uint_t
ngx_http_anythingllm_rate_log_due(ngx_uint_t *missed)
{
    time_t  now;

    now = ngx_time();

    if (now == ngx_http_anythingllm_rate_logged) {
        ngx_http_anythingllm_rate_missed++;
        return 0;
    }

    *missed = ngx_http_anythingllm_rate_missed;

    ngx_http_anythingllm_rate_logged = now;
    ngx_http_anythingllm_rate_missed = 0;

    return 1;
}


static ngx_int_t
ngx_http_anythingllm_rate_wait(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx)
{
    ctx->auth_waiting = 1;

    /* notices a client that goes away; nothing else runs meanwhile */

    r->read_event_handler = ngx_http_test_reading;
    r->write_event_handler = ngx_http_request_empty_handler;

    return NGX_AGAIN;
}


static void
ngx_http_anythingllm_rate_resume(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx)
{
    ngx_connection_t  *c;

    c = r->connection;

    ctx->auth_waiting = 0;

    r->read_event_handler = ngx_http_block_reading;
    r->write_event_handler = ngx_http_core_run_phases;

    ngx_http_core_run_phases(r);

    ngx_http_run_posted_requests(c);
}


/*
 * A pending count must not reach a request that is gone, and a fetch
 * must not resume one: the cleanups cover every way a request ends.
 */

static ngx_int_t
ngx_http_anythingllm_rate_set_cleanup(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx)
{
    if (ctx->rate_cleanup) {
        return NGX_OK;
    }

    if (ngx_http_anythingllm_cleanup_request(r,
                                         ngx_http_anythingllm_rate_cleanup,
                                         ctx)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    ctx->rate_cleanup = 1;

    return NGX_OK;
}


static void
ngx_http_anythingllm_rate_cleanup(void *data)
{
    ngx_http_anythingllm_ctx_t *ctx = data;

    ngx_http_anythingllm_redis_cancel(&ctx->pending);

    if (ctx->lease_wait) {
        ctx->lease_wait->request = NULL;
        ctx->lease_wait = NULL;
    }
}
