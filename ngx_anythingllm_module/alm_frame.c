/*
 * Copyright (C) ngx_anythingllm authors
 *
 * One stream-chat frame read without building a tree: the few fields
 * the re-framer acts on are found in one pass over the text, and only
 * the string it sends on is decoded, when it holds escapes at all.
 *
 * A frame counts as an object exactly when cJSON_ParseWithLength()
 * (cJSON 1.7.15 as Debian ships it: numbers of any length) would
 * return one, and a field reads as cJSON_GetObjectItemCaseSensitive()
 * would find it: the first member of that name, names and strings
 * compared up to their first NUL (a raw 0 byte, \u0000, or a \u
 * escape whose digits are not hex, which cJSON reads as 0).  cJSON's
 * own quirks are kept: any byte up to 0x20 is white space, a UTF-8
 * byte order mark is skipped at the start of a text of 5 bytes or
 * more, anything may follow the root object, raw control bytes and
 * bytes that are not UTF-8 are taken into strings as they are, and
 * containers nest at most ALM_FRAME_DEPTH deep.
 */


#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "alm_core.h"


#define ALM_FRAME_DEPTH     1000    /* cJSON's CJSON_NESTING_LIMIT */
#define ALM_FRAME_NAME_MAX  24      /* longer than any name looked for */
#define ALM_FRAME_NUM_MAX   64



/* what a string byte asks of the first pass */

#define ALM_C_PLAIN    0
#define ALM_C_QUOTE    1
#define ALM_C_ESCAPE   2
#define ALM_C_CTRL     3            /* below 0x20, 0 excepted */
#define ALM_C_NUL      4
#define ALM_C_HIGH     5            /* 0x80 and up */


typedef struct {
    const unsigned char  *p;
    const unsigned char  *end;
} alm_scan_t;


static unsigned char  alm_frame_class[256];
static int            alm_frame_class_ready;


static void
alm_frame_class_init(void)
{
    int  c;

    for (c = 0; c < 256; c++) {
        alm_frame_class[c] = c == 0 ? ALM_C_NUL
                             : c < 0x20 ? ALM_C_CTRL
                             : c == '"' ? ALM_C_QUOTE
                             : c == '\\' ? ALM_C_ESCAPE
                             : c >= 0x80 ? ALM_C_HIGH : ALM_C_PLAIN;
    }

    alm_frame_class_ready = 1;
}


static void
alm_scan_ws(alm_scan_t *s)
{
    while (s->p < s->end && *s->p <= 0x20) {
        s->p++;
    }
}


/* cJSON's parse_hex4(): 0 when any of the 4 is not a hex digit */

static unsigned
alm_scan_hex4(const unsigned char *p)
{
    int            i;
    unsigned       v;
    unsigned char  c;

    v = 0;

    for (i = 0; i < 4; i++) {
        c = p[i];

        if (c >= '0' && c <= '9') {
            v = (v << 4) | (unsigned) (c - '0');

        } else if ((c | 0x20) >= 'a' && (c | 0x20) <= 'f') {
            v = (v << 4) | (unsigned) ((c | 0x20) - 'a' + 10);

        } else {
            return 0;
        }
    }

    return v;
}


/*
 * A \u escape at p, the string's closing quote at end, as cJSON's
 * utf16_literal_to_utf8() reads it: the bytes it takes (6, or 12 for
 * a surrogate pair), 0 when cJSON refuses it; the code point in *cp.
 */

static size_t
alm_scan_u(const unsigned char *p, const unsigned char *end,
    unsigned long *cp)
{
    unsigned  hi, lo;

    if (end - p < 6) {
        return 0;
    }

    hi = alm_scan_hex4(p + 2);

    if (hi >= 0xdc00 && hi <= 0xdfff) {
        return 0;
    }

    if (hi < 0xd800 || hi > 0xdbff) {
        *cp = hi;
        return 6;
    }

    if (end - (p + 6) < 6 || p[6] != '\\' || p[7] != 'u') {
        return 0;
    }

    lo = alm_scan_hex4(p + 8);

    if (lo < 0xdc00 || lo > 0xdfff) {
        return 0;
    }

    *cp = 0x10000 + (((unsigned long) (hi & 0x3ff) << 10) | (lo & 0x3ff));

    return 12;
}


