/*
 * Copyright (C) ngx_anythingllm authors
 *
 * JSON output: string escaping, the one growable writer every JSON
 * text of the core is built with, and parsed values written back as
 * cJSON writes them.
 */


#include <float.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alm_json.h"


#define ALM_BUF_MIN  512


/*
 * Length of the valid UTF-8 sequence at p (1..4), or 0 when the bytes
 * there do not start one: strict, as RFC 3629 has it (no overlong
 * forms, no surrogates, nothing above U+10FFFF).
 */

size_t
alm_utf8_len(const unsigned char *p, size_t avail)
{
    size_t         n, i;
    unsigned char  c, lo, hi;

    c = p[0];

    if (c < 0x80) {
        return 1;
    }

    lo = 0x80;
    hi = 0xbf;

    if (c >= 0xc2 && c <= 0xdf) {
        n = 2;

    } else if (c >= 0xe0 && c <= 0xef) {
        n = 3;
        if (c == 0xe0) {
            lo = 0xa0;
        } else if (c == 0xed) {
            hi = 0x9f;
        }

    } else if (c >= 0xf0 && c <= 0xf4) {
        n = 4;
        if (c == 0xf0) {
            lo = 0x90;
        } else if (c == 0xf4) {
            hi = 0x8f;
        }

    } else {
        return 0;
    }

    if (avail < n || p[1] < lo || p[1] > hi) {
        return 0;
    }

    for (i = 2; i < n; i++) {
        if (p[i] < 0x80 || p[i] > 0xbf) {
            return 0;
        }
    }

    return n;
}


/*
 * "strict": bytes that are not valid UTF-8 become \ufffd; otherwise
 * every byte from 0x80 up passes as it is, as cJSON writes strings.
 * Both write the same bytes for valid UTF-8.
 *
 * At most "cap" bytes are written (out NULL only counts them): the
 * escape stops before the first character that would not fit, and
 * *used tells how much of s was escaped.  Returns the bytes written.
 */

static size_t
alm_escape(char *out, size_t cap, const char *s, size_t len, int strict,
    size_t *used)
{
    static const char  digits[] = "0123456789abcdef";

    size_t                n, w, i, k;
    unsigned char         c;
    const unsigned char  *p, *q, *end;

    p = (const unsigned char *) s;
    end = p + len;
    w = 0;

    while (p < end) {

        /* a run of bytes that pass as they are, copied at once */

        for (q = p; q < end; q++) {
            c = *q;

            if (c < 0x20 || c == '"' || c == '\\' || (c >= 0x80 && strict)) {
                break;
            }
        }

        if (q != p) {
            k = (size_t) (q - p);

            if (k > cap - w) {
                k = cap - w;
            }

            if (k == 0) {
                break;
            }

            if (out) {
                memcpy(out + w, p, k);
            }
            w += k;
            p += k;
            continue;
        }

        c = *p;

        if (c >= 0x80) {
            n = strict ? alm_utf8_len(p, end - p) : 1;

            if (n == 0) {
                /* an invalid byte becomes U+FFFD, keeping the JSON valid */
                if (cap - w < 6) {
                    break;
                }
                if (out) {
                    memcpy(out + w, "\\ufffd", 6);
                }
                w += 6;
                p++;
                continue;
            }

            if (cap - w < n) {
                break;
            }
            if (out) {
                for (i = 0; i < n; i++) {
                    out[w + i] = (char) p[i];
                }
            }
            w += n;
            p += n;
            continue;
        }

        if (c == '"' || c == '\\' || c == '\n' || c == '\r' || c == '\t'
            || c == '\b' || c == '\f')
        {
            if (cap - w < 2) {
                break;
            }
            if (out) {
                out[w] = '\\';
                switch (c) {
                case '\n': out[w + 1] = 'n'; break;
                case '\r': out[w + 1] = 'r'; break;
                case '\t': out[w + 1] = 't'; break;
                case '\b': out[w + 1] = 'b'; break;
                case '\f': out[w + 1] = 'f'; break;
                default:   out[w + 1] = (char) c; break;
                }
            }
            w += 2;
            p++;
            continue;
        }

        if (cap - w < 6) {
            break;
        }
        if (out) {
            memcpy(out + w, "\\u00", 4);
            out[w + 4] = digits[c >> 4];
            out[w + 5] = digits[c & 0x0f];
        }
        w += 6;
        p++;
    }

    if (used) {
        *used = (size_t) (p - (const unsigned char *) s);
    }

    return w;
}


