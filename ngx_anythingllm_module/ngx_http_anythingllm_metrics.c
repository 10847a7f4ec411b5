/*
 * Copyright (C) ngx_anythingllm authors
 *
 * Metrics in shared memory, answered in Prometheus' text exposition
 * format (0.0.4) by a location with "anythingllm_metrics".
 *
 * The zone ("anythingllm_metrics", sized by anythingllm_metrics_zone,
 * 1m when only anythingllm_metrics is given) is one slab pool whose
 * data is ngx_http_anythingllm_metrics_sh_t:
 *
 *   - a fixed array of ngx_atomic_t, one per series without a key
 *     label (requests by verdict, by scope, upstream answers by class,
 *     Redis, cache, revocation and stream counters) and the buckets,
 *     sums and counts of the histograms.  They are changed with
 *     ngx_atomic_fetch_add() and never locked: a scrape may see one
 *     counter a request ahead of another, never a torn value.  The key
 *     cache's entries are not kept here but read from the cache's own
 *     zone when the metrics are answered (see
 *     ngx_http_anythingllm_metrics_gauge()).
 *
 *   - the open streams gauge, per process: a fixed array of slots
 *     {pid, open}, see "The open streams gauge" below.
 *
 *   - the per-key series: an ngx_str_rbtree of fixed-size entries (key
 *     id, name, requests, refusals, prompt and completion tokens) keyed
 *     by the CRC32 of the key id, and a queue from the most to the
 *     least recently seen.  Entries are changed under the zone's mutex, held
 *     for one lookup and four additions per request that carries a
 *     key.  At most keys_max entries live at once (half the zone, in
 *     slab slots of an entry); making room for a new key folds the
 *     least recently seen one into the "other" series, kept in the
 *     zone's header, so neither the memory nor the answer grows with
 *     the number of distinct keys.
 *
 * Counting is done once per request, in the log phase, from the
 * request's context (the verdict, the route's scope, the key, the
 * usage, AnythingLLM's status), and by the files that see the events
 * themselves through ngx_http_anythingllm_metrics_add() and
 * _observe(): Redis commands, errors, timeouts, reconnects and round
 * trips in ngx_http_anythingllm_redis.c; cache hits, misses, evictions
 * and revocation messages in ngx_http_anythingllm_cache.c; streams
 * opened, ended (by cause) and the first token in
 * ngx_http_anythingllm_filter.c.  These go through a pointer to the
 * zone that every worker takes at process start, so no configuration
 * is looked up on the way, and cost nothing where no zone is
 * configured.  Nothing is allocated on the hot path: a cached key's
 * request adds four atomic increments and one locked lookup.
 *
 * A reload that keeps the zone's size hands the new cycle the old
 * zone (init_zone gets the old configuration in "data"): the counts go
 * on, and so do the slots below.
 *
 * The open streams gauge.  A worker killed (SIGKILL, a crash) never
 * ends its streams, so one shared count would keep them forever.
 * Instead, each worker (or the single process) takes a slot of its own
 * at process start, by setting the slot's pid from 0 to its own with
 * ngx_atomic_cmp_set(), and counts its streams there alone: the hot
 * path is one atomic addition through a pointer taken then.  The answer
 * is the sum of the slots whose process runs (kill(pid, 0) succeeds or
 * fails with EPERM); a slot whose process is gone is emptied by the
 * scrape that finds it, and by every worker that starts, so a worker
 * started in place of one that died drops that one's streams at once.
 * A worker that exits normally frees its slot in exit_process.
 *
 *   - Slots are by pid, not by ngx_worker: after a reload the old
 *     workers, shutting down, still end their streams in their own
 *     slots (the zone carries over), while new workers with the same
 *     ngx_worker numbers take other slots.  A reload that resizes the
 *     zone makes a new one: its gauge counts the new workers' streams
 *     only, the old workers ending theirs in the old zone.
 *
 *   - Emptying a slot (for a new owner, or to free it) marks its pid
 *     with NGX_HTTP_ANYTHINGLLM_METRICS_BUSY and the emptying process's
 *     own pid while the count is zeroed: no one else takes, sums or
 *     counts in a slot meanwhile.  Pids on Linux are below 2^22
 *     (pid_max), so bit 31 is free.  Should the emptying
 *     process die right there, its mark is a dead process's slot too.
 *
 *   - A slot is only written by its owner (the count) and by a process
 *     that took it with ngx_atomic_cmp_set() from 0 or from a process
 *     that is gone; the count of a running process's slot is never
 *     below zero, so neither is the sum.
 *
 *   - When all NGX_HTTP_ANYTHINGLLM_METRICS_SLOTS slots are held (that
 *     many workers of all generations at once), a worker counts in the
 *     shared count[NGX_HTTP_ANYTHINGLLM_M_STREAMS_OPEN], added to the
 *     sum, and logs so at start: its streams are counted as before, but
 *     stay counted if it dies abnormally.  Cache manager and loader
 *     processes never open a stream and take no slot; the master never
 *     runs init_process nor answers a scrape.
 *
 *   - A pid reused by another process before the dead worker's slot
 *     was emptied makes that slot count again while the other process
 *     runs.  Since the master starts a new worker, which empties such
 *     slots, right after reaping one that died, the window is that of
 *     the respawn; a starting worker also empties any slot that holds
 *     its own pid.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_anythingllm_module.h"


#define NGX_HTTP_ANYTHINGLLM_METRICS_NAME_LEN  64

/* 2k of slots: with the rest of the zone's header, one slab page */
#define NGX_HTTP_ANYTHINGLLM_METRICS_SLOTS     128

/* a slot's pid while the process in the low bits empties it */
#define NGX_HTTP_ANYTHINGLLM_METRICS_BUSY      0x80000000


