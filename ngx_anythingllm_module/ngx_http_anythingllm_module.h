/*
 * Copyright (C) ngx_anythingllm authors
 *
 * Shared declarations of the nginx glue.  One file per concern; a file
 * calls only those below it in this list, never one above:
 *
 *   ngx_http_anythingllm_module.c    directives, configuration,
 *                                    variables, handler registration,
 *                                    process init and exit
 *   ngx_http_anythingllm_filter.c    response header and body filters
 *   ngx_http_anythingllm_upstream.c  precontent phase: upstream key
 *                                    injection, conditionals dropped
 *   ngx_http_anythingllm_openai.c    OpenAI routes, request body rewrite
 *   ngx_http_anythingllm_conv.c      conversations in Redis: lookup and
 *                                    store
 *   ngx_http_anythingllm_auth.c      access phase: key, scope, rpm
 *   ngx_http_anythingllm_rate.c      the rpm: counted in Redis, or from
 *                                    a lease of the minute's quota
 *   ngx_http_anythingllm_lease.c     the leases, in the key cache's
 *                                    entries
 *   ngx_http_anythingllm_usage.c     usage in Redis, token limits,
 *                                    rate-limit headers, the auth answer
 *   ngx_http_anythingllm_cors.c      CORS preflight and headers
 *   ngx_http_anythingllm_cache.c     shared-memory key cache,
 *                                    revocations
 *   ngx_http_anythingllm_redis.c     the Redis connections of a worker
 *   ngx_http_anythingllm_sentinel.c  Redis Sentinel: the primary found
 *   ngx_http_anythingllm_redis_io.c  hiredis on nginx's event loop
 *   ngx_http_anythingllm_redis_conf.c  anythingllm_redis, the names of
 *                                    Redis keys
 *   ngx_http_anythingllm_util.c      per-request helpers: context,
 *                                    error answers, headers
 *   ngx_http_anythingllm_metrics.c   the metrics zone and its answer
 *   ngx_http_anythingllm_shm.c       the module's shared-memory zones:
 *                                    added, found again on a reload
 */


#ifndef _NGX_HTTP_ANYTHINGLLM_MODULE_H_INCLUDED_
#define _NGX_HTTP_ANYTHINGLLM_MODULE_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "alm_core.h"


/* ------------------------------------------------------------------ */
/* configuration                                                      */

/* anythingllm_conversation_max: about 5 MB of Redis at this count */
#define NGX_HTTP_ANYTHINGLLM_CONVERSATION_MAX  10000

/* a shared-memory zone of the module: its data and slab pool */
typedef struct {
    void                       *sh;             /* shpool->data */
    ngx_slab_pool_t            *shpool;
} ngx_http_anythingllm_shm_t;

/* an IP literal and port of anythingllm_redis */
typedef struct {
    ngx_str_t                   addr;           /* as written */
    u_char                     *host;           /* IP literal, NUL */
    ngx_int_t                   port;
} ngx_http_anythingllm_redis_addr_t;

typedef struct {
    /* anythingllm_redis */
    ngx_str_t                   redis_addr;     /* as written (the
                                                   sentinel= list for a
                                                   Sentinel group);
                                                   empty: none */
    ngx_str_t                   redis_unix;     /* unix socket path, NUL */
    ngx_str_t                   redis_host;     /* IP literal, NUL */
    ngx_int_t                   redis_port;
    ngx_int_t                   redis_db;
    ngx_str_t                   redis_user;     /* ACL user, or none */
    ngx_str_t                   redis_password;
    ngx_array_t                *sentinels;      /* of redis_addr_t; NULL:
                                                   a single address */
    ngx_str_t                   redis_master;   /* the group's name */
    ngx_str_t                   sentinel_user;
    ngx_str_t                   sentinel_password;
    ngx_msec_t                  redis_timeout;
    ngx_str_t                   prefix;
    ngx_str_t                   revocations;    /* "<prefix>revocations" */
    ngx_flag_t                  redis_used;     /* auth or openai is on */

    /* anythingllm_key_cache */
    ngx_shm_zone_t             *cache_zone;
    time_t                      cache_valid;
    time_t                      cache_invalid;
    ngx_http_anythingllm_shm_t  cache;

    /* anythingllm_conversation_ttl, anythingllm_conversation_max */
    time_t                      conversation_ttl;
    ngx_int_t                   conversation_max;
    ngx_str_t                   conv_records;   /* "<prefix>conv" */
    ngx_str_t                   conv_index;     /* "<prefix>conv:until" */

    /* anythingllm_metrics_zone, anythingllm_metrics */
    ngx_shm_zone_t             *metrics_zone;
    ngx_http_anythingllm_shm_t  metrics;
    ngx_flag_t                  metrics_used;   /* a location answers */
} ngx_http_anythingllm_main_conf_t;


