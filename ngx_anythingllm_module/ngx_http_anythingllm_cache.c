/*
 * Copyright (C) ngx_anythingllm authors
 *
 * Placeholder: shared-memory key cache.
 */


#include "ngx_http_anythingllm_module.h"


ngx_int_t
ngx_http_anythingllm_cache_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    return NGX_OK;
}


ngx_int_t
ngx_http_anythingllm_cache_get(ngx_shm_zone_t *zone, const char *digest,
    ngx_http_anythingllm_key_t *key, ngx_pool_t *pool)
{
    return NGX_DECLINED;
}


void
ngx_http_anythingllm_cache_put(ngx_shm_zone_t *zone,
    const ngx_http_anythingllm_key_t *key, time_t ttl)
{
}


void
ngx_http_anythingllm_cache_put_negative(ngx_shm_zone_t *zone,
    const char *digest, time_t ttl)
{
}


void
ngx_http_anythingllm_cache_delete(ngx_shm_zone_t *zone, const char *digest)
{
}
