/*
 * Copyright (C) ngx_anythingllm authors
 *
 * The nginx-free core of ngx_http_anythingllm_module: route
 * classification, key digests, OpenAI <-> AnythingLLM JSON translation
 * and the incremental SSE re-framer.  Nothing here includes an nginx
 * header; unit tests and fuzzers link these files alone.
 *
 * Conventions: strings are (pointer, length) pairs and need not be
 * NUL-terminated; functions that return heap memory say so and the
 * caller releases it with free().
 */


#ifndef _ALM_CORE_H_INCLUDED_
#define _ALM_CORE_H_INCLUDED_


#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#if (__SSE2__)
#include <emmintrin.h>
#endif


#define ALM_OK                 0
#define ALM_ERROR             -1


/* scopes a key may hold (bit mask) */

#define ALM_SCOPE_CHAT         0x01
#define ALM_SCOPE_READ         0x02
#define ALM_SCOPE_DOCUMENTS    0x04
#define ALM_SCOPE_ADMIN        0x08


#define ALM_DIGEST_LEN         32     /* SHA-256 */
#define ALM_DIGEST_HEX_LEN     64
#define ALM_KEY_ID_LEN         12     /* first hex digits shown in logs */
#define ALM_SLUG_MAX           255


/* ------------------------------------------------------------------ */
/* route classification                                               */

typedef enum {
    ALM_ROUTE_NONE = 0,         /* not under /api/v1/: not judged */
    ALM_ROUTE_BAD,              /* under /api/v1/ but malformed: refuse */
    ALM_ROUTE_AUTH,             /* GET /api/v1/auth: any valid key */
    ALM_ROUTE_WORKSPACES,       /* GET /api/v1/workspaces: filtered */
    ALM_ROUTE_API,              /* any other /api/v1/ route */
    ALM_ROUTE_OPENAI_PASS       /* /api/v1/openai/... passed through */
} alm_route_kind_e;


typedef struct {
    alm_route_kind_e   kind;
    unsigned           scope;      /* ALM_SCOPE_* needed, 0 for none */
    unsigned           global;     /* needs a key allowed every workspace */
    const char        *slug;       /* workspace slug in the path, or NULL */
    size_t             slug_len;
    unsigned           chat;       /* alm_chat_call_e: a native chat */
} alm_route_t;


/* the native chat calls, whose answers carry AnythingLLM's usage */
typedef enum {
    ALM_CHAT_NONE = 0,
    ALM_CHAT_WHOLE,             /* .../chat: one JSON answer */
    ALM_CHAT_STREAM             /* .../stream-chat: SSE frames */
} alm_chat_call_e;


/*
 * Classifies an already decoded and normalised path (nginx's r->uri)
 * with its method.  The slug points into "path".  A path segment that
 * is empty, "." or "..", or holds a control character, or a workspace
 * or thread slug with characters outside [A-Za-z0-9_.-] (or longer
 * than ALM_SLUG_MAX) gives ALM_ROUTE_BAD.
 *
 * AnythingLLM's Express router ignores letter case and one trailing
 * slash, so the classifier does too: "/API/V1/Workspaces/" is
 * ALM_ROUTE_WORKSPACES.  "/api/v1/" alone and a "//" are BAD.
 * Methods are compared exactly (uppercase); HEAD counts as GET.
 *
 *   GET  auth                                  AUTH        0
 *   GET  workspaces                            WORKSPACES  READ
 *   *    openai[/...]                          OPENAI_PASS CHAT
 *   POST workspace/:slug/chat|stream-chat      API  CHAT
 *   POST workspace/:slug/thread/new            API  CHAT
 *   POST workspace/:slug/thread/:t/update|chat|stream-chat  API CHAT
 *   DEL  workspace/:slug/thread/:t             API  CHAT
 *   POST workspace/:slug/update-embeddings     API  DOCUMENTS, global
 *   POST workspace/:slug/update-pin            API  DOCUMENTS
 *   POST document/upload[/:folder], upload-link, raw-text,
 *        create-folder, move-files             API  DOCUMENTS
 *   DEL  document/...                          API  DOCUMENTS
 *   DEL  system/remove-documents               API  DOCUMENTS
 *   POST workspace/:slug/vector-search         API  READ
 *   GET  system/vector-count                   API  READ
 *   *    admin/..., users[/...], embed[/...]   API  ADMIN (GET too)
 *   *    system[/...] otherwise                API  ADMIN (GET too)
 *   GET  anything else                         API  READ
 *   *    anything else                         API  ADMIN
 *
 * The slug is set for every workspace/:slug[/...] path (update and
 * delete too), except POST workspace/new, which names no workspace.
 *
 * "global" is set for the routes that only a key allowed every
 * workspace ("*") may use: every API route that names no workspace
 * (it acts on the whole instance: the documents all workspaces share,
 * settings, users), openai[/...] (the workspace is in the body), and
 * POST workspace/:slug/update-embeddings, whose "adds" may name any
 * document of the instance's shared store: attaching one to a
 * workspace the key may use would read a document the key cannot
 * see.  update-pin stays with the slug: AnythingLLM pins only a
 * document already in that workspace.  AUTH, WORKSPACES, NONE and
 * BAD are never global.
 *
 * "chat" tells the chat calls of a workspace or a thread (POST
 * chat, stream-chat) from every other route (ALM_CHAT_NONE).
 */
