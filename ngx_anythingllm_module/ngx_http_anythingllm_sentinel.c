/*
 * Copyright (C) ngx_anythingllm authors
 *
 * Redis Sentinel: which server is the primary of the group now.
 *
 * Each worker keeps two sentinel connections of its own:
 *
 *   - "ask": made for one question at a time.  A round asks the
 *     sentinels in turn, starting with the one that answered last,
 *     "SENTINEL get-master-addr-by-name <master>", each within the
 *     Redis timeout; a sentinel that refuses, fails, does not know the
 *     group or is too slow is skipped.  The first address named ends
 *     the round;
 *
 *   - "watch": subscribed to "+switch-master" on one sentinel, so that
 *     a failover is followed as soon as the sentinels announce it.  It
 *     moves to the next sentinel when its own goes away.
 *
 * The data connections (ngx_http_anythingllm_redis.c) are told of the
 * primary through the "found" handler, and of a round in which no
 * sentinel answered through "failed".  Addresses are IP literals only:
 * a name would be resolved with a blocking call.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_anythingllm_module.h"
#include "ngx_http_anythingllm_redis_io.h"


#define NGX_HTTP_ANYTHINGLLM_SENTINEL_BACKOFF_MIN  100
#define NGX_HTTP_ANYTHINGLLM_SENTINEL_BACKOFF_MAX  2000


static void ngx_http_anythingllm_sentinel_ask_next(void);
static void ngx_http_anythingllm_sentinel_ask_handler(ngx_event_t *ev);
static void ngx_http_anythingllm_sentinel_connected(
    const redisAsyncContext *ac, int status);
static void ngx_http_anythingllm_sentinel_auth(
    ngx_http_anythingllm_redis_conn_t *conn);
static void ngx_http_anythingllm_sentinel_auth_reply(redisAsyncContext *ac,
    void *reply, void *privdata);
static void ngx_http_anythingllm_sentinel_answer(redisAsyncContext *ac,
    void *reply, void *privdata);
static ngx_int_t ngx_http_anythingllm_sentinel_addr(u_char *host,
    size_t hlen, u_char *port, size_t plen, u_char *buf, ngx_int_t *n);
static void ngx_http_anythingllm_sentinel_skip(const char *why,
    ngx_str_t *detail);
static void ngx_http_anythingllm_sentinel_close(
    ngx_http_anythingllm_redis_conn_t *conn);
static void ngx_http_anythingllm_sentinel_gone(
    ngx_http_anythingllm_redis_conn_t *conn);
static void ngx_http_anythingllm_sentinel_timeout(ngx_event_t *ev);
static void ngx_http_anythingllm_sentinel_watch(void);
static void ngx_http_anythingllm_sentinel_watch_handler(ngx_event_t *ev);
static void ngx_http_anythingllm_sentinel_watch_lost(void);
static void ngx_http_anythingllm_sentinel_message(redisAsyncContext *ac,
    void *reply, void *privdata);
static void ngx_http_anythingllm_sentinel_switch(redisReply *msg);


/* per worker process */

static ngx_http_anythingllm_main_conf_t
    *ngx_http_anythingllm_sentinel_conf;
static ngx_http_anythingllm_redis_conn_t
    ngx_http_anythingllm_sentinel_ask;
static ngx_http_anythingllm_redis_conn_t
    ngx_http_anythingllm_sentinel_w;
static ngx_http_anythingllm_sentinel_found_pt
    ngx_http_anythingllm_sentinel_found;
static ngx_http_anythingllm_sentinel_failed_pt
    ngx_http_anythingllm_sentinel_failed;
static ngx_uint_t  ngx_http_anythingllm_sentinel_next;   /* asked first */
static ngx_uint_t  ngx_http_anythingllm_sentinel_tried;  /* this round */
static ngx_uint_t  ngx_http_anythingllm_sentinel_asking; /* a round runs */
static ngx_uint_t  ngx_http_anythingllm_sentinel_watched; /* its index */


#define ngx_http_anythingllm_sentinel_list(amcf)                            \
    ((ngx_http_anythingllm_redis_addr_t *) (amcf)->sentinels->elts)


