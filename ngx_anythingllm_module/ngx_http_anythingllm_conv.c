/*
 * Copyright (C) ngx_anythingllm authors
 *
 * Conversations: a chat request whose earlier messages hash to a
 * stored conversation continues that conversation's AnythingLLM
 * session.  The lookup is an asynchronous Redis read-and-delete; the
 * store, once the answer is complete, is fire and forget.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_anythingllm_module.h"


#define NGX_HTTP_ANYTHINGLLM_SESSION_MAX  64

/*
 * Conversations in Redis: "<prefix>conv:<hex>" holds a session id and
 * expires after anythingllm_conversation_ttl; the sorted set
 * "<prefix>convs" holds every stored <hex>, scored by the time it was
 * stored.  The set bounds the records to anythingllm_conversation_max.
 *
 * The stores of one turn of the worker's event loop go to Redis
 * together, as one script run (see ngx_http_anythingllm_conv_store()).
 * When the set has room for every store of the run, each store is one
 * SET and one ZADD adds every entry (nothing can go past the cap).
 * Otherwise the script takes them one after the other.  A store that
 * finds the set with room adds its own entry and is done.  One that
 * would take the set past the cap first drops the entries older than
 * the TTL, then the oldest records beyond the cap, then adds its own.
 * It all runs in one script, so no client ever sees the count above
 * the cap.
 *
 * Entries of expired records stay in the set until it is full: they
 * are its oldest, so the full path drops them before any live record,
 * and the records evicted are the same as if they had left at once.
 *
 * A SET is the script's first write on purpose: under maxmemory with
 * "noeviction", Redis refuses a script's first write that needs memory
 * (OOM, and the script changes nothing), but lets a script that has
 * already written go on.  A full Redis thus gets no record, rather
 * than one more; a script that starts just below maxmemory may write
 * its few records (at most NGX_HTTP_ANYTHINGLLM_STORE_BATCH) past it.
 * Other keys (key records, rate-limit counters) are never touched.
 *
 * KEYS: the index, then the records.  ARGV: ttl, cap, now, the
 * records' key prefix "<prefix>conv:", then the session id and the
 * <hex> of each record in turn.
 */

#define NGX_HTTP_ANYTHINGLLM_STORE_SCRIPT                                     \
    "local idx, ttl, cap, now = KEYS[1], ARGV[1], tonumber(ARGV[2]), "       \
    "ARGV[3] "                                                               \
    "if redis.call('ZCARD', idx) + #KEYS - 1 <= cap then "                   \
    "local z = {} "                                                          \
    "for i = 2, #KEYS do "                                                   \
    "redis.call('SET', KEYS[i], ARGV[2 * i + 1], 'EX', ttl) "                \
    "z[2 * i - 3], z[2 * i - 2] = now, ARGV[2 * i + 2] "                     \
    "end "                                                                   \
    "redis.call('ZADD', idx, unpack(z)) "                                    \
    "else "                                                                  \
    "for i = 2, #KEYS do "                                                   \
    "local h = ARGV[2 * i + 2] "                                             \
    "redis.call('SET', KEYS[i], ARGV[2 * i + 1], 'EX', ttl) "                \
    "local over = redis.call('ZCARD', idx) + 1 - cap "                       \
    "if over > 0 then "                                                      \
    "redis.call('ZREMRANGEBYSCORE', idx, '-inf', "                           \
    "tonumber(now) - tonumber(ttl)) "                                        \
    "over = redis.call('ZCARD', idx) - cap "                                 \
    "if not redis.call('ZSCORE', idx, h) then over = over + 1 end "          \
    "if over > 0 then "                                                      \
    "local old = redis.call('ZRANGE', idx, 0, over - 1) "                    \
    "for k = 1, #old do "                                                    \
    "if old[k] ~= h then redis.call('DEL', ARGV[4] .. old[k]) end "          \
    "end "                                                                   \
    "redis.call('ZREMRANGEBYRANK', idx, 0, over - 1) "                       \
    "end "                                                                   \
    "end "                                                                   \
    "redis.call('ZADD', idx, now, h) "                                       \
    "end "                                                                   \
    "end "                                                                   \
    "redis.call('EXPIRE', idx, ttl) "                                        \
    "return #KEYS - 1"

/* the most stores sent in one script run */
#define NGX_HTTP_ANYTHINGLLM_STORE_BATCH  32

/* EVAL, script, numkeys, index, ttl, cap, now, prefix; 3 a store */
#define NGX_HTTP_ANYTHINGLLM_STORE_ARGS                                       \
    (8 + 3 * NGX_HTTP_ANYTHINGLLM_STORE_BATCH)