typedef struct {
    ngx_str_t                   upstream_key;   /* "Bearer <key>" */
    ngx_flag_t                  auth;
    ngx_flag_t                  auth_fail_open;
    ngx_str_t                   cors;           /* origin or "*" */
    ngx_flag_t                  openai;
    ngx_uint_t                  chat_mode;      /* alm_mode_e */
    size_t                      max_frame;      /* SSE frame bound */
    size_t                      max_response;   /* buffered JSON bound */
    ngx_flag_t                  enabled;        /* any of the above acts */
} ngx_http_anythingllm_loc_conf_t;


/* ------------------------------------------------------------------ */
/* per-request state                                                  */

typedef enum {
    NGX_HTTP_ANYTHINGLLM_AUTH_NONE = 0,
    NGX_HTTP_ANYTHINGLLM_AUTH_CACHED,
    NGX_HTTP_ANYTHINGLLM_AUTH_REDIS,
    NGX_HTTP_ANYTHINGLLM_AUTH_FAIL_OPEN,
    NGX_HTTP_ANYTHINGLLM_AUTH_DENIED_MISSING,
    NGX_HTTP_ANYTHINGLLM_AUTH_DENIED_UNKNOWN,
    NGX_HTTP_ANYTHINGLLM_AUTH_DENIED_EXPIRED,
    NGX_HTTP_ANYTHINGLLM_AUTH_DENIED_DISABLED,
    NGX_HTTP_ANYTHINGLLM_AUTH_DENIED_SCOPE,
    NGX_HTTP_ANYTHINGLLM_AUTH_DENIED_WORKSPACE,
    NGX_HTTP_ANYTHINGLLM_AUTH_DENIED_PATH,
    NGX_HTTP_ANYTHINGLLM_AUTH_RATE_LIMITED,
    NGX_HTTP_ANYTHINGLLM_AUTH_REDIS_ERROR
} ngx_http_anythingllm_auth_result_e;


/* the key as judged: what the rest of the request may rely on */

typedef struct {
    char                        digest[ALM_DIGEST_HEX_LEN];
    ngx_str_t                   name;
    unsigned                    scopes;
    ngx_str_t                   workspaces;     /* "*" or comma list */
    ngx_uint_t                  rpm;
    ngx_uint_t                  tpm;            /* tokens a minute */
    ngx_uint_t                  tpd;            /* tokens a UTC day */
    time_t                      expires;
    unsigned                    disabled:1;
    unsigned                    valid:1;        /* digest is set */
} ngx_http_anythingllm_key_t;


/* a key's use read from Redis before its request goes upstream */

typedef struct {
    int64_t                     requests;       /* today's (UTC) */
    int64_t                     prompt_tokens;
    int64_t                     completion_tokens;
    int64_t                     minute_tokens;  /* this minute's */
} ngx_http_anythingllm_used_t;


