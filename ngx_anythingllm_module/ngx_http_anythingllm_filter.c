/*
 * Copyright (C) ngx_anythingllm authors
 *
 * Placeholder: response filters.
 */


#include "ngx_http_anythingllm_module.h"


static ngx_http_output_header_filter_pt  ngx_http_next_header_filter;


static ngx_int_t
ngx_http_anythingllm_header_filter(ngx_http_request_t *r)
{
    if (r == r->main && ngx_http_anythingllm_add_cors(r) != NGX_OK) {
        return NGX_ERROR;
    }

    return ngx_http_next_header_filter(r);
}


ngx_int_t
ngx_http_anythingllm_filter_init(ngx_conf_t *cf)
{
    ngx_http_next_header_filter = ngx_http_top_header_filter;
    ngx_http_top_header_filter = ngx_http_anythingllm_header_filter;

    return NGX_OK;
}
