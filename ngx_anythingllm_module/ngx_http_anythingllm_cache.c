/*
 * Copyright (C) ngx_anythingllm authors
 *
 * The shared-memory key cache: what Redis said about a key digest,
 * shared by all workers.  It holds digests, never keys.
 *
 * Entries are kept in a red-black tree keyed by the digest's first 8
 * hex digits (the whole digest is compared) and in one of two LRU
 * queues.  Three kinds:
 *
 *   valid     the key's record (name, scopes, workspaces, rpm, expires,
 *             disabled), kept for "valid" seconds; the key's own
 *             "expires" is judged on every use;
 *   unknown   Redis has no such key, kept for "invalid" seconds;
 *   revoked   a revocation was received: a miss, which for a short
 *             while also keeps out the answers of lookups that were
 *             already in flight when the key was revoked (they read
 *             the record before it was deleted).
 *
 * Unknown entries cost a client nothing to make (any string will do),
 * so they have their own queue and at most a quarter of the zone: when
 * they reach their share, or the zone is full, the oldest unknown entry
 * goes.  They never displace a valid or revoked entry; those make room
 * among themselves, least recently used first, once no unknown entry
 * is left to drop.
 *
 * After a flush (the revocations channel was lost for a while), the
 * answers of lookups started before the flush are not stored either.
 * Such a flush keeps the valid entries as "stale": a miss, looked up
 * again, but what a key is judged by when that lookup cannot reach
 * Redis, as a valid entry is (a failover flushes the cache of every
 * worker as soon as one of them is subscribed again, while the others
 * may still be looking for the new primary).  A revocation of every
 * key drops them.
 * Times are nginx's monotonic milliseconds, which all workers share.
 *
 * The revocations channel's messages come here from the Redis
 * subscriber of ngx_http_anythingllm_redis.c.
 *
 * A valid entry of a key with a large enough rpm also holds the lease
 * of the minute's quota that this nginx took from Redis (see
 * ngx_http_anythingllm_rate.c): every worker admits from it under the
 * zone's lock.  An entry that goes (revoked, changed, expired, pushed
 * out) gives what is left of its lease back to Redis.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_anythingllm_module.h"
#include "ngx_http_anythingllm_cache.h"


/* a record larger than this is used but not cached */
#define NGX_HTTP_ANYTHINGLLM_CACHE_MAX_DATA  65536

/* how long a revocation keeps older lookups out of the cache */
#define NGX_HTTP_ANYTHINGLLM_CACHE_REVOKE_HOLD  1000

/* the leases of entries dropped under the lock, given back after it */
#define NGX_HTTP_ANYTHINGLLM_CACHE_RETURNS  16


typedef struct {
    char                        digest[ALM_DIGEST_HEX_LEN];
    time_t                      minute;
    ngx_uint_t                  n;
} ngx_http_anythingllm_cache_return_t;


#define ngx_http_anythingllm_cache_queue(sh, cn)                             \
    ((cn)->kind == NGX_HTTP_ANYTHINGLLM_CACHE_UNKNOWN                        \
     ? &(sh)->unknown : &(sh)->queue)


static ngx_int_t ngx_http_anythingllm_cache_add_zone(ngx_conf_t *cf,
    ngx_http_anythingllm_main_conf_t *amcf, ngx_str_t *name, size_t size,
    const char *used);
static ngx_int_t ngx_http_anythingllm_cache_init_zone(
    ngx_shm_zone_t *shm_zone, void *data);
static void ngx_http_anythingllm_cache_revoke(ngx_shm_zone_t *zone,
    const char *digest, ngx_msec_t hold);
static void ngx_http_anythingllm_cache_flush(ngx_shm_zone_t *zone,
    ngx_uint_t keep);
static void ngx_http_anythingllm_cache_give_back(
    ngx_http_anythingllm_cache_node_t *cn);
static ngx_http_anythingllm_cache_sh_t *ngx_http_anythingllm_cache_find(
    ngx_shm_zone_t *zone, const char *digest, ngx_slab_pool_t **shpool,
    ngx_http_anythingllm_cache_node_t **cn);
static ngx_int_t ngx_http_anythingllm_cache_copy(
    ngx_http_anythingllm_cache_node_t *cn, ngx_http_anythingllm_key_t *key,
    ngx_pool_t *pool);
static ngx_http_anythingllm_cache_node_t *ngx_http_anythingllm_cache_make(
    ngx_http_anythingllm_cache_sh_t *sh, ngx_slab_pool_t *shpool,
    const u_char *digest, uint32_t hash, ngx_msec_t since, size_t data_len,
    ngx_uint_t unknown);