size_t
alm_json_escape(char *out, const char *s, size_t len)
{
    return alm_escape(out, (size_t) -1, s, len, 1, NULL);
}


static int
alm_hex4(const unsigned char *p, const unsigned char *end, unsigned *v)
{
    int            i;
    unsigned char  c;

    if (end - p < 4) {
        return 0;
    }

    *v = 0;

    for (i = 0; i < 4; i++) {
        c = p[i];

        if (c >= '0' && c <= '9') {
            *v = (*v << 4) | (unsigned) (c - '0');

        } else if ((c | 0x20) >= 'a' && (c | 0x20) <= 'f') {
            *v = (*v << 4) | (unsigned) ((c | 0x20) - 'a' + 10);

        } else {
            return 0;
        }
    }

    return 1;
}


/*
 * What cJSON would let through silently, checked on the raw body
 * before it is parsed: bytes that are not strict UTF-8 (cJSON copies
 * them into strings as they are, and they would reach AnythingLLM as
 * U+FFFD), a \u0000 escape (it would cut a string short: cJSON's
 * strings end at the first NUL), a \u escape without 4 hex digits
 * (cJSON reads it as \u0000) and a lone UTF-16 surrogate escape (no
 * character; cJSON refuses it as well, but the rule is ours).
 * Anything else that is not JSON is left to the parser.
 *
 * Strings are followed only to tell an escape's backslash from a
 * quote; a UTF-8 sequence never holds a byte below 0x80, so stopping
 * only at quotes, backslashes and bytes from 0x80 up cannot be
 * fooled.
 */

const char *
alm_json_text_check(const char *body, size_t len, size_t *at)
{
    int                   in_string;
    size_t                n;
    unsigned              u, lo;
    const char           *what;
    const unsigned char  *p, *start, *end;

    if (len == 0) {
        return NULL;
    }

    start = (const unsigned char *) body;
    end = start + len;
    p = start;
    in_string = 0;

    while (p < end) {

        /* bytes that are none of these four kinds pass in any state */

        p = alm_plain_end(p, end);

        if (p == end) {
            break;
        }

        if (*p < 0x20) {
            p++;
            continue;
        }

        if (*p >= 0x80) {
            n = alm_utf8_len(p, end - p);

            if (n == 0) {
                what = "it is not valid UTF-8";
                goto bad;
            }

            p += n;
            continue;
        }

        if (*p == '"') {
            in_string = !in_string;
            p++;
            continue;
        }

        if (!in_string || *p != '\\') {
            p++;
            continue;
        }

        /* an escape inside a string */

        if (end - p < 2 || p[1] != 'u') {
            /*
             * another escape, or a broken one the parser refuses; a
             * byte past the backslash that is not ASCII is still
             * checked as UTF-8
             */
            p += (end - p >= 2 && p[1] < 0x80) ? 2 : 1;
            continue;
        }

        if (!alm_hex4(p + 2, end, &u)) {
            /* cJSON would read "\uZZZZ" as U+0000 */
            what = "a string holds a \\u escape without 4 hex digits";
            goto bad;
        }

        if (u == 0) {
            what = "a string holds \\u0000, which is refused";
            goto bad;
        }

        if (u >= 0xdc00 && u <= 0xdfff) {
            what = "a string holds a lone UTF-16 surrogate escape";
            goto bad;
        }

        if (u >= 0xd800 && u <= 0xdbff) {

            /* a high surrogate must be followed by a low one */

            if (end - p < 12 || p[6] != '\\' || p[7] != 'u'
                || !alm_hex4(p + 8, end, &lo) || lo < 0xdc00 || lo > 0xdfff)
            {
                what = "a string holds a lone UTF-16 surrogate escape";
                goto bad;
            }

            p += 12;
            continue;
        }

        p += 6;
    }

    return NULL;

bad:

    *at = p - start;

    return what;
}

/* ------------------------------------------------------------------ */
/* the writer                                                         */