/*
 * A string at s->p (its opening quote), as cJSON's parse_string()
 * takes it: it ends at the first quote that no backslash escapes, a
 * backslash always taking the byte after it; then its escapes are
 * decoded in a second walk, whose steps may fall differently (a \u
 * takes 6 or 12 bytes whatever they are), and each must be one cJSON
 * knows.  "str" may be NULL.
 */

static int
alm_scan_string(alm_scan_t *s, alm_frame_str_t *str)
{
    unsigned              flags;
    size_t                n;
    unsigned long         cp;
    const unsigned char  *p, *q, *start, *end;

    start = s->p + 1;
    end = s->end;
    p = start;
    flags = 0;

    for ( ;; ) {

        p = alm_plain_end(p, end);

        if (p >= end) {
            return 0;
        }

        switch (alm_frame_class[*p]) {

        case ALM_C_QUOTE:
            goto closed;

        case ALM_C_ESCAPE:
            if (end - p < 3) {
                /* a last byte that is a backslash, or nothing after */
                return 0;
            }

            flags |= ALM_FRAME_STR_ESCAPED;
            p += 2;
            continue;

        case ALM_C_NUL:
            flags |= ALM_FRAME_STR_ESCAPED;
            break;

        case ALM_C_CTRL:
        case ALM_C_HIGH:
            flags |= ALM_FRAME_STR_RAW;
            break;

        default:
            break;
        }

        p++;
    }

closed:

    if (flags & ALM_FRAME_STR_ESCAPED) {
        q = start;

        while (q < p) {
            if (*q != '\\') {
                q++;
                continue;
            }

            switch (q[1]) {

            case 'b': case 'f': case 'n': case 'r': case 't':
            case '"': case '\\': case '/':
                q += 2;
                break;

            case 'u':
                n = alm_scan_u(q, p, &cp);
                if (n == 0) {
                    return 0;
                }

                q += n;
                break;

            default:
                return 0;
            }
        }
    }

    if (str) {
        str->p = (const char *) start;
        str->len = p - start;
        str->flags = flags;
    }

    s->p = p + 1;

    return 1;
}


/*
 * A number: the run of bytes cJSON copies for strtod(), which must
 * take the whole of it; otherwise the byte where strtod() stopped is
 * one that no container accepts after a value.  Its value only when
 * "value" is not NULL, by strtod() itself.
 */

static int
alm_scan_number(alm_scan_t *s, double *value)
{
    size_t                n, digits;
    char                 *copy, num[ALM_FRAME_NUM_MAX];
    const unsigned char  *p, *q, *e, *run;

    run = s->p;

    for (q = run; q < s->end; q++) {
        if (!((*q >= '0' && *q <= '9') || *q == '.' || *q == '-'
              || *q == '+' || *q == 'e' || *q == 'E'))
        {
            break;
        }
    }

    p = run;
    digits = 0;

    if (*p == '-') {
        p++;
    }

    while (p < q && *p >= '0' && *p <= '9') {
        p++;
        digits++;
    }

    if (p < q && *p == '.') {
        p++;

        while (p < q && *p >= '0' && *p <= '9') {
            p++;
            digits++;
        }
    }

    if (digits == 0) {
        return 0;
    }

    if (p < q && (*p == 'e' || *p == 'E')) {
        e = p + 1;

        if (e < q && (*e == '+' || *e == '-')) {
            e++;
        }

        if (e < q && *e >= '0' && *e <= '9') {
            while (e < q && *e >= '0' && *e <= '9') {
                e++;
            }

            p = e;
        }
    }

    if (p != q) {
        return 0;
    }

    s->p = q;

    if (value == NULL) {
        return 1;
    }

    n = q - run;
    copy = n < sizeof(num) ? num : malloc(n + 1);

    if (copy == NULL) {
        /* cJSON fails the parse when it cannot allocate */
        return 0;
    }

    memcpy(copy, run, n);
    copy[n] = '\0';

    *value = strtod(copy, NULL);

    if (copy != num) {
        free(copy);
    }

    return 1;
}


