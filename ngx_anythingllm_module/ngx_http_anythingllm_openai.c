/*
 * Copyright (C) ngx_anythingllm authors
 *
 * Placeholder: OpenAI routes.
 */


#include "ngx_http_anythingllm_module.h"


ngx_int_t
ngx_http_anythingllm_openai_handler(ngx_http_request_t *r)
{
    return ngx_http_anythingllm_error(r, NGX_HTTP_NOT_FOUND, "Unknown route.",
                                      "invalid_request_error", NULL,
                                      "unknown_url");
}
