/*
 * Copyright (C) ngx_anythingllm authors
 *
 * Module definition: directives, configuration, variables, the phase
 * handlers that tie the concerns together, and the upstream key
 * injection.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_anythingllm_module.h"


static void ngx_http_anythingllm_hide_cors(ngx_http_request_t *r);
static ngx_int_t ngx_http_anythingllm_preflight_handler(
    ngx_http_request_t *r);
static ngx_int_t ngx_http_anythingllm_precontent_handler(
    ngx_http_request_t *r);
static ngx_int_t ngx_http_anythingllm_drop_conditionals(
    ngx_http_request_t *r);
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
static char *ngx_http_anythingllm_upstream_key(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static char *ngx_http_anythingllm_redis(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_anythingllm_key_cache(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
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
    NGX_HTTP_ANYTHINGLLM_VAR_COMPLETION_TOKENS
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

      ngx_http_null_variable
};


/* indexed by ngx_http_anythingllm_auth_result_e */

static ngx_str_t  ngx_http_anythingllm_auth_results[] = {
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


ngx_http_anythingllm_ctx_t *
ngx_http_anythingllm_get_ctx(ngx_http_request_t *r)
{
    ngx_http_anythingllm_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_anythingllm_module);
    if (ctx) {
        return ctx;
    }

    ctx = ngx_pcalloc(r->pool, sizeof(ngx_http_anythingllm_ctx_t));
    if (ctx == NULL) {
        return NULL;
    }

    ngx_http_set_ctx(r, ctx, ngx_http_anythingllm_module);

    ngx_log_debug1(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "anythingllm request context created for \"%V\"",
                   &r->uri);

    return ctx;
}


ngx_int_t
ngx_http_anythingllm_send_error(ngx_http_request_t *r, ngx_uint_t status,
    const char *message, const char *type, const char *param,
    const char *code)
{
    size_t        len;
    ngx_int_t     rc;
    ngx_buf_t    *b;
    ngx_chain_t   out;
    char          tmp[512];

    len = alm_error_json(tmp, sizeof(tmp), message, type, param, code);

    b = ngx_create_temp_buf(r->pool, len + 1);
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (len < sizeof(tmp)) {
        b->last = ngx_cpymem(b->last, tmp, len);

    } else {
        (void) alm_error_json((char *) b->pos, len + 1, message, type,
                              param, code);
        b->last += len;
    }

    *b->last++ = '\n';

    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;

    /* the body is ours: drop what the client sent, keep the connection */

    if (ngx_http_discard_request_body(r) != NGX_OK) {
        r->keepalive = 0;
    }

    r->headers_out.status = status;
    r->headers_out.content_length_n = b->last - b->pos;
    ngx_str_set(&r->headers_out.content_type, "application/json");
    r->headers_out.content_type_len = r->headers_out.content_type.len;
    r->headers_out.content_type_lowcase = NULL;

    ngx_http_clear_accept_ranges(r);
    ngx_http_clear_last_modified(r);
    ngx_http_clear_etag(r);

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    out.buf = b;
    out.next = NULL;

    return ngx_http_output_filter(r, &out);
}


ngx_int_t
ngx_http_anythingllm_error(ngx_http_request_t *r, ngx_uint_t status,
    const char *message, const char *type, const char *param,
    const char *code)
{
    ngx_int_t  rc;

    rc = ngx_http_anythingllm_send_error(r, status, message, type, param,
                                         code);

    ngx_http_finalize_request(r, rc);

    return NGX_DONE;
}


ngx_int_t
ngx_http_anythingllm_alm_error(ngx_http_request_t *r, alm_error_t *err)
{
    return ngx_http_anythingllm_error(r, err->status, err->message,
                                      err->type, err->param, err->code);
}


ngx_table_elt_t *
ngx_http_anythingllm_push_header(ngx_http_request_t *r, const char *key,
    ngx_str_t *value)
{
    ngx_table_elt_t  *h;

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NULL;
    }

    h->hash = 1;
    h->key.data = (u_char *) key;
    h->key.len = ngx_strlen(key);
    h->value = *value;
    h->lowcase_key = NULL;

    return h;
}


/*
 * AnythingLLM sends CORS headers of its own; two
 * Access-Control-Allow-Origin lines make browsers refuse the answer.
 * A header with hash 0 is not sent.
 */

static void
ngx_http_anythingllm_hide_cors(ngx_http_request_t *r)
{
    ngx_uint_t        i;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h;

    part = &r->headers_out.headers.part;
    h = part->elts;

    for (i = 0; /* void */; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (h[i].key.len > sizeof("Access-Control-") - 1
            && ngx_strncasecmp(h[i].key.data, (u_char *) "Access-Control-",
                               sizeof("Access-Control-") - 1)
               == 0)
        {
            h[i].hash = 0;
        }
    }
}