/*
 * Passes over one value of any kind, checked as cJSON parses it, with
 * "depth" containers open around it.  Nested containers are followed
 * with a stack of one bit each (object or array), not by recursion.
 */

static int
alm_scan_skip(alm_scan_t *s, unsigned depth)
{
    unsigned       top, obj;
    unsigned char  stack[ALM_FRAME_DEPTH / 8 + 1];

    top = 0;

value:

    if (s->p >= s->end) {
        return 0;
    }

    switch (*s->p) {

    case 'n':
        if (s->end - s->p < 4 || memcmp(s->p, "null", 4) != 0) {
            return 0;
        }

        s->p += 4;
        break;

    case 't':
        if (s->end - s->p < 4 || memcmp(s->p, "true", 4) != 0) {
            return 0;
        }

        s->p += 4;
        break;

    case 'f':
        if (s->end - s->p < 5 || memcmp(s->p, "false", 5) != 0) {
            return 0;
        }

        s->p += 5;
        break;

    case '"':
        if (!alm_scan_string(s, NULL)) {
            return 0;
        }

        break;

    case '[':
    case '{':
        if (depth + top >= ALM_FRAME_DEPTH) {
            return 0;
        }

        obj = *s->p == '{';

        if (obj) {
            stack[top >> 3] |= (unsigned char) (1u << (top & 7));

        } else {
            stack[top >> 3] &= (unsigned char) ~(1u << (top & 7));
        }

        top++;
        s->p++;
        alm_scan_ws(s);

        if (s->p < s->end && *s->p == (obj ? '}' : ']')) {
            s->p++;
            top--;
            break;
        }

        if (obj) {
            goto member;
        }

        goto value;

    default:
        if (*s->p == '-' || (*s->p >= '0' && *s->p <= '9')) {
            if (!alm_scan_number(s, NULL)) {
                return 0;
            }

            break;
        }

        return 0;
    }

    /* a value ended: what follows it in the innermost container */

    while (top) {
        obj = (stack[(top - 1) >> 3] >> ((top - 1) & 7)) & 1;

        alm_scan_ws(s);

        if (s->p >= s->end) {
            return 0;
        }

        if (*s->p == ',') {
            s->p++;
            alm_scan_ws(s);

            if (obj) {
                goto member;
            }

            goto value;
        }

        if (*s->p != (obj ? '}' : ']')) {
            return 0;
        }

        s->p++;
        top--;
    }

    return 1;

member:

    if (s->p >= s->end || *s->p != '"' || !alm_scan_string(s, NULL)) {
        return 0;
    }

    alm_scan_ws(s);

    if (s->p >= s->end || *s->p != ':') {
        return 0;
    }

    s->p++;
    alm_scan_ws(s);

    goto value;
}


/*
 * A member's name against the names looked for, a list ending with an
 * empty one.  Returns its index, or -1.  A name with escapes or a NUL
 * is decoded first.
 */

typedef struct {
    const char  *name;
    size_t       len;
} alm_frame_name_t;


#define alm_frame_name_n(s)  { s, sizeof(s) - 1 }

static const alm_frame_name_t  alm_frame_names[] = {
    alm_frame_name_n("type"),
    alm_frame_name_n("textResponse"),
    alm_frame_name_n("textChunk"),
    alm_frame_name_n("error"),
    alm_frame_name_n("close"),
    alm_frame_name_n("metrics"),
    { "", 0 }
};

static const alm_frame_name_t  alm_frame_counts[] = {
    alm_frame_name_n("prompt_tokens"),
    alm_frame_name_n("completion_tokens"),
    alm_frame_name_n("total_tokens"),
    { "", 0 }
};


