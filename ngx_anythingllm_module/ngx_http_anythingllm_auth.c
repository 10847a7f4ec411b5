/*
 * Copyright (C) ngx_anythingllm authors
 *
 * The access phase: the client's key, its scopes, workspaces and rate.
 *
 *   1. the path is judged as nginx decoded and normalised it (r->uri),
 *      and that same path is what goes upstream: the raw request line
 *      is never passed on;
 *   2. "Authorization: Bearer <key>": the key is hashed (SHA-256) at
 *      once; only the digest is used from then on, and only its first
 *      12 hex digits are ever logged;
 *   3. the shared cache, else "HGETALL <prefix>key:<digest>" on the
 *      worker's Redis connection; the request waits without blocking
 *      the worker, and the requests of one key that arrive before the
 *      command is written share it;
 *   4. disabled, expired, scope, workspace;
 *   5. with rpm > 0: the minute's count, one for every nginx that
 *      shares the Redis (ngx_http_anythingllm_rate.c).
 *
 * When Redis cannot be reached, a cached key keeps working (its rate
 * is then not counted); an uncached one gets 503, or passes with full
 * rights under anythingllm_auth_fail_open.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_anythingllm_module.h"


/* ngx_http_anythingllm_auth_lookup_open(): out of memory */
#define NGX_HTTP_ANYTHINGLLM_LOOKUP_ERROR                                    \
    ((ngx_http_anythingllm_lookup_t *) -1)


#define ngx_http_anythingllm_auth_passed(res)                                \
    ((res) == NGX_HTTP_ANYTHINGLLM_AUTH_CACHED                               \
     || (res) == NGX_HTTP_ANYTHINGLLM_AUTH_REDIS                             \
     || (res) == NGX_HTTP_ANYTHINGLLM_AUTH_FAIL_OPEN)


static ngx_int_t ngx_http_anythingllm_auth_start(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, ngx_http_anythingllm_loc_conf_t *alcf);
static ngx_int_t ngx_http_anythingllm_auth_judge(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx);
static ngx_int_t ngx_http_anythingllm_auth_lookup(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx);
static ngx_int_t ngx_http_anythingllm_auth_redis_key(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, const char *name, size_t room,
    ngx_str_t *key);
static ngx_http_anythingllm_lookup_t *ngx_http_anythingllm_auth_lookup_open(
    ngx_http_request_t *r, ngx_http_anythingllm_ctx_t *ctx, uint32_t hash);
static void ngx_http_anythingllm_auth_lookup_close(
    ngx_http_anythingllm_lookup_t *lk);
static void ngx_http_anythingllm_auth_lookup_answered(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, ngx_http_anythingllm_redis_reply_t *rp,
    ngx_uint_t first);
static void ngx_http_anythingllm_auth_lookup_done(void *data,
    ngx_http_anythingllm_redis_reply_t *reply);
static ngx_int_t ngx_http_anythingllm_auth_unreachable(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx);
static ngx_int_t ngx_http_anythingllm_auth_wait(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, ngx_http_anythingllm_redis_req_t *rr);
static void ngx_http_anythingllm_auth_resume(ngx_http_request_t *r);
static ngx_int_t ngx_http_anythingllm_auth_set_cleanup(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx);
static void ngx_http_anythingllm_auth_cleanup(void *data);
static ngx_int_t ngx_http_anythingllm_auth_verdict(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx);
static ngx_int_t ngx_http_anythingllm_auth_forbidden(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx);
static ngx_int_t ngx_http_anythingllm_auth_read_key(ngx_http_request_t *r,
    ngx_str_t *key);
static ngx_int_t ngx_http_anythingllm_auth_parse(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, ngx_http_anythingllm_redis_reply_t *rp);
static ngx_uint_t ngx_http_anythingllm_auth_all_workspaces(
    ngx_http_anythingllm_key_t *key);
static ngx_int_t ngx_http_anythingllm_auth_keep(ngx_http_request_t *r,
    ngx_http_anythingllm_key_t *key);
static ngx_http_anythingllm_key_t *ngx_http_anythingllm_auth_kept(
    ngx_http_request_t *r);
static void ngx_http_anythingllm_auth_kept_cleanup(void *data);


static const struct {
    unsigned     bit;
    const char  *name;
    const char  *why;
} ngx_http_anythingllm_keyrec_fields[] = {
    { ALM_KEYREC_RPM, "rpm", "" },
    { ALM_KEYREC_EXPIRES, "expires", "" },
    { ALM_KEYREC_TPM, "tpm", "" },
    { ALM_KEYREC_TPD, "tpd", "" },
    { ALM_KEYREC_WORKSPACES, "workspaces",
      " (\"*\" mixed with slugs, or not a comma list of valid slugs)" }
};


/* indexed by the bit of ALM_SCOPE_* */

static const char  *ngx_http_anythingllm_scope_names[] = {
    "chat", "read", "documents", "admin"
};


