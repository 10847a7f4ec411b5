/*
 * Copyright (C) ngx_anythingllm authors
 *
 * libFuzzer target for reading a key record from Redis's HGETALL
 * reply: alm_key_record_parse(), alm_workspaces_kind() and
 * alm_workspace_allowed().
 *
 * The input is a list of strings separated by NUL bytes, alternating
 * field and value as HGETALL answers them; a string that is exactly
 * "\x01" stands for an element that is not a string (data NULL).  Each
 * string is copied to a buffer of its exact size, so that a read past
 * a length is caught.
 *
 * Checked: the record only points into its input; ALM_ERROR exactly
 * when a field is malformed, and then the record is disabled; numbers
 * are never negative; the workspaces value is judged as a simple
 * reference reading judges it, and alm_workspace_allowed() agrees with
 * that reading for every item of the list and for a slug not in it.
 */


#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alm_core.h"


#define MAX_STRINGS  64


static int
blank(char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}


static int
slug_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
           || (c >= '0' && c <= '9') || c == '_' || c == '.' || c == '-';
}


/* the rule of alm_workspaces_kind(), written out plainly */

static alm_ws_kind_e
reference_kind(const char *s, size_t len)
{
    size_t  i, start, end, a, b;

    start = 0;
    end = len;

    while (start < end && blank(s[start])) {
        start++;
    }

    while (end > start && blank(s[end - 1])) {
        end--;
    }

    if (start == end) {
        return ALM_WS_NONE;
    }

    if (end - start == 1 && s[start] == '*') {
        return ALM_WS_ALL;
    }

    a = start;

    for ( ;; ) {
        b = a;

        while (b < end && s[b] != ',') {
            b++;
        }

        /* the item is s[a, b), trimmed */

        i = a;
        while (i < b && blank(s[i])) {
            i++;
        }

        while (b > i && blank(s[b - 1])) {
            b--;
        }

        if (b - i == 0 || b - i > ALM_SLUG_MAX) {
            return ALM_WS_INVALID;
        }

        if ((b - i == 1 && s[i] == '.')
            || (b - i == 2 && s[i] == '.' && s[i + 1] == '.'))
        {
            return ALM_WS_INVALID;
        }

        for ( /* void */ ; i < b; i++) {
            if (!slug_char(s[i])) {
                return ALM_WS_INVALID;
            }
        }

        while (a < end && s[a] != ',') {
            a++;
        }

        if (a == end) {
            return ALM_WS_LIST;
        }

        a++;
    }
}


static int
inside(const alm_str_t *s, const alm_str_t *strs, size_t n)
{
    size_t  i;

    if (s->len == 0) {
        return s->data != NULL;
    }

    for (i = 0; i < n; i++) {
        if (strs[i].data != NULL && s->data == strs[i].data
            && s->len == strs[i].len)
        {
            return 1;
        }
    }

    return 0;
}


static void
check_workspaces(const char *list, size_t len)
{
    size_t         a, b;
    alm_ws_kind_e  kind;

    kind = alm_workspaces_kind(list, len);

    if (kind != reference_kind(list, len)) {
        fprintf(stderr, "kind %d, expected %d: \"%.*s\"\n", kind,
                reference_kind(list, len), (int) len, list);
        abort();
    }

    /* an empty slug is never allowed */

    if (alm_workspace_allowed(list, len, "x", 0)) {
        abort();
    }

    if (kind == ALM_WS_ALL) {
        if (!alm_workspace_allowed(list, len, "any-slug", 8)) {
            abort();
        }

        return;
    }

    /* the loops below cost the square of the length */

    if (len > 256) {
        return;
    }

    if (kind != ALM_WS_LIST) {

        /* nothing in an empty or invalid list is allowed */

        for (a = 0; a < len; a++) {
            for (b = a + 1; b <= len && b - a <= 4; b++) {
                if (alm_workspace_allowed(list, len, list + a, b - a)) {
                    abort();
                }
            }
        }

        return;
    }

    /* every item of a list is allowed */

    a = 0;

    while (a <= len) {
        b = a;

        while (b < len && list[b] != ',') {
            b++;
        }

        {
            size_t  i = a, j = b;

            while (i < j && blank(list[i])) {
                i++;
            }

            while (j > i && blank(list[j - 1])) {
                j--;
            }

            if (!alm_workspace_allowed(list, len, list + i, j - i)) {
                abort();
            }
        }

        a = b + 1;
    }
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int                rc;
    char              *copy[MAX_STRINGS];
    size_t             n, i, start;
    alm_str_t          strs[MAX_STRINGS];
    alm_key_record_t   rec;

    n = 0;
    start = 0;

    for (i = 0; i <= size && n < MAX_STRINGS; i++) {
        if (i < size && data[i] != '\0') {
            continue;
        }

        if (i - start == 1 && data[start] == 0x01) {
            copy[n] = NULL;
            strs[n].data = NULL;
            strs[n].len = 0;

        } else {
            /* exactly the string's size: a read past it is caught */
            copy[n] = malloc(i - start ? i - start : 1);
            if (copy[n] == NULL) {
                abort();
            }

            memcpy(copy[n], data + start, i - start);
            strs[n].data = copy[n];
            strs[n].len = i - start;
        }

        n++;
        start = i + 1;
    }

    rc = alm_key_record_parse(strs, n, &rec);

    if ((rc == ALM_OK) != (rec.malformed == 0)) {
        abort();
    }

    if (rec.malformed && !rec.disabled) {
        abort();
    }

    if (rec.malformed & ~(ALM_KEYREC_RPM | ALM_KEYREC_EXPIRES
                          | ALM_KEYREC_WORKSPACES | ALM_KEYREC_TPM
                          | ALM_KEYREC_TPD))
    {
        abort();
    }

    if (rec.rpm < 0 || rec.expires < 0 || rec.tpm < 0 || rec.tpd < 0
        || (rec.scopes & ~(ALM_SCOPE_CHAT | ALM_SCOPE_READ
                           | ALM_SCOPE_DOCUMENTS | ALM_SCOPE_ADMIN)))
    {
        abort();
    }

    if (!inside(&rec.name, strs, n) || !inside(&rec.workspaces, strs, n)) {
        abort();
    }

    if (((rec.malformed & ALM_KEYREC_WORKSPACES) != 0)
        != (alm_workspaces_kind(rec.workspaces.data, rec.workspaces.len)
            == ALM_WS_INVALID))
    {
        abort();
    }

    /* every value, whatever its field, as a workspace list */

    for (i = 1; i < n; i += 2) {
        if (strs[i].data != NULL) {
            check_workspaces(strs[i].data, strs[i].len);
        }
    }

    for (i = 0; i < n; i++) {
        free(copy[i]);
    }

    return 0;
}
