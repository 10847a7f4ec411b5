/*
 * Copyright (C) ngx_anythingllm authors
 *
 * hiredis (0.14 async API) on nginx's event loop.
 *
 * Each worker holds two connections to Redis:
 *
 *   - the command connection, shared by every request of the worker:
 *     commands are pipelined, their replies come back in order;
 *
 *   - the subscriber, which listens on "<prefix>revocations" and hands
 *     every message to the handler given at init (the key cache's).
 *
 * hiredis 0.14 has no timeouts of its own: the connect and every
 * command are timed with nginx timers.  A command that times out means
 * the connection can no longer be trusted (its replies would come late
 * and out of step): the context is freed, which runs every pending
 * callback with a NULL reply, and a new connection is tried with a
 * backoff.  While there is no connection, commands fail at once.
 *
 * hiredis closes the socket itself: the nginx connection that wraps it
 * is only ever freed, never closed.  hiredis may free its context
 * inside redisAsyncHandleRead() and redisAsyncHandleWrite(); nothing
 * is touched after those calls, and the cleanup hook forgets the
 * context.
 *
 * hiredis's types stay in this file: callers get the replies as
 * ngx_http_anythingllm_redis_reply_t.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <hiredis/hiredis.h>
#include <hiredis/async.h>

#include "ngx_http_anythingllm_module.h"


#define NGX_HTTP_ANYTHINGLLM_REDIS_BACKOFF_MIN   100
#define NGX_HTTP_ANYTHINGLLM_REDIS_BACKOFF_MAX   2000
#define NGX_HTTP_ANYTHINGLLM_REDIS_FREE_MAX      256

/* a failure is logged as an error once, then at "info" until it heals */
#define ngx_http_anythingllm_redis_level(conn)                              \
    ((conn)->quiet ? (ngx_uint_t) NGX_LOG_INFO : (ngx_uint_t) NGX_LOG_ERR)


typedef enum {
    NGX_HTTP_ANYTHINGLLM_REDIS_DOWN = 0,
    NGX_HTTP_ANYTHINGLLM_REDIS_CONNECTING,
    NGX_HTTP_ANYTHINGLLM_REDIS_UP
} ngx_http_anythingllm_redis_state_e;


typedef struct {
    redisAsyncContext          *ac;
    ngx_connection_t           *c;
    ngx_event_t                 timer;      /* connect or command timeout */
    ngx_event_t                 reconnect;
    ngx_queue_t                 pending;    /* commands in flight */
    ngx_msec_t                  backoff;
    ngx_uint_t                  state;
    const char                 *name;
    unsigned                    subscriber:1;
    unsigned                    was_down:1; /* revocations may be lost */
    unsigned                    quiet:1;    /* failure already logged */
} ngx_http_anythingllm_redis_conn_t;


struct ngx_http_anythingllm_redis_req_s {
    ngx_queue_t                             queue;
    ngx_http_anythingllm_redis_handler_pt   handler;
    void                                   *data;
    ngx_msec_t                              deadline;
};


static void ngx_http_anythingllm_redis_connect(
    ngx_http_anythingllm_redis_conn_t *conn);
static void ngx_http_anythingllm_redis_connected_cb(
    const redisAsyncContext *ac, int status);
static void ngx_http_anythingllm_redis_prepare(
    ngx_http_anythingllm_redis_conn_t *conn);
static void ngx_http_anythingllm_redis_broken(
    ngx_http_anythingllm_redis_conn_t *conn, const char *reason);
static void ngx_http_anythingllm_redis_schedule(
    ngx_http_anythingllm_redis_conn_t *conn);
static void ngx_http_anythingllm_redis_reconnect_handler(ngx_event_t *ev);
static void ngx_http_anythingllm_redis_timer_handler(ngx_event_t *ev);
static void ngx_http_anythingllm_redis_io_handler(ngx_event_t *ev);
static void ngx_http_anythingllm_redis_event(void *privdata,
    ngx_int_t event, ngx_uint_t add);
static void ngx_http_anythingllm_redis_add_read(void *privdata);
static void ngx_http_anythingllm_redis_del_read(void *privdata);
static void ngx_http_anythingllm_redis_add_write(void *privdata);
static void ngx_http_anythingllm_redis_del_write(void *privdata);
static void ngx_http_anythingllm_redis_cleanup(void *privdata);
static void ngx_http_anythingllm_redis_reply(redisAsyncContext *ac,
    void *reply, void *privdata);
static ngx_int_t ngx_http_anythingllm_redis_parse(redisReply *rp,
    ngx_http_anythingllm_redis_reply_t *reply);