typedef enum {
    NGX_HTTP_ANYTHINGLLM_RESP_NONE = 0,     /* pass through untouched */
    NGX_HTTP_ANYTHINGLLM_RESP_WORKSPACES,   /* filter the workspace list */
    NGX_HTTP_ANYTHINGLLM_RESP_MODELS,       /* workspaces -> models */
    NGX_HTTP_ANYTHINGLLM_RESP_MODEL,        /* workspaces -> one model */
    NGX_HTTP_ANYTHINGLLM_RESP_CHAT,         /* chat -> chat.completion */
    NGX_HTTP_ANYTHINGLLM_RESP_STREAM        /* stream-chat -> chunks */
} ngx_http_anythingllm_resp_e;


typedef struct ngx_http_anythingllm_redis_req_s
    ngx_http_anythingllm_redis_req_t;

typedef struct ngx_http_anythingllm_ctx_s  ngx_http_anythingllm_ctx_t;

typedef struct ngx_http_anythingllm_lookup_s  ngx_http_anythingllm_lookup_t;

typedef struct ngx_http_anythingllm_rate_fetch_s
    ngx_http_anythingllm_rate_fetch_t;

/* the conversation lookup is answered: session_id and continuing set */
typedef void (*ngx_http_anythingllm_conv_done_pt)(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx);


struct ngx_http_anythingllm_ctx_s {
    /* auth (ngx_http_anythingllm_auth.c) */
    ngx_http_anythingllm_auth_result_e  auth_result;
    ngx_int_t                   auth_status;    /* verdict once known */
    ngx_http_anythingllm_key_t  key;
    ngx_str_t                   workspace;      /* slug judged, if any */
    ngx_http_anythingllm_redis_req_t  *pending; /* rate count in flight */
    ngx_http_anythingllm_lookup_t     *lookup;  /* key lookup awaited */
    ngx_queue_t                 lookup_link;    /* in lookup->waiting */
    ngx_http_request_t         *request;        /* of a lookup's waiter */
    time_t                      retry_after;
    ngx_msec_t                  lookup_started;
    unsigned                    need_scope;     /* ALM_SCOPE_* */
    unsigned                    auth_route:4;   /* alm_route_kind_e */
    unsigned                    auth_global:1;  /* needs workspaces * */
    unsigned                    auth_done:1;
    unsigned                    auth_waiting:1;
    unsigned                    auth_cleanup:1; /* cleanups are set */
    unsigned                    rate_refused:1; /* Redis refused INCR */
    unsigned                    key_replaced:1; /* upstream key is set */
    unsigned                    native_chat:2;  /* alm_chat_call_e */
    unsigned                    rate_counted:1; /* rate_used is set */
    unsigned                    rate_cleanup:1; /* its cleanup is set */
    ngx_uint_t                  rate_used;      /* requests this minute */
    ngx_http_anythingllm_rate_fetch_t  *lease_wait; /* lease awaited */

    /* openai (ngx_http_anythingllm_openai.c) */
    alm_chat_req_t             *chat;
    ngx_str_t                   model;
    ngx_str_t                   session_id;
    ngx_str_t                   completion_id;  /* "chatcmpl-..." */
    time_t                      created;
    ngx_int_t                   openai_status;  /* verdict once known */
    alm_error_t                *openai_error;   /* verdict: this error */
    ngx_http_anythingllm_redis_req_t  *conv_pending; /* session lookup */
    ngx_http_anythingllm_conv_done_pt  conv_done; /* lookup answered */
    unsigned                    openai_done:1;
    unsigned                    openai_waiting:1;
    unsigned                    body_read:1;
    unsigned                    continuing:1;   /* known session */
    unsigned                    conv_stored:1;

    /* response filter (ngx_http_anythingllm_filter.c) */
    ngx_http_anythingllm_resp_e resp;
    void                       *filter;         /* filter's own state */
    alm_usage_t                 usage;
    ngx_uint_t                  pieces;         /* text pieces streamed */
    ngx_msec_t                  first_token;    /* ms after the request
                                                   started; valid when
                                                   first_token_set */
    unsigned                    first_token_set:1;

    /* usage (ngx_http_anythingllm_usage.c) */
    void                       *usage_read;     /* native answer read */
    ngx_http_anythingllm_used_t used;           /* valid when used_known */
    ngx_http_anythingllm_redis_req_t  *used_pending;
    time_t                      used_retry;     /* a token limit refused */
    unsigned                    used_asked:1;
    unsigned                    used_known:1;
    unsigned                    used_refused:1;
    unsigned                    used_cleanup:1;
};


