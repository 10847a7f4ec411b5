/*
 * Copyright (C) ngx_anythingllm authors
 *
 * The workspace list, filtered and as models (alm_models.c).
 */


#include "test_common.h"


static const char  workspaces[] =
    "{\"workspaces\":["
    "{\"id\":1,\"name\":\"A\",\"slug\":\"a\",\"createdAt\":"
    "\"2024-01-15T10:20:30.000Z\",\"documents\":[],\"threads\":[]},"
    "{\"id\":2,\"name\":\"B\",\"slug\":\"b\",\"createdAt\":"
    "\"2000-02-29T00:00:00+01:00\"},"
    "{\"id\":3,\"name\":\"C\",\"slug\":\"c\",\"createdAt\":\"yesterday\"},"
    "{\"id\":4,\"name\":\"D\",\"slug\":\"d\"},"
    "{\"id\":5,\"name\":\"no slug\"},"
    "\"junk\","
    "{\"id\":6,\"name\":\"E\",\"slug\":\"e\",\"createdAt\":1700000000123}"
    "],\"extra\":true}";


static void
test_workspaces_filter(void **state)
{
    char    *out;
    size_t   len;
    cJSON   *j, *a;

    (void) state;

    out = alm_workspaces_filter(S(workspaces), S("b, d"), &len);
    assert_non_null(out);
    assert_int_equal(len, strlen(out));
    j = test_json(out, len);
    a = cJSON_GetObjectItemCaseSensitive(j, "workspaces");
    assert_int_equal(cJSON_GetArraySize(a), 2);
    assert_string_equal(test_str(cJSON_GetArrayItem(a, 0), "slug"), "b");
    assert_string_equal(test_str(cJSON_GetArrayItem(a, 1), "slug"), "d");
    assert_true(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(j, "extra")));
    cJSON_Delete(j);
    free(out);

    out = alm_workspaces_filter(S(workspaces), S("*"), &len);
    j = test_json(out, len);
    a = cJSON_GetObjectItemCaseSensitive(j, "workspaces");
    assert_int_equal(cJSON_GetArraySize(a), 5);
    cJSON_Delete(j);
    free(out);

    out = alm_workspaces_filter(S(workspaces), S(""), &len);
    assert_string_equal(out, "{\"workspaces\":[],\"extra\":true}");
    free(out);

    /* not the expected answer: nothing to pass on */
    assert_null(alm_workspaces_filter(S("{\"workspaces\":{}}"), S("*"),
                                      &len));
    assert_null(alm_workspaces_filter(S("{}"), S("*"), &len));
    assert_null(alm_workspaces_filter(S("[]"), S("*"), &len));
    assert_null(alm_workspaces_filter(S("Bad Request"), S("*"), &len));
    assert_null(alm_workspaces_filter(NULL, 0, S("*"), &len));
}


