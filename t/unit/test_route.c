/*
 * Copyright (C) ngx_anythingllm authors
 *
 * The route table of alm_route_classify() and alm_oai_route().
 */


#include "test_common.h"


#define NONE   ALM_ROUTE_NONE
#define BAD    ALM_ROUTE_BAD
#define AUTH   ALM_ROUTE_AUTH
#define WSS    ALM_ROUTE_WORKSPACES
#define API    ALM_ROUTE_API
#define PASS   ALM_ROUTE_OPENAI_PASS

#define CHAT   ALM_SCOPE_CHAT
#define READ   ALM_SCOPE_READ
#define DOCS   ALM_SCOPE_DOCUMENTS
#define ADMIN  ALM_SCOPE_ADMIN

/* the route needs a key whose workspaces is "*" */
#define STAR   1


typedef struct {
    const char        *method;
    const char        *path;
    alm_route_kind_e   kind;
    unsigned           scope;
    const char        *slug;
    unsigned           global;
} route_case_t;


static const route_case_t  route_cases[] = {

    /* not under /api/v1/: not judged */
    { "GET", "/", NONE, 0, NULL, 0 },
    { "GET", "", NONE, 0, NULL, 0 },
    { "GET", "/api", NONE, 0, NULL, 0 },
    { "GET", "/api/v1", NONE, 0, NULL, 0 },
    { "GET", "/api/v2/workspaces", NONE, 0, NULL, 0 },
    { "GET", "/api/v1x/workspaces", NONE, 0, NULL, 0 },
    { "GET", "/apix/v1/workspaces", NONE, 0, NULL, 0 },
    { "GET", "/v1/models", NONE, 0, NULL, 0 },
    { "POST", "/v1/chat/completions", NONE, 0, NULL, 0 },
    { "GET", "/api/system/env", NONE, 0, NULL, 0 },
    { "GET", "api/v1/workspaces", NONE, 0, NULL, 0 },

    /* malformed */
    { "GET", "/api/v1/", BAD, 0, NULL, 0 },
    { "GET", "/api/v1//", BAD, 0, NULL, 0 },
    { "GET", "/api/v1//workspaces", BAD, 0, NULL, 0 },
    { "GET", "/api/v1/workspaces//", BAD, 0, NULL, 0 },
    { "POST", "/api/v1/workspace//chat", BAD, 0, NULL, 0 },
    { "POST", "/api/v1/workspace/a//chat", BAD, 0, NULL, 0 },
    { "GET", "/api/v1/workspace/../admin", BAD, 0, NULL, 0 },
    { "GET", "/api/v1/workspace/foo/../../admin/users", BAD, 0, NULL, 0 },
    { "GET", "/api/v1/..", BAD, 0, NULL, 0 },
    { "GET", "/api/v1/../v1/auth", BAD, 0, NULL, 0 },
    { "GET", "/api/v1/./workspaces", BAD, 0, NULL, 0 },
    { "POST", "/api/v1/workspace/./chat", BAD, 0, NULL, 0 },
    { "POST", "/api/v1/workspace/foo/./chat", BAD, 0, NULL, 0 },
    { "GET", "/api/v1/workspaces/.", BAD, 0, NULL, 0 },
    { "POST", "/api/v1/workspace/bad slug/chat", BAD, 0, NULL, 0 },
    { "POST", "/api/v1/workspace/a%2Fb/chat", BAD, 0, NULL, 0 },
    { "POST", "/api/v1/workspace/caf\xc3\xa9/chat", BAD, 0, NULL, 0 },
    { "GET", "/api/v1/workspace/a:b", BAD, 0, NULL, 0 },
    { "POST", "/api/v1/workspace/foo/thread/bad!/chat", BAD, 0, NULL, 0 },
    { "DELETE", "/api/v1/workspace/foo/thread/a b", BAD, 0, NULL, 0 },
    { "GET", "/api/v1/work\x01space", BAD, 0, NULL, 0 },
    { "GET", "/api/v1/documents/a\x7f", BAD, 0, NULL, 0 },

    /* auth */
    { "GET", "/api/v1/auth", AUTH, 0, NULL, 0 },
    { "HEAD", "/api/v1/auth", AUTH, 0, NULL, 0 },
    { "GET", "/api/v1/auth/", AUTH, 0, NULL, 0 },
    { "GET", "/API/V1/Auth", AUTH, 0, NULL, 0 },
    { "POST", "/api/v1/auth", API, ADMIN, NULL, STAR },
    { "GET", "/api/v1/auth/x", API, READ, NULL, STAR },

    /* the workspace list, filtered */
    { "GET", "/api/v1/workspaces", WSS, READ, NULL, 0 },
    { "HEAD", "/api/v1/workspaces", WSS, READ, NULL, 0 },
    { "GET", "/api/v1/workspaces/", WSS, READ, NULL, 0 },
    { "GET", "/Api/V1/WorkSpaces", WSS, READ, NULL, 0 },
    { "POST", "/api/v1/workspaces", API, ADMIN, NULL, STAR },

    /* AnythingLLM's own OpenAI routes */
    { "GET", "/api/v1/openai/models", PASS, CHAT, NULL, STAR },
    { "POST", "/api/v1/openai/chat/completions", PASS, CHAT, NULL, STAR },
    { "POST", "/api/v1/openai/embeddings", PASS, CHAT, NULL, STAR },
    { "GET", "/api/v1/openai", PASS, CHAT, NULL, STAR },
    { "GET", "/api/v1/OpenAI/models/", PASS, CHAT, NULL, STAR },
    { "GET", "/api/v1/openai/../admin", BAD, 0, NULL, 0 },

    /* chat */
    { "POST", "/api/v1/workspace/foo/chat", API, CHAT, "foo", 0 },
    { "POST", "/api/v1/workspace/foo/stream-chat", API, CHAT, "foo", 0 },
    { "POST", "/api/v1/workspace/foo/stream-chat/", API, CHAT, "foo", 0 },
    { "POST", "/api/v1/workspace/foo/Stream-Chat", API, CHAT, "foo", 0 },
    { "POST", "/api/v1/workspace/Foo.Bar_1-x/chat", API, CHAT,
      "Foo.Bar_1-x", 0 },
    { "POST", "/api/v1/workspace/foo/thread/new", API, CHAT, "foo", 0 },
    { "POST", "/api/v1/workspace/foo/thread/t-1/update", API, CHAT, "foo", 0 },
    { "DELETE", "/api/v1/workspace/foo/thread/t-1", API, CHAT, "foo", 0 },
    { "DELETE", "/api/v1/workspace/foo/thread/t-1/", API, CHAT, "foo", 0 },
    { "POST", "/api/v1/workspace/foo/thread/t-1/chat", API, CHAT, "foo", 0 },
    { "POST", "/api/v1/workspace/foo/thread/t-1/stream-chat", API, CHAT,
      "foo", 0 },
    { "GET", "/api/v1/workspace/foo/chat", API, READ, "foo", 0 },
    { "PUT", "/api/v1/workspace/foo/chat", API, ADMIN, "foo", 0 },
    { "post", "/api/v1/workspace/foo/chat", API, ADMIN, "foo", 0 },
    { "POST", "/api/v1/workspace/foo/chat/x", API, ADMIN, "foo", 0 },
    { "POST", "/api/v1/workspace/foo/thread/t-1/chat/x", API, ADMIN, "foo",
      0 },
    { "POST", "/api/v1/workspace/foo/thread/t-1", API, ADMIN, "foo", 0 },

    /* documents */
    { "POST", "/api/v1/document/upload", API, DOCS, NULL, STAR },
    { "POST", "/api/v1/document/upload/", API, DOCS, NULL, STAR },
    { "POST", "/api/v1/document/upload/custom-folder", API, DOCS, NULL,
      STAR },
    { "POST", "/api/v1/document/upload-link", API, DOCS, NULL, STAR },
    { "POST", "/api/v1/document/raw-text", API, DOCS, NULL, STAR },
    { "POST", "/api/v1/document/create-folder", API, DOCS, NULL, STAR },
    { "POST", "/api/v1/document/move-files", API, DOCS, NULL, STAR },
    { "DELETE", "/api/v1/document/remove-folder", API, DOCS, NULL, STAR },
    { "DELETE", "/api/v1/document/some-doc-id", API, DOCS, NULL, STAR },
    { "DELETE", "/api/v1/system/remove-documents", API, DOCS, NULL, STAR },

    /*
     * update-embeddings "adds" documents of the shared store by path:
     * only for a key allowed every workspace.  update-pin pins a
     * document already in the workspace: the slug is enough.
     */
    { "POST", "/api/v1/workspace/foo/update-embeddings", API, DOCS, "foo",
      STAR },
    { "POST", "/api/v1/workspace/foo/update-embeddings/", API, DOCS, "foo",
      STAR },
    { "POST", "/api/v1/Workspace/foo/Update-Embeddings", API, DOCS, "foo",
      STAR },
    { "POST", "/api/v1/workspace/foo/update-pin", API, DOCS, "foo", 0 },
    { "POST", "/api/v1/workspace/foo/UPDATE-PIN/", API, DOCS, "foo", 0 },
    { "GET", "/api/v1/workspace/foo/update-embeddings", API, READ, "foo", 0 },
    { "POST", "/api/v1/workspace/foo/update-embeddings/x", API, ADMIN, "foo",
      0 },
    { "POST", "/api/v1/workspace/../update-embeddings", BAD, 0, NULL, 0 },

    { "POST", "/api/v1/document/upload/a/b", API, ADMIN, NULL, STAR },
    { "POST", "/api/v1/document/other", API, ADMIN, NULL, STAR },
    { "GET", "/api/v1/document/upload", API, READ, NULL, STAR },

    /* reads */
    { "GET", "/api/v1/documents", API, READ, NULL, STAR },
    { "GET", "/api/v1/documents/folder/custom-documents", API, READ, NULL,
      STAR },
    { "GET", "/api/v1/document/my file.json", API, READ, NULL, STAR },
    { "GET", "/api/v1/document/accepted-file-types", API, READ, NULL, STAR },
    { "GET", "/api/v1/workspace/foo", API, READ, "foo", 0 },
    { "HEAD", "/api/v1/workspace/foo", API, READ, "foo", 0 },
    { "GET", "/api/v1/workspace/foo/", API, READ, "foo", 0 },
    { "GET", "/api/v1/workspace/foo/chats", API, READ, "foo", 0 },
    { "GET", "/api/v1/workspace/foo/thread/t-1/chats", API, READ, "foo", 0 },
    { "GET", "/api/v1/workspace/new", API, READ, "new", 0 },
    { "POST", "/api/v1/workspace/foo/vector-search", API, READ, "foo", 0 },
    { "GET", "/api/v1/system/vector-count", API, READ, NULL, STAR },
    { "GET", "/api/v1/workspace", API, READ, NULL, STAR },
    { "GET", "/api/v1/something/else", API, READ, NULL, STAR },
    { "GET", "/api/v1/a/b/c/d/e/f/g/h/i/j", API, READ, NULL, STAR },
    { "GET", "/api/v1/workspace/foo/a/b/c/d/e/f/g/h", API, READ, "foo", 0 },

    /* admin */
    { "POST", "/api/v1/workspace/new", API, ADMIN, NULL, STAR },
    { "POST", "/api/v1/workspace/foo/update", API, ADMIN, "foo", 0 },
    { "DELETE", "/api/v1/workspace/foo", API, ADMIN, "foo", 0 },
    { "DELETE", "/api/v1/workspace/foo/chats", API, ADMIN, "foo", 0 },
    { "POST", "/api/v1/workspace/foo", API, ADMIN, "foo", 0 },
    { "GET", "/api/v1/admin/users", API, ADMIN, NULL, STAR },
    { "GET", "/api/v1/admin/is-multi-user-mode", API, ADMIN, NULL, STAR },
    { "POST", "/api/v1/admin/users/new", API, ADMIN, NULL, STAR },
    { "GET", "/api/v1/admin/workspaces/foo/users", API, ADMIN, NULL, STAR },
    { "GET", "/api/v1/users", API, ADMIN, NULL, STAR },
    { "GET", "/api/v1/users/1/issue-auth-token", API, ADMIN, NULL, STAR },
    { "GET", "/api/v1/embed", API, ADMIN, NULL, STAR },
    { "GET", "/api/v1/embed/abc/chats", API, ADMIN, NULL, STAR },
    { "GET", "/api/v1/system", API, ADMIN, NULL, STAR },
    { "GET", "/api/v1/system/env-dump", API, ADMIN, NULL, STAR },
    { "GET", "/api/v1/system/export-chats", API, ADMIN, NULL, STAR },
    { "POST", "/api/v1/system/update-env", API, ADMIN, NULL, STAR },
    { "DELETE", "/api/v1/workspaces", API, ADMIN, NULL, STAR },
    { "OPTIONS", "/api/v1/workspaces", API, ADMIN, NULL, STAR },
    { "PATCH", "/api/v1/something", API, ADMIN, NULL, STAR },
    { "GETX", "/api/v1/documents", API, ADMIN, NULL, STAR },
    { "", "/api/v1/documents", API, ADMIN, NULL, STAR },
};