extern ngx_module_t  ngx_http_anythingllm_module;


/* ngx_http_anythingllm_redis_conf.c */

char *ngx_http_anythingllm_redis(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);

/*
 * "<prefix><name>", then the digest when not NULL, in "pool" with
 * "room" more bytes allocated after it for the caller to append.
 */
ngx_int_t ngx_http_anythingllm_redis_key(ngx_pool_t *pool,
    ngx_str_t *prefix, const char *name, const char *digest, size_t room,
    ngx_str_t *key);


/* ngx_http_anythingllm_util.c */

ngx_http_anythingllm_ctx_t *ngx_http_anythingllm_get_ctx(
    ngx_http_request_t *r);

/* the body of an OpenAI-shaped error, ended by a newline, in "pool" */
ngx_int_t ngx_http_anythingllm_error_body(ngx_pool_t *pool,
    const char *message, const char *type, const char *param,
    const char *code, ngx_str_t *body);

/*
 * Sends an OpenAI-shaped error and returns what ngx_http_output_filter()
 * returned: for use where the caller finalizes the request itself.
 */
ngx_int_t ngx_http_anythingllm_send_error(ngx_http_request_t *r,
    ngx_uint_t status, const char *message, const char *type,
    const char *param, const char *code);

/*
 * Sends an OpenAI-shaped error, finalizes the request and returns
 * NGX_DONE: what an access or precontent phase handler returns.
 */
ngx_int_t ngx_http_anythingllm_error(ngx_http_request_t *r,
    ngx_uint_t status, const char *message, const char *type,
    const char *param, const char *code);
ngx_int_t ngx_http_anythingllm_alm_error(ngx_http_request_t *r,
    alm_error_t *err);

/* handler(ev) at the end of the event loop's turn, posted once */
void ngx_http_anythingllm_post_turn_end(ngx_event_t *ev,
    ngx_event_handler_pt handler, void *data);

/* sends the headers as set, then b as the whole body */
ngx_int_t ngx_http_anythingllm_send_buf(ngx_http_request_t *r, ngx_buf_t *b);
ngx_buf_t *ngx_http_anythingllm_body_buf(ngx_pool_t *pool, ngx_str_t *body);

/* adds a response header; "key" must outlive the request */
ngx_table_elt_t *ngx_http_anythingllm_push_header(ngx_http_request_t *r,
    const char *key, ngx_str_t *value);

ngx_table_elt_t *ngx_http_anythingllm_next_header(ngx_list_part_t **part,
    ngx_uint_t *i);

/* ngx_http_anythingllm_set_header() flags */
#define NGX_HTTP_ANYTHINGLLM_HEADER_ADD   0x01  /* add one when none */
#define NGX_HTTP_ANYTHINGLLM_HEADER_OUT   0x02  /* of the response */

ngx_int_t ngx_http_anythingllm_set_header(ngx_http_request_t *r,
    ngx_table_elt_t **slot, const char *name, const char *lowcase,
    ngx_str_t *value, ngx_uint_t flags);
ngx_int_t ngx_http_anythingllm_identity_encoding(ngx_http_request_t *r);

ngx_int_t ngx_http_anythingllm_cleanup_add(ngx_pool_t *pool,
    ngx_pool_cleanup_pt handler, void *data);
/* handler(data) when the request is terminated and when its pool goes */
ngx_int_t ngx_http_anythingllm_cleanup_request(ngx_http_request_t *r,
    ngx_pool_cleanup_pt handler, void *data);
/* free(p) when "pool" goes; NGX_ERROR: p is freed at once */
ngx_int_t ngx_http_anythingllm_free_on_cleanup(ngx_pool_t *pool, void *p);


/* ngx_http_anythingllm_redis.c */

/* what Redis answered, read from hiredis's reply */

