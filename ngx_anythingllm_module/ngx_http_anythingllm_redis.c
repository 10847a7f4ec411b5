/*
 * Copyright (C) ngx_anythingllm authors
 *
 * Placeholder: hiredis on nginx's event loop.
 */


#include "ngx_http_anythingllm_module.h"


ngx_int_t
ngx_http_anythingllm_redis_init_process(ngx_cycle_t *cycle)
{
    return NGX_OK;
}


void
ngx_http_anythingllm_redis_exit_process(ngx_cycle_t *cycle)
{
}


ngx_uint_t
ngx_http_anythingllm_redis_connected(void)
{
    return 0;
}


ngx_http_anythingllm_redis_req_t *
ngx_http_anythingllm_redis_command(
    ngx_http_anythingllm_redis_handler_pt handler, void *data, int argc,
    const char **argv, const size_t *argvlen)
{
    return NULL;
}


void
ngx_http_anythingllm_redis_cancel(ngx_http_anythingllm_redis_req_t *rr)
{
}