void alm_route_classify(const char *method, size_t method_len,
    const char *path, size_t path_len, alm_route_t *rt);


/*
 * OpenAI-style routes answered by the gateway, matched by suffix and
 * exactly (no case folding, no trailing slash).
 */

typedef enum {
    ALM_OAI_NONE = 0,           /* anything else: 404 */
    ALM_OAI_MODELS,             /* .../models */
    ALM_OAI_MODEL,              /* .../models/{id} */
    ALM_OAI_CHAT                /* .../chat/completions */
} alm_oai_route_e;


/*
 * "id" receives the model id of ALM_OAI_MODEL: the last segment, not
 * empty (points into path).  id and id_len may both be NULL.
 */
alm_oai_route_e alm_oai_route(const char *path, size_t path_len,
    const char **id, size_t *id_len);


/* 1 when s is a valid workspace slug: 1..ALM_SLUG_MAX of [A-Za-z0-9_.-] */
int alm_slug_valid(const char *s, size_t len);


/* ------------------------------------------------------------------ */
/* keys                                                               */

/*
 * Parses "chat,read,documents,admin": items are separated by commas
 * or blanks, compared without case; unknown names are ignored.
 */
unsigned alm_scopes_parse(const char *s, size_t len);

/*
 * The one reading of a key's "workspaces" value, for every check.
 * Blanks (space, tab, CR, LF) around the value and around items do not
 * count.
 *
 *   ALM_WS_ALL      exactly "*": every workspace, instance-wide
 *                   routes included;
 *   ALM_WS_LIST     a comma list of valid slugs (alm_slug_valid(), not
 *                   "." or ".."), without empty items;
 *   ALM_WS_NONE     empty or blank: no workspace;
 *   ALM_WS_INVALID  anything else: "*" mixed with slugs, an empty item,
 *                   a slug that is not valid.  A key with such a value
 *                   is disabled; it allows nothing.
 */

typedef enum {
    ALM_WS_NONE = 0,
    ALM_WS_LIST,
    ALM_WS_ALL,
    ALM_WS_INVALID
} alm_ws_kind_e;

alm_ws_kind_e alm_workspaces_kind(const char *list, size_t list_len);

/* forward: the growable writer, below */
typedef struct alm_buf_s  alm_buf_t;

/*
 * A key's workspaces as JSON: "*" for ALM_WS_ALL, an array of the
 * slugs of an ALM_WS_LIST, [] for anything else; its scopes as an
 * array of names (ALM_SCOPE_* order).
 */
void alm_workspaces_json(alm_buf_t *b, const char *list, size_t list_len);
void alm_scopes_json(alm_buf_t *b, unsigned scopes);

/*
 * 1 when "slug" is allowed by a workspace list: an ALM_WS_ALL list, or
 * an ALM_WS_LIST one that holds the slug (compared exactly).  An
 * empty or invalid list, or an empty slug, allows none.
 */
