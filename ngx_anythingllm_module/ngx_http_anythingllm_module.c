/*
 * Copyright (C) ngx_anythingllm authors
 *
 * Module definition: directives, configuration, variables, the
 * registration of the phase handlers and filters, process init and
 * exit.  The directives that need more than a slot are parsed next to
 * the code they configure; no other file calls into this one.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_anythingllm_module.h"


static ngx_int_t ngx_http_anythingllm_add_variables(ngx_conf_t *cf);
static ngx_int_t ngx_http_anythingllm_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_anythingllm_init(ngx_conf_t *cf);
static void *ngx_http_anythingllm_create_main_conf(ngx_conf_t *cf);
static char *ngx_http_anythingllm_init_main_conf(ngx_conf_t *cf,
    void *conf);
static void *ngx_http_anythingllm_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_anythingllm_merge_loc_conf(ngx_conf_t *cf,
    void *parent, void *child);
static ngx_int_t ngx_http_anythingllm_init_process(ngx_cycle_t *cycle);
static void ngx_http_anythingllm_exit_process(ngx_cycle_t *cycle);


static ngx_conf_enum_t  ngx_http_anythingllm_chat_modes[] = {
    { ngx_string("chat"), ALM_MODE_CHAT },
    { ngx_string("query"), ALM_MODE_QUERY },
    { ngx_string("automatic"), ALM_MODE_AUTOMATIC },
    { ngx_null_string, 0 }
};


static ngx_command_t  ngx_http_anythingllm_commands[] = {

    { ngx_string("anythingllm_upstream_key"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_anythingllm_upstream_key,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("anythingllm_redis"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_1MORE,
      ngx_http_anythingllm_redis,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("anythingllm_key_cache"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_1MORE,
      ngx_http_anythingllm_key_cache,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("anythingllm_auth"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_anythingllm_loc_conf_t, auth),
      NULL },

    { ngx_string("anythingllm_auth_fail_open"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_anythingllm_loc_conf_t, auth_fail_open),
      NULL },

    { ngx_string("anythingllm_cors"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_anythingllm_loc_conf_t, cors),
      NULL },

    { ngx_string("anythingllm_openai"),
      NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_anythingllm_loc_conf_t, openai),
      NULL },

    { ngx_string("anythingllm_chat_mode"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_enum_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_anythingllm_loc_conf_t, chat_mode),
      &ngx_http_anythingllm_chat_modes },

    { ngx_string("anythingllm_conversation_ttl"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_sec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_anythingllm_main_conf_t, conversation_ttl),
      NULL },

    { ngx_string("anythingllm_conversation_max"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_anythingllm_main_conf_t, conversation_max),
      NULL },

    { ngx_string("anythingllm_max_frame_size"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_size_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_anythingllm_loc_conf_t, max_frame),
      NULL },

    { ngx_string("anythingllm_max_response_size"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_size_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_anythingllm_loc_conf_t, max_response),
      NULL },

    { ngx_string("anythingllm_metrics_zone"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_http_anythingllm_metrics_zone,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("anythingllm_metrics"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS|NGX_CONF_TAKE1,
      ngx_http_anythingllm_metrics,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_anythingllm_module_ctx = {
    ngx_http_anythingllm_add_variables,    /* preconfiguration */
    ngx_http_anythingllm_init,             /* postconfiguration */

    ngx_http_anythingllm_create_main_conf, /* create main configuration */
    ngx_http_anythingllm_init_main_conf,   /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_anythingllm_create_loc_conf,  /* create location configuration */
    ngx_http_anythingllm_merge_loc_conf    /* merge location configuration */
};