int
alm_buf_reserve(alm_buf_t *b, size_t n)
{
    size_t   cap;
    char    *p;

    if (b->nomem) {
        return 0;
    }

    if (b->len + n < b->cap) {
        return 1;
    }

    cap = b->cap ? b->cap : ALM_BUF_MIN;

    while (cap <= b->len + n) {
        cap *= 2;
    }

    p = realloc(b->data, cap);
    if (p == NULL) {
        b->nomem = 1;
        return 0;
    }

    b->data = p;
    b->cap = cap;

    return 1;
}


void
alm_buf_raw(alm_buf_t *b, const char *p, size_t n)
{
    if (n == 0 || !alm_buf_reserve(b, n)) {
        return;
    }

    memcpy(b->data + b->len, p, n);
    b->len += n;
}


void
alm_buf_str(alm_buf_t *b, const char *s)
{
    alm_buf_raw(b, s, strlen(s));
}


static void
alm_buf_escape(alm_buf_t *b, const char *p, size_t n, int strict)
{
    size_t  used;

    /*
     * Most text needs few escapes: it is written at once into room for
     * itself and a margin, and only what did not fit is counted, so
     * that the buffer then grows once, to the exact size.
     */

    if (!alm_buf_reserve(b, n + n / 8 + 16)) {
        return;
    }

    b->len += alm_escape(b->data + b->len, b->cap - b->len - 1, p, n, strict,
                         &used);

    if (used == n) {
        return;
    }

    p += used;
    n -= used;

    if (!alm_buf_reserve(b, alm_escape(NULL, (size_t) -1, p, n, strict,
                                       NULL)))
    {
        return;
    }

    b->len += alm_escape(b->data + b->len, (size_t) -1, p, n, strict, NULL);
}


void
alm_buf_esc(alm_buf_t *b, const char *p, size_t n)
{
    alm_buf_escape(b, p, n, 1);
}


void
alm_buf_json_str(alm_buf_t *b, const char *s)
{
    if (s == NULL) {
        alm_buf_raw(b, "null", 4);
        return;
    }

    alm_buf_raw(b, "\"", 1);
    alm_buf_esc(b, s, strlen(s));
    alm_buf_raw(b, "\"", 1);
}


void
alm_buf_int(alm_buf_t *b, int64_t v)
{
    char      num[24], *p;
    uint64_t  u;

    /* written backwards from the end of num */

    p = num + sizeof(num);
    u = (v < 0) ? (uint64_t) 0 - (uint64_t) v : (uint64_t) v;

    do {
        *--p = (char) ('0' + u % 10);
        u /= 10;
    } while (u);

    if (v < 0) {
        *--p = '-';
    }

    alm_buf_raw(b, p, num + sizeof(num) - p);
}


char *
alm_buf_take(alm_buf_t *b, size_t *len)
{
    char  *p;

    /* an empty text still needs its NUL */

    if (!alm_buf_reserve(b, 0)) {
        alm_buf_free(b);
        return NULL;
    }

    p = b->data;
    p[b->len] = '\0';

    if (len) {
        *len = b->len;
    }

    memset(b, 0, sizeof(alm_buf_t));

    return p;
}


void
alm_buf_free(alm_buf_t *b)
{
    free(b->data);
    memset(b, 0, sizeof(alm_buf_t));
}


/* ------------------------------------------------------------------ */
/* parsed values                                                      */

/*
 * cJSON allocates through alm_json_malloc() from the first parse on,
 * so that a parse that came back NULL tells a failed allocation from
 * a text cJSON refused.  Workers are single-threaded: a plain flag.
 */

static int  alm_json_hooked;
static int  alm_json_nomem;


static void *
alm_json_malloc(size_t size)
{
    void  *p;

    p = malloc(size);

    if (p == NULL) {
        alm_json_nomem = 1;
    }

    return p;
}