typedef struct {
    uint64_t                    requests;
    uint64_t                    refused;
    uint64_t                    prompt_tokens;
    uint64_t                    completion_tokens;
} ngx_http_anythingllm_metrics_counts_t;


typedef struct {
    ngx_str_node_t              sn;         /* sn.str: the key id, "id" */
    ngx_queue_t                 queue;
    ngx_http_anythingllm_metrics_counts_t  counts;
    u_char                      name_len;
    u_char                      id[ALM_KEY_ID_LEN];
    u_char                      name[NGX_HTTP_ANYTHINGLLM_METRICS_NAME_LEN];
} ngx_http_anythingllm_metrics_node_t;


/* the open streams of one process; see the head of the file */

typedef struct {
    ngx_atomic_t                pid;        /* 0: free */
    ngx_atomic_t                open;
} ngx_http_anythingllm_metrics_slot_t;


typedef struct {
    ngx_atomic_t                count[NGX_HTTP_ANYTHINGLLM_M_MAX];
    ngx_atomic_t                bucket[NGX_HTTP_ANYTHINGLLM_H_MAX]
                                      [NGX_HTTP_ANYTHINGLLM_H_BUCKETS];
    ngx_atomic_t                sum[NGX_HTTP_ANYTHINGLLM_H_MAX]; /* ms */

    ngx_rbtree_t                rbtree;
    ngx_rbtree_node_t           sentinel;
    ngx_queue_t                 queue;          /* most recent first */
    ngx_uint_t                  keys;
    ngx_uint_t                  keys_max;
    ngx_http_anythingllm_metrics_counts_t  other;

    ngx_http_anythingllm_metrics_slot_t
                                slot[NGX_HTTP_ANYTHINGLLM_METRICS_SLOTS];
} ngx_http_anythingllm_metrics_sh_t;


/* a per-key series copied out of the zone for the answer */

typedef struct {
    u_char                      id[ALM_KEY_ID_LEN];
    u_char                      name_len;
    u_char                      name[NGX_HTTP_ANYTHINGLLM_METRICS_NAME_LEN];
    ngx_http_anythingllm_metrics_counts_t  counts;
} ngx_http_anythingllm_metrics_key_t;


static ngx_int_t ngx_http_anythingllm_metrics_init_zone(
    ngx_shm_zone_t *shm_zone, void *data);
static ngx_uint_t ngx_http_anythingllm_metrics_alive(ngx_atomic_uint_t pid);
static ngx_uint_t ngx_http_anythingllm_metrics_take(
    ngx_http_anythingllm_metrics_slot_t *slot, ngx_atomic_uint_t pid,
    ngx_atomic_uint_t to);
static ngx_atomic_uint_t ngx_http_anythingllm_metrics_streams_open(
    ngx_http_anythingllm_metrics_sh_t *sh);
static ngx_int_t ngx_http_anythingllm_metrics_handler(ngx_http_request_t *r);
static void ngx_http_anythingllm_metrics_key(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, ngx_uint_t refused);
static ngx_http_anythingllm_metrics_node_t *
    ngx_http_anythingllm_metrics_lookup(ngx_http_anythingllm_metrics_sh_t *sh,
    ngx_slab_pool_t *shpool, ngx_http_anythingllm_key_t *key);
static ngx_http_anythingllm_metrics_key_t *
    ngx_http_anythingllm_metrics_copy(ngx_http_anythingllm_metrics_sh_t *sh,
    ngx_slab_pool_t *shpool, ngx_pool_t *pool, ngx_uint_t *n);
static u_char *ngx_http_anythingllm_metrics_globals(u_char *p,
    ngx_http_anythingllm_metrics_sh_t *sh,
    ngx_http_anythingllm_main_conf_t *amcf);
static u_char *ngx_http_anythingllm_metrics_histograms(u_char *p,
    ngx_http_anythingllm_metrics_sh_t *sh);
static u_char *ngx_http_anythingllm_metrics_keys(u_char *p,
    ngx_http_anythingllm_metrics_key_t *keys, ngx_uint_t n,
    ngx_http_anythingllm_metrics_counts_t *other);


/* the zone of this cycle, taken by every worker when it starts */
static ngx_http_anythingllm_metrics_sh_t  *ngx_http_anythingllm_metrics_sh;

/*
 * This process's slot of the open streams gauge (NULL: none), and the
 * count its streams go to: the slot's, or the shared one when no slot
 * was free; NULL where no zone is configured, and after exit_process.
 */
static ngx_http_anythingllm_metrics_slot_t  *ngx_http_anythingllm_metrics_slot;
static ngx_atomic_t                         *ngx_http_anythingllm_metrics_open;

/*
 * Gauges that live with what they measure (the key cache's entries):
 * another zone may not outlive a reload as this one does, so they are
 * read when the metrics are answered rather than kept here.
 */
static ngx_http_anythingllm_metrics_read_pt
    ngx_http_anythingllm_metrics_reads[NGX_HTTP_ANYTHINGLLM_M_MAX];


/* indexed by ngx_http_anythingllm_auth_result_e */

ngx_str_t  ngx_http_anythingllm_auth_results[] = {
    ngx_string("none"),
    ngx_string("cached"),
    ngx_string("redis"),
    ngx_string("fail_open"),
    ngx_string("denied_missing"),
    ngx_string("denied_unknown"),
    ngx_string("denied_expired"),
    ngx_string("denied_disabled"),
    ngx_string("denied_scope"),
    ngx_string("denied_workspace"),
    ngx_string("denied_path"),
    ngx_string("rate_limited"),
    ngx_string("redis_error")
};


/*
 * The series without a key label, indexed by ngx_http_anythingllm_m_e.
 * Consecutive series of one family share its HELP and TYPE lines; the
 * verdicts' labels are written from the names above.
 */

typedef struct {
    const char                 *name;
    const char                 *type;
    const char                 *help;
    const char                 *label;
} ngx_http_anythingllm_metric_t;