static void ngx_http_anythingllm_cache_rbtree_insert(
    ngx_rbtree_node_t *temp, ngx_rbtree_node_t *node,
    ngx_rbtree_node_t *sentinel);
static void ngx_http_anythingllm_cache_remove(
    ngx_http_anythingllm_cache_sh_t *sh, ngx_slab_pool_t *shpool,
    ngx_http_anythingllm_cache_node_t *cn);
static ngx_uint_t ngx_http_anythingllm_cache_expire(
    ngx_http_anythingllm_cache_sh_t *sh, ngx_slab_pool_t *shpool,
    ngx_queue_t *queue, ngx_uint_t force);
static ngx_http_anythingllm_cache_node_t *ngx_http_anythingllm_cache_alloc(
    ngx_http_anythingllm_cache_sh_t *sh, ngx_slab_pool_t *shpool,
    size_t data_len, ngx_uint_t unknown);
static ngx_uint_t ngx_http_anythingllm_cache_newer(
    ngx_http_anythingllm_cache_node_t *cn, ngx_msec_t since);
static void ngx_http_anythingllm_cache_mark(ngx_shm_zone_t *zone,
    const char *digest, ngx_uint_t kind, ngx_msec_t stamp, ngx_msec_t until);
static void ngx_http_anythingllm_cache_insert(
    ngx_http_anythingllm_cache_sh_t *sh,
    ngx_http_anythingllm_cache_node_t *cn, const u_char *digest,
    uint32_t hash);


/*
 * The leases of the entries removed while the lock is held: the worker
 * sends them back to Redis once it has let the lock go.  More at once
 * than there is room for are lost: Redis's count of those minutes
 * stays higher than what was admitted, never lower.
 */

static ngx_http_anythingllm_cache_return_t
    ngx_http_anythingllm_cache_returns[NGX_HTTP_ANYTHINGLLM_CACHE_RETURNS];
static ngx_uint_t  ngx_http_anythingllm_cache_nreturns;


/* anythingllm_key_cache zone=NAME:SIZE [valid=30s] [invalid=5s]; */

char *
ngx_http_anythingllm_key_cache(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_anythingllm_main_conf_t *amcf = conf;

    u_char     *p;
    ssize_t     size;
    time_t      t;
    ngx_str_t  *value, name, s;
    ngx_uint_t  i;

    if (amcf->cache_zone) {
        return "is duplicate";
    }

    value = cf->args->elts;
    name.len = 0;
    size = 0;

    for (i = 1; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "zone=", 5) == 0) {
            name.data = value[i].data + 5;

            p = (u_char *) ngx_strchr(name.data, ':');
            if (p == NULL) {
                goto invalid;
            }

            name.len = p - name.data;

            s.data = p + 1;
            s.len = value[i].data + value[i].len - s.data;

            size = ngx_parse_size(&s);
            if (size == NGX_ERROR) {
                goto invalid;
            }

            if (size < (ssize_t) (8 * ngx_pagesize)) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "zone \"%V\" is too small", &value[i]);
                return NGX_CONF_ERROR;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "valid=", 6) == 0
            || ngx_strncmp(value[i].data, "invalid=", 8) == 0)
        {
            s.data = (u_char *) ngx_strchr(value[i].data, '=') + 1;
            s.len = value[i].data + value[i].len - s.data;

            t = ngx_parse_time(&s, 1);
            if (t == (time_t) NGX_ERROR) {
                goto invalid;
            }

            if (value[i].data[0] == 'v') {
                amcf->cache_valid = t;

            } else {
                amcf->cache_invalid = t;
            }

            continue;
        }

        goto invalid;
    }

    if (name.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"%V\" must have \"zone\" parameter",
                           &cmd->name);
        return NGX_CONF_ERROR;
    }

    if (ngx_http_anythingllm_cache_add_zone(cf, amcf, &name, size,
                                            "duplicate zone \"%V\"")
        != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid parameter \"%V\"", &value[i]);

    return NGX_CONF_ERROR;
}


