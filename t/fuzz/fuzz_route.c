/*
 * Copyright (C) ngx_anythingllm authors
 *
 * libFuzzer target for the path and route classifiers,
 * alm_route_classify() and alm_oai_route().  The first byte chooses
 * the method, the rest is the path.  Besides "no crash, no read past
 * the path", every answer must keep the promises of alm_core.h:
 *
 *   - a path under /api/v1/ (any letter case) is never NONE, one
 *     outside it always is, with no scope and no slug;
 *   - an empty, "." or ".." segment, or a control character, is BAD;
 *   - BAD, NONE and AUTH need no scope, every other kind needs exactly
 *     one; WORKSPACES needs read, OPENAI_PASS chat;
 *   - a slug is only set on an API route, is the segment right after
 *     /api/v1/workspace/, lies inside the path and matches
 *     [A-Za-z0-9_.-]{1,ALM_SLUG_MAX};
 *   - letter case of the path changes nothing (same kind, scope and
 *     slug position), nor does one trailing slash, nor HEAD for GET;
 *   - GET never needs documents, nor chat outside the OpenAI pass
 *     through; a method the table does not name needs admin;
 *   - alm_oai_route() answers by suffix, and a model id is the last,
 *     non-empty segment.
 *
 * Input: method(1) path(...)
 */


#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alm_core.h"


#define PREFIX      "/api/v1/"
#define PREFIX_LEN  8
#define WS          "workspace/"
#define WS_LEN      10


static const char  *methods[] = {
    "GET", "HEAD", "POST", "DELETE", "PUT", "PATCH", "OPTIONS", "get"
};


static void
fail(const char *what, const char *m, const char *p, size_t len)
{
    fprintf(stderr, "%s: %s \"%.*s\"\n", what, m, (int) len, p);
    abort();
}


static int
lower(int c)
{
    return (c >= 'A' && c <= 'Z') ? c | 0x20 : c;
}


static int
caseeq(const char *p, const char *lit, size_t n)
{
    size_t  i;

    for (i = 0; i < n; i++) {
        if (lower((unsigned char) p[i]) != lit[i]) {
            return 0;
        }
    }

    return 1;
}


static int
one_scope(unsigned s)
{
    return s == ALM_SCOPE_CHAT || s == ALM_SCOPE_READ
           || s == ALM_SCOPE_DOCUMENTS || s == ALM_SCOPE_ADMIN;
}


/* a segment after /api/v1/ is empty, ".", ".." or holds a control byte */

static int
malformed(const char *p, size_t len)
{
    size_t         i, start;
    unsigned char  c;

    p += PREFIX_LEN;
    len -= PREFIX_LEN;

    if (len > 0 && p[len - 1] == '/') {
        len--;
    }

    start = 0;

    for (i = 0; i <= len; i++) {
        if (i < len && p[i] != '/') {
            c = (unsigned char) p[i];

            if (c < 0x20 || c == 0x7f) {
                return 1;
            }

            continue;
        }

        if (i == start
            || (i - start == 1 && p[start] == '.')
            || (i - start == 2 && p[start] == '.' && p[start + 1] == '.'))
        {
            return 1;
        }

        start = i + 1;
    }

    return 0;
}


static void
check(const char *m, const char *p, size_t len, const alm_route_t *rt)
{
    int  under;

    if (rt->kind > ALM_ROUTE_OPENAI_PASS) {
        fail("kind out of range", m, p, len);
    }

    under = len >= PREFIX_LEN && caseeq(p, PREFIX, PREFIX_LEN);

    if (under != (rt->kind != ALM_ROUTE_NONE)) {
        fail("NONE is not exactly the paths outside /api/v1/", m, p, len);
    }

    if (under && malformed(p, len) && rt->kind != ALM_ROUTE_BAD) {
        fail("malformed path not BAD", m, p, len);
    }

    switch (rt->kind) {

    case ALM_ROUTE_NONE:
    case ALM_ROUTE_BAD:
    case ALM_ROUTE_AUTH:
        if (rt->scope != 0) {
            fail("scope on a route that needs none", m, p, len);
        }
        break;

    case ALM_ROUTE_WORKSPACES:
        if (rt->scope != ALM_SCOPE_READ) {
            fail("workspace list not read", m, p, len);
        }
        break;

    case ALM_ROUTE_OPENAI_PASS:
        if (rt->scope != ALM_SCOPE_CHAT) {
            fail("openai pass through not chat", m, p, len);
        }
        break;

    default:
        if (!one_scope(rt->scope)) {
            fail("API route without exactly one scope", m, p, len);
        }
        break;
    }

    if (rt->slug == NULL) {
        if (rt->slug_len != 0) {
            fail("slug length without slug", m, p, len);
        }
        return;
    }

    if (rt->kind != ALM_ROUTE_API) {
        fail("slug on a route that is not API", m, p, len);
    }

    if (rt->slug != p + PREFIX_LEN + WS_LEN
        || len < PREFIX_LEN + WS_LEN + rt->slug_len
        || !caseeq(p + PREFIX_LEN, WS, WS_LEN))
    {
        fail("slug is not the segment after workspace/", m, p, len);
    }

    if (!alm_slug_valid(rt->slug, rt->slug_len)) {
        fail("invalid slug", m, p, len);
    }

    if (rt->slug + rt->slug_len != p + len
        && rt->slug[rt->slug_len] != '/')
    {
        fail("slug is not a whole segment", m, p, len);
    }
}


