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

/* a whole JSON text: only white space may follow the value; or NULL */
cJSON *alm_json_parse(const char *p, size_t len);

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

/* a malloc'd NUL-terminated copy of n bytes, or NULL */
char *alm_strndup(const char *s, size_t n);


#endif /* _ALM_JSON_H_INCLUDED_ */