typedef enum {
    NGX_HTTP_ANYTHINGLLM_REDIS_NONE = 0,    /* error, timeout, disconnect */
    NGX_HTTP_ANYTHINGLLM_REDIS_ERROR,       /* "str": the error, or "out
                                               of memory" when the reply
                                               could not be read */
    NGX_HTTP_ANYTHINGLLM_REDIS_STRING,      /* "str" */
    NGX_HTTP_ANYTHINGLLM_REDIS_INTEGER,     /* "integer" */
    NGX_HTTP_ANYTHINGLLM_REDIS_ARRAY,       /* "elts", "nelts" */
    NGX_HTTP_ANYTHINGLLM_REDIS_OTHER        /* nil, status */
} ngx_http_anythingllm_redis_type_e;

typedef struct {
    ngx_http_anythingllm_redis_type_e  type;
    ngx_str_t                   str;
    long long                   integer;
    ngx_str_t                  *elts;       /* an element not a string:
                                               data NULL */
    size_t                      nelts;
} ngx_http_anythingllm_redis_reply_t;

/*
 * Callback for a Redis command.  It runs at most once and never after
 * ngx_http_anythingllm_redis_cancel(); the reply and its strings are
 * only valid while it runs.
 */
typedef void (*ngx_http_anythingllm_redis_handler_pt)(void *data,
    ngx_http_anythingllm_redis_reply_t *reply);

/*
 * A message of the revocations channel, or NULL when the channel was
 * subscribed again after it had been lost.
 */
typedef void (*ngx_http_anythingllm_redis_sub_pt)(
    ngx_http_anythingllm_main_conf_t *amcf, ngx_str_t *message);

ngx_int_t ngx_http_anythingllm_redis_init_process(ngx_cycle_t *cycle,
    ngx_http_anythingllm_redis_sub_pt sub_handler);
void ngx_http_anythingllm_redis_exit_process(ngx_cycle_t *cycle);

/*
 * Sends a command (argv style) on the worker's connection (pipelined;
 * while it is being made, the command waits for it, within the same
 * timeout).  Returns a handle for _cancel(), or NULL when Redis is not
 * reachable now.  The handler may be NULL (no answer wanted).
 */
ngx_http_anythingllm_redis_req_t *ngx_http_anythingllm_redis_command(
    ngx_http_anythingllm_redis_handler_pt handler, void *data,
    int argc, const char **argv, const size_t *argvlen);
void ngx_http_anythingllm_redis_cancel(
    ngx_http_anythingllm_redis_req_t **rrp);
/* changes whenever the commands sent so far are written to Redis */
ngx_uint_t ngx_http_anythingllm_redis_writes(void);
/* argv[0..4] of "EVAL <script> 2 <key1> <key2>" */
void ngx_http_anythingllm_redis_eval2(const char **argv, size_t *argvlen,
    const char *script, size_t script_len, ngx_str_t *key1, ngx_str_t *key2);


/* ngx_http_anythingllm_cache.c */

/* the zone made when anythingllm_auth is on without anythingllm_key_cache */
#define NGX_HTTP_ANYTHINGLLM_CACHE_DEFAULT_SIZE  (10 * 1024 * 1024)

