/*
 * Copyright (C) ngx_anythingllm authors
 *
 * The SSE re-framer: every frame pattern of AnythingLLM's stream,
 * split at every byte.
 */


#include "test_common.h"


#define HEAD                                                                  \
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\","     \
    "\"created\":1700000000,\"model\":\"ws\",\"choices\":["

#define CONTENT(role, text)                                                   \
    HEAD "{\"index\":0,\"delta\":{" role "\"content\":\"" text "\"},"          \
    "\"logprobs\":null,\"finish_reason\":null}]}\n\n"

#define ROLE "\"role\":\"assistant\","

#define STOP                                                                  \
    HEAD "{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":"     \
    "\"stop\"}]}\n\n"

#define DONE "data: [DONE]\n\n"

#define ERROR(msg)                                                            \
    "data: {\"error\":{\"message\":\"" msg "\",\"type\":\"server_error\","    \
    "\"param\":null,\"code\":null}}\n\n" DONE

#define EARLY  "AnythingLLM ended the stream before the answer was complete."
#define BROKEN \
    "The connection to AnythingLLM broke before the answer was complete."


/* upstream frames */

#define F_CHUNK(text, close)                                                  \
    "data: {\"uuid\":\"u1\",\"sources\":[],\"type\":\"textResponseChunk\","   \
    "\"textResponse\":\"" text "\",\"close\":" close ",\"error\":false}\n\n"

#define F_FINAL                                                               \
    "data: {\"uuid\":\"u1\",\"type\":\"finalizeResponseStream\",\"close\":"   \
    "true,\"error\":false,\"chatId\":7,\"metrics\":{\"prompt_tokens\":11,"    \
    "\"completion_tokens\":2,\"total_tokens\":13},\"sources\":[]}\n\n"

#define F_ABORT(err)                                                          \
    "data: {\"id\":\"u1\",\"type\":\"abort\",\"textResponse\":null,"          \
    "\"sources\":[],\"close\":true,\"error\":\"" err "\"}\n\n"

#define TYPICAL                                                               \
    F_CHUNK("Hello", "false") F_CHUNK(" world", "false")                      \
    F_CHUNK("", "true") F_FINAL

#define TYPICAL_OUT                                                           \
    CONTENT(ROLE, "Hello") CONTENT("", " world") STOP DONE


typedef struct {
    char    *p;
    size_t   len;
    int      calls;
    int      fail_at;       /* make the n-th call fail, 0: never */
} sink_t;


static int
sink_emit(void *data, const char *p, size_t len)
{
    sink_t  *s;

    s = data;
    s->calls++;

    if (s->fail_at && s->calls == s->fail_at) {
        return ALM_ERROR;
    }

    /* every piece is whole frames */
    assert_true(len >= 2);
    assert_memory_equal(p, "da", 2);
    assert_memory_equal(p + len - 2, "\n\n", 2);

    s->p = realloc(s->p, s->len + len + 1);
    assert_non_null(s->p);
    memcpy(s->p + s->len, p, len);
    s->len += len;
    s->p[s->len] = '\0';

    return ALM_OK;
}


typedef struct {
    alm_sse_t         sse;
    sink_t            out;
    char             *buf;
    alm_conv_hash_t   conv;
} run_t;


static const alm_completion_meta_t  meta = {
    "chatcmpl-1", 10, "ws", 2, 1700000000
};


static void
run_init(run_t *r, size_t cap, int include_usage, int conv)
{
    memset(r, 0, sizeof(run_t));

    /* exactly cap bytes: ASan catches any write past the bound */
    r->buf = malloc(cap ? cap : 1);
    assert_non_null(r->buf);

    if (conv) {
        alm_conv_hash_init(&r->conv, KEY, S("ws"));
    }

    alm_sse_init(&r->sse, r->buf, cap, &meta, include_usage,
                 conv ? &r->conv : NULL, sink_emit, &r->out);
}


static void
run_free(run_t *r)
{
    alm_sse_free(&r->sse);
    free(r->buf);
    free(r->out.p);
}


/* feeds "in" in pieces cut at the given offsets, then finishes */

static void
run_split(run_t *r, const char *in, size_t len, const size_t *cuts,
    size_t ncuts, int broken)
{
    size_t  i, at, next;

    at = 0;

    for (i = 0; i <= ncuts; i++) {
        next = i < ncuts ? cuts[i] : len;
        assert_int_equal(alm_sse_feed(&r->sse, in + at, next - at), ALM_OK);
        at = next;
    }

    assert_int_equal(alm_sse_finish(&r->sse, broken), ALM_OK);
}


static void
expect_out(run_t *r, const char *expected, const char *what)
{
    if (r->out.len != strlen(expected)
        || memcmp(r->out.p ? r->out.p : "", expected, r->out.len) != 0)
    {
        print_error("%s\n got: %.*s\nwant: %s\n", what, (int) r->out.len,
                    r->out.p ? r->out.p : "", expected);
        fail();
    }
}


/*
 * Feeds the stream whole, in two pieces cut at every byte, byte by
 * byte, and in pieces of 7; every way must give "expected".
 */