int alm_workspace_allowed(const char *list, size_t list_len,
    const char *slug, size_t slug_len);


/* a string that need not be NUL-terminated; data NULL: not a string */

typedef struct {
    const char   *data;
    size_t        len;
} alm_str_t;


/* fields of a key record that did not parse (alm_key_record_t.malformed) */

#define ALM_KEYREC_RPM         0x01
#define ALM_KEYREC_EXPIRES     0x02
#define ALM_KEYREC_WORKSPACES  0x04
#define ALM_KEYREC_TPM         0x08
#define ALM_KEYREC_TPD         0x10


typedef struct {
    alm_str_t     name;           /* point into the pairs; "" when absent */
    alm_str_t     workspaces;
    unsigned      scopes;         /* ALM_SCOPE_* */
    int64_t       rpm;            /* 0: no limit */
    int64_t       tpm;            /* tokens a minute, 0: no limit */
    int64_t       tpd;            /* tokens a day (UTC), 0: no limit */
    int64_t       expires;        /* unix seconds, 0: never */
    int           disabled;
    unsigned      malformed;      /* ALM_KEYREC_* */
} alm_key_record_t;


/*
 * Reads a key record, "n" strings alternating field and value as
 * HGETALL answers them (a last field without a value is ignored; a
 * pair with a NULL data is skipped).  Known fields: name, scopes
 * (alm_scopes_parse()), workspaces (alm_workspaces_kind()), rpm, tpm,
 * tpd and expires (decimal digits up to INT64_MAX, empty meaning 0), disabled
 * (empty or "0" is enabled, anything else disabled); others are
 * ignored, a repeated field counts last.  A missing field means no
 * name, no scope, no workspace, no limit, never, enabled.
 *
 * Returns ALM_OK, or ALM_ERROR when a field did not parse: "malformed"
 * then names the fields and the record is disabled.
 */
int alm_key_record_parse(const alm_str_t *pairs, size_t n,
    alm_key_record_t *rec);

/* SHA-256 of the key as 64 lowercase hex digits (no NUL written) */
void alm_key_digest(const char *key, size_t len,
    char hex[ALM_DIGEST_HEX_LEN]);

/* 2 * len lowercase hex digits (no NUL written) */
void alm_hex(const unsigned char *bin, size_t len, char *out);

#define ALM_BYTES(c)  (0x0101010101010101ULL * (c))

/*
 * Whether any of the 8 bytes in v is not a plain string byte.
 * (x - 0x01..) & ~x & 0x80.. is not 0 exactly when a byte of x is 0,
 * and a byte below 0x20 is one that subtracting 0x20 borrows from
 * while its top bit is 0.
 */

static inline int
alm_plain_not(uint64_t v)
{
    uint64_t  q, b;

    q = v ^ ALM_BYTES('"');
    b = v ^ ALM_BYTES('\\');

    return ((((v - ALM_BYTES(0x20)) & ~v)
            | ((q - ALM_BYTES(1)) & ~q)
            | ((b - ALM_BYTES(1)) & ~b)
            | v)
           & ALM_BYTES(0x80)) != 0;
}

/*
 * The first byte from p on that is not a plain JSON string byte (below
 * 0x20, a quote, a backslash, or 0x80 and up), or end: the strings of
 * AnythingLLM's answers are mostly plain throughout, and are skipped
 * 16 or 8 bytes at a time.  Inline: the string readers call it for
 * every string, most of them short.
 */

static inline const unsigned char *
alm_plain_end(const unsigned char *p, const unsigned char *end)
{
    uint64_t   v;
#if (__SSE2__)
    int        m;
    __m128i    x;

    /* compared as signed bytes, those from 0x80 up are below 0x20 */

    while (end - p >= 16) {
        x = _mm_loadu_si128((const __m128i *) p);
        m = _mm_movemask_epi8(
                _mm_or_si128(
                    _mm_or_si128(_mm_cmpeq_epi8(x, _mm_set1_epi8('"')),
                                 _mm_cmpeq_epi8(x, _mm_set1_epi8('\\'))),
                    _mm_cmplt_epi8(x, _mm_set1_epi8(0x20))));

        if (m) {
            return p + __builtin_ctz((unsigned) m);
        }

        p += 16;
    }
#endif

    while (end - p >= 8) {
        memcpy(&v, p, 8);

        if (alm_plain_not(v)) {
            break;
        }

        p += 8;
    }

    while (p < end && *p >= 0x20 && *p < 0x80 && *p != '"' && *p != '\\')
    {
        p++;
    }

    return p;
}


