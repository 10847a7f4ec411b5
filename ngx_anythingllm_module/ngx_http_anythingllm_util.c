/*
 * Copyright (C) ngx_anythingllm authors
 *
 * Per-request helpers shared by the phase handlers and the filters:
 * the request context, OpenAI-shaped error answers, request and
 * response headers.  This file calls no other file of the module.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_anythingllm_module.h"


static void ngx_http_anythingllm_free(void *data);


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
ngx_http_anythingllm_error_body(ngx_pool_t *pool, const char *message,
    const char *type, const char *param, const char *code, ngx_str_t *body)
{
    size_t   len;
    u_char  *p;

    len = alm_error_json(NULL, 0, message, type, param, code);

    /* the writer ends with a NUL, which the newline then replaces */

    p = ngx_pnalloc(pool, len + 1);
    if (p == NULL) {
        return NGX_ERROR;
    }

    (void) alm_error_json((char *) p, len + 1, message, type, param, code);
    p[len++] = '\n';

    body->data = p;
    body->len = len;

    return NGX_OK;
}


/* a whole body in memory, the last buffer of its chain */

ngx_buf_t *
ngx_http_anythingllm_body_buf(ngx_pool_t *pool, ngx_str_t *body)
{
    ngx_buf_t  *b;

    b = ngx_calloc_buf(pool);
    if (b == NULL) {
        return NULL;
    }

    b->start = body->data;
    b->pos = b->start;
    b->last = b->start + body->len;
    b->end = b->last;
    b->memory = 1;
    b->last_buf = 1;
    b->last_in_chain = 1;

    return b;
}


