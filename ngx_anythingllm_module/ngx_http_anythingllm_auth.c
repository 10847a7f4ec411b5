/*
 * Copyright (C) ngx_anythingllm authors
 *
 * Placeholder: access phase key enforcement.
 */


#include "ngx_http_anythingllm_module.h"


ngx_int_t
ngx_http_anythingllm_access_handler(ngx_http_request_t *r)
{
    return NGX_DECLINED;
}
