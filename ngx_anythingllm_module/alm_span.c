/*
 * Copyright (C) ngx_anythingllm authors
 *
 * JSON input read in place: an object's members found and their values
 * read or written back without building a cJSON tree.
 */


#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "alm_json.h"


/*
 * JSON read without a tree: a strict subset of what cJSON reads, found
 * and written as cJSON's tree would give it.  Outside it ("not read
 * here", 0; the caller asks cJSON): a \u escape, a byte below 0x20 in
 * a string (cJSON's C strings would end at a NUL), nesting deeper than
 * ALM_SPAN_DEPTH, what cJSON refuses.  Between tokens, bytes up to
 * 0x20 are skipped, as cJSON skips them.
 */

#define ALM_SPAN_DEPTH  64

static int alm_span_value(const char **pp, const char *end, int depth);


static const char *
alm_span_ws(const char *p, const char *end)
{
    while (p < end && (unsigned char) *p <= 0x20) {
        p++;
    }

    return p;
}


/* *pp at the opening quote; past the closing one after */

static int
alm_span_string(const char **pp, const char *end, int *escaped)
{
    const char  *p;

    p = *pp + 1;
    *escaped = 0;

    for ( ;; ) {
        p = (const char *) alm_plain_end((const unsigned char *) p,
                                         (const unsigned char *) end);

        if (p == end || (unsigned char) *p < 0x20) {
            return 0;
        }

        if (*p == '"') {
            break;
        }

        if ((unsigned char) *p >= 0x80) {
            /*
             * text that is not ASCII: its bytes need no look here, and
             * a run of them is passed at once, not one scan a byte
             */

            do {
                p++;
            } while (p < end && (unsigned char) *p >= 0x80);

            continue;
        }

        /* a backslash */

        if (end - p < 2 || strchr("bfnrt\"\\/", p[1]) == NULL
            || p[1] == '\0')
        {
            return 0;
        }

        *escaped = 1;
        p += 2;
    }

    *pp = p + 1;

    return 1;
}


/*
 * A number of JSON's own grammar, followed by no byte that cJSON would
 * take as part of a number: cJSON's strtod() reads exactly these bytes
 * then.  Anything else (01, 1., .5, +1, 1e) is not read here.
 */

static int
alm_span_number_end(const char *p, const char *end, const char **after)
{
    const char  *start;

    start = p;

    if (p < end && *p == '-') {
        p++;
    }

    if (p == end || !(*p >= '0' && *p <= '9')) {
        return 0;
    }

    /* a leading 0 stands alone */

    if (*p++ != '0') {
        while (p < end && *p >= '0' && *p <= '9') {
            p++;
        }
    }

    if (p < end && *p == '.') {
        if (++p == end || !(*p >= '0' && *p <= '9')) {
            return 0;
        }

        while (p < end && *p >= '0' && *p <= '9') {
            p++;
        }
    }

    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;

        if (p < end && (*p == '+' || *p == '-')) {
            p++;
        }

        if (p == end || !(*p >= '0' && *p <= '9')) {
            return 0;
        }

        while (p < end && *p >= '0' && *p <= '9') {
            p++;
        }
    }

    if (p < end && (*p == '+' || *p == '-' || *p == '.' || *p == 'e'
                    || *p == 'E' || (*p >= '0' && *p <= '9')))
    {
        return 0;
    }

    /* cJSON reads 63 bytes of a number at most */

    if (p - start > 63) {
        return 0;
    }

    *after = p;

    return 1;
}


/* the value of a number read by alm_span_number_end() */

static double
alm_span_number(const char *p, const char *end)
{
    char        num[64];
    size_t      n;
    uint64_t    v;
    const char  *q;

    /* up to 15 digits: exact as an integer, no strtod() needed */

    for (v = 0, q = p; q < end && *q >= '0' && *q <= '9'; q++) {
        v = v * 10 + (uint64_t) (*q - '0');
    }

    if (q == end && end - p <= 15) {
        return (double) v;
    }

    /* at most 63 bytes: alm_span_number_end() refuses longer ones */

    n = (size_t) (end - p) < sizeof(num) ? (size_t) (end - p)
                                           : sizeof(num) - 1;
    memcpy(num, p, n);
    num[n] = '\0';

    return strtod(num, NULL);
}


/* the members or elements of an object or array, *pp at its bracket */