ngx_module_t  ngx_http_anythingllm_module = {
    NGX_MODULE_V1,
    &ngx_http_anythingllm_module_ctx,      /* module context */
    ngx_http_anythingllm_commands,         /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    ngx_http_anythingllm_init_process,     /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    ngx_http_anythingllm_exit_process,     /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


enum {
    NGX_HTTP_ANYTHINGLLM_VAR_KEY_NAME = 0,
    NGX_HTTP_ANYTHINGLLM_VAR_KEY_ID,
    NGX_HTTP_ANYTHINGLLM_VAR_WORKSPACE,
    NGX_HTTP_ANYTHINGLLM_VAR_AUTH_RESULT,
    NGX_HTTP_ANYTHINGLLM_VAR_PROMPT_TOKENS,
    NGX_HTTP_ANYTHINGLLM_VAR_COMPLETION_TOKENS,
    NGX_HTTP_ANYTHINGLLM_VAR_FIRST_TOKEN_MS
};


static ngx_http_variable_t  ngx_http_anythingllm_vars[] = {

    { ngx_string("anythingllm_key_name"), NULL,
      ngx_http_anythingllm_variable, NGX_HTTP_ANYTHINGLLM_VAR_KEY_NAME,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("anythingllm_key_id"), NULL,
      ngx_http_anythingllm_variable, NGX_HTTP_ANYTHINGLLM_VAR_KEY_ID,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("anythingllm_workspace"), NULL,
      ngx_http_anythingllm_variable, NGX_HTTP_ANYTHINGLLM_VAR_WORKSPACE,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("anythingllm_auth_result"), NULL,
      ngx_http_anythingllm_variable, NGX_HTTP_ANYTHINGLLM_VAR_AUTH_RESULT,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("anythingllm_prompt_tokens"), NULL,
      ngx_http_anythingllm_variable, NGX_HTTP_ANYTHINGLLM_VAR_PROMPT_TOKENS,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("anythingllm_completion_tokens"), NULL,
      ngx_http_anythingllm_variable,
      NGX_HTTP_ANYTHINGLLM_VAR_COMPLETION_TOKENS,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("anythingllm_first_token_ms"), NULL,
      ngx_http_anythingllm_variable,
      NGX_HTTP_ANYTHINGLLM_VAR_FIRST_TOKEN_MS,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

      ngx_http_null_variable
};


static ngx_int_t
ngx_http_anythingllm_add_variables(ngx_conf_t *cf)
{
    ngx_http_variable_t  *var, *v;

    for (v = ngx_http_anythingllm_vars; v->name.len; v++) {
        var = ngx_http_add_variable(cf, &v->name, v->flags);
        if (var == NULL) {
            return NGX_ERROR;
        }

        var->get_handler = v->get_handler;
        var->data = v->data;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_anythingllm_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    u_char                      *p;
    long                         n;
    ngx_str_t                    s;
    ngx_http_anythingllm_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r->main, ngx_http_anythingllm_module);

    if (ctx == NULL) {
        v->not_found = 1;
        return NGX_OK;
    }

    switch (data) {

    case NGX_HTTP_ANYTHINGLLM_VAR_KEY_NAME:
        if (!ctx->key.valid || ctx->key.name.len == 0) {
            v->not_found = 1;
            return NGX_OK;
        }

        s = ctx->key.name;
        break;

    case NGX_HTTP_ANYTHINGLLM_VAR_KEY_ID:
        if (!ctx->key.valid) {
            v->not_found = 1;
            return NGX_OK;
        }

        s.data = (u_char *) ctx->key.digest;
        s.len = ALM_KEY_ID_LEN;
        break;

    case NGX_HTTP_ANYTHINGLLM_VAR_WORKSPACE:
        if (ctx->workspace.len == 0) {
            v->not_found = 1;
            return NGX_OK;
        }

        s = ctx->workspace;
        break;

    case NGX_HTTP_ANYTHINGLLM_VAR_AUTH_RESULT:
        if (ctx->auth_result == NGX_HTTP_ANYTHINGLLM_AUTH_NONE) {
            v->not_found = 1;
            return NGX_OK;
        }

        s = ngx_http_anythingllm_auth_results[ctx->auth_result];
        break;

    case NGX_HTTP_ANYTHINGLLM_VAR_FIRST_TOKEN_MS:
        if (!ctx->first_token_set) {
            v->not_found = 1;
            return NGX_OK;
        }

        n = (long) ctx->first_token;
        goto number;

    default: /* tokens */
        if (!ctx->usage.present) {
            v->not_found = 1;
            return NGX_OK;
        }

        n = (data == NGX_HTTP_ANYTHINGLLM_VAR_PROMPT_TOKENS)
            ? ctx->usage.prompt_tokens : ctx->usage.completion_tokens;

    number:

        p = ngx_pnalloc(r->pool, NGX_INT64_LEN);
        if (p == NULL) {
            return NGX_ERROR;
        }

        s.data = p;
        s.len = ngx_sprintf(p, "%l", n) - p;
        break;
    }

    v->data = s.data;
    v->len = s.len;
    v->valid = 1;
    v->no_cacheable = 1;
    v->not_found = 0;

    return NGX_OK;
}


static ngx_int_t
ngx_http_anythingllm_init(ngx_conf_t *cf)
{
    ngx_http_handler_pt        *h;
    ngx_http_core_main_conf_t  *cmcf;

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_ACCESS_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_anythingllm_access_handler;

    /*
     * The handlers of a phase run in the reverse order of their
     * registration: the preflight is answered before any key check.
     */

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_ACCESS_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_anythingllm_preflight_handler;

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_PRECONTENT_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_anythingllm_precontent_handler;

    /* registered last, run first: a refused chat reads no body */

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_PRECONTENT_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_anythingllm_usage_handler;

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_LOG_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_anythingllm_metrics_log_handler;

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_LOG_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_anythingllm_usage_log_handler;

    ngx_http_anythingllm_metrics_gauge(NGX_HTTP_ANYTHINGLLM_M_CACHE_ENTRIES,
                                       ngx_http_anythingllm_cache_entries);

    /* the usage filter sees native chat answers after the others */

    if (ngx_http_anythingllm_usage_filter_init(cf) != NGX_OK) {
        return NGX_ERROR;
    }

    return ngx_http_anythingllm_filter_init(cf);
}


static void *
ngx_http_anythingllm_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_anythingllm_main_conf_t  *amcf;

    amcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_anythingllm_main_conf_t));
    if (amcf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     amcf->redis_addr = { 0, NULL };
     *     amcf->redis_password = { 0, NULL };
     *     amcf->prefix = { 0, NULL };
     *     amcf->cache_zone = NULL;
     */

    amcf->redis_db = NGX_CONF_UNSET;
    amcf->redis_timeout = NGX_CONF_UNSET_MSEC;
    amcf->cache_valid = NGX_CONF_UNSET;
    amcf->cache_invalid = NGX_CONF_UNSET;
    amcf->conversation_ttl = NGX_CONF_UNSET;
    amcf->conversation_max = NGX_CONF_UNSET;

    return amcf;
}


