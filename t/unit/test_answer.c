/*
 * Copyright (C) ngx_anythingllm authors
 *
 * A whole workspace answer and upstream errors in OpenAI's words
 * (alm_answer.c).
 */


#include "test_common.h"


static const alm_completion_meta_t  meta = {
    "chatcmpl-abc", 12, "my-ws", 5, 1700000000
};


static void
test_response_ok(void **state)
{
    char             *out, a[ALM_DIGEST_HEX_LEN], b[ALM_DIGEST_HEX_LEN];
    size_t            len;
    cJSON            *j, *c, *m, *u;
    alm_error_t       err;
    alm_usage_t       usage;
    alm_conv_hash_t   conv, ref;
    static const char  body[] =
        "{\"id\":\"u1\",\"type\":\"textResponse\",\"textResponse\":\"Hello "
        "from \\\"ws\\\"\",\"sources\":[{\"text\":\"t\",\"title\":\"doc\","
        "\"docId\":\"d1\"}],\"close\":true,\"error\":null,\"chatId\":42,"
        "\"metrics\":{\"prompt_tokens\":79,\"completion_tokens\":5,"
        "\"total_tokens\":84,\"duration\":0.2,\"outputTps\":24.0,"
        "\"model\":\"m\",\"provider\":\"p\"}}";

    (void) state;

    alm_conv_hash_init(&conv, KEY, S("my-ws"));
    ref = conv;

    out = alm_chat_response_translate(S(body), &meta, &usage, &conv, &len,
                                      &err);
    assert_non_null(out);
    assert_int_equal(len, strlen(out));

    assert_string_equal(out,
        "{\"id\":\"chatcmpl-abc\",\"object\":\"chat.completion\","
        "\"created\":1700000000,\"model\":\"my-ws\",\"choices\":[{\"index\":0,"
        "\"message\":{\"role\":\"assistant\",\"content\":\"Hello from "
        "\\\"ws\\\"\",\"refusal\":null},\"logprobs\":null,\"finish_reason\":"
        "\"stop\"}],\"usage\":{\"prompt_tokens\":79,\"completion_tokens\":5,"
        "\"total_tokens\":84},\"sources\":[{\"text\":\"t\",\"title\":\"doc\","
        "\"docId\":\"d1\"}]}");

    j = test_json(out, len);
    c = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(j, "choices"), 0);
    m = cJSON_GetObjectItemCaseSensitive(c, "message");
    assert_string_equal(test_str(m, "content"), "Hello from \"ws\"");
    u = cJSON_GetObjectItemCaseSensitive(j, "usage");
    assert_int_equal(cJSON_GetObjectItemCaseSensitive(u, "total_tokens")
                     ->valueint, 84);
    cJSON_Delete(j);
    free(out);

    assert_int_equal(usage.present, 1);
    assert_int_equal(usage.prompt_tokens, 79);
    assert_int_equal(usage.completion_tokens, 5);
    assert_int_equal(usage.total_tokens, 84);

    /* the answer went into the digest */
    alm_conv_hash_message_begin(&ref, S("assistant"));
    alm_conv_hash_update(&ref, S("Hello from \"ws\""));
    alm_conv_hash_message_end(&ref);
    alm_conv_hash_hex(&ref, a);
    alm_conv_hash_hex(&conv, b);
    assert_memory_equal(a, b, ALM_DIGEST_HEX_LEN);
}


static void
test_response_usage_missing(void **state)
{
    char         *out;
    size_t        len;
    cJSON        *j, *u;
    alm_error_t   err;
    alm_usage_t   usage;

    (void) state;

    /* metrics {} (a query refusal), no sources, textChunk as the text */
    out = alm_chat_response_translate(S("{\"type\":\"textResponse\","
                                        "\"textChunk\":\"No relevant "
                                        "information.\",\"metrics\":{}}"),
                                      &meta, &usage, NULL, &len, &err);
    assert_non_null(out);
    j = test_json(out, len);
    u = cJSON_GetObjectItemCaseSensitive(j, "usage");
    assert_int_equal(cJSON_GetObjectItemCaseSensitive(u, "prompt_tokens")
                     ->valueint, 0);
    assert_int_equal(cJSON_GetArraySize(
                         cJSON_GetObjectItemCaseSensitive(j, "sources")), 0);
    cJSON_Delete(j);
    free(out);
    assert_int_equal(usage.present, 0);
    assert_int_equal(usage.total_tokens, 0);

    /* no metrics, null text, total computed when missing */
    out = alm_chat_response_translate(S("{\"type\":\"textResponse\","
                                        "\"textResponse\":null,\"sources\":"
                                        "\"bogus\",\"metrics\":{"
                                        "\"prompt_tokens\":3,"
                                        "\"completion_tokens\":-4.5}}"),
                                      &meta, &usage, NULL, &len, &err);
    assert_non_null(out);
    assert_non_null(strstr(out, "\"content\":\"\""));
    assert_non_null(strstr(out, "\"sources\":[]"));
    free(out);
    assert_int_equal(usage.present, 1);
    assert_int_equal(usage.prompt_tokens, 3);
    assert_int_equal(usage.completion_tokens, 0);
    assert_int_equal(usage.total_tokens, 3);

    out = alm_chat_response_translate(S("{\"textResponse\":\"x\"}"), &meta,
                                      NULL, NULL, NULL, &err);
    assert_non_null(out);
    free(out);
}


