/*
 * Copyright (C) ngx_anythingllm authors
 *
 * Route classification of AnythingLLM's developer API (/api/v1/...)
 * and of the OpenAI-style routes the gateway answers itself.
 */


#include <string.h>

#include "alm_core.h"


/*
 * The longest route of the developer API has 5 segments after
 * /api/v1/ (workspace/:slug/thread/:thread/stream-chat); the table
 * looks at no segment past the fifth, so longer paths keep only their
 * first ALM_ROUTE_SEGS segments (all are still checked).
 */
#define ALM_ROUTE_SEGS  8


typedef struct {
    const char  *p;
    size_t       len;
} alm_seg_t;


typedef enum {
    ALM_M_OTHER = 0,
    ALM_M_GET,                  /* GET and HEAD: Express runs GET for HEAD */
    ALM_M_POST,
    ALM_M_DELETE
} alm_method_e;


/* case-insensitive compare of a segment with a lowercase literal */

static int
alm_seg_is(const alm_seg_t *seg, const char *lit)
{
    size_t         i;
    unsigned char  c;

    for (i = 0; i < seg->len; i++) {
        if (lit[i] == '\0') {
            return 0;
        }

        c = (unsigned char) seg->p[i];
        if (c >= 'A' && c <= 'Z') {
            c = (unsigned char) (c | 0x20);
        }

        if (c != (unsigned char) lit[i]) {
            return 0;
        }
    }

    return lit[seg->len] == '\0';
}


/* 1 when the segment is one of the words of a NULL-ended list */

static int
alm_seg_in(const alm_seg_t *seg, const char *const *words)
{
    for ( /* void */ ; *words; words++) {
        if (alm_seg_is(seg, *words)) {
            return 1;
        }
    }

    return 0;
}


static alm_method_e
alm_route_method(const char *m, size_t len)
{
    if ((len == 3 && memcmp(m, "GET", 3) == 0)
        || (len == 4 && memcmp(m, "HEAD", 4) == 0))
    {
        return ALM_M_GET;
    }

    if (len == 4 && memcmp(m, "POST", 4) == 0) {
        return ALM_M_POST;
    }

    if (len == 6 && memcmp(m, "DELETE", 6) == 0) {
        return ALM_M_DELETE;
    }

    return ALM_M_OTHER;
}


static void
alm_route_set(alm_route_t *rt, alm_route_kind_e kind, unsigned scope)
{
    rt->kind = kind;
    rt->scope = scope;

    if (kind == ALM_ROUTE_BAD) {
        rt->global = 0;
        rt->slug = NULL;
        rt->slug_len = 0;
        rt->chat = ALM_CHAT_NONE;
    }
}


/* GET/HEAD reads, any other method may change something */

static void
alm_route_default(alm_route_t *rt, alm_method_e m)
{
    alm_route_set(rt, ALM_ROUTE_API,
                  m == ALM_M_GET ? ALM_SCOPE_READ : ALM_SCOPE_ADMIN);
}


/* the chat calls of a workspace and of a thread */

static const char *const  alm_chat_words[] = { "chat", "stream-chat", NULL };


/* /api/v1/workspace/:slug[/...] */