/*
 * The lookups of one key in one turn of the event loop share a single
 * HGETALL.  A lookup takes in others only while its command has not
 * been written (ngx_http_anythingllm_redis_writes() unchanged since it
 * was sent): every request that shares it is then answered by Redis as
 * it was after the request arrived, exactly as by a command of its
 * own, and a revocation is seen as soon as without sharing.
 *
 * A lookup is the worker's memory, not a request's: a request that
 * goes away leaves its "waiting" queue (the auth cleanup), and the
 * lookup is freed when its reply has been handed to those left, or at
 * worker exit when it never comes.
 */

struct ngx_http_anythingllm_lookup_s {
    ngx_str_node_t              sn;         /* the digest, below */
    ngx_queue_t                 flight;     /* every lookup in flight */
    ngx_queue_t                 waiting;    /* ctx->lookup_link */
    ngx_uint_t                  writes;     /* redis_writes() at send */
    ngx_msec_t                  started;
    ngx_uint_t                  open;       /* in the tree */
    u_char                      digest[ALM_DIGEST_HEX_LEN];
};


/* the lookups that take in others, by digest */
static ngx_rbtree_t       ngx_http_anythingllm_lookups;
static ngx_rbtree_node_t  ngx_http_anythingllm_lookups_sentinel;
static ngx_queue_t        ngx_http_anythingllm_lookups_flight;


ngx_int_t
ngx_http_anythingllm_access_handler(ngx_http_request_t *r)
{
    ngx_int_t                         rc;
    ngx_http_anythingllm_ctx_t       *ctx;
    ngx_http_anythingllm_loc_conf_t  *alcf;

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_anythingllm_module);

    if (alcf->auth != 1 || r != r->main) {
        return NGX_DECLINED;
    }

    ctx = ngx_http_anythingllm_get_ctx(r);
    if (ctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (ctx->auth_waiting) {
        return NGX_AGAIN;
    }

    if (!ctx->auth_done) {
        rc = ngx_http_anythingllm_auth_start(r, ctx, alcf);

        if (rc == NGX_AGAIN) {
            return NGX_AGAIN;
        }

        if (rc == NGX_ERROR) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
    }

    return ngx_http_anythingllm_auth_verdict(r, ctx);
}


/*
 * NGX_OK: the verdict is in ctx; NGX_AGAIN: Redis was asked;
 * NGX_ERROR: no memory.
 */

static ngx_int_t
ngx_http_anythingllm_auth_start(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, ngx_http_anythingllm_loc_conf_t *alcf)
{
    ngx_int_t                          rc;
    ngx_str_t                          key;
    alm_route_t                        rt;
    ngx_http_anythingllm_key_t        *kept;
    ngx_http_anythingllm_main_conf_t  *amcf;

    ctx->auth_done = 1;

    /* the OpenAI routes: the workspace is the body's "model", judged later */

    if (alcf->openai == 1) {
        rt.kind = ALM_ROUTE_API;
        rt.scope = ALM_SCOPE_CHAT;
        rt.global = 0;
        rt.slug = NULL;
        rt.slug_len = 0;
        rt.chat = ALM_CHAT_NONE;

    } else {
        alm_route_classify((const char *) r->method_name.data,
                           r->method_name.len, (const char *) r->uri.data,
                           r->uri.len, &rt);
    }

    switch (rt.kind) {

    case ALM_ROUTE_BAD:
        ctx->auth_result = NGX_HTTP_ANYTHINGLLM_AUTH_DENIED_PATH;
        return NGX_OK;

    case ALM_ROUTE_NONE:
        /* outside the API, AnythingLLM is its web interface */
        ctx->need_scope = ALM_SCOPE_ADMIN;
        break;

    case ALM_ROUTE_AUTH:
        ctx->need_scope = 0;
        break;

    case ALM_ROUTE_OPENAI_PASS:
        ctx->need_scope = rt.scope ? rt.scope : ALM_SCOPE_CHAT;
        break;

    default:
        ctx->need_scope = rt.scope;
        break;
    }

    ctx->auth_route = rt.kind;
    ctx->native_chat = rt.chat;

    /*
     * Routes that reach the whole instance: those that name no
     * workspace (the documents every workspace shares, uploads whose
     * form fields say which workspaces to embed into, settings,
     * users), update-embeddings (its "adds" name any shared document;
     * the route table marks all of these global) and paths outside
     * the API.  Only a key allowed every workspace may use those.
     */

    ctx->auth_global = (alcf->openai != 1
                        && (rt.global || rt.kind == ALM_ROUTE_NONE));

    /*
     * The proxy sends r->uri (escaped again) instead of the request
     * line's path: what was judged is what AnythingLLM routes.
     */

    r->valid_unparsed_uri = 0;

    if (rt.slug) {
        ctx->workspace.len = rt.slug_len;
        ctx->workspace.data = ngx_pnalloc(r->pool, rt.slug_len);
        if (ctx->workspace.data == NULL) {
            return NGX_ERROR;
        }

        ngx_memcpy(ctx->workspace.data, rt.slug, rt.slug_len);
    }

    /*
     * After an internal redirect (error_page, try_files) the request is
     * judged again for its new location, but Authorization holds
     * AnythingLLM's own key by then: the key judged first stands in,
     * without a second rate-limit count.
     */

    kept = r->internal ? ngx_http_anythingllm_auth_kept(r) : NULL;

    if (kept) {
        ctx->key = *kept;
        ctx->key.rpm = 0;
        ctx->auth_result = NGX_HTTP_ANYTHINGLLM_AUTH_CACHED;
        return ngx_http_anythingllm_auth_judge(r, ctx);
    }

    if (ngx_http_anythingllm_auth_read_key(r, &key) != NGX_OK) {
        ctx->auth_result = NGX_HTTP_ANYTHINGLLM_AUTH_DENIED_MISSING;
        return NGX_OK;
    }

    alm_key_digest((const char *) key.data, key.len, ctx->key.digest);
    ctx->key.valid = 1;

    amcf = ngx_http_get_module_main_conf(r, ngx_http_anythingllm_module);

    rc = ngx_http_anythingllm_cache_get(amcf->cache_zone, ctx->key.digest,
                                        &ctx->key, r->pool);

    switch (rc) {

    case NGX_OK:
        ctx->auth_result = NGX_HTTP_ANYTHINGLLM_AUTH_CACHED;
        return ngx_http_anythingllm_auth_judge(r, ctx);

    case NGX_ABORT:
        ctx->auth_result = NGX_HTTP_ANYTHINGLLM_AUTH_DENIED_UNKNOWN;
        return NGX_OK;

    case NGX_DECLINED:
        return ngx_http_anythingllm_auth_lookup(r, ctx);

    default:
        return NGX_ERROR;
    }
}


