/*
 * Copyright (C) ngx_anythingllm authors
 *
 * JSON output (alm_json.c): escaping, the growable writer, and parsed
 * values written back as cJSON writes them.
 */


#include "test_common.h"

#include <float.h>
#include <math.h>

#include "alm_json.h"


static void
test_json_escape(void **state)
{
    char    out[128];
    size_t  n;

    (void) state;

    n = alm_json_escape(out, S("a\"b\\c\n\r\t\b\f\x01\x1f\x7f"));
    assert_int_equal(n, alm_json_escape(NULL, S("a\"b\\c\n\r\t\b\f\x01\x1f"
                                                "\x7f")));
    assert_memory_equal(out, "a\\\"b\\\\c\\n\\r\\t\\b\\f\\u0001\\u001f\x7f",
                        n);

    /* valid UTF-8 passes, invalid bytes become U+FFFD */
    n = alm_json_escape(out, S("\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80"));
    assert_int_equal(n, 9);
    assert_memory_equal(out, "\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80", 9);

    n = alm_json_escape(out, S("\xff" "a" "\xc3" "\xc0\xaf" "\xed\xa0\x80"));
    assert_memory_equal(out, "\\ufffda\\ufffd\\ufffd\\ufffd\\ufffd\\ufffd"
                             "\\ufffd", n);

    /* truncated sequence at the end */
    n = alm_json_escape(out, S("x\xe2\x82"));
    assert_memory_equal(out, "x\\ufffd\\ufffd", n);

    n = alm_json_escape(out, "a\0b", 3);
    assert_memory_equal(out, "a\\u0000b", n);

    assert_int_equal(alm_json_escape(NULL, NULL, 0), 0);
}


/* the text a writer holds; the writer is emptied */

static void
expect_buf(alm_buf_t *b, const char *text)
{
    char    *p;
    size_t   len;

    p = alm_buf_take(b, &len);
    assert_non_null(p);
    assert_int_equal(len, strlen(text));
    assert_string_equal(p, text);
    free(p);

    assert_null(b->data);
    assert_int_equal(b->len, 0);
}


static void
test_buf(void **state)
{
    int         i;
    char       *p;
    size_t      len;
    alm_buf_t   b;

    (void) state;

    memset(&b, 0, sizeof(alm_buf_t));

    /* an empty text is still a string */
    expect_buf(&b, "");

    alm_buf_raw(&b, "ab", 2);
    alm_buf_raw(&b, "xyz", 0);
    alm_buf_str(&b, "c\"");
    alm_buf_esc(&b, S("\"\n\xff"));
    alm_buf_raw(&b, ",", 1);
    alm_buf_json_str(&b, "q\"");
    alm_buf_raw(&b, ",", 1);
    alm_buf_json_str(&b, NULL);
    alm_buf_raw(&b, ",", 1);
    alm_buf_int(&b, -9223372036854775807LL - 1);
    alm_buf_raw(&b, ",", 1);
    alm_buf_int(&b, 1700000000);
    expect_buf(&b, "abc\"\\\"\\n\\ufffd,\"q\\\"\",null,"
                   "-9223372036854775808,1700000000");

    /* growing past the first allocation keeps every byte */
    for (i = 0; i < 5000; i++) {
        alm_buf_raw(&b, i % 2 ? "b" : "a", 1);
    }

    p = alm_buf_take(&b, &len);
    assert_non_null(p);
    assert_int_equal(len, 5000);
    assert_int_equal(strlen(p), 5000);
    assert_memory_equal(p + 4998, "ab", 2);
    free(p);

    /* out of memory: later appends do nothing, the text is lost */
    alm_buf_str(&b, "kept until");
    b.nomem = 1;
    alm_buf_str(&b, "more");
    alm_buf_int(&b, 5);
    assert_int_equal(b.len, 10);
    assert_null(alm_buf_take(&b, &len));
    assert_null(b.data);
    assert_int_equal(b.nomem, 0);

    /* a kept buffer is written again from its start */
    alm_buf_str(&b, "first");
    b.len = 0;
    alm_buf_str(&b, "second");
    expect_buf(&b, "second");

    alm_buf_str(&b, "freed");
    alm_buf_free(&b);
    assert_null(b.data);
    alm_buf_free(&b);
}