static int
alm_span_container(const char **pp, const char *end, int depth)
{
    int          object, escaped;
    char         close;
    const char  *p;

    if (depth >= ALM_SPAN_DEPTH) {
        return 0;
    }

    object = (**pp == '{');
    close = object ? '}' : ']';

    p = alm_span_ws(*pp + 1, end);

    if (p < end && *p == close) {
        *pp = p + 1;
        return 1;
    }

    for ( ;; ) {
        p = alm_span_ws(p, end);

        if (object) {
            if (p == end || *p != '"' || !alm_span_string(&p, end, &escaped))
            {
                return 0;
            }

            p = alm_span_ws(p, end);

            if (p == end || *p != ':') {
                return 0;
            }

            p = alm_span_ws(p + 1, end);
        }

        if (!alm_span_value(&p, end, depth + 1)) {
            return 0;
        }

        p = alm_span_ws(p, end);

        if (p < end && *p == ',') {
            p++;
            continue;
        }

        if (p < end && *p == close) {
            *pp = p + 1;
            return 1;
        }

        return 0;
    }
}


static int
alm_span_value(const char **pp, const char *end, int depth)
{
    int          escaped;
    size_t       n;
    const char  *p;

    p = *pp;

    if (p == end) {
        return 0;
    }

    switch (*p) {

    case '"':
        return alm_span_string(pp, end, &escaped);

    case '{':
    case '[':
        return alm_span_container(pp, end, depth);

    case 'n':
    case 't':
    case 'f':
        n = (*p == 'f') ? 5 : 4;

        if ((size_t) (end - p) < n
            || memcmp(p, (*p == 'n') ? "null" : (*p == 't') ? "true"
                                                             : "false", n)
               != 0)
        {
            return 0;
        }

        *pp = p + n;
        return 1;

    default:
        return alm_span_number_end(p, end, pp);
    }
}


/* "only": a member of a name not among the n ends the reading (0) */

static int
alm_span_members(const char *text, size_t len, const char *const *names,
    size_t n, alm_json_span_t *found, int only)
{
    int          escaped, known;
    size_t       i, klen;
    const char  *p, *end, *key, *v;

    for (i = 0; i < n; i++) {
        found[i].p = NULL;
        found[i].end = NULL;
    }

    if (text == NULL || len == 0) {
        return 0;
    }

    p = text;
    end = text + len;

    if (len >= 5 && memcmp(p, "\xef\xbb\xbf", 3) == 0) {
        p += 3;
    }

    p = alm_span_ws(p, end);

    if (p == end || *p != '{') {
        return 0;
    }

    p = alm_span_ws(p + 1, end);

    if (p < end && *p == '}') {
        p++;
        goto trailing;
    }

    /* each member checked as it is read; the first of each name counts */

    for ( ;; ) {
        p = alm_span_ws(p, end);

        if (p == end || *p != '"') {
            return 0;
        }

        key = p + 1;

        if (!alm_span_string(&p, end, &escaped)) {
            return 0;
        }

        klen = p - 1 - key;

        p = alm_span_ws(p, end);

        if (p == end || *p != ':') {
            return 0;
        }

        p = alm_span_ws(p + 1, end);
        v = p;

        if (!alm_span_value(&p, end, 1)) {
            return 0;
        }

        /* key[0] is the closing quote of an empty name: no name's */

        known = 0;

        for (i = 0; !escaped && i < n; i++) {
            if (names[i][0] == key[0] && strlen(names[i]) == klen
                && memcmp(names[i], key, klen) == 0)
            {
                known = 1;

                if (found[i].p == NULL) {
                    found[i].p = v;
                    found[i].end = p;
                }
            }
        }

        if (only && !known) {
            return 0;
        }

        p = alm_span_ws(p, end);

        if (p < end && *p == ',') {
            p++;
            continue;
        }

        if (p < end && *p == '}') {
            p++;
            break;
        }

        return 0;
    }

trailing:

    /* only the white space cJSON's caller lets follow a text */

    for ( ; p < end; p++) {
        if (*p != ' ' && *p != '\t' && *p != '\r' && *p != '\n') {
            return 0;
        }
    }

    return 1;
}


int
alm_json_members(const char *text, size_t len, const char *const *names,
    size_t n, alm_json_span_t *found)
{
    return alm_span_members(text, len, names, n, found, 0);
}


int
alm_json_members_only(const char *text, size_t len,
    const char *const *names, size_t n, alm_json_span_t *found)
{
    return alm_span_members(text, len, names, n, found, 1);
}


/*
 * The array was read whole before, by the functions above: each of
 * its elements reads again as it read then.
 */