static void
check_stream(const char *in, int broken, size_t cap, int include_usage,
    const char *expected, int succeeded)
{
    run_t   r;
    size_t  len, i, *cuts, n;
    char    what[64];

    len = strlen(in);

    run_init(&r, cap, include_usage, 0);
    run_split(&r, in, len, NULL, 0, broken);
    expect_out(&r, expected, "whole");
    assert_int_equal(alm_sse_succeeded(&r.sse), succeeded);
    run_free(&r);

    for (i = 1; i < len; i++) {
        run_init(&r, cap, include_usage, 0);
        run_split(&r, in, len, &i, 1, broken);
        snprintf(what, sizeof(what), "cut at %zu", i);
        expect_out(&r, expected, what);
        assert_int_equal(alm_sse_succeeded(&r.sse), succeeded);
        run_free(&r);
    }

    cuts = malloc(len * sizeof(size_t) + 1);
    assert_non_null(cuts);

    for (i = 1; i < len; i++) {
        cuts[i - 1] = i;
    }

    run_init(&r, cap, include_usage, 0);
    run_split(&r, in, len, cuts, len ? len - 1 : 0, broken);
    expect_out(&r, expected, "byte by byte");
    run_free(&r);

    n = 0;
    for (i = 7; i < len; i += 7) {
        cuts[n++] = i;
    }

    run_init(&r, cap, include_usage, 0);
    run_split(&r, in, len, cuts, n, broken);
    expect_out(&r, expected, "pieces of 7");
    run_free(&r);

    free(cuts);
}


/* ------------------------------------------------------------------ */

static void
test_typical(void **state)
{
    (void) state;

    check_stream(TYPICAL, 0, 4096, 0, TYPICAL_OUT, 1);

    /* the upstream closing the connection after finalize is not broken */
    check_stream(TYPICAL, 1, 4096, 0, TYPICAL_OUT, 1);
}


static void
test_many_frames_one_feed(void **state)
{
    run_t  r;

    (void) state;

    run_init(&r, 4096, 0, 0);
    assert_int_equal(alm_sse_feed(&r.sse, S(TYPICAL)), ALM_OK);

    /* one feed, one piece of output */
    assert_int_equal(r.out.calls, 1);
    expect_out(&r, TYPICAL_OUT, "one feed");
    assert_true(alm_sse_succeeded(&r.sse));

    /* after [DONE] everything is ignored */
    assert_int_equal(alm_sse_feed(&r.sse, S(F_CHUNK("late", "false"))),
                     ALM_OK);
    assert_int_equal(alm_sse_finish(&r.sse, 1), ALM_OK);
    assert_int_equal(r.out.calls, 1);
    run_free(&r);
}


static void
test_include_usage(void **state)
{
    (void) state;

    check_stream(TYPICAL, 0, 4096, 1,
        HEAD "{\"index\":0,\"delta\":{" ROLE "\"content\":\"Hello\"},"
        "\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n"
        HEAD "{\"index\":0,\"delta\":{\"content\":\" world\"},"
        "\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n"
        HEAD "{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":"
        "\"stop\"}],\"usage\":null}\n\n"
        HEAD "],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":2,"
        "\"total_tokens\":13}}\n\n" DONE, 1);

    /* no metrics anywhere: zeros */
    check_stream(F_CHUNK("a", "true") "data: {\"type\":"
                 "\"finalizeResponseStream\",\"metrics\":{}}\n\n", 0, 4096, 1,
        HEAD "{\"index\":0,\"delta\":{" ROLE "\"content\":\"a\"},"
        "\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n"
        HEAD "{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":"
        "\"stop\"}],\"usage\":null}\n\n"
        HEAD "],\"usage\":{\"prompt_tokens\":0,\"completion_tokens\":0,"
        "\"total_tokens\":0}}\n\n" DONE, 1);
}


static void
test_crlf(void **state)
{
    (void) state;

    check_stream("data: {\"type\":\"textResponseChunk\",\"textResponse\":"
                 "\"Hi\",\"close\":false}\r\n\r\n"
                 "data:{\"type\":\"textResponseChunk\",\"textResponse\":"
                 "\"!\",\"close\":true}\r\n\r\n"
                 "data: {\"type\":\"finalizeResponseStream\",\"close\":true}"
                 "\r\n\r\n", 0, 4096, 0,
                 CONTENT(ROLE, "Hi") CONTENT("", "!") STOP DONE, 1);
}


static void
test_agent_path(void **state)
{
    (void) state;

    /* chunks, then the whole text again, usage before the end */
    check_stream("data: {\"type\":\"statusResponse\",\"textResponse\":"
                 "\"Thinking\",\"close\":false}\n\n"
                 "data: {\"type\":\"agentThought\",\"thought\":\"hmm\"}\n\n"
                 F_CHUNK("Hel", "false") F_CHUNK("lo", "false")
                 "data: {\"uuid\":\"u2\",\"type\":\"textResponse\","
                 "\"textResponse\":\"Hello\",\"close\":true}\n\n"
                 "data: {\"type\":\"usageMetrics\",\"metrics\":"
                 "{\"prompt_tokens\":5,\"completion_tokens\":1}}\n\n"
                 "data: {\"type\":\"fileDownload\",\"content\":{}}\n\n"
                 "data: {\"type\":\"finalizeResponseStream\",\"close\":true,"
                 "\"metrics\":{}}\n\n", 0, 4096, 1,
        HEAD "{\"index\":0,\"delta\":{" ROLE "\"content\":\"Hel\"},"
        "\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n"
        HEAD "{\"index\":0,\"delta\":{\"content\":\"lo\"},"
        "\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n"
        HEAD "{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":"
        "\"stop\"}],\"usage\":null}\n\n"
        HEAD "],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1,"
        "\"total_tokens\":6}}\n\n" DONE, 1);

    /* no chunks: the whole-text frame is the answer, once */
    check_stream("data: {\"type\":\"textResponse\",\"textResponse\":"
                 "\"Whole\",\"close\":true}\n\n"
                 "data: {\"type\":\"textResponse\",\"textResponse\":"
                 "\"Whole\",\"close\":true}\n\n"
                 "data: {\"type\":\"finalizeResponseStream\",\"close\":true,"
                 "\"textResponse\":\"Whole\"}\n\n", 0, 4096, 0,
                 CONTENT(ROLE, "Whole") STOP DONE, 1);
}