static void
test_route_table(void **state)
{
    size_t              i, failures;
    alm_route_t         rt;
    const route_case_t  *c;

    (void) state;

    failures = 0;

    for (i = 0; i < sizeof(route_cases) / sizeof(route_cases[0]); i++) {
        c = &route_cases[i];

        memset(&rt, 0x5a, sizeof(rt));
        alm_route_classify(c->method, strlen(c->method), c->path,
                           strlen(c->path), &rt);

        if (rt.kind != c->kind || rt.scope != c->scope
            || rt.global != c->global
            || (c->slug == NULL && rt.slug != NULL)
            || (c->slug != NULL
                && (rt.slug == NULL || rt.slug_len != strlen(c->slug)
                    || memcmp(rt.slug, c->slug, rt.slug_len) != 0)))
        {
            print_error("%s %s: kind %d scope %u global %u slug \"%.*s\", "
                        "expected kind %d scope %u global %u slug \"%s\"\n",
                        c->method, c->path, (int) rt.kind, rt.scope,
                        rt.global, rt.slug ? (int) rt.slug_len : 0,
                        rt.slug ? rt.slug : "", (int) c->kind, c->scope,
                        c->global, c->slug ? c->slug : "");
            failures++;
        }

        /* the slug points into the path */
        if (rt.slug) {
            assert_true(rt.slug >= c->path
                        && rt.slug + rt.slug_len <= c->path
                                                    + strlen(c->path));
        }
    }

    assert_int_equal(failures, 0);
}


