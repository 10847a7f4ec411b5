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

#include "alm_core.h"


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

#define alm_sse_lit(o, s)  alm_buf_raw(o, s, sizeof(s) - 1)

#define ALM_SSE_TAIL       ",\"logprobs\":null,\"finish_reason\":"
#define ALM_SSE_TMP        512     /* texts decoded on the stack */
#define ALM_SSE_SHAPE_MAX  512     /* a token frame, less its text */


/*
 * Every chunk starts with the same bytes (the id, the object, the
 * time and the model): they are written once, on the first chunk, and
 * copied from then on.
 */

static void
alm_sse_chunk_head(alm_sse_t *s, alm_buf_t *o)
{
    alm_buf_t  *h;

    h = &s->head;

    if (h->len == 0) {
        alm_buf_str(h, "data: {\"id\":\"");
        alm_buf_esc(h, s->meta.id, s->meta.id_len);
        alm_buf_str(h, "\",\"object\":\"chat.completion.chunk\",\"created\":");
        alm_buf_int(h, (int64_t) s->meta.created);
        alm_buf_str(h, ",\"model\":\"");
        alm_buf_esc(h, s->meta.model, s->meta.model_len);
        alm_buf_str(h, "\",\"choices\":[");

        if (h->nomem) {
            h->len = 0;
            o->nomem = 1;
            return;
        }
    }

    alm_buf_raw(o, h->data, h->len);
}


/* closes a chunk that has one choice; "finish" is a JSON value */

static void
alm_sse_chunk_tail(alm_sse_t *s, alm_buf_t *o, int stop)
{
    if (stop) {
        alm_sse_lit(o, ALM_SSE_TAIL "\"stop\"}]");

    } else {
        alm_sse_lit(o, ALM_SSE_TAIL "null}]");
    }

    if (s->include_usage) {
        /* as OpenAI does: usage is null on all but the last chunk */
        alm_sse_lit(o, ",\"usage\":null}\n\n");

    } else {
        alm_sse_lit(o, "}\n\n");
    }
}


/*
 * The common chunk, a text that is its own escape after the first:
 * its pieces copied into room made once.
 */

static void
alm_sse_delta_plain(alm_sse_t *s, alm_buf_t *o, const char *text,
    size_t len)
{
    char                   *p;
    size_t                  n, tail;
    static const char       open[] = "{\"index\":0,\"delta\":{\"content\":\"";
    static const char       close[] = "\"}" ALM_SSE_TAIL "null}]}\n\n";
    static const char       close_usage[] = "\"}" ALM_SSE_TAIL "null}]"
                                            ",\"usage\":null}\n\n";

    tail = s->include_usage ? sizeof(close_usage) - 1 : sizeof(close) - 1;
    n = s->head.len + sizeof(open) - 1 + len + tail;

    p = alm_buf_room(o, n);
    if (p == NULL) {
        return;
    }

    memcpy(p, s->head.data, s->head.len);
    p += s->head.len;
    memcpy(p, open, sizeof(open) - 1);
    p += sizeof(open) - 1;
    memcpy(p, text, len);
    p += len;
    memcpy(p, s->include_usage ? close_usage : close, tail);

    o->len += n;
}


/* "plain": the text is its own JSON escape (printable ASCII) */

static void
alm_sse_delta(alm_sse_t *s, alm_buf_t *o, const char *text, size_t len,
    int plain)
{
    if (plain && s->sent_role && s->head.len) {
        alm_sse_delta_plain(s, o, text, len);
        return;
    }

    alm_sse_chunk_head(s, o);

    if (!s->sent_role) {
        alm_sse_lit(o, "{\"index\":0,\"delta\":{\"role\":\"assistant\","
                       "\"content\":\"");
        s->sent_role = 1;

    } else {
        alm_sse_lit(o, "{\"index\":0,\"delta\":{\"content\":\"");
    }

    if (plain) {
        alm_buf_raw(o, text, len);

    } else {
        alm_buf_esc(o, text, len);
    }

    alm_sse_lit(o, "\"}");
    alm_sse_chunk_tail(s, o, 0);
}


/*
 * A string of the frame that holds escapes, decoded (and ended with a
 * NUL): short ones on the caller's stack, longer ones in place at the
 * start of s->buf, free while a line is acted on (a line still in
 * s->buf is no longer read once its one string is decoded).
 */

static const char *
alm_sse_decode(alm_sse_t *s, const alm_frame_str_t *str, char *tmp,
    size_t *len)
{
    size_t           n;
    char            *out;
    alm_frame_str_t  in;

    in = *str;

    if (str->len < ALM_SSE_TMP) {
        out = tmp;

    } else {
        /* the string and its closing quote; the line is longer */
        memmove(s->buf, str->p, str->len + 1);
        in.p = s->buf;
        out = s->buf;
    }

    n = alm_frame_str_decode(&in, out, in.len);
    out[n] = '\0';
    *len = n;

    return out;
}