static void
test_finalize_text(void **state)
{
    (void) state;

    /* the answer only in finalize, textChunk as the field name */
    check_stream("data: {\"type\":\"finalizeResponseStream\",\"close\":true,"
                 "\"textChunk\":\"All \\\"at\\\" once\\n\",\"metrics\":"
                 "{\"prompt_tokens\":1,\"completion_tokens\":2,"
                 "\"total_tokens\":3}}\n\n", 0, 4096, 0,
                 CONTENT(ROLE, "All \\\"at\\\" once\\n") STOP DONE, 1);

    /* finalize with text after chunks: not content again */
    check_stream(F_CHUNK("A", "false")
                 "data: {\"type\":\"finalizeResponseStream\",\"close\":true,"
                 "\"textResponse\":\"A\"}\n\n", 0, 4096, 0,
                 CONTENT(ROLE, "A") STOP DONE, 1);

    /* an empty answer still has its role */
    check_stream(F_CHUNK("", "true") F_FINAL, 0, 4096, 0,
                 CONTENT(ROLE, "") STOP DONE, 1);
}


static void
test_abort(void **state)
{
    (void) state;

    /* before any chunk */
    check_stream(F_ABORT("The model failed."), 0, 4096, 0,
                 ERROR("The model failed."), 0);

    /* after chunks */
    check_stream(F_CHUNK("Hel", "false") F_ABORT("Premature close"), 0, 4096,
                 0, CONTENT(ROLE, "Hel") ERROR("Premature close"), 0);

    /* then finalize: ignored */
    check_stream(F_CHUNK("Hel", "false") F_ABORT("Premature close") F_FINAL
                 F_CHUNK("more", "true"), 0, 4096, 1,
                 HEAD "{\"index\":0,\"delta\":{" ROLE "\"content\":\"Hel\"},"
                 "\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}"
                 "\n\n" ERROR("Premature close"), 0);

    /* no error text; an escaped one */
    check_stream("data: {\"type\":\"abort\",\"error\":null}\n\n", 0, 4096, 0,
                 ERROR("AnythingLLM aborted the answer."), 0);
    check_stream("data: {\"type\":\"abort\",\"error\":\"\"}\n\n", 1, 4096, 0,
                 ERROR("AnythingLLM aborted the answer."), 0);
    check_stream(F_ABORT("a \\\"b\\\"\\n"), 0, 4096, 0,
                 ERROR("a \\\"b\\\"\\n"), 0);
}


static void
test_premature_end(void **state)
{
    (void) state;

    /* no close: the stream ended early */
    check_stream(F_CHUNK("Hel", "false"), 0, 4096, 0,
                 CONTENT(ROLE, "Hel") ERROR(EARLY), 0);
    check_stream(F_CHUNK("Hel", "false"), 1, 4096, 0,
                 CONTENT(ROLE, "Hel") ERROR(BROKEN), 0);
    check_stream("", 0, 4096, 0, ERROR(EARLY), 0);
    check_stream("", 1, 4096, 0, ERROR(BROKEN), 0);

    /* closed answer, but the connection broke before finalize */
    check_stream(F_CHUNK("Hi", "true"), 1, 4096, 0,
                 CONTENT(ROLE, "Hi") ERROR(BROKEN), 0);

    /* closed answer and a clean end without finalize: complete */
    check_stream(F_CHUNK("Hi", "true"), 0, 4096, 1,
                 HEAD "{\"index\":0,\"delta\":{" ROLE "\"content\":\"Hi\"},"
                 "\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}"
                 "\n\n"
                 HEAD "{\"index\":0,\"delta\":{},\"logprobs\":null,"
                 "\"finish_reason\":\"stop\"}],\"usage\":null}\n\n"
                 HEAD "],\"usage\":{\"prompt_tokens\":0,\"completion_tokens\":"
                 "0,\"total_tokens\":0}}\n\n" DONE, 1);

    /* a frame cut short is dropped */
    check_stream(F_CHUNK("Hi", "false") "data: {\"type\":\"textResponse"
                 "Chunk\",\"textResponse\":\"x\",\"close\":true}", 0, 4096,
                 0, CONTENT(ROLE, "Hi") ERROR(EARLY), 0);
}


static void
test_query_refusal(void **state)
{
    (void) state;

    check_stream("data: {\"id\":\"u9\",\"type\":\"textResponse\","
                 "\"textResponse\":\"There is no relevant information in "
                 "this workspace to answer your query.\",\"sources\":[],"
                 "\"close\":true,\"error\":null}\n\n", 0, 4096, 0,
                 CONTENT(ROLE, "There is no relevant information in this "
                         "workspace to answer your query.") STOP DONE, 1);
}