#define ALM_VERDICT                                                         \
    { "anythingllm_requests_total", "counter",                              \
      "Requests judged, by the key check's verdict.", NULL }

#define ALM_SCOPE(s)                                                        \
    { "anythingllm_requests_by_scope_total", "counter",                     \
      "Requests judged, by the scope their route needs.",                   \
      "scope=\"" s "\"" }

#define ALM_UPSTREAM(c)                                                     \
    { "anythingllm_upstream_responses_total", "counter",                    \
      "Answers of AnythingLLM, by status class.", "code=\"" c "\"" }

#define ALM_STREAM_END(c)                                                   \
    { "anythingllm_streams_ended_total", "counter",                         \
      "Chat streams ended, by cause.", "cause=\"" c "\"" }


static ngx_http_anythingllm_metric_t  ngx_http_anythingllm_series[] = {
    ALM_VERDICT, ALM_VERDICT, ALM_VERDICT, ALM_VERDICT, ALM_VERDICT,
    ALM_VERDICT, ALM_VERDICT, ALM_VERDICT, ALM_VERDICT, ALM_VERDICT,
    ALM_VERDICT, ALM_VERDICT, ALM_VERDICT,

    ALM_SCOPE("none"), ALM_SCOPE("chat"), ALM_SCOPE("read"),
    ALM_SCOPE("documents"), ALM_SCOPE("admin"),

    ALM_UPSTREAM("1xx"), ALM_UPSTREAM("2xx"), ALM_UPSTREAM("3xx"),
    ALM_UPSTREAM("4xx"), ALM_UPSTREAM("5xx"),

    { "anythingllm_redis_commands_total", "counter",
      "Redis commands sent.", NULL },
    { "anythingllm_redis_errors_total", "counter",
      "Redis commands answered with an error.", NULL },
    { "anythingllm_redis_timeouts_total", "counter",
      "Redis commands or connects that timed out.", NULL },
    { "anythingllm_redis_reconnects_total", "counter",
      "Connections to Redis made again after one was lost.", NULL },

    { "anythingllm_key_cache_hits_total", "counter",
      "Key lookups answered by the shared-memory cache.", NULL },
    { "anythingllm_key_cache_misses_total", "counter",
      "Key lookups the cache could not answer.", NULL },
    { "anythingllm_key_cache_evictions_total", "counter",
      "Cached keys pushed out to make room.", NULL },
    { "anythingllm_key_cache_entries", "gauge",
      "Keys in the cache now.", NULL },
    { "anythingllm_revocations_total", "counter",
      "Revocation messages received.", NULL },

    { "anythingllm_streams_open", "gauge",
      "Chat streams being answered now.", NULL },
    ALM_STREAM_END("complete"), ALM_STREAM_END("upstream_abort"),
    ALM_STREAM_END("upstream_cut"), ALM_STREAM_END("oversized_frame"),
    ALM_STREAM_END("client_gone"),

    { "anythingllm_usage_errors_total", "counter",
      "Chat answers whose usage Redis did not count.", NULL }
};


/* upper bounds of the buckets in ms, and as written; +Inf follows */

static ngx_msec_t  ngx_http_anythingllm_redis_le[] = {
    1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500
};

static ngx_msec_t  ngx_http_anythingllm_stream_le[] = {
    50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000
};

static ngx_str_t  ngx_http_anythingllm_redis_les[] = {
    ngx_string("0.001"), ngx_string("0.002"), ngx_string("0.005"),
    ngx_string("0.01"), ngx_string("0.025"), ngx_string("0.05"),
    ngx_string("0.1"), ngx_string("0.25"), ngx_string("0.5"),
    ngx_string("1"), ngx_string("2.5")
};

static ngx_str_t  ngx_http_anythingllm_stream_les[] = {
    ngx_string("0.05"), ngx_string("0.1"), ngx_string("0.25"),
    ngx_string("0.5"), ngx_string("1"), ngx_string("2.5"),
    ngx_string("5"), ngx_string("10"), ngx_string("30"),
    ngx_string("60"), ngx_string("300")
};


typedef struct {
    const char                 *name;
    const char                 *help;
    ngx_msec_t                 *le;
    ngx_str_t                  *les;
} ngx_http_anythingllm_histogram_t;


/* indexed by ngx_http_anythingllm_h_e */

static ngx_http_anythingllm_histogram_t  ngx_http_anythingllm_histograms[] = {
    { "anythingllm_redis_latency_seconds",
      "Round trip of a Redis command.",
      ngx_http_anythingllm_redis_le, ngx_http_anythingllm_redis_les },
    { "anythingllm_first_token_seconds",
      "From the request to the first token of a chat answer.",
      ngx_http_anythingllm_stream_le, ngx_http_anythingllm_stream_les },
    { "anythingllm_stream_duration_seconds",
      "From the request to the end of a chat stream.",
      ngx_http_anythingllm_stream_le, ngx_http_anythingllm_stream_les }
};


/* a line of a per-key series, at most: name, two labels, a number */
#define NGX_HTTP_ANYTHINGLLM_METRICS_KEY_LINE                                \
    (sizeof("anythingllm_key_completion_tokens_total{key_id=\"\","           \
            "key_name=\"\"} \n") + ALM_KEY_ID_LEN                            \
     + 2 * NGX_HTTP_ANYTHINGLLM_METRICS_NAME_LEN + NGX_INT64_LEN)