/*
 * The Redis key of the request's key digest, for a command whose reply
 * the request will wait for: the cleanups that cancel it are set.
 */

static ngx_int_t
ngx_http_anythingllm_auth_redis_key(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, const char *name, size_t room,
    ngx_str_t *key)
{
    ngx_http_anythingllm_main_conf_t  *amcf;

    if (ngx_http_anythingllm_auth_set_cleanup(r, ctx) != NGX_OK) {
        return NGX_ERROR;
    }

    amcf = ngx_http_get_module_main_conf(r, ngx_http_anythingllm_module);

    return ngx_http_anythingllm_redis_key(r->pool, &amcf->prefix, name,
                                          ctx->key.digest, room, key);
}


static ngx_int_t
ngx_http_anythingllm_auth_lookup(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx)
{
    uint32_t                        hash;
    ngx_str_t                       name;
    ngx_http_anythingllm_lookup_t  *lk;

    if (ngx_http_anythingllm_lookups.root == NULL) {
        ngx_rbtree_init(&ngx_http_anythingllm_lookups,
                        &ngx_http_anythingllm_lookups_sentinel,
                        ngx_str_rbtree_insert_value);
        ngx_queue_init(&ngx_http_anythingllm_lookups_flight);
    }

    /* the digest is SHA-256: its first bytes spread the tree as well */

    ngx_memcpy(&hash, ctx->key.digest, sizeof(uint32_t));

    name.len = ALM_DIGEST_HEX_LEN;
    name.data = (u_char *) ctx->key.digest;

    lk = (ngx_http_anythingllm_lookup_t *)
             ngx_str_rbtree_lookup(&ngx_http_anythingllm_lookups, &name, hash);

    if (lk && lk->writes != ngx_http_anythingllm_redis_writes()) {
        /* written: what Redis answers may be older than this request */
        ngx_http_anythingllm_auth_lookup_close(lk);
        lk = NULL;
    }

    if (lk == NULL) {
        lk = ngx_http_anythingllm_auth_lookup_open(r, ctx, hash);

        if (lk == NULL) {
            return ngx_http_anythingllm_auth_unreachable(r, ctx);
        }

        if (lk == NGX_HTTP_ANYTHINGLLM_LOOKUP_ERROR) {
            return NGX_ERROR;
        }

    } else if (ngx_http_anythingllm_auth_set_cleanup(r, ctx) != NGX_OK) {
        return NGX_ERROR;
    }

    ctx->lookup = lk;
    ctx->request = r;
    ctx->lookup_started = lk->started;
    ngx_queue_insert_tail(&lk->waiting, &ctx->lookup_link);

    return ngx_http_anythingllm_auth_wait(r, ctx, NULL);
}


/*
 * A new lookup, its command sent; NULL when Redis cannot be reached,
 * NGX_HTTP_ANYTHINGLLM_LOOKUP_ERROR when out of memory.
 */

