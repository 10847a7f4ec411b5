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
 * Both go to the configured address, or, for a Sentinel group, to the
 * primary the sentinels name (ngx_http_anythingllm_sentinel.c).  Then
 * the command connection asks ROLE and serves nothing until the server
 * says it is the master; the subscriber follows it there.  The
 * primary is asked for again after the command connection fails, a
 * READONLY answer (a demoted primary) or a ROLE that is not "master";
 * a +switch-master message moves both connections at once.  While the
 * primary is being looked for, commands fail at once.
 *
 * hiredis 0.14 has no timeouts of its own: the connect and every
 * command are timed with nginx timers.  A command that times out means
 * the connection can no longer be trusted (its replies would come late
 * and out of step): the context is freed, which runs every pending
 * callback with a NULL reply, and a new connection is tried with a
 * backoff.  While there is no connection, commands fail at once.
 *
 * The event loop side of hiredis is ngx_http_anythingllm_redis_io.c.
 * hiredis's types stay in the Redis files: callers get the replies as
 * ngx_http_anythingllm_redis_reply_t.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_anythingllm_module.h"
#include "ngx_http_anythingllm_redis_io.h"


#define NGX_HTTP_ANYTHINGLLM_REDIS_BACKOFF_MIN   100
#define NGX_HTTP_ANYTHINGLLM_REDIS_BACKOFF_MAX   2000
#define NGX_HTTP_ANYTHINGLLM_REDIS_FREE_MAX      256

/* a Sentinel group: asking the sentinels again costs little */
#define NGX_HTTP_ANYTHINGLLM_REDIS_SENTINEL_BACKOFF_MAX  1000

#define ngx_http_anythingllm_redis_sentinel()                               \
    (ngx_http_anythingllm_redis_conf->sentinels != NULL)


struct ngx_http_anythingllm_redis_req_s {
    ngx_queue_t                             queue;
    ngx_http_anythingllm_redis_handler_pt   handler;
    void                                   *data;
    ngx_msec_t                              deadline;
    u_char                                  cmd[
                                        NGX_HTTP_ANYTHINGLLM_REDIS_CMD_LEN];
};


/* the primary of a Sentinel group, as the sentinels last named it */

typedef struct {
    u_char                      host[NGX_INET6_ADDRSTRLEN + 1];
    ngx_int_t                   port;
    unsigned                    known:1;
} ngx_http_anythingllm_redis_primary_t;


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
static void ngx_http_anythingllm_redis_gone(
    ngx_http_anythingllm_redis_conn_t *conn);
static void ngx_http_anythingllm_redis_lost(
    ngx_http_anythingllm_redis_conn_t *conn);
static void ngx_http_anythingllm_redis_role_reply(void *data,
    ngx_http_anythingllm_redis_reply_t *reply);
static void ngx_http_anythingllm_redis_found(const u_char *host,
    ngx_int_t port, ngx_uint_t switched);
