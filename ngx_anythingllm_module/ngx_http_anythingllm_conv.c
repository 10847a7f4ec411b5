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
 * Conversations in Redis: the hash "<prefix>conv" maps each stored
 * <hex> to its session id; the sorted set "<prefix>conv:until" holds
 * every stored <hex>, scored by the time its record expires (its store
 * plus anythingllm_conversation_ttl).  A record whose time has passed
 * is never continued.  The set bounds the records to
 * anythingllm_conversation_max, and both keys expire the TTL after the
 * last store, so nothing outlives a quiet TTL.
 *
 * The stores of one turn of the worker's event loop go to Redis
 * together, as one script run (see ngx_http_anythingllm_conv_store()).
 * When the set has room for every store of the run, one HSET writes
 * every record and one ZADD adds every entry: Redis's cost is one
 * command for the run, not one a record.  Otherwise the script takes
 * them one after the other, each taking its own entry out of the set
 * first (a conversation stored again).  A store that finds the set
 * with room adds its entry and is done.  One that would take the set
 * past the cap first drops the records of the lowest scores beyond
 * the cap, then adds its own.  It all runs in one script, so no
 * client ever sees the count above the cap.
 *
 * Records whose time has passed stay until the set is full (or the
 * keys expire): theirs are the lowest scores, so the full path drops
 * them before any live record.
 *
 * An HSET is the script's first write on purpose: under maxmemory with
 * "noeviction", Redis refuses a script's first write that needs memory
 * (OOM, and the script changes nothing), but lets a script that has
 * already written go on.  A full Redis thus gets no record, rather
 * than one more; a script that starts just below maxmemory may write
 * its few records (at most NGX_HTTP_ANYTHINGLLM_STORE_BATCH) past it.
 * Other keys (key records, rate-limit counters) are never touched.
 *
 * KEYS: the index, the records.  ARGV: ttl, cap, now, then the <hex>
 * and the session id of each record in turn.
 */

#define NGX_HTTP_ANYTHINGLLM_STORE_SCRIPT                                     \
    "local idx, rec, ttl, cap = KEYS[1], KEYS[2], ARGV[1], "                 \
    "tonumber(ARGV[2]) "                                                     \
    "local at = tonumber(ARGV[3]) + tonumber(ttl) "                          \
    "if redis.call('ZCARD', idx) + (#ARGV - 3) / 2 <= cap then "             \
    "redis.call('HSET', rec, unpack(ARGV, 4)) "                              \
    "local z = {} "                                                          \
    "for i = 4, #ARGV, 2 do z[i - 3], z[i - 2] = at, ARGV[i] end "           \
    "redis.call('ZADD', idx, unpack(z)) "                                    \
    "else "                                                                  \
    "for i = 4, #ARGV, 2 do "                                                \
    "local h = ARGV[i] "                                                     \
    "redis.call('HSET', rec, h, ARGV[i + 1]) "                               \
    "redis.call('ZREM', idx, h) "                                            \
    "local over = redis.call('ZCARD', idx) + 1 - cap "                       \
    "if over > 0 then "                                                      \
    "local old = redis.call('ZRANGE', idx, 0, over - 1) "                    \
    "for k = 1, #old do redis.call('HDEL', rec, old[k]) end "                \
    "redis.call('ZREMRANGEBYRANK', idx, 0, over - 1) "                       \
    "end "                                                                   \
    "redis.call('ZADD', idx, at, h) "                                        \
    "end "                                                                   \
    "end "                                                                   \
    "redis.call('EXPIRE', idx, ttl) "                                        \
    "redis.call('EXPIRE', rec, ttl) "                                        \
    "return (#ARGV - 3) / 2"

/* the most stores sent in one script run */
#define NGX_HTTP_ANYTHINGLLM_STORE_BATCH  32

/* EVAL, script, numkeys, index, records, ttl, cap, now; 2 a store */
#define NGX_HTTP_ANYTHINGLLM_STORE_ARGS                                       \
    (8 + 2 * NGX_HTTP_ANYTHINGLLM_STORE_BATCH)


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
 * The record read and deleted with its index entry, and given only if
 * its time has not passed.  KEYS: records, index.  ARGV: <hex>, now.
 */