static void ngx_http_anythingllm_redis_init_reply(void *data,
    ngx_http_anythingllm_redis_reply_t *reply);
static ngx_http_anythingllm_redis_req_t *ngx_http_anythingllm_redis_send(
    ngx_http_anythingllm_redis_conn_t *conn,
    ngx_http_anythingllm_redis_handler_pt handler, void *data, int argc,
    const char **argv, const size_t *argvlen);
static void ngx_http_anythingllm_redis_sub_auth(redisAsyncContext *ac,
    void *reply, void *privdata);
static void ngx_http_anythingllm_redis_sub_message(redisAsyncContext *ac,
    void *reply, void *privdata);
static void ngx_http_anythingllm_redis_free_req(
    ngx_http_anythingllm_redis_req_t *rr);


/* per worker process */

static ngx_http_anythingllm_main_conf_t   *ngx_http_anythingllm_redis_conf;
static ngx_http_anythingllm_redis_conn_t   ngx_http_anythingllm_redis_cmd;
static ngx_http_anythingllm_redis_conn_t   ngx_http_anythingllm_redis_sub;
static ngx_queue_t                         ngx_http_anythingllm_redis_free;
static ngx_uint_t                          ngx_http_anythingllm_redis_nfree;
static ngx_uint_t                          ngx_http_anythingllm_redis_exiting;
static ngx_http_anythingllm_redis_sub_pt   ngx_http_anythingllm_redis_on_sub;


ngx_int_t
ngx_http_anythingllm_redis_init_process(ngx_cycle_t *cycle,
    ngx_http_anythingllm_redis_sub_pt sub_handler)
{
    ngx_uint_t                          i;
    ngx_http_anythingllm_redis_conn_t  *conn;
    ngx_http_anythingllm_main_conf_t   *amcf;

    if (ngx_process != NGX_PROCESS_WORKER
        && ngx_process != NGX_PROCESS_SINGLE)
    {
        return NGX_OK;
    }

    amcf = ngx_http_cycle_get_module_main_conf(cycle,
                                               ngx_http_anythingllm_module);

    if (amcf == NULL || !amcf->redis_used) {
        return NGX_OK;
    }

    ngx_http_anythingllm_redis_conf = amcf;
    ngx_http_anythingllm_redis_on_sub = sub_handler;
    ngx_http_anythingllm_redis_exiting = 0;
    ngx_queue_init(&ngx_http_anythingllm_redis_free);

    for (i = 0; i < 2; i++) {
        conn = (i == 0) ? &ngx_http_anythingllm_redis_cmd
                        : &ngx_http_anythingllm_redis_sub;

        ngx_memzero(conn, sizeof(ngx_http_anythingllm_redis_conn_t));

        conn->subscriber = (i == 1);
        conn->name = conn->subscriber ? "subscriber" : "command";

        ngx_queue_init(&conn->pending);

        conn->timer.handler = ngx_http_anythingllm_redis_timer_handler;
        conn->timer.data = conn;
        conn->timer.log = cycle->log;

        conn->reconnect.handler =
                                ngx_http_anythingllm_redis_reconnect_handler;
        conn->reconnect.data = conn;
        conn->reconnect.log = cycle->log;
        conn->reconnect.cancelable = 1;

        /* the subscriber needs no connection when nothing is cached */

        if (conn->subscriber && amcf->cache_zone == NULL) {
            continue;
        }

        /*
         * The first attempt is made from the event loop: the time cached
         * now is the master's, too old to start the connect timer from.
         */

        ngx_add_timer(&conn->reconnect, 1);
    }

    return NGX_OK;
}


void
ngx_http_anythingllm_redis_exit_process(ngx_cycle_t *cycle)
{
    ngx_uint_t                          i;
    ngx_queue_t                        *q;
    redisAsyncContext                  *ac;
    ngx_http_anythingllm_redis_req_t   *rr;
    ngx_http_anythingllm_redis_conn_t  *conn;

    if (ngx_http_anythingllm_redis_conf == NULL) {
        return;
    }

    /* pending callbacks still run below, but call no request back */

    ngx_http_anythingllm_redis_exiting = 1;

    for (i = 0; i < 2; i++) {
        conn = (i == 0) ? &ngx_http_anythingllm_redis_cmd
                        : &ngx_http_anythingllm_redis_sub;

        if (conn->reconnect.timer_set) {
            ngx_del_timer(&conn->reconnect);
        }

        if (conn->timer.timer_set) {
            ngx_del_timer(&conn->timer);
        }

        ac = conn->ac;

        if (ac) {
            conn->ac = NULL;
            conn->state = NGX_HTTP_ANYTHINGLLM_REDIS_DOWN;
            redisAsyncFree(ac);
        }
    }

    while (!ngx_queue_empty(&ngx_http_anythingllm_redis_free)) {
        q = ngx_queue_head(&ngx_http_anythingllm_redis_free);
        ngx_queue_remove(q);

        rr = ngx_queue_data(q, ngx_http_anythingllm_redis_req_t, queue);
        ngx_free(rr);
    }

    ngx_http_anythingllm_redis_nfree = 0;
    ngx_http_anythingllm_redis_conf = NULL;
}


