/*
 * Copyright (C) ngx_anythingllm authors
 *
 * Response filters.  Every answer of the main request gets the CORS
 * headers.  Answers that the request context marks for translation:
 *
 *   stream-chat, 200     re-framed as it arrives: chat.completion.chunk
 *                        frames, each batch flushed at once
 *   chat, workspaces,    read whole (up to anythingllm_max_response_size)
 *   models, 200          and replaced by the translation
 *   any of them, >= 400  replaced by an OpenAI error; so are nginx's own
 *                        error pages (502, 504, 413, ...) in a location
 *                        with anythingllm_openai
 *   any of them, other   (304, 206, ...) an answer that cannot be
 *                        rewritten: a 502 in OpenAI's shape, never the
 *                        answer itself
 *
 * Rewritten answers carry no validator (ETag, Last-Modified), no
 * Accept-Ranges and no Content-Range: those belonged to AnythingLLM's
 * answer.  The request went upstream without conditions or ranges (see
 * the precontent handler).
 *
 * The filters sit at the top of the chain, before chunked and gzip.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_anythingllm_module.h"


#define NGX_HTTP_ANYTHINGLLM_ERROR_BODY_MAX  16384
#define NGX_HTTP_ANYTHINGLLM_OUT_BUF_SIZE    4096


typedef struct {
    ngx_http_request_t         *request;
    ngx_http_anythingllm_ctx_t *ctx;

    /* stream */
    alm_sse_t                   sse;
    ngx_chain_t                *out;
    ngx_chain_t               **last_out;
    ngx_chain_t                *free;
    ngx_chain_t                *busy;
    ngx_chain_t                *held;       /* input not yet released */
    ngx_buf_t                  *flush;      /* an empty flush, reused */

    /* whole answer */
    u_char                     *body;
    size_t                      len;
    size_t                      cap;
    size_t                      max;
    ngx_uint_t                  status;     /* of the answer received */
    ngx_uint_t                  end;        /* M_STREAM_*: how it ended,
                                               0 while it goes on */

    unsigned                    stream:1;
    unsigned                    error:1;    /* answer is an error */
    unsigned                    own:1;      /* nginx's own error page */
    unsigned                    refused:1;  /* cannot be rewritten */
    unsigned                    too_big:1;
    unsigned                    done:1;     /* last_buf passed on */
} ngx_http_anythingllm_filter_ctx_t;


static ngx_int_t ngx_http_anythingllm_header_filter(ngx_http_request_t *r);
static ngx_int_t ngx_http_anythingllm_body_filter(ngx_http_request_t *r,
    ngx_chain_t *in);
static ngx_int_t ngx_http_anythingllm_stream_header(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx,
    ngx_http_anythingllm_filter_ctx_t *fctx);
static ngx_int_t ngx_http_anythingllm_stream_body(ngx_http_request_t *r,
    ngx_http_anythingllm_filter_ctx_t *fctx, ngx_chain_t *in);
static ngx_int_t ngx_http_anythingllm_stream_feed(
    ngx_http_anythingllm_filter_ctx_t *fctx, ngx_buf_t *b);
static int ngx_http_anythingllm_stream_emit(void *data, const char *p,
    size_t len);
static ngx_int_t ngx_http_anythingllm_stream_ended(ngx_http_request_t *r,
    ngx_http_anythingllm_filter_ctx_t *fctx);
static ngx_int_t ngx_http_anythingllm_whole_body(ngx_http_request_t *r,
    ngx_http_anythingllm_filter_ctx_t *fctx, ngx_chain_t *in);
static ngx_int_t ngx_http_anythingllm_whole_add(ngx_http_request_t *r,
    ngx_http_anythingllm_filter_ctx_t *fctx, ngx_buf_t *b);
static ngx_int_t ngx_http_anythingllm_whole_answer(ngx_http_request_t *r,
    ngx_http_anythingllm_filter_ctx_t *fctx, ngx_uint_t broken);
static ngx_uint_t ngx_http_anythingllm_whole_error(ngx_http_request_t *r,
    ngx_http_anythingllm_filter_ctx_t *fctx, ngx_uint_t broken,
    alm_error_t *err);
static ngx_int_t ngx_http_anythingllm_whole_translate(ngx_http_request_t *r,
    ngx_http_anythingllm_filter_ctx_t *fctx, ngx_str_t *body,
    alm_error_t *err);
static ngx_int_t ngx_http_anythingllm_whole_send(ngx_http_request_t *r,
    ngx_uint_t status, ngx_str_t *body);