char *ngx_http_anythingllm_key_cache(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
ngx_int_t ngx_http_anythingllm_cache_default_zone(ngx_conf_t *cf,
    ngx_http_anythingllm_main_conf_t *amcf);
/*
 * NGX_OK: found (key filled, name and list copied into pool),
 * NGX_DECLINED: miss, NGX_ABORT: cached negative, NGX_ERROR: no memory
 */
ngx_int_t ngx_http_anythingllm_cache_get(ngx_shm_zone_t *zone,
    const char *digest, ngx_http_anythingllm_key_t *key, ngx_pool_t *pool);
ngx_int_t ngx_http_anythingllm_cache_get_stale(ngx_shm_zone_t *zone,
    const char *digest, ngx_http_anythingllm_key_t *key, ngx_pool_t *pool);
/*
 * "since": when the Redis lookup that read the record was sent; an
 * answer never replaces an entry made of newer information
 */
void ngx_http_anythingllm_cache_put(ngx_shm_zone_t *zone,
    const ngx_http_anythingllm_key_t *key, time_t ttl, ngx_msec_t since);
void ngx_http_anythingllm_cache_put_negative(ngx_shm_zone_t *zone,
    const char *digest, time_t ttl, ngx_msec_t since);
/* "DECRBY <prefix>rl:<digest>:<minute> n", unanswered */
void ngx_http_anythingllm_cache_lease_return(
    ngx_http_anythingllm_main_conf_t *amcf, const char *digest,
    time_t minute, ngx_uint_t n);
/* entries in the zone now */
ngx_atomic_uint_t ngx_http_anythingllm_cache_entries(
    ngx_http_anythingllm_main_conf_t *amcf);
/* the handler of the revocations channel */
void ngx_http_anythingllm_cache_revocation(
    ngx_http_anythingllm_main_conf_t *amcf, ngx_str_t *message);


/* ngx_http_anythingllm_lease.c */

/*
 * A key's rpm counted from a lease of the minute's quota, held in the
 * key's cache entry (see ngx_http_anythingllm_rate.c).
 */

typedef enum {
    NGX_HTTP_ANYTHINGLLM_LEASE_COUNT = 0,   /* no lease: count alone */
    NGX_HTTP_ANYTHINGLLM_LEASE_TAKEN,       /* admitted from the lease */
    NGX_HTTP_ANYTHINGLLM_LEASE_FETCH,       /* empty: fetch one, wait */
    NGX_HTTP_ANYTHINGLLM_LEASE_SPENT        /* the minute is spent */
} ngx_http_anythingllm_lease_e;

typedef struct {
    ngx_http_anythingllm_lease_e  verdict;
    time_t                      minute;     /* in: the current minute */
    ngx_uint_t                  size;       /* a lease to fetch, or 0 */
    ngx_uint_t                  used;       /* TAKEN: the minute's count
                                               as far as it is known */
    ngx_uint_t                  gen;        /* the entry's generation */
} ngx_http_anythingllm_lease_t;

/* what a lease fetch tells the entry: ngx_http_anythingllm_lease_credit() */
#define NGX_HTTP_ANYTHINGLLM_LEASE_FAILED  0x01  /* Redis did not count */
#define NGX_HTTP_ANYTHINGLLM_LEASE_FULL    0x02  /* granted whole */
#define NGX_HTTP_ANYTHINGLLM_LEASE_LAST    0x04  /* the count reached rpm */

/* the largest lease: a share of a key's rpm, and at most this many */
#define NGX_HTTP_ANYTHINGLLM_LEASE_SHARE   100
#define NGX_HTTP_ANYTHINGLLM_LEASE_MAX     1000

void ngx_http_anythingllm_lease_take(ngx_shm_zone_t *zone,
    const ngx_http_anythingllm_key_t *key,
    ngx_http_anythingllm_lease_t *lease);
/*
 * A fetch of "size" answered: "left" admissions more, numbered up to
 * "top"; returns what the entry could not take (to be given back).
 */
ngx_uint_t ngx_http_anythingllm_lease_credit(ngx_shm_zone_t *zone,
    const char *digest, ngx_uint_t gen, time_t minute, ngx_uint_t size,
    ngx_uint_t left, ngx_uint_t top, ngx_uint_t flags);
/* a request of a leased key counted alone: "count", its number */
void ngx_http_anythingllm_lease_seen(ngx_shm_zone_t *zone,
    const char *digest, time_t minute, ngx_uint_t count);


/* ngx_http_anythingllm_cors.c */

ngx_int_t ngx_http_anythingllm_preflight_handler(ngx_http_request_t *r);
ngx_int_t ngx_http_anythingllm_add_cors(ngx_http_request_t *r);


/* ngx_http_anythingllm_auth.c */

ngx_int_t ngx_http_anythingllm_access_handler(ngx_http_request_t *r);
/* at worker exit: the key lookups still in flight are freed */
void ngx_http_anythingllm_auth_exit_process(void);


/* ngx_http_anythingllm_rate.c */

/*
 * The key's rpm, once its record allows the request: NGX_OK with the
 * verdict in ctx, NGX_AGAIN while Redis is asked (the request is
 * resumed then), NGX_ERROR.
 */
ngx_int_t ngx_http_anythingllm_rate_check(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx);
/* 1 when this worker may log a Redis error now; *missed: left out since */
ngx_uint_t ngx_http_anythingllm_rate_log_due(ngx_uint_t *missed);


/* ngx_http_anythingllm_conv.c */

/*
 * Asks Redis for the session of the conversation the chat request
 * continues.  NGX_AGAIN: asked, "done" runs with the answer;
 * NGX_DECLINED: nothing to ask or Redis unreachable, a new session.
 */
ngx_int_t ngx_http_anythingllm_conv_lookup(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, ngx_http_anythingllm_conv_done_pt done);

/* the answer completed: remember its conversation (fire and forget) */
void ngx_http_anythingllm_conv_store(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx);


/* ngx_http_anythingllm_openai.c */

ngx_int_t ngx_http_anythingllm_openai_handler(ngx_http_request_t *r);


/* ngx_http_anythingllm_usage.c */

ngx_int_t ngx_http_anythingllm_usage_filter_init(ngx_conf_t *cf);
/* precontent: a key's use read, a chat over its token limit refused */
ngx_int_t ngx_http_anythingllm_usage_handler(ngx_http_request_t *r);
ngx_int_t ngx_http_anythingllm_usage_log_handler(ngx_http_request_t *r);


/* ngx_http_anythingllm_upstream.c */

char *ngx_http_anythingllm_upstream_key(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
ngx_int_t ngx_http_anythingllm_precontent_handler(ngx_http_request_t *r);


/* ngx_http_anythingllm_filter.c */

ngx_int_t ngx_http_anythingllm_filter_init(ngx_conf_t *cf);


/* ngx_http_anythingllm_metrics.c */

/* the series without a key label: ngx_http_anythingllm_metrics_add() */
typedef enum {
    NGX_HTTP_ANYTHINGLLM_M_VERDICT = 0,     /* + auth_result_e */
    NGX_HTTP_ANYTHINGLLM_M_SCOPE = 13,      /* + none, chat, read,
                                               documents, admin */
    NGX_HTTP_ANYTHINGLLM_M_UPSTREAM = 18,   /* + status class - 1 */
    NGX_HTTP_ANYTHINGLLM_M_REDIS_COMMANDS = 23,
    NGX_HTTP_ANYTHINGLLM_M_REDIS_ERRORS,
    NGX_HTTP_ANYTHINGLLM_M_REDIS_TIMEOUTS,
    NGX_HTTP_ANYTHINGLLM_M_REDIS_RECONNECTS,
    NGX_HTTP_ANYTHINGLLM_M_CACHE_HITS,
    NGX_HTTP_ANYTHINGLLM_M_CACHE_MISSES,
    NGX_HTTP_ANYTHINGLLM_M_CACHE_EVICTIONS,
    NGX_HTTP_ANYTHINGLLM_M_CACHE_ENTRIES,   /* gauge, read */
    NGX_HTTP_ANYTHINGLLM_M_REVOCATIONS,
    NGX_HTTP_ANYTHINGLLM_M_STREAMS_OPEN,    /* gauge */
    NGX_HTTP_ANYTHINGLLM_M_STREAM_COMPLETE,
    NGX_HTTP_ANYTHINGLLM_M_STREAM_UPSTREAM_ABORT,
    NGX_HTTP_ANYTHINGLLM_M_STREAM_UPSTREAM_CUT,
    NGX_HTTP_ANYTHINGLLM_M_STREAM_OVERSIZED,
    NGX_HTTP_ANYTHINGLLM_M_STREAM_CLIENT_GONE,
    NGX_HTTP_ANYTHINGLLM_M_USAGE_ERRORS,    /* usage not counted */
    NGX_HTTP_ANYTHINGLLM_M_MAX
} ngx_http_anythingllm_m_e;

/* the histograms: ngx_http_anythingllm_metrics_observe() */
typedef enum {
    NGX_HTTP_ANYTHINGLLM_H_REDIS = 0,       /* command round trip */
    NGX_HTTP_ANYTHINGLLM_H_FIRST_TOKEN,
    NGX_HTTP_ANYTHINGLLM_H_STREAM,          /* stream duration */
    NGX_HTTP_ANYTHINGLLM_H_MAX
} ngx_http_anythingllm_h_e;

/* the bounds of a histogram's buckets and +Inf */
#define NGX_HTTP_ANYTHINGLLM_H_BUCKETS  12

/* indexed by ngx_http_anythingllm_auth_result_e */
extern ngx_str_t  ngx_http_anythingllm_auth_results[];

/* a gauge read from another zone when the metrics are answered */
typedef ngx_atomic_uint_t (*ngx_http_anythingllm_metrics_read_pt)(
    ngx_http_anythingllm_main_conf_t *amcf);

char *ngx_http_anythingllm_metrics_zone(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
char *ngx_http_anythingllm_metrics(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
ngx_int_t ngx_http_anythingllm_metrics_add_zone(ngx_conf_t *cf,
    ngx_http_anythingllm_main_conf_t *amcf, size_t size);
void ngx_http_anythingllm_metrics_gauge(ngx_uint_t metric,
    ngx_http_anythingllm_metrics_read_pt read);
/*
 * A worker takes the zone of its cycle (amcf NULL: none) and a slot of
 * the open streams gauge, which it frees when it exits.
 */
void ngx_http_anythingllm_metrics_init_process(
    ngx_http_anythingllm_main_conf_t *amcf);
void ngx_http_anythingllm_metrics_exit_process(void);
ngx_int_t ngx_http_anythingllm_metrics_log_handler(ngx_http_request_t *r);
/* no lock, no allocation: a no-op where no zone is configured */
void ngx_http_anythingllm_metrics_add(ngx_uint_t metric, ngx_atomic_int_t n);
void ngx_http_anythingllm_metrics_observe(ngx_uint_t histogram,
    ngx_msec_t ms);
/* the first token of a chat answer: $anythingllm_first_token_ms */
void ngx_http_anythingllm_metrics_first_token(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx);
/* a stream opens; it ends once, by "cause" (M_STREAM_*) */
void ngx_http_anythingllm_metrics_stream_start(void);
/* how an ended stream ended; "cut": not by a frame of AnythingLLM's */
ngx_uint_t ngx_http_anythingllm_metrics_stream_cause(alm_sse_t *sse,
    ngx_uint_t cut);
void ngx_http_anythingllm_metrics_stream_end(ngx_http_request_t *r,
    ngx_uint_t cause);


/* ngx_http_anythingllm_shm.c */

/* NULL on error; "used": logged (with the name) when the name is taken */
ngx_shm_zone_t *ngx_http_anythingllm_shm_add(ngx_conf_t *cf,
    ngx_str_t *name, size_t size, ngx_shm_zone_init_pt init, void *data,
    const char *used);
/*
 * For an init_zone handler: "shm" is set to the zone's data, the
 * previous cycle's ("old", when not NULL) or the one already in the
 * zone (NGX_OK), or a new zeroed block of "size" bytes for the caller
 * to set up (NGX_DECLINED).  "what" names the zone in slab messages.
 */
ngx_int_t ngx_http_anythingllm_shm_init(ngx_shm_zone_t *shm_zone,
    ngx_http_anythingllm_shm_t *old, size_t size, const char *what,
    ngx_http_anythingllm_shm_t *shm);
/* the slab slot an allocation of "len" bytes takes */
size_t ngx_http_anythingllm_shm_slot(size_t len);


#endif /* _NGX_HTTP_ANYTHINGLLM_MODULE_H_INCLUDED_ */
