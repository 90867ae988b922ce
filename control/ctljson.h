/*
 * ctljson: the small JSON reader and writer of the control protocol
 * (docs/control-protocol.md), shared by the daemon's control socket and
 * finaldotctl.
 *
 * Reader. ctl_json_parse() validates one complete JSON text (RFC 8259) and
 * describes it as a flat array of tokens in document order, each value
 * followed by its children (jsmn-like); it copies nothing. Strings are
 * checked (escapes, UTF-8, no raw control characters) and decoded on
 * demand by ctl_json_string(). Deliberate limits, each an error rather than
 * a guess: nesting deeper than CTL_JSON_MAX_DEPTH, more tokens than the
 * caller gave room for, "\u0000" in a string (values become C strings),
 * an object with a member name twice (readers disagree on which counts),
 * more than CTL_JSON_MEMBERS_MAX members or a name longer than
 * CTL_JSON_NAME_MAX.
 * Numbers follow the JSON grammar; ctl_json_u64() takes only non-negative
 * integers that fit in 64 bits.
 *
 * Writer. struct ctl_jw appends compact JSON to a growing buffer, placing
 * commas itself; ctl_jw_str() escapes what JSON requires and turns bytes
 * that are not UTF-8 into the code point of the same value (\u00HH), so the
 * output is always valid JSON whatever a client put in its envelope. Out of
 * memory, or past the writer's size limit, sets err and later calls do
 * nothing.
 *
 * Base64 (RFC 4648, standard alphabet, padded) carries message bytes
 * (queue.cat) inside JSON strings.
 */
#ifndef FINALDOT_CONTROL_CTLJSON_H
#define FINALDOT_CONTROL_CTLJSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CTL_JSON_MAX_DEPTH 16
/* An object's members, and the octets of a member name (decoded): more is
 * an error, as is a name twice in one object. */
#define CTL_JSON_MEMBERS_MAX 256u
#define CTL_JSON_NAME_MAX 256u

enum ctl_json_type {
	CTL_JSON_OBJECT = 1,
	CTL_JSON_ARRAY = 2,
	CTL_JSON_STRING = 3,
	CTL_JSON_NUMBER = 4,
	CTL_JSON_TRUE = 5,
	CTL_JSON_FALSE = 6,
	CTL_JSON_NULL = 7,
};

struct ctl_json_tok {
	enum ctl_json_type type;
	uint32_t start; /* offset of the value; strings: after the quote */
	uint32_t len;   /* bytes; strings: between the quotes (escaped) */
	uint32_t count; /* object: members; array: items */
	uint32_t end;   /* index of the first token after this value */
};

struct ctl_json {
	const char *text;
	size_t len;
	struct ctl_json_tok *tok;
	uint32_t n;       /* tokens used; tok[0] is the whole text's value */
	uint32_t cap;
	const char *err;  /* on failure: why (a static string) */
	size_t err_off;   /* and where (byte offset) */
};

/*
 * Parse text[0..len) (a whole JSON text: one value, white space around it
 * allowed) into tok[0..cap). 0, -EINVAL (bad JSON: j->err, j->err_off),
 * -E2BIG (more than cap tokens) or -EOVERFLOW (len >= 4 GiB).
 */
int ctl_json_parse(struct ctl_json *j, const char *text, size_t len,
		   struct ctl_json_tok *tok, uint32_t cap);

/* The value of member key in object token obj, or -1 (absent, or obj is
 * not an object). The first match wins. */
int ctl_json_get(const struct ctl_json *j, uint32_t obj, const char *key);
/* The first child of a container token, and the token after t. */
static inline uint32_t
ctl_json_child(uint32_t t)
{
	return t + 1;
}
static inline uint32_t
ctl_json_next(const struct ctl_json *j, uint32_t t)
{
	return j->tok[t].end;
}
/* Decode string token t into out (NUL-terminated). Its length, -EINVAL if
 * t is not a string, -ENOSPC if out is too small. */
long ctl_json_string(const struct ctl_json *j, uint32_t t, char *out,
		     size_t cap);
/* String token t equals s (after decoding). */
bool ctl_json_streq(const struct ctl_json *j, uint32_t t, const char *s);
bool ctl_json_u64(const struct ctl_json *j, uint32_t t, uint64_t *v);
/* true/false tokens only. */
bool ctl_json_bool(const struct ctl_json *j, uint32_t t, bool *v);

/* ---- writer ---------------------------------------------------------- */

struct ctl_jw {
	char *buf;
	size_t len, cap;
	size_t limit;     /* err once len would pass it; 0: 1 GiB */
	int err;          /* 0, -ENOMEM or -E2BIG */
	unsigned depth;
	bool first[CTL_JSON_MAX_DEPTH + 1]; /* no member written yet */
	bool after_key;
};

void ctl_jw_init(struct ctl_jw *w, size_t limit);
void ctl_jw_free(struct ctl_jw *w);
/* Empty the buffer (keeps its memory) and forget the nesting. */
void ctl_jw_reset(struct ctl_jw *w);
/* Drop the first n bytes (they were sent). */
void ctl_jw_consume(struct ctl_jw *w, size_t n);
/* Back to length mark (a message boundary: nesting is forgotten), and
 * clear err: undoes a message that could not be finished. */
void ctl_jw_rewind(struct ctl_jw *w, size_t mark);

void ctl_jw_obj(struct ctl_jw *w);
void ctl_jw_obj_end(struct ctl_jw *w);
void ctl_jw_arr(struct ctl_jw *w);
void ctl_jw_arr_end(struct ctl_jw *w);
void ctl_jw_key(struct ctl_jw *w, const char *k);
void ctl_jw_str(struct ctl_jw *w, const char *s);
void ctl_jw_strn(struct ctl_jw *w, const void *s, size_t n);
void ctl_jw_u64(struct ctl_jw *w, uint64_t v);
void ctl_jw_bool(struct ctl_jw *w, bool v);
void ctl_jw_null(struct ctl_jw *w);
/* A value already in JSON (copied as is: the caller vouches for it). */
void ctl_jw_raw(struct ctl_jw *w, const char *json, size_t n);
/* Base64 of p[0..n) as a JSON string value. */
void ctl_jw_b64(struct ctl_jw *w, const void *p, size_t n);
/* End of a message: a newline (the protocol is one JSON text per line). */
void ctl_jw_nl(struct ctl_jw *w);

/* Member shorthands. */
void ctl_jw_kstr(struct ctl_jw *w, const char *k, const char *s);
void ctl_jw_ku64(struct ctl_jw *w, const char *k, uint64_t v);
void ctl_jw_kbool(struct ctl_jw *w, const char *k, bool v);

/* ---- base64 ---------------------------------------------------------- */

static inline size_t
ctl_b64_len(size_t n)
{
	return (n + 2) / 3 * 4;
}
/* Encode n bytes into out (ctl_b64_len(n) bytes, no NUL). */
void ctl_b64_encode(const void *p, size_t n, char *out);
/* Decode padded base64 of length n (a multiple of 4) into out (at most
 * n / 4 * 3 bytes). The length, or -EINVAL. */
long ctl_b64_decode(const char *s, size_t n, void *out);

#endif