static ngx_int_t
ngx_http_anythingllm_cache_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_http_anythingllm_main_conf_t  *oamcf = data;

    ngx_int_t                          rc;
    ngx_http_anythingllm_cache_sh_t   *sh;
    ngx_http_anythingllm_main_conf_t  *amcf;

    amcf = shm_zone->data;

    /* a reload: the entries survive */

    rc = ngx_http_anythingllm_shm_init(shm_zone, oamcf ? &oamcf->cache : NULL,
                                       sizeof(ngx_http_anythingllm_cache_sh_t),
                                       "anythingllm key cache", &amcf->cache);
    if (rc != NGX_DECLINED) {
        return rc;
    }

    sh = amcf->cache.sh;

    ngx_rbtree_init(&sh->rbtree, &sh->sentinel,
                    ngx_http_anythingllm_cache_rbtree_insert);
    ngx_queue_init(&sh->queue);
    ngx_queue_init(&sh->unknown);
    sh->flushed = 0;

    /* a quarter of the zone, counted in slab slots of an unknown entry */

    sh->unknown_n = 0;
    sh->unknown_max = shm_zone->shm.size / 4
                      / ngx_http_anythingllm_shm_slot(
                            offsetof(ngx_rbtree_node_t, color)
                            + offsetof(ngx_http_anythingllm_cache_node_t,
                                       data));

    if (sh->unknown_max == 0) {
        sh->unknown_max = 1;
    }

    return NGX_OK;
}


/*
 * The zone used when anythingllm_auth is on and anythingllm_key_cache
 * is not given: without a cache every request would wait for Redis and
 * no key would keep working while Redis is away.
 */

ngx_int_t
ngx_http_anythingllm_cache_default_zone(ngx_conf_t *cf,
    ngx_http_anythingllm_main_conf_t *amcf)
{
    ngx_str_t  name = ngx_string("anythingllm_keys");

    return ngx_http_anythingllm_cache_add_zone(cf, amcf, &name,
                                   NGX_HTTP_ANYTHINGLLM_CACHE_DEFAULT_SIZE,
                                   "shared memory zone \"%V\" is already used");
}


/* "used": what is logged when the zone's name is taken already */

static ngx_int_t
ngx_http_anythingllm_cache_add_zone(ngx_conf_t *cf,
    ngx_http_anythingllm_main_conf_t *amcf, ngx_str_t *name, size_t size,
    const char *used)
{
    amcf->cache_zone = ngx_http_anythingllm_shm_add(cf, name, size,
                                       ngx_http_anythingllm_cache_init_zone,
                                       amcf, used);

    return amcf->cache_zone ? NGX_OK : NGX_ERROR;
}


/*
 * The entries of the zone now, for the metrics: read without the lock,
 * as one word.  A zone a reload replaced starts from none.
 */

ngx_atomic_uint_t
ngx_http_anythingllm_cache_entries(ngx_http_anythingllm_main_conf_t *amcf)
{
    ngx_http_anythingllm_cache_sh_t  *sh;

    sh = amcf->cache.sh;

    return sh ? *(volatile ngx_uint_t *) &sh->entries : 0;
}


/* the zone's tree and queues, locked */

ngx_http_anythingllm_cache_sh_t *
ngx_http_anythingllm_cache_lock(ngx_shm_zone_t *zone,
    ngx_slab_pool_t **shpool)
{
    ngx_http_anythingllm_main_conf_t  *amcf;

    amcf = zone->data;
    *shpool = amcf->cache.shpool;

    ngx_shmtx_lock(&(*shpool)->mutex);

    return amcf->cache.sh;
}


/* lets the lock go, then gives back the leases of the entries dropped */

void
ngx_http_anythingllm_cache_unlock(ngx_shm_zone_t *zone,
    ngx_slab_pool_t *shpool)
{
    ngx_uint_t                            i, n;
    ngx_http_anythingllm_cache_return_t  *ret;

    ngx_shmtx_unlock(&shpool->mutex);

    n = ngx_http_anythingllm_cache_nreturns;
    ngx_http_anythingllm_cache_nreturns = 0;

    for (i = 0; i < n; i++) {
        ret = &ngx_http_anythingllm_cache_returns[i];

        ngx_http_anythingllm_cache_lease_return(zone->data, ret->digest,
                                                ret->minute, ret->n);
    }
}


/*
 * Counts of a lease given back, while their minute lasts.  Unanswered:
 * one lost (Redis away) leaves Redis's count higher than what was
 * admitted, never lower.
 */

void
ngx_http_anythingllm_cache_lease_return(ngx_http_anythingllm_main_conf_t *amcf,
    const char *digest, time_t minute, ngx_uint_t n)
{
    u_char      *p, *name;
    size_t       argvlen[3];
    const char  *argv[3];
    u_char       num[NGX_INT_T_LEN];

    name = ngx_alloc(amcf->prefix.len + sizeof("rl::") - 1
                     + ALM_DIGEST_HEX_LEN + NGX_TIME_T_LEN, ngx_cycle->log);
    if (name == NULL) {
        return;
    }

    p = ngx_sprintf(name, "%Vrl:%*s:%T", &amcf->prefix,
                    (size_t) ALM_DIGEST_HEX_LEN, digest, minute);

    argv[0] = "DECRBY";
    argvlen[0] = sizeof("DECRBY") - 1;
    argv[1] = (const char *) name;
    argvlen[1] = p - name;
    argv[2] = (const char *) num;
    argvlen[2] = ngx_sprintf(num, "%ui", n) - num;

    /* hiredis has copied the command when this returns */

    (void) ngx_http_anythingllm_redis_command(NULL, NULL, 3, argv, argvlen);

    ngx_free(name);

    ngx_log_debug3(NGX_LOG_DEBUG_HTTP, ngx_cycle->log, 0,
                   "anythingllm: %ui of the lease of key %*s given back",
                   n, (size_t) ALM_KEY_ID_LEN, digest);
}


