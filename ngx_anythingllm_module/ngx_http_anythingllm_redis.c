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
 *   - the subscriber, which listens on "<prefix>revocations" and drops
 *     revoked digests from the shared key cache.
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

/* how long a revocation keeps older lookups out of the cache */
#define NGX_HTTP_ANYTHINGLLM_REDIS_REVOKE_HOLD   1000

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
static void ngx_http_anythingllm_redis_read_handler(ngx_event_t *ev);
static void ngx_http_anythingllm_redis_write_handler(ngx_event_t *ev);
static void ngx_http_anythingllm_redis_add_read(void *privdata);
static void ngx_http_anythingllm_redis_del_read(void *privdata);
static void ngx_http_anythingllm_redis_add_write(void *privdata);
static void ngx_http_anythingllm_redis_del_write(void *privdata);
static void ngx_http_anythingllm_redis_cleanup(void *privdata);
static void ngx_http_anythingllm_redis_reply(redisAsyncContext *ac,
    void *reply, void *privdata);
static void ngx_http_anythingllm_redis_init_reply(void *data, void *reply);
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


ngx_int_t
ngx_http_anythingllm_redis_init_process(ngx_cycle_t *cycle)
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


ngx_uint_t
ngx_http_anythingllm_redis_connected(void)
{
    return ngx_http_anythingllm_redis_conf != NULL
           && ngx_http_anythingllm_redis_cmd.ac != NULL
           && ngx_http_anythingllm_redis_cmd.state
              == NGX_HTTP_ANYTHINGLLM_REDIS_UP;
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
 */

void
ngx_http_anythingllm_redis_cancel(ngx_http_anythingllm_redis_req_t *rr)
{
    rr->handler = NULL;
    rr->data = NULL;
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
    c->read->handler = ngx_http_anythingllm_redis_read_handler;
    c->write->handler = ngx_http_anythingllm_redis_write_handler;
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
ngx_http_anythingllm_redis_init_reply(void *data, void *reply)
{
    redisReply                         *rp;
    ngx_http_anythingllm_redis_conn_t  *conn;

    conn = data;
    rp = reply;

    if (rp == NULL || rp->type != REDIS_REPLY_ERROR) {
        return;
    }

    ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                  "anythingllm: redis %s connection: AUTH or SELECT "
                  "failed: %*s", conn->name, (size_t) rp->len, rp->str);

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
    redisReply                             *rp;
    ngx_http_anythingllm_redis_req_t       *rr;
    ngx_http_anythingllm_redis_conn_t      *conn;
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

    } else if (rp->type != REDIS_REPLY_ERROR) {
        conn->backoff = 0;
        conn->quiet = 0;
    }

    handler = rr->handler;
    data = rr->data;

    ngx_http_anythingllm_redis_free_req(rr);

    if (handler && !ngx_http_anythingllm_redis_exiting) {
        handler(data, reply);
    }
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
ngx_http_anythingllm_redis_read_handler(ngx_event_t *ev)
{
    ngx_connection_t                   *c;
    ngx_http_anythingllm_redis_conn_t  *conn;

    c = ev->data;
    conn = c->data;

    if (conn->ac == NULL) {
        return;
    }

    /* may free the context: nothing is touched afterwards */

    redisAsyncHandleRead(conn->ac);
}


static void
ngx_http_anythingllm_redis_write_handler(ngx_event_t *ev)
{
    ngx_connection_t                   *c;
    ngx_http_anythingllm_redis_conn_t  *conn;

    c = ev->data;
    conn = c->data;

    if (conn->ac == NULL) {
        return;
    }

    redisAsyncHandleWrite(conn->ac);
}


/*
 * The events are level-triggered: hiredis reads at most 16k at a time,
 * and what is left must be reported again.
 */

static void
ngx_http_anythingllm_redis_add_read(void *privdata)
{
    ngx_http_anythingllm_redis_conn_t  *conn = privdata;

    if (conn->c == NULL || conn->c->read->active) {
        return;
    }

    if (ngx_add_event(conn->c->read, NGX_READ_EVENT, NGX_LEVEL_EVENT)
        != NGX_OK)
    {
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                      "anythingllm: redis %s: adding read event failed",
                      conn->name);
    }
}


static void
ngx_http_anythingllm_redis_del_read(void *privdata)
{
    ngx_http_anythingllm_redis_conn_t  *conn = privdata;

    if (conn->c == NULL || !conn->c->read->active) {
        return;
    }

    (void) ngx_del_event(conn->c->read, NGX_READ_EVENT, 0);
}