static void
test_workspaces_models(void **state)
{
    char         *out;
    size_t        len;
    cJSON        *j, *d, *m;
    alm_error_t   err;

    (void) state;

    out = alm_workspaces_to_models(S(workspaces), S("*"), NULL, 0, 1234,
                                   &len, &err);
    assert_non_null(out);
    j = test_json(out, len);
    assert_string_equal(test_str(j, "object"), "list");
    d = cJSON_GetObjectItemCaseSensitive(j, "data");
    assert_int_equal(cJSON_GetArraySize(d), 5);

    m = cJSON_GetArrayItem(d, 0);
    assert_string_equal(test_str(m, "id"), "a");
    assert_string_equal(test_str(m, "object"), "model");
    assert_string_equal(test_str(m, "owned_by"), "anythingllm");
    assert_int_equal((long) cJSON_GetObjectItemCaseSensitive(m, "created")
                     ->valuedouble, 1705314030L);

    m = cJSON_GetArrayItem(d, 1);
    assert_int_equal((long) cJSON_GetObjectItemCaseSensitive(m, "created")
                     ->valuedouble, 951778800L);

    m = cJSON_GetArrayItem(d, 2);
    assert_int_equal(cJSON_GetObjectItemCaseSensitive(m, "created")->valueint,
                     1234);
    m = cJSON_GetArrayItem(d, 3);
    assert_int_equal(cJSON_GetObjectItemCaseSensitive(m, "created")->valueint,
                     1234);
    m = cJSON_GetArrayItem(d, 4);
    assert_string_equal(test_str(m, "id"), "e");
    assert_int_equal((long) cJSON_GetObjectItemCaseSensitive(m, "created")
                     ->valuedouble, 1700000000L);
    cJSON_Delete(j);
    free(out);

    out = alm_workspaces_to_models(S(workspaces), S("a,zz"), NULL, 0, 1,
                                   &len, &err);
    assert_string_equal(out, "{\"object\":\"list\",\"data\":[{\"id\":\"a\","
                        "\"object\":\"model\",\"created\":1705314030,"
                        "\"owned_by\":\"anythingllm\"}]}");
    free(out);

    out = alm_workspaces_to_models(S("{\"workspaces\":[]}"), S("*"), NULL,
                                   0, 1, &len, &err);
    assert_string_equal(out, "{\"object\":\"list\",\"data\":[]}");
    free(out);

    /* one model */
    out = alm_workspaces_to_models(S(workspaces), S("a,b"), S("b"), 1,
                                   &len, &err);
    assert_string_equal(out, "{\"id\":\"b\",\"object\":\"model\",\"created\":"
                        "951778800,\"owned_by\":\"anythingllm\"}");
    free(out);

    out = alm_workspaces_to_models(S(workspaces), S("a,b"), S("c"), 1, &len,
                                   &err);
    assert_null(out);
    assert_int_equal(err.status, 404);
    assert_string_equal(err.code, "model_not_found");
    assert_string_equal(err.message, "The model `c` does not exist or you do "
                        "not have access to it.");

    out = alm_workspaces_to_models(S(workspaces), S("*"), S("zz"), 1, &len,
                                   &err);
    assert_null(out);
    assert_int_equal(err.status, 404);

    out = alm_workspaces_to_models(S(workspaces), S("*"), S("B"), 1, &len,
                                   &err);
    assert_null(out);

    out = alm_workspaces_to_models(S("nope"), S("*"), NULL, 0, 1, &len,
                                   &err);
    assert_null(out);
    assert_int_equal(err.status, 502);
    assert_string_equal(err.type, "server_error");
}


static void
test_iso_dates(void **state)
{
    size_t        i, len;
    char          body[256], *out;
    cJSON        *j;
    alm_error_t   err;

    static const struct {
        const char  *date;
        long         t;
    } cases[] = {
        { "1970-01-01T00:00:00Z", 0 },
        { "1970-01-01", 0 },
        { "2024-01-15T10:20:30Z", 1705314030 },
        { "2024-01-15 10:20:30.123456Z", 1705314030 },
        { "2024-01-15T10:20Z", 1705314000 },
        { "2024-01-15T12:20:30+02:00", 1705314030 },
        { "2024-01-15T08:20:30-0200", 1705314030 },
        { "2024-01-15T10:20:30", 1705314030 },
        { "2100-03-01T00:00:00Z", 4107542400 },
        { "1969-12-31T23:59:59Z", -1 },
        { "2024-13-01T00:00:00Z", -1 },
        { "2024-01-15T25:00:00Z", -1 },
        { "2024-01-15T10:20:30Zjunk", -1 },
        { "2024-1-15", -1 },
        { "", -1 },
    };

    (void) state;

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        snprintf(body, sizeof(body), "{\"workspaces\":[{\"slug\":\"a\","
                 "\"createdAt\":\"%s\"}]}", cases[i].date);

        out = alm_workspaces_to_models(body, strlen(body), S("*"), S("a"),
                                       777, &len, &err);
        assert_non_null(out);
        j = test_json(out, len);

        if ((long) cJSON_GetObjectItemCaseSensitive(j, "created")
                ->valuedouble != (cases[i].t < 0 ? 777 : cases[i].t))
        {
            print_error("%s: %s\n", cases[i].date, out);
            fail();
        }

        cJSON_Delete(j);
        free(out);
    }
}


int
main(void)
{
    const struct CMUnitTest  tests[] = {
        cmocka_unit_test(test_workspaces_filter),
        cmocka_unit_test(test_workspaces_models),
        cmocka_unit_test(test_iso_dates),
    };

    return cmocka_run_group_tests_name("models", tests, NULL, NULL);
}
