/*
 * Copyright (C) ngx_anythingllm authors
 *
 * The chat completions request: validation, the conversation digest,
 * the transcript, attachments and the upstream body (alm_request.c).
 */


#include "test_common.h"


#define PNG  "data:image/png;base64,iVBORw0KGgo="
#define JPEG "data:image/jpeg;base64,/9j/4AAQ"


static void
parse_ok(const char *body, alm_chat_req_t *req)
{
    alm_error_t  err;

    memset(&err, 0, sizeof(err));

    if (alm_chat_req_parse(body, strlen(body), KEY, req, &err) != ALM_OK) {
        print_error("refused (%d, param %s): %s\nbody: %s\n", err.status,
                    err.param ? err.param : "null", err.message, body);
        fail();
    }
}


/*
 * Parses a body that must be refused with a 400 invalid_request_error;
 * the refusal is left in *err, and *req holds nothing to free.
 */

static void
refused(const char *body, alm_error_t *err, alm_chat_req_t *req)
{
    memset(err, 0, sizeof(alm_error_t));

    if (alm_chat_req_parse(body, strlen(body), KEY, req, err) != ALM_ERROR) {
        print_error("accepted: %s\n", body);
        alm_chat_req_free(req);
        fail();
    }

    assert_int_equal(err->status, 400);
    assert_string_equal(err->type, "invalid_request_error");
}


static void
parse_err(const char *body, const char *param)
{
    alm_error_t     err;
    alm_chat_req_t  req;

    refused(body, &err, &req);

    assert_null(err.code);
    assert_non_null(err.message);
    assert_true(strlen(err.message) > 0);

    if (param == NULL) {
        if (err.param) {
            print_error("param %s, expected null: %s\nbody: %s\n",
                        err.param, err.message, body);
        }
        assert_null(err.param);

    } else if (err.param == NULL || strcmp(err.param, param) != 0) {
        print_error("param %s, expected %s: %s\nbody: %s\n",
                    err.param ? err.param : "null", param, err.message,
                    body);
        fail();
    }

    /* nothing is left to free, and freeing again is harmless */
    assert_null(req.model);
    assert_null(req.message);
    alm_chat_req_free(&req);
}


static void
hash_hex(const char *body, char hex[ALM_DIGEST_HEX_LEN], int full)
{
    alm_chat_req_t  req;

    parse_ok(body, &req);

    if (full) {
        alm_conv_hash_hex(&req.full, hex);

    } else {
        memcpy(hex, req.prefix_hex, ALM_DIGEST_HEX_LEN);
    }

    alm_chat_req_free(&req);
}


/* ------------------------------------------------------------------ */

static void
test_req_simple(void **state)
{
    alm_chat_req_t   req;
    alm_conv_hash_t  h;
    char             hex[ALM_DIGEST_HEX_LEN];

    (void) state;

    parse_ok("{\"model\":\"my-ws\",\"messages\":[{\"role\":\"user\","
             "\"content\":\"Hello\"}]}", &req);

    assert_string_equal(req.model, "my-ws");
    assert_int_equal(req.model_len, 5);
    assert_int_equal(req.stream, 0);
    assert_int_equal(req.include_usage, 0);
    assert_string_equal(req.message, "Hello");
    assert_int_equal(req.message_len, 5);
    assert_null(req.attachments);
    assert_null(req.transcript);
    assert_int_equal(req.has_history, 0);

    /* the prefix of a first message is the empty conversation */
    alm_conv_hash_init(&h, KEY, S("my-ws"));
    alm_conv_hash_hex(&h, hex);
    assert_memory_equal(hex, req.prefix_hex, ALM_DIGEST_HEX_LEN);

    alm_conv_hash_message_begin(&h, S("user"));
    alm_conv_hash_update(&h, S("Hello"));
    alm_conv_hash_message_end(&h);
    alm_conv_hash_hex(&h, hex);
    alm_conv_hash_hex(&req.full, req.prefix_hex);
    assert_memory_equal(hex, req.prefix_hex, ALM_DIGEST_HEX_LEN);

    alm_chat_req_free(&req);
    alm_chat_req_free(&req);
}


/* "stream" and "stream_options": what the request asks for */

static void
test_req_stream(void **state)
{
    char            body[256];
    size_t          i;
    alm_chat_req_t  req;

    static const struct {
        const char  *options;
        int          stream;
        int          include_usage;
    } cases[] = {
        { "\"stream\":true", 1, 0 },
        { "\"stream\":true,\"stream_options\":{\"include_usage\":true}",
          1, 1 },
        /* like OpenAI: only a stream carries a usage chunk */
        { "\"stream\":false,\"stream_options\":{\"include_usage\":true}",
          0, 0 },
        { "\"stream\":null,\"stream_options\":null", 0, 0 },
        { "\"stream\":true,\"stream_options\":{}", 1, 0 },
    };

    (void) state;

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        snprintf(body, sizeof(body), "{\"model\":\"w\",%s,\"messages\":"
                 "[{\"role\":\"user\",\"content\":\"x\"}]}",
                 cases[i].options);

        parse_ok(body, &req);
        assert_int_equal(req.stream, cases[i].stream);
        assert_int_equal(req.include_usage, cases[i].include_usage);
        alm_chat_req_free(&req);
    }
}


#define M  ",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]"
#define W  "{\"model\":\"w\""


/* bodies refused with a 400 naming a param (NULL: param null) */

typedef struct {
    const char  *body;
    const char  *param;
} err_case_t;