cJSON *
alm_json_parse(const char *p, size_t len, int *nomem)
{
    cJSON        *root;
    const char   *end;
    cJSON_Hooks   hooks;

    if (nomem) {
        *nomem = 0;
    }

    if (p == NULL || len == 0) {
        return NULL;
    }

    if (!alm_json_hooked) {
        hooks.malloc_fn = alm_json_malloc;
        hooks.free_fn = free;
        cJSON_InitHooks(&hooks);
        alm_json_hooked = 1;
    }

    alm_json_nomem = 0;
    end = NULL;
    root = cJSON_ParseWithLengthOpts(p, len, &end, 0);

    if (root == NULL) {
        if (nomem) {
            *nomem = alm_json_nomem;
        }

        return NULL;
    }

    while (end < p + len
           && (*end == ' ' || *end == '\t' || *end == '\r' || *end == '\n'))
    {
        end++;
    }

    if (end != p + len) {
        cJSON_Delete(root);
        return NULL;
    }

    return root;
}


int
alm_json_absent(const cJSON *item)
{
    return item == NULL || cJSON_IsNull(item);
}


char *
alm_strndup(const char *s, size_t n)
{
    char  *p;

    p = malloc(n + 1);
    if (p == NULL) {
        return NULL;
    }

    if (n) {
        memcpy(p, s, n);
    }

    p[n] = '\0';

    return p;
}


/*
 * cJSON's rule: 15 significant digits when they read back as the same
 * number (within an epsilon), 17 otherwise; NaN and infinities as
 * null.  The C locale's decimal point is assumed, as nginx runs in it.
 */

void
alm_json_number(alm_buf_t *b, double d)
{
    int     n;
    char    num[32];
    double  back, max;

    if (isnan(d) || isinf(d)) {
        alm_buf_raw(b, "null", 4);
        return;
    }

    /*
     * An integer below 1e15 is what "%1.15g" writes of it, and reads
     * back exactly: its digits need no printf (token counts, times).
     * -0 takes the long way, which keeps its sign.
     */

    if (d > -1e15 && d < 1e15 && d == (double) (int64_t) d
        && !(d == 0 && signbit(d)))
    {
        alm_buf_int(b, (int64_t) d);
        return;
    }

    n = snprintf(num, sizeof(num), "%1.15g", d);
    back = strtod(num, NULL);
    max = fabs(back) > fabs(d) ? fabs(back) : fabs(d);

    if (!(fabs(back - d) <= max * DBL_EPSILON)) {
        n = snprintf(num, sizeof(num), "%1.17g", d);
    }

    alm_buf_raw(b, num, (size_t) n);
}


void
alm_json_string(alm_buf_t *b, const char *s)
{
    alm_json_string_n(b, s, s ? strlen(s) : 0);
}


void
alm_json_string_n(alm_buf_t *b, const char *s, size_t len)
{
    const char  *nul;

    /* a C string of cJSON's ends at a NUL */

    if (s && (nul = memchr(s, '\0', len)) != NULL) {
        len = nul - s;
    }

    alm_buf_raw(b, "\"", 1);

    if (s) {
        alm_buf_escape(b, s, len, 0);
    }

    alm_buf_raw(b, "\"", 1);
}


void
alm_json_value(alm_buf_t *b, const cJSON *item)
{
    const cJSON  *c;

    if (cJSON_IsObject(item) || cJSON_IsArray(item)) {
        alm_buf_raw(b, cJSON_IsObject(item) ? "{" : "[", 1);

        for (c = item->child; c; c = c->next) {

            if (c != item->child) {
                alm_buf_raw(b, ",", 1);
            }

            if (cJSON_IsObject(item)) {
                alm_json_string(b, c->string);
                alm_buf_raw(b, ":", 1);
            }

            alm_json_value(b, c);
        }

        alm_buf_raw(b, cJSON_IsObject(item) ? "}" : "]", 1);

    } else if (cJSON_IsString(item)) {
        alm_json_string(b, item->valuestring);

    } else if (cJSON_IsNumber(item)) {
        alm_json_number(b, item->valuedouble);

    } else if (cJSON_IsTrue(item)) {
        alm_buf_raw(b, "true", 4);

    } else if (cJSON_IsFalse(item)) {
        alm_buf_raw(b, "false", 5);

    } else {
        alm_buf_raw(b, "null", 4);
    }
}


/*
 * Room for n more bytes: where to write them (the caller then adds n
 * to b->len), or NULL when memory ran out.  For a writer that knows
 * the length of several pieces and copies them without a check each.
 */

char *
alm_buf_room(alm_buf_t *b, size_t n)
{
    if (!alm_buf_reserve(b, n)) {
        return NULL;
    }

    return b->data + b->len;
}