#define NGX_HTTP_ANYTHINGLLM_TAKE_SCRIPT                                      \
    "local v = redis.call('HGET', KEYS[1], ARGV[1]) "                         \
    "if v then "                                                              \
    "local at = redis.call('ZSCORE', KEYS[2], ARGV[1]) "                      \
    "redis.call('HDEL', KEYS[1], ARGV[1]) "                                   \
    "redis.call('ZREM', KEYS[2], ARGV[1]) "                                   \
    "if not at or tonumber(at) <= tonumber(ARGV[2]) then return false end "   \
    "end "                                                                    \
    "return v"

/* a failed store is logged at most this often (seconds) per worker */
#define NGX_HTTP_ANYTHINGLLM_STORE_LOG_EVERY  60


static void ngx_http_anythingllm_conv_taken(void *data,
    ngx_http_anythingllm_redis_reply_t *rep);
static void ngx_http_anythingllm_conv_flush_event(ngx_event_t *ev);
static void ngx_http_anythingllm_conv_flush(
    ngx_http_anythingllm_conv_batch_t *batch);
static void ngx_http_anythingllm_conv_stored(void *data,
    ngx_http_anythingllm_redis_reply_t *rep);


/*
 * The record of the digest of the earlier messages, read and deleted
 * at once: a session goes on along one branch only.  Two conversations
 * that began alike, or a turn sent again, cannot both continue it; the
 * second starts a new session.
 */

ngx_int_t
ngx_http_anythingllm_conv_lookup(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, ngx_http_anythingllm_conv_done_pt done)
{
    u_char                             now[NGX_TIME_T_LEN];
    const char                        *argv[7];
    size_t                             argvlen[7];
    alm_chat_req_t                    *chat;
    ngx_http_anythingllm_main_conf_t  *amcf;

    chat = ctx->chat;
    amcf = ngx_http_get_module_main_conf(r, ngx_http_anythingllm_module);

    if (!chat->has_history || amcf->redis_addr.len == 0
        || amcf->conversation_ttl <= 0 || amcf->conversation_max == 0)
    {
        return NGX_DECLINED;
    }

    ngx_http_anythingllm_redis_eval2(argv, argvlen,
                                     NGX_HTTP_ANYTHINGLLM_TAKE_SCRIPT,
                                     sizeof(NGX_HTTP_ANYTHINGLLM_TAKE_SCRIPT)
                                     - 1, &amcf->conv_records,
                                     &amcf->conv_index);
    argv[5] = chat->prefix_hex;
    argvlen[5] = ALM_DIGEST_HEX_LEN;
    argv[6] = (const char *) now;
    argvlen[6] = ngx_sprintf(now, "%T", ngx_time()) - now;

    ctx->conv_done = done;
    ctx->conv_pending = ngx_http_anythingllm_redis_command(
                                           ngx_http_anythingllm_conv_taken,
                                           r, 7, argv, argvlen);

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
 * Stores <digest of every message and the answer> -> session id, so
 * that the next turn of this conversation continues the session,
 * within the cap of anythingllm_conversation_max (see
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
    u_char                             *p;
    u_char                              num[NGX_INT_T_LEN
                                            + 2 * NGX_TIME_T_LEN];
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

    ngx_http_anythingllm_redis_eval2(argv, argvlen,
                                     NGX_HTTP_ANYTHINGLLM_STORE_SCRIPT,
                                     sizeof(NGX_HTTP_ANYTHINGLLM_STORE_SCRIPT)
                                     - 1, &amcf->conv_index,
                                     &amcf->conv_records);

    /* ttl, cap and now, one after the other in num */

    p = num;

    argv[5] = (const char *) p;
    p = ngx_sprintf(p, "%T", amcf->conversation_ttl);
    argvlen[5] = p - (u_char *) argv[5];

    argv[6] = (const char *) p;
    p = ngx_sprintf(p, "%i", amcf->conversation_max);
    argvlen[6] = p - (u_char *) argv[6];

    argv[7] = (const char *) p;
    p = ngx_sprintf(p, "%T", ngx_time());
    argvlen[7] = p - (u_char *) argv[7];

    argc = 8;

    for (i = 0; i < n; i++) {
        e = &batch->entries[i];

        argv[argc] = (const char *) e->hex;
        argvlen[argc++] = ALM_DIGEST_HEX_LEN;
        argv[argc] = (const char *) e->session;
        argvlen[argc++] = e->session_len;
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