/*
 * While the connection is being made, commands wait in hiredis's buffer
 * (for the connect timeout at most); without a connection they fail.
 */

ngx_http_anythingllm_redis_req_t *
ngx_http_anythingllm_redis_command(
    ngx_http_anythingllm_redis_handler_pt handler, void *data, int argc,
    const char **argv, const size_t *argvlen)
{
    if (ngx_http_anythingllm_redis_conf == NULL
        || ngx_http_anythingllm_redis_cmd.ac == NULL
        || ngx_http_anythingllm_redis_cmd.state
           == NGX_HTTP_ANYTHINGLLM_REDIS_DOWN)
    {
        return NULL;
    }

    return ngx_http_anythingllm_redis_send(&ngx_http_anythingllm_redis_cmd,
                                           handler, data, argc, argv,
                                           argvlen);
}


/*
 * A pending command cannot be taken back from hiredis: its callback
 * will run once the reply (or the end of the connection) comes.  The
 * handle stays with the worker until then, but calls nobody back.
 * The caller's handle is cleared; a cleared one is let be.
 */

void
ngx_http_anythingllm_redis_cancel(ngx_http_anythingllm_redis_req_t **rrp)
{
    ngx_http_anythingllm_redis_req_t  *rr;

    rr = *rrp;

    if (rr == NULL) {
        return;
    }

    rr->handler = NULL;
    rr->data = NULL;

    *rrp = NULL;
}


static void
ngx_http_anythingllm_redis_connect(ngx_http_anythingllm_redis_conn_t *conn)
{
    ngx_log_t                         *log;
    ngx_connection_t                  *c;
    redisAsyncContext                 *ac;
    ngx_http_anythingllm_main_conf_t  *amcf;

    amcf = ngx_http_anythingllm_redis_conf;
    log = ngx_cycle->log;

    if (amcf->redis_unix.len) {
        ac = redisAsyncConnectUnix((const char *) amcf->redis_unix.data);

    } else {
        ac = redisAsyncConnect((const char *) amcf->redis_host.data,
                               (int) amcf->redis_port);
    }

    if (ac == NULL) {
        ngx_log_error(NGX_LOG_ERR, log, 0,
                      "anythingllm: redis %s connection to \"%V\" failed: "
                      "out of memory", conn->name, &amcf->redis_addr);
        goto failed;
    }

    if (ac->err) {
        ngx_log_error(ngx_http_anythingllm_redis_level(conn), log, 0,
                      "anythingllm: redis %s connection to \"%V\" "
                      "failed: %s", conn->name, &amcf->redis_addr,
                      ac->errstr);
        conn->quiet = 1;
        redisAsyncFree(ac);
        goto failed;
    }

    c = ngx_get_connection(ac->c.fd, log);
    if (c == NULL) {
        redisAsyncFree(ac);
        goto failed;
    }

    c->data = conn;
    c->read->handler = ngx_http_anythingllm_redis_io_handler;
    c->write->handler = ngx_http_anythingllm_redis_io_handler;
    c->read->log = log;
    c->write->log = log;

    conn->ac = ac;
    conn->c = c;
    conn->state = NGX_HTTP_ANYTHINGLLM_REDIS_CONNECTING;

    ac->data = conn;
    ac->ev.data = conn;
    ac->ev.addRead = ngx_http_anythingllm_redis_add_read;
    ac->ev.delRead = ngx_http_anythingllm_redis_del_read;
    ac->ev.addWrite = ngx_http_anythingllm_redis_add_write;
    ac->ev.delWrite = ngx_http_anythingllm_redis_del_write;
    ac->ev.cleanup = ngx_http_anythingllm_redis_cleanup;

    /* asks for the first write event, which tells the connect's result */

    (void) redisAsyncSetConnectCallback(ac,
                                     ngx_http_anythingllm_redis_connected_cb);

    conn->timer.cancelable = 1;
    ngx_add_timer(&conn->timer, amcf->redis_timeout);

    ngx_http_anythingllm_redis_prepare(conn);

    ngx_log_debug2(NGX_LOG_DEBUG_EVENT, log, 0,
                   "anythingllm: redis %s connecting, fd:%d",
                   conn->name, c->fd);

    return;

failed:

    conn->was_down = 1;
    ngx_http_anythingllm_redis_schedule(conn);
}