static void ngx_http_anythingllm_own_error(ngx_uint_t status,
    alm_error_t *err);
static void ngx_http_anythingllm_clear_validators(ngx_http_request_t *r);
static ngx_uint_t ngx_http_anythingllm_upstream_broke(
    ngx_http_upstream_t *u);
static void ngx_http_anythingllm_workspace_list(
    ngx_http_anythingllm_ctx_t *ctx, ngx_str_t *list);
static void ngx_http_anythingllm_stream_free(void *data);


static ngx_http_output_header_filter_pt  ngx_http_next_header_filter;
static ngx_http_output_body_filter_pt    ngx_http_next_body_filter;


static ngx_int_t
ngx_http_anythingllm_header_filter(ngx_http_request_t *r)
{
    ngx_uint_t                          status, own, refused;
    ngx_http_anythingllm_resp_e         resp;
    ngx_http_anythingllm_ctx_t         *ctx;
    ngx_http_anythingllm_loc_conf_t    *alcf;
    ngx_http_anythingllm_filter_ctx_t  *fctx;

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_anythingllm_module);

    if (r != r->main || !alcf->enabled) {
        return ngx_http_next_header_filter(r);
    }

    if (ngx_http_anythingllm_add_cors(r) != NGX_OK) {
        return NGX_ERROR;
    }

    ctx = ngx_http_get_module_ctx(r, ngx_http_anythingllm_module);

    resp = ctx ? ctx->resp : NGX_HTTP_ANYTHINGLLM_RESP_NONE;
    status = r->headers_out.status;
    own = (r->err_status != 0);
    refused = 0;

    if (ctx && ctx->filter) {
        fctx = ctx->filter;

        if (fctx->stream || fctx->done) {
            /* a second header: not ours to change */
            return ngx_http_next_header_filter(r);
        }

        /* an error page replaces the answer that was being read */
        ctx->filter = NULL;
    }

    if (resp == NGX_HTTP_ANYTHINGLLM_RESP_NONE) {

        /* nginx's own error pages speak OpenAI too in such a location */

        if (alcf->openai != 1 || !own || status < NGX_HTTP_BAD_REQUEST) {
            return ngx_http_next_header_filter(r);
        }

        ctx = ngx_http_anythingllm_get_ctx(r);
        if (ctx == NULL) {
            return NGX_ERROR;
        }

    } else if (r->upstream == NULL && !own) {
        /* not the answer that was asked for */
        return ngx_http_next_header_filter(r);

    } else if (!own && status != NGX_HTTP_OK
               && status < NGX_HTTP_BAD_REQUEST)
    {
        /*
         * A 304 or a 206 (should AnythingLLM answer a condition or a
         * range after all), or any other answer that is not the one to
         * rewrite: it must not reach the client as it is.
         */

        refused = 1;

    } else if (resp == NGX_HTTP_ANYTHINGLLM_RESP_WORKSPACES
               && status != NGX_HTTP_OK)
    {
        /* the native API keeps its own errors */
        return ngx_http_next_header_filter(r);
    }

    ngx_log_debug4(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "anythingllm header filter: resp:%d status:%ui own:%ui "
                   "refused:%ui", resp, status, own, refused);

    /*
     * No body to translate: nginx sets header_only for HEAD only later.
     * The headers are those of the rewritten answer, whose length is
     * not known without its body.
     */

    if (!refused && (r->header_only || r->method == NGX_HTTP_HEAD)) {
        ngx_http_clear_content_length(r);
        ngx_http_anythingllm_clear_validators(r);

        ngx_str_set(&r->headers_out.content_type, "application/json");
        r->headers_out.content_type_len = r->headers_out.content_type.len;
        r->headers_out.content_type_lowcase = NULL;
        ngx_str_null(&r->headers_out.charset);

        return ngx_http_next_header_filter(r);
    }

    fctx = ngx_pcalloc(r->pool, sizeof(ngx_http_anythingllm_filter_ctx_t));
    if (fctx == NULL) {
        return NGX_ERROR;
    }

    fctx->request = r;
    fctx->ctx = ctx;
    fctx->status = status;
    fctx->last_out = &fctx->out;

    ctx->filter = fctx;

    if (status == NGX_HTTP_OK && !own
        && resp == NGX_HTTP_ANYTHINGLLM_RESP_STREAM)
    {
        return ngx_http_anythingllm_stream_header(r, ctx, fctx);
    }

    /* the answer is read whole; the header waits for the translation */

    if (refused) {
        /* its body is passed over, unread */
        fctx->refused = 1;

    } else if (status != NGX_HTTP_OK || own) {
        fctx->error = 1;
        fctx->own = own;
        fctx->max = NGX_HTTP_ANYTHINGLLM_ERROR_BODY_MAX;

    } else {
        fctx->max = alcf->max_response;
    }

    if (!own && r->headers_out.content_length_n > 0) {
        fctx->cap = (size_t) ngx_min(r->headers_out.content_length_n,
                                     (off_t) fctx->max);
    }

    r->filter_need_in_memory = 1;

    return NGX_OK;
}