char *
ngx_http_anythingllm_metrics_zone(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_anythingllm_main_conf_t  *amcf = conf;

    ssize_t     size;
    ngx_str_t  *value;

    if (amcf->metrics_zone) {
        return "is duplicate";
    }

    value = cf->args->elts;

    size = ngx_parse_size(&value[1]);

    if (size == NGX_ERROR || size < (ssize_t) (8 * ngx_pagesize)) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid size \"%V\": at least %uz",
                           &value[1], 8 * ngx_pagesize);
        return NGX_CONF_ERROR;
    }

    if (ngx_http_anythingllm_metrics_add_zone(cf, amcf, size) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


char *
ngx_http_anythingllm_metrics(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_str_t                         *value;
    ngx_http_core_loc_conf_t          *clcf;
    ngx_http_anythingllm_main_conf_t  *amcf;

    /* "anythingllm_metrics;" is "anythingllm_metrics on;" */

    if (cf->args->nelts == 2) {
        value = cf->args->elts;

        if (ngx_strcmp(value[1].data, "off") == 0) {
            return NGX_CONF_OK;
        }

        if (ngx_strcmp(value[1].data, "on") != 0) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid value \"%V\", it must be "
                               "\"on\" or \"off\"", &value[1]);
            return NGX_CONF_ERROR;
        }
    }

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    clcf->handler = ngx_http_anythingllm_metrics_handler;

    amcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_anythingllm_module);
    amcf->metrics_used = 1;

    return NGX_CONF_OK;
}


ngx_int_t
ngx_http_anythingllm_metrics_add_zone(ngx_conf_t *cf,
    ngx_http_anythingllm_main_conf_t *amcf, size_t size)
{
    ngx_str_t  name = ngx_string("anythingllm_metrics");

    amcf->metrics_zone = ngx_http_anythingllm_shm_add(cf, &name, size,
                                   ngx_http_anythingllm_metrics_init_zone,
                                   amcf,
                                   "shared memory zone \"%V\" is already used");

    return amcf->metrics_zone ? NGX_OK : NGX_ERROR;
}


static ngx_int_t
ngx_http_anythingllm_metrics_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_http_anythingllm_main_conf_t  *oamcf = data;

    ngx_int_t                           rc;
    ngx_http_anythingllm_metrics_sh_t  *sh;
    ngx_http_anythingllm_main_conf_t   *amcf;

    amcf = shm_zone->data;

    /* a reload: the counts go on */

    rc = ngx_http_anythingllm_shm_init(shm_zone,
                                    oamcf ? &oamcf->metrics : NULL,
                                    sizeof(ngx_http_anythingllm_metrics_sh_t),
                                    "anythingllm metrics", &amcf->metrics);
    if (rc != NGX_DECLINED) {
        return rc;
    }

    sh = amcf->metrics.sh;

    ngx_rbtree_init(&sh->rbtree, &sh->sentinel,
                    ngx_str_rbtree_insert_value);
    ngx_queue_init(&sh->queue);

    /* half the zone, in slab slots of an entry */

    sh->keys_max = shm_zone->shm.size / 2
                   / ngx_http_anythingllm_shm_slot(
                         sizeof(ngx_http_anythingllm_metrics_node_t));

    if (sh->keys_max == 0) {
        sh->keys_max = 1;
    }

    return NGX_OK;
}


void
ngx_http_anythingllm_metrics_gauge(ngx_uint_t metric,
    ngx_http_anythingllm_metrics_read_pt read)
{
    ngx_http_anythingllm_metrics_reads[metric] = read;
}


void
ngx_http_anythingllm_metrics_init_process(
    ngx_http_anythingllm_main_conf_t *amcf)
{
    ngx_uint_t                            i;
    ngx_atomic_uint_t                     pid, owner, self, to;
    ngx_http_anythingllm_metrics_sh_t    *sh;
    ngx_http_anythingllm_metrics_slot_t  *s, *slot;

    sh = amcf ? amcf->metrics.sh : NULL;

    ngx_http_anythingllm_metrics_sh = sh;
    ngx_http_anythingllm_metrics_slot = NULL;
    ngx_http_anythingllm_metrics_open = NULL;

    if (sh == NULL) {
        return;
    }

    ngx_http_anythingllm_metrics_open =
                              &sh->count[NGX_HTTP_ANYTHINGLLM_M_STREAMS_OPEN];

    /* a cache manager or loader never opens a stream */

    if (ngx_process != NGX_PROCESS_WORKER
        && ngx_process != NGX_PROCESS_SINGLE)
    {
        return;
    }

    /*
     * One pass: every slot left by a process that is gone (or by an
     * earlier process with this pid: none is ours yet) is emptied, the
     * first free or emptied one becomes ours.
     */

    self = (ngx_atomic_uint_t) ngx_pid;
    slot = NULL;

    for (i = 0; i < NGX_HTTP_ANYTHINGLLM_METRICS_SLOTS; i++) {
        s = &sh->slot[i];
        pid = s->pid;
        owner = pid & ~NGX_HTTP_ANYTHINGLLM_METRICS_BUSY;

        if (pid == 0) {
            if (slot) {
                continue;
            }

        } else if (owner != self
                   && ngx_http_anythingllm_metrics_alive(owner))
        {
            continue;
        }

        to = slot ? 0 : self;

        if (ngx_http_anythingllm_metrics_take(s, pid, to) && to) {
            slot = s;
        }
    }

    if (slot == NULL) {
        ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                      "anythingllm metrics: all %d slots of the open "
                      "streams gauge are held, this process's streams "
                      "stay counted should it die abnormally",
                      NGX_HTTP_ANYTHINGLLM_METRICS_SLOTS);
        return;
    }

    ngx_http_anythingllm_metrics_slot = slot;
    ngx_http_anythingllm_metrics_open = &slot->open;
}


/* the process ends: its slot is free, its streams no longer count */

void
ngx_http_anythingllm_metrics_exit_process(void)
{
    ngx_http_anythingllm_metrics_slot_t  *slot;

    slot = ngx_http_anythingllm_metrics_slot;

    /* nothing counts in the slot once it may be someone else's */

    ngx_http_anythingllm_metrics_slot = NULL;
    ngx_http_anythingllm_metrics_open = NULL;

    if (slot) {
        (void) ngx_http_anythingllm_metrics_take(slot,
                                                 (ngx_atomic_uint_t) ngx_pid,
                                                 0);
    }
}