/*
 * Never free the context here: hiredis goes on using it after this
 * callback returns.  A failed connect is freed by hiredis itself and
 * the cleanup hook schedules the next attempt.
 */

static void
ngx_http_anythingllm_redis_connected_cb(const redisAsyncContext *cac,
    int status)
{
    ngx_msec_int_t                      left;
    redisAsyncContext                  *ac;
    ngx_http_anythingllm_redis_req_t   *rr;
    ngx_http_anythingllm_redis_conn_t  *conn;

    ac = (redisAsyncContext *) cac;
    conn = ac->data;

    if (status != REDIS_OK) {
        ngx_log_error(ngx_http_anythingllm_redis_level(conn),
                      ngx_cycle->log, 0,
                      "anythingllm: redis %s connection to \"%V\" "
                      "failed: %s", conn->name,
                      &ngx_http_anythingllm_redis_conf->redis_addr,
                      ac->errstr);
        conn->quiet = 1;
        return;
    }

    ngx_log_debug1(NGX_LOG_DEBUG_EVENT, ngx_cycle->log, 0,
                   "anythingllm: redis %s connected", conn->name);

    if (conn->subscriber) {
        /* stays "connecting", with its timer, until SUBSCRIBE is confirmed */
        return;
    }

    conn->state = NGX_HTTP_ANYTHINGLLM_REDIS_UP;

    if (conn->timer.timer_set) {
        ngx_del_timer(&conn->timer);
    }

    if (ngx_queue_empty(&conn->pending)) {
        return;
    }

    /* commands queued while connecting: the oldest one's time goes on */

    rr = ngx_queue_data(ngx_queue_head(&conn->pending),
                        ngx_http_anythingllm_redis_req_t, queue);

    left = (ngx_msec_int_t) (rr->deadline - ngx_current_msec);

    conn->timer.cancelable = 0;
    ngx_add_timer(&conn->timer, left > 0 ? (ngx_msec_t) left : 1);
}


/*
 * The first commands of a connection, queued at once: hiredis sends
 * them as soon as the socket connects, before anything queued later.
 * A failure of AUTH or SELECT breaks the connection, which fails the
 * commands behind.
 */

static void
ngx_http_anythingllm_redis_prepare(ngx_http_anythingllm_redis_conn_t *conn)
{
    u_char                            *p;
    size_t                             argvlen[2];
    const char                        *argv[2];
    ngx_http_anythingllm_main_conf_t  *amcf;
    u_char                             db[NGX_INT_T_LEN];

    amcf = ngx_http_anythingllm_redis_conf;

    if (amcf->redis_password.len) {
        argv[0] = "AUTH";
        argvlen[0] = sizeof("AUTH") - 1;
        argv[1] = (const char *) amcf->redis_password.data;
        argvlen[1] = amcf->redis_password.len;

        if (conn->subscriber) {
            (void) redisAsyncCommandArgv(conn->ac,
                                         ngx_http_anythingllm_redis_sub_auth,
                                         conn, 2, argv, argvlen);

        } else {
            (void) ngx_http_anythingllm_redis_send(conn,
                                     ngx_http_anythingllm_redis_init_reply,
                                     conn, 2, argv, argvlen);
        }
    }

    if (conn->subscriber) {
        argv[0] = "SUBSCRIBE";
        argvlen[0] = sizeof("SUBSCRIBE") - 1;
        argv[1] = (const char *) amcf->revocations.data;
        argvlen[1] = amcf->revocations.len;

        (void) redisAsyncCommandArgv(conn->ac,
                                     ngx_http_anythingllm_redis_sub_message,
                                     conn, 2, argv, argvlen);
        return;
    }

    if (amcf->redis_db) {
        p = ngx_sprintf(db, "%i", amcf->redis_db);

        argv[0] = "SELECT";
        argvlen[0] = sizeof("SELECT") - 1;
        argv[1] = (const char *) db;
        argvlen[1] = p - db;

        (void) ngx_http_anythingllm_redis_send(conn,
                                     ngx_http_anythingllm_redis_init_reply,
                                     conn, 2, argv, argvlen);
    }
}


static void
ngx_http_anythingllm_redis_init_reply(void *data,
    ngx_http_anythingllm_redis_reply_t *reply)
{
    ngx_http_anythingllm_redis_conn_t  *conn;

    conn = data;

    if (reply->type != NGX_HTTP_ANYTHINGLLM_REDIS_ERROR) {
        return;
    }

    ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                  "anythingllm: redis %s connection: AUTH or SELECT "
                  "failed: %V", conn->name, &reply->str);

    ngx_http_anythingllm_redis_broken(conn, NULL);
}