static ngx_int_t
ngx_http_anythingllm_body_filter(ngx_http_request_t *r, ngx_chain_t *in)
{
    ngx_http_anythingllm_ctx_t         *ctx;
    ngx_http_anythingllm_filter_ctx_t  *fctx;

    if (r != r->main) {
        return ngx_http_next_body_filter(r, in);
    }

    ctx = ngx_http_get_module_ctx(r, ngx_http_anythingllm_module);

    if (ctx == NULL || ctx->filter == NULL) {
        return ngx_http_next_body_filter(r, in);
    }

    fctx = ctx->filter;

    if (fctx->stream) {
        return ngx_http_anythingllm_stream_body(r, fctx, in);
    }

    return ngx_http_anythingllm_whole_body(r, fctx, in);
}


/* ------------------------------------------------------------------ */
/* the stream                                                         */

static ngx_int_t
ngx_http_anythingllm_stream_header(ngx_http_request_t *r,
    ngx_http_anythingllm_ctx_t *ctx, ngx_http_anythingllm_filter_ctx_t *fctx)
{
    char                             *buf;
    ngx_str_t                         v;
    alm_completion_meta_t             meta;
    ngx_http_anythingllm_loc_conf_t  *alcf;

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_anythingllm_module);

    buf = ngx_palloc(r->pool, alcf->max_frame);
    if (buf == NULL) {
        return NGX_ERROR;
    }

    if (ngx_http_anythingllm_cleanup_add(r->pool,
                                         ngx_http_anythingllm_stream_free,
                                         fctx)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    /* counted open until the cleanup, whatever ends it */
    ngx_http_anythingllm_metrics_stream_start();

    meta.id = (const char *) ctx->completion_id.data;
    meta.id_len = ctx->completion_id.len;
    meta.model = (const char *) ctx->model.data;
    meta.model_len = ctx->model.len;
    meta.created = ctx->created;

    alm_sse_init(&fctx->sse, buf, alcf->max_frame, &meta,
                 ctx->chat ? ctx->chat->include_usage : 0,
                 ctx->chat ? &ctx->chat->full : NULL,
                 ngx_http_anythingllm_stream_emit, fctx);

    fctx->stream = 1;

    ngx_str_set(&r->headers_out.content_type, "text/event-stream");
    r->headers_out.content_type_len = r->headers_out.content_type.len;
    r->headers_out.content_type_lowcase = NULL;
    ngx_str_null(&r->headers_out.charset);

    /* the chunked filter frames it */

    ngx_http_clear_content_length(r);
    ngx_http_anythingllm_clear_validators(r);

    ngx_str_set(&v, "no-cache");

    if (ngx_http_anythingllm_set_header(r, NULL, "Cache-Control", NULL, &v,
                                        NGX_HTTP_ANYTHINGLLM_HEADER_OUT
                                        |NGX_HTTP_ANYTHINGLLM_HEADER_ADD)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    ngx_str_set(&v, "no");

    if (ngx_http_anythingllm_set_header(r, NULL, "X-Accel-Buffering", NULL,
                                        &v,
                                        NGX_HTTP_ANYTHINGLLM_HEADER_OUT
                                        |NGX_HTTP_ANYTHINGLLM_HEADER_ADD)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    return ngx_http_next_header_filter(r);
}


/*
 * Upstream bytes go into the re-framer as they come; what it produces
 * is sent at once with "flush".  The input buffers are released only
 * once the output made of them has been sent, so that a slow client
 * slows the reading from AnythingLLM instead of growing memory.
 */

static ngx_int_t
ngx_http_anythingllm_stream_body(ngx_http_request_t *r,
    ngx_http_anythingllm_filter_ctx_t *fctx, ngx_chain_t *in)
{
    int           arc;
    ngx_int_t     rc;
    ngx_uint_t    last, flush, cut;
    ngx_buf_t    *b;
    ngx_chain_t  *cl, *hl;

    last = 0;
    flush = 0;

    for (cl = in; cl; cl = cl->next) {
        b = cl->buf;

        if (b->last_buf) {
            last = 1;
        }

        if (b->flush) {
            flush = 1;
        }

        if (fctx->done) {
            b->pos = b->last;
            b->file_pos = b->file_last;
            continue;
        }

        if (ngx_http_anythingllm_stream_feed(fctx, b) != NGX_OK) {
            return NGX_ERROR;
        }

        if (ngx_buf_size(b) == 0) {
            continue;
        }

        /* held until the output is out */

        hl = ngx_alloc_chain_link(r->pool);
        if (hl == NULL) {
            return NGX_ERROR;
        }

        hl->buf = b;
        hl->next = fctx->held;
        fctx->held = hl;
    }

    if (!fctx->done) {

        if (fctx->sse.got_text) {
            ngx_http_anythingllm_metrics_first_token(r, fctx->ctx);
        }

        /* not ended by a frame: whatever ends it now is a cut */
        cut = !fctx->sse.done;

        if (last) {
            arc = alm_sse_finish(&fctx->sse, 0);

        } else {
            arc = ALM_OK;

            if (ngx_http_anythingllm_upstream_broke(r->upstream)) {
                ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                              "anythingllm: the stream from AnythingLLM "
                              "broke off");

                arc = alm_sse_finish(&fctx->sse, 1);
            }
        }

        if (arc != ALM_OK) {
            return NGX_ERROR;
        }

        if (fctx->sse.usage.present) {
            fctx->ctx->usage = fctx->sse.usage;
        }

        fctx->ctx->pieces = fctx->sse.pieces;

        if (fctx->sse.done) {
            fctx->end = ngx_http_anythingllm_metrics_stream_cause(
                                                        &fctx->sse, cut);

            if (ngx_http_anythingllm_stream_ended(r, fctx) != NGX_OK) {
                return NGX_ERROR;
            }
        }
    }

    if (fctx->out) {
        for (cl = fctx->out; cl->next; cl = cl->next) { /* void */ }
        cl->buf->flush = 1;

    } else if (flush && !fctx->done) {

        /*
         * Nothing to say yet (a partial frame, agent progress), but the
         * flush must go on: the first one pushes out the response
         * header, which clients wait for while AnythingLLM works.
         */

        if (fctx->flush == NULL) {
            fctx->flush = ngx_calloc_buf(r->pool);
            if (fctx->flush == NULL) {
                return NGX_ERROR;
            }

            fctx->flush->flush = 1;
        }

        cl = ngx_alloc_chain_link(r->pool);
        if (cl == NULL) {
            return NGX_ERROR;
        }

        cl->buf = fctx->flush;
        cl->next = NULL;
        fctx->out = cl;
    }

    rc = ngx_http_next_body_filter(r, fctx->out);

    ngx_chain_update_chains(r->pool, &fctx->free, &fctx->busy, &fctx->out,
                            (ngx_buf_tag_t) &ngx_http_anythingllm_module);

    fctx->last_out = &fctx->out;

    if (fctx->busy == NULL || fctx->done) {
        while (fctx->held) {
            hl = fctx->held;
            fctx->held = hl->next;

            hl->buf->pos = hl->buf->last;
            hl->buf->file_pos = hl->buf->file_last;

            ngx_free_chain(r->pool, hl);
        }
    }

    return rc;
}


/* a buffer of the upstream's answer into the re-framer */

static ngx_int_t
ngx_http_anythingllm_stream_feed(ngx_http_anythingllm_filter_ctx_t *fctx,
    ngx_buf_t *b)
{
    off_t    off;
    size_t   size;
    ssize_t  n;
    u_char   tmp[4096];

    if (ngx_buf_in_memory(b)) {
        if (b->last > b->pos
            && alm_sse_feed(&fctx->sse, (const char *) b->pos,
                            b->last - b->pos)
               != ALM_OK)
        {
            return NGX_ERROR;
        }

        return NGX_OK;
    }

    if (!b->in_file) {
        return NGX_OK;
    }

    /* proxy_buffering on wrote it to a temporary file */

    for (off = b->file_pos; off < b->file_last; off += n) {
        size = (size_t) ngx_min(b->file_last - off, (off_t) sizeof(tmp));

        n = ngx_read_file(b->file, tmp, size, off);
        if (n <= 0) {
            return NGX_ERROR;
        }

        if (alm_sse_feed(&fctx->sse, (const char *) tmp, n) != ALM_OK) {
            return NGX_ERROR;
        }
    }

    b->file_pos = b->file_last;

    return NGX_OK;
}


/* the re-framer's sink: the pieces go into reusable buffers */

static int
ngx_http_anythingllm_stream_emit(void *data, const char *p, size_t len)
{
    ngx_http_anythingllm_filter_ctx_t *fctx = data;

    ngx_buf_t    *b;
    ngx_chain_t  *cl, **ll;

    for (ll = &fctx->free; *ll; ll = &(*ll)->next) {
        b = (*ll)->buf;

        if ((size_t) (b->end - b->start) >= len) {
            cl = *ll;
            *ll = cl->next;
            goto found;
        }
    }

    cl = ngx_alloc_chain_link(fctx->request->pool);
    if (cl == NULL) {
        return ALM_ERROR;
    }

    /*
     * Whole pages: the output of one read varies a little in length,
     * and a buffer a little longer than the last one is free again.
     */

    b = ngx_create_temp_buf(fctx->request->pool,
                            ngx_align(len, NGX_HTTP_ANYTHINGLLM_OUT_BUF_SIZE));
    if (b == NULL) {
        return ALM_ERROR;
    }

    b->tag = (ngx_buf_tag_t) &ngx_http_anythingllm_module;
    cl->buf = b;

found:

    b = cl->buf;

    b->pos = b->start;
    b->last = ngx_cpymem(b->pos, p, len);
    b->flush = 0;
    b->last_buf = 0;
    b->last_in_chain = 0;

    cl->next = NULL;
    *fctx->last_out = cl;
    fctx->last_out = &cl->next;

    return ALM_OK;
}


/* [DONE] went out: the response ends here, whatever comes after */

static ngx_int_t
ngx_http_anythingllm_stream_ended(ngx_http_request_t *r,
    ngx_http_anythingllm_filter_ctx_t *fctx)
{
    ngx_buf_t    *b;
    ngx_chain_t  *cl;

    fctx->done = 1;

    if (alm_sse_succeeded(&fctx->sse)) {
        ngx_http_anythingllm_conv_store(r, fctx->ctx);

    } else if (r->upstream && !r->upstream->buffering) {

        /*
         * The answer failed (an oversized frame, say) while AnythingLLM
         * may still be generating: as if its response were complete,
         * nginx's upstream module ends it once our output is out and
         * closes the connection, and AnythingLLM stops.
         */

        r->upstream->length = 0;
    }

    if (fctx->out) {
        for (cl = fctx->out; cl->next; cl = cl->next) { /* void */ }

        cl->buf->last_buf = 1;
        cl->buf->last_in_chain = 1;

        return NGX_OK;
    }

    b = ngx_calloc_buf(r->pool);
    if (b == NULL) {
        return NGX_ERROR;
    }

    b->last_buf = 1;
    b->last_in_chain = 1;

    cl = ngx_alloc_chain_link(r->pool);
    if (cl == NULL) {
        return NGX_ERROR;
    }

    cl->buf = b;
    cl->next = NULL;

    *fctx->last_out = cl;
    fctx->last_out = &cl->next;

    return NGX_OK;
}


/* ------------------------------------------------------------------ */
/* whole answers                                                      */

static ngx_int_t
ngx_http_anythingllm_whole_body(ngx_http_request_t *r,
    ngx_http_anythingllm_filter_ctx_t *fctx, ngx_chain_t *in)
{
    ngx_int_t     last;
    ngx_chain_t  *cl;

    if (fctx->done) {
        for (cl = in; cl; cl = cl->next) {
            cl->buf->pos = cl->buf->last;
            cl->buf->file_pos = cl->buf->file_last;
        }

        return ngx_http_next_body_filter(r, NULL);
    }

    last = 0;

    for (cl = in; cl; cl = cl->next) {

        if (ngx_http_anythingllm_whole_add(r, fctx, cl->buf) != NGX_OK) {
            return NGX_ERROR;
        }

        if (cl->buf->last_buf) {
            last = 1;
        }
    }

    if (last) {
        return ngx_http_anythingllm_whole_answer(r, fctx, 0);
    }

    if (!fctx->own && ngx_http_anythingllm_upstream_broke(r->upstream)) {
        /* broke off before the end (see the stream filter) */
        return ngx_http_anythingllm_whole_answer(r, fctx, 1);
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_anythingllm_whole_add(ngx_http_request_t *r,
    ngx_http_anythingllm_filter_ctx_t *fctx, ngx_buf_t *b)
{
    u_char   *p;
    size_t    size, room, cap;
    ssize_t   n;

    size = ngx_buf_in_memory(b) ? (size_t) (b->last - b->pos)
                                : (size_t) (b->file_last - b->file_pos);

    if (size == 0 || fctx->own || fctx->refused) {
        goto consumed;
    }

    if (fctx->len + size > fctx->max) {
        fctx->too_big = 1;
        size = fctx->max - fctx->len;

        if (size == 0) {
            goto consumed;
        }
    }

    room = fctx->cap - fctx->len;

    if (fctx->body == NULL || room < size) {

        /*
         * The first buffer is the Content-Length exactly when it holds
         * what came: an answer shorter than a page comes from the
         * pool's blocks, not a malloc() of its own.
         */

        cap = (fctx->body == NULL && fctx->cap >= size)
              ? fctx->cap : ngx_max(fctx->cap, 4096);

        while (cap < fctx->len + size) {
            cap *= 2;
        }

        cap = ngx_min(cap, fctx->max);

        p = ngx_pnalloc(r->pool, cap);
        if (p == NULL) {
            return NGX_ERROR;
        }

        if (fctx->len) {
            ngx_memcpy(p, fctx->body, fctx->len);
        }

        if (fctx->body) {
            (void) ngx_pfree(r->pool, fctx->body);
        }

        fctx->body = p;
        fctx->cap = cap;
    }

    if (ngx_buf_in_memory(b)) {
        ngx_memcpy(fctx->body + fctx->len, b->pos, size);

    } else {
        n = ngx_read_file(b->file, fctx->body + fctx->len, size,
                          b->file_pos);
        if (n != (ssize_t) size) {
            return NGX_ERROR;
        }
    }

    fctx->len += size;

consumed:

    b->pos = b->last;
    b->file_pos = b->file_last;

    return NGX_OK;
}


/*
 * The answer is read: its translation, or the error it stands for, is
 * sent in its place.
 */

static ngx_int_t
ngx_http_anythingllm_whole_answer(ngx_http_request_t *r,
    ngx_http_anythingllm_filter_ctx_t *fctx, ngx_uint_t broken)
{
    ngx_int_t    rc;
    ngx_str_t    body;
    alm_error_t  err;

    fctx->done = 1;

    if (!ngx_http_anythingllm_whole_error(r, fctx, broken, &err)) {

        rc = ngx_http_anythingllm_whole_translate(r, fctx, &body, &err);

        if (rc == NGX_OK) {
            return ngx_http_anythingllm_whole_send(r, NGX_HTTP_OK, &body);
        }

        if (rc == NGX_ERROR) {
            return NGX_ERROR;
        }
    }

    if (ngx_http_anythingllm_error_body(r->pool, err.message, err.type,
                                        err.param, err.code, &body)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    /* the request ends with this answer: what is unread stays unread */
    if (broken) {
        r->keepalive = 0;
    }

    return ngx_http_anythingllm_whole_send(r, err.status, &body);
}


/*
 * 1 with "err" set when the answer is not one to translate: refused,
 * nginx's own error page, an error of AnythingLLM, broken off or too
 * large.
 */

static ngx_uint_t
ngx_http_anythingllm_whole_error(ngx_http_request_t *r,
    ngx_http_anythingllm_filter_ctx_t *fctx, ngx_uint_t broken,
    alm_error_t *err)
{
    ngx_uint_t                   level;
    ngx_http_anythingllm_ctx_t  *ctx;

    ctx = fctx->ctx;

    if (fctx->refused) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "anythingllm: AnythingLLM answered %ui to a request "
                      "whose answer the gateway rewrites: refused",
                      fctx->status);

        alm_error_set(err, NGX_HTTP_BAD_GATEWAY, "server_error", NULL, NULL,
                      "AnythingLLM sent an answer the gateway cannot "
                      "rewrite (HTTP %d).", (int) fctx->status);
        return 1;
    }

    if (fctx->own) {
        ngx_http_anythingllm_own_error(fctx->status, err);
        return 1;
    }

    if (fctx->error) {
        alm_chat_error_translate((int) fctx->status,
                                 (const char *) fctx->body, fctx->len,
                                 (const char *) ctx->model.data,
                                 ctx->model.len, err);

        /* a refused upstream key is the operator's to fix */
        level = (fctx->status == NGX_HTTP_FORBIDDEN) ? NGX_LOG_ERR
                                                     : NGX_LOG_INFO;

        ngx_log_error(level, r->connection->log, 0,
                      "anythingllm: AnythingLLM answered %ui: %s",
                      fctx->status, err->message);
        return 1;
    }

    if (broken) {
        alm_error_set(err, NGX_HTTP_BAD_GATEWAY, "server_error", NULL, NULL,
                      "The connection to AnythingLLM broke before the "
                      "answer was complete.");
        return 1;
    }

    if (fctx->too_big) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "anythingllm: the answer of AnythingLLM is larger "
                      "than anythingllm_max_response_size %uz", fctx->max);

        alm_error_set(err, NGX_HTTP_BAD_GATEWAY, "server_error", NULL, NULL,
                      "The answer of AnythingLLM is larger than the "
                      "gateway accepts.");
        return 1;
    }

    return 0;
}