void
ngx_http_anythingllm_sentinel_init(ngx_http_anythingllm_main_conf_t *amcf,
    ngx_http_anythingllm_sentinel_found_pt found,
    ngx_http_anythingllm_sentinel_failed_pt failed)
{
    ngx_uint_t                          i;
    ngx_http_anythingllm_redis_conn_t  *conn;

    ngx_http_anythingllm_sentinel_conf = amcf;
    ngx_http_anythingllm_sentinel_found = found;
    ngx_http_anythingllm_sentinel_failed = failed;
    ngx_http_anythingllm_sentinel_asking = 0;

    /* the workers of one nginx spread over the sentinels */

    ngx_http_anythingllm_sentinel_next = ngx_pid % amcf->sentinels->nelts;
    ngx_http_anythingllm_sentinel_watched = ngx_http_anythingllm_sentinel_next;

    for (i = 0; i < 2; i++) {
        conn = (i == 0) ? &ngx_http_anythingllm_sentinel_ask
                        : &ngx_http_anythingllm_sentinel_w;

        ngx_http_anythingllm_redis_io_init(conn,
                                 i ? "sentinel watch" : "sentinel", i,
                                 ngx_http_anythingllm_sentinel_gone,
                                 ngx_http_anythingllm_sentinel_timeout,
                                 i ? ngx_http_anythingllm_sentinel_watch_handler
                                   : ngx_http_anythingllm_sentinel_ask_handler);

        /* an ask in flight does not hold a worker that is exiting */
        conn->timer.cancelable = 1;
    }
}


void
ngx_http_anythingllm_sentinel_exit(void)
{
    ngx_uint_t                          i;
    ngx_http_anythingllm_redis_conn_t  *conn;

    if (ngx_http_anythingllm_sentinel_conf == NULL) {
        return;
    }

    for (i = 0; i < 2; i++) {
        conn = (i == 0) ? &ngx_http_anythingllm_sentinel_ask
                        : &ngx_http_anythingllm_sentinel_w;

        ngx_http_anythingllm_redis_io_close(conn);
    }

    ngx_http_anythingllm_sentinel_conf = NULL;
}


void
ngx_http_anythingllm_sentinel_discover(void)
{
    if (ngx_http_anythingllm_sentinel_conf == NULL
        || ngx_http_anythingllm_sentinel_asking)
    {
        return;
    }

    ngx_http_anythingllm_sentinel_asking = 1;
    ngx_http_anythingllm_sentinel_tried = 0;

    ngx_http_anythingllm_sentinel_ask_next();
}


/* the next sentinel of the round, once the previous context is gone */

static void
ngx_http_anythingllm_sentinel_ask_handler(ngx_event_t *ev)
{
    ngx_http_anythingllm_redis_conn_t  *conn;

    conn = ev->data;

    if (ngx_exiting || ngx_quit || ngx_terminate) {
        ngx_http_anythingllm_sentinel_asking = 0;
        return;
    }

    if (conn->c != NULL || conn->ac != NULL) {
        ngx_add_timer(&conn->reconnect, 1);
        return;
    }

    ngx_http_anythingllm_sentinel_ask_next();
}


