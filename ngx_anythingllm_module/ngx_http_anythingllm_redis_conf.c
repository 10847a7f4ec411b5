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


/*
 * anythingllm_redis <ip:port | unix:/path> [db=N] [password=...]
 *                   [timeout=100ms] [prefix=anythingllm:];
 *
 * Only IP literals and unix sockets: hiredis resolves names with a
 * blocking getaddrinfo(), which must never run in a worker.
 */

char *
ngx_http_anythingllm_redis(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_anythingllm_main_conf_t *amcf = conf;

    u_char     *colon, *host;
    ngx_int_t   n;
    ngx_str_t  *value, s;
    ngx_uint_t  i;
    ngx_url_t   u;

    if (amcf->redis_addr.data) {
        return "is duplicate";
    }

    value = cf->args->elts;
    amcf->redis_addr = value[1];

    if (value[1].len > 5 && ngx_strncmp(value[1].data, "unix:", 5) == 0) {
        amcf->redis_unix.len = value[1].len - 5;
        amcf->redis_unix.data = ngx_pnalloc(cf->pool,
                                            amcf->redis_unix.len + 1);
        if (amcf->redis_unix.data == NULL) {
            return NGX_CONF_ERROR;
        }

        ngx_cpystrn(amcf->redis_unix.data, value[1].data + 5,
                    amcf->redis_unix.len + 1);

    } else {
        colon = ngx_strlchr(value[1].data, value[1].data + value[1].len,
                            ':');
        if (colon == NULL || value[1].data[0] == '[') {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid redis address \"%V\": "
                               "use ip:port or unix:/path", &value[1]);
            return NGX_CONF_ERROR;
        }

        n = ngx_atoi(colon + 1, value[1].data + value[1].len - colon - 1);
        if (n < 1 || n > 65535) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid redis port in \"%V\"", &value[1]);
            return NGX_CONF_ERROR;
        }

        ngx_memzero(&u, sizeof(ngx_url_t));
        u.url.data = value[1].data;
        u.url.len = colon - value[1].data;

        host = ngx_pnalloc(cf->pool, u.url.len + 1);
        if (host == NULL) {
            return NGX_CONF_ERROR;
        }

        ngx_cpystrn(host, u.url.data, u.url.len + 1);

        if (ngx_inet_addr(host, u.url.len) == INADDR_NONE) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "redis address \"%V\" must be an IPv4 "
                               "literal or a unix socket: names would "
                               "be resolved with a blocking call",
                               &value[1]);
            return NGX_CONF_ERROR;
        }

        amcf->redis_host.data = host;
        amcf->redis_host.len = u.url.len;
        amcf->redis_port = n;
    }

    for (i = 2; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "db=", 3) == 0) {
            amcf->redis_db = ngx_atoi(value[i].data + 3, value[i].len - 3);
            if (amcf->redis_db == NGX_ERROR) {
                goto invalid;
            }

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

        goto invalid;
    }

    return NGX_CONF_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid parameter \"%V\"", &value[i]);

    return NGX_CONF_ERROR;
}


/*
 * The names of Redis keys and channels: "<prefix>key:<digest>",
 * "<prefix>rl:<digest>:<minute>" (the minute appended by the caller in
 * "room"), "<prefix>conv:<hex>", "<prefix>convs", "<prefix>revocations".
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
