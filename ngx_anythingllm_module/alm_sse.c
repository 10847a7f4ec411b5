/*
 * Copyright (C) ngx_anythingllm authors
 *
 * The SSE re-framer: AnythingLLM's stream-chat frames in, OpenAI
 * chat.completion.chunk frames out.
 *
 * Input is read line by line.  A "data:" line is a whole upstream
 * frame (AnythingLLM writes one data line per frame) and is acted on
 * as soon as its line ends; other lines, blank ones included, are
 * skipped.  Complete lines are parsed where they lie in the caller's
 * input; only a line still open at the end of a feed is copied into
 * s->buf, to be completed by the next feed.
 *
 * Everything produced by one call is gathered and handed to the sink
 * in one piece, a whole number of frames.
 */


#include <stdlib.h>
#include <string.h>

#include "alm_json.h"


#define ALM_SSE_DONE  "data: [DONE]\n\n"

#define ALM_SSE_EARLY                                                         \
    "AnythingLLM ended the stream before the answer was complete."
#define ALM_SSE_BROKEN                                                        \
    "The connection to AnythingLLM broke before the answer was complete."
#define ALM_SSE_ABORT         "AnythingLLM aborted the answer."
#define ALM_SSE_TOO_LONG                                                      \
    "AnythingLLM sent a stream frame larger than the gateway accepts."


typedef enum {
    ALM_LINE_OTHER = 0,
    ALM_LINE_DATA,              /* starts with "data:" */
    ALM_LINE_MAYBE              /* shorter than "data:" and a prefix of it */
} alm_line_kind_e;


/* ------------------------------------------------------------------ */
/* output frames                                                      */

static void
alm_sse_chunk_head(alm_sse_t *s, alm_buf_t *o)
{
    alm_buf_str(o, "data: {\"id\":\"");
    alm_buf_esc(o, s->meta.id, s->meta.id_len);
    alm_buf_str(o, "\",\"object\":\"chat.completion.chunk\",\"created\":");
    alm_buf_int(o, (int64_t) s->meta.created);
    alm_buf_str(o, ",\"model\":\"");
    alm_buf_esc(o, s->meta.model, s->meta.model_len);
    alm_buf_str(o, "\",\"choices\":[");
}


/* closes a chunk that has one choice */

static void
alm_sse_chunk_tail(alm_sse_t *s, alm_buf_t *o, const char *finish)
{
    alm_buf_str(o, ",\"logprobs\":null,\"finish_reason\":");
    alm_buf_str(o, finish);
    alm_buf_str(o, "}]");

    if (s->include_usage) {
        /* as OpenAI does: usage is null on all but the last chunk */
        alm_buf_str(o, ",\"usage\":null");
    }

    alm_buf_str(o, "}\n\n");
}


static void
alm_sse_delta(alm_sse_t *s, alm_buf_t *o, const char *text, size_t len)
{
    alm_sse_chunk_head(s, o);
    alm_buf_str(o, "{\"index\":0,\"delta\":{");

    if (!s->sent_role) {
        alm_buf_str(o, "\"role\":\"assistant\",");
        s->sent_role = 1;
    }

    alm_buf_str(o, "\"content\":\"");
    alm_buf_esc(o, text, len);
    alm_buf_str(o, "\"}");
    alm_sse_chunk_tail(s, o, "null");
}


static void
alm_sse_content(alm_sse_t *s, alm_buf_t *o, const char *text)
{
    size_t  len;

    len = text ? strlen(text) : 0;

    if (len == 0) {
        return;
    }

    if (s->conv) {
        if (!s->got_text) {
            alm_conv_hash_message_begin(s->conv, "assistant", 9);
        }

        alm_conv_hash_update(s->conv, text, len);
    }

    alm_sse_delta(s, o, text, len);
    s->got_text = 1;
    s->pieces++;
}


static void
alm_sse_success(alm_sse_t *s, alm_buf_t *o)
{
    if (!s->sent_role) {
        alm_sse_delta(s, o, "", 0);
    }

    alm_sse_chunk_head(s, o);
    alm_buf_str(o, "{\"index\":0,\"delta\":{}");
    alm_sse_chunk_tail(s, o, "\"stop\"");

    if (s->include_usage) {
        alm_sse_chunk_head(s, o);
        alm_buf_str(o, "],\"usage\":{\"prompt_tokens\":");
        alm_buf_int(o, s->usage.prompt_tokens);
        alm_buf_str(o, ",\"completion_tokens\":");
        alm_buf_int(o, s->usage.completion_tokens);
        alm_buf_str(o, ",\"total_tokens\":");
        alm_buf_int(o, s->usage.total_tokens);
        alm_buf_str(o, "}}\n\n");
    }

    alm_buf_str(o, ALM_SSE_DONE);

    if (s->conv) {
        if (!s->got_text) {
            alm_conv_hash_message_begin(s->conv, "assistant", 9);
        }

        alm_conv_hash_message_end(s->conv);
    }

    s->done = 1;
}