static const err_case_t  err_cases[] = {

    /* the body */
    { "", NULL },
    { "{", NULL },
    { "[]", NULL },
    { "\"x\"", NULL },
    { "null", NULL },
    { "{\"model\":\"w\"} trailing", NULL },

    /* model */
    { "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}",
      "model" },
    { "{\"model\":null" M "}", "model" },
    { "{\"model\":5" M "}", "model" },
    { "{\"model\":\"\"" M "}", "model" },
    { "{\"model\":\"a b\"" M "}", "model" },
    { "{\"model\":\"../x\"" M "}", "model" },
    { "{\"model\":\"gpt-4o/x\"" M "}", "model" },

    /* messages */
    { W "}", "messages" },
    { W ",\"messages\":null}", "messages" },
    { W ",\"messages\":[]}", "messages" },
    { W ",\"messages\":{}}", "messages" },
    { W ",\"messages\":\"hi\"}", "messages" },
    { W ",\"messages\":[\"hi\"]}", "messages" },
    { W ",\"messages\":[{\"content\":\"hi\"}]}", "messages" },
    { W ",\"messages\":[{\"role\":\"bot\",\"content\":\"hi\"}]}",
      "messages" },
    { W ",\"messages\":[{\"role\":7,\"content\":\"hi\"}]}",
      "messages" },
    { W ",\"messages\":[{\"role\":\"User\",\"content\":\"hi\"}]}",
      "messages" },
    { W ",\"messages\":[{\"role\":\"user\"}]}", "messages" },
    { W ",\"messages\":[{\"role\":\"user\",\"content\":null}]}",
      "messages" },
    { W ",\"messages\":[{\"role\":\"system\",\"content\":null},"
      "{\"role\":\"user\",\"content\":\"x\"}]}", "messages" },
    { W ",\"messages\":[{\"role\":\"user\",\"content\":5}]}",
      "messages" },
    { W ",\"messages\":[{\"role\":\"user\",\"content\":{}}]}",
      "messages" },
    { W ",\"messages\":[{\"role\":\"user\",\"content\":[\"x\"]}]}",
      "messages" },
    { W ",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":"
      "\"text\"}]}]}", "messages" },
    { W ",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":"
      "\"text\",\"text\":1}]}]}", "messages" },
    { W ",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":"
      "\"input_audio\",\"input_audio\":{}}]}]}", "messages" },
    { W ",\"messages\":[{\"role\":\"user\",\"content\":[{\"text\":"
      "\"x\"}]}]}", "messages" },

    /* the last message */
    { W ",\"messages\":[{\"role\":\"user\",\"content\":\"a\"},"
      "{\"role\":\"assistant\",\"content\":\"b\"}]}", "messages" },
    { W ",\"messages\":[{\"role\":\"system\",\"content\":\"a\"}]}",
      "messages" },
    { W ",\"messages\":[{\"role\":\"user\",\"content\":\"\"}]}",
      "messages" },
    { W ",\"messages\":[{\"role\":\"user\",\"content\":[]}]}",
      "messages" },
    { W ",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":"
      "\"text\",\"text\":\"\"}]}]}", "messages" },

    /* images */
    { W ",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":"
      "\"image_url\",\"image_url\":{\"url\":\"https://x/a.png\"}}]}]}",
      "messages" },
    { W ",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":"
      "\"image_url\",\"image_url\":{}}]}]}", "messages" },
    { W ",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":"
      "\"image_url\"}]}]}", "messages" },
    { W ",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":"
      "\"image_url\",\"image_url\":\"data:text/plain;base64,QQ==\"}]}"
      "]}", "messages" },
    { W ",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":"
      "\"image_url\",\"image_url\":\"data:image/png,QQ==\"}]}]}",
      "messages" },
    { W ",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":"
      "\"image_url\",\"image_url\":\"data:image/png;base64,\"}]}]}",
      "messages" },
    { W ",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":"
      "\"image_url\",\"image_url\":\"data:image/;base64,QQ==\"}]}]}",
      "messages" },
    { W ",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":"
      "\"image_url\",\"image_url\":\"data:image/png;base64,Q\\\"Q\"}]"
      "}]}", "messages" },
    { W ",\"messages\":[{\"role\":\"system\",\"content\":[{\"type\":"
      "\"image_url\",\"image_url\":\"" PNG "\"}]},{\"role\":\"user\","
      "\"content\":\"x\"}]}", "messages" },

    /* options */
    { W M ",\"stream\":\"yes\"}", "stream" },
    { W M ",\"stream\":1}", "stream" },
    { W M ",\"stream_options\":true}", "stream_options" },
    { W M ",\"stream_options\":{\"include_usage\":\"yes\"}}",
      "stream_options" },

    /* refused */
    { W M ",\"n\":2}", "n" },
    { W M ",\"n\":0}", "n" },
    { W M ",\"n\":\"1\"}", "n" },
    { W M ",\"tools\":[{\"type\":\"function\"}]}", "tools" },
    { W M ",\"tools\":{}}", "tools" },
    { W M ",\"functions\":[{\"name\":\"f\"}]}", "functions" },
    { W M ",\"tool_choice\":\"auto\"}", "tool_choice" },
    { W M ",\"tool_choice\":\"required\"}", "tool_choice" },
    { W M ",\"tool_choice\":{\"type\":\"function\"}}", "tool_choice" },
    { W M ",\"logprobs\":true}", "logprobs" },
    { W M ",\"logprobs\":1}", "logprobs" },
    { W M ",\"response_format\":{\"type\":\"json_object\"}}",
      "response_format" },
    { W M ",\"response_format\":{\"type\":\"json_schema\","
      "\"json_schema\":{}}}", "response_format" },
    { W M ",\"response_format\":{}}", "response_format" },
    { W M ",\"response_format\":\"text\"}", "response_format" },
    { W M ",\"audio\":{\"voice\":\"alloy\",\"format\":\"wav\"}}",
      "modalities" },
    { W M ",\"modalities\":[\"text\",\"audio\"]}", "modalities" },
    { W M ",\"modalities\":\"text\"}", "modalities" },

    /* ignored ones still have a type */
    { W M ",\"temperature\":\"hot\"}", "temperature" },
    { W M ",\"top_p\":[]}", "top_p" },
    { W M ",\"max_tokens\":\"9\"}", "max_tokens" },
    { W M ",\"max_completion_tokens\":true}",
      "max_completion_tokens" },
    { W M ",\"presence_penalty\":{}}", "presence_penalty" },
    { W M ",\"frequency_penalty\":\"0\"}", "frequency_penalty" },
    { W M ",\"stop\":5}", "stop" },
    { W M ",\"seed\":\"1\"}", "seed" },
    { W M ",\"user\":5}", "user" },
    { W M ",\"logit_bias\":[]}", "logit_bias" },
    { W M ",\"metadata\":\"x\"}", "metadata" },
    { W M ",\"store\":\"no\"}", "store" },
    { W M ",\"parallel_tool_calls\":0}", "parallel_tool_calls" },
    { W M ",\"reasoning_effort\":1}", "reasoning_effort" },
    { W M ",\"service_tier\":false}", "service_tier" },
    { W M ",\"top_logprobs\":\"5\"}", "top_logprobs" },

    /*
     * Whatever the members' order: refused parameters first, then the
     * types in the table's order, then the ranges (test_req_ranges);
     * of two members of one name, the first counts.
     */
    { W M ",\"temperature\":\"hot\",\"n\":2}", "n" },
    { W M ",\"stop\":5,\"top_p\":\"x\"}", "top_p" },
    { W M ",\"max_tokens\":0,\"temperature\":\"hot\"}", "temperature" },
    { W M ",\"n\":2,\"n\":1}", "n" },
};