static void
ngx_http_anythingllm_sentinel_ask_next(void)
{
    size_t                              argvlen[3];
    ngx_uint_t                          n;
    const char                         *argv[3];
    ngx_http_anythingllm_redis_addr_t  *a;
    ngx_http_anythingllm_redis_conn_t  *conn;
    ngx_http_anythingllm_main_conf_t   *amcf;

    amcf = ngx_http_anythingllm_sentinel_conf;
    conn = &ngx_http_anythingllm_sentinel_ask;
    n = amcf->sentinels->nelts;

    argv[0] = "SENTINEL";
    argvlen[0] = sizeof("SENTINEL") - 1;
    argv[1] = "get-master-addr-by-name";
    argvlen[1] = sizeof("get-master-addr-by-name") - 1;
    argv[2] = (const char *) amcf->redis_master.data;
    argvlen[2] = amcf->redis_master.len;

    while (ngx_http_anythingllm_sentinel_tried < n) {

        a = &ngx_http_anythingllm_sentinel_list(amcf)
                                        [ngx_http_anythingllm_sentinel_next];
        ngx_http_anythingllm_sentinel_tried++;

        if (ngx_http_anythingllm_redis_io_connect(conn, (char *) a->host,
                                  (int) a->port, NULL,
                                  ngx_http_anythingllm_sentinel_connected)
            != NGX_OK)
        {
            /* refused at once: logged, the next one */
            ngx_http_anythingllm_sentinel_next =
                                (ngx_http_anythingllm_sentinel_next + 1) % n;
            continue;
        }

        ngx_http_anythingllm_sentinel_auth(conn);

        (void) redisAsyncCommandArgv(conn->ac,
                                     ngx_http_anythingllm_sentinel_answer,
                                     conn, 3, argv, argvlen);

        ngx_add_timer(&conn->timer, amcf->redis_timeout);
        return;
    }

    /* a whole round without an answer */

    ngx_http_anythingllm_sentinel_asking = 0;

    ngx_log_error(ngx_http_anythingllm_redis_level(conn), ngx_cycle->log, 0,
                  "anythingllm: no sentinel of \"%V\" named the primary of "
                  "\"%V\"", &amcf->redis_addr, &amcf->redis_master);
    conn->quiet = 1;

    ngx_http_anythingllm_sentinel_failed();
}


static void
ngx_http_anythingllm_sentinel_connected(const redisAsyncContext *cac,
    int status)
{
    ngx_http_anythingllm_redis_conn_t  *conn;

    conn = cac->data;

    if (status != REDIS_OK) {
        /* hiredis frees the context: the gone handler goes on */
        return;
    }

    ngx_log_debug2(NGX_LOG_DEBUG_EVENT, ngx_cycle->log, 0,
                   "anythingllm: %s %V connected", conn->name, &conn->addr);
}


/* AUTH [user] password, first on a new sentinel connection */

static void
ngx_http_anythingllm_sentinel_auth(ngx_http_anythingllm_redis_conn_t *conn)
{
    int                                argc;
    size_t                             argvlen[3];
    const char                        *argv[3];
    ngx_http_anythingllm_main_conf_t  *amcf;

    amcf = ngx_http_anythingllm_sentinel_conf;

    if (amcf->sentinel_password.len == 0) {
        return;
    }

    argc = 0;
    argv[argc] = "AUTH";
    argvlen[argc++] = sizeof("AUTH") - 1;

    if (amcf->sentinel_user.len) {
        argv[argc] = (const char *) amcf->sentinel_user.data;
        argvlen[argc++] = amcf->sentinel_user.len;
    }

    argv[argc] = (const char *) amcf->sentinel_password.data;
    argvlen[argc++] = amcf->sentinel_password.len;

    (void) redisAsyncCommandArgv(conn->ac,
                                 ngx_http_anythingllm_sentinel_auth_reply,
                                 conn, argc, argv, argvlen);
}


static void
ngx_http_anythingllm_sentinel_auth_reply(redisAsyncContext *ac, void *reply,
    void *privdata)
{
    ngx_str_t                           err;
    redisReply                         *rp;
    ngx_http_anythingllm_redis_conn_t  *conn;

    rp = reply;
    conn = privdata;

    if (rp == NULL || rp->type != REDIS_REPLY_ERROR || conn->ac != ac) {
        return;
    }

    err.data = (u_char *) rp->str;
    err.len = rp->len;

    ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                  "anythingllm: %s %V refused AUTH: %V",
                  conn->name, &conn->addr, &err);

    if (conn->subscriber) {
        ngx_http_anythingllm_sentinel_close(conn);
        ngx_http_anythingllm_sentinel_watch_lost();
        return;
    }

    ngx_http_anythingllm_sentinel_skip(NULL, NULL);
}


