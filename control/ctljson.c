/*
 * ctljson: JSON reader, writer and base64 for the control protocol (see
 * ctljson.h for the contract and the limits).
 *
 * The reader is a recursive-descent validator over RFC 8259's grammar that
 * records one token per value, parents before children; recursion is
 * bounded by CTL_JSON_MAX_DEPTH, and every loop advances through the input,
 * so any byte string ends in a result without reading past len. Nothing is
 * allocated: the caller owns the text and the token array.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctljson.h"
#include "finaldot/utf8.h"

/* ---- reader ---------------------------------------------------------- */

struct pstate {
	struct ctl_json *j;
	const unsigned char *p;
	size_t len;
	size_t pos;
	int rc;
};

static int
perr(struct pstate *s, const char *why)
{
	if (s->rc == 0) {
		s->rc = -EINVAL;
		s->j->err = why;
		s->j->err_off = s->pos;
	}
	return s->rc;
}

static void
skip_ws(struct pstate *s)
{
	while (s->pos < s->len) {
		unsigned char c = s->p[s->pos];
		if (c != ' ' && c != '\t' && c != '\n' && c != '\r')
			break;
		s->pos++;
	}
}

static long
new_tok(struct pstate *s, enum ctl_json_type t)
{
	struct ctl_json *j = s->j;

	if (j->n >= j->cap) {
		if (s->rc == 0) {
			s->rc = -E2BIG;
			j->err = "too many values";
			j->err_off = s->pos;
		}
		return -1;
	}
	j->tok[j->n] = (struct ctl_json_tok){.type = t,
					     .start = (uint32_t)s->pos};
	return (long)j->n++;
}