static void
test_req_errors(void **state)
{
    char    body[600];
    size_t  i;

    (void) state;

    for (i = 0; i < sizeof(err_cases) / sizeof(err_cases[0]); i++) {
        parse_err(err_cases[i].body, err_cases[i].param);
    }

    /* a slug one byte too long */
    snprintf(body, sizeof(body), "{\"model\":\"%0*d\"" M "}",
             ALM_SLUG_MAX + 1, 0);
    parse_err(body, "model");
}


static void
test_req_accepted_params(void **state)
{
    alm_chat_req_t  req;

    (void) state;

    parse_ok(W M ",\"n\":1,\"tools\":[],\"functions\":null,\"tool_choice\":"
             "\"none\",\"logprobs\":false,\"top_logprobs\":null,"
             "\"response_format\":{\"type\":\"text\"},\"audio\":null,"
             "\"modalities\":[\"text\"],\"temperature\":0.2,\"top_p\":1,"
             "\"max_tokens\":100,\"max_completion_tokens\":null,"
             "\"presence_penalty\":0,\"frequency_penalty\":0,\"stop\":"
             "[\"x\"],\"seed\":42,\"user\":\"u\",\"logit_bias\":{\"1\":2},"
             "\"metadata\":{\"a\":\"b\"},\"store\":false,"
             "\"parallel_tool_calls\":true,\"reasoning_effort\":\"low\","
             "\"service_tier\":\"auto\",\"unknown_thing\":{\"x\":1}}", &req);
    assert_string_equal(req.message, "hi");
    alm_chat_req_free(&req);

    parse_ok(W M ",\"n\":1.0,\"stop\":\"\\n\",\"tools\":null,"
             "\"modalities\":null,\"response_format\":null}", &req);
    alm_chat_req_free(&req);
}


/* a refusal with OpenAI's code and, when given, its exact message */

static void
parse_err_code(const char *body, const char *param, const char *code,
    const char *message)
{
    alm_error_t     err;
    alm_chat_req_t  req;

    refused(body, &err, &req);

    if (err.param == NULL || strcmp(err.param, param) != 0
        || (code == NULL && err.code != NULL)
        || (code != NULL
            && (err.code == NULL || strcmp(err.code, code) != 0))
        || (message && strcmp(err.message, message) != 0))
    {
        print_error("got param %s code %s: %s\nbody: %s\n",
                    err.param ? err.param : "null",
                    err.code ? err.code : "null", err.message, body);
        fail();
    }

    assert_null(req.model);
}


/* the ranges and lengths OpenAI enforces */

typedef struct {
    const char  *body;
    const char  *param;
    const char  *code;
    const char  *message;       /* NULL: not compared */
} range_case_t;


static const range_case_t  range_cases[] = {

    /* the exact words and codes of OpenAI */
    { W M ",\"temperature\":3}", "temperature", "decimal_above_max_value",
      "Invalid 'temperature': decimal above maximum value. "
      "Expected a value <= 2, but got 3 instead." },
    { W M ",\"temperature\":-0.5}", "temperature",
      "decimal_below_min_value",
      "Invalid 'temperature': decimal below minimum value. "
      "Expected a value >= 0, but got -0.5 instead." },
    { W M ",\"max_tokens\":0}", "max_tokens", "integer_below_min_value",
      "Invalid 'max_tokens': integer below minimum value. "
      "Expected a value >= 1, but got 0 instead." },
    { W M ",\"stop\":[\"a\",\"b\",\"c\",\"d\",\"e\"]}", "stop",
      "array_above_max_length",
      "Invalid 'stop': array too long. Expected an array with "
      "maximum length 4, but got an array with length 5 instead." },

    /* the value is shown as sent, not rounded to the bound */
    { W M ",\"temperature\":2.0000001}", "temperature",
      "decimal_above_max_value",
      "Invalid 'temperature': decimal above maximum value. "
      "Expected a value <= 2, but got 2.0000001 instead." },

    /* each bound, each side */
    { W M ",\"temperature\":-1e-9}", "temperature",
      "decimal_below_min_value", NULL },
    { W M ",\"temperature\":1e400}", "temperature",
      "decimal_above_max_value", NULL },
    { W M ",\"top_p\":-0.1}", "top_p", "decimal_below_min_value", NULL },
    { W M ",\"top_p\":1.01}", "top_p", "decimal_above_max_value", NULL },
    { W M ",\"presence_penalty\":-2.5}", "presence_penalty",
      "decimal_below_min_value", NULL },
    { W M ",\"presence_penalty\":2.01}", "presence_penalty",
      "decimal_above_max_value", NULL },
    { W M ",\"frequency_penalty\":-3}", "frequency_penalty",
      "decimal_below_min_value", NULL },
    { W M ",\"frequency_penalty\":7}", "frequency_penalty",
      "decimal_above_max_value", NULL },
    { W M ",\"max_tokens\":-5}", "max_tokens", "integer_below_min_value",
      NULL },
    { W M ",\"max_tokens\":0.5}", "max_tokens", "integer_below_min_value",
      NULL },
    { W M ",\"max_completion_tokens\":0}", "max_completion_tokens",
      "integer_below_min_value",
      "Invalid 'max_completion_tokens': integer below minimum "
      "value. Expected a value >= 1, but got 0 instead." },
    { W M ",\"stop\":[\"a\",\"b\",\"c\",\"d\",\"e\",\"f\",\"g\"]}", "stop",
      "array_above_max_length", NULL },
    { W M ",\"stop\":[\"a\",1]}", "stop", NULL,
      "Invalid type for 'stop[1]': expected a string." },
    { W M ",\"stop\":[null]}", "stop", NULL, NULL },

    /* the first parameter out of range is the one named */
    { W M ",\"top_p\":5,\"temperature\":9}", "temperature",
      "decimal_above_max_value", NULL },
    { W M ",\"max_tokens\":0,\"presence_penalty\":5}", "presence_penalty",
      "decimal_above_max_value", NULL },
    { W M ",\"stop\":[1],\"max_tokens\":0}", "max_tokens",
      "integer_below_min_value", NULL },

    /* of two members of one name, the first counts */
    { W M ",\"temperature\":3,\"temperature\":1}", "temperature",
      "decimal_above_max_value", NULL },
};