int
alm_json_span_next(const alm_json_span_t *array, const char **at,
    alm_json_span_t *elem)
{
    const char  *p;

    p = alm_span_ws((*at == NULL) ? array->p + 1 : *at, array->end);

    if (p < array->end && *p == ',') {
        p = alm_span_ws(p + 1, array->end);
    }

    if (p == array->end || *p == ']') {
        return 0;
    }

    elem->p = p;

    if (!alm_span_value(&p, array->end, 1)) {
        return 0;
    }

    elem->end = p;
    *at = p;

    return 1;
}


int
alm_json_span_is(const alm_json_span_t *v, int type)
{
    if (v->p == NULL) {
        return 0;
    }

    if (type == ALM_SPAN_NUMBER) {
        return *v->p == '-' || (*v->p >= '0' && *v->p <= '9');
    }

    return *v->p == ((type == ALM_SPAN_STRING) ? '"'
                     : (type == ALM_SPAN_OBJECT) ? '{' : '[');
}


double
alm_json_span_number(const alm_json_span_t *v)
{
    return alm_span_number(v->p, v->end);
}


/*
 * The text of a string value, its escapes undone: in place when it
 * has none (*tmp left NULL), else in *tmp (malloc'd, the caller frees
 * it).  NULL when memory ran out.
 */

const char *
alm_json_span_text(const alm_json_span_t *v, size_t *len, char **tmp)
{
    char        *out, *w;
    const char  *p, *end;

    *tmp = NULL;

    p = v->p + 1;
    end = v->end - 1;

    if (memchr(p, '\\', end - p) == NULL) {
        *len = end - p;
        return p;
    }

    out = malloc(end - p + 1);
    if (out == NULL) {
        return NULL;
    }

    for (w = out; p < end; p++) {

        if (*p != '\\') {
            *w++ = *p;
            continue;
        }

        p++;

        switch (*p) {
        case 'b': *w++ = '\b'; break;
        case 'f': *w++ = '\f'; break;
        case 'n': *w++ = '\n'; break;
        case 'r': *w++ = '\r'; break;
        case 't': *w++ = '\t'; break;
        default:  *w++ = *p; break;
        }
    }

    *w = '\0';
    *len = w - out;
    *tmp = out;

    return out;
}


/*
 * The escapes of a string read in place are \b \f \n \r \t \" \\ and
 * \/ (alm_span_string()), and its other bytes are 0x20 and up: the
 * writer escapes the text back the same way, but for "/", which it
 * leaves as it is.
 */

int
alm_json_span_verbatim(const alm_json_span_t *v)
{
    const char  *p, *end;

    p = v->p + 1;
    end = v->end - 1;

    while ((p = memchr(p, '\\', end - p)) != NULL) {

        if (p[1] == '/') {
            return 0;
        }

        /* an escape is two bytes, both inside the quotes */
        p += 2;
    }

    return 1;
}


/* a value read in place, written as alm_json_value() writes its tree */

static void
alm_span_write(alm_buf_t *b, const char **pp, const char *end)
{
    int                escaped;
    char              *tmp;
    char               close;
    size_t             len;
    const char        *p, *s;
    alm_json_span_t    v;

    p = alm_span_ws(*pp, end);

    switch (*p) {

    case '"':
        v.p = p;
        (void) alm_span_string(&p, end, &escaped);
        v.end = p;

        if (!escaped || alm_json_span_verbatim(&v)) {
            alm_buf_raw(b, v.p, v.end - v.p);
            break;
        }

        s = alm_json_span_text(&v, &len, &tmp);

        if (s == NULL) {
            b->nomem = 1;

        } else {
            alm_json_string_n(b, s, len);
        }

        free(tmp);
        break;

    case '{':
    case '[':
        close = (*p == '{') ? '}' : ']';
        alm_buf_raw(b, p, 1);
        p = alm_span_ws(p + 1, end);

        while (*p != close) {
            if (*p == ',') {
                alm_buf_raw(b, ",", 1);
                p = alm_span_ws(p + 1, end);
            }

            if (close == '}') {
                alm_span_write(b, &p, end);
                p = alm_span_ws(p, end);
                alm_buf_raw(b, ":", 1);
                p++;
            }

            alm_span_write(b, &p, end);
            p = alm_span_ws(p, end);
        }

        alm_buf_raw(b, &close, 1);
        p++;
        break;

    case 'n':
    case 't':
    case 'f':
        len = (*p == 'f') ? 5 : 4;
        alm_buf_raw(b, p, len);
        p += len;
        break;

    default:
        s = p;
        (void) alm_span_number_end(s, end, &p);
        alm_json_number(b, alm_span_number(s, p));
        break;
    }

    *pp = p;
}


void
alm_json_span_write(alm_buf_t *b, const alm_json_span_t *v)
{
    const char  *p;

    p = v->p;
    alm_span_write(b, &p, v->end);
}