/* the zone locked, and the entry of a digest in it, or NULL */

static ngx_http_anythingllm_cache_sh_t *
ngx_http_anythingllm_cache_find(ngx_shm_zone_t *zone, const char *digest,
    ngx_slab_pool_t **shpool, ngx_http_anythingllm_cache_node_t **cn)
{
    ngx_http_anythingllm_cache_sh_t  *sh;

    sh = ngx_http_anythingllm_cache_lock(zone, shpool);

    *cn = ngx_http_anythingllm_cache_lookup(sh, (u_char *) digest,
                                     ngx_http_anythingllm_cache_hash(
                                                        (u_char *) digest));

    return sh;
}


/*
 * NGX_OK: a valid entry, copied into "key" (strings in "pool");
 * NGX_ABORT: Redis said the key does not exist; NGX_DECLINED: a miss;
 * NGX_ERROR: no memory.
 */

ngx_int_t
ngx_http_anythingllm_cache_get(ngx_shm_zone_t *zone, const char *digest,
    ngx_http_anythingllm_key_t *key, ngx_pool_t *pool)
{
    ngx_int_t                           rc;
    ngx_slab_pool_t                    *shpool;
    ngx_http_anythingllm_cache_sh_t    *sh;
    ngx_http_anythingllm_cache_node_t  *cn;

    if (zone == NULL) {
        return NGX_DECLINED;
    }

    sh = ngx_http_anythingllm_cache_find(zone, digest, &shpool, &cn);

    if (cn == NULL) {
        rc = NGX_DECLINED;
        goto done;
    }

    if ((ngx_msec_int_t) (cn->until - ngx_current_msec) <= 0) {
        ngx_http_anythingllm_cache_remove(sh, shpool, cn);
        rc = NGX_DECLINED;
        goto done;
    }

    if (cn->kind == NGX_HTTP_ANYTHINGLLM_CACHE_REVOKED
        || cn->kind == NGX_HTTP_ANYTHINGLLM_CACHE_STALE)
    {
        rc = NGX_DECLINED;
        goto done;
    }

    ngx_queue_remove(&cn->queue);
    ngx_queue_insert_head(ngx_http_anythingllm_cache_queue(sh, cn),
                          &cn->queue);

    if (cn->kind == NGX_HTTP_ANYTHINGLLM_CACHE_UNKNOWN) {
        rc = NGX_ABORT;
        goto done;
    }

    rc = ngx_http_anythingllm_cache_copy(cn, key, pool);

done:

    ngx_http_anythingllm_cache_unlock(zone, shpool);

    ngx_http_anythingllm_metrics_add(rc == NGX_DECLINED
                                     ? NGX_HTTP_ANYTHINGLLM_M_CACHE_MISSES
                                     : NGX_HTTP_ANYTHINGLLM_M_CACHE_HITS, 1);

    return rc;
}


/*
 * The stale entry of a digest (see above), for a key whose lookup could
 * not reach Redis: NGX_OK, copied as by cache_get(); NGX_DECLINED: none.
 */

ngx_int_t
ngx_http_anythingllm_cache_get_stale(ngx_shm_zone_t *zone,
    const char *digest, ngx_http_anythingllm_key_t *key, ngx_pool_t *pool)
{
    ngx_int_t                           rc;
    ngx_slab_pool_t                    *shpool;
    ngx_http_anythingllm_cache_node_t  *cn;

    if (zone == NULL) {
        return NGX_DECLINED;
    }

    (void) ngx_http_anythingllm_cache_find(zone, digest, &shpool, &cn);

    if (cn == NULL || cn->kind != NGX_HTTP_ANYTHINGLLM_CACHE_STALE
        || (ngx_msec_int_t) (cn->until - ngx_current_msec) <= 0)
    {
        rc = NGX_DECLINED;

    } else {
        rc = ngx_http_anythingllm_cache_copy(cn, key, pool);
    }

    ngx_http_anythingllm_cache_unlock(zone, shpool);

    return rc;
}


/* a valid or stale entry's record into "key", its strings in "pool" */