static void
same(const char *what, const char *m, const char *p, size_t len,
    const alm_route_t *a, const char *pa, const alm_route_t *b,
    const char *pb)
{
    if (a->kind != b->kind || a->scope != b->scope
        || (a->slug == NULL) != (b->slug == NULL)
        || a->slug_len != b->slug_len
        || (a->slug && a->slug - pa != b->slug - pb))
    {
        fail(what, m, p, len);
    }
}


static void
check_oai(const char *p, size_t len)
{
    size_t            id_len, n;
    const char       *id;
    alm_oai_route_e   r;

    r = alm_oai_route(p, len, &id, &id_len);

    if (r != alm_oai_route(p, len, NULL, NULL)) {
        fail("oai route depends on id", "", p, len);
    }

    n = sizeof("/chat/completions") - 1;

    if ((r == ALM_OAI_CHAT)
        != (len >= n && memcmp(p + len - n, "/chat/completions", n) == 0))
    {
        fail("chat route not by suffix", "", p, len);
    }

    if (r != ALM_OAI_MODEL) {
        if (id != NULL || id_len != 0) {
            fail("model id set off the model route", "", p, len);
        }
        return;
    }

    if (id_len == 0 || id + id_len != p + len || id <= p
        || id[-1] != '/' || memchr(id, '/', id_len) != NULL)
    {
        fail("model id is not the last segment", "", p, len);
    }

    n = sizeof("/models") - 1;

    if ((size_t) (id - p) < n + 1
        || memcmp(id - 1 - n, "/models", n) != 0)
    {
        fail("model id not after /models/", "", p, len);
    }
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t        i, len, mi;
    char         *path, *other;
    const char   *m;
    alm_route_t   rt, rt2;

    if (size < 1) {
        return 0;
    }

    mi = data[0] % (sizeof(methods) / sizeof(methods[0]));
    m = methods[mi];
    len = size - 1;

    /* exactly len bytes (plus one spare for the slash test, not seen) */
    path = malloc(len ? len : 1);
    other = malloc(len + 1);
    if (path == NULL || other == NULL) {
        abort();
    }

    memcpy(path, data + 1, len);

    alm_route_classify(m, strlen(m), path, len, &rt);
    check(m, path, len, &rt);

    if (mi == 0 || mi == 1) {
        if (rt.kind == ALM_ROUTE_API
            && (rt.scope == ALM_SCOPE_DOCUMENTS
                || rt.scope == ALM_SCOPE_CHAT))
        {
            fail("GET needs more than read or admin", m, path, len);
        }

        alm_route_classify(methods[1 - mi], strlen(methods[1 - mi]), path,
                           len, &rt2);
        same("HEAD differs from GET", m, path, len, &rt, path, &rt2, path);
    }

    if (mi >= 4
        && !(rt.kind == ALM_ROUTE_NONE || rt.kind == ALM_ROUTE_BAD
             || rt.kind == ALM_ROUTE_OPENAI_PASS
             || (rt.kind == ALM_ROUTE_API && rt.scope == ALM_SCOPE_ADMIN)))
    {
        fail("unknown method needs less than admin", m, path, len);
    }

    /* the same path with every ASCII letter's case flipped */

    for (i = 0; i < len; i++) {
        other[i] = path[i];

        if ((other[i] >= 'a' && other[i] <= 'z')
            || (other[i] >= 'A' && other[i] <= 'Z'))
        {
            other[i] ^= 0x20;
        }
    }

    alm_route_classify(m, strlen(m), other, len, &rt2);
    check(m, other, len, &rt2);
    same("letter case changes the route", m, path, len, &rt, path, &rt2,
         other);

    /* one trailing slash added to a path under /api/v1/ without one */

    if (rt.kind != ALM_ROUTE_NONE && path[len - 1] != '/') {
        memcpy(other, path, len);
        other[len] = '/';

        alm_route_classify(m, strlen(m), other, len + 1, &rt2);
        check(m, other, len + 1, &rt2);
        same("a trailing slash changes the route", m, path, len, &rt, path,
             &rt2, other);
    }

    check_oai(path, len);

    free(path);
    free(other);

    return 0;
}
