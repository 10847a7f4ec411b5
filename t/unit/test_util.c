/*
 * Copyright (C) ngx_anythingllm authors
 *
 * Slugs, scopes, workspace lists, digests, escaping and error bodies.
 */


#include "test_common.h"


static void
test_slug_valid(void **state)
{
    char  big[ALM_SLUG_MAX + 2];

    (void) state;

    assert_true(alm_slug_valid(S("my-workspace")));
    assert_true(alm_slug_valid(S("A_b.c-9")));
    assert_true(alm_slug_valid(S("...")));
    assert_false(alm_slug_valid(S("")));
    assert_false(alm_slug_valid(S("a b")));
    assert_false(alm_slug_valid(S("a/b")));
    assert_false(alm_slug_valid(S("a%2Fb")));
    assert_false(alm_slug_valid(S("caf\xc3\xa9")));
    assert_false(alm_slug_valid("a\0b", 3));

    memset(big, 'a', sizeof(big));
    assert_true(alm_slug_valid(big, ALM_SLUG_MAX));
    assert_false(alm_slug_valid(big, ALM_SLUG_MAX + 1));
}


static void
test_scopes(void **state)
{
    (void) state;

    assert_int_equal(alm_scopes_parse(S("")), 0);
    assert_int_equal(alm_scopes_parse(NULL, 0), 0);
    assert_int_equal(alm_scopes_parse(S("chat")), ALM_SCOPE_CHAT);
    assert_int_equal(alm_scopes_parse(S("chat,read")),
                     ALM_SCOPE_CHAT | ALM_SCOPE_READ);
    assert_int_equal(alm_scopes_parse(S(" chat , documents ,admin ")),
                     ALM_SCOPE_CHAT | ALM_SCOPE_DOCUMENTS | ALM_SCOPE_ADMIN);
    assert_int_equal(alm_scopes_parse(S("read admin")),
                     ALM_SCOPE_READ | ALM_SCOPE_ADMIN);
    assert_int_equal(alm_scopes_parse(S("CHAT,Read")),
                     ALM_SCOPE_CHAT | ALM_SCOPE_READ);
    assert_int_equal(alm_scopes_parse(S("chatty,reader,,x")), 0);
    assert_int_equal(alm_scopes_parse(S("chat,bogus,read")),
                     ALM_SCOPE_CHAT | ALM_SCOPE_READ);
    /* the length bounds the list */
    assert_int_equal(alm_scopes_parse("chat,read", 4), ALM_SCOPE_CHAT);
}


static void
test_workspaces_kind(void **state)
{
    char  big[ALM_SLUG_MAX + 3];

    (void) state;

    assert_int_equal(alm_workspaces_kind(S("*")), ALM_WS_ALL);
    assert_int_equal(alm_workspaces_kind(S(" * ")), ALM_WS_ALL);
    assert_int_equal(alm_workspaces_kind(S("\t*\r\n")), ALM_WS_ALL);
    assert_int_equal(alm_workspaces_kind(S("a")), ALM_WS_LIST);
    assert_int_equal(alm_workspaces_kind(S("a,b,c")), ALM_WS_LIST);
    assert_int_equal(alm_workspaces_kind(S(" a , b ")), ALM_WS_LIST);
    assert_int_equal(alm_workspaces_kind(S("A_b.c-9,...")), ALM_WS_LIST);
    assert_int_equal(alm_workspaces_kind(S("")), ALM_WS_NONE);
    assert_int_equal(alm_workspaces_kind(S("  ")), ALM_WS_NONE);
    assert_int_equal(alm_workspaces_kind(NULL, 0), ALM_WS_NONE);

    /* "*" mixed with slugs: neither every workspace nor a list */
    assert_int_equal(alm_workspaces_kind(S("alpha,*")), ALM_WS_INVALID);
    assert_int_equal(alm_workspaces_kind(S("*,alpha")), ALM_WS_INVALID);
    assert_int_equal(alm_workspaces_kind(S("*,*")), ALM_WS_INVALID);
    assert_int_equal(alm_workspaces_kind(S("**")), ALM_WS_INVALID);
    assert_int_equal(alm_workspaces_kind(S("a*")), ALM_WS_INVALID);

    /* values that do not parse */
    assert_int_equal(alm_workspaces_kind(S(",")), ALM_WS_INVALID);
    assert_int_equal(alm_workspaces_kind(S(" , ")), ALM_WS_INVALID);
    assert_int_equal(alm_workspaces_kind(S("a,")), ALM_WS_INVALID);
    assert_int_equal(alm_workspaces_kind(S(",a")), ALM_WS_INVALID);
    assert_int_equal(alm_workspaces_kind(S("a,,b")), ALM_WS_INVALID);
    assert_int_equal(alm_workspaces_kind(S("a b")), ALM_WS_INVALID);
    assert_int_equal(alm_workspaces_kind(S("a;b")), ALM_WS_INVALID);
    assert_int_equal(alm_workspaces_kind(S("a/b")), ALM_WS_INVALID);
    assert_int_equal(alm_workspaces_kind(S(".")), ALM_WS_INVALID);
    assert_int_equal(alm_workspaces_kind(S("a,..")), ALM_WS_INVALID);
    assert_int_equal(alm_workspaces_kind(S("caf\xc3\xa9")), ALM_WS_INVALID);
    assert_int_equal(alm_workspaces_kind("a\0b", 3), ALM_WS_INVALID);

    memset(big, 'a', sizeof(big));
    assert_int_equal(alm_workspaces_kind(big, ALM_SLUG_MAX), ALM_WS_LIST);
    assert_int_equal(alm_workspaces_kind(big, ALM_SLUG_MAX + 1),
                     ALM_WS_INVALID);

    /* the length bounds the value */
    assert_int_equal(alm_workspaces_kind("*,a", 1), ALM_WS_ALL);
    assert_int_equal(alm_workspaces_kind("a,*", 1), ALM_WS_LIST);
}