static void
test_route_long_slug(void **state)
{
    char         path[600];
    alm_route_t  rt;
    int          n;

    (void) state;

    n = snprintf(path, sizeof(path), "/api/v1/workspace/%0*d/chat",
                 ALM_SLUG_MAX, 0);
    alm_route_classify(S("POST"), path, n, &rt);
    assert_int_equal(rt.kind, API);
    assert_int_equal(rt.slug_len, ALM_SLUG_MAX);

    n = snprintf(path, sizeof(path), "/api/v1/workspace/%0*d/chat",
                 ALM_SLUG_MAX + 1, 0);
    alm_route_classify(S("POST"), path, n, &rt);
    assert_int_equal(rt.kind, BAD);
}


static void
test_route_length_bound(void **state)
{
    alm_route_t  rt;

    (void) state;

    /* only path_len bytes are looked at */
    alm_route_classify(S("GET"), "/api/v1/workspacesXYZ", 18, &rt);
    assert_int_equal(rt.kind, WSS);

    alm_route_classify(S("POST"), "/api/v1/workspace/foo/chat/../x", 26,
                       &rt);
    assert_int_equal(rt.kind, API);
    assert_int_equal(rt.scope, CHAT);
}


typedef struct {
    const char       *path;
    alm_oai_route_e   route;
    const char       *id;
} oai_case_t;