static void
alm_route_workspace(alm_route_t *rt, alm_method_e m, alm_seg_t *seg,
    size_t n)
{
    if (n == 2 && m == ALM_M_POST && alm_seg_is(&seg[1], "new")) {
        /* creates a workspace: names no existing one */
        alm_route_set(rt, ALM_ROUTE_API, ALM_SCOPE_ADMIN);
        return;
    }

    if (!alm_slug_valid(seg[1].p, seg[1].len)) {
        alm_route_set(rt, ALM_ROUTE_BAD, 0);
        return;
    }

    rt->slug = seg[1].p;
    rt->slug_len = seg[1].len;

    if (n == 3 && m == ALM_M_POST) {

        if (alm_seg_in(&seg[2], alm_chat_words)) {
            alm_route_set(rt, ALM_ROUTE_API, ALM_SCOPE_CHAT);
            rt->chat = alm_seg_is(&seg[2], "chat") ? ALM_CHAT_WHOLE
                                                   : ALM_CHAT_STREAM;
            return;
        }

        if (alm_seg_is(&seg[2], "update-embeddings")) {
            /*
             * "adds" names documents of the store every workspace
             * shares, by path: a key held to this workspace could
             * attach, and so read, any document of the instance
             */
            alm_route_set(rt, ALM_ROUTE_API, ALM_SCOPE_DOCUMENTS);
            rt->global = 1;
            return;
        }

        if (alm_seg_is(&seg[2], "update-pin")) {
            /* pins only a document already in this workspace */
            alm_route_set(rt, ALM_ROUTE_API, ALM_SCOPE_DOCUMENTS);
            return;
        }

        if (alm_seg_is(&seg[2], "vector-search")) {
            /* a similarity search: reads the workspace's documents */
            alm_route_set(rt, ALM_ROUTE_API, ALM_SCOPE_READ);
            return;
        }
    }

    if (n >= 4 && alm_seg_is(&seg[2], "thread")) {

        if (!alm_slug_valid(seg[3].p, seg[3].len)) {
            alm_route_set(rt, ALM_ROUTE_BAD, 0);
            return;
        }

        if ((n == 4 && m == ALM_M_POST && alm_seg_is(&seg[3], "new"))
            || (n == 4 && m == ALM_M_DELETE)
            || (n == 5 && m == ALM_M_POST
                && (alm_seg_is(&seg[4], "update")
                    || alm_seg_in(&seg[4], alm_chat_words))))
        {
            alm_route_set(rt, ALM_ROUTE_API, ALM_SCOPE_CHAT);

            if (n == 5 && alm_seg_in(&seg[4], alm_chat_words)) {
                rt->chat = alm_seg_is(&seg[4], "chat") ? ALM_CHAT_WHOLE
                                                       : ALM_CHAT_STREAM;
            }

            return;
        }
    }

    alm_route_default(rt, m);
}


/* /api/v1/document/... */

static void
alm_route_document(alm_route_t *rt, alm_method_e m, alm_seg_t *seg,
    size_t n)
{
    static const char *const  words[] = {
        "upload-link", "raw-text", "create-folder", "move-files", NULL
    };

    if (m == ALM_M_DELETE
        || (m == ALM_M_POST && (n == 2 || n == 3)
            && alm_seg_is(&seg[1], "upload"))
        || (m == ALM_M_POST && n == 2 && alm_seg_in(&seg[1], words)))
    {
        alm_route_set(rt, ALM_ROUTE_API, ALM_SCOPE_DOCUMENTS);

    } else {
        alm_route_default(rt, m);
    }
}


/* /api/v1/system/...: instance-wide, admin unless named here */

static void
alm_route_system(alm_route_t *rt, alm_method_e m, alm_seg_t *seg,
    size_t n)
{
    if (n == 2 && m == ALM_M_DELETE
        && alm_seg_is(&seg[1], "remove-documents"))
    {
        alm_route_set(rt, ALM_ROUTE_API, ALM_SCOPE_DOCUMENTS);
        return;
    }

    if (n == 2 && m == ALM_M_GET && alm_seg_is(&seg[1], "vector-count")) {
        alm_route_set(rt, ALM_ROUTE_API, ALM_SCOPE_READ);
        return;
    }

    alm_route_set(rt, ALM_ROUTE_API, ALM_SCOPE_ADMIN);
}


/*
 * The route table proper: n segments, of which seg holds the first
 * ALM_ROUTE_SEGS; no rule looks past the fifth.
 */

static void
alm_route_table(alm_route_t *rt, alm_method_e m, alm_seg_t *seg, size_t n)
{
    static const char *const  admin[] = { "admin", "users", "embed", NULL };

    if (alm_seg_is(&seg[0], "openai")) {
        alm_route_set(rt, ALM_ROUTE_OPENAI_PASS, ALM_SCOPE_CHAT);
        return;
    }

    if (n == 1 && m == ALM_M_GET && alm_seg_is(&seg[0], "auth")) {
        alm_route_set(rt, ALM_ROUTE_AUTH, 0);
        return;
    }

    if (n == 1 && m == ALM_M_GET && alm_seg_is(&seg[0], "workspaces")) {
        alm_route_set(rt, ALM_ROUTE_WORKSPACES, ALM_SCOPE_READ);
        return;
    }

    if (n >= 2 && alm_seg_is(&seg[0], "workspace")) {
        alm_route_workspace(rt, m, seg, n);
        return;
    }

    if (alm_seg_is(&seg[0], "document")) {
        alm_route_document(rt, m, seg, n);
        return;
    }

    if (alm_seg_is(&seg[0], "system")) {
        alm_route_system(rt, m, seg, n);
        return;
    }

    if (alm_seg_in(&seg[0], admin)) {
        /*
         * users, invitations, embed chats of every workspace, and
         * GET /users/:id/issue-auth-token which mints a login token:
         * admin whatever the method
         */
        alm_route_set(rt, ALM_ROUTE_API, ALM_SCOPE_ADMIN);
        return;
    }

    alm_route_default(rt, m);
}