static void
test_ignored_input(void **state)
{
    (void) state;

    check_stream(": a comment\n"
                 "event: message\n"
                 "id: 5\n"
                 "retry: 1000\n"
                 "\n\n\n"
                 "data\n"
                 "dat\n"
                 "data:\n"
                 "data: \n"
                 "data: [DONE]\n"
                 "data: not json\n"
                 "data: [1,2]\n"
                 "data: \"str\"\n"
                 "data: {\"type\":5}\n"
                 "data: {\"no\":\"type\"}\n"
                 "data: {\"type\":\"somethingNew\",\"textResponse\":\"x\","
                 "\"close\":true}\n"
                 "data: {\"type\":\"textResponseChunk\",\"textResponse\":5}\n"
                 "data: {\"type\":\"textResponseChunk\",\"textResponse\":\"\","
                 "\"close\":false}\n"
                 "data: {\"type\":\"textResponseChunk\",\"textResponse\":"
                 "\"\\ud800\"}\n"
                 "DATA: {\"type\":\"abort\"}\n"
                 " data: {\"type\":\"abort\"}\n"
                 F_CHUNK("ok", "false")
                 "data: {\"type\":\"textResponse\",\"textResponse\":\"no\","
                 "\"close\":false}\n"
                 F_FINAL, 0, 4096, 0,
                 CONTENT(ROLE, "ok") STOP DONE, 1);
}


static void
test_escaping(void **state)
{
    (void) state;

    check_stream(F_CHUNK("\\u0001 \\\" \\\\ \\t caf\\u00e9 \\ud83d\\ude00",
                         "false") F_FINAL, 0, 4096, 0,
                 CONTENT(ROLE, "\\u0001 \\\" \\\\ \\t caf\xc3\xa9 "
                         "\xf0\x9f\x98\x80") STOP DONE, 1);
}


static void
test_oversized(void **state)
{
    char  big[600], in[1200], out[2048];

    (void) state;

    /* a 100-byte bound: the typical frames are longer */
    check_stream(TYPICAL, 0, 100, 0,
                 ERROR("AnythingLLM sent a stream frame larger than the "
                       "gateway accepts."), 0);

    /* after some content; later frames are ignored */
    memset(big, 'x', 300);
    big[300] = '\0';
    snprintf(in, sizeof(in), "data: {\"type\":\"textResponseChunk\","
             "\"textResponse\":\"a\"}\n\n"
             "data: {\"type\":\"textResponseChunk\",\"textResponse\":\"%s\"}"
             "\n\n" F_CHUNK("b", "true") F_FINAL, big);
    check_stream(in, 0, 200, 0, CONTENT(ROLE, "a")
                 ERROR("AnythingLLM sent a stream frame larger than the "
                       "gateway accepts."), 0);

    /* a line of exactly the bound is accepted, one more byte is not */
    snprintf(in, sizeof(in), "data: {\"type\":\"textResponseChunk\","
             "\"textResponse\":\"a\"}\r\n\r\n");
    snprintf(out, sizeof(out), "%s", CONTENT(ROLE, "a") ERROR(EARLY));
    check_stream(in, 0, strlen(in) - 3, 0, out, 0);
    check_stream(in, 0, strlen(in) - 4, 0,
                 ERROR("AnythingLLM sent a stream frame larger than the "
                       "gateway accepts."), 0);

    /* other lines are skipped whatever their length */
    memset(big, 'c', 500);
    big[500] = '\0';
    snprintf(in, sizeof(in), ": %s\n\n" F_CHUNK("a", "true"), big);
    check_stream(in, 0, 120, 0, CONTENT(ROLE, "a") STOP DONE, 1);
}


static void
test_split_prefix(void **state)
{
    run_t  r;

    (void) state;

    /* a line whose first bytes look like "data:" for a while */
    run_init(&r, 4096, 0, 0);
    assert_int_equal(alm_sse_feed(&r.sse, S("da")), ALM_OK);
    assert_int_equal(alm_sse_feed(&r.sse, S("tx: {\"type\":\"abort\"}\n")),
                     ALM_OK);
    assert_int_equal(alm_sse_feed(&r.sse, S("d")), ALM_OK);
    assert_int_equal(alm_sse_feed(&r.sse, S("at")), ALM_OK);
    assert_int_equal(alm_sse_feed(&r.sse, S("a")), ALM_OK);
    assert_int_equal(alm_sse_feed(&r.sse, S(": {\"type\":\"textResponse\","
                                            "\"textResponse\":\"q\",")),
                     ALM_OK);
    assert_int_equal(r.out.calls, 0);
    assert_int_equal(alm_sse_feed(&r.sse, S("\"close\":true}\n\n")), ALM_OK);
    assert_int_equal(r.out.calls, 1);
    assert_int_equal(alm_sse_feed(&r.sse, S("")), ALM_OK);
    assert_int_equal(alm_sse_finish(&r.sse, 0), ALM_OK);
    expect_out(&r, CONTENT(ROLE, "q") STOP DONE, "prefix");
    run_free(&r);
}


