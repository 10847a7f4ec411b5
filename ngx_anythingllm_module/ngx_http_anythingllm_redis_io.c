/*
 * Copyright (C) ngx_anythingllm authors
 *
 * A hiredis 0.14 async context on nginx's event loop: the socket that
 * hiredis made is wrapped in an nginx connection whose events call
 * redisAsyncHandleRead() and redisAsyncHandleWrite().
 *
 * hiredis closes the socket itself: the nginx connection that wraps it
 * is only ever freed, never closed.  hiredis may free its context
 * inside redisAsyncHandleRead() and redisAsyncHandleWrite(); nothing
 * is touched after those calls, and the cleanup hook forgets the
 * context (through the connection's "gone" handler when hiredis gave
 * it up by itself).
 *
 * Also what the Redis files share about hiredis's replies: the reply
 * as the callers read it, and the refusals of an ACL user.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_anythingllm_module.h"
#include "ngx_http_anythingllm_redis_io.h"


static void ngx_http_anythingllm_redis_io_handler(ngx_event_t *ev);
static void ngx_http_anythingllm_redis_io_event(void *privdata,
    ngx_int_t event, ngx_uint_t add);
static void ngx_http_anythingllm_redis_io_add_read(void *privdata);
static void ngx_http_anythingllm_redis_io_del_read(void *privdata);
static void ngx_http_anythingllm_redis_io_add_write(void *privdata);
static void ngx_http_anythingllm_redis_io_del_write(void *privdata);
static void ngx_http_anythingllm_redis_io_cleanup(void *privdata);


ngx_int_t
ngx_http_anythingllm_redis_io_connect(ngx_http_anythingllm_redis_conn_t *conn,
    const char *host, int port, const char *path, redisConnectCallback *cb)
{
    u_char             *p;
    ngx_log_t          *log;
    ngx_connection_t   *c;
    redisAsyncContext  *ac;

    log = ngx_cycle->log;

    if (path) {
        p = ngx_snprintf(conn->addr_buf, sizeof(conn->addr_buf),
                         "unix:%s", path);
        ac = redisAsyncConnectUnix(path);

    } else {
        p = ngx_snprintf(conn->addr_buf, sizeof(conn->addr_buf), "%s:%d",
                         host, port);
        ac = redisAsyncConnect(host, port);
    }

    conn->addr.data = conn->addr_buf;
    conn->addr.len = p - conn->addr_buf;

    if (ac == NULL) {
        ngx_log_error(NGX_LOG_ERR, log, 0,
                      "anythingllm: redis %s connection to \"%V\" failed: "
                      "out of memory", conn->name, &conn->addr);
        return NGX_ERROR;
    }

    if (ac->err) {
        ngx_log_error(ngx_http_anythingllm_redis_level(conn), log, 0,
                      "anythingllm: redis %s connection to \"%V\" "
                      "failed: %s", conn->name, &conn->addr, ac->errstr);
        conn->quiet = 1;
        redisAsyncFree(ac);
        return NGX_ERROR;
    }

    c = ngx_get_connection(ac->c.fd, log);
    if (c == NULL) {
        redisAsyncFree(ac);
        return NGX_ERROR;
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
    ac->ev.addRead = ngx_http_anythingllm_redis_io_add_read;
    ac->ev.delRead = ngx_http_anythingllm_redis_io_del_read;
    ac->ev.addWrite = ngx_http_anythingllm_redis_io_add_write;
    ac->ev.delWrite = ngx_http_anythingllm_redis_io_del_write;
    ac->ev.cleanup = ngx_http_anythingllm_redis_io_cleanup;

    /* asks for the first write event, which tells the connect's result */

    (void) redisAsyncSetConnectCallback(ac, cb);

    ngx_log_debug3(NGX_LOG_DEBUG_EVENT, log, 0,
                   "anythingllm: redis %s connecting to %V, fd:%d",
                   conn->name, &conn->addr, c->fd);

    return NGX_OK;
}



/* at worker exit: its timers stopped and its context freed */

void
ngx_http_anythingllm_redis_io_init(ngx_http_anythingllm_redis_conn_t *conn,
    const char *name, ngx_uint_t subscriber,
    ngx_http_anythingllm_redis_gone_pt gone, ngx_event_handler_pt timeout,
    ngx_event_handler_pt reconnect)
{
    ngx_memzero(conn, sizeof(ngx_http_anythingllm_redis_conn_t));

    conn->subscriber = subscriber ? 1 : 0;
    conn->name = name;
    conn->gone = gone;

    ngx_queue_init(&conn->pending);

    conn->timer.handler = timeout;
    conn->timer.data = conn;
    conn->timer.log = ngx_cycle->log;

    conn->reconnect.handler = reconnect;
    conn->reconnect.data = conn;
    conn->reconnect.log = ngx_cycle->log;
    conn->reconnect.cancelable = 1;
}


