/*
 * Copyright (C) ngx_anythingllm authors
 *
 * Small pieces shared by the core: slugs, scopes, workspace lists,
 * key records, key digests, OpenAI error bodies and the incremental
 * conversation digest.
 */


#define OPENSSL_SUPPRESS_DEPRECATED

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <openssl/sha.h>

#include "alm_core.h"


/*
 * The conversation digest keeps an OpenSSL SHA256_CTX inside the
 * opaque storage of alm_conv_hash_t.  The context is moved in and out
 * with memcpy() so that the storage is never accessed through a
 * pointer of another type.
 */
_Static_assert(sizeof(SHA256_CTX) <= sizeof(alm_conv_hash_t),
               "alm_conv_hash_t is too small for SHA256_CTX");


int
alm_slug_valid(const char *s, size_t len)
{
    size_t         i;
    unsigned char  c;

    if (len == 0 || len > ALM_SLUG_MAX) {
        return 0;
    }

    for (i = 0; i < len; i++) {
        c = (unsigned char) s[i];

        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
            || (c >= '0' && c <= '9') || c == '_' || c == '.' || c == '-')
        {
            continue;
        }

        return 0;
    }

    return 1;
}


/*
 * Splits a list on commas (and on blanks when "space_separates"),
 * skipping blanks around items and empty items.  Returns 0 at the end.
 */

static int
alm_list_next(const char **pos, const char *end, const char **item,
    size_t *item_len, int space_separates)
{
    const char  *p, *start, *last;

    p = *pos;

    for ( ;; ) {

        while (p < end && (*p == ' ' || *p == '\t' || *p == ','
                           || *p == '\r' || *p == '\n'))
        {
            p++;
        }

        if (p == end) {
            *pos = p;
            return 0;
        }

        start = p;

        while (p < end && *p != ','
               && !(space_separates
                    && (*p == ' ' || *p == '\t' || *p == '\r'
                        || *p == '\n')))
        {
            p++;
        }

        last = p;

        while (last > start
               && (last[-1] == ' ' || last[-1] == '\t'
                   || last[-1] == '\r' || last[-1] == '\n'))
        {
            last--;
        }

        if (last > start) {
            *item = start;
            *item_len = last - start;
            *pos = p;
            return 1;
        }
    }
}


static int
alm_ascii_caseeq(const char *a, size_t a_len, const char *b)
{
    size_t         i;
    unsigned char  c;

    for (i = 0; i < a_len; i++) {
        if (b[i] == '\0') {
            return 0;
        }

        c = (unsigned char) a[i];
        if (c >= 'A' && c <= 'Z') {
            c = (unsigned char) (c | 0x20);
        }

        if (c != (unsigned char) b[i]) {
            return 0;
        }
    }

    return b[a_len] == '\0';
}


unsigned
alm_scopes_parse(const char *s, size_t len)
{
    size_t       n;
    unsigned     scopes;
    const char  *pos, *end, *item;

    scopes = 0;

    if (s == NULL) {
        return 0;
    }

    pos = s;
    end = s + len;

    while (alm_list_next(&pos, end, &item, &n, 1)) {

        if (alm_ascii_caseeq(item, n, "chat")) {
            scopes |= ALM_SCOPE_CHAT;

        } else if (alm_ascii_caseeq(item, n, "read")) {
            scopes |= ALM_SCOPE_READ;

        } else if (alm_ascii_caseeq(item, n, "documents")) {
            scopes |= ALM_SCOPE_DOCUMENTS;

        } else if (alm_ascii_caseeq(item, n, "admin")) {
            scopes |= ALM_SCOPE_ADMIN;
        }
    }

    return scopes;
}


static int
alm_blank(char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}


/*
 * The next comma-separated item of a workspace list, blanks around it
 * trimmed; empty items are returned too (with length 0).  Returns 0
 * once the list is used up (*pos is then NULL).
 */