static char *
ngx_http_anythingllm_init_main_conf(ngx_conf_t *cf, void *conf)
{
    ngx_http_anythingllm_main_conf_t  *amcf = conf;

    ngx_conf_init_value(amcf->redis_db, 0);
    ngx_conf_init_msec_value(amcf->redis_timeout, 100);
    ngx_conf_init_value(amcf->cache_valid, 30);
    ngx_conf_init_value(amcf->cache_invalid, 5);
    ngx_conf_init_value(amcf->conversation_ttl, 86400);
    ngx_conf_init_value(amcf->conversation_max,
                        NGX_HTTP_ANYTHINGLLM_CONVERSATION_MAX);

    if (amcf->prefix.data == NULL) {
        ngx_str_set(&amcf->prefix, "anythingllm:");
    }

    if (amcf->redis_addr.len == 0) {
        ngx_str_set(&amcf->redis_addr, "127.0.0.1:6379");
        ngx_str_set(&amcf->redis_host, "127.0.0.1");
        amcf->redis_port = 6379;
    }

    if (ngx_http_anythingllm_redis_key(cf->pool, &amcf->prefix,
                                       "revocations", NULL, 0,
                                       &amcf->revocations)
        != NGX_OK
        || ngx_http_anythingllm_redis_key(cf->pool, &amcf->prefix, "conv",
                                          NULL, 0, &amcf->conv_records)
           != NGX_OK
        || ngx_http_anythingllm_redis_key(cf->pool, &amcf->prefix,
                                          "conv:until", NULL, 0,
                                          &amcf->conv_index)
           != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    /* a location answers metrics: the zone it reads, 1m unless sized */

    if (amcf->metrics_used && amcf->metrics_zone == NULL
        && ngx_http_anythingllm_metrics_add_zone(cf, amcf, 1024 * 1024)
           != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static void *
ngx_http_anythingllm_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_anythingllm_loc_conf_t  *conf;

    conf = ngx_pcalloc(cf->pool, sizeof(ngx_http_anythingllm_loc_conf_t));
    if (conf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     conf->upstream_key = { 0, NULL };
     *     conf->cors = { 0, NULL };
     *     conf->enabled = 0;
     */

    conf->auth = NGX_CONF_UNSET;
    conf->auth_fail_open = NGX_CONF_UNSET;
    conf->openai = NGX_CONF_UNSET;
    conf->chat_mode = NGX_CONF_UNSET_UINT;
    conf->max_frame = NGX_CONF_UNSET_SIZE;
    conf->max_response = NGX_CONF_UNSET_SIZE;

    return conf;
}


static char *
ngx_http_anythingllm_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child)
{
    ngx_http_anythingllm_loc_conf_t  *prev = parent;
    ngx_http_anythingllm_loc_conf_t  *conf = child;

    ngx_http_anythingllm_main_conf_t  *amcf;

    ngx_conf_merge_str_value(conf->upstream_key, prev->upstream_key, "");
    ngx_conf_merge_value(conf->auth, prev->auth, 0);
    ngx_conf_merge_value(conf->auth_fail_open, prev->auth_fail_open, 0);
    ngx_conf_merge_str_value(conf->cors, prev->cors, "");
    ngx_conf_merge_value(conf->openai, prev->openai, 0);
    ngx_conf_merge_uint_value(conf->chat_mode, prev->chat_mode,
                              ALM_MODE_CHAT);
    ngx_conf_merge_size_value(conf->max_frame, prev->max_frame,
                              64 * 1024);
    ngx_conf_merge_size_value(conf->max_response, prev->max_response,
                              4 * 1024 * 1024);

    if (conf->max_frame < 1024) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"anythingllm_max_frame_size\" must be "
                           "at least 1k");
        return NGX_CONF_ERROR;
    }

    if (conf->max_response < 1024) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"anythingllm_max_response_size\" must be "
                           "at least 1k");
        return NGX_CONF_ERROR;
    }

    /* elsewhere every handler and filter of the module steps aside */

    conf->enabled = (conf->upstream_key.len || conf->auth == 1
                     || conf->cors.len || conf->openai == 1);

    /*
     * the key a client showed the gateway must never reach AnythingLLM:
     * where keys are checked, AnythingLLM's own key replaces it
     */

    if (conf->auth == 1 && conf->upstream_key.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"anythingllm_auth\" needs "
                           "\"anythingllm_upstream_key\" at the same or "
                           "an outer level, so that client keys never "
                           "reach AnythingLLM");
        return NGX_CONF_ERROR;
    }

    /* workers connect to Redis only when something here needs it */

    if (conf->auth == 1 || conf->openai == 1) {
        amcf = ngx_http_conf_get_module_main_conf(cf,
                                                  ngx_http_anythingllm_module);
        amcf->redis_used = 1;

        if (conf->auth == 1 && amcf->cache_zone == NULL
            && ngx_http_anythingllm_cache_default_zone(cf, amcf) != NGX_OK)
        {
            return NGX_CONF_ERROR;
        }
    }

    return NGX_CONF_OK;
}