static void ngx_http_anythingllm_redis_unfound(void);
static void ngx_http_anythingllm_redis_reply(redisAsyncContext *ac,
    void *reply, void *privdata);
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
static ngx_http_anythingllm_redis_primary_t  ngx_http_anythingllm_redis_primary;


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
    ngx_memzero(&ngx_http_anythingllm_redis_primary,
                sizeof(ngx_http_anythingllm_redis_primary_t));

    if (amcf->sentinels) {
        ngx_http_anythingllm_sentinel_init(amcf,
                                           ngx_http_anythingllm_redis_found,
                                           ngx_http_anythingllm_redis_unfound);
    }

    for (i = 0; i < 2; i++) {
        conn = (i == 0) ? &ngx_http_anythingllm_redis_cmd
                        : &ngx_http_anythingllm_redis_sub;

        ngx_http_anythingllm_redis_io_init(conn,
                                  i ? "subscriber" : "command", i,
                                  ngx_http_anythingllm_redis_gone,
                                  ngx_http_anythingllm_redis_timer_handler,
                                  ngx_http_anythingllm_redis_reconnect_handler);

        /* the subscriber needs no connection when nothing is cached */

        if (conn->subscriber && amcf->cache_zone == NULL) {
            continue;
        }

        /* in a Sentinel group it follows the command connection */

        if (conn->subscriber && amcf->sentinels) {
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
    ngx_http_anythingllm_redis_req_t   *rr;
    ngx_http_anythingllm_redis_conn_t  *conn;

    if (ngx_http_anythingllm_redis_conf == NULL) {
        return;
    }

    /* pending callbacks still run below, but call no request back */

    ngx_http_anythingllm_redis_exiting = 1;

    ngx_http_anythingllm_sentinel_exit();

    for (i = 0; i < 2; i++) {
        conn = (i == 0) ? &ngx_http_anythingllm_redis_cmd
                        : &ngx_http_anythingllm_redis_sub;

        ngx_http_anythingllm_redis_io_close(conn);
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


void
ngx_http_anythingllm_redis_eval2(const char **argv, size_t *argvlen,
    const char *script, size_t script_len, ngx_str_t *key1, ngx_str_t *key2)
{
    argv[0] = "EVAL";
    argvlen[0] = sizeof("EVAL") - 1;
    argv[1] = script;
    argvlen[1] = script_len;
    argv[2] = "2";
    argvlen[2] = 1;
    argv[3] = (const char *) key1->data;
    argvlen[3] = key1->len;
    argv[4] = (const char *) key2->data;
    argvlen[4] = key2->len;
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

    /* nothing goes to a server of a group before it says it is primary */

    if (ngx_http_anythingllm_redis_sentinel()
        && ngx_http_anythingllm_redis_cmd.state
           != NGX_HTTP_ANYTHINGLLM_REDIS_UP)
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

/*
 * A command sent while this number stays the same has not been written
 * to Redis yet: the commands of a turn of the event loop are written
 * together once its handlers have run (redis_io.c).
 */

ngx_uint_t
ngx_http_anythingllm_redis_writes(void)
{
    return ngx_http_anythingllm_redis_cmd.writes;
}


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
    ngx_int_t                              rc;
    ngx_http_anythingllm_main_conf_t      *amcf;
    ngx_http_anythingllm_redis_primary_t  *pr;

    amcf = ngx_http_anythingllm_redis_conf;
    pr = &ngx_http_anythingllm_redis_primary;

    if (amcf->sentinels) {

        if (conn->subscriber) {
            /* only to where the command connection is up */
            if (ngx_http_anythingllm_redis_cmd.state
                != NGX_HTTP_ANYTHINGLLM_REDIS_UP)
            {
                return;
            }

        } else if (!pr->known) {
            /* the answer comes back to ngx_http_anythingllm_redis_found() */
            ngx_http_anythingllm_sentinel_discover();
            return;
        }

        rc = ngx_http_anythingllm_redis_io_connect(conn, (char *) pr->host,
                                   (int) pr->port, NULL,
                                   ngx_http_anythingllm_redis_connected_cb);

    } else {
        rc = ngx_http_anythingllm_redis_io_connect(conn,
                                   (char *) amcf->redis_host.data,
                                   (int) amcf->redis_port,
                                   amcf->redis_unix.len
                                   ? (char *) amcf->redis_unix.data : NULL,
                                   ngx_http_anythingllm_redis_connected_cb);
    }

    if (rc != NGX_OK) {
        conn->was_down = 1;
        ngx_http_anythingllm_redis_lost(conn);
        ngx_http_anythingllm_redis_schedule(conn);
        return;
    }

    conn->timer.cancelable = 1;
    ngx_add_timer(&conn->timer, amcf->redis_timeout);

    ngx_http_anythingllm_redis_prepare(conn);
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
                      "failed: %s", conn->name, &conn->addr,
                      ac->errstr);
        conn->quiet = 1;
        return;
    }

    ngx_log_debug1(NGX_LOG_DEBUG_EVENT, ngx_cycle->log, 0,
                   "anythingllm: redis %s connected", conn->name);

    if (conn->subscriber || ngx_http_anythingllm_redis_sentinel()) {
        /*
         * stays "connecting", with its timer, until SUBSCRIBE is
         * confirmed, or ROLE says "master"
         */
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
 * commands behind.  In a Sentinel group ROLE comes last: the connection
 * serves once the server says it is the master.
 */

static void
ngx_http_anythingllm_redis_prepare(ngx_http_anythingllm_redis_conn_t *conn)
{
    u_char                            *p;
    int                                argc;
    size_t                             argvlen[3];
    const char                        *argv[3];
    ngx_http_anythingllm_main_conf_t  *amcf;
    u_char                             db[NGX_INT_T_LEN];

    amcf = ngx_http_anythingllm_redis_conf;

    if (amcf->redis_password.len) {
        argc = 0;
        argv[argc] = "AUTH";
        argvlen[argc++] = sizeof("AUTH") - 1;

        if (amcf->redis_user.len) {
            argv[argc] = (const char *) amcf->redis_user.data;
            argvlen[argc++] = amcf->redis_user.len;
        }

        argv[argc] = (const char *) amcf->redis_password.data;
        argvlen[argc++] = amcf->redis_password.len;

        if (conn->subscriber) {
            (void) redisAsyncCommandArgv(conn->ac,
                                         ngx_http_anythingllm_redis_sub_auth,
                                         conn, argc, argv, argvlen);

        } else {
            (void) ngx_http_anythingllm_redis_send(conn,
                                     ngx_http_anythingllm_redis_init_reply,
                                     conn, argc, argv, argvlen);
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

    if (amcf->sentinels) {
        argv[0] = "ROLE";
        argvlen[0] = sizeof("ROLE") - 1;

        (void) ngx_http_anythingllm_redis_send(conn,
                                     ngx_http_anythingllm_redis_role_reply,
                                     conn, 1, argv, argvlen);
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
                  "anythingllm: redis %s connection to \"%V\": AUTH or "
                  "SELECT failed: %V", conn->name, &conn->addr, &reply->str);

    ngx_http_anythingllm_redis_lost(conn);
    ngx_http_anythingllm_redis_broken(conn, NULL);
}


/*
 * ROLE, last of a new connection to a server of a Sentinel group: it
 * serves only as "master"; anything else, and the sentinels are asked
 * again.
 */

static void
ngx_http_anythingllm_redis_role_reply(void *data,
    ngx_http_anythingllm_redis_reply_t *reply)
{
    ngx_str_t                           role;
    ngx_msec_int_t                      left;
    ngx_http_anythingllm_redis_req_t   *rr;
    ngx_http_anythingllm_redis_conn_t  *conn, *sub;

    conn = data;

    if (reply->type == NGX_HTTP_ANYTHINGLLM_REDIS_NONE || conn->ac == NULL) {
        return;
    }

    ngx_str_null(&role);

    if (reply->type == NGX_HTTP_ANYTHINGLLM_REDIS_ARRAY && reply->nelts) {
        role = reply->elts[0];
    }

    if (role.len != 6 || ngx_strncmp(role.data, "master", 6) != 0) {
        ngx_log_error(ngx_http_anythingllm_redis_level(conn),
                      ngx_cycle->log, 0,
                      "anythingllm: redis %V is not the primary of \"%V\" "
                      "(ROLE: %V), asking the sentinels again", &conn->addr,
                      &ngx_http_anythingllm_redis_conf->redis_master,
                      role.len ? &role : &reply->str);
        conn->quiet = 1;

        ngx_http_anythingllm_redis_lost(conn);
        ngx_http_anythingllm_redis_broken(conn, NULL);
        return;
    }

    ngx_log_error(NGX_LOG_NOTICE, ngx_cycle->log, 0,
                  "anythingllm: redis primary of \"%V\" is %V",
                  &ngx_http_anythingllm_redis_conf->redis_master,
                  &conn->addr);

    conn->state = NGX_HTTP_ANYTHINGLLM_REDIS_UP;
    conn->backoff = 0;
    conn->quiet = 0;

    if (conn->timer.timer_set) {
        ngx_del_timer(&conn->timer);
    }

    if (!ngx_queue_empty(&conn->pending)) {
        rr = ngx_queue_data(ngx_queue_head(&conn->pending),
                            ngx_http_anythingllm_redis_req_t, queue);

        left = (ngx_msec_int_t) (rr->deadline - ngx_current_msec);

        conn->timer.cancelable = 0;
        ngx_add_timer(&conn->timer, left > 0 ? (ngx_msec_t) left : 1);
    }

    /* the revocations are heard from the same server */

    sub = &ngx_http_anythingllm_redis_sub;

    if (ngx_http_anythingllm_redis_conf->cache_zone == NULL) {
        return;
    }

    if (sub->ac
        && (sub->addr.len != conn->addr.len
            || ngx_strncmp(sub->addr.data, conn->addr.data, sub->addr.len)
               != 0))
    {
        ngx_http_anythingllm_redis_broken(sub, NULL);
    }

    if (sub->ac == NULL) {
        if (sub->reconnect.timer_set) {
            ngx_del_timer(&sub->reconnect);
        }

        ngx_add_timer(&sub->reconnect, 1);
    }
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

    ngx_cpystrn(rr->cmd, (u_char *) argv[0],
                ngx_min(argvlen[0] + 1, NGX_HTTP_ANYTHINGLLM_REDIS_CMD_LEN));

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

        if (rp->type == REDIS_REPLY_ERROR) {
            ngx_http_anythingllm_metrics_add(
                                 NGX_HTTP_ANYTHINGLLM_M_REDIS_ERRORS, 1);
            ngx_http_anythingllm_redis_refused(ngx_http_anythingllm_redis_conf,
                                               rr->cmd, rp);

        } else if (conn->state == NGX_HTTP_ANYTHINGLLM_REDIS_UP) {
            /* a server of a group heals once ROLE says "master" */
            conn->backoff = 0;
            conn->quiet = 0;
        }
    }

    handler = rr->handler;
    data = rr->data;

    ngx_http_anythingllm_redis_free_req(rr);

    if (ngx_http_anythingllm_redis_exiting) {
        return;
    }

    /*
     * A primary demoted under an open connection answers writes with
     * READONLY: in a Sentinel group the sentinels are asked again (the
     * handler still gets this answer; hiredis frees the context once
     * this callback returns, and the commands behind get no answer).
     */

    if (rp && rp->type == REDIS_REPLY_ERROR && rp->len >= 8
        && ngx_strncmp(rp->str, "READONLY", 8) == 0
        && ngx_http_anythingllm_redis_sentinel() && conn->ac == ac)
    {
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                      "anythingllm: redis %V answered READONLY: no longer "
                      "the primary of \"%V\", asking the sentinels again",
                      &conn->addr,
                      &ngx_http_anythingllm_redis_conf->redis_master);

        ngx_http_anythingllm_redis_lost(conn);
        ngx_http_anythingllm_redis_broken(conn, NULL);
    }

    if (handler == NULL) {
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
        ngx_http_anythingllm_redis_lost(conn);
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
    ngx_http_anythingllm_redis_lost(conn);
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
                      &conn->addr, reason,
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
    ngx_msec_t  max;

    if (ngx_http_anythingllm_redis_exiting || ngx_exiting || ngx_quit
        || ngx_terminate || conn->reconnect.timer_set)
    {
        return;
    }

    max = ngx_http_anythingllm_redis_sentinel()
          ? NGX_HTTP_ANYTHINGLLM_REDIS_SENTINEL_BACKOFF_MAX
          : NGX_HTTP_ANYTHINGLLM_REDIS_BACKOFF_MAX;

    if (conn->backoff == 0) {
        conn->backoff = NGX_HTTP_ANYTHINGLLM_REDIS_BACKOFF_MIN;

    } else {
        conn->backoff = ngx_min(conn->backoff * 2, max);
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


/* hiredis gave a connection up by itself: lost, refused, closed */

static void
ngx_http_anythingllm_redis_gone(ngx_http_anythingllm_redis_conn_t *conn)
{
    /*
     * also before the connection counted as up: a refused AUTH, SELECT
     * or SUBSCRIBE ends here, and only errstr tells why
     */

    ngx_log_error(ngx_http_anythingllm_redis_level(conn), ngx_cycle->log, 0,
                  "anythingllm: redis %s connection to \"%V\" "
                  "%s: %s, reconnecting", conn->name, &conn->addr,
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

    ngx_http_anythingllm_redis_lost(conn);
    ngx_http_anythingllm_redis_schedule(conn);
}


/*
 * The command connection of a Sentinel group failed, or its server is
 * no primary: the next attempt asks the sentinels first.
 */

static void
ngx_http_anythingllm_redis_lost(ngx_http_anythingllm_redis_conn_t *conn)
{
    if (ngx_http_anythingllm_redis_sentinel() && !conn->subscriber) {
        ngx_http_anythingllm_redis_primary.known = 0;
    }
}


/*
 * The sentinels named the primary.  A new address moves both
 * connections there at once; the same one only starts the command
 * connection when it waits.
 */

static void
ngx_http_anythingllm_redis_found(const u_char *host, ngx_int_t port,
    ngx_uint_t switched)
{
    ngx_uint_t                             same;
    ngx_http_anythingllm_redis_conn_t     *cmd, *sub;
    ngx_http_anythingllm_redis_primary_t  *pr;

    pr = &ngx_http_anythingllm_redis_primary;
    cmd = &ngx_http_anythingllm_redis_cmd;
    sub = &ngx_http_anythingllm_redis_sub;

    if (ngx_http_anythingllm_redis_exiting) {
        return;
    }

    same = pr->known && pr->port == port
           && ngx_strcmp(pr->host, host) == 0;

    if (same && cmd->state != NGX_HTTP_ANYTHINGLLM_REDIS_DOWN) {
        return;
    }

    ngx_cpystrn(pr->host, (u_char *) host, sizeof(pr->host));
    pr->port = port;
    pr->known = 1;

    if (!same) {
        if (cmd->ac) {
            ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                          "anythingllm: redis primary of \"%V\" moved from "
                          "%V to %s:%i, reconnecting",
                          &ngx_http_anythingllm_redis_conf->redis_master,
                          &cmd->addr, pr->host, port);

            ngx_http_anythingllm_redis_broken(cmd, NULL);
        }

        if (sub->ac) {
            ngx_http_anythingllm_redis_broken(sub, NULL);
        }
    }

    if (switched) {
        cmd->backoff = 0;
    }

    /* once the previous context is released */

    if (cmd->reconnect.timer_set) {
        ngx_del_timer(&cmd->reconnect);
    }

    ngx_add_timer(&cmd->reconnect, 1);
}


/* no sentinel answered: another round after the backoff */

static void
ngx_http_anythingllm_redis_unfound(void)
{
    ngx_http_anythingllm_redis_schedule(&ngx_http_anythingllm_redis_cmd);
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