/*
 * NGX_OK: "body" is the translation (freed with the pool);
 * NGX_DECLINED: it failed, "err" says why; NGX_ERROR: no memory.
 */

static ngx_int_t
ngx_http_anythingllm_whole_translate(ngx_http_request_t *r,
    ngx_http_anythingllm_filter_ctx_t *fctx, ngx_str_t *body,
    alm_error_t *err)
{
    char                        *json;
    size_t                       len;
    ngx_str_t                    list;
    alm_completion_meta_t        meta;
    ngx_http_anythingllm_ctx_t  *ctx;

    ctx = fctx->ctx;
    len = 0;

    ngx_http_anythingllm_workspace_list(ctx, &list);

    switch (ctx->resp) {

    case NGX_HTTP_ANYTHINGLLM_RESP_CHAT:
        meta.id = (const char *) ctx->completion_id.data;
        meta.id_len = ctx->completion_id.len;
        meta.model = (const char *) ctx->model.data;
        meta.model_len = ctx->model.len;
        meta.created = ctx->created;

        json = alm_chat_response_translate((const char *) fctx->body,
                                           fctx->len, &meta, &ctx->usage,
                                           ctx->chat ? &ctx->chat->full
                                                     : NULL,
                                           &len, err);
        if (json) {
            ngx_http_anythingllm_conv_store(r, ctx);
            ngx_http_anythingllm_metrics_first_token(r, ctx);
        }

        break;

    case NGX_HTTP_ANYTHINGLLM_RESP_MODELS:
    case NGX_HTTP_ANYTHINGLLM_RESP_MODEL:
        json = alm_workspaces_to_models((const char *) fctx->body, fctx->len,
                                        (const char *) list.data, list.len,
                                        ctx->resp
                                        == NGX_HTTP_ANYTHINGLLM_RESP_MODEL
                                        ? (const char *) ctx->model.data
                                        : NULL,
                                        ctx->model.len, ngx_time(), &len,
                                        err);
        break;

    default: /* NGX_HTTP_ANYTHINGLLM_RESP_WORKSPACES */
        json = alm_workspaces_filter((const char *) fctx->body, fctx->len,
                                     (const char *) list.data, list.len,
                                     &len);
        if (json == NULL) {
            alm_error_set(err, NGX_HTTP_BAD_GATEWAY, "server_error", NULL,
                          NULL, "AnythingLLM sent a workspace list the "
                          "gateway could not read.");
        }

        break;
    }

    if (json == NULL) {
        return NGX_DECLINED;
    }

    if (ngx_http_anythingllm_free_on_cleanup(r->pool, json) != NGX_OK) {
        return NGX_ERROR;
    }

    body->data = (u_char *) json;
    body->len = len;

    return NGX_OK;
}