/* parsed values come out exactly as cJSON_PrintUnformatted() has them */

static void
test_json_value(void **state)
{
    size_t      i;
    char       *ours, *theirs;
    cJSON      *j;
    alm_buf_t   b;

    static const char  *texts[] = {
        "{}",
        "[]",
        "{\"a\":{\"b\":[[],{},null,true,false]},\"\":\"\"}",
        "[0,-0,1,-1,2147483647,2147483648,-2147483649,3000000000,1e15,"
        "1e16,1e300,1e-300,0.1,0.30000000000000004,123456789012345678,"
        "1.7976931348623157e308,5e-324,1700000000.5]",
        "[\"a\\u0001\\n\\\"\\\\\\/\\u00e9\\ud83d\\ude00\\u007f\"]",
        /* bytes that are not UTF-8 pass as cJSON passes them */
        "[\"\xff\xfe\",\"\xc3\xa9\",\"\xed\xa0\x80\"]",
        "{\"workspaces\":[{\"id\":1,\"slug\":\"a\",\"createdAt\":"
        "\"2024-01-01T00:00:00.000Z\",\"openAiTemp\":0.7}]}",
    };

    (void) state;

    for (i = 0; i < sizeof(texts) / sizeof(texts[0]); i++) {
        j = test_json(texts[i], strlen(texts[i]));

        theirs = cJSON_PrintUnformatted(j);
        assert_non_null(theirs);

        memset(&b, 0, sizeof(alm_buf_t));
        alm_json_value(&b, j);
        ours = alm_buf_take(&b, NULL);
        assert_non_null(ours);

        if (strcmp(ours, theirs) != 0) {
            print_error("text: %s\ncJSON: %s\nours:  %s\n", texts[i],
                        theirs, ours);
            fail();
        }

        free(ours);
        free(theirs);
        cJSON_Delete(j);
    }

    /* a string of given length ends at a NUL, as a C string would */
    memset(&b, 0, sizeof(alm_buf_t));
    alm_json_string_n(&b, "ab\0c", 4);
    alm_json_string_n(&b, NULL, 0);
    alm_json_string(&b, NULL);
    expect_buf(&b, "\"ab\"\"\"\"\"");
}


/* "%1.15g", or "%1.17g" when that does not read back: cJSON's rule */

static void
number_reference(char *out, size_t size, double d)
{
    double  back, max;

    if (isnan(d) || isinf(d)) {
        snprintf(out, size, "null");
        return;
    }

    snprintf(out, size, "%1.15g", d);
    back = strtod(out, NULL);
    max = fabs(back) > fabs(d) ? fabs(back) : fabs(d);

    if (!(fabs(back - d) <= max * DBL_EPSILON)) {
        snprintf(out, size, "%1.17g", d);
    }
}


