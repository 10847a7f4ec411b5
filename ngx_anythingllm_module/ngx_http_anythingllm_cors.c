/*
 * Copyright (C) ngx_anythingllm authors
 *
 * anythingllm_cors: the preflight, answered in the access phase before
 * any key check, and the CORS headers of every answer, added by the
 * header filter.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_anythingllm_module.h"


static void ngx_http_anythingllm_hide_cors(ngx_http_request_t *r);


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
    i = 0;

    while ((h = ngx_http_anythingllm_next_header(&part, &i)) != NULL) {

        if (h->key.len > sizeof("Access-Control-") - 1
            && ngx_strncasecmp(h->key.data, (u_char *) "Access-Control-",
                               sizeof("Access-Control-") - 1)
               == 0)
        {
            h->hash = 0;
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

ngx_int_t
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
    i = 0;

    while ((h = ngx_http_anythingllm_next_header(&part, &i)) != NULL) {

        if (h->key.len == sizeof("Access-Control-Request-Method") - 1
            && ngx_strncasecmp(h->key.data,
                               (u_char *) "Access-Control-Request-Method",
                               h->key.len)
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