static int
alm_ws_next(const char **pos, const char *end, const char **item,
    size_t *item_len)
{
    const char  *p, *start, *last;

    p = *pos;

    if (p == NULL) {
        return 0;
    }

    while (p < end && alm_blank(*p)) {
        p++;
    }

    start = p;

    while (p < end && *p != ',') {
        p++;
    }

    last = p;

    while (last > start && alm_blank(last[-1])) {
        last--;
    }

    *item = start;
    *item_len = last - start;

    *pos = (p < end) ? p + 1 : NULL;

    return 1;
}


alm_ws_kind_e
alm_workspaces_kind(const char *list, size_t list_len)
{
    size_t       n;
    const char  *pos, *end, *item;

    if (list == NULL) {
        return ALM_WS_NONE;
    }

    end = list + list_len;

    while (list < end && alm_blank(*list)) {
        list++;
    }

    while (end > list && alm_blank(end[-1])) {
        end--;
    }

    if (list == end) {
        return ALM_WS_NONE;
    }

    if (end - list == 1 && list[0] == '*') {
        return ALM_WS_ALL;
    }

    pos = list;

    while (alm_ws_next(&pos, end, &item, &n)) {

        /* "*" among slugs, "a,,b", "a,": no reading is safe */

        if (!alm_slug_valid(item, n)
            || (n == 1 && item[0] == '.')
            || (n == 2 && item[0] == '.' && item[1] == '.'))
        {
            return ALM_WS_INVALID;
        }
    }

    return ALM_WS_LIST;
}


int
alm_workspace_allowed(const char *list, size_t list_len, const char *slug,
    size_t slug_len)
{
    size_t       n;
    const char  *pos, *end, *item;

    if (slug == NULL || slug_len == 0) {
        return 0;
    }

    switch (alm_workspaces_kind(list, list_len)) {

    case ALM_WS_ALL:
        return 1;

    case ALM_WS_LIST:
        break;

    default:
        return 0;
    }

    pos = list;
    end = list + list_len;

    while (alm_ws_next(&pos, end, &item, &n)) {

        /* slugs are compared exactly: AnythingLLM's lookup is exact */

        if (n == slug_len && memcmp(item, slug, n) == 0) {
            return 1;
        }
    }

    return 0;
}


/* decimal digits only, up to INT64_MAX; empty is 0 */

static int
alm_int64_parse(const char *s, size_t len, int64_t *out)
{
    size_t   i;
    int64_t  n, d;

    n = 0;

    for (i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9') {
            return ALM_ERROR;
        }

        d = s[i] - '0';

        if (n > (INT64_MAX - d) / 10) {
            return ALM_ERROR;
        }

        n = n * 10 + d;
    }

    *out = n;

    return ALM_OK;
}


static int
alm_field_is(const alm_str_t *f, const char *name)
{
    size_t  len;

    len = strlen(name);

    return f->len == len && memcmp(f->data, name, len) == 0;
}


/*
 * A numeric field: a later value that parses clears the flag an
 * earlier one set, since a repeated field counts last.
 */

static void
alm_key_record_int(const alm_str_t *v, int64_t *field, unsigned *malformed,
    unsigned flag)
{
    int64_t  v64;

    if (alm_int64_parse(v->data, v->len, &v64) == ALM_OK) {
        *field = v64;
        *malformed &= ~flag;

    } else {
        *malformed |= flag;
    }
}