static void
alm_sse_fail(alm_sse_t *s, alm_buf_t *o, const char *message)
{
    alm_buf_str(o, "data: ");
    alm_error_json_append(o, message, "server_error", NULL, NULL);
    alm_buf_str(o, "\n\n" ALM_SSE_DONE);

    s->done = 1;
    s->failed = 1;
}


static void
alm_sse_too_long(alm_sse_t *s, alm_buf_t *o)
{
    alm_sse_fail(s, o, ALM_SSE_TOO_LONG);

    s->too_long = 1;
}


/* ------------------------------------------------------------------ */
/* input frames                                                       */

static void
alm_sse_usage(alm_sse_t *s, const cJSON *metrics)
{
    alm_usage_t  usage;

    /* an empty "metrics" ({}) keeps what an earlier frame gave */

    if (alm_usage_read(metrics, &usage)) {
        s->usage = usage;
    }
}


static void
alm_sse_frame(alm_sse_t *s, alm_buf_t *o, const char *p, size_t len)
{
    cJSON        *root;
    const cJSON  *item;
    const char   *type, *text;
    int           close;

    root = cJSON_ParseWithLength(p, len);

    /* a frame that is not a JSON object tells nothing: skipped */

    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return;
    }

    item = cJSON_GetObjectItemCaseSensitive(root, "type");
    type = cJSON_IsString(item) ? item->valuestring : "";

    item = cJSON_GetObjectItemCaseSensitive(root, "textResponse");
    if (!cJSON_IsString(item)) {
        item = cJSON_GetObjectItemCaseSensitive(root, "textChunk");
    }

    text = cJSON_IsString(item) ? item->valuestring : NULL;

    close = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(root, "close"));

    if (strcmp(type, "textResponseChunk") == 0) {
        s->got_chunk = 1;
        alm_sse_content(s, o, text);

        if (close) {
            s->closed = 1;
        }

    } else if (strcmp(type, "textResponse") == 0) {

        /* the whole answer: content only when nothing came before it */

        if (!s->got_chunk && !s->got_text) {
            alm_sse_content(s, o, text);
        }

        if (close) {
            s->closed = 1;
        }

    } else if (strcmp(type, "finalizeResponseStream") == 0) {
        alm_sse_usage(s, cJSON_GetObjectItemCaseSensitive(root, "metrics"));

        if (!s->got_chunk && !s->got_text) {
            alm_sse_content(s, o, text);
        }

        alm_sse_success(s, o);

    } else if (strcmp(type, "abort") == 0) {
        item = cJSON_GetObjectItemCaseSensitive(root, "error");

        alm_sse_fail(s, o, (cJSON_IsString(item) && item->valuestring[0])
                           ? item->valuestring : ALM_SSE_ABORT);

    } else if (strcmp(type, "usageMetrics") == 0) {
        alm_sse_usage(s, cJSON_GetObjectItemCaseSensitive(root, "metrics"));
    }

    /* agentThought, statusResponse, fileDownload, ...: not the answer */

    cJSON_Delete(root);
}


static alm_line_kind_e
alm_sse_kind(const char *p, size_t len)
{
    size_t  n;

    n = len < 5 ? len : 5;

    if (memcmp(p, "data:", n) != 0) {
        return ALM_LINE_OTHER;
    }

    return len < 5 ? ALM_LINE_MAYBE : ALM_LINE_DATA;
}


/*
 * One whole line, without its "\n".  The bound applies to the line as
 * received ("\r" included), wherever it lies, so that the output does
 * not depend on how the input was split.
 */

static void
alm_sse_line(alm_sse_t *s, alm_buf_t *o, const char *p, size_t len)
{
    if (alm_sse_kind(p, len) != ALM_LINE_DATA) {
        return;
    }

    if (len > s->cap) {
        alm_sse_too_long(s, o);
        return;
    }

    if (p[len - 1] == '\r') {
        len--;
    }

    p += 5;
    len -= 5;

    if (len && *p == ' ') {
        p++;
        len--;
    }

    if (len) {
        alm_sse_frame(s, o, p, len);
    }
}


