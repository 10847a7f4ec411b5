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


/*
 * The answer read in place and the answer read as a tree give the
 * same bytes, the same error, the same usage and the same digest, for
 * every text: usual answers, edge cases, and their random mutations.
 */

static void
expect_same_translation(const char *text, size_t len)
{
    char              *fast, *tree, ha[ALM_DIGEST_HEX_LEN];
    char               hb[ALM_DIGEST_HEX_LEN];
    size_t             flen, tlen;
    alm_error_t        ferr, terr;
    alm_usage_t        fus, tus;
    alm_conv_hash_t    fconv, tconv;

    alm_conv_hash_init(&fconv, KEY, S("my-ws"));
    tconv = fconv;
    memset(&ferr, 0, sizeof(alm_error_t));
    memset(&terr, 0, sizeof(alm_error_t));
    flen = 0;
    tlen = 0;

    fast = alm_chat_response_translate(text, len, &meta, &fus, &fconv, &flen,
                                       &ferr);
    tree = alm_chat_response_tree(text, len, &meta, &tus, &tconv, &tlen,
                                  &terr);

    if ((fast == NULL) != (tree == NULL)
        || (fast && (flen != tlen || memcmp(fast, tree, flen) != 0)))
    {
        print_error("text: %.*s\nin place: %s\ntree:     %s\n", (int) len,
                    text, fast ? fast : ferr.message,
                    tree ? tree : terr.message);
        fail();
    }

    if (fast == NULL) {
        assert_int_equal(ferr.status, terr.status);
        assert_string_equal(ferr.message, terr.message);
    }

    assert_memory_equal(&fus, &tus, sizeof(alm_usage_t));

    alm_conv_hash_hex(&fconv, ha);
    alm_conv_hash_hex(&tconv, hb);
    assert_memory_equal(ha, hb, ALM_DIGEST_HEX_LEN);

    free(fast);
    free(tree);
}


/*
 * Running out of memory (test_alloc_left, test_common.h): for every n,
 * a translation whose n-th allocation fails ends in a 500 server_error
 * with nothing left to free, until n is past the last allocation and
 * it gives what it gives without the limit.
 */

static void
expect_nomem(const char *text, int tree)
{
    char             *out, *ok;
    long              n;
    size_t            len, ok_len;
    alm_error_t       err;
    alm_usage_t       usage;
    alm_conv_hash_t   conv;

    alm_conv_hash_init(&conv, KEY, S("my-ws"));
    ok = tree ? alm_chat_response_tree(text, strlen(text), &meta, &usage,
                                       &conv, &ok_len, &err)
              : alm_chat_response_translate(text, strlen(text), &meta,
                                            &usage, &conv, &ok_len, &err);
    assert_non_null(ok);

    for (n = 0; ; n++) {
        memset(&err, 0, sizeof(alm_error_t));
        alm_conv_hash_init(&conv, KEY, S("my-ws"));

        test_alloc_left = n;
        out = tree ? alm_chat_response_tree(text, strlen(text), &meta,
                                            &usage, &conv, &len, &err)
                   : alm_chat_response_translate(text, strlen(text), &meta,
                                                 &usage, &conv, &len, &err);
        test_alloc_left = -1;

        if (out != NULL) {
            break;
        }

        if (err.status != 500) {
            print_error("allocation %ld failed: %d %s\n", n, err.status,
                        err.message);
            free(ok);
            fail();
        }

        assert_string_equal(err.type, "server_error");
    }

    assert_true(n > 0);
    assert_int_equal(len, ok_len);
    assert_memory_equal(out, ok, len);

    free(out);
    free(ok);
}


static void
test_response_nomem(void **state)
{
    static const char  answer[] =
        "{\"id\":\"u1\",\"type\":\"textResponse\",\"textResponse\":\"Hello "
        "from \\\"ws\\\" \\u00e9\",\"sources\":[{\"text\":\"t\",\"title\":"
        "\"doc\"}],\"close\":true,\"error\":null,\"chatId\":42,"
        "\"metrics\":{\"prompt_tokens\":79,\"completion_tokens\":5,"
        "\"total_tokens\":84}}";

    (void) state;

    expect_nomem(answer, 0);
    expect_nomem(answer, 1);
}