static ngx_int_t
ngx_http_anythingllm_cache_copy(ngx_http_anythingllm_cache_node_t *cn,
    ngx_http_anythingllm_key_t *key, ngx_pool_t *pool)
{
    u_char  *p;

    p = ngx_pnalloc(pool, cn->name_len + cn->workspaces_len + 1);
    if (p == NULL) {
        return NGX_ERROR;
    }

    ngx_memcpy(p, cn->data, cn->name_len + cn->workspaces_len);

    key->name.data = p;
    key->name.len = cn->name_len;
    key->workspaces.data = p + cn->name_len;
    key->workspaces.len = cn->workspaces_len;
    key->scopes = cn->scopes;
    key->rpm = cn->rpm;
    key->tpm = cn->tpm;
    key->tpd = cn->tpd;
    key->expires = cn->expires;
    key->disabled = cn->disabled ? 1 : 0;

    return NGX_OK;
}


/*
 * Whether a live entry holds newer news of the key than a lookup sent
 * at "since": lookups of one key from several workers can answer out
 * of order, and the one that read Redis before a revocation must not
 * bring the key back after it.  A revocation wins a tie.
 */

static ngx_uint_t
ngx_http_anythingllm_cache_newer(ngx_http_anythingllm_cache_node_t *cn,
    ngx_msec_t since)
{
    ngx_msec_int_t  d;

    if ((ngx_msec_int_t) (cn->until - ngx_current_msec) <= 0) {
        return 0;
    }

    d = (ngx_msec_int_t) (cn->stamp - since);

    return d > 0 || (d == 0 && cn->kind == NGX_HTTP_ANYTHINGLLM_CACHE_REVOKED);
}


/*
 * Stores what a lookup started at "since" read from Redis, unless the
 * key was revoked, changed or the cache flushed after that.
 */

void
ngx_http_anythingllm_cache_put(ngx_shm_zone_t *zone,
    const ngx_http_anythingllm_key_t *key, time_t ttl, ngx_msec_t since)
{
    u_char                             *p;
    size_t                              len;
    uint32_t                            hash;
    ngx_slab_pool_t                    *shpool;
    ngx_http_anythingllm_cache_sh_t    *sh;
    ngx_http_anythingllm_cache_node_t  *cn;

    if (zone == NULL || ttl <= 0) {
        return;
    }

    len = key->name.len + key->workspaces.len;

    if (len > NGX_HTTP_ANYTHINGLLM_CACHE_MAX_DATA) {
        return;
    }

    hash = ngx_http_anythingllm_cache_hash((u_char *) key->digest);

    sh = ngx_http_anythingllm_cache_lock(zone, &shpool);

    if ((ngx_msec_int_t) (sh->flushed - since) >= 0) {
        goto done;
    }

    cn = ngx_http_anythingllm_cache_make(sh, shpool, (u_char *) key->digest,
                                         hash, since, len, 0);
    if (cn == NULL) {
        goto done;
    }

    cn->kind = NGX_HTTP_ANYTHINGLLM_CACHE_VALID;
    cn->disabled = key->disabled;
    cn->scopes = key->scopes;
    cn->name_len = key->name.len;
    cn->workspaces_len = key->workspaces.len;
    cn->until = ngx_current_msec + (ngx_msec_t) ttl * 1000;
    cn->stamp = since;
    cn->expires = key->expires;
    cn->rpm = key->rpm;
    cn->tpm = key->tpm;
    cn->tpd = key->tpd;
    cn->gen = ++sh->gen;

    p = cn->data;

    if (key->name.len) {
        p = ngx_cpymem(p, key->name.data, key->name.len);
    }

    if (key->workspaces.len) {
        ngx_memcpy(p, key->workspaces.data, key->workspaces.len);
    }

    ngx_http_anythingllm_cache_insert(sh, cn, (u_char *) key->digest, hash);

done:

    ngx_http_anythingllm_cache_unlock(zone, shpool);
}


void
ngx_http_anythingllm_cache_put_negative(ngx_shm_zone_t *zone,
    const char *digest, time_t ttl, ngx_msec_t since)
{
    if (ttl > 0) {
        ngx_http_anythingllm_cache_mark(zone, digest,
                                        NGX_HTTP_ANYTHINGLLM_CACHE_UNKNOWN,
                                        since,
                                        ngx_current_msec
                                        + (ngx_msec_t) ttl * 1000);
    }
}


/*
 * A revocation: the entry becomes a "revoked" marker for "hold"
 * milliseconds, a miss that keeps older lookups from storing it again.
 */

