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


typedef struct {
    const char        *method;
    const char        *path;
    alm_route_kind_e   kind;
    unsigned           scope;
    const char        *slug;
} route_case_t;


static const route_case_t  route_cases[] = {

    /* not under /api/v1/: not judged */
    { "GET", "/", NONE, 0, NULL },
    { "GET", "", NONE, 0, NULL },
    { "GET", "/api", NONE, 0, NULL },
    { "GET", "/api/v1", NONE, 0, NULL },
    { "GET", "/api/v2/workspaces", NONE, 0, NULL },
    { "GET", "/api/v1x/workspaces", NONE, 0, NULL },
    { "GET", "/apix/v1/workspaces", NONE, 0, NULL },
    { "GET", "/v1/models", NONE, 0, NULL },
    { "POST", "/v1/chat/completions", NONE, 0, NULL },
    { "GET", "/api/system/env", NONE, 0, NULL },
    { "GET", "api/v1/workspaces", NONE, 0, NULL },

    /* malformed */
    { "GET", "/api/v1/", BAD, 0, NULL },
    { "GET", "/api/v1//", BAD, 0, NULL },
    { "GET", "/api/v1//workspaces", BAD, 0, NULL },
    { "GET", "/api/v1/workspaces//", BAD, 0, NULL },
    { "POST", "/api/v1/workspace//chat", BAD, 0, NULL },
    { "POST", "/api/v1/workspace/a//chat", BAD, 0, NULL },
    { "GET", "/api/v1/workspace/../admin", BAD, 0, NULL },
    { "GET", "/api/v1/workspace/foo/../../admin/users", BAD, 0, NULL },
    { "GET", "/api/v1/..", BAD, 0, NULL },
    { "GET", "/api/v1/../v1/auth", BAD, 0, NULL },
    { "GET", "/api/v1/./workspaces", BAD, 0, NULL },
    { "POST", "/api/v1/workspace/./chat", BAD, 0, NULL },
    { "POST", "/api/v1/workspace/foo/./chat", BAD, 0, NULL },
    { "GET", "/api/v1/workspaces/.", BAD, 0, NULL },
    { "POST", "/api/v1/workspace/bad slug/chat", BAD, 0, NULL },
    { "POST", "/api/v1/workspace/a%2Fb/chat", BAD, 0, NULL },
    { "POST", "/api/v1/workspace/caf\xc3\xa9/chat", BAD, 0, NULL },
    { "GET", "/api/v1/workspace/a:b", BAD, 0, NULL },
    { "POST", "/api/v1/workspace/foo/thread/bad!/chat", BAD, 0, NULL },
    { "DELETE", "/api/v1/workspace/foo/thread/a b", BAD, 0, NULL },
    { "GET", "/api/v1/work\x01space", BAD, 0, NULL },
    { "GET", "/api/v1/documents/a\x7f", BAD, 0, NULL },

    /* auth */
    { "GET", "/api/v1/auth", AUTH, 0, NULL },
    { "HEAD", "/api/v1/auth", AUTH, 0, NULL },
    { "GET", "/api/v1/auth/", AUTH, 0, NULL },
    { "GET", "/API/V1/Auth", AUTH, 0, NULL },
    { "POST", "/api/v1/auth", API, ADMIN, NULL },
    { "GET", "/api/v1/auth/x", API, READ, NULL },

    /* the workspace list, filtered */
    { "GET", "/api/v1/workspaces", WSS, READ, NULL },
    { "HEAD", "/api/v1/workspaces", WSS, READ, NULL },
    { "GET", "/api/v1/workspaces/", WSS, READ, NULL },
    { "GET", "/Api/V1/WorkSpaces", WSS, READ, NULL },
    { "POST", "/api/v1/workspaces", API, ADMIN, NULL },

    /* AnythingLLM's own OpenAI routes */
    { "GET", "/api/v1/openai/models", PASS, CHAT, NULL },
    { "POST", "/api/v1/openai/chat/completions", PASS, CHAT, NULL },
    { "POST", "/api/v1/openai/embeddings", PASS, CHAT, NULL },
    { "GET", "/api/v1/openai", PASS, CHAT, NULL },
    { "GET", "/api/v1/OpenAI/models/", PASS, CHAT, NULL },
    { "GET", "/api/v1/openai/../admin", BAD, 0, NULL },

    /* chat */
    { "POST", "/api/v1/workspace/foo/chat", API, CHAT, "foo" },
    { "POST", "/api/v1/workspace/foo/stream-chat", API, CHAT, "foo" },
    { "POST", "/api/v1/workspace/foo/stream-chat/", API, CHAT, "foo" },
    { "POST", "/api/v1/workspace/foo/Stream-Chat", API, CHAT, "foo" },
    { "POST", "/api/v1/workspace/Foo.Bar_1-x/chat", API, CHAT,
      "Foo.Bar_1-x" },
    { "POST", "/api/v1/workspace/foo/thread/new", API, CHAT, "foo" },
    { "POST", "/api/v1/workspace/foo/thread/t-1/update", API, CHAT, "foo" },
    { "DELETE", "/api/v1/workspace/foo/thread/t-1", API, CHAT, "foo" },
    { "DELETE", "/api/v1/workspace/foo/thread/t-1/", API, CHAT, "foo" },
    { "POST", "/api/v1/workspace/foo/thread/t-1/chat", API, CHAT, "foo" },
    { "POST", "/api/v1/workspace/foo/thread/t-1/stream-chat", API, CHAT,
      "foo" },
    { "GET", "/api/v1/workspace/foo/chat", API, READ, "foo" },
    { "PUT", "/api/v1/workspace/foo/chat", API, ADMIN, "foo" },
    { "post", "/api/v1/workspace/foo/chat", API, ADMIN, "foo" },
    { "POST", "/api/v1/workspace/foo/chat/x", API, ADMIN, "foo" },
    { "POST", "/api/v1/workspace/foo/thread/t-1/chat/x", API, ADMIN, "foo" },
    { "POST", "/api/v1/workspace/foo/thread/t-1", API, ADMIN, "foo" },

    /* documents */
    { "POST", "/api/v1/document/upload", API, DOCS, NULL },
    { "POST", "/api/v1/document/upload/", API, DOCS, NULL },
    { "POST", "/api/v1/document/upload/custom-folder", API, DOCS, NULL },
    { "POST", "/api/v1/document/upload-link", API, DOCS, NULL },
    { "POST", "/api/v1/document/raw-text", API, DOCS, NULL },
    { "POST", "/api/v1/document/create-folder", API, DOCS, NULL },
    { "POST", "/api/v1/document/move-files", API, DOCS, NULL },
    { "DELETE", "/api/v1/document/remove-folder", API, DOCS, NULL },
    { "DELETE", "/api/v1/document/some-doc-id", API, DOCS, NULL },
    { "DELETE", "/api/v1/system/remove-documents", API, DOCS, NULL },
    { "POST", "/api/v1/workspace/foo/update-embeddings", API, DOCS, "foo" },
    { "POST", "/api/v1/workspace/foo/update-pin", API, DOCS, "foo" },
    { "POST", "/api/v1/document/upload/a/b", API, ADMIN, NULL },
    { "POST", "/api/v1/document/other", API, ADMIN, NULL },
    { "GET", "/api/v1/document/upload", API, READ, NULL },

    /* reads */
    { "GET", "/api/v1/documents", API, READ, NULL },
    { "GET", "/api/v1/documents/folder/custom-documents", API, READ, NULL },
    { "GET", "/api/v1/document/my file.json", API, READ, NULL },
    { "GET", "/api/v1/document/accepted-file-types", API, READ, NULL },
    { "GET", "/api/v1/workspace/foo", API, READ, "foo" },
    { "HEAD", "/api/v1/workspace/foo", API, READ, "foo" },
    { "GET", "/api/v1/workspace/foo/", API, READ, "foo" },
    { "GET", "/api/v1/workspace/foo/chats", API, READ, "foo" },
    { "GET", "/api/v1/workspace/foo/thread/t-1/chats", API, READ, "foo" },
    { "GET", "/api/v1/workspace/new", API, READ, "new" },
    { "POST", "/api/v1/workspace/foo/vector-search", API, READ, "foo" },
    { "GET", "/api/v1/system/vector-count", API, READ, NULL },
    { "GET", "/api/v1/workspace", API, READ, NULL },
    { "GET", "/api/v1/something/else", API, READ, NULL },
    { "GET", "/api/v1/a/b/c/d/e/f/g/h/i/j", API, READ, NULL },
    { "GET", "/api/v1/workspace/foo/a/b/c/d/e/f/g/h", API, READ, "foo" },

    /* admin */
    { "POST", "/api/v1/workspace/new", API, ADMIN, NULL },
    { "POST", "/api/v1/workspace/foo/update", API, ADMIN, "foo" },
    { "DELETE", "/api/v1/workspace/foo", API, ADMIN, "foo" },
    { "DELETE", "/api/v1/workspace/foo/chats", API, ADMIN, "foo" },
    { "POST", "/api/v1/workspace/foo", API, ADMIN, "foo" },
    { "GET", "/api/v1/admin/users", API, ADMIN, NULL },
    { "GET", "/api/v1/admin/is-multi-user-mode", API, ADMIN, NULL },
    { "POST", "/api/v1/admin/users/new", API, ADMIN, NULL },
    { "GET", "/api/v1/admin/workspaces/foo/users", API, ADMIN, NULL },
    { "GET", "/api/v1/users", API, ADMIN, NULL },
    { "GET", "/api/v1/users/1/issue-auth-token", API, ADMIN, NULL },
    { "GET", "/api/v1/embed", API, ADMIN, NULL },
    { "GET", "/api/v1/embed/abc/chats", API, ADMIN, NULL },
    { "GET", "/api/v1/system", API, ADMIN, NULL },
    { "GET", "/api/v1/system/env-dump", API, ADMIN, NULL },
    { "GET", "/api/v1/system/export-chats", API, ADMIN, NULL },
    { "POST", "/api/v1/system/update-env", API, ADMIN, NULL },
    { "DELETE", "/api/v1/workspaces", API, ADMIN, NULL },
    { "OPTIONS", "/api/v1/workspaces", API, ADMIN, NULL },
    { "PATCH", "/api/v1/something", API, ADMIN, NULL },
    { "GETX", "/api/v1/documents", API, ADMIN, NULL },
    { "", "/api/v1/documents", API, ADMIN, NULL },
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
            || (c->slug == NULL && rt.slug != NULL)
            || (c->slug != NULL
                && (rt.slug == NULL || rt.slug_len != strlen(c->slug)
                    || memcmp(rt.slug, c->slug, rt.slug_len) != 0)))
        {
            print_error("%s %s: kind %d scope %u slug \"%.*s\", expected "
                        "kind %d scope %u slug \"%s\"\n", c->method, c->path,
                        (int) rt.kind, rt.scope,
                        rt.slug ? (int) rt.slug_len : 0,
                        rt.slug ? rt.slug : "", (int) c->kind, c->scope,
                        c->slug ? c->slug : "");
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


int
main(void)
{
    const struct CMUnitTest  tests[] = {
        cmocka_unit_test(test_route_table),
        cmocka_unit_test(test_route_long_slug),
        cmocka_unit_test(test_route_length_bound),
        cmocka_unit_test(test_oai_route),
    };

    return cmocka_run_group_tests_name("route", tests, NULL, NULL);
}