static ngx_http_anythingllm_lookup_t *
ngx_http_anythingllm_auth_lookup_open(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, uint32_t hash)
{
    ngx_str_t                          name;
    size_t                             argvlen[2];
    const char                        *argv[2];
    ngx_http_anythingllm_lookup_t     *lk;
    ngx_http_anythingllm_redis_req_t  *rr;

    if (ngx_http_anythingllm_auth_redis_key(r, ctx, "key:", 0, &name)
        != NGX_OK)
    {
        return NGX_HTTP_ANYTHINGLLM_LOOKUP_ERROR;
    }

    lk = ngx_alloc(sizeof(ngx_http_anythingllm_lookup_t), r->connection->log);
    if (lk == NULL) {
        return NGX_HTTP_ANYTHINGLLM_LOOKUP_ERROR;
    }

    argv[0] = "HGETALL";
    argvlen[0] = sizeof("HGETALL") - 1;
    argv[1] = (const char *) name.data;
    argvlen[1] = name.len;

    rr = ngx_http_anythingllm_redis_command(
                                       ngx_http_anythingllm_auth_lookup_done,
                                       lk, 2, argv, argvlen);
    if (rr == NULL) {
        ngx_free(lk);
        return NULL;
    }

    ngx_memcpy(lk->digest, ctx->key.digest, ALM_DIGEST_HEX_LEN);
    lk->sn.str.len = ALM_DIGEST_HEX_LEN;
    lk->sn.str.data = lk->digest;
    lk->sn.node.key = hash;
    lk->writes = ngx_http_anythingllm_redis_writes();
    lk->started = ngx_current_msec;
    lk->open = 1;
    ngx_queue_init(&lk->waiting);

    ngx_rbtree_insert(&ngx_http_anythingllm_lookups, &lk->sn.node);
    ngx_queue_insert_tail(&ngx_http_anythingllm_lookups_flight, &lk->flight);

    return lk;
}


/* no more requests join the lookup */

static void
ngx_http_anythingllm_auth_lookup_close(ngx_http_anythingllm_lookup_t *lk)
{
    if (lk->open) {
        ngx_rbtree_delete(&ngx_http_anythingllm_lookups, &lk->sn.node);
        lk->open = 0;
    }
}


/*
 * Every request still waiting gets the reply in the order it came;
 * the first fills the cache for all.  A request's handling may end
 * others (the streams of one connection): each is taken off the queue
 * before it runs, and one that ends leaves the queue in its cleanup.
 */

static void
ngx_http_anythingllm_auth_lookup_done(void *data,
    ngx_http_anythingllm_redis_reply_t *rp)
{
    ngx_http_anythingllm_lookup_t *lk = data;

    ngx_uint_t                   first;
    ngx_queue_t                 *q;
    ngx_http_anythingllm_ctx_t  *ctx;

    ngx_http_anythingllm_auth_lookup_close(lk);
    ngx_queue_remove(&lk->flight);

    first = 1;

    while (!ngx_queue_empty(&lk->waiting)) {
        q = ngx_queue_head(&lk->waiting);
        ngx_queue_remove(q);

        ctx = ngx_queue_data(q, ngx_http_anythingllm_ctx_t, lookup_link);
        ctx->lookup = NULL;

        ngx_http_anythingllm_auth_lookup_answered(ctx->request, ctx, rp,
                                                  first);
        first = 0;
    }

    ngx_free(lk);
}


void
ngx_http_anythingllm_auth_exit_process(void)
{
    ngx_queue_t                    *q, *w;
    ngx_http_anythingllm_ctx_t     *ctx;
    ngx_http_anythingllm_lookup_t  *lk;

    if (ngx_http_anythingllm_lookups.root == NULL) {
        return;
    }

    while (!ngx_queue_empty(&ngx_http_anythingllm_lookups_flight)) {
        q = ngx_queue_head(&ngx_http_anythingllm_lookups_flight);
        ngx_queue_remove(q);

        lk = ngx_queue_data(q, ngx_http_anythingllm_lookup_t, flight);

        for (w = ngx_queue_head(&lk->waiting);
             w != ngx_queue_sentinel(&lk->waiting);
             w = ngx_queue_next(w))
        {
            ctx = ngx_queue_data(w, ngx_http_anythingllm_ctx_t, lookup_link);
            ctx->lookup = NULL;
        }

        ngx_free(lk);
    }
}