typedef struct {
    u_char                             hex[ALM_DIGEST_HEX_LEN];
    u_char                             session[
                                           NGX_HTTP_ANYTHINGLLM_SESSION_MAX];
    size_t                             session_len;
} ngx_http_anythingllm_conv_entry_t;


/*
 * The stores waiting for the end of the event loop's turn, in the
 * worker's own memory: they outlive their requests.
 */

typedef struct {
    ngx_http_anythingllm_main_conf_t  *amcf;
    ngx_uint_t                         n;
    ngx_event_t                        event;
    ngx_http_anythingllm_conv_entry_t  entries[
                                           NGX_HTTP_ANYTHINGLLM_STORE_BATCH];
} ngx_http_anythingllm_conv_batch_t;


static ngx_http_anythingllm_conv_batch_t  ngx_http_anythingllm_conv_batch;

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


static ngx_int_t ngx_http_anythingllm_conv_eval(ngx_http_request_t *r,
    const char *script, size_t script_len, const char *hex,
    const char **argv, size_t *argvlen);
static void ngx_http_anythingllm_conv_taken(void *data,
    ngx_http_anythingllm_redis_reply_t *rep);
static void ngx_http_anythingllm_conv_flush_event(ngx_event_t *ev);
static void ngx_http_anythingllm_conv_flush(
    ngx_http_anythingllm_conv_batch_t *batch);
static void ngx_http_anythingllm_conv_stored(void *data,
    ngx_http_anythingllm_redis_reply_t *rep);


/*
 * <prefix>conv:<digest of the earlier messages>, read and deleted at
 * once: a session goes on along one branch only.  Two conversations
 * that began alike, or a turn sent again, cannot both continue it; the
 * second starts a new session.
 */

ngx_int_t
ngx_http_anythingllm_conv_lookup(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, ngx_http_anythingllm_conv_done_pt done)
{
    const char                        *argv[6];
    size_t                             argvlen[6];
    alm_chat_req_t                    *chat;
    ngx_http_anythingllm_main_conf_t  *amcf;

    chat = ctx->chat;
    amcf = ngx_http_get_module_main_conf(r, ngx_http_anythingllm_module);

    if (!chat->has_history || amcf->redis_addr.len == 0
        || amcf->conversation_ttl <= 0 || amcf->conversation_max == 0)
    {
        return NGX_DECLINED;
    }

    if (ngx_http_anythingllm_conv_eval(r, NGX_HTTP_ANYTHINGLLM_TAKE_SCRIPT,
                                       sizeof(NGX_HTTP_ANYTHINGLLM_TAKE_SCRIPT)
                                       - 1, chat->prefix_hex, argv, argvlen)
        != NGX_OK)
    {
        return NGX_DECLINED;
    }

    argv[5] = chat->prefix_hex;
    argvlen[5] = ALM_DIGEST_HEX_LEN;

    ctx->conv_done = done;
    ctx->conv_pending = ngx_http_anythingllm_redis_command(
                                           ngx_http_anythingllm_conv_taken,
                                           r, 6, argv, argvlen);

    if (ctx->conv_pending == NULL) {
        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "anythingllm: conversation lookup not possible, "
                      "Redis is unreachable: a new session is started");

        return NGX_DECLINED;
    }

    return NGX_AGAIN;
}


/*
 * The Redis reply to the conversation lookup.  The request is alive:
 * its cleanup, set by the OpenAI handler before the body is read,
 * cancels the command before the request goes away.
 */

static void
ngx_http_anythingllm_conv_taken(void *data,
    ngx_http_anythingllm_redis_reply_t *rep)
{
    ngx_http_request_t *r = data;

    u_char                       ch;
    size_t                       i;
    ngx_connection_t            *c;
    ngx_http_anythingllm_ctx_t  *ctx;

    c = r->connection;
    ctx = ngx_http_get_module_ctx(r, ngx_http_anythingllm_module);

    ctx->conv_pending = NULL;

    if (rep->type == NGX_HTTP_ANYTHINGLLM_REDIS_STRING && rep->str.len > 0
        && rep->str.len <= NGX_HTTP_ANYTHINGLLM_SESSION_MAX)
    {
        for (i = 0; i < rep->str.len; i++) {
            ch = rep->str.data[i];

            if (!((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'z')
                  || (ch >= 'A' && ch <= 'Z') || ch == '-'))
            {
                break;
            }
        }

        if (i == rep->str.len) {
            ctx->session_id.data = ngx_pnalloc(r->pool, rep->str.len);

            if (ctx->session_id.data) {
                ngx_memcpy(ctx->session_id.data, rep->str.data,
                           rep->str.len);
                ctx->session_id.len = rep->str.len;
                ctx->continuing = 1;
            }
        }

    } else if (rep->type == NGX_HTTP_ANYTHINGLLM_REDIS_NONE
               || rep->type == NGX_HTTP_ANYTHINGLLM_REDIS_ERROR)
    {
        ngx_log_error(NGX_LOG_INFO, c->log, 0,
                      "anythingllm: conversation lookup failed: "
                      "a new session is started");
    }

    ngx_log_debug1(NGX_LOG_DEBUG_HTTP, c->log, 0,
                   "anythingllm conversation %s",
                   ctx->continuing ? "continued" : "not found");

    ctx->conv_done(r, ctx);

    ngx_http_run_posted_requests(c);
}


