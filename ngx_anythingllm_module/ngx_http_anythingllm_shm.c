/*
 * Copyright (C) ngx_anythingllm authors
 *
 * The module's shared-memory zones (the key cache, the metrics): adding
 * one at configuration time and finding or making its data when the
 * cycle starts.  A zone's data is one block at the start of its slab
 * pool (shpool->data); a reload that keeps the zone's name and size
 * hands the new cycle the same block, so what it holds goes on.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_anythingllm_module.h"


ngx_shm_zone_t *
ngx_http_anythingllm_shm_add(ngx_conf_t *cf, ngx_str_t *name, size_t size,
    ngx_shm_zone_init_pt init, void *data, const char *used)
{
    ngx_shm_zone_t  *zone;

    zone = ngx_shared_memory_add(cf, name, size,
                                 &ngx_http_anythingllm_module);
    if (zone == NULL) {
        return NULL;
    }

    if (zone->data) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, used, name);
        return NULL;
    }

    zone->init = init;
    zone->data = data;

    return zone;
}


ngx_int_t
ngx_http_anythingllm_shm_init(ngx_shm_zone_t *shm_zone,
    ngx_http_anythingllm_shm_t *old, size_t size, const char *what,
    ngx_http_anythingllm_shm_t *shm)
{
    size_t            len;
    ngx_slab_pool_t  *shpool;

    if (old) {
        /* a reload: the data survives */
        *shm = *old;
        return NGX_OK;
    }

    shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    shm->shpool = shpool;

    if (shm_zone->shm.exists) {
        shm->sh = shpool->data;
        return NGX_OK;
    }

    shm->sh = ngx_slab_calloc(shpool, size);
    if (shm->sh == NULL) {
        return NGX_ERROR;
    }

    shpool->data = shm->sh;

    len = sizeof(" in  zone \"\"") + ngx_strlen(what)
          + shm_zone->shm.name.len;

    shpool->log_ctx = ngx_slab_alloc(shpool, len);
    if (shpool->log_ctx == NULL) {
        return NGX_ERROR;
    }

    ngx_sprintf(shpool->log_ctx, " in %s zone \"%V\"%Z", what,
                &shm_zone->shm.name);

    /*
     * a full zone is the normal case: its user makes room, oldest
     * entries first, and says nothing
     */
    shpool->log_nomem = 0;

    return NGX_DECLINED;
}


/* the slab slot an allocation of "len" bytes takes: a power of two */

size_t
ngx_http_anythingllm_shm_slot(size_t len)
{
    size_t  size;

    for (size = 8; size < len; size <<= 1) { /* void */ }

    return size;
}