/*
 * Adds the CORS response headers.  Called by the header filter for
 * every answer of a location with anythingllm_cors, streams included.
 */

ngx_int_t
ngx_http_anythingllm_add_cors(ngx_http_request_t *r)
{
    ngx_str_t                         v;
    ngx_http_anythingllm_loc_conf_t  *alcf;

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_anythingllm_module);

    if (alcf->cors.len == 0) {
        return NGX_OK;
    }

    /* without an upstream, the headers are the gateway's own */

    if (r->upstream) {
        ngx_http_anythingllm_hide_cors(r);
    }

    if (ngx_http_anythingllm_push_header(r, "Access-Control-Allow-Origin",
                                         &alcf->cors)
        == NULL)
    {
        return NGX_ERROR;
    }

    ngx_str_set(&v, "Retry-After, X-Request-Id, OpenAI-Processing-Ms");

    if (ngx_http_anythingllm_push_header(r, "Access-Control-Expose-Headers",
                                         &v)
        == NULL)
    {
        return NGX_ERROR;
    }

    if (alcf->cors.len != 1 || alcf->cors.data[0] != '*') {
        ngx_str_set(&v, "Origin");

        if (ngx_http_anythingllm_push_header(r, "Vary", &v) == NULL) {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


/*
 * A CORS preflight carries no key: it is answered here, first in the
 * access phase, for any location with anythingllm_cors.  The preaccess
 * phase, where limit_req and limit_conn count, has run by then: a
 * preflight is limited like any other request.
 */

static ngx_int_t
ngx_http_anythingllm_preflight_handler(ngx_http_request_t *r)
{
    ngx_int_t                         rc;
    ngx_str_t                         v;
    ngx_list_part_t                  *part;
    ngx_table_elt_t                  *h;
    ngx_uint_t                        i, preflight;
    ngx_http_anythingllm_loc_conf_t  *alcf;

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_anythingllm_module);

    if (alcf->cors.len == 0 || r->method != NGX_HTTP_OPTIONS
        || r != r->main)
    {
        return NGX_DECLINED;
    }

    preflight = 0;
    part = &r->headers_in.headers.part;
    h = part->elts;

    for (i = 0; /* void */; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (h[i].key.len == sizeof("Access-Control-Request-Method") - 1
            && ngx_strncasecmp(h[i].key.data,
                               (u_char *) "Access-Control-Request-Method",
                               h[i].key.len)
               == 0)
        {
            preflight = 1;
            break;
        }
    }

    if (!preflight) {
        return NGX_DECLINED;
    }

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    ngx_str_set(&v, "GET, POST, DELETE, OPTIONS");
    if (ngx_http_anythingllm_push_header(r, "Access-Control-Allow-Methods",
                                         &v)
        == NULL)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ngx_str_set(&v, "Authorization, Content-Type, OpenAI-Organization, "
                    "OpenAI-Project, OpenAI-Beta, X-Stainless-Arch, "
                    "X-Stainless-Lang, X-Stainless-OS, "
                    "X-Stainless-Package-Version, X-Stainless-Retry-Count, "
                    "X-Stainless-Runtime, X-Stainless-Runtime-Version, "
                    "X-Stainless-Timeout");
    if (ngx_http_anythingllm_push_header(r, "Access-Control-Allow-Headers",
                                         &v)
        == NULL)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ngx_str_set(&v, "86400");
    if (ngx_http_anythingllm_push_header(r, "Access-Control-Max-Age", &v)
        == NULL)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    r->headers_out.status = NGX_HTTP_NO_CONTENT;
    r->headers_out.content_length_n = 0;
    r->header_only = 1;

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK) {
        return rc;
    }

    ngx_http_finalize_request(r, rc);

    return NGX_DONE;
}


/*
 * The precontent phase: with anythingllm_upstream_key the client's
 * Authorization is replaced by AnythingLLM's own key (a location with
 * anythingllm_auth on cannot lack one: see the merge).  Then the
 * OpenAI routes take over, if enabled.  An answer the filters will
 * rewrite is asked for unconditionally and whole.
 */