/*
 * AnythingLLM serves these routes with an Express router that ignores
 * letter case and accepts one trailing slash, so the fixed words are
 * compared without case, and one trailing slash is dropped before the
 * path is judged: "/api/v1/workspaces/" is the filtered list, not a
 * plain read.  Any other empty segment ("//") is malformed.  Slugs
 * are compared exactly elsewhere (a case mismatch can only deny).
 */

void
alm_route_classify(const char *method, size_t method_len, const char *path,
    size_t path_len, alm_route_t *rt)
{
    size_t          n, len, i;
    alm_seg_t       seg[ALM_ROUTE_SEGS];
    const char     *p, *end, *start;
    alm_seg_t       prefix;
    unsigned char   c;

    rt->kind = ALM_ROUTE_NONE;
    rt->scope = 0;
    rt->global = 0;
    rt->slug = NULL;
    rt->slug_len = 0;
    rt->chat = ALM_CHAT_NONE;

    if (path_len < 8 || path[0] != '/' || path[7] != '/') {
        return;
    }

    prefix.p = path + 1;
    prefix.len = 3;

    if (!alm_seg_is(&prefix, "api")) {
        return;
    }

    prefix.p = path + 5;
    prefix.len = 2;

    if (path[4] != '/' || !alm_seg_is(&prefix, "v1")) {
        return;
    }

    p = path + 8;
    len = path_len - 8;

    if (len > 0 && p[len - 1] == '/') {
        len--;
    }

    if (len == 0) {
        rt->kind = ALM_ROUTE_BAD;
        return;
    }

    /* split into segments; every segment must be a plain name */

    end = p + len;
    n = 0;

    for ( ;; ) {
        start = p;

        while (p < end && *p != '/') {
            c = (unsigned char) *p;

            if (c < 0x20 || c == 0x7f) {
                rt->kind = ALM_ROUTE_BAD;
                return;
            }

            p++;
        }

        i = p - start;

        if (i == 0 || (i == 1 && start[0] == '.')
            || (i == 2 && start[0] == '.' && start[1] == '.'))
        {
            rt->kind = ALM_ROUTE_BAD;
            return;
        }

        if (n < ALM_ROUTE_SEGS) {
            seg[n].p = start;
            seg[n].len = i;
        }

        n++;

        if (p == end) {
            break;
        }

        p++;
    }

    alm_route_table(rt, alm_route_method(method, method_len), seg, n);

    /*
     * A route that names no workspace acts on the whole instance, and
     * AnythingLLM's own OpenAI routes take the workspace from the body
     */

    if ((rt->kind == ALM_ROUTE_API && rt->slug == NULL)
        || rt->kind == ALM_ROUTE_OPENAI_PASS)
    {
        rt->global = 1;
    }
}


static int
alm_has_suffix(const char *p, size_t len, const char *suffix)
{
    size_t  n;

    n = strlen(suffix);

    return len >= n && memcmp(p + len - n, suffix, n) == 0;
}


alm_oai_route_e
alm_oai_route(const char *path, size_t path_len, const char **id,
    size_t *id_len)
{
    size_t  i;

    if (id) {
        *id = NULL;
        *id_len = 0;
    }

    if (alm_has_suffix(path, path_len, "/chat/completions")) {
        return ALM_OAI_CHAT;
    }

    if (alm_has_suffix(path, path_len, "/models")) {
        return ALM_OAI_MODELS;
    }

    /* ".../models/<id>": the id is the last segment, never empty */

    i = path_len;

    while (i > 0 && path[i - 1] != '/') {
        i--;
    }

    if (i == 0 || i == path_len || !alm_has_suffix(path, i - 1, "/models")) {
        return ALM_OAI_NONE;
    }

    if (id) {
        *id = path + i;
        *id_len = path_len - i;
    }

    return ALM_OAI_MODEL;
}