static void
ngx_http_anythingllm_auth_lookup_answered(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, ngx_http_anythingllm_redis_reply_t *rp,
    ngx_uint_t first)
{
    ngx_int_t                          rc;
    ngx_str_t                          why;
    ngx_uint_t                         missed;
    ngx_http_anythingllm_main_conf_t  *amcf;

    amcf = ngx_http_get_module_main_conf(r, ngx_http_anythingllm_module);

    ctx->auth_waiting = 0;

    if (rp->type == NGX_HTTP_ANYTHINGLLM_REDIS_NONE) {
        rc = ngx_http_anythingllm_auth_unreachable(r, ctx);
        goto judged;
    }

    if (rp->type != NGX_HTTP_ANYTHINGLLM_REDIS_ARRAY) {
        if (ngx_http_anythingllm_rate_log_due(&missed)) {
            if (rp->type == NGX_HTTP_ANYTHINGLLM_REDIS_ERROR) {
                why = rp->str;

            } else {
                ngx_str_set(&why, "unexpected reply");
            }

            ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                          "anythingllm: key lookup of %*s failed: %V "
                          "(%ui more redis errors in the last second)",
                          (size_t) ALM_KEY_ID_LEN, ctx->key.digest, &why,
                          missed);
        }

        /*
         * Redis answered, so fail-open does not apply: an error (a
         * record of the wrong type, a refused command) is no reason to
         * let an unjudged key through
         */

        ctx->auth_result = NGX_HTTP_ANYTHINGLLM_AUTH_REDIS_ERROR;
        goto resume;
    }

    if (rp->nelts == 0) {
        if (first) {
            ngx_http_anythingllm_cache_put_negative(amcf->cache_zone,
                                                    ctx->key.digest,
                                                    amcf->cache_invalid,
                                                    ctx->lookup_started);
        }

        ctx->auth_result = NGX_HTTP_ANYTHINGLLM_AUTH_DENIED_UNKNOWN;
        goto resume;
    }

    if (ngx_http_anythingllm_auth_parse(r, ctx, rp) != NGX_OK) {
        ctx->auth_status = NGX_HTTP_INTERNAL_SERVER_ERROR;
        goto resume;
    }

    if (first) {
        ngx_http_anythingllm_cache_put(amcf->cache_zone, &ctx->key,
                                       amcf->cache_valid,
                                       ctx->lookup_started);
    }

    ctx->auth_result = NGX_HTTP_ANYTHINGLLM_AUTH_REDIS;

    rc = ngx_http_anythingllm_auth_judge(r, ctx);

judged:

    if (rc == NGX_AGAIN) {
        /* the rate counter was asked */
        return;
    }

    if (rc == NGX_ERROR) {
        ctx->auth_status = NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

resume:

    ngx_http_anythingllm_auth_resume(r);
}


/* the key's record is known: NGX_OK with the verdict, or NGX_AGAIN */

static ngx_int_t
ngx_http_anythingllm_auth_judge(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx)
{
    ngx_http_anythingllm_key_t  *key;

    key = &ctx->key;

    if (key->disabled) {
        ctx->auth_result = NGX_HTTP_ANYTHINGLLM_AUTH_DENIED_DISABLED;
        return NGX_OK;
    }

    if (key->expires && ngx_time() >= key->expires) {
        ctx->auth_result = NGX_HTTP_ANYTHINGLLM_AUTH_DENIED_EXPIRED;
        return NGX_OK;
    }

    if ((key->scopes & ctx->need_scope) != ctx->need_scope) {
        ctx->auth_result = NGX_HTTP_ANYTHINGLLM_AUTH_DENIED_SCOPE;
        return NGX_OK;
    }

    /*
     * AnythingLLM's own OpenAI routes name the workspace in the body,
     * and instance-wide routes none at all
     */

    if ((ctx->auth_route == ALM_ROUTE_OPENAI_PASS || ctx->auth_global)
        && !ngx_http_anythingllm_auth_all_workspaces(key))
    {
        ctx->auth_result = NGX_HTTP_ANYTHINGLLM_AUTH_DENIED_WORKSPACE;
        return NGX_OK;
    }

    if (ctx->workspace.len
        && !alm_workspace_allowed((const char *) key->workspaces.data,
                                  key->workspaces.len,
                                  (const char *) ctx->workspace.data,
                                  ctx->workspace.len))
    {
        ctx->auth_result = NGX_HTTP_ANYTHINGLLM_AUTH_DENIED_WORKSPACE;
        return NGX_OK;
    }

    if (key->rpm == 0) {
        return NGX_OK;
    }

    return ngx_http_anythingllm_rate_check(r, ctx);
}


/*
 * A key that was valid in the cache before a flush (see cache.c) is
 * judged as a cached one: as if the flush had come once Redis answers.
 */

static ngx_int_t
ngx_http_anythingllm_auth_unreachable(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx)
{
    ngx_int_t                          rc;
    ngx_http_anythingllm_loc_conf_t   *alcf;
    ngx_http_anythingllm_main_conf_t  *amcf;

    amcf = ngx_http_get_module_main_conf(r, ngx_http_anythingllm_module);

    rc = ngx_http_anythingllm_cache_get_stale(amcf->cache_zone,
                                              ctx->key.digest, &ctx->key,
                                              r->pool);
    if (rc == NGX_OK) {
        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "anythingllm: redis unreachable, key %*s judged by "
                      "its entry from before the cache was flushed",
                      (size_t) ALM_KEY_ID_LEN, ctx->key.digest);

        ctx->auth_result = NGX_HTTP_ANYTHINGLLM_AUTH_CACHED;
        return ngx_http_anythingllm_auth_judge(r, ctx);
    }

    if (rc == NGX_ERROR) {
        return NGX_ERROR;
    }

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_anythingllm_module);

    if (alcf->auth_fail_open != 1) {
        ctx->auth_result = NGX_HTTP_ANYTHINGLLM_AUTH_REDIS_ERROR;
        return NGX_OK;
    }

    /* the key cannot be judged: it is let through with every right */

    ctx->auth_result = NGX_HTTP_ANYTHINGLLM_AUTH_FAIL_OPEN;
    ctx->key.scopes = ALM_SCOPE_CHAT | ALM_SCOPE_READ | ALM_SCOPE_DOCUMENTS
                      | ALM_SCOPE_ADMIN;
    ngx_str_set(&ctx->key.workspaces, "*");
    ctx->key.rpm = 0;
    ctx->key.expires = 0;
    ctx->key.disabled = 0;

    ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                  "anythingllm: redis unreachable, key %*s let through "
                  "(anythingllm_auth_fail_open)",
                  (size_t) ALM_KEY_ID_LEN, ctx->key.digest);

    return NGX_OK;
}