static void
test_workspace_allowed(void **state)
{
    (void) state;

    assert_true(alm_workspace_allowed(S("*"), S("anything")));
    assert_true(alm_workspace_allowed(S(" * "), S("anything")));
    assert_true(alm_workspace_allowed(S("a,b,c"), S("b")));
    assert_true(alm_workspace_allowed(S(" a , b "), S("b")));
    assert_true(alm_workspace_allowed(S("a,b"), S("a")));
    assert_false(alm_workspace_allowed(S("a,b"), S("c")));
    assert_false(alm_workspace_allowed(S("ab"), S("a")));
    assert_false(alm_workspace_allowed(S("a"), S("ab")));
    assert_false(alm_workspace_allowed(S("A"), S("a")));
    assert_false(alm_workspace_allowed(S(""), S("a")));
    assert_false(alm_workspace_allowed(S(" , "), S("a")));
    assert_false(alm_workspace_allowed(S("*"), S("")));
    assert_false(alm_workspace_allowed(S("**"), S("a")));
    assert_false(alm_workspace_allowed(NULL, 0, S("a")));

    /* an invalid list allows nothing, not even its own slugs */
    assert_false(alm_workspace_allowed(S("a,*"), S("zzz")));
    assert_false(alm_workspace_allowed(S("a,*"), S("a")));
    assert_false(alm_workspace_allowed(S("*,a"), S("a")));
    assert_false(alm_workspace_allowed(S("a,,b"), S("a")));
    assert_false(alm_workspace_allowed(S("a,b/c"), S("a")));
}


#define P(lit)  { lit, sizeof(lit) - 1 }