static void
test_req_ranges(void **state)
{
    size_t          i;
    alm_chat_req_t  req;

    (void) state;

    for (i = 0; i < sizeof(range_cases) / sizeof(range_cases[0]); i++) {
        parse_err_code(range_cases[i].body, range_cases[i].param,
                       range_cases[i].code, range_cases[i].message);
    }

    /* the bounds themselves, and null, pass */
    parse_ok(W M ",\"temperature\":0,\"top_p\":0,\"presence_penalty\":-2,"
             "\"frequency_penalty\":-2,\"max_tokens\":1,"
             "\"max_completion_tokens\":1,\"stop\":[]}", &req);
    alm_chat_req_free(&req);

    parse_ok(W M ",\"temperature\":2,\"top_p\":1,\"presence_penalty\":2,"
             "\"frequency_penalty\":2.0,\"max_tokens\":1e9,"
             "\"max_completion_tokens\":4096,"
             "\"stop\":[\"a\",\"b\",\"c\",\"d\"]}", &req);
    alm_chat_req_free(&req);

    /* the first of two members of one name counts */
    parse_ok(W M ",\"temperature\":1,\"temperature\":3,\"n\":1,"
             "\"n\":2}", &req);
    alm_chat_req_free(&req);

    parse_ok(W M ",\"temperature\":null,\"top_p\":null,"
             "\"presence_penalty\":null,\"frequency_penalty\":null,"
             "\"max_tokens\":null,\"max_completion_tokens\":null,"
             "\"stop\":null}", &req);
    alm_chat_req_free(&req);
}


/* a body refused before it is parsed: 400, param and code null */

static void
text_err(const char *body, const char *what)
{
    alm_error_t     err;
    alm_chat_req_t  req;

    refused(body, &err, &req);

    assert_null(err.param);
    assert_null(err.code);

    if (strncmp(err.message, "We could not parse the JSON body", 32) != 0
        || strstr(err.message, what) == NULL)
    {
        print_error("message: %s\nexpected it to say: %s\n", err.message,
                    what);
        fail();
    }

    assert_null(req.model);
}


#define U8(bytes)                                                            \
    "{\"model\":\"w\",\"messages\":[{\"role\":\"user\",\"content\":\"a"      \
    bytes "b\"}]}"


static void
test_req_utf8(void **state)
{
    size_t           i;
    alm_error_t      err;
    alm_chat_req_t   req;

    static const char  *bad[] = {
        "\x80",                         /* a lone continuation byte */
        "\xbf",
        "\xc3",                         /* a sequence cut short */
        "\xe2\x82",
        "\xf0\x9f\x98",
        "\xc3\xc3\xa9",
        "\xc0\xaf",                     /* overlong "/" */
        "\xc1\xbf",
        "\xe0\x80\xaf",
        "\xe0\x9f\xbf",                 /* overlong U+07FF */
        "\xf0\x80\x80\xaf",
        "\xf0\x8f\xbf\xbf",             /* overlong U+FFFF */
        "\xed\xa0\x80",                 /* U+D800 */
        "\xed\xbf\xbf",                 /* U+DFFF */
        "\xed\xa0\xbd\xed\xb8\x80",     /* a CESU-8 surrogate pair */
        "\xf4\x90\x80\x80",             /* U+110000 */
        "\xf5\x80\x80\x80",
        "\xf7\xbf\xbf\xbf",
        "\xf8\x88\x80\x80\x80",
        "\xfc\x84\x80\x80\x80\x80",
        "\xfe",
        "\xff",
        "\xe2\x28\xa1",
        "\xe2\x82\x28",
    };

    static const char  *good[] = {
        "\xc2\x80",                     /* U+0080 */
        "\xc3\xa9",
        "\xdf\xbf",                     /* U+07FF */
        "\xe0\xa0\x80",                 /* U+0800 */
        "\xe2\x82\xac",
        "\xed\x9f\xbf",                 /* U+D7FF */
        "\xee\x80\x80",                 /* U+E000 */
        "\xef\xbf\xbd",                 /* U+FFFD */
        "\xef\xbf\xbf",                 /* U+FFFF */
        "\xf0\x90\x80\x80",             /* U+10000 */
        "\xf0\x9f\x98\x80",
        "\xf4\x8f\xbf\xbf",             /* U+10FFFF */
    };

    char  body[128], expect[32];

    (void) state;

    for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        snprintf(body, sizeof(body), U8("%s"), bad[i]);
        text_err(body, "not valid UTF-8");
    }

    /* the byte is named: '{"model":"w",...,"content":"a' is 52 bytes */
    memset(&err, 0, sizeof(err));
    assert_int_equal(alm_chat_req_parse(S(U8("\xff")), KEY, &req, &err),
                     ALM_ERROR);
    assert_non_null(strstr(err.message, "(at byte 52)"));

    /* anywhere: in a name, in the model, in a system message */
    text_err("{\"mod\xe9l\":\"w\"" M "}", "not valid UTF-8");
    text_err("{\"model\":\"w\xc0\"" M "}", "not valid UTF-8");
    text_err(W ",\"messages\":[{\"role\":\"system\",\"content\":\"\xed\xa0"
             "\x80\"},{\"role\":\"user\",\"content\":\"x\"}]}",
             "not valid UTF-8");
    text_err(W M ",\"user\":\"\xf4\x90\x80\x80\"}", "not valid UTF-8");

    /* a body that is no JSON at all, and not UTF-8 either */
    text_err("\xff\xfe{}", "not valid UTF-8");

    for (i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        snprintf(body, sizeof(body), U8("%s"), good[i]);
        parse_ok(body, &req);

        /* the text reaches AnythingLLM byte for byte */
        snprintf(expect, sizeof(expect), "a%sb", good[i]);
        assert_string_equal(req.message, expect);
        alm_chat_req_free(&req);
    }
}