static ngx_int_t
ngx_http_anythingllm_auth_wait(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, ngx_http_anythingllm_redis_req_t *rr)
{
    ctx->pending = rr;
    ctx->auth_waiting = 1;

    /* notices a client that goes away; nothing else runs meanwhile */

    r->read_event_handler = ngx_http_test_reading;
    r->write_event_handler = ngx_http_request_empty_handler;

    return NGX_AGAIN;
}


static void
ngx_http_anythingllm_auth_resume(ngx_http_request_t *r)
{
    ngx_connection_t  *c;

    c = r->connection;

    r->read_event_handler = ngx_http_block_reading;
    r->write_event_handler = ngx_http_core_run_phases;

    ngx_http_core_run_phases(r);

    ngx_http_run_posted_requests(c);
}


/*
 * A pending reply must not reach a request that is gone: the pool
 * cleanup covers every way a request ends, the request cleanup the
 * time between a termination and the request's end.
 */

static ngx_int_t
ngx_http_anythingllm_auth_set_cleanup(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx)
{
    if (ctx->auth_cleanup) {
        return NGX_OK;
    }

    if (ngx_http_anythingllm_cleanup_request(r,
                                         ngx_http_anythingllm_auth_cleanup,
                                         ctx)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    ctx->auth_cleanup = 1;

    return NGX_OK;
}


static void
ngx_http_anythingllm_auth_cleanup(void *data)
{
    ngx_http_anythingllm_ctx_t *ctx = data;

    ngx_http_anythingllm_redis_cancel(&ctx->pending);

    if (ctx->lookup) {
        ngx_queue_remove(&ctx->lookup_link);
        ctx->lookup = NULL;
    }
}


static ngx_int_t
ngx_http_anythingllm_auth_verdict(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx)
{
    u_char                          *p, *last;
    ngx_str_t                        v;
    ngx_http_anythingllm_key_t      *key;
    u_char                           msg[320];

    if (ctx->auth_status) {
        return ctx->auth_status;
    }

    key = &ctx->key;
    last = msg + sizeof(msg) - 1;

    switch (ctx->auth_result) {

    case NGX_HTTP_ANYTHINGLLM_AUTH_CACHED:
    case NGX_HTTP_ANYTHINGLLM_AUTH_REDIS:
        if (ngx_http_anythingllm_auth_keep(r, key) != NGX_OK) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        /* fall through */

    case NGX_HTTP_ANYTHINGLLM_AUTH_FAIL_OPEN:

        /*
         * The response filter keeps only the key's workspaces in the
         * list; AnythingLLM must then answer uncompressed.
         */

        if (ctx->auth_route == ALM_ROUTE_WORKSPACES
            && !ngx_http_anythingllm_auth_all_workspaces(key))
        {
            ctx->resp = NGX_HTTP_ANYTHINGLLM_RESP_WORKSPACES;

            if (ngx_http_anythingllm_identity_encoding(r) != NGX_OK) {
                return NGX_HTTP_INTERNAL_SERVER_ERROR;
            }
        }

        return NGX_OK;

    case NGX_HTTP_ANYTHINGLLM_AUTH_DENIED_PATH:
        return ngx_http_anythingllm_error(r, NGX_HTTP_BAD_REQUEST,
                   "The request path is not valid: empty, \".\" or \"..\" "
                   "segments and workspace slugs outside [A-Za-z0-9_.-] "
                   "are refused.", "invalid_request_error", NULL,
                   "invalid_path");

    case NGX_HTTP_ANYTHINGLLM_AUTH_DENIED_MISSING:
        return ngx_http_anythingllm_error(r, NGX_HTTP_UNAUTHORIZED,
                   "You didn't provide an API key. Send it in the "
                   "Authorization header: \"Authorization: Bearer <key>\".",
                   "invalid_request_error", NULL, "invalid_api_key");

    case NGX_HTTP_ANYTHINGLLM_AUTH_DENIED_UNKNOWN:
        return ngx_http_anythingllm_error(r, NGX_HTTP_UNAUTHORIZED,
                   "Incorrect API key provided.",
                   "invalid_request_error", NULL, "invalid_api_key");

    case NGX_HTTP_ANYTHINGLLM_AUTH_DENIED_EXPIRED:
        return ngx_http_anythingllm_error(r, NGX_HTTP_UNAUTHORIZED,
                   "The API key has expired.",
                   "invalid_request_error", NULL, "invalid_api_key");

    case NGX_HTTP_ANYTHINGLLM_AUTH_DENIED_DISABLED:
        return ngx_http_anythingllm_error(r, NGX_HTTP_UNAUTHORIZED,
                   "The API key is disabled.",
                   "invalid_request_error", NULL, "invalid_api_key");

    case NGX_HTTP_ANYTHINGLLM_AUTH_DENIED_SCOPE:
    case NGX_HTTP_ANYTHINGLLM_AUTH_DENIED_WORKSPACE:
        return ngx_http_anythingllm_auth_forbidden(r, ctx);

    case NGX_HTTP_ANYTHINGLLM_AUTH_RATE_LIMITED:
        v.data = ngx_pnalloc(r->pool, NGX_TIME_T_LEN);
        if (v.data == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        v.len = ngx_sprintf(v.data, "%T", ctx->retry_after) - v.data;

        if (ngx_http_anythingllm_push_header(r, "Retry-After", &v) == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        p = ngx_slprintf(msg, last, "Rate limit reached: this API key may "
                         "make %ui requests per minute. Retry after %T "
                         "seconds.", key->rpm, ctx->retry_after);
        *p = '\0';

        return ngx_http_anythingllm_error(r, NGX_HTTP_TOO_MANY_REQUESTS,
                   (const char *) msg, "requests", NULL,
                   "rate_limit_exceeded");

    default: /* NGX_HTTP_ANYTHINGLLM_AUTH_REDIS_ERROR */
        ngx_str_set(&v, "1");

        if (ngx_http_anythingllm_push_header(r, "Retry-After", &v) == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        return ngx_http_anythingllm_error(r,
                   NGX_HTTP_SERVICE_UNAVAILABLE,
                   ctx->rate_refused
                   ? "The request cannot be counted against the API key's "
                     "rate limit at the moment: the key store refuses "
                     "writes. Retry shortly."
                   : "The API key cannot be checked at the moment: the key "
                     "store is unreachable. Retry shortly.",
                   "server_error", NULL, NULL);
    }
}


/* 403: a scope or a workspace the key lacks */

static ngx_int_t
ngx_http_anythingllm_auth_forbidden(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx)
{
    u_char      *p, *last;
    ngx_uint_t   i;
    u_char       msg[320];

    last = msg + sizeof(msg) - 1;

    if (ctx->auth_result == NGX_HTTP_ANYTHINGLLM_AUTH_DENIED_SCOPE) {
        p = ngx_slprintf(msg, last, "The API key lacks the scope needed "
                         "for this request:");

        for (i = 0; i < 4; i++) {
            if ((ctx->need_scope & (1u << i))
                && !(ctx->key.scopes & (1u << i)))
            {
                p = ngx_slprintf(p, last, " \"%s\"",
                                 ngx_http_anythingllm_scope_names[i]);
            }
        }

        p = ngx_slprintf(p, last, ".");
        *p = '\0';

        return ngx_http_anythingllm_error(r, NGX_HTTP_FORBIDDEN,
                   (const char *) msg, "invalid_request_error", NULL,
                   "insufficient_scope");
    }

    if (ctx->auth_route == ALM_ROUTE_OPENAI_PASS) {
        p = ngx_slprintf(msg, last, "AnythingLLM's /api/v1/openai/ "
                         "routes need a key allowed every workspace.");

    } else if (ctx->auth_global && ctx->workspace.len) {
        p = ngx_slprintf(msg, last, "This route (workspace \"%V\") "
                         "reaches the documents every workspace "
                         "shares: it needs a key allowed every "
                         "workspace.", &ctx->workspace);

    } else if (ctx->auth_global) {
        p = ngx_slprintf(msg, last, "This route acts on every "
                         "workspace: it needs a key allowed every "
                         "workspace.");

    } else {
        p = ngx_slprintf(msg, last, "The API key may not use workspace "
                         "\"%V\".", &ctx->workspace);
    }

    *p = '\0';

    return ngx_http_anythingllm_error(r, NGX_HTTP_FORBIDDEN,
               (const char *) msg, "invalid_request_error", NULL,
               "workspace_forbidden");
}


/* "Authorization: Bearer <key>", the scheme in any case */

static ngx_int_t
ngx_http_anythingllm_auth_read_key(ngx_http_request_t *r, ngx_str_t *key)
{
    u_char           *p, *last;
    ngx_table_elt_t  *h;

    h = r->headers_in.authorization;

    if (h == NULL) {
        return NGX_DECLINED;
    }

    p = h->value.data;
    last = p + h->value.len;

    if (last - p < 6 || ngx_strncasecmp(p, (u_char *) "Bearer", 6) != 0) {
        return NGX_DECLINED;
    }

    p += 6;

    if (p < last && *p != ' ' && *p != '\t') {
        return NGX_DECLINED;
    }

    while (p < last && (*p == ' ' || *p == '\t')) {
        p++;
    }

    while (last > p && (last[-1] == ' ' || last[-1] == '\t')) {
        last--;
    }

    if (p == last) {
        return NGX_DECLINED;
    }

    key->data = p;
    key->len = last - p;

    return NGX_OK;
}


/*
 * The HGETALL reply, read by alm_key_record_parse(): only its strings
 * are handed over (an element that is not a string has data NULL),
 * and the name and workspaces are copied to the pool.  A field that
 * does not parse disables the key.
 */

static ngx_int_t
ngx_http_anythingllm_auth_parse(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, ngx_http_anythingllm_redis_reply_t *rp)
{
    u_char                      *p;
    size_t                       i;
    alm_str_t                   *kv;
    alm_key_record_t             rec;
    ngx_http_anythingllm_key_t  *key;

    key = &ctx->key;

    kv = ngx_palloc(r->pool, (rp->nelts ? rp->nelts : 1) * sizeof(alm_str_t));
    if (kv == NULL) {
        return NGX_ERROR;
    }

    for (i = 0; i < rp->nelts; i++) {
        kv[i].data = (const char *) rp->elts[i].data;
        kv[i].len = rp->elts[i].len;
    }

    if (alm_key_record_parse(kv, rp->nelts, &rec) != ALM_OK) {

        for (i = 0;
             i < sizeof(ngx_http_anythingllm_keyrec_fields)
                 / sizeof(ngx_http_anythingllm_keyrec_fields[0]);
             i++)
        {
            if (!(rec.malformed & ngx_http_anythingllm_keyrec_fields[i].bit))
            {
                continue;
            }

            ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                          "anythingllm: key %*s has a malformed \"%s\" "
                          "field%s: the key is treated as disabled",
                          (size_t) ALM_KEY_ID_LEN, key->digest,
                          ngx_http_anythingllm_keyrec_fields[i].name,
                          ngx_http_anythingllm_keyrec_fields[i].why);
        }
    }

    p = ngx_pnalloc(r->pool, rec.name.len + rec.workspaces.len + 1);
    if (p == NULL) {
        return NGX_ERROR;
    }

    key->name.data = p;
    key->name.len = rec.name.len;
    p = ngx_cpymem(p, rec.name.data, rec.name.len);

    key->workspaces.data = p;
    key->workspaces.len = rec.workspaces.len;
    ngx_memcpy(p, rec.workspaces.data, rec.workspaces.len);

    /* the core reads up to INT64_MAX: clamped where the types are smaller */

    key->scopes = rec.scopes;
    key->rpm = (rec.rpm > (int64_t) NGX_MAX_INT_T_VALUE)
               ? (ngx_uint_t) NGX_MAX_INT_T_VALUE : (ngx_uint_t) rec.rpm;
    key->tpm = (rec.tpm > (int64_t) NGX_MAX_INT_T_VALUE)
               ? (ngx_uint_t) NGX_MAX_INT_T_VALUE : (ngx_uint_t) rec.tpm;
    key->tpd = (rec.tpd > (int64_t) NGX_MAX_INT_T_VALUE)
               ? (ngx_uint_t) NGX_MAX_INT_T_VALUE : (ngx_uint_t) rec.tpd;
    key->expires = (rec.expires > (int64_t) NGX_MAX_TIME_T_VALUE)
                   ? (time_t) NGX_MAX_TIME_T_VALUE : (time_t) rec.expires;
    key->disabled = rec.disabled ? 1 : 0;

    return NGX_OK;
}


/* the one test of "every workspace", for the routes that need it */

static ngx_uint_t
ngx_http_anythingllm_auth_all_workspaces(ngx_http_anythingllm_key_t *key)
{
    return alm_workspaces_kind((const char *) key->workspaces.data,
                               key->workspaces.len)
           == ALM_WS_ALL;
}


/*
 * An internal redirect clears the module's ctx pointer but not the
 * ctx itself, which lives in the request pool: a pool cleanup, found
 * again by its handler, keeps the judged key reachable.
 */

static ngx_int_t
ngx_http_anythingllm_auth_keep(ngx_http_request_t *r,
    ngx_http_anythingllm_key_t *key)
{
    if (ngx_http_anythingllm_auth_kept(r)) {
        return NGX_OK;
    }

    return ngx_http_anythingllm_cleanup_add(r->pool,
                                       ngx_http_anythingllm_auth_kept_cleanup,
                                       key);
}


static ngx_http_anythingllm_key_t *
ngx_http_anythingllm_auth_kept(ngx_http_request_t *r)
{
    ngx_pool_cleanup_t  *cln;

    for (cln = r->pool->cleanup; cln; cln = cln->next) {
        if (cln->handler == ngx_http_anythingllm_auth_kept_cleanup) {
            return cln->data;
        }
    }

    return NULL;
}


static void
ngx_http_anythingllm_auth_kept_cleanup(void *data)
{
    /* nothing to release: the mark that finds the kept key */
}