static void
ngx_http_anythingllm_cache_revoke(ngx_shm_zone_t *zone, const char *digest,
    ngx_msec_t hold)
{
    ngx_http_anythingllm_cache_mark(zone, digest,
                                    NGX_HTTP_ANYTHINGLLM_CACHE_REVOKED,
                                    ngx_current_msec,
                                    ngx_current_msec + hold);
}


/*
 * Puts a marker, an entry without a record ("unknown" or "revoked"),
 * in the place of the digest's entry, unless that holds newer news.
 */

static void
ngx_http_anythingllm_cache_mark(ngx_shm_zone_t *zone, const char *digest,
    ngx_uint_t kind, ngx_msec_t stamp, ngx_msec_t until)
{
    uint32_t                            hash;
    ngx_slab_pool_t                    *shpool;
    ngx_http_anythingllm_cache_sh_t    *sh;
    ngx_http_anythingllm_cache_node_t  *cn;

    if (zone == NULL) {
        return;
    }

    hash = ngx_http_anythingllm_cache_hash((u_char *) digest);

    sh = ngx_http_anythingllm_cache_lock(zone, &shpool);

    cn = ngx_http_anythingllm_cache_make(sh, shpool, (u_char *) digest, hash,
                                 stamp, 0,
                                 kind == NGX_HTTP_ANYTHINGLLM_CACHE_UNKNOWN);
    if (cn) {
        cn->kind = (u_char) kind;
        cn->stamp = stamp;
        cn->until = until;

        ngx_http_anythingllm_cache_insert(sh, cn, (u_char *) digest, hash);
    }

    ngx_http_anythingllm_cache_unlock(zone, shpool);
}


/*
 * Drops every valid entry, or with "keep" makes it stale (its lease
 * given back); unknown and revoked entries stay.
 */

static void
ngx_http_anythingllm_cache_flush(ngx_shm_zone_t *zone, ngx_uint_t keep)
{
    ngx_queue_t                        *q, *next;
    ngx_slab_pool_t                    *shpool;
    ngx_http_anythingllm_cache_sh_t    *sh;
    ngx_http_anythingllm_cache_node_t  *cn;

    if (zone == NULL) {
        return;
    }

    sh = ngx_http_anythingllm_cache_lock(zone, &shpool);

    sh->flushed = ngx_current_msec;

    for (q = ngx_queue_head(&sh->queue);
         q != ngx_queue_sentinel(&sh->queue);
         q = next)
    {
        next = ngx_queue_next(q);

        cn = ngx_queue_data(q, ngx_http_anythingllm_cache_node_t, queue);

        if (cn->kind == NGX_HTTP_ANYTHINGLLM_CACHE_VALID && keep) {
            ngx_http_anythingllm_cache_give_back(cn);
            cn->kind = NGX_HTTP_ANYTHINGLLM_CACHE_STALE;

        } else if (!keep
                   && (cn->kind == NGX_HTTP_ANYTHINGLLM_CACHE_VALID
                       || cn->kind == NGX_HTTP_ANYTHINGLLM_CACHE_STALE))
        {
            ngx_http_anythingllm_cache_remove(sh, shpool, cn);
        }
    }

    ngx_http_anythingllm_cache_unlock(zone, shpool);
}


static void
ngx_http_anythingllm_cache_rbtree_insert(ngx_rbtree_node_t *temp,
    ngx_rbtree_node_t *node, ngx_rbtree_node_t *sentinel)
{
    ngx_rbtree_node_t                  **p;
    ngx_http_anythingllm_cache_node_t   *cn, *cnt;

    for ( ;; ) {

        if (node->key < temp->key) {

            p = &temp->left;

        } else if (node->key > temp->key) {

            p = &temp->right;

        } else { /* node->key == temp->key */

            cn = (ngx_http_anythingllm_cache_node_t *) &node->color;
            cnt = (ngx_http_anythingllm_cache_node_t *) &temp->color;

            p = (ngx_memcmp(cn->digest, cnt->digest, ALM_DIGEST_HEX_LEN) < 0)
                ? &temp->left : &temp->right;
        }

        if (*p == sentinel) {
            break;
        }

        temp = *p;
    }

    *p = node;
    node->parent = temp;
    node->left = sentinel;
    node->right = sentinel;
    ngx_rbt_red(node);
}


ngx_http_anythingllm_cache_node_t *
ngx_http_anythingllm_cache_lookup(ngx_http_anythingllm_cache_sh_t *sh,
    const u_char *digest, uint32_t hash)
{
    ngx_int_t                           rc;
    ngx_rbtree_node_t                  *node, *sentinel;
    ngx_http_anythingllm_cache_node_t  *cn;

    node = sh->rbtree.root;
    sentinel = sh->rbtree.sentinel;

    while (node != sentinel) {

        if (hash < node->key) {
            node = node->left;
            continue;
        }

        if (hash > node->key) {
            node = node->right;
            continue;
        }

        /* hash == node->key */

        cn = (ngx_http_anythingllm_cache_node_t *) &node->color;

        rc = ngx_memcmp(digest, cn->digest, ALM_DIGEST_HEX_LEN);

        if (rc == 0) {
            return cn;
        }

        node = (rc < 0) ? node->left : node->right;
    }

    return NULL;
}