static void
test_key_record(void **state)
{
    alm_key_record_t  rec;

    (void) state;

    /* a whole record */
    {
        const alm_str_t  kv[] = {
            P("name"), P("ci bot"), P("scopes"), P("chat,read"),
            P("workspaces"), P("sales, support"), P("rpm"), P("60"),
            P("expires"), P("1893456000"), P("disabled"), P("0"),
            P("created"), P("1700000000")
        };

        assert_int_equal(alm_key_record_parse(kv, 14, &rec), ALM_OK);
        assert_int_equal(rec.name.len, 6);
        assert_memory_equal(rec.name.data, "ci bot", 6);
        assert_int_equal(rec.workspaces.len, 14);
        assert_memory_equal(rec.workspaces.data, "sales, support", 14);
        assert_int_equal(rec.scopes, ALM_SCOPE_CHAT | ALM_SCOPE_READ);
        assert_int_equal(rec.rpm, 60);
        assert_int_equal(rec.expires, 1893456000);
        assert_int_equal(rec.disabled, 0);
        assert_int_equal(rec.malformed, 0);
    }

    /* nothing: no name, no scope, no workspace, no limit, never, enabled */
    assert_int_equal(alm_key_record_parse(NULL, 0, &rec), ALM_OK);
    assert_non_null(rec.name.data);
    assert_int_equal(rec.name.len, 0);
    assert_int_equal(rec.workspaces.len, 0);
    assert_int_equal(rec.scopes, 0);
    assert_int_equal(rec.rpm, 0);
    assert_int_equal(rec.expires, 0);
    assert_int_equal(rec.disabled, 0);

    /* disabled: empty or "0" is enabled */
    {
        const alm_str_t  on[] = { P("disabled"), P("1") };
        const alm_str_t  yes[] = { P("disabled"), P("yes") };
        const alm_str_t  off[] = { P("disabled"), P("") };
        const alm_str_t  zero2[] = { P("disabled"), P("00") };

        assert_int_equal(alm_key_record_parse(on, 2, &rec), ALM_OK);
        assert_int_equal(rec.disabled, 1);
        assert_int_equal(alm_key_record_parse(yes, 2, &rec), ALM_OK);
        assert_int_equal(rec.disabled, 1);
        assert_int_equal(alm_key_record_parse(off, 2, &rec), ALM_OK);
        assert_int_equal(rec.disabled, 0);
        assert_int_equal(alm_key_record_parse(zero2, 2, &rec), ALM_OK);
        assert_int_equal(rec.disabled, 1);
    }

    /* numbers: digits only, empty is 0, up to INT64_MAX */
    {
        const alm_str_t  empty[] = { P("rpm"), P(""), P("expires"), P("") };
        const alm_str_t  max[] = { P("rpm"), P("9223372036854775807") };
        const alm_str_t  over[] = { P("rpm"), P("9223372036854775808") };
        const alm_str_t  neg[] = { P("rpm"), P("-1") };
        const alm_str_t  plus[] = { P("expires"), P("+5") };
        const alm_str_t  blank[] = { P("rpm"), P(" 5") };
        const alm_str_t  word[] = { P("expires"), P("never") };

        assert_int_equal(alm_key_record_parse(empty, 4, &rec), ALM_OK);
        assert_int_equal(rec.rpm, 0);
        assert_int_equal(rec.expires, 0);

        assert_int_equal(alm_key_record_parse(max, 2, &rec), ALM_OK);
        assert_true(rec.rpm == INT64_MAX);

        assert_int_equal(alm_key_record_parse(over, 2, &rec), ALM_ERROR);
        assert_int_equal(rec.malformed, ALM_KEYREC_RPM);
        assert_int_equal(rec.disabled, 1);

        assert_int_equal(alm_key_record_parse(neg, 2, &rec), ALM_ERROR);
        assert_int_equal(rec.malformed, ALM_KEYREC_RPM);
        assert_int_equal(alm_key_record_parse(blank, 2, &rec), ALM_ERROR);
        assert_int_equal(alm_key_record_parse(plus, 2, &rec), ALM_ERROR);
        assert_int_equal(rec.malformed, ALM_KEYREC_EXPIRES);
        assert_int_equal(alm_key_record_parse(word, 2, &rec), ALM_ERROR);
        assert_int_equal(rec.disabled, 1);
    }

    /* workspaces judged by alm_workspaces_kind() */
    {
        const alm_str_t  mixed[] = { P("workspaces"), P("alpha,*") };
        const alm_str_t  star[] = { P("workspaces"), P(" * ") };
        const alm_str_t  bad[] = { P("workspaces"), P("a,,b"), P("rpm"),
                                   P("x") };

        assert_int_equal(alm_key_record_parse(mixed, 2, &rec), ALM_ERROR);
        assert_int_equal(rec.malformed, ALM_KEYREC_WORKSPACES);
        assert_int_equal(rec.disabled, 1);

        assert_int_equal(alm_key_record_parse(star, 2, &rec), ALM_OK);
        assert_int_equal(alm_workspaces_kind(rec.workspaces.data,
                                             rec.workspaces.len),
                         ALM_WS_ALL);

        assert_int_equal(alm_key_record_parse(bad, 4, &rec), ALM_ERROR);
        assert_int_equal(rec.malformed,
                         ALM_KEYREC_WORKSPACES | ALM_KEYREC_RPM);
    }

    /* non-string entries, an odd count, a repeated field, case matters */
    {
        const alm_str_t  kv[] = {
            { NULL, 0 }, P("ignored"), P("scopes"), { NULL, 0 },
            P("rpm"), P("bad"), P("rpm"), P("7"),
            P("Scopes"), P("admin"), P("name"), P("a"), P("name"), P("b"),
            P("scopes")
        };

        assert_int_equal(alm_key_record_parse(kv, 15, &rec), ALM_OK);
        assert_int_equal(rec.scopes, 0);
        assert_int_equal(rec.rpm, 7);
        assert_int_equal(rec.name.len, 1);
        assert_memory_equal(rec.name.data, "b", 1);
    }

    /* the lengths bound every string */
    {
        const alm_str_t  kv[] = {
            { "rpmx", 3 }, { "12x", 2 }, { "workspacesX", 10 }, { "*,a", 1 }
        };

        assert_int_equal(alm_key_record_parse(kv, 4, &rec), ALM_OK);
        assert_int_equal(rec.rpm, 12);
        assert_int_equal(rec.workspaces.len, 1);
    }
}