static void
ngx_http_anythingllm_sentinel_answer(redisAsyncContext *ac, void *reply,
    void *privdata)
{
    ngx_int_t                           port;
    ngx_str_t                           err;
    redisReply                         *rp, *h, *p;
    ngx_http_anythingllm_redis_conn_t  *conn;
    u_char                              host[NGX_INET6_ADDRSTRLEN + 1];

    rp = reply;
    conn = privdata;

    if (rp == NULL || conn->ac != ac) {
        return;
    }

    if (rp->type == REDIS_REPLY_ERROR) {
        err.data = (u_char *) rp->str;
        err.len = rp->len;
        ngx_http_anythingllm_sentinel_skip(
                   "refused SENTINEL get-master-addr-by-name", &err);
        return;
    }

    if (rp->type != REDIS_REPLY_ARRAY || rp->elements != 2) {
        ngx_http_anythingllm_sentinel_skip("does not know the master", NULL);
        return;
    }

    h = rp->element[0];
    p = rp->element[1];

    if (h->type != REDIS_REPLY_STRING || p->type != REDIS_REPLY_STRING
        || ngx_http_anythingllm_sentinel_addr((u_char *) h->str, h->len,
                                              (u_char *) p->str, p->len,
                                              host, &port)
           != NGX_OK)
    {
        ngx_http_anythingllm_sentinel_skip("named no IP address and port",
                                           NULL);
        return;
    }

    ngx_log_debug4(NGX_LOG_DEBUG_EVENT, ngx_cycle->log, 0,
                   "anythingllm: sentinel %V: primary of \"%V\" is %s:%i",
                   &conn->addr,
                   &ngx_http_anythingllm_sentinel_conf->redis_master,
                   host, port);

    conn->quiet = 0;
    ngx_http_anythingllm_sentinel_asking = 0;
    ngx_http_anythingllm_sentinel_close(conn);

    /* the sentinel that answered is watched, and asked first next time */

    if (ngx_http_anythingllm_sentinel_w.ac == NULL
        && !ngx_http_anythingllm_sentinel_w.reconnect.timer_set)
    {
        ngx_http_anythingllm_sentinel_watched =
                                          ngx_http_anythingllm_sentinel_next;
        ngx_add_timer(&ngx_http_anythingllm_sentinel_w.reconnect, 1);
    }

    ngx_http_anythingllm_sentinel_found(host, port, 0);
}


/* "host" and "port" as a sentinel sends them: an IP literal, a port */

static ngx_int_t
ngx_http_anythingllm_sentinel_addr(u_char *host, size_t hlen, u_char *port,
    size_t plen, u_char *buf, ngx_int_t *n)
{
#if (NGX_HAVE_INET6)
    u_char  addr6[16];
#endif

    if (hlen == 0 || hlen > NGX_INET6_ADDRSTRLEN) {
        return NGX_ERROR;
    }

    *n = ngx_atoi(port, plen);

    if (*n < 1 || *n > 65535) {
        return NGX_ERROR;
    }

    ngx_cpystrn(buf, host, hlen + 1);

    if (ngx_inet_addr(buf, hlen) != INADDR_NONE) {
        return NGX_OK;
    }

#if (NGX_HAVE_INET6)
    if (ngx_inet6_addr(buf, hlen, addr6) == NGX_OK) {
        return NGX_OK;
    }
#endif

    return NGX_ERROR;
}


/* this sentinel gave no answer: the next one, once its context is gone */

static void
ngx_http_anythingllm_sentinel_skip(const char *why, ngx_str_t *detail)
{
    ngx_uint_t                          level;
    ngx_http_anythingllm_redis_conn_t  *conn;

    conn = &ngx_http_anythingllm_sentinel_ask;

    if (why) {
        level = detail ? NGX_LOG_ERR : NGX_LOG_WARN;

        ngx_log_error(level, ngx_cycle->log, 0,
                      "anythingllm: sentinel %V %s%s%V%s, asking the next "
                      "one", &conn->addr, why,
                      detail ? " (" : " \"",
                      detail ? detail
                             : &ngx_http_anythingllm_sentinel_conf
                                                             ->redis_master,
                      detail ? ")" : "\"");
    }

    ngx_http_anythingllm_sentinel_close(conn);

    ngx_http_anythingllm_sentinel_next =
                                   (ngx_http_anythingllm_sentinel_next + 1)
                                   % ngx_http_anythingllm_sentinel_conf
                                                           ->sentinels->nelts;

    if (ngx_http_anythingllm_sentinel_asking) {
        ngx_add_timer(&conn->reconnect, 1);
    }
}