/*
 * The length (1..4) of the strictly valid UTF-8 sequence at p, of which
 * avail bytes may be read, or 0 when the bytes there do not start one.
 */
size_t alm_utf8_len(const unsigned char *p, size_t avail);

/*
 * JSON-escapes len bytes of s into out (no quotes added) and returns
 * the length written; out must hold 6 * len bytes, or be NULL to only
 * count.  Bytes that are not valid UTF-8 become \ufffd.
 */
size_t alm_json_escape(char *out, const char *s, size_t len);


/* ------------------------------------------------------------------ */
/* the JSON writer                                                    */

/*
 * A growable output buffer, zeroed to start.  It grows geometrically,
 * so appends do not allocate one by one, and a buffer kept between
 * uses (len reset to 0) is written again without allocating.  When
 * memory runs out "nomem" is set and every later append does nothing:
 * the writer checks it once, at the end (alm_buf_take()).
 */

struct alm_buf_s {
    char       *data;
    size_t      len;
    size_t      cap;
    int         nomem;
};

/* room for n more bytes and a NUL; 0 when there is none */
int alm_buf_reserve(alm_buf_t *b, size_t n);
void alm_buf_raw(alm_buf_t *b, const char *p, size_t n);
/* a NUL-terminated string, as it is */
void alm_buf_str(alm_buf_t *b, const char *s);
/* n bytes JSON-escaped as alm_json_escape() does, no quotes added */
void alm_buf_esc(alm_buf_t *b, const char *p, size_t n);
/* a JSON string value: "..." escaped, or null when s is NULL */
void alm_buf_json_str(alm_buf_t *b, const char *s);
void alm_buf_int(alm_buf_t *b, int64_t v);

/*
 * Hands the text over, NUL-terminated, with its length in *len (len
 * may be NULL), and leaves b empty.  NULL when memory ran out at any
 * point; the buffer is then released.  The caller frees the text.
 */
char *alm_buf_take(alm_buf_t *b, size_t *len);

void alm_buf_free(alm_buf_t *b);


/* ------------------------------------------------------------------ */
/* OpenAI errors                                                      */

/* a plain value: it may be copied by assignment */

typedef struct {
    int          status;         /* HTTP status */
    const char  *type;           /* "invalid_request_error", ... */
    const char  *param;          /* or NULL */
    const char  *code;           /* or NULL */
    char         message[256];   /* formatted, truncated to fit */
} alm_error_t;


/*
 * Writes {"error":{"message":..,"type":..,"param":..,"code":..}} into
 * out (JSON-escaped; a NULL type, param or code is null, a NULL
 * message ""), NUL-terminated when there is room.  Returns the length
 * written, or the length needed when it exceeds cap (nothing then is
 * usable); out may be NULL to only count.  0 when memory ran out.
 */
size_t alm_error_json(char *out, size_t cap, const char *message,
    const char *type, const char *param, const char *code);

/* the same error object appended to a writer */
void alm_error_json_append(alm_buf_t *b, const char *message,
    const char *type, const char *param, const char *code);

/* fills err; the message is formatted into err->message (truncated) */
void alm_error_set(alm_error_t *err, int status, const char *type,
    const char *param, const char *code, const char *fmt, ...);


/* ------------------------------------------------------------------ */
/* chat completions request                                           */

typedef enum {
    ALM_MODE_CHAT = 0,
    ALM_MODE_QUERY,
    ALM_MODE_AUTOMATIC
} alm_mode_e;