/*
 * The output buffer stays in s->out for the next call: one allocation
 * per stream, not per read.
 */

static int
alm_sse_flush(alm_sse_t *s, alm_buf_t *o)
{
    int  rc;

    rc = ALM_OK;

    if (o->nomem) {
        rc = ALM_ERROR;

    } else if (o->len) {
        rc = s->emit(s->data, o->data, o->len);
    }

    o->len = 0;

    if (rc != ALM_OK) {
        /* the sink is gone or memory ran out: nothing more is sent */
        s->done = 1;
        s->failed = 1;
    }

    return rc;
}


void
alm_sse_init(alm_sse_t *s, char *buf, size_t cap,
    const alm_completion_meta_t *meta, int include_usage,
    alm_conv_hash_t *conv, alm_emit_pt emit, void *data)
{
    memset(s, 0, sizeof(alm_sse_t));

    s->buf = buf;
    s->cap = cap;
    s->meta = *meta;
    s->include_usage = include_usage ? 1 : 0;
    s->conv = conv;
    s->emit = emit;
    s->data = data;
}


/*
 * A frame longer than the buffer ends the stream with an error frame
 * and [DONE]; the call still returns ALM_OK and later input is
 * ignored.  ALM_ERROR means the sink failed or memory ran out.
 */

int
alm_sse_feed(alm_sse_t *s, const char *p, size_t len)
{
    size_t            n;
    const char       *end, *nl;
    alm_buf_t        *o;
    alm_line_kind_e   kind;
    char              head[5];

    if (s->done || len == 0) {
        return ALM_OK;
    }

    o = &s->out;
    end = p + len;

    if (s->skip_line) {
        nl = memchr(p, '\n', len);

        if (nl == NULL) {
            return ALM_OK;
        }

        s->skip_line = 0;
        p = nl + 1;

    } else if (s->len) {

        /* a line left open by the previous call */

        nl = memchr(p, '\n', len);
        n = (nl ? nl : end) - p;

        kind = ALM_LINE_DATA;

        if (s->len < 5) {
            memcpy(head, s->buf, s->len);
            memcpy(head + s->len, p, 5 - s->len < n ? 5 - s->len : n);
            kind = alm_sse_kind(head, s->len + n < 5 ? s->len + n : 5);
        }

        if (kind == ALM_LINE_OTHER) {
            s->len = 0;

            if (nl == NULL) {
                s->skip_line = 1;
                return ALM_OK;
            }

        } else if (s->len + n > s->cap) {
            s->len = 0;
            alm_sse_too_long(s, o);

        } else {
            memcpy(s->buf + s->len, p, n);
            s->len += n;

            if (nl == NULL) {
                return ALM_OK;
            }

            alm_sse_line(s, o, s->buf, s->len);
            s->len = 0;
        }

        p = nl ? nl + 1 : end;
    }

    /* whole lines straight from the input */

    while (!s->done && p < end) {
        nl = memchr(p, '\n', end - p);

        if (nl == NULL) {
            break;
        }

        alm_sse_line(s, o, p, nl - p);
        p = nl + 1;
    }

    if (!s->done && p < end) {
        n = end - p;
        kind = alm_sse_kind(p, n);

        if (kind == ALM_LINE_OTHER) {
            s->skip_line = 1;

        } else if (n > s->cap) {
            alm_sse_too_long(s, o);

        } else {
            memcpy(s->buf, p, n);
            s->len = n;
        }
    }

    return alm_sse_flush(s, o);
}


/*
 * The answer counts as complete when the stream ended cleanly after a
 * frame with close:true (a query-mode refusal sends one textResponse
 * frame and no finalizeResponseStream).  A line still open is dropped.
 */

int
alm_sse_finish(alm_sse_t *s, int broken)
{
    if (s->done) {
        return ALM_OK;
    }

    s->len = 0;
    s->skip_line = 0;

    if (!broken && s->closed) {
        alm_sse_success(s, &s->out);

    } else {
        alm_sse_fail(s, &s->out, broken ? ALM_SSE_BROKEN : ALM_SSE_EARLY);
    }

    return alm_sse_flush(s, &s->out);
}


void
alm_sse_free(alm_sse_t *s)
{
    alm_buf_free(&s->out);
}


int
alm_sse_succeeded(const alm_sse_t *s)
{
    return s->done && !s->failed;
}