/*
 * Frees the context (when called from one of its callbacks, hiredis
 * does it once the callback returns); the cleanup hook then releases
 * the nginx connection.
 */

static void
ngx_http_anythingllm_sentinel_close(ngx_http_anythingllm_redis_conn_t *conn)
{
    redisAsyncContext  *ac;

    if (conn->timer.timer_set) {
        ngx_del_timer(&conn->timer);
    }

    ac = conn->ac;

    if (ac == NULL) {
        return;
    }

    conn->ac = NULL;
    conn->state = NGX_HTTP_ANYTHINGLLM_REDIS_DOWN;

    redisAsyncFree(ac);
}


/* hiredis gave a sentinel connection up: refused, closed, an error */

static void
ngx_http_anythingllm_sentinel_gone(ngx_http_anythingllm_redis_conn_t *conn)
{
    ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                  "anythingllm: %s %V: %s", conn->name, &conn->addr,
                  conn->ac->errstr[0] ? conn->ac->errstr : "closed");

    if (conn->timer.timer_set) {
        ngx_del_timer(&conn->timer);
    }

    /* the io layer forgets the context when this returns */

    if (conn->subscriber) {
        conn->ac = NULL;
        conn->state = NGX_HTTP_ANYTHINGLLM_REDIS_DOWN;
        ngx_http_anythingllm_sentinel_watch_lost();
        return;
    }

    conn->ac = NULL;
    conn->state = NGX_HTTP_ANYTHINGLLM_REDIS_DOWN;
    ngx_http_anythingllm_sentinel_skip(NULL, NULL);
}


static void
ngx_http_anythingllm_sentinel_timeout(ngx_event_t *ev)
{
    ngx_http_anythingllm_redis_conn_t  *conn;

    conn = ev->data;

    if (conn->ac == NULL) {
        return;
    }

    ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                  "anythingllm: %s %V did not answer within %M ms",
                  conn->name, &conn->addr,
                  ngx_http_anythingllm_sentinel_conf->redis_timeout);

    if (conn->subscriber) {
        ngx_http_anythingllm_sentinel_close(conn);
        ngx_http_anythingllm_sentinel_watch_lost();
        return;
    }

    ngx_http_anythingllm_sentinel_skip(NULL, NULL);
}


/* the +switch-master subscription */

static void
ngx_http_anythingllm_sentinel_watch_handler(ngx_event_t *ev)
{
    ngx_http_anythingllm_redis_conn_t  *conn;

    conn = ev->data;

    if (ngx_exiting || ngx_quit || ngx_terminate) {
        return;
    }

    if (conn->c != NULL || conn->ac != NULL) {
        ngx_add_timer(&conn->reconnect, 1);
        return;
    }

    ngx_http_anythingllm_sentinel_watch();
}


static void
ngx_http_anythingllm_sentinel_watch(void)
{
    size_t                              argvlen[2];
    const char                         *argv[2];
    ngx_http_anythingllm_redis_addr_t  *a;
    ngx_http_anythingllm_redis_conn_t  *conn;
    ngx_http_anythingllm_main_conf_t   *amcf;

    amcf = ngx_http_anythingllm_sentinel_conf;
    conn = &ngx_http_anythingllm_sentinel_w;

    a = &ngx_http_anythingllm_sentinel_list(amcf)
                                     [ngx_http_anythingllm_sentinel_watched];

    if (ngx_http_anythingllm_redis_io_connect(conn, (char *) a->host,
                                  (int) a->port, NULL,
                                  ngx_http_anythingllm_sentinel_connected)
        != NGX_OK)
    {
        ngx_http_anythingllm_sentinel_watch_lost();
        return;
    }

    ngx_http_anythingllm_sentinel_auth(conn);

    argv[0] = "SUBSCRIBE";
    argvlen[0] = sizeof("SUBSCRIBE") - 1;
    argv[1] = "+switch-master";
    argvlen[1] = sizeof("+switch-master") - 1;

    (void) redisAsyncCommandArgv(conn->ac,
                                 ngx_http_anythingllm_sentinel_message,
                                 conn, 2, argv, argvlen);

    ngx_add_timer(&conn->timer, amcf->redis_timeout);
}