/*
 * Incremental conversation digest; opaque state of fixed size (an
 * OpenSSL SHA256_CTX), copyable by assignment.  It covers the bytes
 *
 *   key digest hex | model | 0x1e |
 *   { role | 0x00 | canonical content | 0x1e } per message
 *
 * Canonical content: a string content is its text; an array's text
 * parts in order, an image part as 0x01 and its URL; null is empty.
 * So "ab" and [{"type":"text","text":"ab"}] hash alike, and an answer
 * fed in pieces (begin "assistant", update..., end) hashes like the
 * same text sent back as the next request's assistant message.  A
 * NULL key digest counts as 64 "0".  Options (temperature, ...) are
 * not part of it; system and developer messages are.
 */

typedef struct {
    uint64_t       state[16];
} alm_conv_hash_t;

void alm_conv_hash_init(alm_conv_hash_t *h, const char *key_digest_hex,
    const char *model, size_t model_len);
/* adds one message: role and its canonical text */
void alm_conv_hash_message_begin(alm_conv_hash_t *h, const char *role,
    size_t role_len);
void alm_conv_hash_update(alm_conv_hash_t *h, const char *p, size_t len);
void alm_conv_hash_message_end(alm_conv_hash_t *h);
/* hex of the digest so far; h stays usable */
void alm_conv_hash_hex(const alm_conv_hash_t *h,
    char hex[ALM_DIGEST_HEX_LEN]);


typedef struct {
    char              *model;          /* malloc, NUL-terminated */
    size_t             model_len;
    int                stream;
    int                include_usage;
    char              *message;        /* last user message text, malloc */
    size_t             message_len;
    char              *attachments;    /* JSON array text or NULL, malloc */
    char              *transcript;     /* earlier turns as text or NULL */
    int                has_history;    /* earlier non-system turns exist */

    /*
     * prefix: every message but the last, looked up to continue a
     * session; full: every message, to which the answer is added
     * before it is stored.
     */
    char               prefix_hex[ALM_DIGEST_HEX_LEN];
    alm_conv_hash_t    full;
} alm_chat_req_t;


/*
 * Validates and reads an OpenAI chat completions body.  On ALM_ERROR
 * err is filled (status 400 invalid_request_error with the param
 * named, 500 only when memory runs out) and nothing is left to free.
 * On ALM_OK, release with alm_chat_req_free().
 *
 * Refused (400, param named): n other than 1; non-empty tools or
 * functions; tool_choice other than "none"; logprobs true;
 * response_format other than {"type":"text"}; audio, or modalities
 * other than ["text"] (param "modalities"); image URLs that are not
 * data:image/...;base64 URLs; a last message that is not "user".
 * Ignored once their type is checked: temperature, top_p, max_tokens,
 * max_completion_tokens, presence_penalty, frequency_penalty, stop,
 * seed, user, logit_bias, metadata, store, parallel_tool_calls,
 * reasoning_effort, service_tier, top_logprobs.  Values OpenAI
 * refuses are refused all the same, with OpenAI's message and code
 * (decimal_above_max_value, integer_below_min_value, ...): max_tokens
 * or max_completion_tokens below 1, temperature outside 0..2, top_p
 * outside 0..1, presence_penalty or frequency_penalty outside -2..2,
 * a stop array of more than 4 items (array_above_max_length) or with
 * an item that is not a string.  Unknown fields are ignored.  null
 * counts as absent everywhere.
 *
 * The body must be strict UTF-8 (no overlong forms, no surrogates,
 * nothing above U+10FFFF), and its strings may hold neither a \u0000
 * escape, nor a \u without 4 hex digits, nor a lone UTF-16 surrogate
 * escape: 400 with param null, as for a body that is not a JSON
 * object.
 *
 * message is the last message's text parts joined with "\n" (a lone
 * image gives " ": AnythingLLM refuses an empty message); attachments
 * are that message's images only.  System and developer messages are
 * not sent upstream (the workspace has its own system prompt) but are
 * part of the digest.  has_history: a user or assistant message comes
 * before the last; transcript then holds
 * "Conversation so far:\nuser: ...\nassistant: ...\n\n" (user and
 * assistant turns with text; earlier images as "[image]").
 */
