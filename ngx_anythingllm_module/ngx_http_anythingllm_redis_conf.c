/*
 * Copyright (C) ngx_anythingllm authors
 *
 * Where Redis is (the anythingllm_redis directive) and what the
 * module's Redis keys and channel are called.  The connections are
 * ngx_http_anythingllm_redis.c's.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_anythingllm_module.h"


static ngx_int_t ngx_http_anythingllm_redis_ip_port(ngx_conf_t *cf,
    ngx_str_t *value, const char *what, ngx_http_anythingllm_redis_addr_t *a);
static char *ngx_http_anythingllm_redis_sentinels(ngx_conf_t *cf,
    ngx_http_anythingllm_main_conf_t *amcf, ngx_str_t *list);
static char *ngx_http_anythingllm_redis_check(ngx_conf_t *cf,
    ngx_http_anythingllm_main_conf_t *amcf);


/*
 * anythingllm_redis <ip:port | unix:/path> [db=N] [user=U] [password=P]
 *                   [timeout=100ms] [prefix=anythingllm:];
 * anythingllm_redis sentinel=<ip:port>[,<ip:port>...] master=<name>
 *                   [sentinel_user=U] [sentinel_password=P]
 *                   [db=N] [user=U] [password=P] [timeout=] [prefix=];
 *
 * Only IP literals and unix sockets: hiredis resolves names with a
 * blocking getaddrinfo(), which must never run in a worker.
 */

char *
ngx_http_anythingllm_redis(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_anythingllm_main_conf_t *amcf = conf;

    char                               *rv;
    ngx_str_t                          *value, s;
    ngx_uint_t                          i;
    ngx_http_anythingllm_redis_addr_t   a;

    if (amcf->redis_addr.data) {
        return "is duplicate";
    }

    value = cf->args->elts;
    i = 1;

    /* the single address, when given, comes first and has no "=" */

    if (ngx_strlchr(value[1].data, value[1].data + value[1].len, '=')
        == NULL)
    {
        i = 2;
        amcf->redis_addr = value[1];

        if (value[1].len > 5
            && ngx_strncmp(value[1].data, "unix:", 5) == 0)
        {
            amcf->redis_unix.len = value[1].len - 5;
            amcf->redis_unix.data = ngx_pnalloc(cf->pool,
                                                amcf->redis_unix.len + 1);
            if (amcf->redis_unix.data == NULL) {
                return NGX_CONF_ERROR;
            }

            ngx_cpystrn(amcf->redis_unix.data, value[1].data + 5,
                        amcf->redis_unix.len + 1);

        } else {
            if (ngx_http_anythingllm_redis_ip_port(cf, &value[1], "redis",
                                                   &a)
                != NGX_OK)
            {
                return NGX_CONF_ERROR;
            }

            amcf->redis_host.data = a.host;
            amcf->redis_host.len = ngx_strlen(a.host);
            amcf->redis_port = a.port;
        }
    }

    for ( /* void */ ; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "db=", 3) == 0) {
            amcf->redis_db = ngx_atoi(value[i].data + 3, value[i].len - 3);
            if (amcf->redis_db == NGX_ERROR) {
                goto invalid;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "user=", 5) == 0) {
            amcf->redis_user.data = value[i].data + 5;
            amcf->redis_user.len = value[i].len - 5;
            continue;
        }

        if (ngx_strncmp(value[i].data, "password=", 9) == 0) {
            amcf->redis_password.data = value[i].data + 9;
            amcf->redis_password.len = value[i].len - 9;
            continue;
        }

        if (ngx_strncmp(value[i].data, "timeout=", 8) == 0) {
            s.data = value[i].data + 8;
            s.len = value[i].len - 8;

            amcf->redis_timeout = ngx_parse_time(&s, 0);
            if (amcf->redis_timeout == (ngx_msec_t) NGX_ERROR
                || amcf->redis_timeout == 0)
            {
                goto invalid;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "prefix=", 7) == 0) {
            amcf->prefix.data = value[i].data + 7;
            amcf->prefix.len = value[i].len - 7;
            continue;
        }

        if (ngx_strncmp(value[i].data, "sentinel=", 9) == 0) {
            if (amcf->redis_addr.data || amcf->sentinels) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "\"%V\": anythingllm_redis takes one "
                                   "address or one sentinel= list",
                                   &value[i]);
                return NGX_CONF_ERROR;
            }

            s.data = value[i].data + 9;
            s.len = value[i].len - 9;

            rv = ngx_http_anythingllm_redis_sentinels(cf, amcf, &s);
            if (rv != NGX_CONF_OK) {
                return rv;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "master=", 7) == 0) {
            amcf->redis_master.data = value[i].data + 7;
            amcf->redis_master.len = value[i].len - 7;
            continue;
        }

        if (ngx_strncmp(value[i].data, "sentinel_user=", 14) == 0) {
            amcf->sentinel_user.data = value[i].data + 14;
            amcf->sentinel_user.len = value[i].len - 14;
            continue;
        }

        if (ngx_strncmp(value[i].data, "sentinel_password=", 18) == 0) {
            amcf->sentinel_password.data = value[i].data + 18;
            amcf->sentinel_password.len = value[i].len - 18;
            continue;
        }

        goto invalid;
    }

    return ngx_http_anythingllm_redis_check(cf, amcf);

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid parameter \"%V\"", &value[i]);

    return NGX_CONF_ERROR;
}


