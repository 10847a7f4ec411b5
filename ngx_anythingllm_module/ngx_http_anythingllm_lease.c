/*
 * Copyright (C) ngx_anythingllm authors
 *
 * The leases of the minute's quota, as the key cache's entries hold
 * them: the shared-memory side of ngx_http_anythingllm_rate.c.  Every
 * worker of the nginx admits from the same lease, under the zone's
 * lock; the entry's generation tells a fetch answered late that the
 * entry it was for has gone (revoked, changed, expired), and what the
 * entry cannot take then is given back by the caller.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_anythingllm_module.h"
#include "ngx_http_anythingllm_cache.h"


/* a fetch unanswered for this long beyond the Redis timeout is lost */
#define NGX_HTTP_ANYTHINGLLM_LEASE_LOST  1000


static ngx_uint_t ngx_http_anythingllm_lease_max(ngx_uint_t rpm);
static ngx_http_anythingllm_cache_node_t *ngx_http_anythingllm_lease_entry(
    ngx_http_anythingllm_cache_sh_t *sh, const char *digest);


/* the largest lease of a key: under 2, the key is counted request by request */

static ngx_uint_t
ngx_http_anythingllm_lease_max(ngx_uint_t rpm)
{
    return ngx_min(rpm / NGX_HTTP_ANYTHINGLLM_LEASE_SHARE,
                   NGX_HTTP_ANYTHINGLLM_LEASE_MAX);
}


/* the live valid entry of a digest, locked */

static ngx_http_anythingllm_cache_node_t *
ngx_http_anythingllm_lease_entry(ngx_http_anythingllm_cache_sh_t *sh,
    const char *digest)
{
    uint32_t                            hash;
    ngx_http_anythingllm_cache_node_t  *cn;

    hash = ngx_http_anythingllm_cache_hash((u_char *) digest);

    cn = ngx_http_anythingllm_cache_lookup(sh, (u_char *) digest, hash);

    if (cn == NULL || cn->kind != NGX_HTTP_ANYTHINGLLM_CACHE_VALID
        || (ngx_msec_int_t) (cn->until - ngx_current_msec) <= 0)
    {
        return NULL;
    }

    return cn;
}


/*
 * One request of the key against its lease of lease->minute.  The
 * lease starts at one request and doubles with each fetch Redis grants
 * whole, up to its largest: a key used now and then is counted request
 * by request, and what an idle nginx holds is what it used lately.  A
 * fetch is asked before the lease runs dry (the request that asks does
 * not wait for it); only a request that finds it empty waits, and
 * while one fetch is in flight, others are counted alone.
 */

void
ngx_http_anythingllm_lease_take(ngx_shm_zone_t *zone,
    const ngx_http_anythingllm_key_t *key,
    ngx_http_anythingllm_lease_t *lease)
{
    ngx_slab_pool_t                    *shpool;
    ngx_http_anythingllm_main_conf_t   *amcf;
    ngx_http_anythingllm_cache_sh_t    *sh;
    ngx_http_anythingllm_cache_node_t  *cn;

    lease->verdict = NGX_HTTP_ANYTHINGLLM_LEASE_COUNT;
    lease->size = 0;
    lease->used = 0;
    lease->gen = 0;

    if (zone == NULL || ngx_http_anythingllm_lease_max(key->rpm) < 2) {
        return;
    }

    amcf = zone->data;

    sh = ngx_http_anythingllm_cache_lock(zone, &shpool);

    cn = ngx_http_anythingllm_lease_entry(sh, key->digest);

    if (cn == NULL || cn->rpm != key->rpm) {
        goto done;
    }

    lease->gen = cn->gen;

    if (cn->lease_minute != lease->minute) {
        /* a new minute: what was left is worth nothing now */
        cn->lease_minute = lease->minute;
        cn->lease_left = 0;
        cn->lease_top = 0;
        cn->lease = 0;
    }

    if ((cn->lease & NGX_HTTP_ANYTHINGLLM_CACHE_FETCHING)
        && ngx_current_msec - cn->lease_asked
           > amcf->redis_timeout + NGX_HTTP_ANYTHINGLLM_LEASE_LOST)
    {
        cn->lease &= ~NGX_HTTP_ANYTHINGLLM_CACHE_FETCHING;
    }

    if (cn->lease_left) {
        cn->lease_left--;

        lease->verdict = NGX_HTTP_ANYTHINGLLM_LEASE_TAKEN;
        lease->used = cn->lease_top - cn->lease_left;

        if (cn->lease_left > cn->lease_size / 4 || cn->lease) {
            goto done;
        }

    } else if (cn->lease & NGX_HTTP_ANYTHINGLLM_CACHE_SPENT) {
        lease->verdict = NGX_HTTP_ANYTHINGLLM_LEASE_SPENT;
        goto done;

    } else if (cn->lease & NGX_HTTP_ANYTHINGLLM_CACHE_FETCHING) {
        goto done;

    } else {
        lease->verdict = NGX_HTTP_ANYTHINGLLM_LEASE_FETCH;
    }

    cn->lease |= NGX_HTTP_ANYTHINGLLM_CACHE_FETCHING;
    cn->lease_asked = ngx_current_msec;
    lease->size = cn->lease_size;

done:

    ngx_shmtx_unlock(&shpool->mutex);
}