static ngx_http_anythingllm_redis_req_t *
ngx_http_anythingllm_redis_send(ngx_http_anythingllm_redis_conn_t *conn,
    ngx_http_anythingllm_redis_handler_pt handler, void *data, int argc,
    const char **argv, const size_t *argvlen)
{
    ngx_queue_t                       *q;
    ngx_http_anythingllm_redis_req_t  *rr;

    if (!ngx_queue_empty(&ngx_http_anythingllm_redis_free)) {
        q = ngx_queue_head(&ngx_http_anythingllm_redis_free);
        ngx_queue_remove(q);
        ngx_http_anythingllm_redis_nfree--;

        rr = ngx_queue_data(q, ngx_http_anythingllm_redis_req_t, queue);

    } else {
        rr = ngx_alloc(sizeof(ngx_http_anythingllm_redis_req_t),
                       ngx_cycle->log);
        if (rr == NULL) {
            return NULL;
        }
    }

    rr->handler = handler;
    rr->data = data;
    rr->deadline = ngx_current_msec
                   + ngx_http_anythingllm_redis_conf->redis_timeout;

    if (redisAsyncCommandArgv(conn->ac, ngx_http_anythingllm_redis_reply, rr,
                              argc, argv, argvlen)
        != REDIS_OK)
    {
        ngx_http_anythingllm_redis_free_req(rr);
        return NULL;
    }

    ngx_queue_insert_tail(&conn->pending, &rr->queue);

    ngx_http_anythingllm_metrics_add(NGX_HTTP_ANYTHINGLLM_M_REDIS_COMMANDS, 1);

    /* a command in flight holds a graceful shutdown until it ends */

    conn->timer.cancelable = 0;

    if (!conn->timer.timer_set) {
        ngx_add_timer(&conn->timer,
                      ngx_http_anythingllm_redis_conf->redis_timeout);
    }

    return rr;
}


static void
ngx_http_anythingllm_redis_free_req(ngx_http_anythingllm_redis_req_t *rr)
{
    if (ngx_http_anythingllm_redis_nfree >= NGX_HTTP_ANYTHINGLLM_REDIS_FREE_MAX
        || ngx_http_anythingllm_redis_conf == NULL)
    {
        ngx_free(rr);
        return;
    }

    ngx_queue_insert_head(&ngx_http_anythingllm_redis_free, &rr->queue);
    ngx_http_anythingllm_redis_nfree++;
}


/* every command of the command connection is answered here, in order */

static void
ngx_http_anythingllm_redis_reply(redisAsyncContext *ac, void *reply,
    void *privdata)
{
    void                                   *data;
    ngx_msec_t                              sent;
    redisReply                             *rp;
    ngx_http_anythingllm_redis_req_t       *rr;
    ngx_http_anythingllm_redis_conn_t      *conn;
    ngx_http_anythingllm_redis_reply_t      parsed;
    ngx_http_anythingllm_redis_handler_pt   handler;

    rr = privdata;
    rp = reply;
    conn = &ngx_http_anythingllm_redis_cmd;

    ngx_queue_remove(&rr->queue);

    if (ngx_queue_empty(&conn->pending) && conn->timer.timer_set
        && conn->state == NGX_HTTP_ANYTHINGLLM_REDIS_UP)
    {
        ngx_del_timer(&conn->timer);
    }

    if (rp == NULL) {
        /* the context is going away: nothing more may be sent on it */
        conn->state = NGX_HTTP_ANYTHINGLLM_REDIS_DOWN;

    } else {
        /* the deadline is the time sent plus the timeout */
        sent = rr->deadline - ngx_http_anythingllm_redis_conf->redis_timeout;

        ngx_http_anythingllm_metrics_observe(NGX_HTTP_ANYTHINGLLM_H_REDIS,
                                             ngx_current_msec - sent);

        if (rp->type != REDIS_REPLY_ERROR) {
            conn->backoff = 0;
            conn->quiet = 0;

        } else {
            ngx_http_anythingllm_metrics_add(
                                 NGX_HTTP_ANYTHINGLLM_M_REDIS_ERRORS, 1);
        }
    }

    handler = rr->handler;
    data = rr->data;

    ngx_http_anythingllm_redis_free_req(rr);

    if (handler == NULL || ngx_http_anythingllm_redis_exiting) {
        return;
    }

    if (ngx_http_anythingllm_redis_parse(rp, &parsed) != NGX_OK) {
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                      "anythingllm: redis reply of %uz elements: "
                      "out of memory", rp->elements);
        ngx_str_set(&parsed.str, "out of memory");
    }

    handler(data, &parsed);

    if (parsed.elts) {
        ngx_free(parsed.elts);
    }
}