static const oai_case_t  oai_cases[] = {
    { "/v1/models", ALM_OAI_MODELS, NULL },
    { "/openai/v1/models", ALM_OAI_MODELS, NULL },
    { "/models", ALM_OAI_MODELS, NULL },
    { "/v1/models/my-ws", ALM_OAI_MODEL, "my-ws" },
    { "/x/models/models", ALM_OAI_MODELS, NULL },
    { "/v1/models/a.b", ALM_OAI_MODEL, "a.b" },
    { "/v1/chat/completions", ALM_OAI_CHAT, NULL },
    { "/chat/completions", ALM_OAI_CHAT, NULL },
    { "/v1/models/", ALM_OAI_NONE, NULL },
    { "/v1/models/a/b", ALM_OAI_NONE, NULL },
    { "/v1/xmodels/a", ALM_OAI_NONE, NULL },
    { "/v1/mymodels", ALM_OAI_NONE, NULL },
    { "/v1/chat/completions/", ALM_OAI_NONE, NULL },
    { "/v1/completions", ALM_OAI_NONE, NULL },
    { "/v1/embeddings", ALM_OAI_NONE, NULL },
    { "models/x", ALM_OAI_NONE, NULL },
    { "", ALM_OAI_NONE, NULL },
    { "/", ALM_OAI_NONE, NULL },
};


