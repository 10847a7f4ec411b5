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


/*
 * Random edits, for the tests that hold a reading in place equal to
 * cJSON's tree: *x is a xorshift state, advanced by test_next(); the
 * text (with room for three bytes more) gets one to three
 * replacements, insertions or deletions of bytes that JSON's grammar
 * turns on.
 */

#define TEST_EDIT_BYTES  "{}[]\",:\\ \t\n\x01\x7f\xc3\xa9\xff"          \
                         "0123456789eE.-+tfnulrsabu/"


static inline uint64_t
test_next(uint64_t *x)
{
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;

    return *x;
}


static inline void
test_edit(char *text, size_t *len, uint64_t *x)
{
    char      c;
    size_t    k, n, pos;
    uint64_t  r;

    n = 1 + (*x >> 8) % 3;

    for (k = 0; k < n; k++) {
        r = test_next(x);
        pos = *len ? (r >> 16) % *len : 0;
        c = TEST_EDIT_BYTES[(r >> 32) % (sizeof(TEST_EDIT_BYTES) - 1)];

        switch ((r >> 4) % 3) {
        case 0:     /* replace */
            if (*len) {
                text[pos] = c;
            }
            break;
        case 1:     /* insert */
            memmove(text + pos + 1, text + pos, *len - pos);
            text[pos] = c;
            (*len)++;
            break;
        default:    /* delete */
            if (*len) {
                memmove(text + pos, text + pos + 1, *len - pos - 1);
                (*len)--;
            }
            break;
        }
    }
}


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


#ifdef TEST_WRAP_ALLOC

/*
 * The tests of running out of memory link with -Wl,--wrap=malloc and
 * --wrap=realloc (the Makefile): every malloc and realloc of the core
 * and of these tests, and cJSON's (it allocates through alm_json.c's
 * malloc), comes here.  With test_alloc_left at n, n allocations
 * succeed and every one after fails, until it is -1 again.
 */

static long  test_alloc_left = -1;

void *__real_malloc(size_t size);
void *__real_realloc(void *p, size_t size);
void *__wrap_malloc(size_t size);
void *__wrap_realloc(void *p, size_t size);


static int
test_alloc_fails(void)
{
    if (test_alloc_left == 0) {
        return 1;
    }

    if (test_alloc_left > 0) {
        test_alloc_left--;
    }

    return 0;
}


void *
__wrap_malloc(size_t size)
{
    return test_alloc_fails() ? NULL : __real_malloc(size);
}


void *
__wrap_realloc(void *p, size_t size)
{
    return test_alloc_fails() ? NULL : __real_realloc(p, size);
}

#endif


#endif /* _TEST_COMMON_H_INCLUDED_ */