static void
test_digest(void **state)
{
    char           hex[ALM_DIGEST_HEX_LEN];
    unsigned char  bin[3] = { 0x00, 0xab, 0xff };

    (void) state;

    alm_key_digest(S("abc"), hex);
    assert_memory_equal(hex, "ba7816bf8f01cfea414140de5dae2223"
                             "b00361a396177a9cb410ff61f20015ad", 64);

    alm_key_digest(S(""), hex);
    assert_memory_equal(hex, "e3b0c44298fc1c149afbf4c8996fb924"
                             "27ae41e4649b934ca495991b7852b855", 64);

    alm_hex(bin, 3, hex);
    assert_memory_equal(hex, "00abff", 6);
}


static void
test_error_json(void **state)
{
    char     out[512];
    size_t   n, need;
    cJSON   *j, *e;

    (void) state;

    n = alm_error_json(out, sizeof(out), "bad \"thing\"\n\x02",
                       "invalid_request_error", "model", NULL);
    assert_true(n < sizeof(out));
    assert_string_equal(out,
        "{\"error\":{\"message\":\"bad \\\"thing\\\"\\n\\u0002\","
        "\"type\":\"invalid_request_error\",\"param\":\"model\","
        "\"code\":null}}");

    j = test_json(out, n);
    e = cJSON_GetObjectItemCaseSensitive(j, "error");
    assert_string_equal(test_str(e, "message"), "bad \"thing\"\n\x02");
    assert_true(cJSON_IsNull(cJSON_GetObjectItemCaseSensitive(e, "code")));
    cJSON_Delete(j);

    n = alm_error_json(out, sizeof(out), NULL, "server_error", NULL,
                       "model_not_found");
    assert_string_equal(out, "{\"error\":{\"message\":\"\",\"type\":"
                        "\"server_error\",\"param\":null,\"code\":"
                        "\"model_not_found\"}}");

    /* too small: the needed length, no overflow */
    need = n;
    memset(out, 'Z', sizeof(out));
    n = alm_error_json(out, 10, NULL, "server_error", NULL,
                       "model_not_found");
    assert_int_equal(n, need);
    assert_int_equal(out[10], 'Z');

    /* exactly the size: written, no room for the NUL */
    n = alm_error_json(out, need, NULL, "server_error", NULL,
                       "model_not_found");
    assert_int_equal(n, need);
    assert_int_equal(out[need], 'Z');
    assert_memory_equal(out, "{\"error\":{\"message\":\"\"", 22);

    assert_int_equal(alm_error_json(NULL, 0, "m", "t", NULL, NULL),
                     strlen("{\"error\":{\"message\":\"m\",\"type\":\"t\","
                            "\"param\":null,\"code\":null}}"));
}