static void
test_emit_failure(void **state)
{
    run_t  r;

    (void) state;

    run_init(&r, 4096, 0, 0);
    r.out.fail_at = 2;
    assert_int_equal(alm_sse_feed(&r.sse, S(F_CHUNK("a", "false"))), ALM_OK);
    assert_int_equal(alm_sse_feed(&r.sse, S(F_CHUNK("b", "false"))),
                     ALM_ERROR);

    /* stopped for good */
    assert_int_equal(alm_sse_feed(&r.sse, S(F_FINAL)), ALM_OK);
    assert_int_equal(alm_sse_finish(&r.sse, 0), ALM_OK);
    assert_int_equal(r.out.calls, 2);
    assert_false(alm_sse_succeeded(&r.sse));
    run_free(&r);

    run_init(&r, 4096, 0, 0);
    r.out.fail_at = 1;
    assert_int_equal(alm_sse_finish(&r.sse, 0), ALM_ERROR);
    assert_false(alm_sse_succeeded(&r.sse));
    run_free(&r);
}


/* a run whose answer goes on from a parsed request's digest */

static void
run_init_conv(run_t *r, const alm_chat_req_t *req)
{
    run_init(r, 4096, 0, 0);
    r->conv = req->full;
    r->sse.conv = &r->conv;
}


/* the run's digest must be "hex"; the run is released */

static void
expect_conv(run_t *r, const char *hex)
{
    char  a[ALM_DIGEST_HEX_LEN];

    alm_conv_hash_hex(&r->conv, a);
    assert_memory_equal(a, hex, ALM_DIGEST_HEX_LEN);
    run_free(r);
}


static void
test_conv(void **state)
{
    run_t            r;
    alm_chat_req_t   req;
    alm_error_t      err;
    char             b[ALM_DIGEST_HEX_LEN];
    static const char  turn1[] =
        "{\"model\":\"ws\",\"messages\":[{\"role\":\"user\",\"content\":"
        "\"Hi\"}]}";
    static const char  turn2[] =
        "{\"model\":\"ws\",\"messages\":[{\"role\":\"user\",\"content\":"
        "\"Hi\"},{\"role\":\"assistant\",\"content\":\"Hello world\"},"
        "{\"role\":\"user\",\"content\":\"More\"}]}";
    static const char  turn2_empty[] =
        "{\"model\":\"ws\",\"messages\":[{\"role\":\"user\",\"content\":"
        "\"Hi\"},{\"role\":\"assistant\",\"content\":\"\"},"
        "{\"role\":\"user\",\"content\":\"More\"}]}";

    (void) state;

    assert_int_equal(alm_chat_req_parse(S(turn2), KEY, &req, &err), ALM_OK);
    memcpy(b, req.prefix_hex, ALM_DIGEST_HEX_LEN);
    alm_chat_req_free(&req);

    /* the streamed answer, cut in the middle of a frame */
    assert_int_equal(alm_chat_req_parse(S(turn1), KEY, &req, &err), ALM_OK);
    run_init_conv(&r, &req);
    assert_int_equal(alm_sse_feed(&r.sse, TYPICAL, 40), ALM_OK);
    assert_int_equal(alm_sse_feed(&r.sse, TYPICAL + 40, strlen(TYPICAL) - 40),
                     ALM_OK);
    assert_int_equal(alm_sse_finish(&r.sse, 0), ALM_OK);
    assert_true(alm_sse_succeeded(&r.sse));
    expect_conv(&r, b);

    /* the same answer from a query-mode single frame */
    run_init_conv(&r, &req);
    assert_int_equal(alm_sse_feed(&r.sse, S("data: {\"type\":\"textResponse"
                                            "\",\"textResponse\":\"Hello "
                                            "world\",\"close\":true}\n\n")),
                     ALM_OK);
    assert_int_equal(alm_sse_finish(&r.sse, 0), ALM_OK);
    expect_conv(&r, b);
    alm_chat_req_free(&req);

    /* an empty answer is an empty assistant message */
    assert_int_equal(alm_chat_req_parse(S(turn2_empty), KEY, &req, &err),
                     ALM_OK);
    memcpy(b, req.prefix_hex, ALM_DIGEST_HEX_LEN);
    alm_chat_req_free(&req);

    assert_int_equal(alm_chat_req_parse(S(turn1), KEY, &req, &err), ALM_OK);
    run_init_conv(&r, &req);
    assert_int_equal(alm_sse_feed(&r.sse, S(F_FINAL)), ALM_OK);
    expect_conv(&r, b);
    alm_chat_req_free(&req);
}


static void
run_init_meta(run_t *r, const alm_completion_meta_t *m)
{
    memset(r, 0, sizeof(run_t));
    r->buf = malloc(64);
    assert_non_null(r->buf);
    alm_sse_init(&r->sse, r->buf, 64, m, 0, NULL, sink_emit, &r->out);
}


static void
test_meta_escaped(void **state)
{
    run_t                  r;
    alm_completion_meta_t  m;

    (void) state;

    m.id = "id\"x";
    m.id_len = 4;
    m.model = "w";
    m.model_len = 1;
    m.created = 5;

    run_init_meta(&r, &m);
    assert_int_equal(alm_sse_finish(&r.sse, 0), ALM_OK);
    expect_out(&r, ERROR(EARLY), "no id needed");
    run_free(&r);

    run_init_meta(&r, &m);
    assert_int_equal(alm_sse_feed(&r.sse, S("data: {\"type\":"
                                            "\"finalizeResponseStream\"}\n")),
                     ALM_OK);
    expect_out(&r,
        "data: {\"id\":\"id\\\"x\",\"object\":\"chat.completion.chunk\","
        "\"created\":5,\"model\":\"w\",\"choices\":[{\"index\":0,\"delta\":"
        "{\"role\":\"assistant\",\"content\":\"\"},\"logprobs\":null,"
        "\"finish_reason\":null}]}\n\n"
        "data: {\"id\":\"id\\\"x\",\"object\":\"chat.completion.chunk\","
        "\"created\":5,\"model\":\"w\",\"choices\":[{\"index\":0,\"delta\":"
        "{},\"logprobs\":null,\"finish_reason\":\"stop\"}]}\n\n" DONE,
        "escaped id");
    run_free(&r);
}