/* the watch is lost: the next sentinel, after a backoff */

static void
ngx_http_anythingllm_sentinel_watch_lost(void)
{
    ngx_http_anythingllm_redis_conn_t  *conn;

    conn = &ngx_http_anythingllm_sentinel_w;

    if (ngx_exiting || ngx_quit || ngx_terminate
        || conn->reconnect.timer_set)
    {
        return;
    }

    conn->backoff = (conn->backoff == 0)
                    ? NGX_HTTP_ANYTHINGLLM_SENTINEL_BACKOFF_MIN
                    : ngx_min(conn->backoff * 2,
                              NGX_HTTP_ANYTHINGLLM_SENTINEL_BACKOFF_MAX);

    ngx_http_anythingllm_sentinel_watched =
                                (ngx_http_anythingllm_sentinel_watched + 1)
                                % ngx_http_anythingllm_sentinel_conf
                                                           ->sentinels->nelts;

    ngx_add_timer(&conn->reconnect, conn->backoff);
}


static void
ngx_http_anythingllm_sentinel_message(redisAsyncContext *ac, void *reply,
    void *privdata)
{
    ngx_str_t                           err;
    redisReply                         *rp, *type;
    ngx_http_anythingllm_redis_conn_t  *conn;

    rp = reply;
    conn = privdata;

    if (rp == NULL || conn->ac != ac) {
        return;
    }

    if (rp->type == REDIS_REPLY_ERROR) {
        err.data = (u_char *) rp->str;
        err.len = rp->len;

        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                      "anythingllm: %s %V refused SUBSCRIBE +switch-master: "
                      "%V", conn->name, &conn->addr, &err);

        ngx_http_anythingllm_sentinel_close(conn);
        ngx_http_anythingllm_sentinel_watch_lost();
        return;
    }

    if (rp->type != REDIS_REPLY_ARRAY || rp->elements < 3
        || rp->element[0]->type != REDIS_REPLY_STRING)
    {
        return;
    }

    type = rp->element[0];

    if (type->len == 9 && ngx_strncmp(type->str, "subscribe", 9) == 0) {
        if (conn->timer.timer_set) {
            ngx_del_timer(&conn->timer);
        }

        conn->state = NGX_HTTP_ANYTHINGLLM_REDIS_UP;
        conn->backoff = 0;

        /* a switch announced before the subscription went unheard */

        ngx_http_anythingllm_sentinel_discover();
        return;
    }

    if (type->len == 7 && ngx_strncmp(type->str, "message", 7) == 0
        && rp->element[2]->type == REDIS_REPLY_STRING)
    {
        ngx_http_anythingllm_sentinel_switch(rp->element[2]);
    }
}


/* "<master> <old ip> <old port> <new ip> <new port>" */

static void
ngx_http_anythingllm_sentinel_switch(redisReply *msg)
{
    u_char     *p, *last, *f[5];
    size_t      len[5];
    ngx_int_t   port;
    ngx_str_t   master;
    ngx_uint_t  i;
    u_char      host[NGX_INET6_ADDRSTRLEN + 1];

    p = (u_char *) msg->str;
    last = p + msg->len;

    for (i = 0; i < 5; i++) {
        f[i] = p;

        while (p < last && *p != ' ') {
            p++;
        }

        len[i] = p - f[i];

        if (p < last) {
            p++;

        } else if (i < 4) {
            return;
        }
    }

    master = ngx_http_anythingllm_sentinel_conf->redis_master;

    if (len[0] != master.len || ngx_strncmp(f[0], master.data, len[0]) != 0)
    {
        return;
    }

    if (ngx_http_anythingllm_sentinel_addr(f[3], len[3], f[4], len[4], host,
                                           &port)
        != NGX_OK)
    {
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                      "anythingllm: sentinel announced an unusable primary "
                      "for \"%V\": \"%*s\"", &master, msg->len, msg->str);
        return;
    }

    ngx_log_error(NGX_LOG_NOTICE, ngx_cycle->log, 0,
                  "anythingllm: sentinels switched the primary of \"%V\" "
                  "to %s:%i", &master, host, port);

    ngx_http_anythingllm_sentinel_found(host, port, 1);
}