/* whether process "pid" runs: one we may not signal runs too */

static ngx_uint_t
ngx_http_anythingllm_metrics_alive(ngx_atomic_uint_t pid)
{
    /* 0 and -1 would be a process group and every process */

    if (pid == 0 || pid >= NGX_HTTP_ANYTHINGLLM_METRICS_BUSY) {
        return 0;
    }

    return kill((ngx_pid_t) pid, 0) == 0 || ngx_errno == NGX_EPERM;
}


/*
 * Slot "s", held by "pid" (0, or a process that is gone), is emptied
 * and given to "to" (0: free).  It is marked busy by this process
 * while its count is zeroed, so that nothing reads or counts in it
 * before the zero is written; 0 when another process was first.
 */

static ngx_uint_t
ngx_http_anythingllm_metrics_take(ngx_http_anythingllm_metrics_slot_t *s,
    ngx_atomic_uint_t pid, ngx_atomic_uint_t to)
{
    if (!ngx_atomic_cmp_set(&s->pid, pid,
                            NGX_HTTP_ANYTHINGLLM_METRICS_BUSY
                            | (ngx_atomic_uint_t) ngx_pid))
    {
        return 0;
    }

    s->open = 0;

    ngx_memory_barrier();

    s->pid = to;

    return 1;
}


/*
 * The gauge: the streams of the processes that run, and the shared
 * count of those that found no slot.  A slot whose process is gone is
 * emptied on the way, and one being emptied is skipped.
 */

static ngx_atomic_uint_t
ngx_http_anythingllm_metrics_streams_open(
    ngx_http_anythingllm_metrics_sh_t *sh)
{
    ngx_uint_t                            i;
    ngx_atomic_uint_t                     pid, owner, open;
    ngx_http_anythingllm_metrics_slot_t  *s;

    open = sh->count[NGX_HTTP_ANYTHINGLLM_M_STREAMS_OPEN];

    for (i = 0; i < NGX_HTTP_ANYTHINGLLM_METRICS_SLOTS; i++) {
        s = &sh->slot[i];
        pid = s->pid;

        if (pid == 0) {
            continue;
        }

        owner = pid & ~NGX_HTTP_ANYTHINGLLM_METRICS_BUSY;

        if (!ngx_http_anythingllm_metrics_alive(owner)) {
            (void) ngx_http_anythingllm_metrics_take(s, pid, 0);
            continue;
        }

        if (!(pid & NGX_HTTP_ANYTHINGLLM_METRICS_BUSY)) {
            open += s->open;
        }
    }

    return open;
}


void
ngx_http_anythingllm_metrics_add(ngx_uint_t metric, ngx_atomic_int_t n)
{
    ngx_http_anythingllm_metrics_sh_t  *sh;

    sh = ngx_http_anythingllm_metrics_sh;

    if (sh) {
        (void) ngx_atomic_fetch_add(&sh->count[metric], n);
    }
}


void
ngx_http_anythingllm_metrics_observe(ngx_uint_t histogram, ngx_msec_t ms)
{
    ngx_uint_t                          i;
    ngx_msec_t                         *le;
    ngx_http_anythingllm_metrics_sh_t  *sh;

    sh = ngx_http_anythingllm_metrics_sh;

    if (sh == NULL) {
        return;
    }

    le = ngx_http_anythingllm_histograms[histogram].le;

    for (i = 0; i < NGX_HTTP_ANYTHINGLLM_H_BUCKETS - 1; i++) {
        if (ms <= le[i]) {
            break;
        }
    }

    (void) ngx_atomic_fetch_add(&sh->bucket[histogram][i], 1);
    (void) ngx_atomic_fetch_add(&sh->sum[histogram], ms);
}


/* milliseconds since the request started, as $request_time counts */

static ngx_msec_t
ngx_http_anythingllm_metrics_elapsed(ngx_http_request_t *r)
{
    ngx_time_t      *tp;
    ngx_msec_int_t   ms;

    tp = ngx_timeofday();

    ms = (ngx_msec_int_t) ((tp->sec - r->start_sec) * 1000
                           + (tp->msec - r->start_msec));

    return (ngx_msec_t) ngx_max(ms, 0);
}


void
ngx_http_anythingllm_metrics_first_token(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx)
{
    if (ctx->first_token_set) {
        return;
    }

    ctx->first_token = ngx_http_anythingllm_metrics_elapsed(r);
    ctx->first_token_set = 1;

    ngx_http_anythingllm_metrics_observe(NGX_HTTP_ANYTHINGLLM_H_FIRST_TOKEN,
                                         ctx->first_token);
}


void
ngx_http_anythingllm_metrics_stream_start(void)
{
    if (ngx_http_anythingllm_metrics_open) {
        (void) ngx_atomic_fetch_add(ngx_http_anythingllm_metrics_open, 1);
    }
}


ngx_uint_t
ngx_http_anythingllm_metrics_stream_cause(alm_sse_t *sse, ngx_uint_t cut)
{
    if (alm_sse_succeeded(sse)) {
        return NGX_HTTP_ANYTHINGLLM_M_STREAM_COMPLETE;
    }

    if (sse->too_long) {
        return NGX_HTTP_ANYTHINGLLM_M_STREAM_OVERSIZED;
    }

    /* an "abort" frame, or the stream broke off or ended early */

    return cut ? NGX_HTTP_ANYTHINGLLM_M_STREAM_UPSTREAM_CUT
               : NGX_HTTP_ANYTHINGLLM_M_STREAM_UPSTREAM_ABORT;
}