static int
alm_frame_name(const alm_frame_str_t *name, const alm_frame_name_t *names)
{
    int          i;
    size_t       len, k;
    const char  *p;
    char         buf[ALM_FRAME_NAME_MAX + 4];

    p = name->p;
    len = name->len;

    if (name->flags & ALM_FRAME_STR_ESCAPED) {
        len = alm_frame_str_decode(name, buf, ALM_FRAME_NAME_MAX);
        p = buf;
    }

    for (i = 0; names[i].len; i++) {
        if (names[i].len != len || names[i].name[0] != p[0]) {
            continue;
        }

        for (k = 0; k < len && names[i].name[k] == p[k]; k++) {
            /* void */
        }

        if (k == len) {
            return i;
        }
    }

    return -1;
}


/* the "metrics" object, at s->p ('{'), its parent being the root */

static int
alm_frame_metrics(alm_scan_t *s, alm_frame_t *f)
{
    int              i;
    alm_frame_str_t  name;

    f->metrics = 1;

    s->p++;
    alm_scan_ws(s);

    if (s->p < s->end && *s->p == '}') {
        s->p++;
        return 1;
    }

    for ( ;; ) {
        if (s->p >= s->end || *s->p != '"' || !alm_scan_string(s, &name)) {
            return 0;
        }

        alm_scan_ws(s);

        if (s->p >= s->end || *s->p != ':') {
            return 0;
        }

        s->p++;
        alm_scan_ws(s);

        i = alm_frame_name(&name, alm_frame_counts);

        if (i >= 0 && !(f->count_seen & (1u << i))) {
            f->count_seen |= 1u << i;

            if (s->p < s->end
                && (*s->p == '-' || (*s->p >= '0' && *s->p <= '9')))
            {
                if (!alm_scan_number(s, &f->count[i])) {
                    return 0;
                }

                f->count_found |= 1u << i;

            } else if (!alm_scan_skip(s, 2)) {
                return 0;
            }

        } else if (!alm_scan_skip(s, 2)) {
            return 0;
        }

        alm_scan_ws(s);

        if (s->p < s->end && *s->p == ',') {
            s->p++;
            alm_scan_ws(s);
            continue;
        }

        if (s->p >= s->end || *s->p != '}') {
            return 0;
        }

        s->p++;

        return 1;
    }
}


/* the value of a member looked for, the first of its name */

static int
alm_frame_field(alm_scan_t *s, alm_frame_t *f, int i)
{
    alm_frame_str_t  *str;

    switch (i) {

    case ALM_FRAME_TYPE:
    case ALM_FRAME_TEXT_RESPONSE:
    case ALM_FRAME_TEXT_CHUNK:
    case ALM_FRAME_ERROR:
        if (*s->p != '"') {
            break;
        }

        str = i == ALM_FRAME_TYPE ? &f->type
              : i == ALM_FRAME_TEXT_RESPONSE ? &f->text_response
              : i == ALM_FRAME_TEXT_CHUNK ? &f->text_chunk : &f->error;

        if (!alm_scan_string(s, str)) {
            return 0;
        }

        f->strings |= 1u << i;

        return 1;

    case ALM_FRAME_CLOSE:
        if (s->end - s->p >= 4 && memcmp(s->p, "true", 4) == 0) {
            f->close = 1;
        }

        break;

    default: /* ALM_FRAME_METRICS */
        if (*s->p == '{') {
            return alm_frame_metrics(s, f);
        }

        break;
    }

    return alm_scan_skip(s, 1);
}