static void
ngx_http_anythingllm_cache_remove(ngx_http_anythingllm_cache_sh_t *sh,
    ngx_slab_pool_t *shpool, ngx_http_anythingllm_cache_node_t *cn)
{
    ngx_rbtree_node_t  *node;

    node = (ngx_rbtree_node_t *)
               ((u_char *) cn - offsetof(ngx_rbtree_node_t, color));

    if (cn->kind == NGX_HTTP_ANYTHINGLLM_CACHE_UNKNOWN) {
        sh->unknown_n--;
    }

    if (cn->kind == NGX_HTTP_ANYTHINGLLM_CACHE_VALID) {
        ngx_http_anythingllm_cache_give_back(cn);
    }

    ngx_queue_remove(&cn->queue);
    ngx_rbtree_delete(&sh->rbtree, node);
    ngx_slab_free_locked(shpool, node);

    sh->entries--;
}


/* a lease of a minute gone needs no giving back: its count expires */

static void
ngx_http_anythingllm_cache_give_back(ngx_http_anythingllm_cache_node_t *cn)
{
    ngx_http_anythingllm_cache_return_t  *ret;

    if (cn->lease_left && cn->lease_minute == ngx_time() / 60
        && ngx_http_anythingllm_cache_nreturns
           < NGX_HTTP_ANYTHINGLLM_CACHE_RETURNS)
    {
        ret = ngx_http_anythingllm_cache_returns
              + ngx_http_anythingllm_cache_nreturns++;
        ngx_memcpy(ret->digest, cn->digest, ALM_DIGEST_HEX_LEN);
        ret->minute = cn->lease_minute;
        ret->n = cn->lease_left;
    }

    cn->lease_left = 0;
}


/*
 * Removes up to three expired entries from the old end of a queue;
 * with "force", the oldest entry goes first whatever its age.  Returns
 * how many went.
 */

static ngx_uint_t
ngx_http_anythingllm_cache_expire(ngx_http_anythingllm_cache_sh_t *sh,
    ngx_slab_pool_t *shpool, ngx_queue_t *queue, ngx_uint_t force)
{
    ngx_uint_t                          n;
    ngx_queue_t                        *q;
    ngx_http_anythingllm_cache_node_t  *cn;

    for (n = 0; n < 3; n++) {

        if (ngx_queue_empty(queue)) {
            break;
        }

        q = ngx_queue_last(queue);
        cn = ngx_queue_data(q, ngx_http_anythingllm_cache_node_t, queue);

        if ((ngx_msec_int_t) (cn->until - ngx_current_msec) > 0) {
            if (!(force && n == 0)) {
                break;
            }

            /* a live entry pushed out to make room */
            ngx_http_anythingllm_metrics_add(
                                 NGX_HTTP_ANYTHINGLLM_M_CACHE_EVICTIONS, 1);
        }

        ngx_http_anythingllm_cache_remove(sh, shpool, cn);
    }

    return n;
}


/*
 * Room is made from unknown entries first; an unknown entry is never
 * given room at the expense of another kind.
 */

static ngx_http_anythingllm_cache_node_t *
ngx_http_anythingllm_cache_alloc(ngx_http_anythingllm_cache_sh_t *sh,
    ngx_slab_pool_t *shpool, size_t data_len, ngx_uint_t unknown)
{
    size_t                              size;
    ngx_rbtree_node_t                  *node;
    ngx_http_anythingllm_cache_node_t  *cn;

    size = offsetof(ngx_rbtree_node_t, color)
           + offsetof(ngx_http_anythingllm_cache_node_t, data)
           + data_len;

    if (unknown) {
        while (sh->unknown_n >= sh->unknown_max
               && ngx_http_anythingllm_cache_expire(sh, shpool,
                                                    &sh->unknown, 1))
        { /* void */ }
    }

    for ( ;; ) {
        node = ngx_slab_alloc_locked(shpool, size);

        if (node) {
            break;
        }

        if (ngx_http_anythingllm_cache_expire(sh, shpool, &sh->unknown, 1)) {
            continue;
        }

        if (unknown) {
            return NULL;
        }

        if (ngx_http_anythingllm_cache_expire(sh, shpool, &sh->queue, 1)) {
            continue;
        }

        ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                      "anythingllm: key cache entry of %uz bytes "
                      "does not fit in the zone", size);
        return NULL;
    }

    cn = (ngx_http_anythingllm_cache_node_t *) &node->color;

    cn->disabled = 0;
    cn->lease = 0;
    cn->lease_minute = 0;
    cn->lease_left = 0;
    cn->lease_top = 0;
    cn->lease_size = 1;
    cn->gen = 0;
    cn->scopes = 0;
    cn->name_len = 0;
    cn->workspaces_len = 0;
    cn->stamp = 0;
    cn->expires = 0;
    cn->rpm = 0;
    cn->tpm = 0;
    cn->tpd = 0;

    return cn;
}