/*
 * The first five words of the lookup's EVAL: the script, and its two
 * keys "<prefix>conv:<hex>" (the record) and "<prefix>convs" (the
 * index).
 */

static ngx_int_t
ngx_http_anythingllm_conv_eval(ngx_http_request_t *r, const char *script,
    size_t script_len, const char *hex, const char **argv, size_t *argvlen)
{
    ngx_str_t                          record, index;
    ngx_http_anythingllm_main_conf_t  *amcf;

    amcf = ngx_http_get_module_main_conf(r, ngx_http_anythingllm_module);

    if (ngx_http_anythingllm_redis_key(r->pool, &amcf->prefix, "conv:", hex,
                                       0, &record)
        != NGX_OK
        || ngx_http_anythingllm_redis_key(r->pool, &amcf->prefix, "convs",
                                          NULL, 0, &index)
           != NGX_OK)
    {
        return NGX_ERROR;
    }

    argv[0] = "EVAL";
    argvlen[0] = sizeof("EVAL") - 1;
    argv[1] = script;
    argvlen[1] = script_len;
    argv[2] = "2";
    argvlen[2] = 1;
    argv[3] = (const char *) record.data;
    argvlen[3] = record.len;
    argv[4] = (const char *) index.data;
    argvlen[4] = index.len;

    return NGX_OK;
}


/*
 * Stores "<prefix>conv:<digest of every message and the answer>" ->
 * session id, so that the next turn of this conversation continues
 * the session, within the cap of anythingllm_conversation_max (see
 * NGX_HTTP_ANYTHINGLLM_STORE_SCRIPT).  Nothing waits for the reply: a
 * store that fails leaves the next turn to the transcript.
 *
 * The store joins the worker's batch, sent as one command when the
 * event loop has handled the turn's events (a posted event), or at
 * once when the batch is full.  The answer has not reached its client
 * before then, so the next turn's lookup, made later on the same
 * connection to Redis, comes after the store.
 */

void
ngx_http_anythingllm_conv_store(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx)
{
    ngx_http_anythingllm_main_conf_t   *amcf;
    ngx_http_anythingllm_conv_entry_t  *e;
    ngx_http_anythingllm_conv_batch_t  *batch;

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

    batch = &ngx_http_anythingllm_conv_batch;

    if (batch->n && batch->amcf != amcf) {
        ngx_http_anythingllm_conv_flush(batch);
    }

    batch->amcf = amcf;

    e = &batch->entries[batch->n++];

    alm_conv_hash_hex(&ctx->chat->full, (char *) e->hex);
    ngx_memcpy(e->session, ctx->session_id.data, ctx->session_id.len);
    e->session_len = ctx->session_id.len;

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "anythingllm conversation to store: \"%*s\"",
                   (size_t) ALM_DIGEST_HEX_LEN, e->hex);

    if (batch->n == NGX_HTTP_ANYTHINGLLM_STORE_BATCH) {
        ngx_http_anythingllm_conv_flush(batch);
        return;
    }

    ngx_http_anythingllm_post_turn_end(&batch->event,
                                       ngx_http_anythingllm_conv_flush_event,
                                       batch);
}


static void
ngx_http_anythingllm_conv_flush_event(ngx_event_t *ev)
{
    ngx_http_anythingllm_conv_flush(ev->data);
}


/* one EVAL for every store of the batch; the batch is empty after it */