/*
 * The reply as the callers read it; its strings point into hiredis's
 * reply, which is freed when the handler returns.  NGX_ERROR: no
 * memory for the elements of an array, "reply" is an error then.
 */

static ngx_int_t
ngx_http_anythingllm_redis_parse(redisReply *rp,
    ngx_http_anythingllm_redis_reply_t *reply)
{
    size_t       i;
    redisReply  *e;

    ngx_memzero(reply, sizeof(ngx_http_anythingllm_redis_reply_t));

    if (rp == NULL) {
        reply->type = NGX_HTTP_ANYTHINGLLM_REDIS_NONE;
        return NGX_OK;
    }

    switch (rp->type) {

    case REDIS_REPLY_ERROR:
    case REDIS_REPLY_STRING:
        reply->type = (rp->type == REDIS_REPLY_ERROR)
                      ? NGX_HTTP_ANYTHINGLLM_REDIS_ERROR
                      : NGX_HTTP_ANYTHINGLLM_REDIS_STRING;

        if (rp->str) {
            reply->str.data = (u_char *) rp->str;
            reply->str.len = rp->len;
        }

        return NGX_OK;

    case REDIS_REPLY_INTEGER:
        reply->type = NGX_HTTP_ANYTHINGLLM_REDIS_INTEGER;
        reply->integer = rp->integer;
        return NGX_OK;

    case REDIS_REPLY_ARRAY:
        break;

    default:
        reply->type = NGX_HTTP_ANYTHINGLLM_REDIS_OTHER;
        return NGX_OK;
    }

    reply->type = NGX_HTTP_ANYTHINGLLM_REDIS_ARRAY;
    reply->nelts = rp->elements;

    if (rp->elements == 0) {
        return NGX_OK;
    }

    reply->elts = ngx_alloc(rp->elements * sizeof(ngx_str_t),
                            ngx_cycle->log);
    if (reply->elts == NULL) {
        reply->type = NGX_HTTP_ANYTHINGLLM_REDIS_ERROR;
        reply->nelts = 0;
        return NGX_ERROR;
    }

    for (i = 0; i < rp->elements; i++) {
        e = rp->element[i];

        if (e != NULL && e->type == REDIS_REPLY_STRING && e->str != NULL) {
            reply->elts[i].data = (u_char *) e->str;
            reply->elts[i].len = e->len;

        } else {
            ngx_str_null(&reply->elts[i]);
        }
    }

    return NGX_OK;
}


static void
ngx_http_anythingllm_redis_timer_handler(ngx_event_t *ev)
{
    ngx_msec_int_t                      left;
    ngx_http_anythingllm_redis_req_t   *rr;
    ngx_http_anythingllm_redis_conn_t  *conn;

    conn = ev->data;

    if (conn->ac == NULL) {
        return;
    }

    if (conn->state != NGX_HTTP_ANYTHINGLLM_REDIS_UP) {
        ngx_http_anythingllm_metrics_add(NGX_HTTP_ANYTHINGLLM_M_REDIS_TIMEOUTS,
                                         1);
        ngx_http_anythingllm_redis_broken(conn, "connect timed out");
        return;
    }

    if (ngx_queue_empty(&conn->pending)) {
        return;
    }

    rr = ngx_queue_data(ngx_queue_head(&conn->pending),
                        ngx_http_anythingllm_redis_req_t, queue);

    left = (ngx_msec_int_t) (rr->deadline - ngx_current_msec);

    if (left > 0) {
        conn->timer.cancelable = 0;
        ngx_add_timer(&conn->timer, (ngx_msec_t) left);
        return;
    }

    ngx_http_anythingllm_metrics_add(NGX_HTTP_ANYTHINGLLM_M_REDIS_TIMEOUTS, 1);
    ngx_http_anythingllm_redis_broken(conn, "command timed out");
}


/*
 * Gives the connection up: every pending callback runs with a NULL
 * reply (at once, or when hiredis returns from a callback), and a new
 * connection is tried later.
 */