static void
test_oai_route(void **state)
{
    size_t             i, id_len;
    const char        *id;
    alm_oai_route_e    r;
    const oai_case_t  *c;

    (void) state;

    for (i = 0; i < sizeof(oai_cases) / sizeof(oai_cases[0]); i++) {
        c = &oai_cases[i];

        r = alm_oai_route(c->path, strlen(c->path), &id, &id_len);

        if (r != c->route) {
            print_error("%s: route %d, expected %d\n", c->path, (int) r,
                        (int) c->route);
            fail();
        }

        if (c->id) {
            assert_int_equal(id_len, strlen(c->id));
            assert_memory_equal(id, c->id, id_len);

        } else {
            assert_null(id);
        }
    }

    assert_int_equal(alm_oai_route(S("/v1/models/x"), NULL, NULL),
                     ALM_OAI_MODEL);
}


/* the native chat calls, whose usage is read as they pass */

static void
test_route_chat_calls(void **state)
{
    size_t       i;
    alm_route_t  rt;

    static const struct {
        const char  *method;
        const char  *path;
        unsigned     chat;
    } cases[] = {
        { "POST", "/api/v1/workspace/foo/chat", ALM_CHAT_WHOLE },
        { "POST", "/api/v1/Workspace/foo/Chat/", ALM_CHAT_WHOLE },
        { "POST", "/api/v1/workspace/foo/stream-chat", ALM_CHAT_STREAM },
        { "POST", "/api/v1/workspace/foo/thread/t-1/chat", ALM_CHAT_WHOLE },
        { "POST", "/api/v1/workspace/foo/thread/t-1/stream-chat",
          ALM_CHAT_STREAM },
        { "POST", "/api/v1/workspace/foo/thread/new", ALM_CHAT_NONE },
        { "POST", "/api/v1/workspace/foo/thread/t-1/update", ALM_CHAT_NONE },
        { "DELETE", "/api/v1/workspace/foo/thread/t-1", ALM_CHAT_NONE },
        { "GET", "/api/v1/workspace/foo/chat", ALM_CHAT_NONE },
        { "POST", "/api/v1/workspace/foo/chats", ALM_CHAT_NONE },
        { "POST", "/api/v1/workspace/f o/chat", ALM_CHAT_NONE },
        { "POST", "/api/v1/openai/chat/completions", ALM_CHAT_NONE },
        { "GET", "/api/v1/auth", ALM_CHAT_NONE },
    };

    (void) state;

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        alm_route_classify(cases[i].method, strlen(cases[i].method),
                           cases[i].path, strlen(cases[i].path), &rt);

        if (rt.chat != cases[i].chat) {
            fail_msg("%s %s: chat %u, want %u", cases[i].method,
                     cases[i].path, rt.chat, cases[i].chat);
        }
    }
}


int
main(void)
{
    const struct CMUnitTest  tests[] = {
        cmocka_unit_test(test_route_table),
        cmocka_unit_test(test_route_long_slug),
        cmocka_unit_test(test_route_length_bound),
        cmocka_unit_test(test_oai_route),
        cmocka_unit_test(test_route_chat_calls),
    };

    return cmocka_run_group_tests_name("route", tests, NULL, NULL);
}
