/*
 * Copyright (C) ngx_anythingllm authors
 *
 * What goes upstream: anythingllm_upstream_key, AnythingLLM's own key
 * in the place of the client's, and no conditions or ranges on a
 * request whose answer the filters rewrite.  The precontent handler
 * hands the OpenAI routes over to ngx_http_anythingllm_openai.c.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_anythingllm_module.h"


static ngx_int_t ngx_http_anythingllm_drop_conditionals(
    ngx_http_request_t *r);


char *
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
 * The precontent phase: with anythingllm_upstream_key the client's
 * Authorization is replaced by AnythingLLM's own key (a location with
 * anythingllm_auth on cannot lack one: see the merge).  Then the
 * OpenAI routes take over, if enabled.  An answer the filters will
 * rewrite is asked for unconditionally and whole.
 */

ngx_int_t
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
            && ngx_http_anythingllm_set_header(r,
                                               &r->headers_in.authorization,
                                               "Authorization",
                                               "authorization",
                                               &alcf->upstream_key,
                                               NGX_HTTP_ANYTHINGLLM_HEADER_ADD)
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
