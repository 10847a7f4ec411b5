/*
 * Copyright (C) ngx_anythingllm authors
 *
 * Shared includes and helpers of the unit tests.
 */


#ifndef _TEST_COMMON_H_INCLUDED_
#define _TEST_COMMON_H_INCLUDED_


#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <cjson/cJSON.h>

#include "alm_core.h"


#define S(lit)  lit, sizeof(lit) - 1

/* a key digest, for the conversation digests */
#define KEY  "0123456789abcdef0123456789abcdef" \
             "0123456789abcdef0123456789abcdef"


/* parses JSON text that the test expects to be valid; never NULL */

static inline cJSON *
test_json(const char *p, size_t len)
{
    cJSON  *j;

    j = cJSON_ParseWithLength(p, len);
    if (j == NULL) {
        print_error("not JSON: %.*s\n", (int) len, p);
        fail();
    }

    return j;
}


static inline const char *
test_str(const cJSON *obj, const char *name)
{
    const cJSON  *v;

    v = cJSON_GetObjectItemCaseSensitive(obj, name);
    if (!cJSON_IsString(v)) {
        print_error("no string \"%s\"\n", name);
        fail();
    }

    return v->valuestring;
}


#endif /* _TEST_COMMON_H_INCLUDED_ */