static void
test_req_escapes(void **state)
{
    alm_chat_req_t  req;

    (void) state;

    /* lone surrogates, high or low, wherever they are */
    text_err(U8("\\ud800"), "lone UTF-16 surrogate");
    text_err(U8("\\uDBFF"), "lone UTF-16 surrogate");
    text_err(U8("\\udc00"), "lone UTF-16 surrogate");
    text_err(U8("\\uDFFF"), "lone UTF-16 surrogate");
    text_err(U8("\\ud800\\u0041"), "lone UTF-16 surrogate");
    text_err(U8("\\ud800\\ud800"), "lone UTF-16 surrogate");
    text_err(U8("\\udc00\\ud800"), "lone UTF-16 surrogate");
    text_err(U8("\\ud83d\\ude00\\ude00"), "lone UTF-16 surrogate");
    text_err(U8("\\ud800\\n"), "lone UTF-16 surrogate");
    text_err("{\"model\":\"w\",\"x\\ud800\":1" M "}",
             "lone UTF-16 surrogate");
    text_err(W M ",\"user\":\"\\ud800\"}", "lone UTF-16 surrogate");

    /* U+0000 would cut the string short */
    text_err(U8("\\u0000"), "\\u0000");
    text_err("{\"model\":\"w\\u0000x\"" M "}", "\\u0000");
    text_err("{\"model\\u0000\":\"x\",\"model\":\"w\"" M "}", "\\u0000");

    /* a pair is one character, in either case of hex digits */
    parse_ok(U8("\\ud83d\\ude00"), &req);
    assert_string_equal(req.message, "a\xf0\x9f\x98\x80" "b");
    alm_chat_req_free(&req);

    parse_ok(U8("\\uD83D\\uDE00\\udbff\\udfff"), &req);
    assert_string_equal(req.message, "a\xf0\x9f\x98\x80\xf4\x8f\xbf\xbf" "b");
    alm_chat_req_free(&req);

    /* escapes next to them, and an escaped backslash, are no escape */
    parse_ok(U8("\\u0001\\ud7ff\\ue000\\\\ud800\\\\u0000\\\"\\\\"), &req);
    assert_string_equal(req.message,
                        "a\x01\xed\x9f\xbf\xee\x80\x80\\ud800\\u0000\"\\b");
    alm_chat_req_free(&req);

    /* outside strings they are no escapes either; the parser refuses */
    parse_err("{\"model\":\"w\"" M ",\\ud800}", NULL);

    /* cJSON reads a \u without 4 hex digits as U+0000 */
    text_err(U8("\\uZZZZ"), "without 4 hex digits");
    text_err(U8("\\u00G0"), "without 4 hex digits");
    text_err(U8("\\u12"), "without 4 hex digits");
    text_err("{\"model\":\"w\\u", "without 4 hex digits");
    text_err(U8("\\ud800\\uZZZZ"), "lone UTF-16 surrogate");

    /* the byte after a backslash is checked too; a bad escape is JSON's */
    text_err(U8("\\\xff"), "not valid UTF-8");
    parse_err(U8("\\\xc3\xa9"), NULL);
    parse_err(U8("\\x41"), NULL);

    /* a body cut short is left to the parser */
    parse_err("{\"model\":\"w\\", NULL);
    text_err("{\"model\":\"w\\ud800", "lone UTF-16 surrogate");
}


static void
test_req_content_forms(void **state)
{
    alm_chat_req_t  req;

    (void) state;

    parse_ok(W ",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":"
             "\"text\",\"text\":\"line one\"},{\"type\":\"text\",\"text\":"
             "\"\"},{\"type\":\"text\",\"text\":\"line two\"}]}]}", &req);
    assert_string_equal(req.message, "line one\nline two");
    assert_int_equal(req.message_len, 17);
    assert_null(req.attachments);
    alm_chat_req_free(&req);

    /* an assistant may have null or no content (e.g. after tool calls) */
    parse_ok(W ",\"messages\":[{\"role\":\"user\",\"content\":\"a\"},"
             "{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[]},"
             "{\"role\":\"assistant\"},{\"role\":\"tool\",\"content\":\"r\","
             "\"tool_call_id\":\"c\"},{\"role\":\"user\",\"content\":\"b\","
             "\"name\":\"bob\"}]}", &req);
    assert_string_equal(req.message, "b");
    assert_int_equal(req.has_history, 1);
    assert_string_equal(req.transcript, "Conversation so far:\nuser: a\n\n");
    alm_chat_req_free(&req);

    /* JSON escapes and UTF-8 come through decoded */
    parse_ok(W ",\"messages\":[{\"role\":\"user\",\"content\":"
             "\"caf\\u00e9 \\\"q\\\"\\n\\ud83d\\ude00\"}]}", &req);
    assert_string_equal(req.message, "caf\xc3\xa9 \"q\"\n\xf0\x9f\x98\x80");
    alm_chat_req_free(&req);
}


static void
test_req_attachments(void **state)
{
    cJSON           *j, *a;
    alm_chat_req_t   req;

    (void) state;

    parse_ok(W ",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":"
             "\"image_url\",\"image_url\":{\"url\":\"data:image/png;base64,"
             "OLD=\"}},{\"type\":\"text\",\"text\":\"old\"}]},{\"role\":"
             "\"assistant\",\"content\":\"seen\"},{\"role\":\"user\","
             "\"content\":[{\"type\":\"text\",\"text\":\"What is this?\"},"
             "{\"type\":\"image_url\",\"image_url\":{\"url\":\"" PNG "\","
             "\"detail\":\"high\"}},{\"type\":\"image_url\",\"image_url\":\""
             JPEG "\"},{\"type\":\"image_url\",\"image_url\":{\"url\":"
             "\"data:image/svg+xml;base64,PHN2Zz4=\"}},{\"type\":"
             "\"image_url\",\"image_url\":{\"url\":\"data:image/WEBP;base64,"
             "UklG\"}}]}]}", &req);

    assert_string_equal(req.message, "What is this?");
    assert_non_null(req.attachments);

    /* only the last user message's images, in order */
    assert_string_equal(req.attachments,
        "[{\"name\":\"image-1.png\",\"mime\":\"image/png\","
        "\"contentString\":\"" PNG "\"},"
        "{\"name\":\"image-2.jpg\",\"mime\":\"image/jpeg\","
        "\"contentString\":\"" JPEG "\"},"
        "{\"name\":\"image-3.svg\",\"mime\":\"image/svg+xml\","
        "\"contentString\":\"data:image/svg+xml;base64,PHN2Zz4=\"},"
        "{\"name\":\"image-4.webp\",\"mime\":\"image/WEBP\","
        "\"contentString\":\"data:image/WEBP;base64,UklG\"}]");

    j = test_json(req.attachments, strlen(req.attachments));
    assert_int_equal(cJSON_GetArraySize(j), 4);
    a = cJSON_GetArrayItem(j, 0);
    assert_string_equal(test_str(a, "contentString"), PNG);
    cJSON_Delete(j);

    /* earlier images show in the transcript as a placeholder */
    assert_string_equal(req.transcript, "Conversation so far:\n"
                        "user: [image]\nold\nassistant: seen\n\n");
    alm_chat_req_free(&req);

    /* an image alone: AnythingLLM needs some message text */
    parse_ok(W ",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":"
             "\"image_url\",\"image_url\":{\"url\":\"" PNG "\"}}]}]}", &req);
    assert_string_equal(req.message, " ");
    assert_int_equal(req.message_len, 1);
    assert_non_null(req.attachments);
    alm_chat_req_free(&req);
}


