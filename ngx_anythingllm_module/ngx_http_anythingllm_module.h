/*
 * Copyright (C) ngx_anythingllm authors
 *
 * Shared declarations of the nginx glue.  One file per concern:
 *
 *   ngx_http_anythingllm_module.c   directives, variables, phase
 *                                   handlers, upstream key injection
 *   ngx_http_anythingllm_redis.c    hiredis on nginx's event loop
 *   ngx_http_anythingllm_cache.c    shared-memory key cache
 *   ngx_http_anythingllm_auth.c     access phase: key, scope, rpm
 *   ngx_http_anythingllm_openai.c   precontent phase: OpenAI routes,
 *                                   request body rewrite
 *   ngx_http_anythingllm_filter.c   response header and body filters
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

typedef struct {
    /* anythingllm_redis */
    ngx_str_t                   redis_addr;     /* as written; empty: none */
    ngx_str_t                   redis_unix;     /* unix socket path, NUL */
    ngx_str_t                   redis_host;     /* IP literal, NUL */
    ngx_int_t                   redis_port;
    ngx_int_t                   redis_db;
    ngx_str_t                   redis_password;
    ngx_msec_t                  redis_timeout;
    ngx_str_t                   prefix;
    ngx_str_t                   revocations;    /* "<prefix>revocations" */
    ngx_flag_t                  redis_used;     /* auth or openai is on */

    /* anythingllm_key_cache */
    ngx_shm_zone_t             *cache_zone;
    time_t                      cache_valid;
    time_t                      cache_invalid;
    void                       *cache_sh;       /* in the zone */
    ngx_slab_pool_t            *cache_shpool;

    /* anythingllm_conversation_ttl, anythingllm_conversation_max */
    time_t                      conversation_ttl;
    ngx_int_t                   conversation_max;
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
    time_t                      expires;
    unsigned                    disabled:1;
    unsigned                    valid:1;        /* digest is set */
} ngx_http_anythingllm_key_t;


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


typedef struct {
    /* auth (ngx_http_anythingllm_auth.c) */
    ngx_http_anythingllm_auth_result_e  auth_result;
    ngx_int_t                   auth_status;    /* verdict once known */
    ngx_http_anythingllm_key_t  key;
    ngx_str_t                   workspace;      /* slug judged, if any */
    ngx_http_anythingllm_redis_req_t  *pending; /* lookup in flight */
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

    /* openai (ngx_http_anythingllm_openai.c) */
    alm_chat_req_t             *chat;
    ngx_str_t                   model;
    ngx_str_t                   session_id;
    ngx_str_t                   completion_id;  /* "chatcmpl-..." */
    time_t                      created;
    ngx_int_t                   openai_status;  /* verdict once known */
    alm_error_t                *openai_error;   /* verdict: this error */
    ngx_http_anythingllm_redis_req_t  *conv_pending; /* session lookup */
    unsigned                    openai_done:1;
    unsigned                    openai_waiting:1;
    unsigned                    body_read:1;
    unsigned                    continuing:1;   /* known session */
    unsigned                    conv_stored:1;

    /* response filter (ngx_http_anythingllm_filter.c) */
    ngx_http_anythingllm_resp_e resp;
    void                       *filter;         /* filter's own state */
    alm_usage_t                 usage;
} ngx_http_anythingllm_ctx_t;


extern ngx_module_t  ngx_http_anythingllm_module;


/* ngx_http_anythingllm_module.c */

ngx_http_anythingllm_ctx_t *ngx_http_anythingllm_get_ctx(
    ngx_http_request_t *r);

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
ngx_int_t ngx_http_anythingllm_add_cors(ngx_http_request_t *r);
/* adds a response header; "key" must outlive the request */
ngx_table_elt_t *ngx_http_anythingllm_push_header(ngx_http_request_t *r,
    const char *key, ngx_str_t *value);
ngx_int_t ngx_http_anythingllm_set_header_in(ngx_http_request_t *r,
    ngx_table_elt_t **slot, const char *name, const char *lowcase,
    ngx_str_t *value, ngx_uint_t add);
ngx_int_t ngx_http_anythingllm_identity_encoding(ngx_http_request_t *r);


/* ngx_http_anythingllm_redis.c */

/*
 * Callback for a Redis command: "reply" is the hiredis redisReply,
 * or NULL on error, timeout or disconnect.  It runs at most once and
 * never after ngx_http_anythingllm_redis_cancel().
 */
typedef void (*ngx_http_anythingllm_redis_handler_pt)(void *data,
    void *reply);

ngx_int_t ngx_http_anythingllm_redis_init_process(ngx_cycle_t *cycle);
void ngx_http_anythingllm_redis_exit_process(ngx_cycle_t *cycle);
ngx_uint_t ngx_http_anythingllm_redis_connected(void);

/*
 * Sends a command (argv style) on the worker's connection (pipelined;
 * while it is being made, the command waits for it, within the same
 * timeout).  Returns a handle for _cancel(), or NULL when Redis is not
 * reachable now.  The handler may be NULL (no answer wanted).  The
 * reply is freed when the handler returns.
 */
ngx_http_anythingllm_redis_req_t *ngx_http_anythingllm_redis_command(
    ngx_http_anythingllm_redis_handler_pt handler, void *data,
    int argc, const char **argv, const size_t *argvlen);
void ngx_http_anythingllm_redis_cancel(
    ngx_http_anythingllm_redis_req_t *rr);


/* ngx_http_anythingllm_cache.c */

/* the zone made when anythingllm_auth is on without anythingllm_key_cache */
#define NGX_HTTP_ANYTHINGLLM_CACHE_DEFAULT_SIZE  (10 * 1024 * 1024)

ngx_int_t ngx_http_anythingllm_cache_init_zone(ngx_shm_zone_t *shm_zone,
    void *data);
ngx_int_t ngx_http_anythingllm_cache_default_zone(ngx_conf_t *cf,
    ngx_http_anythingllm_main_conf_t *amcf);
/*
 * NGX_OK: found (key filled, name and list copied into pool),
 * NGX_DECLINED: miss, NGX_ABORT: cached negative, NGX_ERROR: no memory
 */
ngx_int_t ngx_http_anythingllm_cache_get(ngx_shm_zone_t *zone,
    const char *digest, ngx_http_anythingllm_key_t *key, ngx_pool_t *pool);
/*
 * "since": when the Redis lookup that read the record was sent; an
 * answer never replaces an entry made of newer information
 */
void ngx_http_anythingllm_cache_put(ngx_shm_zone_t *zone,
    const ngx_http_anythingllm_key_t *key, time_t ttl, ngx_msec_t since);
void ngx_http_anythingllm_cache_put_negative(ngx_shm_zone_t *zone,
    const char *digest, time_t ttl, ngx_msec_t since);
void ngx_http_anythingllm_cache_revoke(ngx_shm_zone_t *zone,
    const char *digest, ngx_msec_t hold);
void ngx_http_anythingllm_cache_flush(ngx_shm_zone_t *zone);


/* ngx_http_anythingllm_auth.c */

ngx_int_t ngx_http_anythingllm_access_handler(ngx_http_request_t *r);


/* ngx_http_anythingllm_openai.c */

ngx_int_t ngx_http_anythingllm_openai_handler(ngx_http_request_t *r);

/* the answer completed: remember its conversation (fire and forget) */
void ngx_http_anythingllm_openai_conv_store(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx);


/* ngx_http_anythingllm_filter.c */

ngx_int_t ngx_http_anythingllm_filter_init(ngx_conf_t *cf);


#endif /* _NGX_HTTP_ANYTHINGLLM_MODULE_H_INCLUDED_ */