/* ------------------------------------------------------------------ */
/* the frame reader against cJSON                                     */

static void
expect_str(const alm_frame_t *f, int bit, const alm_frame_str_t *str,
    const cJSON *item, const char *json)
{
    char    *buf;
    size_t   n;

    if (!cJSON_IsString(item)) {
        if (f->strings & (1u << bit)) {
            print_error("member %d read as a string: %s\n", bit, json);
            fail();
        }

        return;
    }

    assert_true(f->strings & (1u << bit));

    buf = malloc(str->len + 1);
    assert_non_null(buf);

    n = alm_frame_str_decode(str, buf, str->len);

    if (n != strlen(item->valuestring)
        || memcmp(buf, item->valuestring, n) != 0)
    {
        print_error("member %d: %.*s, cJSON: %s (%s)\n", bit, (int) n, buf,
                    item->valuestring, json);
        fail();
    }

    free(buf);
}


/* the frame reader and cJSON agree on "json"; returns the verdict */

static int
frame_like_cjson(const char *json, size_t len, alm_frame_t *f)
{
    int           i, ok;
    cJSON        *root;
    const cJSON  *m, *c;
    static const char  *counts[] = {
        "prompt_tokens", "completion_tokens", "total_tokens"
    };

    root = cJSON_ParseWithLength(json, len);
    ok = alm_frame_read(json, len, f);

    if (ok != cJSON_IsObject(root)) {
        print_error("frame reader %d, cJSON %d: %.*s\n", ok,
                    cJSON_IsObject(root), (int) len, json);
        fail();
    }

    if (ok) {
        expect_str(f, ALM_FRAME_TYPE, &f->type,
                   cJSON_GetObjectItemCaseSensitive(root, "type"), json);
        expect_str(f, ALM_FRAME_TEXT_RESPONSE, &f->text_response,
                   cJSON_GetObjectItemCaseSensitive(root, "textResponse"),
                   json);
        expect_str(f, ALM_FRAME_TEXT_CHUNK, &f->text_chunk,
                   cJSON_GetObjectItemCaseSensitive(root, "textChunk"), json);
        expect_str(f, ALM_FRAME_ERROR, &f->error,
                   cJSON_GetObjectItemCaseSensitive(root, "error"), json);
        assert_int_equal(f->close, cJSON_IsTrue(
                             cJSON_GetObjectItemCaseSensitive(root, "close")));

        m = cJSON_GetObjectItemCaseSensitive(root, "metrics");
        assert_int_equal(f->metrics, cJSON_IsObject(m));

        for (i = 0; f->metrics && i < 3; i++) {
            c = cJSON_GetObjectItemCaseSensitive(m, counts[i]);
            assert_int_equal(cJSON_IsNumber(c),
                             !!(f->count_found & (1u << i)));

            if (cJSON_IsNumber(c)) {
                assert_memory_equal(&c->valuedouble, &f->count[i],
                                    sizeof(double));
            }
        }
    }

    cJSON_Delete(root);

    return ok;
}