void
ngx_http_anythingllm_metrics_stream_end(ngx_http_request_t *r,
    ngx_uint_t cause)
{
    if (ngx_http_anythingllm_metrics_open) {
        (void) ngx_atomic_fetch_add(ngx_http_anythingllm_metrics_open, -1);
    }

    ngx_http_anythingllm_metrics_add(cause, 1);
    ngx_http_anythingllm_metrics_observe(NGX_HTTP_ANYTHINGLLM_H_STREAM,
                                     ngx_http_anythingllm_metrics_elapsed(r));
}


/*
 * The log phase: once per request the module handled, what its
 * context says.  A request with no context (the module stepped aside)
 * costs one lookup.
 */

ngx_int_t
ngx_http_anythingllm_metrics_log_handler(ngx_http_request_t *r)
{
    ngx_uint_t                   scope, refused, status;
    ngx_http_anythingllm_ctx_t  *ctx;

    if (ngx_http_anythingllm_metrics_sh == NULL) {
        return NGX_OK;
    }

    ctx = ngx_http_get_module_ctx(r, ngx_http_anythingllm_module);

    if (ctx == NULL) {
        return NGX_OK;
    }

    if (ctx->auth_result != NGX_HTTP_ANYTHINGLLM_AUTH_NONE) {
        ngx_http_anythingllm_metrics_add(NGX_HTTP_ANYTHINGLLM_M_VERDICT
                                         + ctx->auth_result, 1);

        /* the lowest scope bit: each route needs one scope at most */

        scope = 0;

        if (ctx->need_scope) {
            for (scope = 1; !(ctx->need_scope & (1u << (scope - 1)));
                 scope++)
            { /* void */ }
        }

        if (scope <= 4) {
            ngx_http_anythingllm_metrics_add(NGX_HTTP_ANYTHINGLLM_M_SCOPE
                                             + scope, 1);
        }
    }

    if (r->upstream && r->upstream->state
        && r->upstream->state->status >= 100)
    {
        status = r->upstream->state->status / 100;

        if (status <= 5) {
            ngx_http_anythingllm_metrics_add(NGX_HTTP_ANYTHINGLLM_M_UPSTREAM
                                             + status - 1, 1);
        }
    }

    /*
     * Only a key whose record was read gets a series of its own: a
     * made-up key has a digest too, and a flood of them would push out
     * every real key.
     */

    switch (ctx->auth_result) {

    case NGX_HTTP_ANYTHINGLLM_AUTH_CACHED:
    case NGX_HTTP_ANYTHINGLLM_AUTH_REDIS:
        refused = 0;
        break;

    case NGX_HTTP_ANYTHINGLLM_AUTH_DENIED_EXPIRED:
    case NGX_HTTP_ANYTHINGLLM_AUTH_DENIED_DISABLED:
    case NGX_HTTP_ANYTHINGLLM_AUTH_DENIED_SCOPE:
    case NGX_HTTP_ANYTHINGLLM_AUTH_DENIED_WORKSPACE:
    case NGX_HTTP_ANYTHINGLLM_AUTH_RATE_LIMITED:
        refused = 1;
        break;

    default:
        return NGX_OK;
    }

    if (ctx->key.valid) {
        ngx_http_anythingllm_metrics_key(r, ctx, refused);
    }

    return NGX_OK;
}


static void
ngx_http_anythingllm_metrics_key(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, ngx_uint_t refused)
{
    ngx_slab_pool_t                      *shpool;
    ngx_http_anythingllm_metrics_sh_t    *sh;
    ngx_http_anythingllm_metrics_node_t  *mn;
    ngx_http_anythingllm_main_conf_t     *amcf;

    amcf = ngx_http_get_module_main_conf(r, ngx_http_anythingllm_module);

    sh = amcf->metrics.sh;
    shpool = amcf->metrics.shpool;

    if (sh == NULL) {
        return;
    }

    ngx_shmtx_lock(&shpool->mutex);

    mn = ngx_http_anythingllm_metrics_lookup(sh, shpool, &ctx->key);

    if (mn) {
        mn->counts.requests++;
        mn->counts.refused += refused;

        if (ctx->usage.present) {
            mn->counts.prompt_tokens += ctx->usage.prompt_tokens;
            mn->counts.completion_tokens += ctx->usage.completion_tokens;
        }
    }

    ngx_shmtx_unlock(&shpool->mutex);
}


static void
ngx_http_anythingllm_metrics_fold(ngx_http_anythingllm_metrics_sh_t *sh,
    ngx_slab_pool_t *shpool)
{
    ngx_queue_t                          *q;
    ngx_http_anythingllm_metrics_node_t  *mn;

    q = ngx_queue_last(&sh->queue);
    ngx_queue_remove(q);

    mn = ngx_queue_data(q, ngx_http_anythingllm_metrics_node_t, queue);

    sh->other.requests += mn->counts.requests;
    sh->other.refused += mn->counts.refused;
    sh->other.prompt_tokens += mn->counts.prompt_tokens;
    sh->other.completion_tokens += mn->counts.completion_tokens;

    ngx_rbtree_delete(&sh->rbtree, &mn->sn.node);
    ngx_slab_free_locked(shpool, mn);

    sh->keys--;
}


/* the key's entry, made (folding the oldest) when new; locked */

