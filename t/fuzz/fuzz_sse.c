/*
 * Copyright (C) ngx_anythingllm authors
 *
 * libFuzzer target for the SSE re-framer.  The first bytes of the
 * input choose the options and the cuts; the rest is the upstream
 * stream.  Feeding it whole and cut where the input says must give
 * byte-identical output, the same verdict and the same conversation
 * digest; the output must be well-formed frames ending with exactly
 * one [DONE].  Streams of up to EACH_MAX bytes are also fed byte by
 * byte: that run costs one feed per byte, and longer streams are
 * covered by the fuzzer's cuts, which fall anywhere.
 *
 * The frame reader is checked against cJSON itself, on the stream as
 * one text and on each of its lines: the same verdict on whether the
 * text is an object, and the same fields as cJSON's tree gives them.
 *
 * Input: flags(1) cap(1) ncuts(1) cuts(2 * ncuts) stream(...)
 */


#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "fuzz_common.h"


#define MAX_CUTS  32
#define EACH_MAX  256


typedef struct {
    char    *p;
    size_t   len;
    size_t   cap;
} sink_t;


typedef struct {
    sink_t           out;
    int              succeeded;
    char             digest[ALM_DIGEST_HEX_LEN];
} result_t;


static int
sink_emit(void *data, const char *p, size_t len)
{
    sink_t  *s;

    s = data;

    /* every piece is whole frames */
    if (len < 8 || memcmp(p, "data: ", 6) != 0
        || memcmp(p + len - 2, "\n\n", 2) != 0)
    {
        abort();
    }

    if (s->len + len > s->cap) {
        s->cap = s->cap ? s->cap : 1024;

        while (s->cap < s->len + len) {
            s->cap *= 2;
        }

        s->p = realloc(s->p, s->cap);
        if (s->p == NULL) {
            abort();
        }
    }

    memcpy(s->p + s->len, p, len);
    s->len += len;

    return ALM_OK;
}


static void
run(const char *in, size_t len, const size_t *cuts, size_t ncuts, size_t cap,
    int include_usage, int broken, result_t *res)
{
    size_t                 i, at, next;
    char                  *buf;
    alm_sse_t              sse;
    alm_conv_hash_t        conv;
    alm_completion_meta_t  meta;

    fuzz_meta(&meta, "chatcmpl-fuzz", "ws", 1700000000);

    /* exactly cap bytes, so that ASan sees any write past the bound */
    buf = malloc(cap);
    if (buf == NULL) {
        abort();
    }

    alm_conv_hash_init(&conv, NULL, "ws", 2);
    alm_sse_init(&sse, buf, cap, &meta, include_usage, &conv, sink_emit,
                 &res->out);

    at = 0;

    for (i = 0; i <= ncuts; i++) {
        next = i < ncuts ? cuts[i] : len;

        if (alm_sse_feed(&sse, in + at, next - at) != ALM_OK) {
            abort();
        }

        at = next;
    }

    if (alm_sse_finish(&sse, broken) != ALM_OK) {
        abort();
    }

    /* finishing twice adds nothing */
    if (alm_sse_finish(&sse, !broken) != ALM_OK) {
        abort();
    }

    res->succeeded = alm_sse_succeeded(&sse);
    alm_conv_hash_hex(&conv, res->digest);

    alm_sse_free(&sse);
    free(buf);
}


/* "data: <json>\n\n" frames, the last and only the last one [DONE] */

static void
check_frames(const sink_t *s)
{
    size_t       n;
    const char  *p, *end, *nl;
    cJSON       *j;

    p = s->p;
    end = s->p + s->len;

    if (s->len == 0) {
        abort();
    }

    while (p < end) {

        if (end - p < 8 || memcmp(p, "data: ", 6) != 0) {
            abort();
        }

        p += 6;
        nl = memchr(p, '\n', end - p);

        if (nl == NULL || nl + 1 == end || nl[1] != '\n') {
            abort();
        }

        n = nl - p;

        if (n == 6 && memcmp(p, "[DONE]", 6) == 0) {
            if (nl + 2 != end) {
                abort();
            }

        } else {
            j = cJSON_ParseWithLength(p, n);

            if (!cJSON_IsObject(j)) {
                abort();
            }

            cJSON_Delete(j);
        }

        p = nl + 2;
    }

    if (s->len < 14 || memcmp(end - 14, "data: [DONE]\n\n", 14) != 0) {
        abort();
    }
}


static void
compare(const result_t *a, const result_t *b)
{
    if (a->out.len != b->out.len
        || (a->out.len && memcmp(a->out.p, b->out.p, a->out.len) != 0)
        || a->succeeded != b->succeeded
        || memcmp(a->digest, b->digest, ALM_DIGEST_HEX_LEN) != 0)
    {
        fprintf(stderr, "whole:\n%.*s\nsplit:\n%.*s\n", (int) a->out.len,
                a->out.p, (int) b->out.len, b->out.p);
        abort();
    }
}


/* a field of the frame reader against cJSON's item of that name */