static void
test_req_history(void **state)
{
    alm_chat_req_t  req;

    (void) state;

    /* system and developer messages are not history */
    parse_ok(W ",\"messages\":[{\"role\":\"system\",\"content\":\"Be "
             "brief.\"},{\"role\":\"developer\",\"content\":\"x\"},{\"role\":"
             "\"user\",\"content\":\"Hi\"}]}", &req);
    assert_int_equal(req.has_history, 0);
    assert_null(req.transcript);
    assert_string_equal(req.message, "Hi");
    alm_chat_req_free(&req);

    parse_ok(W ",\"messages\":[{\"role\":\"system\",\"content\":\"Be "
             "brief.\"},{\"role\":\"user\",\"content\":\"Hi\"},{\"role\":"
             "\"assistant\",\"content\":\"Hello!\\nHow can I help?\"},"
             "{\"role\":\"assistant\",\"content\":\"\"},{\"role\":\"user\","
             "\"content\":[{\"type\":\"text\",\"text\":\"More\"}]},"
             "{\"role\":\"user\",\"content\":\"Last\"}]}", &req);
    assert_int_equal(req.has_history, 1);
    assert_string_equal(req.transcript, "Conversation so far:\n"
                        "user: Hi\nassistant: Hello!\nHow can I help?\n"
                        "user: More\n\n");
    assert_string_equal(req.message, "Last");
    alm_chat_req_free(&req);
}


/*
 * The usual request read in place and the same request read as a tree
 * give the same fields, the same digests and the same error, for every
 * text: usual requests, edge cases, and their random mutations.
 */

static void
same_str(const char *what, const char *a, const char *b, const char *text,
    size_t len)
{
    if ((a == NULL) != (b == NULL) || (a && strcmp(a, b) != 0)) {
        print_error("%s differs for %.*s\nin place: %s\ntree:     %s\n",
                    what, (int) len, text, a ? a : "NULL", b ? b : "NULL");
        fail();
    }
}


static void
expect_same_request(const char *text, size_t len)
{
    int             frc, trc;
    char            fh[ALM_DIGEST_HEX_LEN], th[ALM_DIGEST_HEX_LEN];
    alm_error_t     ferr, terr;
    alm_chat_req_t  f, t;

    memset(&ferr, 0, sizeof(alm_error_t));
    memset(&terr, 0, sizeof(alm_error_t));

    frc = alm_chat_req_parse(text, len, KEY, &f, &ferr);
    trc = alm_chat_req_tree(text, len, KEY, &t, &terr);

    if (frc != trc) {
        print_error("text: %.*s\nin place: %d %s\ntree:     %d %s\n",
                    (int) len, text, frc, ferr.message, trc, terr.message);
        fail();
    }

    if (frc != ALM_OK) {
        assert_int_equal(ferr.status, terr.status);
        assert_string_equal(ferr.message, terr.message);
        same_str("type", ferr.type, terr.type, text, len);
        same_str("param", ferr.param, terr.param, text, len);
        same_str("code", ferr.code, terr.code, text, len);
        return;
    }

    same_str("model", f.model, t.model, text, len);
    same_str("message", f.message, t.message, text, len);
    same_str("attachments", f.attachments, t.attachments, text, len);
    same_str("transcript", f.transcript, t.transcript, text, len);
    assert_int_equal(f.model_len, t.model_len);
    assert_int_equal(f.message_len, t.message_len);
    assert_int_equal(f.stream, t.stream);
    assert_int_equal(f.include_usage, t.include_usage);
    assert_int_equal(f.has_history, t.has_history);
    assert_memory_equal(f.prefix_hex, t.prefix_hex, ALM_DIGEST_HEX_LEN);

    alm_conv_hash_hex(&f.full, fh);
    alm_conv_hash_hex(&t.full, th);
    assert_memory_equal(fh, th, ALM_DIGEST_HEX_LEN);

    alm_chat_req_free(&f);
    alm_chat_req_free(&t);
}


static void
test_req_in_place(void **state)
{
    char         text[1024];
    size_t       i, len;
    uint64_t     x;

    static const char *const  seeds[] = {
        "{\"model\":\"sales\",\"messages\":[{\"role\":\"user\","
        "\"content\":\"How did sales do?\"}]}",
        "{\"model\":\"sales\",\"stream\":true,\"messages\":[{\"role\":"
        "\"system\",\"content\":\"Be brief.\"},{\"role\":\"user\","
        "\"content\":\"Hi\"},{\"role\":\"assistant\",\"content\":\"Hello!"
        "\\nHow can I help?\"},{\"role\":\"assistant\",\"content\":\"\"},"
        "{\"role\":\"tool\",\"content\":\"42\"},{\"role\":\"developer\","
        "\"content\":\"x\"},{\"role\":\"user\",\"content\":\"Last \\\"q\\\""
        " \\/ \\\\ \\t\\b\\f\\r\"}]}",
        "{\"messages\":[{\"content\":\"a\",\"role\":\"user\",\"name\":"
        "\"bob\"},{\"role\":\"user\",\"role\":\"assistant\",\"content\":"
        "\"b\",\"content\":\"c\"},{\"role\":\"user\",\"content\":\"d\"}],"
        "\"model\":\"m\",\"stream\":false,\"model\":\"other\"}",
        "\xef\xbb\xbf {\"model\":\"w.s-1_\",\"messages\":[{\"role\":"
        "\"user\",\"content\":\"caf\xc3\xa9 \xe6\x95\xb0\"}]} \r\n",
        "{\"model\":\"sales\",\"stream\":null,\"messages\":[{\"role\":"
        "\"user\",\"content\":\"x\"}]}",
        "{\"model\":\"sales\",\"temperature\":0.5,\"messages\":[{\"role\":"
        "\"user\",\"content\":\"x\"}]}",
        "{\"model\":\"sales\",\"messages\":[{\"role\":\"user\","
        "\"content\":[{\"type\":\"text\",\"text\":\"parts\"}]}]}",
        "{\"model\":\"sales\",\"messages\":[{\"role\":\"assistant\","
        "\"content\":\"only\"}]}",
        "{\"model\":\"sales\",\"messages\":[{\"role\":\"user\","
        "\"content\":\"\"}]}",
        "{\"model\":\"sales\",\"messages\":[{\"role\":\"us\\u0065r\","
        "\"content\":\"esc\"}]}",
        "{\"model\":\"sa les\",\"messages\":[{\"role\":\"user\","
        "\"content\":\"x\"}]}",
        "{\"model\":\"s\\/a\",\"messages\":[{\"role\":\"user\","
        "\"content\":\"x\"}]}",
        "{\"model\":\"sales\",\"messages\":[{\"role\":\"boss\","
        "\"content\":\"x\"}]}",
        "{\"model\":\"sales\",\"messages\":[]}",
        "{\"model\":\"sales\",\"messages\":{}}",
        "{\"model\":\"sales\",\"messages\":[{\"role\":\"user\","
        "\"content\":\"x\"},]}",
        "{\"model\":\"sales\",\"messages\":[{\"role\":\"user\","
        "\"content\":\"x\"}]} x",
        "{\"model\":7,\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}",
        "{\"model\":\"sales\",\"me\\nssages\":[],\"messages\":[{\"role\":"
        "\"user\",\"content\":\"x\"}]}",
        "{\"model\":\"sales\",\"messages\":[{\"role\":\"user\","
        "\"content\":null}]}",
        "{\"model\":\"sales\",\"messages\":[{\"role\":\"user\","
        "\"content\":\"nul\\u0000cut\"}]}",
        "{\"model\":\"sales\",\"messages\":[{\"role\":\"user\","
        "\"content\":\"raw\x01\"}]}",
        "{\"model\":\"sales\",\"messages\":[\"user\"]}",
        "{}", "[]", "", " ", "{", "null",
    };

    (void) state;

    for (i = 0; i < sizeof(seeds) / sizeof(seeds[0]); i++) {
        expect_same_request(seeds[i], strlen(seeds[i]));
    }

    /* random edits of the first seeds */

    x = 0x9e3779b97f4a7c15ULL;

    for (i = 0; i < 60000; i++) {
        test_next(&x);

        len = strlen(seeds[x % 4]);
        memcpy(text, seeds[x % 4], len);
        test_edit(text, &len, &x);

        expect_same_request(text, len);
    }
}