static void
test_error_set(void **state)
{
    alm_error_t  err, copy;
    char         big[600];

    (void) state;

    alm_error_set(&err, 404, "invalid_request_error", NULL,
                  "model_not_found", "The model `%s` does not exist", "x");
    assert_int_equal(err.status, 404);
    assert_string_equal(err.message, "The model `x` does not exist");

    /* the message lives in the struct: a copy stands on its own */
    copy = err;
    memset(&err, 0, sizeof(alm_error_t));
    assert_string_equal(copy.message, "The model `x` does not exist");
    err = copy;
    assert_string_equal(err.type, "invalid_request_error");
    assert_null(err.param);
    assert_string_equal(err.code, "model_not_found");

    memset(big, 'x', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    alm_error_set(&err, 400, "t", "p", NULL, "%s", big);
    assert_int_equal(strlen(err.message), sizeof(err.message) - 1);

    alm_error_set(NULL, 400, "t", "p", NULL, "ignored");
}


/* the digest of a conversation of one message */

static void
conv_hash_one(const char *key, const char *model, const char *role,
    const char *text, char hex[ALM_DIGEST_HEX_LEN])
{
    alm_conv_hash_t  h;

    alm_conv_hash_init(&h, key, model, strlen(model));
    alm_conv_hash_message_begin(&h, role, strlen(role));
    alm_conv_hash_update(&h, text, strlen(text));
    alm_conv_hash_message_end(&h);
    alm_conv_hash_hex(&h, hex);
}


static void
test_conv_hash(void **state)
{
    char             h1[ALM_DIGEST_HEX_LEN], h2[ALM_DIGEST_HEX_LEN];
    alm_conv_hash_t  a, b;

    (void) state;

    /* pieces hash like the whole */
    alm_conv_hash_init(&a, KEY, S("ws"));
    alm_conv_hash_message_begin(&a, S("user"));
    alm_conv_hash_update(&a, S("hello world"));
    alm_conv_hash_message_end(&a);

    alm_conv_hash_init(&b, KEY, S("ws"));
    alm_conv_hash_message_begin(&b, S("user"));
    alm_conv_hash_update(&b, S("hel"));
    alm_conv_hash_update(&b, S(""));
    alm_conv_hash_update(&b, S("lo world"));
    alm_conv_hash_message_end(&b);

    alm_conv_hash_hex(&a, h1);
    alm_conv_hash_hex(&b, h2);
    assert_memory_equal(h1, h2, ALM_DIGEST_HEX_LEN);

    /* reading the digest leaves the state usable, and repeatable */
    alm_conv_hash_hex(&a, h2);
    assert_memory_equal(h1, h2, ALM_DIGEST_HEX_LEN);

    /* the helper below hashes the same way */
    conv_hash_one(KEY, "ws", "user", "hello world", h2);
    assert_memory_equal(h1, h2, ALM_DIGEST_HEX_LEN);

    /* the record boundaries matter */
    alm_conv_hash_init(&b, KEY, S("ws"));
    alm_conv_hash_message_begin(&b, S("user"));
    alm_conv_hash_update(&b, S("hello"));
    alm_conv_hash_message_end(&b);
    alm_conv_hash_message_begin(&b, S("user"));
    alm_conv_hash_update(&b, S(" world"));
    alm_conv_hash_message_end(&b);
    alm_conv_hash_hex(&b, h2);
    assert_memory_not_equal(h1, h2, ALM_DIGEST_HEX_LEN);

    /* so do the key, the model and the role */
    conv_hash_one(NULL, "ws", "user", "hello world", h2);
    assert_memory_not_equal(h1, h2, ALM_DIGEST_HEX_LEN);

    conv_hash_one(KEY, "wsx", "user", "hello world", h2);
    assert_memory_not_equal(h1, h2, ALM_DIGEST_HEX_LEN);

    conv_hash_one(KEY, "ws", "system", "hello world", h2);
    assert_memory_not_equal(h1, h2, ALM_DIGEST_HEX_LEN);
}


/*
 * alm_plain_end() against a byte-by-byte scan: every kind of byte that
 * stops it, at every offset across the 16-, 8- and 1-byte steps, and
 * a text without one.
 */

static void
test_plain_end(void **state)
{
    size_t                len, at, k, i;
    unsigned char         buf[48];
    const unsigned char  *end;

    static const unsigned char  stops[] = {
        '"', '\\', 0x00, 0x01, 0x0a, 0x1f, 0x80, 0xc3, 0xff
    };

    (void) state;

    for (len = 0; len <= sizeof(buf); len++) {
        memset(buf, 'a', sizeof(buf));
        end = buf + len;
        assert_ptr_equal(alm_plain_end(buf, end), end);

        for (at = 0; at < len; at++) {
            for (k = 0; k < sizeof(stops); k++) {
                memset(buf, 'a', sizeof(buf));

                /* plain neighbours of the stops: 0x20, 0x21, 0x5b, 0x7f */
                for (i = 0; i < len; i++) {
                    buf[i] = (unsigned char) ("\x20\x21\x5b\x7f"[i % 4]);
                }

                buf[at] = stops[k];
                assert_ptr_equal(alm_plain_end(buf, end), buf + at);

                /* a second stop further on does not matter */
                if (at + 1 < len) {
                    buf[len - 1] = '"';
                    assert_ptr_equal(alm_plain_end(buf, end), buf + at);
                }
            }
        }
    }
}


int
main(void)
{
    const struct CMUnitTest  tests[] = {
        cmocka_unit_test(test_slug_valid),
        cmocka_unit_test(test_scopes),
        cmocka_unit_test(test_workspaces_kind),
        cmocka_unit_test(test_workspace_allowed),
        cmocka_unit_test(test_key_record),
        cmocka_unit_test(test_digest),
        cmocka_unit_test(test_error_json),
        cmocka_unit_test(test_error_set),
        cmocka_unit_test(test_conv_hash),
        cmocka_unit_test(test_plain_end),
    };

    return cmocka_run_group_tests_name("util", tests, NULL, NULL);
}