static void
alm_sse_content(alm_sse_t *s, alm_buf_t *o, const alm_frame_str_t *str)
{
    int          plain;
    char         tmp[ALM_SSE_TMP];
    size_t       len;
    const char  *text;

    if (str == NULL || str->len == 0) {
        return;
    }

    if (str->flags & ALM_FRAME_STR_ESCAPED) {
        text = alm_sse_decode(s, str, tmp, &len);
        plain = 0;

        if (len == 0) {
            return;
        }

    } else {
        text = str->p;
        len = str->len;
        plain = !(str->flags & ALM_FRAME_STR_RAW);
    }

    if (s->conv) {
        if (!s->got_text) {
            alm_conv_hash_message_begin(s->conv, "assistant", 9);
        }

        alm_conv_hash_update(s->conv, text, len);
    }

    alm_sse_delta(s, o, text, len, plain);
    s->got_text = 1;
    s->pieces++;
}


static void
alm_sse_success(alm_sse_t *s, alm_buf_t *o)
{
    if (!s->sent_role) {
        alm_sse_delta(s, o, "", 0, 1);
    }

    alm_sse_chunk_head(s, o);
    alm_sse_lit(o, "{\"index\":0,\"delta\":{}");
    alm_sse_chunk_tail(s, o, 1);

    if (s->include_usage) {
        alm_sse_chunk_head(s, o);
        alm_sse_lit(o, "],\"usage\":{\"prompt_tokens\":");
        alm_buf_int(o, s->usage.prompt_tokens);
        alm_sse_lit(o, ",\"completion_tokens\":");
        alm_buf_int(o, s->usage.completion_tokens);
        alm_sse_lit(o, ",\"total_tokens\":");
        alm_buf_int(o, s->usage.total_tokens);
        alm_sse_lit(o, "}}\n\n");
    }

    alm_sse_lit(o, ALM_SSE_DONE);

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

typedef enum {
    ALM_SSE_OTHER = 0,
    ALM_SSE_CHUNK,              /* textResponseChunk */
    ALM_SSE_WHOLE,              /* textResponse */
    ALM_SSE_FINAL,              /* finalizeResponseStream */
    ALM_SSE_ABORT_FRAME,        /* abort */
    ALM_SSE_USAGE               /* usageMetrics */
} alm_sse_type_e;


static alm_sse_type_e
alm_sse_type(const alm_frame_t *f)
{
    size_t       len;
    const char  *p;
    char         buf[32];

    if (!(f->strings & (1u << ALM_FRAME_TYPE))) {
        return ALM_SSE_OTHER;
    }

    p = f->type.p;
    len = f->type.len;

    if (f->type.flags & ALM_FRAME_STR_ESCAPED) {
        len = alm_frame_str_decode(&f->type, buf, 24);
        p = buf;
    }

#define alm_sse_is(name)                                                      \
    (len == sizeof(name) - 1 && memcmp(p, name, sizeof(name) - 1) == 0)

    if (alm_sse_is("textResponseChunk")) {
        return ALM_SSE_CHUNK;
    }

    if (alm_sse_is("textResponse")) {
        return ALM_SSE_WHOLE;
    }

    if (alm_sse_is("finalizeResponseStream")) {
        return ALM_SSE_FINAL;
    }

    if (alm_sse_is("abort")) {
        return ALM_SSE_ABORT_FRAME;
    }

    if (alm_sse_is("usageMetrics")) {
        return ALM_SSE_USAGE;
    }

#undef alm_sse_is

    /* agentThought, statusResponse, fileDownload, ...: not the answer */

    return ALM_SSE_OTHER;
}


/* a token count: negative counts as 0, no overflow converting */

static long
alm_sse_count(const alm_frame_t *f, int i)
{
    double  d;

    if (!(f->count_found & (1u << i))) {
        return 0;
    }

    d = f->count[i];

    if (!(d >= 0)) {
        return 0;
    }

    if (!(d < 1e15)) {
        return (long) 1e15;
    }

    return (long) d;
}


static void
alm_sse_usage(alm_sse_t *s, const alm_frame_t *f)
{
    alm_usage_t  usage;

    /* an empty "metrics" ({}) keeps what an earlier frame gave */

    if (!f->metrics || f->count_found == 0) {
        return;
    }

    usage.prompt_tokens = alm_sse_count(f, 0);
    usage.completion_tokens = alm_sse_count(f, 1);
    usage.total_tokens = alm_sse_count(f, 2);

    if (usage.total_tokens == 0) {
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
    }

    usage.present = 1;
    s->usage = usage;
}


static void
alm_sse_abort(alm_sse_t *s, alm_buf_t *o, const alm_frame_t *f)
{
    char         tmp[ALM_SSE_TMP];
    size_t       len;
    const char  *message;

    message = ALM_SSE_ABORT;

    if ((f->strings & (1u << ALM_FRAME_ERROR)) && f->error.len) {
        message = alm_sse_decode(s, &f->error, tmp, &len);

        if (len == 0) {
            message = ALM_SSE_ABORT;
        }
    }

    alm_sse_fail(s, o, message);
}


/*
 * AnythingLLM writes every token frame of an answer alike but for its
 * text.  A frame made of the last text chunk frame read whole, with
 * another text between the same bytes, reads the same way if the new
 * text cannot end or change the string (no quote, backslash or control
 * byte): every other byte, and so every member, is the same.  Such a
 * frame is acted on without being read again.
 */

static int
alm_sse_same_shape(alm_sse_t *s, alm_buf_t *o, const char *p, size_t len)
{
    size_t           head, tail;
    alm_frame_str_t  text;

    head = s->shape_head;
    tail = s->shape_tail;

    if (len < head + tail
        || memcmp(p, s->shape, head) != 0
        || memcmp(p + len - tail, s->shape + head, tail) != 0)
    {
        return 0;
    }

    text.p = p + head;
    text.len = len - head - tail;
    text.flags = 0;

    if (!alm_frame_plain(text.p, text.len, &text.flags)) {
        return 0;
    }

    s->got_chunk = 1;
    alm_sse_content(s, o, &text);

    if (s->shape_close) {
        s->closed = 1;
    }

    return 1;
}


static void
alm_sse_shape_keep(alm_sse_t *s, const char *p, size_t len,
    const alm_frame_str_t *text, int close)
{
    size_t  head, tail;

    if (text->flags & ALM_FRAME_STR_ESCAPED) {
        return;
    }

    head = text->p - p;
    tail = len - head - text->len;

    if (head + tail > ALM_SSE_SHAPE_MAX) {
        return;
    }

    if (s->shape == NULL) {
        s->shape = malloc(ALM_SSE_SHAPE_MAX);
        if (s->shape == NULL) {
            /* only slower */
            return;
        }
    }

    memcpy(s->shape, p, head);
    memcpy(s->shape + head, text->p + text->len, tail);

    s->shape_head = head;
    s->shape_tail = tail;
    s->shape_close = close ? 1 : 0;
}


static void
alm_sse_frame(alm_sse_t *s, alm_buf_t *o, const char *p, size_t len)
{
    alm_frame_t             f;
    alm_sse_type_e          type;
    const alm_frame_str_t  *text;

    if (s->shape_tail && alm_sse_same_shape(s, o, p, len)) {
        return;
    }

    /* a frame that is not a JSON object tells nothing: skipped */

    if (!alm_frame_read(p, len, &f)) {
        return;
    }

    type = alm_sse_type(&f);

    if (type == ALM_SSE_OTHER) {
        return;
    }

    text = (f.strings & (1u << ALM_FRAME_TEXT_RESPONSE)) ? &f.text_response
           : (f.strings & (1u << ALM_FRAME_TEXT_CHUNK)) ? &f.text_chunk
           : NULL;

    switch (type) {

    case ALM_SSE_CHUNK:
        if (text) {
            alm_sse_shape_keep(s, p, len, text, f.close);
        }

        s->got_chunk = 1;
        alm_sse_content(s, o, text);

        if (f.close) {
            s->closed = 1;
        }

        break;

    case ALM_SSE_WHOLE:

        /* the whole answer: content only when nothing came before it */

        if (!s->got_chunk && !s->got_text) {
            alm_sse_content(s, o, text);
        }

        if (f.close) {
            s->closed = 1;
        }

        break;

    case ALM_SSE_FINAL:
        alm_sse_usage(s, &f);

        if (!s->got_chunk && !s->got_text) {
            alm_sse_content(s, o, text);
        }

        alm_sse_success(s, o);
        break;

    case ALM_SSE_ABORT_FRAME:
        alm_sse_abort(s, o, &f);
        break;

    default: /* ALM_SSE_USAGE */
        alm_sse_usage(s, &f);
        break;
    }
}


static alm_line_kind_e
alm_sse_kind(const char *p, size_t len)
{
    size_t  n;

    if (len >= 5) {
        return memcmp(p, "data:", 5) == 0 ? ALM_LINE_DATA : ALM_LINE_OTHER;
    }

    n = len;

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
    alm_buf_free(&s->head);
    free(s->shape);
    s->shape = NULL;
}


int
alm_sse_succeeded(const alm_sse_t *s)
{
    return s->done && !s->failed;
}
