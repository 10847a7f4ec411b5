/*
 * Copyright (C) ngx_anythingllm authors
 *
 * The usage of native answers read as they pass, and the answer of
 * GET /api/v1/auth (alm_usage.c); a key's lists as JSON (alm_util.c).
 */


#include "test_common.h"


static const char  stream[] =
    "data: {\"uuid\":\"u1\",\"type\":\"textResponseChunk\","
    "\"textResponse\":\"Hel\",\"close\":false}\n\n"
    "data: {\"uuid\":\"u1\",\"type\":\"textResponseChunk\","
    "\"textResponse\":\"lo \\\"metrics\\\"\",\"close\":true}\r\n\r\n"
    "data: {\"uuid\":\"u1\",\"type\":\"finalizeResponseStream\","
    "\"close\":true,\"metrics\":{\"prompt_tokens\":11,"
    "\"completion_tokens\":2,\"total_tokens\":13}}\n\n";


static void
test_scan_any_split(void **state)
{
    char              buf[512];
    size_t            cut, len;
    alm_usage_scan_t  s;

    (void) state;

    len = sizeof(stream) - 1;

    /* the same counts however the bytes are cut in two */

    for (cut = 0; cut <= len; cut++) {
        alm_usage_scan_init(&s, buf, sizeof(buf));
        alm_usage_scan(&s, stream, cut);
        alm_usage_scan(&s, stream + cut, len - cut);

        assert_true(s.usage.present);
        assert_int_equal(s.usage.prompt_tokens, 11);
        assert_int_equal(s.usage.completion_tokens, 2);
        assert_int_equal(s.usage.total_tokens, 13);
        assert_int_equal(s.pieces, 2);
    }
}


static void
test_scan_bounded(void **state)
{
    char              buf[64];
    alm_usage_scan_t  s;

    (void) state;

    /* a line longer than the buffer is passed over, the next is read */

    alm_usage_scan_init(&s, buf, sizeof(buf));
    alm_usage_scan(&s, S(stream));

    assert_false(s.usage.present);

    alm_usage_scan(&s, S("data: {\"metrics\":{\"prompt_tokens\":3}}\n"));
    assert_true(s.usage.present);
    assert_int_equal(s.usage.prompt_tokens, 3);

    /* empty metrics keep the counts already read */

    alm_usage_scan(&s, S("data: {\"metrics\":{}}\n"));
    assert_int_equal(s.usage.prompt_tokens, 3);

    /* not JSON, not data: nothing */

    alm_usage_scan(&s, S("event: metrics\ndata: \"metrics\" {\n"));
    assert_int_equal(s.usage.prompt_tokens, 3);
}


static void
test_whole_answer(void **state)
{
    alm_usage_t  u;

    (void) state;

    assert_true(alm_usage_answer(S("{\"textResponse\":\"x\",\"metrics\":"
                                   "{\"prompt_tokens\":79,"
                                   "\"completion_tokens\":5}}"), &u));
    assert_int_equal(u.prompt_tokens, 79);
    assert_int_equal(u.completion_tokens, 5);
    assert_int_equal(u.total_tokens, 84);

    assert_false(alm_usage_answer(S("{\"metrics\":{}}"), &u));
    assert_false(alm_usage_answer(S("not json"), &u));
    assert_int_equal(u.prompt_tokens, 0);
}


static void
test_auth_answer(void **state)
{
    char            *out;
    size_t           len;
    alm_key_info_t   k;

    (void) state;

    memset(&k, 0, sizeof(k));
    k.id = "0123456789abcdef";
    k.name = "a \"b\"";
    k.name_len = 5;
    k.scopes = ALM_SCOPE_ADMIN | ALM_SCOPE_CHAT;
    k.workspaces = " sales , support";
    k.workspaces_len = 16;
    k.rpm = 60;
    k.tpd = 1000;
    k.date = "2026-11-30";
    k.usage_known = 1;
    k.requests = 2;
    k.prompt_tokens = 30;
    k.completion_tokens = 4;

    /* AnythingLLM's fields kept, ours replaced */

    out = alm_auth_answer(S("{\"authenticated\":true,\"name\":\"x\","
                            "\"extra\":[1]}"), &k, &len);
    assert_non_null(out);
    assert_string_equal(out,
        "{\"authenticated\":true,\"extra\":[1],\"id\":\"0123456789ab\","
        "\"name\":\"a \\\"b\\\"\",\"scopes\":[\"chat\",\"admin\"],"
        "\"workspaces\":[\"sales\",\"support\"],"
        "\"limits\":{\"rpm\":60,\"tpm\":0,\"tpd\":1000},"
        "\"usage\":{\"date\":\"2026-11-30\",\"requests\":2,"
        "\"prompt_tokens\":30,\"completion_tokens\":4,"
        "\"total_tokens\":34}}");
    assert_int_equal(len, strlen(out));
    free(out);

    k.scopes = 0;
    k.workspaces = "*";
    k.workspaces_len = 1;
    k.usage_known = 0;

    out = alm_auth_answer(S("{\"authenticated\":true}"), &k, &len);
    assert_non_null(out);
    assert_non_null(strstr(out, "\"scopes\":[],\"workspaces\":\"*\","));
    assert_non_null(strstr(out, "\"usage\":null}"));
    free(out);

    /* anything else passes as it is */

    assert_null(alm_auth_answer(S("{\"authenticated\":false}"), &k, &len));
    assert_null(alm_auth_answer(S("[true]"), &k, &len));
    assert_null(alm_auth_answer(S("{\"authenticated\":tru"), &k, &len));
}


int
main(void)
{
    const struct CMUnitTest  tests[] = {
        cmocka_unit_test(test_scan_any_split),
        cmocka_unit_test(test_scan_bounded),
        cmocka_unit_test(test_whole_answer),
        cmocka_unit_test(test_auth_answer),
    };

    return cmocka_run_group_tests_name("usage", tests, NULL, NULL);
}