static void
test_json_number(void **state)
{
    char       want[40], *got;
    size_t     i;
    double     d;
    alm_buf_t  b;
    uint64_t   x;

    static const double  numbers[] = {
        0.0, -0.0, 1.0, -1.0, 7.0, 42.0, 100.0, 1796041954.0,
        -2147483648.0, 4294967296.0, 999999999999999.0,
        -999999999999999.0, 1e15, -1e15, 1e15 + 1, 9007199254740993.0,
        1e300, -1e-300, 0.5, -0.7, 0.1, 123.456, 2.1, 47.6, 1e-7
    };

    (void) state;

    x = 88172645463325252ULL;

    for (i = 0; i < sizeof(numbers) / sizeof(numbers[0]) + 2000; i++) {

        if (i < sizeof(numbers) / sizeof(numbers[0])) {
            d = numbers[i];

        } else {
            /* integers of every size, and their halves */
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            d = (double) (int64_t) (x >> (x % 60));
            if (i % 3 == 0) {
                d = -d;
            }
            if (i % 5 == 0) {
                d /= 2;
            }
        }

        number_reference(want, sizeof(want), d);

        memset(&b, 0, sizeof(alm_buf_t));
        alm_json_number(&b, d);
        got = alm_buf_take(&b, NULL);
        assert_non_null(got);

        if (strcmp(got, want) != 0) {
            print_error("%.17g: want %s, got %s\n", d, want, got);
            fail();
        }

        free(got);
    }

    memset(&b, 0, sizeof(alm_buf_t));
    alm_buf_int(&b, INT64_MIN);
    alm_buf_raw(&b, " ", 1);
    alm_buf_int(&b, INT64_MAX);
    alm_buf_raw(&b, " ", 1);
    alm_buf_int(&b, 0);
    alm_buf_raw(&b, " ", 1);
    alm_buf_int(&b, -10);
    expect_buf(&b, "-9223372036854775808 9223372036854775807 0 -10");
}


/*
 * text escaped after pre bytes in a writer, strict or (as a string,
 * quotes included) not: "want" and a '!' written after it
 */

static void
expect_escaped_after(size_t pre, const char *text, size_t len, int strict,
    const char *want, size_t wlen)
{
    char       *ours;
    size_t      i;
    alm_buf_t   b;

    memset(&b, 0, sizeof(alm_buf_t));

    for (i = 0; i < pre; i++) {
        alm_buf_raw(&b, "p", 1);
    }

    if (strict) {
        alm_buf_esc(&b, text, len);

    } else {
        alm_json_string_n(&b, text, len);
    }

    alm_buf_raw(&b, "!", 1);
    ours = alm_buf_take(&b, NULL);
    assert_non_null(ours);
    assert_int_equal(strlen(ours), pre + wlen + 1);
    assert_memory_equal(ours + pre, want, wlen);
    assert_int_equal(ours[pre + wlen], '!');
    free(ours);
}


/*
 * An escape that outgrows the room first reserved (a margin over the
 * text's length) is finished after the buffer grows: the same bytes
 * as escaped at once, whatever the buffer held before and wherever
 * the room ran out (inside a run, before a 6-byte escape, before a
 * UTF-8 sequence).  Strict, as alm_json_escape() writes the text, and
 * not, as cJSON writes it as a string (bytes from 0x80 up as they are).
 */

static void
test_buf_escape_grows(void **state)
{
    char       *text, *want, *theirs;
    size_t      i, k, len, pre, wlen;
    cJSON      *j;

    static const char  *fills[] = {
        "\x01", "\"", "ab\n", "\xc3\xa9\x02", "\xff\x1f", "xyz"
    };

    (void) state;

    text = malloc(4096);
    want = malloc(6 * 4096);
    assert_non_null(text);
    assert_non_null(want);

    for (k = 0; k < sizeof(fills) / sizeof(fills[0]); k++) {
        for (len = 1; len < 1500; len += 7) {
            for (i = 0; i < len; i++) {
                text[i] = fills[k][i % strlen(fills[k])];
            }

            text[len] = '\0';

            wlen = alm_json_escape(want, text, len);

            j = cJSON_CreateString(text);
            assert_non_null(j);
            theirs = cJSON_PrintUnformatted(j);
            assert_non_null(theirs);

            for (pre = 0; pre < 300; pre += 61) {
                expect_escaped_after(pre, text, len, 1, want, wlen);
                expect_escaped_after(pre, text, len, 0, theirs,
                                     strlen(theirs));
            }

            free(theirs);
            cJSON_Delete(j);
        }
    }

    free(text);
    free(want);
}


/* escaping in runs writes what escaping byte by byte does */