/* the rewritten answer, whole, with the header it makes */

static ngx_int_t
ngx_http_anythingllm_whole_send(ngx_http_request_t *r, ngx_uint_t status,
    ngx_str_t *body)
{
    ngx_int_t     rc;
    ngx_buf_t    *b;
    ngx_chain_t   out;

    r->headers_out.status = status;
    ngx_str_null(&r->headers_out.status_line);

    ngx_str_set(&r->headers_out.content_type, "application/json");
    r->headers_out.content_type_len = r->headers_out.content_type.len;
    r->headers_out.content_type_lowcase = NULL;
    ngx_str_null(&r->headers_out.charset);

    ngx_http_clear_content_length(r);
    r->headers_out.content_length_n = body->len;

    ngx_http_anythingllm_clear_validators(r);

    rc = ngx_http_next_header_filter(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    b = ngx_http_anythingllm_body_buf(r->pool, body);
    if (b == NULL) {
        return NGX_ERROR;
    }

    out.buf = b;
    out.next = NULL;

    return ngx_http_next_body_filter(r, &out);
}


/* nginx's own error pages, as OpenAI errors */

static const struct {
    ngx_uint_t    status;
    const char   *code;
    const char   *message;
} ngx_http_anythingllm_own_errors[] = {
    { NGX_HTTP_BAD_GATEWAY, NULL,
      "The gateway could not reach AnythingLLM, or AnythingLLM closed the "
      "connection." },
    { NGX_HTTP_GATEWAY_TIME_OUT, NULL,
      "AnythingLLM did not answer in time." },
    { NGX_HTTP_SERVICE_UNAVAILABLE, NULL,
      "The service is unavailable." },
    { NGX_HTTP_REQUEST_ENTITY_TOO_LARGE, NULL,
      "The request body is too large." },
    { NGX_HTTP_REQUEST_TIME_OUT, NULL,
      "The request was not received in time." },
    { NGX_HTTP_NOT_FOUND, "unknown_url",
      "Invalid URL." },
    { NGX_HTTP_UNAUTHORIZED, "invalid_api_key",
      "Invalid API key." },
    { NGX_HTTP_FORBIDDEN, NULL,
      "The request is not allowed." },
    { NGX_HTTP_INTERNAL_SERVER_ERROR, NULL,
      "The gateway failed to handle the request." }
};


static void
ngx_http_anythingllm_own_error(ngx_uint_t status, alm_error_t *err)
{
    ngx_uint_t   i;
    const char  *type;

    type = (status >= NGX_HTTP_INTERNAL_SERVER_ERROR) ? "server_error"
                                                      : "invalid_request_error";

    for (i = 0;
         i < sizeof(ngx_http_anythingllm_own_errors)
             / sizeof(ngx_http_anythingllm_own_errors[0]);
         i++)
    {
        if (ngx_http_anythingllm_own_errors[i].status == status) {
            alm_error_set(err, status, type, NULL,
                          ngx_http_anythingllm_own_errors[i].code, "%s",
                          ngx_http_anythingllm_own_errors[i].message);
            return;
        }
    }

    alm_error_set(err, status, type, NULL, NULL,
                  "The request failed (HTTP %d).", (int) status);
}


/*
 * An upstream that breaks or times out after the header is finalized
 * with only a flush: the upstream connection is gone by then.  With
 * proxy_buffering on, the connection is also gone when the whole answer
 * was read while the copy filter still hands it over piece by piece:
 * the pipe's state tells the two apart.
 */

static ngx_uint_t
ngx_http_anythingllm_upstream_broke(ngx_http_upstream_t *u)
{
    ngx_event_pipe_t  *p;

    if (u == NULL || u->peer.connection != NULL) {
        return 0;
    }

    p = u->pipe;

    if (!u->buffering || p == NULL || p->upstream_error) {
        return 1;
    }

    return !(p->upstream_done || (p->upstream_eof && p->length == -1));
}


/*
 * What described AnythingLLM's answer does not describe its rewrite:
 * validators, ranges.
 */

static void
ngx_http_anythingllm_clear_validators(ngx_http_request_t *r)
{
    ngx_http_clear_accept_ranges(r);
    ngx_http_clear_last_modified(r);
    ngx_http_clear_etag(r);

    if (r->headers_out.content_range) {
        r->headers_out.content_range->hash = 0;
        r->headers_out.content_range = NULL;
    }
}


/* the workspaces the request's key may use: all when no key was judged */

static void
ngx_http_anythingllm_workspace_list(ngx_http_anythingllm_ctx_t *ctx,
    ngx_str_t *list)
{
    if (ctx->key.valid) {
        *list = ctx->key.workspaces;
        return;
    }

    ngx_str_set(list, "*");
}


/* the request goes: a stream that did not end was left by its client */

static void
ngx_http_anythingllm_stream_free(void *data)
{
    ngx_http_anythingllm_filter_ctx_t *fctx = data;

    alm_sse_free(&fctx->sse);

    ngx_http_anythingllm_metrics_stream_end(fctx->request,
                         fctx->end ? fctx->end
                                   : NGX_HTTP_ANYTHINGLLM_M_STREAM_CLIENT_GONE);
}


ngx_int_t
ngx_http_anythingllm_filter_init(ngx_conf_t *cf)
{
    ngx_http_next_header_filter = ngx_http_top_header_filter;
    ngx_http_top_header_filter = ngx_http_anythingllm_header_filter;

    ngx_http_next_body_filter = ngx_http_top_body_filter;
    ngx_http_top_body_filter = ngx_http_anythingllm_body_filter;

    return NGX_OK;
}