static ngx_int_t
ngx_http_anythingllm_precontent_handler(ngx_http_request_t *r)
{
    ngx_int_t                         rc;
    ngx_http_anythingllm_ctx_t       *ctx;
    ngx_http_anythingllm_loc_conf_t  *alcf;

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_anythingllm_module);

    /* nothing to do here, and no context to make, elsewhere */

    if (r != r->main
        || (alcf->upstream_key.len == 0 && alcf->openai != 1))
    {
        return NGX_DECLINED;
    }

    ctx = ngx_http_get_module_ctx(r, ngx_http_anythingllm_module);

    if (ctx == NULL || !ctx->key_replaced) {

        if (alcf->upstream_key.len
            && ngx_http_anythingllm_set_header_in(r,
                                                  &r->headers_in.authorization,
                                                  "Authorization",
                                                  "authorization",
                                                  &alcf->upstream_key, 1)
               != NGX_OK)
        {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        ctx = ngx_http_anythingllm_get_ctx(r);
        if (ctx == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        ctx->key_replaced = 1;
    }

    rc = (alcf->openai == 1) ? ngx_http_anythingllm_openai_handler(r)
                             : NGX_DECLINED;

    if (rc == NGX_DECLINED && ctx->resp != NGX_HTTP_ANYTHINGLLM_RESP_NONE
        && ngx_http_anythingllm_drop_conditionals(r) != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    return rc;
}


/*
 * A validator or a range AnythingLLM answers to belongs to its own
 * answer, not to the one the filters make of it: 304 or 206 would
 * bypass the rewrite.  Those request headers are removed, not blanked,
 * and nginx forgets them too, so that it judges none of them against
 * the rewritten answer (which carries no validator).
 */

static ngx_str_t  ngx_http_anythingllm_conditionals[] = {
    ngx_string("If-None-Match"),
    ngx_string("If-Modified-Since"),
    ngx_string("If-Match"),
    ngx_string("If-Unmodified-Since"),
    ngx_string("If-Range"),
    ngx_string("Range"),
    ngx_null_string
};


static ngx_int_t
ngx_http_anythingllm_drop_conditionals(ngx_http_request_t *r)
{
    ngx_str_t        *name;
    ngx_uint_t        i, dropped;
    ngx_list_t       *list;
    ngx_list_part_t  *part, *prev, *rest;
    ngx_table_elt_t  *h;

    list = &r->headers_in.headers;
    part = &list->part;
    prev = NULL;
    dropped = 0;
    i = 0;

    for ( ;; ) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }

            prev = part;
            part = part->next;
            i = 0;
            continue;
        }

        h = part->elts;

        for (name = ngx_http_anythingllm_conditionals; name->len; name++) {
            if (h[i].key.len == name->len
                && ngx_strncasecmp(h[i].key.data, name->data, name->len)
                   == 0)
            {
                break;
            }
        }

        if (name->len == 0) {
            i++;
            continue;
        }

        ngx_log_debug2(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                       "anythingllm drops \"%V: %V\"",
                       &h[i].key, &h[i].value);

        /*
         * Elements never move: r->headers_in points into them.  The
         * part is cut around the element instead; the elements after
         * it go on in a part of their own.
         */

        if (i + 1 < part->nelts) {
            rest = ngx_palloc(r->pool, sizeof(ngx_list_part_t));
            if (rest == NULL) {
                return NGX_ERROR;
            }

            rest->elts = &h[i + 1];
            rest->nelts = part->nelts - i - 1;
            rest->next = part->next;

            part->next = rest;

            if (list->last == part) {
                list->last = rest;
            }
        }

        part->nelts = i;
        dropped = 1;

        /*
         * Only the first part may be empty: the usual loops over a
         * list read the first element of every part after it.
         */

        if (i == 0 && prev) {
            prev->next = part->next;

            if (list->last == part) {
                list->last = prev;
            }

            part = prev;
            i = part->nelts;
        }

        /* i >= part->nelts now: the loop goes on with the next part */
    }

    if (!dropped) {
        return NGX_OK;
    }

    /*
     * ngx_list_push() appends to the last part until it holds nalloc
     * elements, but a part cut from the middle of an array has less
     * room: the last part counts as full, the next push makes a new one.
     */

    if (list->last->nelts) {
        list->nalloc = list->last->nelts;
    }

    r->headers_in.if_modified_since = NULL;
    r->headers_in.if_unmodified_since = NULL;
    r->headers_in.if_match = NULL;
    r->headers_in.if_none_match = NULL;
    r->headers_in.if_range = NULL;
    r->headers_in.range = NULL;

    return NGX_OK;
}


/*
 * Sets a request header to "value": every line of that name the client
 * sent, found by name, or a new line when "add" is set; "slot" is the
 * r->headers_in pointer to update.  Elements are changed in place, never
 * removed: removing one would move the others that r->headers_in
 * points to.
 */