static ngx_http_anythingllm_metrics_node_t *
ngx_http_anythingllm_metrics_lookup(ngx_http_anythingllm_metrics_sh_t *sh,
    ngx_slab_pool_t *shpool, ngx_http_anythingllm_key_t *key)
{
    uint32_t                              hash;
    ngx_str_t                             id;
    ngx_http_anythingllm_metrics_node_t  *mn;

    id.data = (u_char *) key->digest;
    id.len = ALM_KEY_ID_LEN;

    hash = ngx_crc32_short(id.data, id.len);

    mn = (ngx_http_anythingllm_metrics_node_t *)
             ngx_str_rbtree_lookup(&sh->rbtree, &id, hash);

    if (mn) {
        ngx_queue_remove(&mn->queue);
        ngx_queue_insert_head(&sh->queue, &mn->queue);
        return mn;
    }

    if (sh->keys >= sh->keys_max) {
        ngx_http_anythingllm_metrics_fold(sh, shpool);
    }

    mn = ngx_slab_alloc_locked(shpool,
                               sizeof(ngx_http_anythingllm_metrics_node_t));

    while (mn == NULL && sh->keys) {
        ngx_http_anythingllm_metrics_fold(sh, shpool);
        mn = ngx_slab_alloc_locked(shpool,
                                   sizeof(ngx_http_anythingllm_metrics_node_t));
    }

    if (mn == NULL) {
        return NULL;
    }

    ngx_memcpy(mn->id, id.data, ALM_KEY_ID_LEN);
    ngx_memzero(&mn->counts, sizeof(mn->counts));

    /* the zone is mapped at one address in every process */
    mn->sn.node.key = hash;
    mn->sn.str.data = mn->id;
    mn->sn.str.len = ALM_KEY_ID_LEN;

    mn->name_len = ngx_min(key->name.len,
                           NGX_HTTP_ANYTHINGLLM_METRICS_NAME_LEN);
    ngx_memcpy(mn->name, key->name.data, mn->name_len);

    ngx_rbtree_insert(&sh->rbtree, &mn->sn.node);
    ngx_queue_insert_head(&sh->queue, &mn->queue);
    sh->keys++;

    return mn;
}


/* ------------------------------------------------------------------ */
/* the answer                                                         */