/*
 * Running out of memory (test_alloc_left, test_common.h): for every n
 * the reading either succeeds exactly as without the limit or ends in
 * a 500 server_error with nothing left to free; the sanitizer's leak
 * check at exit holds the rest.
 */

static void
expect_nomem(const char *body, int tree)
{
    int             rc;
    long            n;
    alm_error_t     err, ok_err;
    alm_chat_req_t  req, ok;

    memset(&ok_err, 0, sizeof(alm_error_t));

    rc = tree ? alm_chat_req_tree(body, strlen(body), KEY, &ok, &ok_err)
              : alm_chat_req_parse(body, strlen(body), KEY, &ok, &ok_err);
    assert_int_equal(rc, ALM_OK);

    for (n = 0; ; n++) {
        memset(&err, 0, sizeof(alm_error_t));

        test_alloc_left = n;
        rc = tree ? alm_chat_req_tree(body, strlen(body), KEY, &req, &err)
                  : alm_chat_req_parse(body, strlen(body), KEY, &req, &err);
        test_alloc_left = -1;

        if (rc == ALM_OK) {
            break;
        }

        assert_int_equal(rc, ALM_ERROR);
        assert_int_equal(err.status, 500);
        assert_string_equal(err.type, "server_error");
        assert_null(req.model);
        assert_null(req.message);
        assert_null(req.transcript);
        assert_null(req.attachments);
    }

    /* at least one allocation failed on the way, and the last try is
     * the reading without a limit */
    assert_true(n > 0);
    same_str("model", req.model, ok.model, body, strlen(body));
    same_str("message", req.message, ok.message, body, strlen(body));
    same_str("attachments", req.attachments, ok.attachments, body,
             strlen(body));
    same_str("transcript", req.transcript, ok.transcript, body,
             strlen(body));

    alm_chat_req_free(&req);
    alm_chat_req_free(&ok);
}


static void
test_req_nomem(void **state)
{
    size_t  i;

    static const char *const  bodies[] = {
        /* read in place */
        "{\"model\":\"sales\",\"messages\":[{\"role\":\"user\","
        "\"content\":\"How did sales do?\"}]}",
        "{\"model\":\"sales\",\"stream\":true,\"messages\":[{\"role\":"
        "\"system\",\"content\":\"Be brief.\"},{\"role\":\"user\","
        "\"content\":\"Hi \\u00e9\"},{\"role\":\"assistant\",\"content\":"
        "\"Hello!\"},{\"role\":\"user\",\"content\":\"Last \\\"q\\\"\"}]}",
        /* through the tree */
        "{\"model\":\"sales\",\"temperature\":0.5,\"stop\":[\"x\"],"
        "\"messages\":[{\"role\":\"user\",\"content\":\"Earlier\"},"
        "{\"role\":\"assistant\",\"content\":[{\"type\":\"text\","
        "\"text\":\"Answer\"}]},{\"role\":\"user\",\"content\":["
        "{\"type\":\"text\",\"text\":\"Look\"},{\"type\":\"image_url\","
        "\"image_url\":{\"url\":\"" PNG "\"}}]}]}",
    };

    (void) state;

    for (i = 0; i < sizeof(bodies) / sizeof(bodies[0]); i++) {
        expect_nomem(bodies[i], 0);
        expect_nomem(bodies[i], 1);
    }
}