static void
ngx_http_anythingllm_redis_broken(ngx_http_anythingllm_redis_conn_t *conn,
    const char *reason)
{
    redisAsyncContext  *ac;

    ac = conn->ac;

    if (ac == NULL) {
        return;
    }

    if (reason) {
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                      "anythingllm: redis %s connection to \"%V\": %s "
                      "(timeout %M ms), reconnecting", conn->name,
                      &ngx_http_anythingllm_redis_conf->redis_addr, reason,
                      ngx_http_anythingllm_redis_conf->redis_timeout);
    }

    conn->quiet = 1;
    conn->ac = NULL;
    conn->state = NGX_HTTP_ANYTHINGLLM_REDIS_DOWN;
    conn->was_down = 1;

    if (conn->timer.timer_set) {
        ngx_del_timer(&conn->timer);
    }

    ngx_http_anythingllm_redis_schedule(conn);

    redisAsyncFree(ac);
}


static void
ngx_http_anythingllm_redis_schedule(ngx_http_anythingllm_redis_conn_t *conn)
{
    if (ngx_http_anythingllm_redis_exiting || ngx_exiting || ngx_quit
        || ngx_terminate || conn->reconnect.timer_set)
    {
        return;
    }

    if (conn->backoff == 0) {
        conn->backoff = NGX_HTTP_ANYTHINGLLM_REDIS_BACKOFF_MIN;

    } else {
        conn->backoff = ngx_min(conn->backoff * 2,
                                NGX_HTTP_ANYTHINGLLM_REDIS_BACKOFF_MAX);
    }

    ngx_log_debug2(NGX_LOG_DEBUG_EVENT, ngx_cycle->log, 0,
                   "anythingllm: redis %s reconnect in %M ms",
                   conn->name, conn->backoff);

    ngx_http_anythingllm_metrics_add(NGX_HTTP_ANYTHINGLLM_M_REDIS_RECONNECTS,
                                     1);

    ngx_add_timer(&conn->reconnect, conn->backoff);
}


static void
ngx_http_anythingllm_redis_reconnect_handler(ngx_event_t *ev)
{
    ngx_http_anythingllm_redis_conn_t  *conn;

    conn = ev->data;

    if (ngx_http_anythingllm_redis_exiting || ngx_exiting || ngx_quit
        || ngx_terminate)
    {
        return;
    }

    if (conn->c != NULL || conn->ac != NULL) {
        /* the previous context is not released yet */
        ngx_add_timer(&conn->reconnect, NGX_HTTP_ANYTHINGLLM_REDIS_BACKOFF_MIN);
        return;
    }

    ngx_http_anythingllm_redis_connect(conn);
}


static void
ngx_http_anythingllm_redis_io_handler(ngx_event_t *ev)
{
    ngx_connection_t                   *c;
    ngx_http_anythingllm_redis_conn_t  *conn;

    c = ev->data;
    conn = c->data;

    if (conn->ac == NULL) {
        return;
    }

    /* may free the context: nothing is touched afterwards */

    if (ev->write) {
        redisAsyncHandleWrite(conn->ac);

    } else {
        redisAsyncHandleRead(conn->ac);
    }
}


/*
 * The events are level-triggered: hiredis reads at most 16k at a time,
 * and what is left must be reported again.
 */

static void
ngx_http_anythingllm_redis_event(void *privdata, ngx_int_t event,
    ngx_uint_t add)
{
    ngx_event_t                        *ev;
    ngx_http_anythingllm_redis_conn_t  *conn = privdata;

    if (conn->c == NULL) {
        return;
    }

    ev = (event == NGX_READ_EVENT) ? conn->c->read : conn->c->write;

    if (!add) {
        if (ev->active) {
            (void) ngx_del_event(ev, event, 0);
        }

        return;
    }

    if (!ev->active && ngx_add_event(ev, event, NGX_LEVEL_EVENT) != NGX_OK) {
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                      "anythingllm: redis %s: adding %s event failed",
                      conn->name,
                      (event == NGX_READ_EVENT) ? "read" : "write");
    }
}


static void
ngx_http_anythingllm_redis_add_read(void *privdata)
{
    ngx_http_anythingllm_redis_event(privdata, NGX_READ_EVENT, 1);
}


static void
ngx_http_anythingllm_redis_del_read(void *privdata)
{
    ngx_http_anythingllm_redis_event(privdata, NGX_READ_EVENT, 0);
}


static void
ngx_http_anythingllm_redis_add_write(void *privdata)
{
    ngx_http_anythingllm_redis_event(privdata, NGX_WRITE_EVENT, 1);
}


static void
ngx_http_anythingllm_redis_del_write(void *privdata)
{
    ngx_http_anythingllm_redis_event(privdata, NGX_WRITE_EVENT, 0);
}


/*
 * Called by hiredis whenever it frees the context (on error, on EOF,
 * after redisAsyncFree()), after the pending callbacks have run and
 * just before it closes the socket.
 */