int
alm_key_record_parse(const alm_str_t *pairs, size_t n, alm_key_record_t *rec)
{
    size_t            i;
    const alm_str_t  *f, *v;

    memset(rec, 0, sizeof(alm_key_record_t));
    rec->name.data = "";
    rec->workspaces.data = "";

    for (i = 0; i + 1 < n; i += 2) {
        f = &pairs[i];
        v = &pairs[i + 1];

        if (f->data == NULL || v->data == NULL) {
            continue;
        }

        if (alm_field_is(f, "name")) {
            rec->name = *v;

        } else if (alm_field_is(f, "scopes")) {
            rec->scopes = alm_scopes_parse(v->data, v->len);

        } else if (alm_field_is(f, "workspaces")) {
            rec->workspaces = *v;

        } else if (alm_field_is(f, "rpm")) {
            alm_key_record_int(v, &rec->rpm, &rec->malformed,
                               ALM_KEYREC_RPM);

        } else if (alm_field_is(f, "tpm")) {
            alm_key_record_int(v, &rec->tpm, &rec->malformed,
                               ALM_KEYREC_TPM);

        } else if (alm_field_is(f, "tpd")) {
            alm_key_record_int(v, &rec->tpd, &rec->malformed,
                               ALM_KEYREC_TPD);

        } else if (alm_field_is(f, "expires")) {
            alm_key_record_int(v, &rec->expires, &rec->malformed,
                               ALM_KEYREC_EXPIRES);

        } else if (alm_field_is(f, "disabled")) {
            rec->disabled = !(v->len == 0
                              || (v->len == 1 && v->data[0] == '0'));
        }
    }

    /* judged once the last "workspaces" is known */

    if (alm_workspaces_kind(rec->workspaces.data, rec->workspaces.len)
        == ALM_WS_INVALID)
    {
        rec->malformed |= ALM_KEYREC_WORKSPACES;
    }

    if (rec->malformed) {
        rec->disabled = 1;
        return ALM_ERROR;
    }

    return ALM_OK;
}


void
alm_hex(const unsigned char *bin, size_t len, char *out)
{
    static const char  digits[] = "0123456789abcdef";

    while (len--) {
        *out++ = digits[*bin >> 4];
        *out++ = digits[*bin & 0x0f];
        bin++;
    }
}


void
alm_key_digest(const char *key, size_t len, char hex[ALM_DIGEST_HEX_LEN])
{
    SHA256_CTX     ctx;
    unsigned char  md[ALM_DIGEST_LEN];

    /*
     * Not SHA256(): in OpenSSL 3 it looks the algorithm up by name and
     * allocates a context on every call, which cost more than the
     * digest of a key itself on the hot path.
     */

    SHA256_Init(&ctx);
    SHA256_Update(&ctx, key, len);
    SHA256_Final(md, &ctx);
    alm_hex(md, ALM_DIGEST_LEN, hex);
}


/*
 * The bounded form writes through alm_error_json_append() too: an
 * error body is small and rare, so one allocation for it is cheap.
 */

size_t
alm_error_json(char *out, size_t cap, const char *message, const char *type,
    const char *param, const char *code)
{
    size_t      len;
    alm_buf_t   b;

    memset(&b, 0, sizeof(alm_buf_t));
    alm_error_json_append(&b, message, type, param, code);

    len = b.nomem ? 0 : b.len;

    if (out && len <= cap) {
        if (len) {
            memcpy(out, b.data, len);
        }

        if (len < cap) {
            out[len] = '\0';
        }
    }

    alm_buf_free(&b);

    return len;
}


void
alm_error_json_append(alm_buf_t *b, const char *message, const char *type,
    const char *param, const char *code)
{
    alm_buf_str(b, "{\"error\":{\"message\":");
    alm_buf_json_str(b, message ? message : "");
    alm_buf_str(b, ",\"type\":");
    alm_buf_json_str(b, type);
    alm_buf_str(b, ",\"param\":");
    alm_buf_json_str(b, param);
    alm_buf_str(b, ",\"code\":");
    alm_buf_json_str(b, code);
    alm_buf_str(b, "}}");
}


void
alm_error_set(alm_error_t *err, int status, const char *type,
    const char *param, const char *code, const char *fmt, ...)
{
    va_list  args;

    if (err == NULL) {
        return;
    }

    err->status = status;
    err->type = type;
    err->param = param;
    err->code = code;

    va_start(args, fmt);
    vsnprintf(err->message, sizeof(err->message), fmt, args);
    va_end(args);
}


/* ------------------------------------------------------------------ */
/* the conversation digest                                            */

