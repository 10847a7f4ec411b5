/*
 * Copyright (C) ngx_anythingllm authors
 *
 * Private to the Redis files (redis_io.c, sentinel.c, redis.c): a
 * hiredis 0.14 async context on nginx's event loop.  hiredis's types
 * stay behind this header; the rest of the module sees only
 * ngx_http_anythingllm_module.h.
 */


#ifndef _NGX_HTTP_ANYTHINGLLM_REDIS_IO_H_INCLUDED_
#define _NGX_HTTP_ANYTHINGLLM_REDIS_IO_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <hiredis/hiredis.h>
#include <hiredis/async.h>


/* the longest command name kept for a log line */
#define NGX_HTTP_ANYTHINGLLM_REDIS_CMD_LEN   16

/* the longest "ip:port" kept for a connection's log lines */
#define NGX_HTTP_ANYTHINGLLM_REDIS_ADDR_LEN  (NGX_INET_ADDRSTRLEN + 8)


typedef enum {
    NGX_HTTP_ANYTHINGLLM_REDIS_DOWN = 0,
    NGX_HTTP_ANYTHINGLLM_REDIS_CONNECTING,
    NGX_HTTP_ANYTHINGLLM_REDIS_UP
} ngx_http_anythingllm_redis_state_e;


typedef struct ngx_http_anythingllm_redis_conn_s
    ngx_http_anythingllm_redis_conn_t;

/*
 * hiredis gave the context up by itself (an error, EOF, a failed
 * connect): conn->ac is still set, for its errstr, and the handler
 * forgets it.  Not called after the owner freed the context.
 */
typedef void (*ngx_http_anythingllm_redis_gone_pt)(
    ngx_http_anythingllm_redis_conn_t *conn);


struct ngx_http_anythingllm_redis_conn_s {
    redisAsyncContext          *ac;
    ngx_connection_t           *c;
    ngx_event_t                 timer;      /* connect or command timeout */
    ngx_event_t                 reconnect;
    ngx_queue_t                 pending;    /* commands in flight */
    ngx_msec_t                  backoff;
    ngx_uint_t                  state;
    ngx_uint_t                  writes;     /* write handler runs, ever */
    const char                 *name;
    ngx_http_anythingllm_redis_gone_pt  gone;
    ngx_str_t                   addr;       /* connected to, for logs */
    u_char                      addr_buf[NGX_HTTP_ANYTHINGLLM_REDIS_ADDR_LEN];
    unsigned                    subscriber:1;
    unsigned                    was_down:1; /* revocations may be lost */
    unsigned                    quiet:1;    /* failure already logged */
    unsigned                    writing:1;  /* in redisAsyncHandleWrite() */
};


/* a failure is logged as an error once, then at "info" until it heals */
#define ngx_http_anythingllm_redis_level(conn)                              \
    ((conn)->quiet ? (ngx_uint_t) NGX_LOG_INFO : (ngx_uint_t) NGX_LOG_ERR)


/*
 * A connection not yet connected, with its handlers: "timeout" for
 * conn->timer, "reconnect" for conn->reconnect (cancelable), each
 * event's data the connection.
 */
void ngx_http_anythingllm_redis_io_init(
    ngx_http_anythingllm_redis_conn_t *conn, const char *name,
    ngx_uint_t subscriber, ngx_http_anythingllm_redis_gone_pt gone,
    ngx_event_handler_pt timeout, ngx_event_handler_pt reconnect);

/* at worker exit: the connection's timers stopped, its context freed */
void ngx_http_anythingllm_redis_io_close(
    ngx_http_anythingllm_redis_conn_t *conn);

/*
 * Starts a connect to host:port (an IP literal) or to the unix socket
 * "path" when not NULL; "cb" tells the result.  NGX_ERROR: nothing
 * was started (logged).  conn->addr is set either way.
 */
ngx_int_t ngx_http_anythingllm_redis_io_connect(
    ngx_http_anythingllm_redis_conn_t *conn, const char *host, int port,
    const char *path, redisConnectCallback *cb);

/*
 * The reply as the callers read it; its strings point into hiredis's
 * reply.  NGX_ERROR: no memory for the elements of an array, "reply"
 * is an error then.
 */
ngx_int_t ngx_http_anythingllm_redis_parse(redisReply *rp,
    ngx_http_anythingllm_redis_reply_t *reply);
/* an error reply: logged when it is an ACL refusal (NOPERM) of "cmd" */
void ngx_http_anythingllm_redis_refused(
    ngx_http_anythingllm_main_conf_t *amcf, const u_char *cmd,
    redisReply *rp);


/* ngx_http_anythingllm_sentinel.c */

/*
 * The sentinels named the primary "host" (an IP literal, NUL) at
 * "port"; "switched": told by a +switch-master message.
 */
typedef void (*ngx_http_anythingllm_sentinel_found_pt)(const u_char *host,
    ngx_int_t port, ngx_uint_t switched);
/* no sentinel answered in a whole round */
typedef void (*ngx_http_anythingllm_sentinel_failed_pt)(void);

void ngx_http_anythingllm_sentinel_init(
    ngx_http_anythingllm_main_conf_t *amcf,
    ngx_http_anythingllm_sentinel_found_pt found,
    ngx_http_anythingllm_sentinel_failed_pt failed);
/* asks the sentinels in turn, unless a round is already under way */
void ngx_http_anythingllm_sentinel_discover(void);
void ngx_http_anythingllm_sentinel_exit(void);


#endif /* _NGX_HTTP_ANYTHINGLLM_REDIS_IO_H_INCLUDED_ */