ngx_int_t
ngx_http_anythingllm_send_error(ngx_http_request_t *r, ngx_uint_t status,
    const char *message, const char *type, const char *param,
    const char *code)
{
    ngx_str_t   body;
    ngx_buf_t  *b;

    if (ngx_http_anythingllm_error_body(r->pool, message, type, param, code,
                                        &body)
        != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    b = ngx_http_anythingllm_body_buf(r->pool, &body);
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    b->last_buf = (r == r->main) ? 1 : 0;

    /* the body is ours: drop what the client sent, keep the connection */

    if (ngx_http_discard_request_body(r) != NGX_OK) {
        r->keepalive = 0;
    }

    r->headers_out.status = status;
    r->headers_out.content_length_n = body.len;
    ngx_str_set(&r->headers_out.content_type, "application/json");
    r->headers_out.content_type_len = r->headers_out.content_type.len;
    r->headers_out.content_type_lowcase = NULL;

    ngx_http_clear_accept_ranges(r);
    ngx_http_clear_last_modified(r);
    ngx_http_clear_etag(r);

    return ngx_http_anythingllm_send_buf(r, b);
}


/* the headers as set, then b as the whole body */

ngx_int_t
ngx_http_anythingllm_send_buf(ngx_http_request_t *r, ngx_buf_t *b)
{
    ngx_int_t     rc;
    ngx_chain_t   out;

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
 * The next element of a header list: a walk starts with *part at the
 * list's first part and *i 0, and ends with NULL.  Empty parts are
 * stepped over.
 */

ngx_table_elt_t *
ngx_http_anythingllm_next_header(ngx_list_part_t **part, ngx_uint_t *i)
{
    ngx_table_elt_t  *h;

    while (*i >= (*part)->nelts) {
        if ((*part)->next == NULL) {
            return NULL;
        }

        *part = (*part)->next;
        *i = 0;
    }

    h = (*part)->elts;

    return &h[(*i)++];
}


/*
 * Sets a header of the request, or of the response with
 * NGX_HTTP_ANYTHINGLLM_HEADER_OUT, to "value", found by name; with
 * NGX_HTTP_ANYTHINGLLM_HEADER_ADD a line is added when there is none.
 * "slot", when not NULL, is the r->headers_in or r->headers_out pointer
 * to update.  "name" and "lowcase" must outlive the request.
 *
 * Request headers are changed in place, every line of that name, never
 * removed: removing one would move the others that r->headers_in points
 * to.  Of the response's lines, the first one is changed and the
 * others are dropped (a header with hash 0 is not sent).
 */

ngx_int_t
ngx_http_anythingllm_set_header(ngx_http_request_t *r,
    ngx_table_elt_t **slot, const char *name, const char *lowcase,
    ngx_str_t *value, ngx_uint_t flags)
{
    size_t            len;
    ngx_uint_t        i, out;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h, *first;

    out = flags & NGX_HTTP_ANYTHINGLLM_HEADER_OUT;
    len = ngx_strlen(name);
    first = NULL;

    part = out ? &r->headers_out.headers.part : &r->headers_in.headers.part;
    i = 0;

    while ((h = ngx_http_anythingllm_next_header(&part, &i)) != NULL) {

        if ((out && h->hash == 0) || h->key.len != len
            || ngx_strncasecmp(h->key.data, (u_char *) name, len) != 0)
        {
            continue;
        }

        if (out && first) {
            h->hash = 0;
            continue;
        }

        h->value = *value;

        if (first == NULL) {
            first = h;
        }
    }

    if (first == NULL && (flags & NGX_HTTP_ANYTHINGLLM_HEADER_ADD)) {

        if (out) {
            first = ngx_http_anythingllm_push_header(r, name, value);
            if (first == NULL) {
                return NGX_ERROR;
            }

        } else {
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
    }

    if (slot) {
        *slot = first;
    }

    return NGX_OK;
}


/* the answer must come uncompressed where a filter reads it */

ngx_int_t
ngx_http_anythingllm_identity_encoding(ngx_http_request_t *r)
{
#if (NGX_HTTP_GZIP || NGX_HTTP_HEADERS)
    ngx_str_t  v;

    ngx_str_set(&v, "identity");

    return ngx_http_anythingllm_set_header(r, &r->headers_in.accept_encoding,
                                           "Accept-Encoding",
                                           "accept-encoding", &v, 0);
#else
    return NGX_OK;
#endif
}


/* runs handler(data) when "pool" is destroyed */

ngx_int_t
ngx_http_anythingllm_cleanup_add(ngx_pool_t *pool,
    ngx_pool_cleanup_pt handler, void *data)
{
    ngx_pool_cleanup_t  *cln;

    cln = ngx_pool_cleanup_add(pool, 0);
    if (cln == NULL) {
        return NGX_ERROR;
    }

    cln->handler = handler;
    cln->data = data;

    return NGX_OK;
}


/*
 * Runs handler(data) when the request's pool is destroyed and, before
 * that, when the request is terminated: what a pending Redis reply
 * needs so as never to reach a request that is gone.
 */

ngx_int_t
ngx_http_anythingllm_cleanup_request(ngx_http_request_t *r,
    ngx_pool_cleanup_pt handler, void *data)
{
    ngx_http_cleanup_t  *hcln;

    if (ngx_http_anythingllm_cleanup_add(r->pool, handler, data) != NGX_OK) {
        return NGX_ERROR;
    }

    hcln = ngx_http_cleanup_add(r, 0);
    if (hcln == NULL) {
        return NGX_ERROR;
    }

    hcln->handler = handler;
    hcln->data = data;

    return NGX_OK;
}


/* for what the core allocates with malloc() and hands over */

ngx_int_t
ngx_http_anythingllm_free_on_cleanup(ngx_pool_t *pool, void *p)
{
    if (ngx_http_anythingllm_cleanup_add(pool, ngx_http_anythingllm_free, p)
        != NGX_OK)
    {
        free(p);
        return NGX_ERROR;
    }

    return NGX_OK;
}


static void
ngx_http_anythingllm_free(void *data)
{
    free(data);
}


/*
 * Runs handler(ev) once the event loop has handled the events of this
 * turn: what a turn's requests add to a batch is sent together.  ev
 * lives in the worker's own memory, outside any request.
 */

void
ngx_http_anythingllm_post_turn_end(ngx_event_t *ev,
    ngx_event_handler_pt handler, void *data)
{
    if (ev->posted) {
        return;
    }

    ev->handler = handler;
    ev->data = data;
    ev->log = ngx_cycle->log;

    ngx_post_event(ev, &ngx_posted_events);
}