static void
test_json_escape_runs(void **state)
{
    char       *ours, *theirs;
    size_t      i, k, len;
    cJSON      *j;
    alm_buf_t   b;
    char        text[64];

    static const char  pieces[][4] = {
        "a", " ", "\"", "\\", "\n", "\x01", "\x7f", "\xc3\xa9", "\xff",
        "\xe2\x82", "/", "\t", "z"
    };

    (void) state;

    /* every pair and some triples of pieces, at both ends of a text */

    for (i = 0; i < 13 * 13 * 13; i++) {
        len = 0;

        for (k = i; ; k /= 13) {
            memcpy(text + len, pieces[k % 13], strlen(pieces[k % 13]));
            len += strlen(pieces[k % 13]);
            if (k < 13) {
                break;
            }
        }

        text[len] = '\0';

        j = cJSON_CreateString(text);
        assert_non_null(j);
        theirs = cJSON_PrintUnformatted(j);
        assert_non_null(theirs);

        memset(&b, 0, sizeof(alm_buf_t));
        alm_json_string_n(&b, text, len);
        ours = alm_buf_take(&b, NULL);
        assert_non_null(ours);

        if (strcmp(ours, theirs) != 0) {
            print_error("cJSON: %s\nours:  %s\n", theirs, ours);
            fail();
        }

        free(ours);
        free(theirs);
        cJSON_Delete(j);
    }
}


/* what is read in place, and what is left to cJSON */

static void
test_json_members(void **state)
{
    size_t            n;
    const char       *t;
    alm_json_span_t   f[3];

    static const char *const  names[] = { "a", "b", "c" };

    (void) state;

    t = " {\"a\" : [1, {\"x\": \"y\\n\"}] ,\"b\":-2.5e1,\"a\":3,"
        "\"c\":\"s\\/\"}\n";
    assert_int_equal(alm_json_members(t, strlen(t), names, 3, f), 1);
    assert_memory_equal(f[0].p, "[1, {\"x\": \"y\\n\"}]", f[0].end - f[0].p);
    assert_true(alm_json_span_is(&f[0], ALM_SPAN_ARRAY));
    assert_true(alm_json_span_is(&f[1], ALM_SPAN_NUMBER));
    assert_true(alm_json_span_number(&f[1]) == -25.0);
    assert_true(alm_json_span_is(&f[2], ALM_SPAN_STRING));

    /* the first member of a name counts, as with cJSON */
    t = "{\"a\":1,\"a\":2}";
    assert_int_equal(alm_json_members(t, strlen(t), names, 3, f), 1);
    assert_int_equal(*f[0].p, '1');
    assert_null(f[1].p);

    /* left to cJSON: \u escapes, control bytes in strings, not JSON */
    n = sizeof(names) / sizeof(names[0]);
    t = "{\"a\":\"\\u00e9\"}";
    assert_int_equal(alm_json_members(t, strlen(t), names, n, f), 0);
    t = "{\"a\":\"\x01\"}";
    assert_int_equal(alm_json_members(t, strlen(t), names, n, f), 0);
    t = "{\"a\":1,}";
    assert_int_equal(alm_json_members(t, strlen(t), names, n, f), 0);
    t = "[1]";
    assert_int_equal(alm_json_members(t, strlen(t), names, n, f), 0);
    t = "{\"a\":1} x";
    assert_int_equal(alm_json_members(t, strlen(t), names, n, f), 0);
}


int
main(void)
{
    const struct CMUnitTest  tests[] = {
        cmocka_unit_test(test_json_escape),
        cmocka_unit_test(test_buf),
        cmocka_unit_test(test_json_value),
        cmocka_unit_test(test_json_number),
        cmocka_unit_test(test_json_escape_runs),
        cmocka_unit_test(test_buf_escape_grows),
        cmocka_unit_test(test_json_members),
    };

    return cmocka_run_group_tests_name("json", tests, NULL, NULL);
}
