/*
 * Copyright (C) ngx_anythingllm authors
 *
 * The key cache's entries, shared by ngx_http_anythingllm_cache.c and
 * the leases of ngx_http_anythingllm_lease.c: nothing else reads them.
 */


#ifndef _NGX_HTTP_ANYTHINGLLM_CACHE_H_INCLUDED_
#define _NGX_HTTP_ANYTHINGLLM_CACHE_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>

#include "ngx_http_anythingllm_module.h"


#define NGX_HTTP_ANYTHINGLLM_CACHE_VALID     1
#define NGX_HTTP_ANYTHINGLLM_CACHE_UNKNOWN   2
#define NGX_HTTP_ANYTHINGLLM_CACHE_REVOKED   3
#define NGX_HTTP_ANYTHINGLLM_CACHE_STALE     4  /* valid, until a flush */

/* cache_node_t's lease flags */
#define NGX_HTTP_ANYTHINGLLM_CACHE_FETCHING  0x01  /* a fetch in flight */
#define NGX_HTTP_ANYTHINGLLM_CACHE_SPENT     0x02  /* Redis's count of the
                                                      minute reached rpm */

typedef struct {
    u_char                      color;
    u_char                      kind;
    u_char                      disabled;
    u_char                      lease;      /* CACHE_FETCHING, _SPENT */
    uint32_t                    scopes;
    uint32_t                    name_len;
    uint32_t                    workspaces_len;
    ngx_queue_t                 queue;
    ngx_msec_t                  until;      /* the entry's own expiry */
    ngx_msec_t                  stamp;      /* when its news was read */
    time_t                      expires;    /* the key's, unix time */
    ngx_uint_t                  rpm;
    ngx_uint_t                  tpm;
    ngx_uint_t                  tpd;
    ngx_uint_t                  gen;        /* told apart from an entry
                                               of the same key made
                                               since */
    time_t                      lease_minute;
    ngx_uint_t                  lease_left; /* admissions in hand */
    ngx_uint_t                  lease_top;  /* the highest number of
                                               the minute's count taken */
    ngx_uint_t                  lease_size; /* the next fetch's */
    ngx_msec_t                  lease_asked; /* when FETCHING was set */
    u_char                      digest[ALM_DIGEST_HEX_LEN];
    u_char                      data[1];    /* name, then workspaces */
} ngx_http_anythingllm_cache_node_t;


typedef struct {
    ngx_rbtree_t                rbtree;
    ngx_rbtree_node_t           sentinel;
    ngx_queue_t                 queue;      /* valid and revoked, most
                                               recently used first */
    ngx_queue_t                 unknown;    /* unknown, likewise */
    ngx_uint_t                  unknown_n;
    ngx_uint_t                  unknown_max;
    ngx_uint_t                  entries;    /* of every kind */
    ngx_msec_t                  flushed;
    ngx_uint_t                  gen;        /* of the last valid entry */
} ngx_http_anythingllm_cache_sh_t;


/*
 * The tree's key of a digest.  A digest is SHA-256 in lowercase hex:
 * its first 8 digits are as uniform as any hash of it, and a client
 * cannot choose them.  (A CRC32 of all 64 digits cost five times the
 * rest of a cached key's lookup.)
 */

static ngx_inline uint32_t
ngx_http_anythingllm_cache_hash(const u_char *digest)
{
    u_char      c;
    uint32_t    h;
    ngx_uint_t  i;

    h = 0;

    for (i = 0; i < 8; i++) {
        c = digest[i];
        h = (h << 4) | (uint32_t) ((c <= '9') ? c - '0' : c - 'a' + 10);
    }

    return h;
}


/* the zone locked: its tree and queues, the entries' leases */
ngx_http_anythingllm_cache_sh_t *ngx_http_anythingllm_cache_lock(
    ngx_shm_zone_t *zone, ngx_slab_pool_t **shpool);
/* unlocked, and the leases of the entries dropped meanwhile given back */
void ngx_http_anythingllm_cache_unlock(ngx_shm_zone_t *zone,
    ngx_slab_pool_t *shpool);
ngx_http_anythingllm_cache_node_t *ngx_http_anythingllm_cache_lookup(
    ngx_http_anythingllm_cache_sh_t *sh, const u_char *digest,
    uint32_t hash);


#endif /* _NGX_HTTP_ANYTHINGLLM_CACHE_H_INCLUDED_ */