static void
test_frame_reader(void **state)
{
    size_t       i;
    alm_frame_t  f;
    static const struct {
        const char  *json;
        int          ok;
    } cases[] = {
        { "{}", 1 },
        { "", 0 },
        { " ", 0 },
        { "{", 0 },
        { "{\"a\"", 0 },
        { "{\"a\":", 0 },
        { "{\"a\":1,", 0 },
        { "{\"a\":1,}", 0 },
        { "{,}", 0 },
        { "[]", 0 },
        { "\"x\"", 0 },
        { "null", 0 },
        { "{\"type\":\"abort\"} trailing garbage", 1 },
        { "\x01\x1f {\"type\":\"abort\"}", 1 },
        { "\xef\xbb\xbf{\"type\":\"abort\"}", 1 },
        { "\xef\xbb\xbf{}", 1 },
        { "\xef\xbb\xbf{", 0 },
        { "{\"type\" \x7f: 1}", 0 },
        /* the first member of a name counts, whatever it holds */
        { "{\"type\":5,\"type\":\"abort\"}", 1 },
        { "{\"type\":\"abort\",\"type\":5}", 1 },
        { "{\"textResponse\":null,\"textChunk\":\"b\"}", 1 },
        { "{\"textResponse\":\"a\",\"textChunk\":\"b\"}", 1 },
        { "{\"close\":true,\"close\":false}", 1 },
        { "{\"close\":1}", 1 },
        { "{\"close\":\"true\"}", 1 },
        /* names and strings end at their first NUL, as C strings */
        { "{\"type\\u0000x\":\"abort\"}", 1 },
        { "{\"ty\\u0070e\":\"abort\"}", 1 },
        { "{\"type\":\"abort\\u0000x\",\"error\":\"\\u0000\"}", 1 },
        { "{\"error\":\"a\\uZZZZb\"}", 1 },
        { "{\"error\":\"a\\u12\\\"x\"}", 1 },
        /* escapes */
        { "{\"error\":\"\\b\\f\\n\\r\\t\\\"\\\\\\/\"}", 1 },
        { "{\"error\":\"\\x\"}", 0 },
        { "{\"error\":\"\\u00e9\\u20ac\\ud83d\\ude00\"}", 1 },
        { "{\"error\":\"\\ud800\"}", 0 },
        { "{\"error\":\"\\udc00\"}", 0 },
        { "{\"error\":\"\\ud800\\u0041\"}", 0 },
        { "{\"error\":\"\\ud800x\\udc00\"}", 0 },
        { "{\"error\":\"\\u12\"}", 0 },
        { "{\"error\":\"\\\"}", 0 },
        { "{\"error\":\"abc\\", 0 },
        /* raw bytes pass into strings as they are */
        { "{\"error\":\"a\x01\tb\xff\xc3\"}", 1 },
        { "{\"error\":\"a", 0 },
        /* numbers as strtod() takes them */
        { "{\"metrics\":{\"prompt_tokens\":12,\"completion_tokens\":-0.5,"
          "\"total_tokens\":1e999}}", 1 },
        { "{\"metrics\":{\"prompt_tokens\":1.,\"completion_tokens\":-.5,"
          "\"total_tokens\":007}}", 1 },
        { "{\"metrics\":{\"prompt_tokens\":1e}}", 0 },
        { "{\"metrics\":{\"prompt_tokens\":1e+}}", 0 },
        { "{\"metrics\":{\"prompt_tokens\":-}}", 0 },
        { "{\"metrics\":{\"prompt_tokens\":1.2.3}}", 0 },
        { "{\"metrics\":{\"prompt_tokens\":+1}}", 0 },
        { "{\"metrics\":{\"prompt_tokens\":0x10}}", 0 },
        { "{\"metrics\":{\"prompt_tokens\":"
          "00000000000000000000000000000000000000000000000000000000000000000"
          "000000000000000000000000000000000000000000000000000000000000000042"
          "}}", 1 },
        { "{\"metrics\":{\"prompt_tokens\":\"5\",\"prompt_tokens\":5}}", 1 },
        { "{\"metrics\":{\"prompt_tokens\":5,\"prompt_tokens\":\"x\"}}", 1 },
        { "{\"metrics\":[1,2],\"metrics\":{\"total_tokens\":3}}", 1 },
        { "{\"metrics\":{}}", 1 },
        { "{\"metrics\":{\"a\":[{\"b\":[]}],\"total_tokens\":3}}", 1 },
        /* values passed over are checked all the same */
        { "{\"sources\":[1,\"a\",{\"b\":null},[true,false]],\"type\":\"x\"}",
          1 },
        { "{\"sources\":[1,],\"type\":\"x\"}", 0 },
        { "{\"sources\":[nul],\"type\":\"x\"}", 0 },
        { "{\"sources\":{\"a\" 1}}", 0 },
        { "{\"sources\":{1:2}}", 0 },
        { "{\"sources\":[1 2]}", 0 },
        { "{\"sources\":tru}", 0 },
        { "{\"sources\":[}", 0 },
    };

    (void) state;

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        assert_int_equal(frame_like_cjson(cases[i].json,
                                          strlen(cases[i].json), &f),
                         cases[i].ok);
    }

    /* what the table checks against cJSON, spelt out once */

    assert_true(frame_like_cjson(S("{\"type\\u0000x\":\"ab\\u0000c\"}"), &f));
    assert_int_equal(f.type.len, 9);
    assert_int_equal(f.type.flags, ALM_FRAME_STR_ESCAPED);

    assert_true(frame_like_cjson(S("{\"type\":5,\"type\":\"abort\"}"), &f));
    assert_int_equal(f.strings, 0);

    assert_true(frame_like_cjson(S("{\"error\":\"a\x01\xff\"}"), &f));
    assert_int_equal(f.error.flags, ALM_FRAME_STR_RAW);
}


/* containers nest 1000 deep, the root object included, as in cJSON */

static void
test_frame_depth(void **state)
{
    char         *json;
    size_t        n, i, depth;
    alm_frame_t   f;

    (void) state;

    json = malloc(4096);
    assert_non_null(json);

    for (depth = 998; depth <= 1001; depth++) {
        n = 0;
        memcpy(json, "{\"a\":", 5);
        n = 5;

        for (i = 1; i < depth; i++) {
            json[n++] = i % 2 ? '[' : '{';

            if (i % 2 == 0) {
                memcpy(json + n, "\"k\":", 4);
                n += 4;
            }
        }

        json[n++] = '1';

        for (i = depth - 1; i >= 1; i--) {
            json[n++] = i % 2 ? ']' : '}';
        }

        json[n++] = '}';

        assert_int_equal(frame_like_cjson(json, n, &f), depth <= 1000);
    }

    free(json);
}


/*
 * Texts with escapes are decoded on the stack when short and in the
 * line buffer when long, wherever the line lies; the output is the
 * same either way.
 */