int alm_chat_req_parse(const char *body, size_t len,
    const char *key_digest_hex, alm_chat_req_t *req, alm_error_t *err);

/*
 * The same reading, always through cJSON's tree.  The usual request
 * ("model", "messages" of string roles and contents, "stream") is read
 * in place instead; this is what that must equal, field for field, and
 * what reads every other request.
 */
int alm_chat_req_tree(const char *body, size_t len,
    const char *key_digest_hex, alm_chat_req_t *req, alm_error_t *err);

void alm_chat_req_free(alm_chat_req_t *req);


/*
 * The body for POST /api/v1/workspace/<slug>/(stream-)chat:
 * {"message":..,"mode":..,"sessionId":..[,"attachments":[..]]}.
 * sessionId is left out when session_id is NULL or empty.  When
 * "continuing" is 0 and the request carried a history the gateway has
 * not seen, the message is the transcript, then "user: ", then the
 * new message.  Returns malloc'd text (length in *len) or NULL.
 */
char *alm_chat_req_upstream_body(const alm_chat_req_t *req,
    alm_mode_e mode, const char *session_id, size_t session_id_len,
    int continuing, size_t *len);


/* ------------------------------------------------------------------ */
/* responses                                                          */

typedef struct {
    long        prompt_tokens;
    long        completion_tokens;
    long        total_tokens;
    int         present;
} alm_usage_t;


typedef struct {
    const char        *id;        /* "chatcmpl-..." */
    size_t             id_len;
    const char        *model;
    size_t             model_len;
    time_t             created;
} alm_completion_meta_t;


/*
 * The usage of a native chat answer as it passes.  A whole answer:
 * alm_usage_answer() on its body (1 when "metrics" had a count).  A
 * stream: alm_usage_scan() on every piece, in order; s->usage holds
 * the counts of the last frame that had some, s->pieces the number
 * of text frames.  "buf" (of "size" bytes) holds one line at a time;
 * a longer line is passed over.
 */
typedef struct {
    char               *buf;
    size_t              size;
    size_t              len;
    unsigned            skip;
    unsigned long       pieces;         /* textResponseChunk frames */
    alm_usage_t         usage;
} alm_usage_scan_t;

int alm_usage_answer(const char *json, size_t len, alm_usage_t *usage);
void alm_usage_scan_init(alm_usage_scan_t *s, char *buf, size_t size);
void alm_usage_scan(alm_usage_scan_t *s, const char *p, size_t len);


/* a key as GET /api/v1/auth shows it to its holder */
typedef struct {
    const char         *id;             /* ALM_KEY_ID_LEN hex digits */
    const char         *name;
    size_t              name_len;
    unsigned            scopes;
    const char         *workspaces;
    size_t              workspaces_len;
    int64_t             rpm;
    int64_t             tpm;
    int64_t             tpd;
    const char         *date;           /* YYYY-MM-DD, UTC */
    int                 usage_known;    /* else "usage" is null */
    int64_t             requests;       /* of the day */
    int64_t             prompt_tokens;
    int64_t             completion_tokens;
} alm_key_info_t;

/*
 * AnythingLLM's answer to GET /api/v1/auth, an object with
 * "authenticated": true, with the key's "id", "name", "scopes",
 * "workspaces", "limits" and today's "usage" added (fields of those
 * names in the answer are replaced).  malloc'd, or NULL when the
 * answer is not such an object or memory ran out: it then passes as
 * it is.
 */
char *alm_auth_answer(const char *json, size_t len,
    const alm_key_info_t *key, size_t *out_len);


/*
 * Translates a non-stream workspace chat answer (200) into a
 * chat.completion object (with AnythingLLM's "sources" kept, and
 * usage from "metrics": zeros and usage->present 0 when absent).  On
 * success the answer is fed to "conv" when not NULL.  Returns
 * malloc'd JSON or NULL with err filled: an unreadable answer, a
 * type "abort" or an "error" text give 502 server_error (with the
 * upstream text), no memory 500.  meta's strings need no NUL.
 */
char *alm_chat_response_translate(const char *json, size_t len,
    const alm_completion_meta_t *meta, alm_usage_t *usage,
    alm_conv_hash_t *conv, size_t *out_len, alm_error_t *err);