void
ngx_http_anythingllm_redis_io_close(ngx_http_anythingllm_redis_conn_t *conn)
{
    redisAsyncContext  *ac;

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

    /*
     * May free the context: nothing of it is touched afterwards ("conn"
     * is static and outlives it).
     */

    if (ev->write) {
        conn->writes++;
        conn->writing = 1;
        redisAsyncHandleWrite(conn->ac);
        conn->writing = 0;

    } else {
        redisAsyncHandleRead(conn->ac);
    }
}


/*
 * The events are level-triggered: hiredis reads at most 16k at a time,
 * and what is left must be reported again.
 */

static void
ngx_http_anythingllm_redis_io_event(void *privdata, ngx_int_t event,
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
ngx_http_anythingllm_redis_io_add_read(void *privdata)
{
    ngx_http_anythingllm_redis_io_event(privdata, NGX_READ_EVENT, 1);
}


static void
ngx_http_anythingllm_redis_io_del_read(void *privdata)
{
    ngx_http_anythingllm_redis_io_event(privdata, NGX_READ_EVENT, 0);
}


/*
 * The commands of a connected context are written once the event
 * loop's turn has run every handler that adds to them: the write event
 * is posted, not asked of the kernel, which saves the two epoll_ctl()
 * calls of a level-triggered write event a batch.  Only what the
 * socket would not take at once (hiredis asks again from within its
 * write) waits for the kernel's write event; the connect's result
 * always does.
 */

static void
ngx_http_anythingllm_redis_io_add_write(void *privdata)
{
    ngx_http_anythingllm_redis_conn_t  *conn = privdata;

    if (conn->c != NULL && conn->ac != NULL && !conn->writing
        && (conn->ac->c.flags & REDIS_CONNECTED))
    {
        if (!conn->c->write->posted) {
            ngx_post_event(conn->c->write, &ngx_posted_events);
        }

        return;
    }

    ngx_http_anythingllm_redis_io_event(privdata, NGX_WRITE_EVENT, 1);
}


static void
ngx_http_anythingllm_redis_io_del_write(void *privdata)
{
    ngx_http_anythingllm_redis_io_event(privdata, NGX_WRITE_EVENT, 0);
}


/*
 * Called by hiredis whenever it frees the context (on error, on EOF,
 * after redisAsyncFree()), after the pending callbacks have run and
 * just before it closes the socket.
 */

static void
ngx_http_anythingllm_redis_io_cleanup(void *privdata)
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
        conn->gone(conn);
        conn->ac = NULL;
        conn->state = NGX_HTTP_ANYTHINGLLM_REDIS_DOWN;
    }
}


/*
 * A command the ACL user may not run: an error line naming it, at most
 * once a second for one command (for EVAL, Redis's message tells that
 * a command of the script was refused).
 */

void
ngx_http_anythingllm_redis_refused(ngx_http_anythingllm_main_conf_t *amcf,
    const u_char *cmd, redisReply *rp)
{
    ngx_str_t  err;

    static time_t     last;
    static u_char     last_cmd[NGX_HTTP_ANYTHINGLLM_REDIS_CMD_LEN];
    static ngx_str_t  default_user = ngx_string("default");

    /* a command of a script is refused with ERR and this sentence */

    if ((rp->len < 6 || ngx_strncmp(rp->str, "NOPERM", 6) != 0)
        && ngx_strstrn((u_char *) rp->str, "can't run this command", 22 - 1)
           == NULL)
    {
        return;
    }

    if (last == ngx_time() && ngx_strcmp(last_cmd, cmd) == 0) {
        return;
    }

    last = ngx_time();
    ngx_cpystrn(last_cmd, (u_char *) cmd, NGX_HTTP_ANYTHINGLLM_REDIS_CMD_LEN);

    err.data = (u_char *) rp->str;
    err.len = rp->len;

    ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                  "anythingllm: redis refused the command %s to user "
                  "\"%V\": %V", cmd,
                  amcf->redis_user.len ? &amcf->redis_user : &default_user,
                  &err);
}


/*
 * The reply as the callers read it; its strings point into hiredis's
 * reply, which is freed when the handler returns.  NGX_ERROR: no
 * memory for the elements of an array, "reply" is an error then.
 */

ngx_int_t
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