static void
test_long_escaped(void **state)
{
    char    *in, *out, *p, *q;
    size_t   i, n;

    (void) state;

    in = malloc(8192);
    out = malloc(16384);
    assert_non_null(in);
    assert_non_null(out);

    for (n = 500; n <= 530; n += 15) {
        p = in;
        p += sprintf(p, "data: {\"type\":\"textResponseChunk\","
                        "\"textResponse\":\"");

        for (i = 0; i < n; i++) {
            p += sprintf(p, i % 10 ? "a" : "\\n");
        }

        p += sprintf(p, "\\u00e9\",\"close\":true}\n\n");
        p += sprintf(p, "data: {\"type\":\"abort\",\"error\":\"");

        for (i = 0; i < n; i++) {
            p += sprintf(p, i % 10 ? "e" : "\\t");
        }

        p += sprintf(p, "\"}\n\n");

        q = out;
        q += sprintf(q, HEAD "{\"index\":0,\"delta\":{" ROLE "\"content\":\"");

        for (i = 0; i < n; i++) {
            q += sprintf(q, i % 10 ? "a" : "\\n");
        }

        q += sprintf(q, "\xc3\xa9\"},\"logprobs\":null,\"finish_reason\":"
                        "null}]}\n\n"
                        "data: {\"error\":{\"message\":\"");

        for (i = 0; i < n; i++) {
            q += sprintf(q, i % 10 ? "e" : "\\t");
        }

        sprintf(q, "\",\"type\":\"server_error\",\"param\":null,"
                   "\"code\":null}}\n\n" DONE);

        check_stream(in, 0, 4096, 0, out, 0);
    }

    free(in);
    free(out);
}


/* token counts: the first of each name, clamped as whole answers are */

static void
test_usage_counts(void **state)
{
    (void) state;

    check_stream(F_CHUNK("a", "false")
                 "data: {\"type\":\"usageMetrics\",\"metrics\":"
                 "{\"prompt_tokens\":7.9,\"prompt_tokens\":1,"
                 "\"completion_tokens\":-3,\"total_tokens\":0}}\n"
                 "data: {\"type\":\"finalizeResponseStream\",\"metrics\":"
                 "{\"prompt_tokens\":\"9\"}}\n", 0, 4096, 1,
        HEAD "{\"index\":0,\"delta\":{" ROLE "\"content\":\"a\"},"
        "\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n"
        HEAD "{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":"
        "\"stop\"}],\"usage\":null}\n\n"
        HEAD "],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":0,"
        "\"total_tokens\":7}}\n\n" DONE, 1);
}


/*
 * Token frames alike but for their text are acted on without being
 * read again; a text that could end or change its string, or another
 * byte that differs, has the frame read whole.
 */

static void
test_same_shape(void **state)
{
    (void) state;

    check_stream(F_CHUNK("a", "false") F_CHUNK("b", "false")
                 F_CHUNK("", "false")
                 F_CHUNK("caf\xc3\xa9 \xff", "false")
                 F_CHUNK("q\\\"x", "false")
                 F_CHUNK("t\tu", "false")
                 F_CHUNK("\",\"type\":\"abort", "false")
                 F_CHUNK("c\",\"textResponse\":\"d", "false")
                 F_CHUNK("e", "false")
                 "data: {\"uuid\":\"u2\",\"sources\":[],\"type\":"
                 "\"textResponseChunk\",\"textResponse\":\"f\",\"close\":"
                 "false,\"error\":false}\n\n"
                 F_CHUNK("g", "true"), 0, 4096, 0,
                 CONTENT(ROLE, "a") CONTENT("", "b")
                 CONTENT("", "caf\xc3\xa9 \\ufffd") CONTENT("", "q\\\"x")
                 CONTENT("", "t\\tu") CONTENT("", "c")
                 CONTENT("", "e") CONTENT("", "f") CONTENT("", "g")
                 STOP DONE, 1);

    /* the frame of the last shape ends an answer as it would read */
    check_stream(F_CHUNK("a", "true") F_CHUNK("b", "true"), 0, 4096, 0,
                 CONTENT(ROLE, "a") CONTENT("", "b") STOP DONE, 1);

    check_stream(F_CHUNK("a", "false") F_CHUNK("b", "false"), 0, 4096, 0,
                 CONTENT(ROLE, "a") CONTENT("", "b") ERROR(EARLY), 0);
}


int
main(void)
{
    const struct CMUnitTest  tests[] = {
        cmocka_unit_test(test_typical),
        cmocka_unit_test(test_many_frames_one_feed),
        cmocka_unit_test(test_include_usage),
        cmocka_unit_test(test_crlf),
        cmocka_unit_test(test_agent_path),
        cmocka_unit_test(test_finalize_text),
        cmocka_unit_test(test_abort),
        cmocka_unit_test(test_premature_end),
        cmocka_unit_test(test_query_refusal),
        cmocka_unit_test(test_ignored_input),
        cmocka_unit_test(test_escaping),
        cmocka_unit_test(test_oversized),
        cmocka_unit_test(test_split_prefix),
        cmocka_unit_test(test_emit_failure),
        cmocka_unit_test(test_conv),
        cmocka_unit_test(test_meta_escaped),
        cmocka_unit_test(test_frame_reader),
        cmocka_unit_test(test_frame_depth),
        cmocka_unit_test(test_long_escaped),
        cmocka_unit_test(test_usage_counts),
        cmocka_unit_test(test_same_shape),
    };

    return cmocka_run_group_tests_name("sse", tests, NULL, NULL);
}