static ngx_int_t
ngx_http_anythingllm_metrics_handler(ngx_http_request_t *r)
{
    size_t                               size;
    u_char                              *p;
    ngx_int_t                            rc;
    ngx_buf_t                           *b;
    ngx_uint_t                           n;
    ngx_http_anythingllm_metrics_sh_t   *sh;
    ngx_http_anythingllm_metrics_key_t  *keys;
    ngx_http_anythingllm_main_conf_t    *amcf;
    ngx_http_anythingllm_metrics_counts_t  other;

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return NGX_HTTP_NOT_ALLOWED;
    }

    rc = ngx_http_discard_request_body(r);

    if (rc != NGX_OK) {
        return rc;
    }

    amcf = ngx_http_get_module_main_conf(r, ngx_http_anythingllm_module);
    sh = amcf->metrics.sh;

    if (sh == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ngx_shmtx_lock(&amcf->metrics.shpool->mutex);

    keys = ngx_http_anythingllm_metrics_copy(sh, amcf->metrics.shpool,
                                             r->pool, &n);
    other = sh->other;

    ngx_shmtx_unlock(&amcf->metrics.shpool->mutex);

    if (keys == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    /* every line of every family at its longest, with HELP and TYPE */

    size = (NGX_HTTP_ANYTHINGLLM_M_MAX + 4 * (n + 1))
               * NGX_HTTP_ANYTHINGLLM_METRICS_KEY_LINE
           + NGX_HTTP_ANYTHINGLLM_H_MAX
             * (NGX_HTTP_ANYTHINGLLM_H_BUCKETS + 4) * 160
           + 64 * 256;

    b = ngx_create_temp_buf(r->pool, size);
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = ngx_http_anythingllm_metrics_globals(b->last, sh, amcf);
    p = ngx_http_anythingllm_metrics_histograms(p, sh);
    p = ngx_http_anythingllm_metrics_keys(p, keys, n, &other);

    b->last = p;
    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;

    r->headers_out.status = NGX_HTTP_OK;
    r->headers_out.content_length_n = b->last - b->pos;
    ngx_str_set(&r->headers_out.content_type,
                "text/plain; version=0.0.4");
    r->headers_out.content_type_len = sizeof("text/plain") - 1;

    return ngx_http_anythingllm_send_buf(r, b);
}


/* the per-key series out of the zone, most recently seen first; locked */

static ngx_http_anythingllm_metrics_key_t *
ngx_http_anythingllm_metrics_copy(ngx_http_anythingllm_metrics_sh_t *sh,
    ngx_slab_pool_t *shpool, ngx_pool_t *pool, ngx_uint_t *n)
{
    ngx_uint_t                            i;
    ngx_queue_t                          *q;
    ngx_http_anythingllm_metrics_key_t   *keys;
    ngx_http_anythingllm_metrics_node_t  *mn;

    keys = ngx_palloc(pool, (sh->keys + 1)
                            * sizeof(ngx_http_anythingllm_metrics_key_t));
    if (keys == NULL) {
        return NULL;
    }

    i = 0;

    for (q = ngx_queue_head(&sh->queue);
         q != ngx_queue_sentinel(&sh->queue);
         q = ngx_queue_next(q))
    {
        mn = ngx_queue_data(q, ngx_http_anythingllm_metrics_node_t, queue);

        ngx_memcpy(keys[i].id, mn->id, ALM_KEY_ID_LEN);
        keys[i].name_len = mn->name_len;
        ngx_memcpy(keys[i].name, mn->name, mn->name_len);
        keys[i].counts = mn->counts;
        i++;
    }

    *n = i;

    return keys;
}


static u_char *
ngx_http_anythingllm_metrics_family(u_char *p, const char *name,
    const char *type, const char *help)
{
    return ngx_sprintf(p, "# HELP %s %s\n# TYPE %s %s\n",
                       name, help, name, type);
}


static u_char *
ngx_http_anythingllm_metrics_globals(u_char *p,
    ngx_http_anythingllm_metrics_sh_t *sh,
    ngx_http_anythingllm_main_conf_t *amcf)
{
    ngx_uint_t                      i;
    ngx_atomic_uint_t               v;
    ngx_http_anythingllm_metric_t  *m;

    for (i = 0; i < NGX_HTTP_ANYTHINGLLM_M_MAX; i++) {
        m = &ngx_http_anythingllm_series[i];

        if (i == 0 || ngx_strcmp(m->name, m[-1].name) != 0) {
            p = ngx_http_anythingllm_metrics_family(p, m->name, m->type,
                                                    m->help);
        }

        if (i == NGX_HTTP_ANYTHINGLLM_M_STREAMS_OPEN) {
            v = ngx_http_anythingllm_metrics_streams_open(sh);

        } else {
            v = ngx_http_anythingllm_metrics_reads[i]
                ? ngx_http_anythingllm_metrics_reads[i](amcf)
                : sh->count[i];
        }

        if (i < NGX_HTTP_ANYTHINGLLM_M_SCOPE) {
            if (i == NGX_HTTP_ANYTHINGLLM_M_VERDICT) {
                continue;       /* "none": not judged, not counted */
            }

            p = ngx_sprintf(p, "%s{verdict=\"%V\"} %uA\n", m->name,
                            &ngx_http_anythingllm_auth_results[i], v);

        } else if (m->label) {
            p = ngx_sprintf(p, "%s{%s} %uA\n", m->name, m->label, v);

        } else {
            p = ngx_sprintf(p, "%s %uA\n", m->name, v);
        }
    }

    return p;
}


static u_char *
ngx_http_anythingllm_metrics_histograms(u_char *p,
    ngx_http_anythingllm_metrics_sh_t *sh)
{
    ngx_uint_t                         i, j;
    ngx_msec_t                         sum;
    ngx_atomic_uint_t                  total;
    ngx_http_anythingllm_histogram_t  *h;

    for (i = 0; i < NGX_HTTP_ANYTHINGLLM_H_MAX; i++) {
        h = &ngx_http_anythingllm_histograms[i];

        p = ngx_http_anythingllm_metrics_family(p, h->name, "histogram",
                                                h->help);
        total = 0;

        for (j = 0; j < NGX_HTTP_ANYTHINGLLM_H_BUCKETS; j++) {
            total += sh->bucket[i][j];

            if (j == NGX_HTTP_ANYTHINGLLM_H_BUCKETS - 1) {
                p = ngx_sprintf(p, "%s_bucket{le=\"+Inf\"} %uA\n",
                                h->name, total);

            } else {
                p = ngx_sprintf(p, "%s_bucket{le=\"%V\"} %uA\n",
                                h->name, &h->les[j], total);
            }
        }

        sum = sh->sum[i];

        p = ngx_sprintf(p, "%s_sum %M.%03M\n%s_count %uA\n",
                        h->name, sum / 1000, sum % 1000, h->name, total);
    }

    return p;
}


/*
 * A label value: backslash, double quote and newline escaped, and a
 * byte that does not start valid UTF-8 (a name cut in the middle of a
 * character, say) written as "?": the format wants UTF-8.
 */

static u_char *
ngx_http_anythingllm_metrics_label(u_char *p, u_char *s, size_t len)
{
    u_char  *end, *next;

    end = s + len;

    while (s < end) {
        switch (*s) {

        case '\\':
        case '"':
            *p++ = '\\';
            *p++ = *s++;
            continue;

        case '\n':
            *p++ = '\\';
            *p++ = 'n';
            s++;
            continue;
        }

        if (*s < 0x80) {
            *p++ = *s++;
            continue;
        }

        next = s;

        if (ngx_utf8_decode(&next, end - s) > 0x10ffff) {
            *p++ = '?';
            s++;
            continue;
        }

        p = ngx_cpymem(p, s, next - s);
        s = next;
    }

    return p;
}


static u_char *
ngx_http_anythingllm_metrics_keys(u_char *p,
    ngx_http_anythingllm_metrics_key_t *keys, ngx_uint_t n,
    ngx_http_anythingllm_metrics_counts_t *other)
{
    uint64_t                               v;
    ngx_uint_t                             f, i;
    ngx_http_anythingllm_metrics_key_t    *k;
    ngx_http_anythingllm_metrics_counts_t *c;

    static const struct {
        const char  *name;
        const char  *help;
        size_t       offset;
    } families[] = {
        { "anythingllm_key_requests_total",
          "Requests per key (the least recently seen keys as \"other\").",
          offsetof(ngx_http_anythingllm_metrics_counts_t, requests) },
        { "anythingllm_key_refusals_total",
          "Requests per key refused by the key check.",
          offsetof(ngx_http_anythingllm_metrics_counts_t, refused) },
        { "anythingllm_key_prompt_tokens_total",
          "Prompt tokens per key, as AnythingLLM reported them.",
          offsetof(ngx_http_anythingllm_metrics_counts_t, prompt_tokens) },
        { "anythingllm_key_completion_tokens_total",
          "Completion tokens per key, as AnythingLLM reported them.",
          offsetof(ngx_http_anythingllm_metrics_counts_t,
                   completion_tokens) }
    };

    for (f = 0; f < sizeof(families) / sizeof(families[0]); f++) {
        p = ngx_http_anythingllm_metrics_family(p, families[f].name,
                                                "counter", families[f].help);

        for (i = 0; i <= n; i++) {
            if (i < n) {
                k = &keys[i];
                c = &k->counts;
                p = ngx_sprintf(p, "%s{key_id=\"%*s\",key_name=\"",
                                families[f].name, (size_t) ALM_KEY_ID_LEN,
                                k->id);
                p = ngx_http_anythingllm_metrics_label(p, k->name,
                                                       k->name_len);
                p = ngx_cpymem(p, "\"}", 2);

            } else {
                c = other;
                p = ngx_sprintf(p, "%s{key_id=\"other\",key_name=\"\"}",
                                families[f].name);
            }

            v = *(uint64_t *) ((u_char *) c + families[f].offset);
            p = ngx_sprintf(p, " %uL\n", v);
        }
    }

    return p;
}