ngx_int_t
ngx_http_anythingllm_set_header_in(ngx_http_request_t *r,
    ngx_table_elt_t **slot, const char *name, const char *lowcase,
    ngx_str_t *value, ngx_uint_t add)
{
    size_t            len;
    ngx_uint_t        i;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h, *first;

    len = ngx_strlen(name);
    first = NULL;

    part = &r->headers_in.headers.part;
    h = part->elts;

    for (i = 0; /* void */; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (h[i].key.len != len
            || ngx_strncasecmp(h[i].key.data, (u_char *) name, len) != 0)
        {
            continue;
        }

        h[i].value = *value;

        if (first == NULL) {
            first = &h[i];
        }
    }

    if (first == NULL && add) {
        first = ngx_list_push(&r->headers_in.headers);
        if (first == NULL) {
            return NGX_ERROR;
        }

        first->key.data = (u_char *) name;
        first->key.len = len;
        first->lowcase_key = (u_char *) lowcase;
        first->hash = ngx_hash_key(first->lowcase_key, len);
        first->value = *value;
    }

    *slot = first;

    return NGX_OK;
}




/* the answer must come uncompressed where a filter reads it */

ngx_int_t
ngx_http_anythingllm_identity_encoding(ngx_http_request_t *r)
{
#if (NGX_HTTP_GZIP || NGX_HTTP_HEADERS)
    ngx_str_t  v;

    ngx_str_set(&v, "identity");

    return ngx_http_anythingllm_set_header_in(r,
                                              &r->headers_in.accept_encoding,
                                              "Accept-Encoding",
                                              "accept-encoding", &v, 0);
#else
    return NGX_OK;
#endif
}


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

    default: /* tokens */
        if (!ctx->usage.present) {
            v->not_found = 1;
            return NGX_OK;
        }

        n = (data == NGX_HTTP_ANYTHINGLLM_VAR_PROMPT_TOKENS)
            ? ctx->usage.prompt_tokens : ctx->usage.completion_tokens;

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

    amcf->revocations.len = amcf->prefix.len + sizeof("revocations") - 1;
    amcf->revocations.data = ngx_pnalloc(cf->pool, amcf->revocations.len);
    if (amcf->revocations.data == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_memcpy(ngx_cpymem(amcf->revocations.data, amcf->prefix.data,
                          amcf->prefix.len),
               "revocations", sizeof("revocations") - 1);

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


static char *
ngx_http_anythingllm_upstream_key(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_anythingllm_loc_conf_t *alcf = conf;

    u_char     *p;
    ngx_str_t  *value;
    ngx_uint_t  i;

    if (alcf->upstream_key.data) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (value[1].len == 0) {
        return "takes a non-empty key";
    }

    for (i = 0; i < value[1].len; i++) {
        if (value[1].data[i] <= ' ' || value[1].data[i] == 0x7f) {
            return "takes a key without spaces or control characters";
        }
    }

    alcf->upstream_key.len = sizeof("Bearer ") - 1 + value[1].len;
    alcf->upstream_key.data = ngx_pnalloc(cf->pool, alcf->upstream_key.len);
    if (alcf->upstream_key.data == NULL) {
        return NGX_CONF_ERROR;
    }

    p = ngx_cpymem(alcf->upstream_key.data, "Bearer ", sizeof("Bearer ") - 1);
    ngx_memcpy(p, value[1].data, value[1].len);

    return NGX_CONF_OK;
}


/*
 * anythingllm_redis <ip:port | unix:/path> [db=N] [password=...]
 *                   [timeout=100ms] [prefix=anythingllm:];
 *
 * Only IP literals and unix sockets: hiredis resolves names with a
 * blocking getaddrinfo(), which must never run in a worker.
 */

static char *
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


/* anythingllm_key_cache zone=NAME:SIZE [valid=30s] [invalid=5s]; */

static char *
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

    amcf->cache_zone = ngx_shared_memory_add(cf, &name, size,
                                             &ngx_http_anythingllm_module);
    if (amcf->cache_zone == NULL) {
        return NGX_CONF_ERROR;
    }

    if (amcf->cache_zone->data) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "duplicate zone \"%V\"", &name);
        return NGX_CONF_ERROR;
    }

    amcf->cache_zone->init = ngx_http_anythingllm_cache_init_zone;
    amcf->cache_zone->data = amcf;

    return NGX_CONF_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid parameter \"%V\"", &value[i]);

    return NGX_CONF_ERROR;
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

    return ngx_http_anythingllm_redis_init_process(cycle);
}


static void
ngx_http_anythingllm_exit_process(ngx_cycle_t *cycle)
{
    ngx_http_anythingllm_redis_exit_process(cycle);
}