static void
ngx_http_anythingllm_redis_cleanup(void *privdata)
{
    ngx_connection_t                   *c;
    ngx_http_anythingllm_redis_conn_t  *conn = privdata;

    c = conn->c;

    if (c) {
        if (c->read->active) {
            (void) ngx_del_event(c->read, NGX_READ_EVENT, NGX_CLOSE_EVENT);
        }

        if (c->write->active) {
            (void) ngx_del_event(c->write, NGX_WRITE_EVENT, NGX_CLOSE_EVENT);
        }

        if (c->read->posted) {
            ngx_delete_posted_event(c->read);
        }

        if (c->write->posted) {
            ngx_delete_posted_event(c->write);
        }

        c->read->closed = 1;
        c->write->closed = 1;

        ngx_free_connection(c);

        /* hiredis closes the socket */
        c->fd = (ngx_socket_t) -1;

        conn->c = NULL;
    }

    if (conn->ac) {

        /* hiredis gave the connection up by itself */

        /*
         * also before the connection counted as up: a refused AUTH,
         * SELECT or SUBSCRIBE ends here, and only errstr tells why
         */

        ngx_log_error(ngx_http_anythingllm_redis_level(conn),
                      ngx_cycle->log, 0,
                      "anythingllm: redis %s connection to \"%V\" "
                      "%s: %s, reconnecting", conn->name,
                      &ngx_http_anythingllm_redis_conf->redis_addr,
                      conn->state == NGX_HTTP_ANYTHINGLLM_REDIS_UP
                          ? "lost" : "failed",
                      conn->ac->errstr[0] ? conn->ac->errstr : "closed");
        conn->quiet = 1;

        conn->ac = NULL;
        conn->state = NGX_HTTP_ANYTHINGLLM_REDIS_DOWN;
        conn->was_down = 1;

        if (conn->timer.timer_set) {
            ngx_del_timer(&conn->timer);
        }

        ngx_http_anythingllm_redis_schedule(conn);
    }
}


/* the subscriber */

static void
ngx_http_anythingllm_redis_sub_auth(redisAsyncContext *ac, void *reply,
    void *privdata)
{
    redisReply                         *rp;
    ngx_http_anythingllm_redis_conn_t  *conn;

    rp = reply;
    conn = privdata;

    if (rp == NULL || rp->type != REDIS_REPLY_ERROR || conn->ac != ac) {
        return;
    }

    ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                  "anythingllm: redis %s connection: AUTH failed: %*s",
                  conn->name, (size_t) rp->len, rp->str);

    /* inside a callback: hiredis frees the context when it returns */

    ngx_http_anythingllm_redis_broken(conn, NULL);
}


/*
 * The subscription confirmed, and every message of the channel, go to
 * the handler: a confirmation only when this worker's subscriber was
 * down at any time since it started (see the key cache's handler for
 * what that means).
 */

static void
ngx_http_anythingllm_redis_sub_message(redisAsyncContext *ac, void *reply,
    void *privdata)
{
    ngx_str_t                           message;
    redisReply                         *rp, *type, *msg;
    ngx_http_anythingllm_redis_conn_t  *conn;

    rp = reply;
    conn = privdata;

    if (rp == NULL || conn->ac != ac) {
        return;
    }

    if (rp->type == REDIS_REPLY_ERROR) {
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                      "anythingllm: redis %s connection: SUBSCRIBE "
                      "failed: %*s", conn->name, (size_t) rp->len, rp->str);

        ngx_http_anythingllm_redis_broken(conn, NULL);
        return;
    }

    if (rp->type != REDIS_REPLY_ARRAY || rp->elements < 3
        || rp->element[0]->type != REDIS_REPLY_STRING)
    {
        return;
    }

    type = rp->element[0];
    msg = rp->element[2];

    if (type->len == 9 && ngx_strncmp(type->str, "subscribe", 9) == 0) {

        if (conn->timer.timer_set) {
            ngx_del_timer(&conn->timer);
        }

        conn->state = NGX_HTTP_ANYTHINGLLM_REDIS_UP;
        conn->backoff = 0;
        conn->quiet = 0;

        if (conn->was_down) {
            ngx_http_anythingllm_redis_on_sub(
                                       ngx_http_anythingllm_redis_conf, NULL);
        }

        conn->was_down = 0;
        return;
    }

    if (type->len != 7 || ngx_strncmp(type->str, "message", 7) != 0
        || msg->type != REDIS_REPLY_STRING)
    {
        return;
    }

    message.data = (u_char *) msg->str;
    message.len = msg->len;

    ngx_http_anythingllm_redis_on_sub(ngx_http_anythingllm_redis_conf,
                                           &message);
}