static void
test_req_hash(void **state)
{
    alm_chat_req_t   req;
    alm_conv_hash_t  conv;
    char             a[ALM_DIGEST_HEX_LEN], b[ALM_DIGEST_HEX_LEN];
    alm_error_t      err;

    (void) state;

    /* a string and its text parts hash alike */
    hash_hex(W ",\"messages\":[{\"role\":\"user\",\"content\":\"ab\"}]}",
             a, 1);
    hash_hex(W ",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":"
             "\"text\",\"text\":\"ab\"}]}]}", b, 1);
    assert_memory_equal(a, b, ALM_DIGEST_HEX_LEN);

    hash_hex(W ",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":"
             "\"text\",\"text\":\"a\"},{\"type\":\"text\",\"text\":\"b\"}]}]}",
             b, 1);
    assert_memory_equal(a, b, ALM_DIGEST_HEX_LEN);

    /* images count */
    hash_hex(W ",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":"
             "\"text\",\"text\":\"ab\"},{\"type\":\"image_url\",\"image_url\":"
             "\"" PNG "\"}]}]}", b, 1);
    assert_memory_not_equal(a, b, ALM_DIGEST_HEX_LEN);

    /* the ignored options do not */
    hash_hex(W ",\"temperature\":1,\"stream\":true,\"messages\":[{\"role\":"
             "\"user\",\"content\":\"ab\"}]}", b, 1);
    assert_memory_equal(a, b, ALM_DIGEST_HEX_LEN);

    /* the key and the model do */
    parse_ok("{\"model\":\"v\",\"messages\":[{\"role\":\"user\",\"content\":"
             "\"ab\"}]}", &req);
    alm_conv_hash_hex(&req.full, b);
    assert_memory_not_equal(a, b, ALM_DIGEST_HEX_LEN);
    alm_chat_req_free(&req);

    assert_int_equal(alm_chat_req_parse(S(W ",\"messages\":[{\"role\":"
                                          "\"user\",\"content\":\"ab\"}]}"),
                                        NULL, &req, &err), ALM_OK);
    alm_conv_hash_hex(&req.full, b);
    assert_memory_not_equal(a, b, ALM_DIGEST_HEX_LEN);
    alm_chat_req_free(&req);

    /* the system message is part of the digest */
    hash_hex(W ",\"messages\":[{\"role\":\"system\",\"content\":\"s\"},"
             "{\"role\":\"user\",\"content\":\"ab\"}]}", b, 1);
    assert_memory_not_equal(a, b, ALM_DIGEST_HEX_LEN);

    /*
     * The next turn's prefix equals this turn's digest once the answer
     * is added, whether the answer came in pieces or whole.
     */
    parse_ok(W ",\"messages\":[{\"role\":\"system\",\"content\":\"s\"},"
             "{\"role\":\"user\",\"content\":\"Hi\"}]}", &req);
    conv = req.full;
    alm_chat_req_free(&req);

    alm_conv_hash_message_begin(&conv, S("assistant"));
    alm_conv_hash_update(&conv, S("Hel"));
    alm_conv_hash_update(&conv, S("lo \xc3"));
    alm_conv_hash_update(&conv, S("\xa9!"));
    alm_conv_hash_message_end(&conv);
    alm_conv_hash_hex(&conv, a);

    hash_hex(W ",\"messages\":[{\"role\":\"system\",\"content\":\"s\"},"
             "{\"role\":\"user\",\"content\":\"Hi\"},{\"role\":\"assistant\","
             "\"content\":\"Hello \\u00e9!\"},{\"role\":\"user\",\"content\":"
             "\"And?\"}]}", b, 0);
    assert_memory_equal(a, b, ALM_DIGEST_HEX_LEN);

    hash_hex(W ",\"messages\":[{\"role\":\"system\",\"content\":\"s\"},"
             "{\"role\":\"user\",\"content\":\"Hi\"},{\"role\":\"assistant\","
             "\"content\":[{\"type\":\"text\",\"text\":\"Hello \"},{\"type\":"
             "\"text\",\"text\":\"\\u00e9!\"}]},{\"role\":\"user\",\"content\":"
             "\"And?\"}]}", b, 0);
    assert_memory_equal(a, b, ALM_DIGEST_HEX_LEN);

    /* a different answer is a different conversation */
    hash_hex(W ",\"messages\":[{\"role\":\"system\",\"content\":\"s\"},"
             "{\"role\":\"user\",\"content\":\"Hi\"},{\"role\":\"assistant\","
             "\"content\":\"Hello!\"},{\"role\":\"user\",\"content\":"
             "\"And?\"}]}", b, 0);
    assert_memory_not_equal(a, b, ALM_DIGEST_HEX_LEN);
}


static void
test_req_upstream_body(void **state)
{
    char            *body;
    size_t           len;
    cJSON           *j;
    alm_chat_req_t   req;

    (void) state;

    parse_ok(W ",\"messages\":[{\"role\":\"user\",\"content\":\"Say \\\"hi\\\""
             "\\n\"}]}", &req);

    body = alm_chat_req_upstream_body(&req, ALM_MODE_CHAT, S("sess-1"), 0,
                                      &len);
    assert_non_null(body);
    assert_int_equal(len, strlen(body));
    assert_string_equal(body, "{\"message\":\"Say \\\"hi\\\"\\n\",\"mode\":"
                        "\"chat\",\"sessionId\":\"sess-1\"}");
    free(body);

    body = alm_chat_req_upstream_body(&req, ALM_MODE_QUERY, NULL, 0, 1, &len);
    assert_string_equal(body, "{\"message\":\"Say \\\"hi\\\"\\n\",\"mode\":"
                        "\"query\"}");
    free(body);

    body = alm_chat_req_upstream_body(&req, ALM_MODE_AUTOMATIC, S("a\"b"), 1,
                                      &len);
    assert_string_equal(body, "{\"message\":\"Say \\\"hi\\\"\\n\",\"mode\":"
                        "\"automatic\",\"sessionId\":\"a\\\"b\"}");
    free(body);
    alm_chat_req_free(&req);

    /* unseen history goes first as a transcript */
    parse_ok(W ",\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"},"
             "{\"role\":\"assistant\",\"content\":\"Hello\"},{\"role\":"
             "\"user\",\"content\":[{\"type\":\"text\",\"text\":\"Look\"},"
             "{\"type\":\"image_url\",\"image_url\":\"" PNG "\"}]}]}", &req);

    body = alm_chat_req_upstream_body(&req, ALM_MODE_CHAT, S("s"), 0, &len);
    j = test_json(body, len);
    assert_string_equal(test_str(j, "message"), "Conversation so far:\n"
                        "user: Hi\nassistant: Hello\n\nuser: Look");
    assert_string_equal(test_str(j, "mode"), "chat");
    assert_string_equal(test_str(j, "sessionId"), "s");
    assert_int_equal(cJSON_GetArraySize(
                         cJSON_GetObjectItemCaseSensitive(j, "attachments")),
                     1);
    cJSON_Delete(j);
    free(body);

    /* continuing a session: the history is upstream already */
    body = alm_chat_req_upstream_body(&req, ALM_MODE_CHAT, S("s"), 1, &len);
    j = test_json(body, len);
    assert_string_equal(test_str(j, "message"), "Look");
    cJSON_Delete(j);
    free(body);
    alm_chat_req_free(&req);

    /* a zeroed request gives nothing */
    memset(&req, 0, sizeof(req));
    assert_null(alm_chat_req_upstream_body(&req, ALM_MODE_CHAT, NULL, 0, 0,
                                           &len));
}


int
main(void)
{
    const struct CMUnitTest  tests[] = {
        cmocka_unit_test(test_req_simple),
        cmocka_unit_test(test_req_stream),
        cmocka_unit_test(test_req_errors),
        cmocka_unit_test(test_req_accepted_params),
        cmocka_unit_test(test_req_ranges),
        cmocka_unit_test(test_req_utf8),
        cmocka_unit_test(test_req_escapes),
        cmocka_unit_test(test_req_content_forms),
        cmocka_unit_test(test_req_attachments),
        cmocka_unit_test(test_req_history),
        cmocka_unit_test(test_req_in_place),
        cmocka_unit_test(test_req_nomem),
        cmocka_unit_test(test_req_hash),
        cmocka_unit_test(test_req_upstream_body),
    };

    return cmocka_run_group_tests_name("request", tests, NULL, NULL);
}