static void
check_str(const alm_frame_t *f, int bit, const alm_frame_str_t *str,
    const cJSON *item)
{
    char    *buf;
    size_t   n;

    if (!cJSON_IsString(item)) {
        if (f->strings & (1u << bit)) {
            abort();
        }

        return;
    }

    if (!(f->strings & (1u << bit))) {
        abort();
    }

    buf = malloc(str->len + 1);
    if (buf == NULL) {
        abort();
    }

    n = alm_frame_str_decode(str, buf, str->len);

    if (n != strlen(item->valuestring)
        || memcmp(buf, item->valuestring, n) != 0)
    {
        abort();
    }

    free(buf);
}


static void
check_frame(const char *p, size_t len)
{
    int           i, ok;
    cJSON        *root;
    alm_frame_t   f;
    const cJSON  *m, *c;
    static const char  *counts[] = {
        "prompt_tokens", "completion_tokens", "total_tokens"
    };

    root = len ? cJSON_ParseWithLength(p, len) : NULL;
    ok = alm_frame_read(p, len, &f);

    if (ok != cJSON_IsObject(root)) {
        fprintf(stderr, "frame reader %d, cJSON %d: %.*s\n", ok,
                cJSON_IsObject(root), (int) len, p);
        abort();
    }

    if (!ok) {
        cJSON_Delete(root);
        return;
    }

    check_str(&f, ALM_FRAME_TYPE, &f.type,
              cJSON_GetObjectItemCaseSensitive(root, "type"));
    check_str(&f, ALM_FRAME_TEXT_RESPONSE, &f.text_response,
              cJSON_GetObjectItemCaseSensitive(root, "textResponse"));
    check_str(&f, ALM_FRAME_TEXT_CHUNK, &f.text_chunk,
              cJSON_GetObjectItemCaseSensitive(root, "textChunk"));
    check_str(&f, ALM_FRAME_ERROR, &f.error,
              cJSON_GetObjectItemCaseSensitive(root, "error"));

    if (f.close
        != cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(root, "close")))
    {
        abort();
    }

    m = cJSON_GetObjectItemCaseSensitive(root, "metrics");

    if (f.metrics != cJSON_IsObject(m)) {
        abort();
    }

    for (i = 0; f.metrics && i < 3; i++) {
        c = cJSON_GetObjectItemCaseSensitive(m, counts[i]);

        if (cJSON_IsNumber(c) != !!(f.count_found & (1u << i))) {
            abort();
        }

        if (cJSON_IsNumber(c)
            && memcmp(&c->valuedouble, &f.count[i], sizeof(double)) != 0)
        {
            abort();
        }
    }

    cJSON_Delete(root);
}


static void
check_frames_of(const char *in, size_t len)
{
    const char  *p, *end, *nl;

    check_frame(in, len);

    p = in;
    end = in + len;

    while (p < end) {
        nl = memchr(p, '\n', end - p);
        if (nl == NULL) {
            nl = end;
        }

        /* the line as the re-framer gives it: after "data:" */
        if (nl - p >= 5 && memcmp(p, "data:", 5) == 0) {
            check_frame(p + 5, nl - p - 5);

        } else {
            check_frame(p, nl - p);
        }

        p = nl + 1;
    }
}


static int
cmp_size(const void *a, const void *b)
{
    size_t  x, y;

    x = *(const size_t *) a;
    y = *(const size_t *) b;

    return x < y ? -1 : x > y;
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int         include_usage, broken;
    size_t      cap, ncuts, i, len, *bytes;
    size_t      cuts[MAX_CUTS];
    const char  *in;
    result_t    whole, split, each;

    if (size < 3) {
        return 0;
    }

    include_usage = data[0] & 1;
    broken = (data[0] >> 1) & 1;
    cap = 16 + (size_t) data[1] * 8;
    ncuts = data[2] % (MAX_CUTS + 1);

    data += 3;
    size -= 3;

    if (size < ncuts * 2) {
        return 0;
    }

    in = (const char *) data + ncuts * 2;
    len = size - ncuts * 2;

    for (i = 0; i < ncuts; i++) {
        cuts[i] = len ? ((size_t) data[2 * i] << 8 | data[2 * i + 1]) % len
                      : 0;
    }

    qsort(cuts, ncuts, sizeof(size_t), cmp_size);

    check_frames_of(in, len);

    memset(&whole, 0, sizeof(result_t));
    memset(&split, 0, sizeof(result_t));
    memset(&each, 0, sizeof(result_t));

    run(in, len, NULL, 0, cap, include_usage, broken, &whole);
    check_frames(&whole.out);

    run(in, len, cuts, ncuts, cap, include_usage, broken, &split);
    compare(&whole, &split);

    if (len && len <= EACH_MAX) {
        bytes = malloc(len * sizeof(size_t));
        if (bytes == NULL) {
            abort();
        }

        for (i = 1; i < len; i++) {
            bytes[i - 1] = i;
        }

        run(in, len, bytes, len - 1, cap, include_usage, broken, &each);
        compare(&whole, &each);
        free(bytes);
    }

    free(whole.out.p);
    free(split.out.p);
    free(each.out.p);

    return 0;
}