static void
test_response_in_place(void **state)
{
    int          depth;
    char         text[1024], deep[512];
    size_t       i, k, len;
    uint64_t     x;

    static const char *const  seeds[] = {
        "{\"id\":\"u1\",\"type\":\"textResponse\",\"textResponse\":\"Hello "
        "\\n\\\"you\\\" \\/ \\\\ \\t\\b\\f\\r\",\"sources\":[{\"text\":"
        "\"chunk \\n two\",\"score\":0.75,\"n\":-3,\"ok\":true,\"x\":null,"
        "\"y\":[1,2.5e3,{}]}],\"close\":true,\"error\":null,\"chatId\":1,"
        "\"metrics\":{\"prompt_tokens\":42,\"completion_tokens\":100,"
        "\"total_tokens\":142,\"duration\":2.1,\"outputTps\":47.6,"
        "\"model\":\"m\",\"provider\":\"p\"}}",
        "{\"textChunk\":\"a\",\"metrics\":{}}",
        /* escapes, none of them \/: copied as they are (a \\ then /) */
        "{\"textResponse\":\"line\\none \\\"q\\\" tab\\t back\\\\/slash\","
        "\"sources\":[{\"k\\n\":\"a\\\\/b \\n\",\"e\":\"\\\\\"}]}",
        "{\"textResponse\":null,\"textChunk\":\"b\",\"sources\":{},"
        "\"metrics\":{\"prompt_tokens\":\"7\",\"total_tokens\":-5}}",
        "\xef\xbb\xbf {\"textResponse\":\"bom\"} \r\n",
        "\x01{\x02\"textResponse\"\x1f:\"ws\",\"error\":\"\"}",
        "{\"textResponse\":\"first\",\"textResponse\":\"second\","
        "\"metrics\":{\"prompt_tokens\":1,\"prompt_tokens\":2}}",
        "{\"type\":\"abort\",\"textResponse\":null,\"error\":\"boom\"}",
        "{\"type\":\"ab\\/ort\",\"textResponse\":\"x\"}",
        "{\"type\":\"textResponse\",\"error\":\"model failed\"}",
        "{\"textResponse\":\"caf\\u00e9\",\"sources\":[]}",
        "{\"text\\u0052esponse\":\"k\"}",
        "{\"textResponse\":\"nul\\u0000cut\"}",
        "{\"textResponse\":\"raw\x01\"}",
        "{\"metrics\":{\"prompt_tokens\":1e400,\"completion_tokens\":-0,"
        "\"total_tokens\":01}}",
        "{\"metrics\":{\"prompt_tokens\":1.,\"completion_tokens\":.5}}",
        "{\"metrics\":{\"prompt_tokens\":1e15,\"completion_tokens\":"
        "123456789012345678901234567890}}",
        "{\"sources\":[1,2,],\"textResponse\":\"t\"}",
        /* numbers of 63 and 64 bytes: cJSON reads 63 at most */
        "{\"sources\":[1234567890123456789012345678901234567890123456789"
        "01234567890123]}",
        "{\"sources\":[1234567890123456789012345678901234567890123456789"
        "012345678901234]}",
        "{\"sources\":[-0.5e-3,0,-0,1E+2,9007199254740993,1e999]}",
        "{\"textResponse\":\"t\"} x",
        "{\"textResponse\":\"t\"}\x01",
        "{}", "[]", "\"s\"", "", " ", "{", "{\"a\"}", "{\"a\":}",
        "{\"a\":tru}", "{\"a\":nul}", "{\"a\":1 \"b\":2}",
        "{\"textResponse\":\"\xff\xfe bytes\"}",
        /* runs of bytes from 0x80 up, passed at once by the reader */
        "{\"textResponse\":\"\xe6\x95\xb0\xe6\x8d\xae\xe6\x98\xbe\xe7\xa4"
        "\xba\xe6\xaf\x8f\xe4\xb8\xaa\xe5\x9c\xb0\xe5\x8c\xba\xe9\x83\xbd"
        "\xe5\x9c\xa8\xe5\xa2\x9e\xe9\x95\xbf\\n\xc3\xa9\\\"\xe2\x80\x94"
        "\",\"sources\":[{\"\xe6\x96\x87\":\"\xe4\xbb\xb6\"}]}",
        "{\"textResponse\":\"\xe6\x95\xb0\xe6\x8d\xae\xe6\x98\xbe\xe7\xa4"
        "\xba\xe6\xaf\x8f",
    };

    (void) state;

    for (i = 0; i < sizeof(seeds) / sizeof(seeds[0]); i++) {
        expect_same_translation(seeds[i], strlen(seeds[i]));
    }

    /* nesting around the limit of the reading in place */

    for (depth = 60; depth < 70; depth++) {
        len = (size_t) snprintf(deep, sizeof(deep), "{\"sources\":");
        for (k = 0; k < (size_t) depth; k++) {
            deep[len++] = '[';
        }
        for (k = 0; k < (size_t) depth; k++) {
            deep[len++] = ']';
        }
        deep[len++] = '}';
        expect_same_translation(deep, len);
    }

    /* random edits of the seeds */

    x = 0x9e3779b97f4a7c15ULL;

    for (i = 0; i < 60000; i++) {
        test_next(&x);

        len = strlen(seeds[x % 9]);
        memcpy(text, seeds[x % 9], len);
        test_edit(text, &len, &x);

        expect_same_translation(text, len);
    }
}


int
main(void)
{
    const struct CMUnitTest  tests[] = {
        cmocka_unit_test(test_response_ok),
        cmocka_unit_test(test_response_usage_missing),
        cmocka_unit_test(test_response_errors),
        cmocka_unit_test(test_chat_error_translate),
        cmocka_unit_test(test_response_in_place),
        cmocka_unit_test(test_response_nomem),
    };

    return cmocka_run_group_tests_name("answer", tests, NULL, NULL);
}