/* the parameters that only make sense together */

static char *
ngx_http_anythingllm_redis_check(ngx_conf_t *cf,
    ngx_http_anythingllm_main_conf_t *amcf)
{
    if (amcf->redis_addr.data == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "anythingllm_redis needs an address "
                           "(ip:port, unix:/path) or sentinel=");
        return NGX_CONF_ERROR;
    }

    if (amcf->sentinels && amcf->redis_master.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "anythingllm_redis sentinel= needs master=<name>, "
                           "the name the sentinels monitor");
        return NGX_CONF_ERROR;
    }

    if (amcf->sentinels == NULL
        && (amcf->redis_master.data || amcf->sentinel_user.data
            || amcf->sentinel_password.data))
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "anythingllm_redis master=, sentinel_user= and "
                           "sentinel_password= need sentinel=");
        return NGX_CONF_ERROR;
    }

    if (amcf->redis_user.data && amcf->redis_password.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "anythingllm_redis user= needs password=");
        return NGX_CONF_ERROR;
    }

    if (amcf->sentinel_user.data && amcf->sentinel_password.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "anythingllm_redis sentinel_user= needs "
                           "sentinel_password=");
        return NGX_CONF_ERROR;
    }

    if ((amcf->redis_user.data && amcf->redis_user.len == 0)
        || (amcf->sentinel_user.data && amcf->sentinel_user.len == 0))
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "anythingllm_redis: empty user name");
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


/* "ip:port,ip:port,...": every one an IPv4 literal */

static char *
ngx_http_anythingllm_redis_sentinels(ngx_conf_t *cf,
    ngx_http_anythingllm_main_conf_t *amcf, ngx_str_t *list)
{
    u_char                             *p, *last, *comma;
    ngx_str_t                           item;
    ngx_http_anythingllm_redis_addr_t  *a;

    amcf->sentinels = ngx_array_create(cf->pool, 3,
                                    sizeof(ngx_http_anythingllm_redis_addr_t));
    if (amcf->sentinels == NULL) {
        return NGX_CONF_ERROR;
    }

    amcf->redis_addr = *list;

    p = list->data;
    last = list->data + list->len;

    for ( ;; ) {
        comma = ngx_strlchr(p, last, ',');

        item.data = p;
        item.len = (comma ? comma : last) - p;

        a = ngx_array_push(amcf->sentinels);
        if (a == NULL) {
            return NGX_CONF_ERROR;
        }

        if (ngx_http_anythingllm_redis_ip_port(cf, &item, "sentinel", a)
            != NGX_OK)
        {
            return NGX_CONF_ERROR;
        }

        if (comma == NULL) {
            break;
        }

        p = comma + 1;
    }

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_anythingllm_redis_ip_port(ngx_conf_t *cf, ngx_str_t *value,
    const char *what, ngx_http_anythingllm_redis_addr_t *a)
{
    u_char     *colon, *host;
    size_t      len;
    ngx_int_t   n;

    colon = ngx_strlchr(value->data, value->data + value->len, ':');

    if (colon == NULL || value->len == 0 || value->data[0] == '[') {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid %s address \"%V\": use ip:port%s",
                           what, value,
                           what[0] == 'r' ? " or unix:/path" : "");
        return NGX_ERROR;
    }

    n = ngx_atoi(colon + 1, value->data + value->len - colon - 1);
    if (n < 1 || n > 65535) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid %s port in \"%V\"", what, value);
        return NGX_ERROR;
    }

    len = colon - value->data;

    host = ngx_pnalloc(cf->pool, len + 1);
    if (host == NULL) {
        return NGX_ERROR;
    }

    ngx_cpystrn(host, value->data, len + 1);

    if (len == 0 || ngx_inet_addr(host, len) == INADDR_NONE) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "%s address \"%V\" must be an IPv4 literal%s: "
                           "names would be resolved with a blocking call",
                           what, value,
                           what[0] == 'r' ? " or a unix socket" : "");
        return NGX_ERROR;
    }

    a->addr = *value;
    a->host = host;
    a->port = n;

    return NGX_OK;
}


/*
 * The names of Redis keys and channels: "<prefix>key:<digest>",
 * "<prefix>rl:<digest>:<minute>" (the minute appended by the caller in
 * "room"), "<prefix>conv", "<prefix>conv:until", "<prefix>revocations".
 */

ngx_int_t
ngx_http_anythingllm_redis_key(ngx_pool_t *pool, ngx_str_t *prefix,
    const char *name, const char *digest, size_t room, ngx_str_t *key)
{
    u_char  *p;
    size_t   len;

    len = ngx_strlen(name);

    p = ngx_pnalloc(pool, prefix->len + len
                          + (digest ? ALM_DIGEST_HEX_LEN : 0) + room);
    if (p == NULL) {
        return NGX_ERROR;
    }

    key->data = p;

    p = ngx_cpymem(p, prefix->data, prefix->len);
    p = ngx_cpymem(p, name, len);

    if (digest) {
        p = ngx_cpymem(p, digest, ALM_DIGEST_HEX_LEN);
    }

    key->len = p - key->data;

    return NGX_OK;
}