/*
 * The digest covers one byte stream:
 *
 *   key digest hex (64) | model | 0x1e |
 *   { role | 0x00 | canonical content | 0x1e } for each message
 *
 * Canonical content is the text of a string content, or the parts of
 * an array content in order: a text part as its text, an image part
 * as 0x01 followed by its URL.  The answer of the assistant is added
 * the same way once it is known, so the digest after an answer equals
 * the digest of the next request's messages up to that answer.
 */

static void
alm_conv_load(const alm_conv_hash_t *h, SHA256_CTX *ctx)
{
    memcpy(ctx, h->state, sizeof(SHA256_CTX));
}


static void
alm_conv_store(alm_conv_hash_t *h, const SHA256_CTX *ctx)
{
    memcpy(h->state, ctx, sizeof(SHA256_CTX));
}


void
alm_conv_hash_init(alm_conv_hash_t *h, const char *key_digest_hex,
    const char *model, size_t model_len)
{
    SHA256_CTX          ctx;
    static const char   anonymous[ALM_DIGEST_HEX_LEN + 1] =
        "0000000000000000000000000000000000000000000000000000000000000000";

    memset(h, 0, sizeof(alm_conv_hash_t));

    SHA256_Init(&ctx);
    SHA256_Update(&ctx, key_digest_hex ? key_digest_hex : anonymous,
                  ALM_DIGEST_HEX_LEN);
    SHA256_Update(&ctx, model, model_len);
    SHA256_Update(&ctx, "\x1e", 1);

    alm_conv_store(h, &ctx);
}


void
alm_conv_hash_message_begin(alm_conv_hash_t *h, const char *role,
    size_t role_len)
{
    SHA256_CTX  ctx;

    alm_conv_load(h, &ctx);
    SHA256_Update(&ctx, role, role_len);
    SHA256_Update(&ctx, "", 1);
    alm_conv_store(h, &ctx);
}


void
alm_conv_hash_update(alm_conv_hash_t *h, const char *p, size_t len)
{
    SHA256_CTX  ctx;

    if (len == 0) {
        return;
    }

    alm_conv_load(h, &ctx);
    SHA256_Update(&ctx, p, len);
    alm_conv_store(h, &ctx);
}


void
alm_conv_hash_message_end(alm_conv_hash_t *h)
{
    SHA256_CTX  ctx;

    alm_conv_load(h, &ctx);
    SHA256_Update(&ctx, "\x1e", 1);
    alm_conv_store(h, &ctx);
}


void
alm_conv_hash_hex(const alm_conv_hash_t *h, char hex[ALM_DIGEST_HEX_LEN])
{
    SHA256_CTX     ctx;
    unsigned char  md[ALM_DIGEST_LEN];

    /* finishing a copy leaves h usable for more messages */

    alm_conv_load(h, &ctx);
    SHA256_Final(md, &ctx);
    alm_hex(md, ALM_DIGEST_LEN, hex);
}


void
alm_scopes_json(alm_buf_t *b, unsigned scopes)
{
    size_t              i;
    const char         *sep;
    static const char  *names[] = { "chat", "read", "documents", "admin" };

    sep = "[";

    for (i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (scopes & (1u << i)) {
            alm_buf_str(b, sep);
            alm_buf_json_str(b, names[i]);
            sep = ",";
        }
    }

    alm_buf_str(b, sep[0] == '[' ? "[]" : "]");
}


void
alm_workspaces_json(alm_buf_t *b, const char *list, size_t list_len)
{
    size_t       n;
    const char  *pos, *end, *item, *sep;

    switch (alm_workspaces_kind(list, list_len)) {

    case ALM_WS_ALL:
        alm_buf_str(b, "\"*\"");
        return;

    case ALM_WS_LIST:
        break;

    default:
        alm_buf_str(b, "[]");
        return;
    }

    pos = list;
    end = list + list_len;
    sep = "[";

    while (alm_ws_next(&pos, end, &item, &n)) {
        alm_buf_str(b, sep);
        alm_buf_raw(b, "\"", 1);
        alm_buf_esc(b, item, n);
        alm_buf_raw(b, "\"", 1);
        sep = ",";
    }

    alm_buf_str(b, sep[0] == '[' ? "[]" : "]");
}
