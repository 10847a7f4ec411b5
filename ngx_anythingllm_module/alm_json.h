/*
 * Copyright (C) ngx_anythingllm authors
 *
 * The core's own JSON helpers on top of cJSON, shared by the request,
 * answer and model translations.  Not for the nginx glue: it only
 * needs alm_core.h.
 */


#ifndef _ALM_JSON_H_INCLUDED_
#define _ALM_JSON_H_INCLUDED_


#include <cjson/cJSON.h>

#include "alm_core.h"


#define ALM_NOMEM  "The gateway ran out of memory."


/*
 * Checks a JSON text for what cJSON would let through silently: bytes
 * that are not strict UTF-8, \u0000, a \u escape without 4 hex digits
 * and a lone UTF-16 surrogate escape.  NULL when there is none, else
 * what was found, with its byte offset in *at.
 */
const char *alm_json_text_check(const char *body, size_t len, size_t *at);

/*
 * A whole JSON text: only white space may follow the value; or NULL,
 * with *nomem (when not NULL) 1 if an allocation failed on the way and
 * 0 if cJSON refused the text.
 */
cJSON *alm_json_parse(const char *p, size_t len, int *nomem);

/* 1 when item is missing or null */
int alm_json_absent(const cJSON *item);

/*
 * Appends a parsed value as cJSON_PrintUnformatted() writes it: the
 * same bytes, so that what passes through is not reformatted.
 */
void alm_json_value(alm_buf_t *b, const cJSON *item);

/* a number as cJSON_PrintUnformatted() writes it */
void alm_json_number(alm_buf_t *b, double d);

/*
 * A string value ("...", "" for NULL) escaped as cJSON escapes
 * it: bytes that are not UTF-8 pass as they are, unlike
 * alm_buf_json_str(), so that text AnythingLLM sent keeps its bytes.
 */
void alm_json_string(alm_buf_t *b, const char *s);
/* the same for len bytes (up to a NUL among them); s may be NULL */
void alm_json_string_n(alm_buf_t *b, const char *s, size_t len);

/*
 * Reads the token counts of AnythingLLM's "metrics" object into usage
 * (zeros for what is missing; total_tokens 0 is the sum of the other
 * two).  Returns 1 when a count was there, 0 otherwise.
 */
int alm_usage_read(const cJSON *metrics, alm_usage_t *usage);

/*
 * A value in a JSON text, read in place (see alm_json.c): p is its
 * first byte, end one past its last; p NULL when absent.
 */
typedef struct {
    const char  *p;
    const char  *end;
} alm_json_span_t;

#define ALM_SPAN_STRING  1
#define ALM_SPAN_NUMBER  2
#define ALM_SPAN_OBJECT  3
#define ALM_SPAN_ARRAY   4

/*
 * Reads a whole JSON text that is an object, in place, and finds the
 * first member of each of the n names.  Returns 1 when the text was
 * read; 0 when it is not JSON, not an object, or not in the subset
 * read in place (a \u escape, a byte below 0x20 in a string, deep
 * nesting): cJSON must read it then ("found" is then of no use).
 * Where it returns 1, cJSON reads the same object (and the same
 * trailing white space) alike.
 */
int alm_json_members(const char *text, size_t len, const char *const *names,
    size_t n, alm_json_span_t *found);

/*
 * The same, but a member whose name is not among the n (or has an
 * escape in it) makes it return 0: the object holds those names only.
 */
int alm_json_members_only(const char *text, size_t len,
    const char *const *names, size_t n, alm_json_span_t *found);

/*
 * The elements of an array value found by the functions above, one a
 * call: *at is NULL before the first.  1 with the element in *elem, 0
 * after the last.
 */
int alm_json_span_next(const alm_json_span_t *array, const char **at,
    alm_json_span_t *elem);

/* 1 when the value is present and of that type (ALM_SPAN_*) */
int alm_json_span_is(const alm_json_span_t *v, int type);

/* a number value as cJSON reads it */
double alm_json_span_number(const alm_json_span_t *v);

/*
 * A string value's text, escapes undone: in place when it has none,
 * else malloc'd into *tmp, which the caller frees (NULL otherwise).
 * NULL when memory ran out.
 */
const char *alm_json_span_text(const alm_json_span_t *v, size_t *len,
    char **tmp);

/*
 * 1 when a string value, quotes and all, is what escaping its text
 * writes (alm_json_string_n()): it holds no "\/", the one escape read
 * in place that the writer does not make.
 */
int alm_json_span_verbatim(const alm_json_span_t *v);

/* a value written as alm_json_value() writes the same value parsed */
void alm_json_span_write(alm_buf_t *b, const alm_json_span_t *v);

/* a malloc'd NUL-terminated copy of n bytes, or NULL */
char *alm_strndup(const char *s, size_t n);


#endif /* _ALM_JSON_H_INCLUDED_ */