static void
ngx_http_anythingllm_conv_flush(ngx_http_anythingllm_conv_batch_t *batch)
{
    u_char                             *keys, *p;
    u_char                              num[NGX_INT_T_LEN
                                            + 3 * NGX_TIME_T_LEN + 4];
    size_t                              rec_len;
    size_t                              argvlen[
                                            NGX_HTTP_ANYTHINGLLM_STORE_ARGS];
    ngx_uint_t                          i, n, argc;
    const char                         *argv[
                                            NGX_HTTP_ANYTHINGLLM_STORE_ARGS];
    ngx_http_anythingllm_main_conf_t   *amcf;
    ngx_http_anythingllm_conv_entry_t  *e;

    n = batch->n;
    amcf = batch->amcf;
    batch->n = 0;

    if (batch->event.posted) {
        ngx_delete_posted_event(&batch->event);
    }

    if (n == 0) {
        return;
    }

    /* "<prefix>convs", then "<prefix>conv:<hex>" for each store */

    rec_len = amcf->prefix.len + sizeof("conv:") - 1 + ALM_DIGEST_HEX_LEN;

    keys = ngx_alloc(amcf->prefix.len + sizeof("convs") - 1 + n * rec_len,
                     ngx_cycle->log);
    if (keys == NULL) {
        return;
    }

    argv[0] = "EVAL";
    argvlen[0] = sizeof("EVAL") - 1;
    argv[1] = NGX_HTTP_ANYTHINGLLM_STORE_SCRIPT;
    argvlen[1] = sizeof(NGX_HTTP_ANYTHINGLLM_STORE_SCRIPT) - 1;

    p = keys;
    argv[3] = (const char *) p;
    p = ngx_cpymem(p, amcf->prefix.data, amcf->prefix.len);
    p = ngx_cpymem(p, "convs", sizeof("convs") - 1);
    argvlen[3] = p - (u_char *) argv[3];

    argc = 4;

    for (i = 0; i < n; i++) {
        argv[argc] = (const char *) p;
        argvlen[argc++] = rec_len;

        p = ngx_cpymem(p, amcf->prefix.data, amcf->prefix.len);
        p = ngx_cpymem(p, "conv:", sizeof("conv:") - 1);
        p = ngx_cpymem(p, batch->entries[i].hex, ALM_DIGEST_HEX_LEN);
    }

    /* numkeys: the index and the records */

    p = num;
    argv[2] = (const char *) p;
    p = ngx_sprintf(p, "%ui", n + 1);
    argvlen[2] = p - (u_char *) argv[2];

    /* ttl, cap and now, one after the other in num */

    argv[argc] = (const char *) p;
    p = ngx_sprintf(p, "%T", amcf->conversation_ttl);
    argvlen[argc] = p - (u_char *) argv[argc];
    argc++;

    argv[argc] = (const char *) p;
    p = ngx_sprintf(p, "%i", amcf->conversation_max);
    argvlen[argc] = p - (u_char *) argv[argc];
    argc++;

    argv[argc] = (const char *) p;
    p = ngx_sprintf(p, "%T", ngx_time());
    argvlen[argc] = p - (u_char *) argv[argc];
    argc++;

    /* the records' key prefix: the first record's key without its hex */

    argv[argc] = argv[4];
    argvlen[argc++] = rec_len - ALM_DIGEST_HEX_LEN;

    for (i = 0; i < n; i++) {
        e = &batch->entries[i];

        argv[argc] = (const char *) e->session;
        argvlen[argc++] = e->session_len;
        argv[argc] = (const char *) e->hex;
        argvlen[argc++] = ALM_DIGEST_HEX_LEN;
    }

    if (ngx_http_anythingllm_redis_command(ngx_http_anythingllm_conv_stored,
                                           NULL, (int) argc, argv, argvlen)
        == NULL)
    {
        ngx_log_error(NGX_LOG_INFO, ngx_cycle->log, 0,
                      "anythingllm: %ui conversation(s) not stored, "
                      "Redis is unreachable", n);

    } else {
        ngx_log_debug1(NGX_LOG_DEBUG_HTTP, ngx_cycle->log, 0,
                       "anythingllm conversations stored: %ui", n);
    }

    ngx_free(keys);
}


/*
 * A store that Redis refused (an OOM error under maxmemory, a script
 * error) or did not answer in time.  The client never learns of it;
 * the operator does, once a minute per worker at most, since under a
 * full Redis every completion fails alike.
 */

static void
ngx_http_anythingllm_conv_stored(void *data,
    ngx_http_anythingllm_redis_reply_t *rep)
{
    size_t       len;
    time_t       now;
    const char  *why;

    static time_t  logged;

    if (rep->type != NGX_HTTP_ANYTHINGLLM_REDIS_NONE
        && rep->type != NGX_HTTP_ANYTHINGLLM_REDIS_ERROR)
    {
        return;
    }

    now = ngx_time();

    if (logged && now - logged < NGX_HTTP_ANYTHINGLLM_STORE_LOG_EVERY) {
        return;
    }

    logged = now;

    if (rep->type == NGX_HTTP_ANYTHINGLLM_REDIS_ERROR) {
        why = (const char *) rep->str.data;
        len = ngx_min(rep->str.len, 200);

    } else {
        why = "no answer in time, or the connection was lost";
        len = ngx_strlen(why);
    }

    ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                  "anythingllm: conversations could not be stored "
                  "(Redis: %*s); clients go on in transcript mode",
                  len, why);
}