/*
 * config defines the version from the VERSION file; a build that bypasses
 * config would log a wrong one, so it must not compile.
 */

#ifndef NGX_HTTP_ANYTHINGLLM_VERSION
#error "NGX_HTTP_ANYTHINGLLM_VERSION comes from config: build through it"
#endif


/*
 * Once per worker, and only where the configuration uses the module: an
 * nginx that merely loads it logs nothing.  Cache manager and loader
 * processes also pass through init_process and stay silent.
 */

static void
ngx_http_anythingllm_log_version(ngx_cycle_t *cycle)
{
    ngx_http_anythingllm_main_conf_t  *amcf;

    if (ngx_process != NGX_PROCESS_WORKER
        && ngx_process != NGX_PROCESS_SINGLE)
    {
        return;
    }

    amcf = ngx_http_cycle_get_module_main_conf(cycle,
                                               ngx_http_anythingllm_module);

    if (amcf == NULL || !amcf->redis_used) {
        return;
    }

    ngx_log_error(NGX_LOG_NOTICE, cycle->log, 0,
                  "ngx_http_anythingllm_module "
                  NGX_HTTP_ANYTHINGLLM_VERSION);
}


static ngx_int_t
ngx_http_anythingllm_init_process(ngx_cycle_t *cycle)
{
    ngx_http_anythingllm_log_version(cycle);

    ngx_http_anythingllm_metrics_init_process(
        ngx_http_cycle_get_module_main_conf(cycle,
                                            ngx_http_anythingllm_module));

    return ngx_http_anythingllm_redis_init_process(cycle,
                                        ngx_http_anythingllm_cache_revocation);
}


static void
ngx_http_anythingllm_exit_process(ngx_cycle_t *cycle)
{
    ngx_http_anythingllm_metrics_exit_process();
    ngx_http_anythingllm_redis_exit_process(cycle);
    ngx_http_anythingllm_auth_exit_process();
}