int
alm_frame_read(const char *text, size_t len, alm_frame_t *f)
{
    int              i;
    unsigned         seen;
    alm_scan_t       s;
    alm_frame_str_t  name;

    /* the rest is read only where these say it was set */

    f->strings = 0;
    f->close = 0;
    f->metrics = 0;
    f->count_seen = 0;
    f->count_found = 0;

    if (!alm_frame_class_ready) {
        alm_frame_class_init();
    }

    s.p = (const unsigned char *) text;
    s.end = s.p + len;

    if (len >= 5 && memcmp(text, "\xef\xbb\xbf", 3) == 0) {
        s.p += 3;
    }

    alm_scan_ws(&s);

    /* any other value may parse, but is no object either */

    if (s.p >= s.end || *s.p != '{') {
        return 0;
    }

    s.p++;
    alm_scan_ws(&s);

    if (s.p < s.end && *s.p == '}') {
        return 1;
    }

    seen = 0;

    for ( ;; ) {
        if (s.p >= s.end || *s.p != '"' || !alm_scan_string(&s, &name)) {
            return 0;
        }

        alm_scan_ws(&s);

        if (s.p >= s.end || *s.p != ':') {
            return 0;
        }

        s.p++;
        alm_scan_ws(&s);

        if (s.p >= s.end) {
            return 0;
        }

        i = alm_frame_name(&name, alm_frame_names);

        if (i >= 0 && !(seen & (1u << i))) {
            seen |= 1u << i;

            if (!alm_frame_field(&s, f, i)) {
                return 0;
            }

        } else if (!alm_scan_skip(&s, 1)) {
            return 0;
        }

        alm_scan_ws(&s);

        if (s.p < s.end && *s.p == ',') {
            s.p++;
            alm_scan_ws(&s);
            continue;
        }

        /* what follows the root object does not matter */

        return s.p < s.end && *s.p == '}';
    }
}


/*
 * Decodes as cJSON does, up to the first NUL the string holds (its
 * valuestring ends there).  Reads before it writes at each step, so
 * that "out" may be str->p itself.
 */

size_t
alm_frame_str_decode(const alm_frame_str_t *str, char *out, size_t cap)
{
    size_t                w, n, k;
    unsigned long         cp;
    unsigned char         c, enc[4];
    const unsigned char  *p, *end;

    p = (const unsigned char *) str->p;
    end = p + str->len;
    w = 0;

    while (p < end) {

        if (*p != '\\') {
            c = *p++;
            n = 1;
            enc[0] = c;

        } else if (p[1] == 'u') {
            k = alm_scan_u(p, end, &cp);
            if (k == 0) {
                /* refused by alm_frame_read(): not met */
                break;
            }

            p += k;

            if (cp < 0x80) {
                n = 1;
                enc[0] = (unsigned char) cp;

            } else if (cp < 0x800) {
                n = 2;
                enc[0] = (unsigned char) (0xc0 | (cp >> 6));
                enc[1] = (unsigned char) (0x80 | (cp & 0x3f));

            } else if (cp < 0x10000) {
                n = 3;
                enc[0] = (unsigned char) (0xe0 | (cp >> 12));
                enc[1] = (unsigned char) (0x80 | ((cp >> 6) & 0x3f));
                enc[2] = (unsigned char) (0x80 | (cp & 0x3f));

            } else {
                n = 4;
                enc[0] = (unsigned char) (0xf0 | (cp >> 18));
                enc[1] = (unsigned char) (0x80 | ((cp >> 12) & 0x3f));
                enc[2] = (unsigned char) (0x80 | ((cp >> 6) & 0x3f));
                enc[3] = (unsigned char) (0x80 | (cp & 0x3f));
            }

        } else {
            c = p[1];
            p += 2;
            n = 1;

            switch (c) {
            case 'b': enc[0] = '\b'; break;
            case 'f': enc[0] = '\f'; break;
            case 'n': enc[0] = '\n'; break;
            case 'r': enc[0] = '\r'; break;
            case 't': enc[0] = '\t'; break;
            default:  enc[0] = c; break;
            }
        }

        if (enc[0] == '\0') {
            break;
        }

        if (w + n > cap) {
            /* longer than the caller looks at: no match, say */
            return cap + 1;
        }

        memcpy(out + w, enc, n);
        w += n;
    }

    return w;
}


int
alm_frame_plain(const char *p, size_t n, unsigned *flags)
{
    const unsigned char  *q, *end;

    if (!alm_frame_class_ready) {
        alm_frame_class_init();
    }

    q = (const unsigned char *) p;
    end = q + n;

    for ( ;; ) {
        q = alm_plain_end(q, end);

        if (q == end) {
            return 1;
        }

        if (alm_frame_class[*q] != ALM_C_HIGH) {
            return 0;
        }

        *flags |= ALM_FRAME_STR_RAW;
        q++;
    }
}