static void
ngx_http_anythingllm_redis_add_write(void *privdata)
{
    ngx_http_anythingllm_redis_conn_t  *conn = privdata;

    if (conn->c == NULL || conn->c->write->active) {
        return;
    }

    if (ngx_add_event(conn->c->write, NGX_WRITE_EVENT, NGX_LEVEL_EVENT)
        != NGX_OK)
    {
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                      "anythingllm: redis %s: adding write event failed",
                      conn->name);
    }
}


static void
ngx_http_anythingllm_redis_del_write(void *privdata)
{
    ngx_http_anythingllm_redis_conn_t  *conn = privdata;

    if (conn->c == NULL || !conn->c->write->active) {
        return;
    }

    (void) ngx_del_event(conn->c->write, NGX_WRITE_EVENT, 0);
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
 * After the subscription is (re)established, positive entries of the
 * cache are dropped if this worker's subscriber was down at any time
 * since it started: a revocation published meanwhile reached nobody
 * here (Redis Pub/Sub does not keep messages), and only a flush bounds
 * the damage.  Lookups that started before the flush do not refill the
 * cache with what they read.  The flush is conservative: when another
 * worker of the same nginx stayed subscribed the whole time, it was
 * not needed, but it costs only a burst of lookups.  The first
 * subscription of a fresh worker does not flush: on a reload the old
 * workers stay subscribed until the new ones are, and a new nginx
 * starts with an empty zone.  A subscriber that hangs without its
 * connection breaking is not noticed; the "valid" time of the cache
 * is the bound then.
 */

static void
ngx_http_anythingllm_redis_sub_message(redisAsyncContext *ac, void *reply,
    void *privdata)
{
    u_char                              ch;
    ngx_uint_t                          i;
    redisReply                         *rp, *type, *msg;
    ngx_msec_t                          hold;
    ngx_shm_zone_t                     *zone;
    ngx_http_anythingllm_redis_conn_t  *conn;
    char                                digest[ALM_DIGEST_HEX_LEN];

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
    zone = ngx_http_anythingllm_redis_conf->cache_zone;

    if (type->len == 9 && ngx_strncmp(type->str, "subscribe", 9) == 0) {

        if (conn->timer.timer_set) {
            ngx_del_timer(&conn->timer);
        }

        conn->state = NGX_HTTP_ANYTHINGLLM_REDIS_UP;
        conn->backoff = 0;
        conn->quiet = 0;

        if (conn->was_down && zone) {
            ngx_log_error(NGX_LOG_NOTICE, ngx_cycle->log, 0,
                          "anythingllm: revocations channel subscribed "
                          "again, valid keys dropped from the cache");

            ngx_http_anythingllm_cache_flush(zone);
        }

        conn->was_down = 0;
        return;
    }

    if (type->len != 7 || ngx_strncmp(type->str, "message", 7) != 0
        || msg->type != REDIS_REPLY_STRING || zone == NULL)
    {
        return;
    }

    if (msg->len == 1 && msg->str[0] == '*') {
        ngx_log_error(NGX_LOG_NOTICE, ngx_cycle->log, 0,
                      "anythingllm: revocation of every key: valid keys "
                      "dropped from the cache");

        ngx_http_anythingllm_cache_flush(zone);
        return;
    }

    if (msg->len != ALM_DIGEST_HEX_LEN) {
        goto invalid;
    }

    /* the cache holds lowercase digests; some tools print uppercase */

    for (i = 0; i < ALM_DIGEST_HEX_LEN; i++) {
        ch = (u_char) msg->str[i];

        if (ch >= 'A' && ch <= 'F') {
            digest[i] = (char) (ch | 0x20);

        } else if ((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f')) {
            digest[i] = (char) ch;

        } else {
            goto invalid;
        }
    }

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, ngx_cycle->log, 0,
                   "anythingllm: revoked key %*s",
                   (size_t) ALM_KEY_ID_LEN, digest);

    hold = ngx_http_anythingllm_redis_conf->redis_timeout
           + NGX_HTTP_ANYTHINGLLM_REDIS_REVOKE_HOLD;

    ngx_http_anythingllm_cache_revoke(zone, digest, hold);

    return;

invalid:

    ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                  "anythingllm: ignored revocation message of %uz bytes: "
                  "a 64-digit hex digest or \"*\" expected",
                  (size_t) msg->len);
}