static int
hexval(unsigned char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* Four hex digits at p (room checked by the caller). */
static long
hex4(const unsigned char *p)
{
	long v = 0;

	for (int i = 0; i < 4; i++) {
		int h = hexval(p[i]);
		if (h < 0)
			return -1;
		v = v << 4 | h;
	}
	return v;
}

/*
 * A string at s->pos (the opening quote). Validates escapes (a surrogate
 * escape must be a high one followed by a low one), UTF-8, and the absence
 * of control characters and of \u0000.
 */
static int
parse_string(struct pstate *s)
{
	long t = new_tok(s, CTL_JSON_STRING);
	size_t start;

	if (t < 0)
		return s->rc;
	s->pos++; /* the quote */
	start = s->pos;
	s->j->tok[t].start = (uint32_t)start;
	while (s->pos < s->len) {
		unsigned char c = s->p[s->pos];
		if (c == '"') {
			s->j->tok[t].len = (uint32_t)(s->pos - start);
			s->j->tok[t].end = s->j->n;
			s->pos++;
			return 0;
		}
		if (c < 0x20)
			return perr(s, "control character in a string");
		if (c == '\\') {
			if (s->pos + 1 >= s->len)
				break;
			c = s->p[s->pos + 1];
			if (c && strchr("\"\\/bfnrt", c)) {
				s->pos += 2;
				continue;
			}
			if (c != 'u')
				return perr(s, "bad escape in a string");
			if (s->pos + 6 > s->len)
				break;
			long u = hex4(s->p + s->pos + 2);
			if (u < 0)
				return perr(s, "bad \\u escape");
			if (u == 0)
				return perr(s, "\\u0000 is not allowed");
			if (u >= 0xdc00 && u <= 0xdfff)
				return perr(s, "lone low surrogate");
			if (u >= 0xd800 && u <= 0xdbff) {
				long lo;
				if (s->pos + 12 > s->len)
					break;
				if (s->p[s->pos + 6] != '\\' ||
				    s->p[s->pos + 7] != 'u' ||
				    (lo = hex4(s->p + s->pos + 8)) < 0xdc00 ||
				    lo > 0xdfff)
					return perr(s, "lone high surrogate");
				s->pos += 12;
				continue;
			}
			s->pos += 6;
			continue;
		}
		size_t k = fd_utf8_len(s->p + s->pos, s->len - s->pos);
		if (k == 0)
			return perr(s, "invalid UTF-8 in a string");
		s->pos += k;
	}
	s->pos = s->len;
	return perr(s, "unterminated string");
}

static bool
is_digit(unsigned char c)
{
	return c >= '0' && c <= '9';
}

static int
parse_number(struct pstate *s)
{
	long t = new_tok(s, CTL_JSON_NUMBER);
	size_t start = s->pos;

	if (t < 0)
		return s->rc;
	if (s->pos < s->len && s->p[s->pos] == '-')
		s->pos++;
	if (s->pos >= s->len || !is_digit(s->p[s->pos]))
		return perr(s, "bad number");
	if (s->p[s->pos] == '0') {
		s->pos++;
	} else {
		while (s->pos < s->len && is_digit(s->p[s->pos]))
			s->pos++;
	}
	if (s->pos < s->len && s->p[s->pos] == '.') {
		s->pos++;
		if (s->pos >= s->len || !is_digit(s->p[s->pos]))
			return perr(s, "bad number");
		while (s->pos < s->len && is_digit(s->p[s->pos]))
			s->pos++;
	}
	if (s->pos < s->len && (s->p[s->pos] == 'e' || s->p[s->pos] == 'E')) {
		s->pos++;
		if (s->pos < s->len &&
		    (s->p[s->pos] == '+' || s->p[s->pos] == '-'))
			s->pos++;
		if (s->pos >= s->len || !is_digit(s->p[s->pos]))
			return perr(s, "bad number");
		while (s->pos < s->len && is_digit(s->p[s->pos]))
			s->pos++;
	}
	s->j->tok[t].len = (uint32_t)(s->pos - start);
	s->j->tok[t].end = s->j->n;
	return 0;
}

static int
parse_word(struct pstate *s, const char *w, enum ctl_json_type type)
{
	size_t n = strlen(w);
	long t;

	if (s->len - s->pos < n || memcmp(s->p + s->pos, w, n) != 0)
		return perr(s, "unexpected character");
	if ((t = new_tok(s, type)) < 0)
		return s->rc;
	s->pos += n;
	s->j->tok[t].len = (uint32_t)n;
	s->j->tok[t].end = s->j->n;
	return 0;
}

static int parse_value(struct pstate *s, unsigned depth);

static long decode(const struct ctl_json *j, uint32_t t, char *out,
		   size_t cap);

/* Member names a and b (string tokens) name the same member, escapes
 * decoded ("\u0063md" is "cmd"). */
static bool
same_name(const struct ctl_json *j, uint32_t a, uint32_t b)
{
	const struct ctl_json_tok *x = &j->tok[a], *y = &j->tok[b];
	char da[CTL_JSON_NAME_MAX + 1], db[CTL_JSON_NAME_MAX + 1];
	long la, lb;

	if (!memchr(j->text + x->start, '\\', x->len) &&
	    !memchr(j->text + y->start, '\\', y->len))
		return x->len == y->len &&
		       memcmp(j->text + x->start, j->text + y->start,
			      x->len) == 0;
	la = decode(j, a, da, sizeof(da));
	lb = decode(j, b, db, sizeof(db));
	return la >= 0 && la == lb && memcmp(da, db, (size_t)la) == 0;
}

/*
 * An object whose members all have names of their own: a name twice was
 * taken as its first by one reader (ctl_json_get: the daemon's "cmd") and
 * as its last by another (the daemon's "args", and most JSON libraries), so
 * a request a filtering proxy read as "status" ran as "queue.delete".
 */
static int
check_names(struct pstate *s, uint32_t obj)
{
	const struct ctl_json *j = s->j;
	uint32_t n = j->tok[obj].count, names[CTL_JSON_MEMBERS_MAX];
	uint32_t k = obj + 1;

	if (n > CTL_JSON_MEMBERS_MAX)
		return perr(s, "object with too many members");
	for (uint32_t i = 0; i < n; i++) {
		char d[CTL_JSON_NAME_MAX + 1];
		if (j->tok[k].len > CTL_JSON_NAME_MAX &&
		    decode(j, k, d, sizeof(d)) < 0)
			return perr(s, "member name too long");
		names[i] = k;
		for (uint32_t m = 0; m < i; m++)
			if (same_name(j, names[m], k))
				return perr(s, "duplicate member name");
		k = j->tok[k + 1].end;
	}
	return 0;
}

static int
parse_container(struct pstate *s, unsigned depth, bool object)
{
	long t = new_tok(s, object ? CTL_JSON_OBJECT : CTL_JSON_ARRAY);
	unsigned char close = object ? '}' : ']';

	if (t < 0)
		return s->rc;
	if (depth >= CTL_JSON_MAX_DEPTH)
		return perr(s, "nested too deep");
	s->pos++;
	skip_ws(s);
	if (s->pos < s->len && s->p[s->pos] == close) {
		s->pos++;
		goto done;
	}
	for (;;) {
		skip_ws(s);
		if (object) {
			if (s->pos >= s->len || s->p[s->pos] != '"')
				return perr(s, "expected a member name");
			if (parse_string(s) != 0)
				return s->rc;
			skip_ws(s);
			if (s->pos >= s->len || s->p[s->pos] != ':')
				return perr(s, "expected ':'");
			s->pos++;
		}
		if (parse_value(s, depth + 1) != 0)
			return s->rc;
		s->j->tok[t].count++;
		skip_ws(s);
		if (s->pos >= s->len)
			return perr(s, object ? "unterminated object"
					      : "unterminated array");
		if (s->p[s->pos] == ',') {
			s->pos++;
			continue;
		}
		if (s->p[s->pos] == close) {
			s->pos++;
			break;
		}
		return perr(s, object ? "expected ',' or '}'"
				      : "expected ',' or ']'");
	}
done:
	s->j->tok[t].len = (uint32_t)(s->pos - s->j->tok[t].start);
	s->j->tok[t].end = s->j->n;
	return object ? check_names(s, (uint32_t)t) : 0;
}

static int
parse_value(struct pstate *s, unsigned depth)
{
	skip_ws(s);
	if (s->pos >= s->len)
		return perr(s, "expected a value");
	switch (s->p[s->pos]) {
	case '{':
		return parse_container(s, depth, true);
	case '[':
		return parse_container(s, depth, false);
	case '"':
		return parse_string(s);
	case 't':
		return parse_word(s, "true", CTL_JSON_TRUE);
	case 'f':
		return parse_word(s, "false", CTL_JSON_FALSE);
	case 'n':
		return parse_word(s, "null", CTL_JSON_NULL);
	default:
		if (s->p[s->pos] == '-' || is_digit(s->p[s->pos]))
			return parse_number(s);
		return perr(s, "unexpected character");
	}
}

int
ctl_json_parse(struct ctl_json *j, const char *text, size_t len,
	       struct ctl_json_tok *tok, uint32_t cap)
{
	struct pstate s = {.j = j, .p = (const unsigned char *)text,
			   .len = len};

	*j = (struct ctl_json){.text = text, .len = len, .tok = tok,
			       .cap = cap};
	if (len >= UINT32_MAX) {
		j->err = "text too long";
		return -EOVERFLOW;
	}
	if (parse_value(&s, 0) != 0)
		return s.rc;
	skip_ws(&s);
	if (s.pos != len)
		return perr(&s, "text after the value");
	return 0;
}

/*
 * Decode string token t into out. n counts the decoded bytes; with out NULL
 * nothing is written (a length probe).
 */
static long
decode(const struct ctl_json *j, uint32_t t, char *out, size_t cap)
{
	const struct ctl_json_tok *k = &j->tok[t];
	const unsigned char *p = (const unsigned char *)j->text + k->start;
	const unsigned char *e = p + k->len;
	size_t n = 0;

	if (k->type != CTL_JSON_STRING)
		return -EINVAL;
	while (p < e) {
		unsigned char b[4];
		size_t bn = 1;
		if (*p != '\\') {
			b[0] = *p++;
		} else {
			unsigned char c = p[1];
			p += 2;
			switch (c) {
			case 'b': b[0] = '\b'; break;
			case 'f': b[0] = '\f'; break;
			case 'n': b[0] = '\n'; break;
			case 'r': b[0] = '\r'; break;
			case 't': b[0] = '\t'; break;
			case 'u': {
				/* Validated by the parser: hex, pairs. */
				uint32_t u = (uint32_t)hex4(p);
				p += 4;
				if (u >= 0xd800 && u <= 0xdbff) {
					uint32_t lo = (uint32_t)hex4(p + 2);
					p += 6;
					u = 0x10000 + ((u - 0xd800) << 10) +
					    (lo - 0xdc00);
				}
				if (u < 0x80) {
					b[0] = (unsigned char)u;
				} else if (u < 0x800) {
					b[0] = (unsigned char)(0xc0 | u >> 6);
					b[1] = (unsigned char)(0x80 | (u & 0x3f));
					bn = 2;
				} else if (u < 0x10000) {
					b[0] = (unsigned char)(0xe0 | u >> 12);
					b[1] = (unsigned char)(0x80 |
							       (u >> 6 & 0x3f));
					b[2] = (unsigned char)(0x80 | (u & 0x3f));
					bn = 3;
				} else {
					b[0] = (unsigned char)(0xf0 | u >> 18);
					b[1] = (unsigned char)(0x80 |
							       (u >> 12 & 0x3f));
					b[2] = (unsigned char)(0x80 |
							       (u >> 6 & 0x3f));
					b[3] = (unsigned char)(0x80 | (u & 0x3f));
					bn = 4;
				}
				break;
			}
			default: /* " \ / */
				b[0] = c;
			}
		}
		if (out) {
			if (n + bn >= cap)
				return -ENOSPC;
			memcpy(out + n, b, bn);
		}
		n += bn;
	}
	if (out)
		out[n] = '\0';
	return (long)n;
}

long
ctl_json_string(const struct ctl_json *j, uint32_t t, char *out, size_t cap)
{
	if (t >= j->n || cap == 0)
		return -EINVAL;
	return decode(j, t, out, cap);
}

bool
ctl_json_streq(const struct ctl_json *j, uint32_t t, const char *s)
{
	const struct ctl_json_tok *k;
	size_t sl = strlen(s);
	char buf[256];

	if (t >= j->n || j->tok[t].type != CTL_JSON_STRING)
		return false;
	k = &j->tok[t];
	/* The common case: no escapes, compare in place. */
	if (!memchr(j->text + k->start, '\\', k->len))
		return k->len == sl && memcmp(j->text + k->start, s, sl) == 0;
	if (sl >= sizeof(buf))
		return false; /* keys we look up are short */
	return decode(j, t, buf, sizeof(buf)) == (long)sl &&
	       memcmp(buf, s, sl) == 0;
}

int
ctl_json_get(const struct ctl_json *j, uint32_t obj, const char *key)
{
	uint32_t k;

	if (obj >= j->n || j->tok[obj].type != CTL_JSON_OBJECT)
		return -1;
	k = obj + 1;
	for (uint32_t i = 0; i < j->tok[obj].count; i++) {
		uint32_t v = k + 1;
		if (ctl_json_streq(j, k, key))
			return (int)v;
		k = j->tok[v].end;
	}
	return -1;
}

bool
ctl_json_u64(const struct ctl_json *j, uint32_t t, uint64_t *v)
{
	const struct ctl_json_tok *k;
	uint64_t n = 0;

	if (t >= j->n || j->tok[t].type != CTL_JSON_NUMBER)
		return false;
	k = &j->tok[t];
	for (uint32_t i = 0; i < k->len; i++) {
		char c = j->text[k->start + i];
		if (c < '0' || c > '9')
			return false; /* sign, fraction or exponent */
		uint64_t d = (uint64_t)(c - '0');
		if (n > (UINT64_MAX - d) / 10)
			return false;
		n = n * 10 + d;
	}
	*v = n;
	return true;
}

bool
ctl_json_bool(const struct ctl_json *j, uint32_t t, bool *v)
{
	if (t >= j->n)
		return false;
	if (j->tok[t].type == CTL_JSON_TRUE)
		*v = true;
	else if (j->tok[t].type == CTL_JSON_FALSE)
		*v = false;
	else
		return false;
	return true;
}

/* ---- writer ---------------------------------------------------------- */

void
ctl_jw_init(struct ctl_jw *w, size_t limit)
{
	memset(w, 0, sizeof(*w));
	w->limit = limit ? limit : (size_t)1 << 30;
	w->first[0] = true;
}

void
ctl_jw_free(struct ctl_jw *w)
{
	free(w->buf);
	w->buf = NULL;
	w->len = w->cap = 0;
}

void
ctl_jw_reset(struct ctl_jw *w)
{
	w->len = 0;
	w->err = 0;
	w->depth = 0;
	w->first[0] = true;
	w->after_key = false;
}

void
ctl_jw_rewind(struct ctl_jw *w, size_t mark)
{
	if (mark < w->len)
		w->len = mark;
	w->err = 0;
	w->depth = 0;
	w->first[0] = true;
	w->after_key = false;
}

void
ctl_jw_consume(struct ctl_jw *w, size_t n)
{
	if (n >= w->len) {
		w->len = 0;
		return;
	}
	memmove(w->buf, w->buf + n, w->len - n);
	w->len -= n;
}

static bool
room(struct ctl_jw *w, size_t n)
{
	size_t cap;
	char *nb;

	if (w->err)
		return false;
	if (n > w->limit - w->len || w->len > w->limit) {
		w->err = -E2BIG;
		return false;
	}
	if (w->len + n <= w->cap)
		return true;
	cap = w->cap ? w->cap : 256;
	while (cap < w->len + n)
		cap *= 2;
	if (!(nb = realloc(w->buf, cap))) {
		w->err = -ENOMEM;
		return false;
	}
	w->buf = nb;
	w->cap = cap;
	return true;
}

static void
put(struct ctl_jw *w, const void *p, size_t n)
{
	if (!room(w, n))
		return;
	memcpy(w->buf + w->len, p, n);
	w->len += n;
}

static void
putc1(struct ctl_jw *w, char c)
{
	put(w, &c, 1);
}

/* Before a value: the comma between siblings (not after a key). */
static void
sep(struct ctl_jw *w)
{
	if (w->after_key) {
		w->after_key = false;
		return;
	}
	if (!w->first[w->depth])
		putc1(w, ',');
	w->first[w->depth] = false;
}

static void
open_c(struct ctl_jw *w, char c)
{
	sep(w);
	putc1(w, c);
	if (w->depth < CTL_JSON_MAX_DEPTH)
		w->depth++;
	else if (!w->err)
		w->err = -E2BIG;
	w->first[w->depth] = true;
}

static void
close_c(struct ctl_jw *w, char c)
{
	putc1(w, c);
	if (w->depth)
		w->depth--;
}

void ctl_jw_obj(struct ctl_jw *w) { open_c(w, '{'); }
void ctl_jw_obj_end(struct ctl_jw *w) { close_c(w, '}'); }
void ctl_jw_arr(struct ctl_jw *w) { open_c(w, '['); }
void ctl_jw_arr_end(struct ctl_jw *w) { close_c(w, ']'); }

static void
put_escaped(struct ctl_jw *w, const unsigned char *p, size_t n)
{
	static const char hex[] = "0123456789abcdef";
	size_t i = 0;

	putc1(w, '"');
	while (i < n && !w->err) {
		size_t run = i;
		/* Copy runs of bytes that need nothing. */
		while (run < n && p[run] >= 0x20 && p[run] < 0x7f &&
		       p[run] != '"' && p[run] != '\\')
			run++;
		if (run > i) {
			put(w, p + i, run - i);
			i = run;
			continue;
		}
		unsigned char c = p[i];
		size_t k = c >= 0x80 ? fd_utf8_len(p + i, n - i) : 0;
		if (k == 2 && c == 0xc2 && p[i + 1] < 0xa0) {
			/* U+0080..U+009F, the C1 controls (CSI is U+009B):
			 * escaped like C0, never raw at an operator's
			 * terminal (an SMTPUTF8 sender may hold them) */
			char e1[6] = {'\\', 'u', '0', '0', hex[p[i + 1] >> 4],
				      hex[p[i + 1] & 15]};
			put(w, e1, 6);
			i += 2;
			continue;
		}
		if (k > 1) {
			put(w, p + i, k);
			i += k;
			continue;
		}
		char e[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
		switch (c) {
		case '"': put(w, "\\\"", 2); break;
		case '\\': put(w, "\\\\", 2); break;
		case '\n': put(w, "\\n", 2); break;
		case '\r': put(w, "\\r", 2); break;
		case '\t': put(w, "\\t", 2); break;
		default: put(w, e, 6); /* control, DEL, or not UTF-8 */
		}
		i++;
	}
	putc1(w, '"');
}

void
ctl_jw_key(struct ctl_jw *w, const char *k)
{
	sep(w);
	put_escaped(w, (const unsigned char *)k, strlen(k));
	putc1(w, ':');
	w->after_key = true;
}

void
ctl_jw_strn(struct ctl_jw *w, const void *s, size_t n)
{
	sep(w);
	put_escaped(w, s, n);
}

void
ctl_jw_str(struct ctl_jw *w, const char *s)
{
	ctl_jw_strn(w, s ? s : "", s ? strlen(s) : 0);
}

void
ctl_jw_u64(struct ctl_jw *w, uint64_t v)
{
	char b[24];
	int n = snprintf(b, sizeof(b), "%" PRIu64, v);

	sep(w);
	put(w, b, (size_t)n);
}

void
ctl_jw_bool(struct ctl_jw *w, bool v)
{
	sep(w);
	put(w, v ? "true" : "false", v ? 4 : 5);
}

void
ctl_jw_null(struct ctl_jw *w)
{
	sep(w);
	put(w, "null", 4);
}

void
ctl_jw_raw(struct ctl_jw *w, const char *json, size_t n)
{
	sep(w);
	put(w, json, n);
}

void
ctl_jw_b64(struct ctl_jw *w, const void *p, size_t n)
{
	size_t m = ctl_b64_len(n);

	sep(w);
	if (!room(w, m + 2))
		return;
	w->buf[w->len++] = '"';
	ctl_b64_encode(p, n, w->buf + w->len);
	w->len += m;
	w->buf[w->len++] = '"';
}

void
ctl_jw_nl(struct ctl_jw *w)
{
	putc1(w, '\n');
	w->depth = 0;
	w->first[0] = true;
	w->after_key = false;
}

void
ctl_jw_kstr(struct ctl_jw *w, const char *k, const char *s)
{
	ctl_jw_key(w, k);
	ctl_jw_str(w, s);
}

void
ctl_jw_ku64(struct ctl_jw *w, const char *k, uint64_t v)
{
	ctl_jw_key(w, k);
	ctl_jw_u64(w, v);
}

void
ctl_jw_kbool(struct ctl_jw *w, const char *k, bool v)
{
	ctl_jw_key(w, k);
	ctl_jw_bool(w, v);
}

/* ---- base64 ---------------------------------------------------------- */

static const char b64[] =
	"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

void
ctl_b64_encode(const void *src, size_t n, char *out)
{
	const unsigned char *p = src;
	size_t i = 0;

	for (; i + 3 <= n; i += 3) {
		uint32_t v = (uint32_t)p[i] << 16 | (uint32_t)p[i + 1] << 8 |
			     p[i + 2];
		*out++ = b64[v >> 18];
		*out++ = b64[v >> 12 & 63];
		*out++ = b64[v >> 6 & 63];
		*out++ = b64[v & 63];
	}
	if (i < n) {
		uint32_t v = (uint32_t)p[i] << 16;
		if (i + 1 < n)
			v |= (uint32_t)p[i + 1] << 8;
		*out++ = b64[v >> 18];
		*out++ = b64[v >> 12 & 63];
		*out++ = i + 1 < n ? b64[v >> 6 & 63] : '=';
		*out++ = '=';
	}
}

static int
b64val(char c)
{
	if (c >= 'A' && c <= 'Z')
		return c - 'A';
	if (c >= 'a' && c <= 'z')
		return c - 'a' + 26;
	if (c >= '0' && c <= '9')
		return c - '0' + 52;
	if (c == '+')
		return 62;
	if (c == '/')
		return 63;
	return -1;
}

long
ctl_b64_decode(const char *s, size_t n, void *dst)
{
	unsigned char *out = dst;
	size_t o = 0;

	if (n % 4)
		return -EINVAL;
	for (size_t i = 0; i < n; i += 4) {
		int v[4];
		int pad = 0;
		bool last = i + 4 == n;
		for (int k = 0; k < 4; k++) {
			v[k] = b64val(s[i + (size_t)k]);
			if (v[k] < 0) {
				/* '=' only as the last one or two. */
				if (!last || s[i + (size_t)k] != '=' || k < 2)
					return -EINVAL;
				if (k == 2 && s[i + 3] != '=')
					return -EINVAL;
				pad = 4 - k;
				break;
			}
		}
		uint32_t x = (uint32_t)v[0] << 18 | (uint32_t)v[1] << 12;
		if (pad < 2)
			x |= (uint32_t)v[2] << 6;
		if (pad < 1)
			x |= (uint32_t)v[3];
		/* Canonical form: the bits padding drops must be zero. */
		if ((pad == 2 && (x & 0xffff)) || (pad == 1 && (x & 0xff)))
			return -EINVAL;
		out[o++] = (unsigned char)(x >> 16);
		if (pad < 2)
			out[o++] = (unsigned char)(x >> 8);
		if (pad < 1)
			out[o++] = (unsigned char)x;
	}
	return (long)o;
}