static void
test_response_errors(void **state)
{
    char            *out, a[ALM_DIGEST_HEX_LEN], b[ALM_DIGEST_HEX_LEN];
    alm_error_t      err;
    alm_usage_t      usage;
    alm_conv_hash_t  conv;
    size_t           len;

    (void) state;

    alm_conv_hash_init(&conv, KEY, S("my-ws"));
    alm_conv_hash_hex(&conv, a);

    out = alm_chat_response_translate(S("{\"id\":\"x\",\"type\":\"abort\","
                                        "\"textResponse\":null,\"sources\":[],"
                                        "\"close\":true,\"error\":\"The model "
                                        "returned nothing.\"}"),
                                      &meta, &usage, &conv, &len, &err);
    assert_null(out);
    assert_int_equal(err.status, 502);
    assert_string_equal(err.type, "server_error");
    assert_non_null(strstr(err.message, "The model returned nothing."));

    out = alm_chat_response_translate(S("{\"type\":\"abort\"}"), &meta,
                                      &usage, &conv, &len, &err);
    assert_null(out);
    assert_int_equal(err.status, 502);

    out = alm_chat_response_translate(S("{\"type\":\"textResponse\","
                                        "\"textResponse\":\"x\",\"error\":"
                                        "\"boom\"}"),
                                      &meta, &usage, &conv, &len, &err);
    assert_null(out);
    assert_int_equal(err.status, 502);
    assert_non_null(strstr(err.message, "boom"));

    out = alm_chat_response_translate(S("<html>"), &meta, &usage, &conv,
                                      &len, &err);
    assert_null(out);
    assert_int_equal(err.status, 502);
    assert_string_equal(err.type, "server_error");

    out = alm_chat_response_translate(S("[1]"), &meta, &usage, &conv, &len,
                                      &err);
    assert_null(out);

    out = alm_chat_response_translate(NULL, 0, &meta, &usage, &conv, &len,
                                      &err);
    assert_null(out);

    /* a failed answer leaves the digest alone */
    alm_conv_hash_hex(&conv, b);
    assert_memory_equal(a, b, ALM_DIGEST_HEX_LEN);
}


static void
test_chat_error_translate(void **state)
{
    alm_error_t  err;

    (void) state;

    alm_chat_error_translate(400, S("{\"id\":\"x\",\"type\":\"abort\","
                                    "\"textResponse\":null,\"sources\":[],"
                                    "\"close\":true,\"error\":\"Workspace "
                                    "nope is not a valid workspace.\"}"),
                             S("nope"), &err);
    assert_int_equal(err.status, 404);
    assert_string_equal(err.type, "invalid_request_error");
    assert_string_equal(err.code, "model_not_found");
    assert_null(err.param);
    assert_string_equal(err.message, "The model `nope` does not exist or "
                        "you do not have access to it.");

    alm_chat_error_translate(403, S("{\"error\":\"No valid api key "
                                    "found.\"}"), S("w"), &err);
    assert_int_equal(err.status, 502);
    assert_string_equal(err.type, "server_error");
    assert_non_null(strstr(err.message, "anythingllm_upstream_key"));

    alm_chat_error_translate(400, S("{\"type\":\"abort\",\"error\":"
                                    "\"Message is empty\"}"), S("w"), &err);
    assert_int_equal(err.status, 400);
    assert_string_equal(err.type, "invalid_request_error");
    assert_null(err.code);
    assert_non_null(strstr(err.message, "Message is empty"));

    alm_chat_error_translate(400, S("Bad Request"), S("w"), &err);
    assert_int_equal(err.status, 400);
    assert_non_null(strstr(err.message, "400"));

    alm_chat_error_translate(404, S(""), S("w"), &err);
    assert_int_equal(err.status, 400);

    alm_chat_error_translate(500, S("{\"type\":\"abort\",\"error\":"
                                    "\"kaput\"}"), S("w"), &err);
    assert_int_equal(err.status, 502);
    assert_string_equal(err.type, "server_error");
    assert_non_null(strstr(err.message, "kaput"));

    alm_chat_error_translate(503, NULL, 0, S("w"), &err);
    assert_int_equal(err.status, 502);
    assert_non_null(strstr(err.message, "503"));

    /* the "valid workspace" text matters only on a 400 */
    alm_chat_error_translate(500, S("{\"error\":\"x is not a valid "
                                    "workspace\"}"), S("w"), &err);
    assert_int_equal(err.status, 502);
}


int
main(void)
{
    const struct CMUnitTest  tests[] = {
        cmocka_unit_test(test_response_ok),
        cmocka_unit_test(test_response_usage_missing),
        cmocka_unit_test(test_response_errors),
        cmocka_unit_test(test_chat_error_translate),
    };

    return cmocka_run_group_tests_name("answer", tests, NULL, NULL);
}
