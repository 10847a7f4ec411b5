/*
 * Copyright (C) ngx_anythingllm authors
 *
 * The re-framer alone: how many upstream frames one core turns into
 * OpenAI chunks a second.  Built by dev/bench.py with -O2 against the
 * core files; not part of the module.
 *
 *   reframe STREAM_FILE SECONDS
 *
 * STREAM_FILE holds one whole stream-chat answer (frames ending in a
 * blank line).  Each pass re-frames it as the gateway meets a live
 * answer: a new re-framer per stream, one frame per feed (AnythingLLM
 * writes each token as it comes, so each reaches the gateway in a read
 * of its own), then the end.  Passes repeat until SECONDS of this
 * thread's CPU time are spent; it prints frames a second, streams a
 * second and the bytes one stream produced.
 */


/* clock_gettime() */
#define _POSIX_C_SOURCE  200809L

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "alm_core.h"


#define FRAME_MAX  65536


typedef struct {
    size_t   bytes;
    int      done;
} sink_t;


static int
sink_emit(void *data, const char *p, size_t len)
{
    sink_t  *s;

    s = data;
    s->bytes += len;

    if (len >= 14 && memcmp(p + len - 14, "data: [DONE]\n\n", 14) == 0) {
        s->done = 1;
    }

    return ALM_OK;
}


static double
cpu_seconds(void)
{
    struct timespec  ts;

    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);

    return ts.tv_sec + ts.tv_nsec / 1e9;
}


static char *
read_file(const char *path, size_t *len)
{
    FILE  *f;
    char  *p;
    long   n;

    f = fopen(path, "rb");
    if (f == NULL || fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) <= 0) {
        return NULL;
    }

    rewind(f);

    p = malloc(n);
    if (p == NULL || fread(p, 1, n, f) != (size_t) n) {
        return NULL;
    }

    fclose(f);
    *len = n;

    return p;
}


/* the offsets where each frame of "in" ends; returns their count */

static size_t
split_frames(const char *in, size_t len, size_t *ends, size_t max)
{
    size_t       n;
    const char  *p, *e;

    n = 0;
    p = in;

    while (n < max && (e = strstr(p, "\n\n")) != NULL
           && (size_t) (e - in) < len)
    {
        p = e + 2;
        ends[n++] = p - in;
    }

    return n;
}


/* one stream through a fresh re-framer; 0 when it did not succeed */

static int
pass(const char *in, const size_t *ends, size_t frames, char *buf,
    sink_t *out)
{
    int                     ok;
    size_t                  i, at;
    alm_sse_t               sse;
    static const alm_completion_meta_t  meta = {
        "chatcmpl-bench0123456789abcdef", 30, "sales", 5, 1700000000
    };

    alm_sse_init(&sse, buf, FRAME_MAX, &meta, 0, NULL, sink_emit, out);

    at = 0;

    for (i = 0; i < frames; i++) {
        if (alm_sse_feed(&sse, in + at, ends[i] - at) != ALM_OK) {
            alm_sse_free(&sse);
            return 0;
        }

        at = ends[i];
    }

    ok = alm_sse_finish(&sse, 0) == ALM_OK && alm_sse_succeeded(&sse);

    alm_sse_free(&sse);

    return ok;
}


int
main(int argc, char **argv)
{
    int             i;
    char           *in, *buf;
    size_t          len, frames, ends[4096];
    double          seconds, start, spent;
    sink_t          out;
    unsigned long   passes;

    if (argc != 3) {
        fprintf(stderr, "usage: reframe STREAM_FILE SECONDS\n");
        return 2;
    }

    in = read_file(argv[1], &len);
    seconds = atof(argv[2]);
    buf = malloc(FRAME_MAX);

    if (in == NULL || buf == NULL) {
        fprintf(stderr, "reframe: cannot read %s\n", argv[1]);
        return 1;
    }

    /* strstr() needs the text NUL-terminated */

    in = realloc(in, len + 1);
    if (in == NULL) {
        return 1;
    }

    in[len] = '\0';

    frames = split_frames(in, len, ends, 4096);

    memset(&out, 0, sizeof(sink_t));

    if (frames == 0 || !pass(in, ends, frames, buf, &out) || !out.done) {
        fprintf(stderr, "reframe: the stream did not re-frame whole\n");
        return 1;
    }

    len = out.bytes;
    passes = 0;
    start = cpu_seconds();

    do {
        /* a batch between clock reads keeps the clock out of the cost */

        for (i = 0; i < 100; i++) {
            if (!pass(in, ends, frames, buf, &out)) {
                fprintf(stderr, "reframe: a pass failed\n");
                return 1;
            }
        }

        passes += 100;
        spent = cpu_seconds() - start;

    } while (spent < seconds);

    printf("%.0f %.0f %zu %zu\n", passes * frames / spent, passes / spent,
           frames, len);

    free(buf);
    free(in);

    return 0;
}