/*
 * The same translation, always through cJSON's tree.  The usual answer
 * is read in place instead (no tree, no allocation per value); this is
 * what it must equal, byte for byte, and what reads every other answer.
 */
char *alm_chat_response_tree(const char *json, size_t len,
    const alm_completion_meta_t *meta, alm_usage_t *usage,
    alm_conv_hash_t *conv, size_t *out_len, alm_error_t *err);

/*
 * Translates an upstream error answer (any status >= 400, any body)
 * of a chat call into an OpenAI error: 400 abort "is not a valid
 * workspace" gives 404 model_not_found, 403 gives 502 (the upstream
 * key is wrong), other 4xx 400, 5xx 502.  Fills err.
 */
void alm_chat_error_translate(int status, const char *body, size_t len,
    const char *model, size_t model_len, alm_error_t *err);

/*
 * GET /api/v1/workspaces answer filtered by a workspace list: the
 * same object with only allowed workspaces.  malloc'd, or NULL when
 * the answer is not {"workspaces":[...]} (or memory runs out): the
 * caller must then fail closed, never pass the answer on.
 */
char *alm_workspaces_filter(const char *json, size_t len,
    const char *list, size_t list_len, size_t *out_len);

/*
 * GET /api/v1/workspaces answer as an OpenAI model list (only allowed
 * workspaces; "created" from createdAt, an ISO date, or "now").  With
 * "one" set, the single model of that id, or NULL with err 404
 * model_not_found when absent or not allowed.  An unreadable answer
 * gives NULL with err 502.  malloc'd or NULL.
 */
char *alm_workspaces_to_models(const char *json, size_t len,
    const char *list, size_t list_len, const char *one, size_t one_len,
    time_t now, size_t *out_len, alm_error_t *err);


/* ------------------------------------------------------------------ */
/* the SSE re-framer                                                  */

/*
 * One stream-chat frame's JSON read without building a tree
 * (alm_frame.c): alm_frame_read() returns 1 when cJSON would parse
 * the text as an object, and then fills the first member of each name
 * looked for, as cJSON_GetObjectItemCaseSensitive() would find it (a
 * string or a count only where "strings" or "count_found" says so).
 * Strings stay where they lie in the text (between their quotes); a
 * string with ALM_FRAME_STR_ESCAPED (a backslash or a NUL) is read
 * through alm_frame_str_decode(), one with ALM_FRAME_STR_RAW holds
 * control bytes or bytes from 0x80 up, as they are.
 */

#define ALM_FRAME_STR_ESCAPED  0x01
#define ALM_FRAME_STR_RAW      0x02

/* the members read; bits of "strings" */
#define ALM_FRAME_TYPE           0
#define ALM_FRAME_TEXT_RESPONSE  1
#define ALM_FRAME_TEXT_CHUNK     2
#define ALM_FRAME_ERROR          3
#define ALM_FRAME_CLOSE          4
#define ALM_FRAME_METRICS        5

typedef struct {
    const char         *p;
    size_t              len;
    unsigned            flags;          /* ALM_FRAME_STR_* */
} alm_frame_str_t;

typedef struct {
    unsigned            strings;        /* 1 << ALM_FRAME_*: a string */
    alm_frame_str_t     type;
    alm_frame_str_t     text_response;
    alm_frame_str_t     text_chunk;
    alm_frame_str_t     error;
    unsigned            close:1;        /* "close" is true */
    unsigned            metrics:1;      /* "metrics" is an object */
    unsigned            count_seen;     /* its token counts, first each */
    unsigned            count_found;    /* ... that are numbers */
    double              count[3];       /* prompt, completion, total */
} alm_frame_t;

int alm_frame_read(const char *text, size_t len, alm_frame_t *f);

/*
 * The string's bytes as cJSON decodes them, up to its first NUL,
 * written to out (which may be str->p: the string is then decoded in
 * place; the byte after str->p + str->len, its closing quote, must be
 * readable).  Returns the length, or cap + 1 when that passes cap.
 */