/*
 * A fetch answered.  Whatever the entry cannot take (the entry was
 * replaced, the minute turned) is returned to the caller, to be given
 * back to Redis while its minute lasts.
 */

ngx_uint_t
ngx_http_anythingllm_lease_credit(ngx_shm_zone_t *zone,
    const char *digest, ngx_uint_t gen, time_t minute, ngx_uint_t size,
    ngx_uint_t left, ngx_uint_t top, ngx_uint_t flags)
{
    ngx_slab_pool_t                    *shpool;
    ngx_http_anythingllm_cache_sh_t    *sh;
    ngx_http_anythingllm_cache_node_t  *cn;

    if (zone == NULL) {
        return left;
    }

    sh = ngx_http_anythingllm_cache_lock(zone, &shpool);

    cn = ngx_http_anythingllm_lease_entry(sh, digest);

    if (cn == NULL || cn->gen != gen || cn->lease_minute != minute) {
        goto done;
    }

    cn->lease &= ~NGX_HTTP_ANYTHINGLLM_CACHE_FETCHING;

    if (flags & NGX_HTTP_ANYTHINGLLM_LEASE_FAILED) {
        /* Redis is away or refuses: start again from one request */
        cn->lease_size = 1;
        goto done;
    }

    if (flags & NGX_HTTP_ANYTHINGLLM_LEASE_LAST) {
        cn->lease |= NGX_HTTP_ANYTHINGLLM_CACHE_SPENT;
    }

    if (flags & NGX_HTTP_ANYTHINGLLM_LEASE_FULL) {
        cn->lease_size = ngx_min(ngx_max(cn->lease_size, size * 2),
                                 ngx_http_anythingllm_lease_max(cn->rpm));
    }

    cn->lease_left += left;
    cn->lease_top = ngx_max(cn->lease_top, top);
    left = 0;

done:

    ngx_shmtx_unlock(&shpool->mutex);

    return left;
}


/*
 * A request of a leased key counted alone (while a fetch was in
 * flight): its count, the highest of the minute known, keeps the
 * lease's estimate of the minute's use from falling behind.
 */

void
ngx_http_anythingllm_lease_seen(ngx_shm_zone_t *zone, const char *digest,
    time_t minute, ngx_uint_t count)
{
    ngx_slab_pool_t                    *shpool;
    ngx_http_anythingllm_cache_sh_t    *sh;
    ngx_http_anythingllm_cache_node_t  *cn;

    if (zone == NULL) {
        return;
    }

    sh = ngx_http_anythingllm_cache_lock(zone, &shpool);

    cn = ngx_http_anythingllm_lease_entry(sh, digest);

    if (cn && cn->lease_minute == minute && cn->lease_top < count) {
        cn->lease_top = count;
    }

    ngx_shmtx_unlock(&shpool->mutex);
}