/*
 * A new entry for the digest, in the place of its old one, unless that
 * holds newer news than "since" (NULL then, as when there is no room).
 * Expired entries are dropped on the way.
 */

static ngx_http_anythingllm_cache_node_t *
ngx_http_anythingllm_cache_make(ngx_http_anythingllm_cache_sh_t *sh,
    ngx_slab_pool_t *shpool, const u_char *digest, uint32_t hash,
    ngx_msec_t since, size_t data_len, ngx_uint_t unknown)
{
    ngx_http_anythingllm_cache_node_t  *cn;

    ngx_http_anythingllm_cache_expire(sh, shpool, &sh->unknown, 0);
    ngx_http_anythingllm_cache_expire(sh, shpool, &sh->queue, 0);

    cn = ngx_http_anythingllm_cache_lookup(sh, digest, hash);

    if (cn) {
        if (ngx_http_anythingllm_cache_newer(cn, since)) {
            return NULL;
        }

        ngx_http_anythingllm_cache_remove(sh, shpool, cn);
    }

    return ngx_http_anythingllm_cache_alloc(sh, shpool, data_len, unknown);
}


static void
ngx_http_anythingllm_cache_insert(ngx_http_anythingllm_cache_sh_t *sh,
    ngx_http_anythingllm_cache_node_t *cn, const u_char *digest,
    uint32_t hash)
{
    ngx_rbtree_node_t  *node;

    node = (ngx_rbtree_node_t *)
               ((u_char *) cn - offsetof(ngx_rbtree_node_t, color));

    node->key = hash;
    ngx_memcpy(cn->digest, digest, ALM_DIGEST_HEX_LEN);

    if (cn->kind == NGX_HTTP_ANYTHINGLLM_CACHE_UNKNOWN) {
        sh->unknown_n++;
    }

    ngx_rbtree_insert(&sh->rbtree, node);

    sh->entries++;
    ngx_queue_insert_head(ngx_http_anythingllm_cache_queue(sh, cn),
                          &cn->queue);
}


/*
 * The revocations channel: a digest, or "*" for every key; NULL when
 * the channel was subscribed again after it had been lost.
 *
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

void
ngx_http_anythingllm_cache_revocation(ngx_http_anythingllm_main_conf_t *amcf,
    ngx_str_t *message)
{
    u_char           ch;
    ngx_uint_t       i;
    ngx_msec_t       hold;
    ngx_shm_zone_t  *zone;
    char             digest[ALM_DIGEST_HEX_LEN];

    zone = amcf->cache_zone;

    if (zone == NULL) {
        return;
    }

    if (message) {
        ngx_http_anythingllm_metrics_add(NGX_HTTP_ANYTHINGLLM_M_REVOCATIONS,
                                         1);
    }

    if (message == NULL) {
        ngx_log_error(NGX_LOG_NOTICE, ngx_cycle->log, 0,
                      "anythingllm: revocations channel subscribed "
                      "again, valid keys dropped from the cache");

        ngx_http_anythingllm_cache_flush(zone, 1);
        return;
    }

    if (message->len == 1 && message->data[0] == '*') {
        ngx_log_error(NGX_LOG_NOTICE, ngx_cycle->log, 0,
                      "anythingllm: revocation of every key: valid keys "
                      "dropped from the cache");

        ngx_http_anythingllm_cache_flush(zone, 0);
        return;
    }

    if (message->len != ALM_DIGEST_HEX_LEN) {
        goto invalid;
    }

    /* the cache holds lowercase digests; some tools print uppercase */

    for (i = 0; i < ALM_DIGEST_HEX_LEN; i++) {
        ch = message->data[i];

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

    hold = amcf->redis_timeout + NGX_HTTP_ANYTHINGLLM_CACHE_REVOKE_HOLD;

    ngx_http_anythingllm_cache_revoke(zone, digest, hold);

    return;

invalid:

    ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                  "anythingllm: ignored revocation message of %uz bytes: "
                  "a 64-digit hex digest or \"*\" expected", message->len);
}