size_t alm_frame_str_decode(const alm_frame_str_t *str, char *out,
    size_t cap);

/*
 * 1 when none of the n bytes at p would end or change a JSON string (a
 * quote, a backslash, a byte below 0x20); ALM_FRAME_STR_RAW is then
 * set in *flags when one is 0x80 or more.
 */
int alm_frame_plain(const char *p, size_t n, unsigned *flags);

/*
 * Room for n more bytes in a writer (alm_json.c): where to write them,
 * the caller then adding n to b->len; NULL when memory ran out.
 */
char *alm_buf_room(alm_buf_t *b, size_t n);


/*
 * Output sink: called with each produced piece, in order.  Returns
 * ALM_OK or ALM_ERROR (the re-framer then stops).  A piece is a whole
 * number of frames.
 */
typedef int (*alm_emit_pt)(void *data, const char *p, size_t len);


typedef struct {
    /* set by alm_sse_init() */
    char               *buf;            /* pending partial frame */
    size_t              cap;
    size_t              len;
    alm_emit_pt         emit;
    void               *data;
    alm_completion_meta_t meta;
    int                 include_usage;
    alm_conv_hash_t    *conv;           /* answer text fed here, or NULL */
    alm_buf_t           out;            /* output, kept between calls */
    alm_buf_t           head;           /* every chunk's start, made once */
    char               *shape;          /* the last text chunk frame read
                                           whole, less its text: malloc */
    size_t              shape_head;     /* bytes before the text */
    size_t              shape_tail;     /* bytes from its closing quote */
    unsigned            shape_close:1;  /* that frame had close:true */
    unsigned long       pieces;         /* content deltas emitted */

    /* state */
    unsigned            sent_role:1;
    unsigned            got_chunk:1;    /* a textResponseChunk came */
    unsigned            got_text:1;     /* content was emitted */
    unsigned            closed:1;       /* a close:true answer frame */
    unsigned            done:1;         /* [DONE] was emitted */
    unsigned            failed:1;       /* ended with an error frame */
    unsigned            too_long:1;     /* failed: a frame over "cap" */
    unsigned            skip_line:1;    /* skipping a non-data line */
    alm_usage_t         usage;
} alm_sse_t;


/*
 * The re-framer reads upstream lines; each "data:" line is one frame,
 * acted on when its line ends ("\n" or "\r\n"); other lines are
 * skipped.  Only a line left open at the end of a feed is copied into
 * "buf".  "buf" of "cap" bytes (at least 64) bounds a data line; a
 * longer one ends the stream with an error frame and [DONE].  meta's
 * strings must live as long as s.  Output frames are exactly
 * "data: <json>\n\n"; the role comes with the first content delta,
 * "usage":null is on every chunk when include_usage is set.
 */
void alm_sse_init(alm_sse_t *s, char *buf, size_t cap,
    const alm_completion_meta_t *meta, int include_usage,
    alm_conv_hash_t *conv, alm_emit_pt emit, void *data);

/*
 * Feeds upstream bytes; frames may be split anywhere, and all output
 * of one call goes to the sink in one piece.  Returns ALM_OK, also
 * after an oversized frame or once [DONE] was sent (later input is
 * ignored); ALM_ERROR when the sink failed or memory ran out (the
 * re-framer then stops for good).
 */
int alm_sse_feed(alm_sse_t *s, const char *p, size_t len);

/*
 * The upstream ended: "broken" when it broke (or timed out) rather
 * than ended cleanly.  Emits what the end calls for: the stop chunk,
 * the usage chunk and [DONE] when the answer was complete (a frame
 * with close:true came and the end was clean), otherwise an error
 * frame and [DONE].  Nothing when [DONE] was already sent.  A line
 * still open is dropped.
 */
int alm_sse_finish(alm_sse_t *s, int broken);

/*
 * 1 when the answer completed (not an error); "conv" then holds the
 * answer as an assistant message, ready to be stored.
 */
int alm_sse_succeeded(const alm_sse_t *s);

/* releases the output buffer the re-framer keeps between calls */
void alm_sse_free(alm_sse_t *s);


#endif /* _ALM_CORE_H_INCLUDED_ */
