/*
 * SMTP command lines and their arguments (RFC 5321 4.1.1, 4.1.2, 4.5.3.1;
 * RFC 1870 SIZE, RFC 6152 BODY, RFC 6531 SMTPUTF8, RFC 3030 BDAT, RFC 3461
 * DSN: RET, ENVID, NOTIFY, ORCPT).
 *
 * Contract: pure functions over byte slices. The line reader is the only
 * incremental piece; it keeps at most SMTP_LINE_MAX octets and never
 * consumes the terminating LF itself (see smtp_parse.h), which lets the
 * session hold a complete command back without copying it anywhere.
 *
 * Limits: a line is 512 octets with its CRLF (MAIL and RCPT: 1024, for
 * their extension parameters), a local part 64, a domain 255, a path 256
 * including its angle brackets (RFC 5321 4.5.3.1); ENVID 100 and ORCPT 500
 * octets (RFC 3461 4.4, 4.2). Address
 * syntax is the RFC 5321 grammar, not the looser RFC 5322 one: no comments,
 * no folding, no obsolete forms. Source routes are parsed and dropped.
 */
#include <arpa/inet.h>
#include <string.h>

#include "finaldot/utf8.h"
#include "smtp/smtp_parse.h"

const char *
smtp_parse_result_name(enum smtp_parse_result r)
{
	switch (r) {
	case SMTP_PARSE_OK:
		return "ok";
	case SMTP_PARSE_AGAIN:
		return "again";
	case SMTP_PARSE_ERR_TOO_LONG:
		return "too-long";
	case SMTP_PARSE_ERR_SYNTAX:
		return "syntax";
	case SMTP_PARSE_ERR_CHAR:
		return "bad-char";
	case SMTP_PARSE_ERR_UTF8:
		return "bad-utf8";
	case SMTP_PARSE_ERR_PARAM_UNKNOWN:
		return "param-unknown";
	case SMTP_PARSE_ERR_PARAM_VALUE:
		return "param-value";
	}
	return "?";
}

/* ---- line reader ---- */

void
smtp_line_reset(struct smtp_line *l)
{
	l->len = 0;
	l->max = SMTP_LINE_MAX;
	l->overflow = false;
}

void
smtp_line_set_max(struct smtp_line *l, size_t max)
{
	if (max > sizeof(l->buf))
		max = sizeof(l->buf);
	if (max < 1)
		max = 1;
	l->max = max;
	if (l->len > max - 1)
		l->overflow = true;
}

enum smtp_parse_result
smtp_line_feed(struct smtp_line *l, const uint8_t *p, size_t n, size_t *used)
{
	const uint8_t *lf = memchr(p, '\n', n);
	size_t take = lf ? (size_t)(lf - p) : n;

	if (!l->overflow) {
		/* Keep room for the LF: content + LF <= max. */
		size_t space = l->max - 1 - l->len;
		if (take > space) {
			l->overflow = true;
		} else {
			memcpy(l->buf + l->len, p, take);
			l->len += take;
		}
	}
	*used = take;
	if (!lf)
		return SMTP_PARSE_AGAIN;
	return l->overflow ? SMTP_PARSE_ERR_TOO_LONG : SMTP_PARSE_OK;
}

size_t
smtp_line_content(const struct smtp_line *l, const char **p)
{
	size_t n = l->len;

	if (n > 0 && l->buf[n - 1] == '\r')
		n--;
	*p = l->buf;
	return n;
}

size_t
smtp_line_wire_len(const struct smtp_line *l)
{
	return l->len + 1;
}

/* ---- character classes ---- */

static bool
is_alpha(unsigned char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

static bool
is_digit(unsigned char c)
{
	return c >= '0' && c <= '9';
}

/* RFC 5322 3.2.3 atext; octets >= 0x80 are checked as UTF-8 later. */
static bool
is_atext(unsigned char c)
{
	if (is_alpha(c) || is_digit(c) || c >= 0x80)
		return true;
	return c != '\0' && strchr("!#$%&'*+-/=?^_`{|}~", c) != NULL;
}

static unsigned char
lower(unsigned char c)
{
	return (c >= 'A' && c <= 'Z') ? (unsigned char)(c + 32) : c;
}

static bool
prefix_ci(const char *s, size_t len, const char *word)
{
	size_t wl = strlen(word);

	if (len < wl)
		return false;
	for (size_t i = 0; i < wl; i++)
		if (lower((unsigned char)s[i]) != lower((unsigned char)word[i]))
			return false;
	return true;
}

static bool
equal_ci(const char *s, size_t len, const char *word)
{
	return strlen(word) == len && prefix_ci(s, len, word);
}

size_t
smtp_line_limit(const char *line, size_t len)
{
	if (prefix_ci(line, len, "MAIL ") || prefix_ci(line, len, "RCPT "))
		return SMTP_PARAM_LINE_MAX;
	return SMTP_LINE_MAX;
}

bool
smtp_utf8_valid(const uint8_t *p, size_t n)
{
	return fd_utf8_valid(p, n);
}

/* ---- command line ---- */

enum smtp_parse_result
smtp_parse_command(const char *line, size_t len, struct smtp_cmd *cmd)
{
	size_t i = 0;

	for (size_t k = 0; k < len; k++) {
		unsigned char c = (unsigned char)line[k];
		if (c < 0x20 || c == 0x7f)
			return SMTP_PARSE_ERR_CHAR;
	}
	while (len > 0 && line[len - 1] == ' ')
		len--;
	while (i < len && is_alpha((unsigned char)line[i]))
		i++;
	if (i == 0 || (i < len && line[i] != ' '))
		return SMTP_PARSE_ERR_SYNTAX;
	cmd->verb = line;
	cmd->verb_len = i;
	while (i < len && line[i] == ' ')
		i++;
	cmd->arg = line + i;
	cmd->arg_len = len - i;
	return SMTP_PARSE_OK;
}

/* ---- domains, address literals, paths ---- */

/*
 * Domain = sub-domain *("." sub-domain), sub-domain = Let-dig [Ldh-str]
 * (RFC 5321 4.1.2), with U-label octets (>= 0x80, RFC 6531 3.3) allowed
 * and one trailing dot tolerated. Returns the length parsed, 0 if none.
 */
static size_t
parse_domain(const char *s, size_t len, bool *non_ascii)
{
	size_t i = 0;

	for (;;) {
		size_t start = i;
		while (i < len) {
			unsigned char c = (unsigned char)s[i];
			if (is_alpha(c) || is_digit(c) || c >= 0x80)
				*non_ascii |= c >= 0x80;
			else if (!(c == '-' && i > start))
				break;
			i++;
		}
		if (i == start) {
			/* One trailing dot: "example.com." */
			return start >= 2 && s[start - 1] == '.' &&
					       s[start - 2] != '.'
				       ? start
				       : 0;
		}
		if (s[i - 1] == '-' || i - start > 63)
			return 0;
		if (i >= len || s[i] != '.')
			return i;
		i++;
	}
}

static bool
ipv4_literal(const char *s, size_t len)
{
	unsigned parts = 0;
	size_t i = 0;

	while (parts < 4) {
		unsigned v = 0, d = 0;
		while (i < len && is_digit((unsigned char)s[i]) && d < 4) {
			v = v * 10 + (unsigned)(s[i] - '0');
			i++, d++;
		}
		if (d == 0 || d > 3 || v > 255)
			return false;
		if (++parts < 4) {
			if (i >= len || s[i] != '.')
				return false;
			i++;
		}
	}
	return i == len;
}

/* s[0] == '['; returns the literal's length with brackets, 0 if bad. */
static size_t
parse_address_literal(const char *s, size_t len)
{
	const char *end = memchr(s, ']', len);
	size_t n;
	const char *in;

	if (!end)
		return 0;
	in = s + 1;
	n = (size_t)(end - in);
	if (n == 0)
		return 0;
	if (ipv4_literal(in, n))
		return n + 2;
	if (prefix_ci(in, n, "IPv6:")) {
		char buf[64];
		unsigned char addr[16];
		if (n - 5 >= sizeof(buf))
			return 0;
		memcpy(buf, in + 5, n - 5);
		buf[n - 5] = '\0';
		return inet_pton(AF_INET6, buf, addr) == 1 ? n + 2 : 0;
	}
	/* General-address-literal: Standardized-tag ":" 1*dcontent. */
	{
		size_t i = 0;
		while (i < n && (is_alpha((unsigned char)in[i]) ||
				 is_digit((unsigned char)in[i]) ||
				 (in[i] == '-' && i > 0)))
			i++;
		if (i == 0 || in[i - 1] == '-' || i >= n || in[i] != ':' ||
		    i + 1 == n)
			return 0;
		for (i++; i < n; i++) {
			unsigned char c = (unsigned char)in[i];
			if (!((c >= 33 && c <= 90) || (c >= 94 && c <= 126)))
				return 0;
		}
		return n + 2;
	}
}

/* Local-part = Dot-string / Quoted-string. Returns its length, 0 if bad. */
static size_t
parse_local(const char *s, size_t len, struct smtp_path *out)
{
	size_t i = 0;

	if (len > 0 && s[0] == '"') {
		out->quoted = true;
		for (i = 1; i < len && s[i] != '"'; i++) {
			unsigned char c = (unsigned char)s[i];
			if (c == '\\') {
				if (i + 1 >= len || s[i + 1] < 32 ||
				    s[i + 1] > 126)
					return 0;
				c = (unsigned char)s[++i];
			} else if (!((c >= 32 && c <= 126) || c >= 0x80)) {
				return 0;
			}
			out->non_ascii |= c >= 0x80;
			out->local_special |= c == '@' || c == '%' || c == '!';
		}
		if (i >= len || i == 1)
			return 0; /* unterminated, or "" */
		return i + 1;
	}
	for (;;) {
		size_t start = i;
		while (i < len && is_atext((unsigned char)s[i])) {
			unsigned char c = (unsigned char)s[i];
			out->non_ascii |= c >= 0x80;
			out->local_special |= c == '%' || c == '!';
			i++;
		}
		if (i == start)
			return 0;
		if (i >= len || s[i] != '.')
			return i;
		i++;
	}
}

static enum smtp_parse_result
parse_path(const char *s, size_t len, unsigned flags, struct smtp_path *out,
	   size_t *used)
{
	size_t i = 1, n;

	memset(out, 0, sizeof(*out));
	if (len < 2 || s[0] != '<')
		return SMTP_PARSE_ERR_SYNTAX;
	if (s[1] == '>') {
		if (!(flags & SMTP_PATH_ALLOW_NULL))
			return SMTP_PARSE_ERR_SYNTAX;
		out->null = true;
		out->mailbox = s + 1;
		*used = 2;
		return SMTP_PARSE_OK;
	}
	/* A-d-l = At-domain *( "," At-domain ) ":" (RFC 5321 4.1.2). */
	if (s[1] == '@') {
		bool na = false;
		out->route = true;
		for (;;) {
			if (i >= len || s[i] != '@')
				return SMTP_PARSE_ERR_SYNTAX;
			i++;
			n = parse_domain(s + i, len - i, &na);
			if (n == 0)
				return SMTP_PARSE_ERR_SYNTAX;
			i += n;
			if (i < len && s[i] == ',') {
				i++;
				continue;
			}
			if (i < len && s[i] == ':') {
				i++;
				break;
			}
			return SMTP_PARSE_ERR_SYNTAX;
		}
		out->non_ascii |= na;
	}
	out->mailbox = s + i;
	n = parse_local(s + i, len - i, out);
	if (n == 0)
		return SMTP_PARSE_ERR_SYNTAX;
	out->local_len = n;
	i += n;
	if (i < len && s[i] == '>' && (flags & SMTP_PATH_ALLOW_POSTMASTER) &&
	    !out->route && !out->quoted &&
	    equal_ci(out->mailbox, n, "postmaster")) {
		out->postmaster = true;
		out->mailbox_len = n;
		*used = i + 1;
		return SMTP_PARSE_OK;
	}
	if (i >= len || s[i] != '@')
		return SMTP_PARSE_ERR_SYNTAX;
	i++;
	out->domain = s + i;
	if (i < len && s[i] == '[') {
		n = parse_address_literal(s + i, len - i);
		out->domain_literal = true;
	} else {
		n = parse_domain(s + i, len - i, &out->non_ascii);
	}
	if (n == 0)
		return SMTP_PARSE_ERR_SYNTAX;
	out->domain_len = n;
	i += n;
	if (i >= len || s[i] != '>')
		return SMTP_PARSE_ERR_SYNTAX;
	out->mailbox_len = (size_t)(s + i - out->mailbox);
	*used = i + 1;
	if (out->local_len > SMTP_LOCAL_MAX || out->domain_len > SMTP_DOMAIN_MAX ||
	    i + 1 > SMTP_PATH_MAX)
		return SMTP_PARSE_ERR_TOO_LONG;
	if (out->non_ascii &&
	    !smtp_utf8_valid((const uint8_t *)s, i + 1))
		return SMTP_PARSE_ERR_UTF8;
	return SMTP_PARSE_OK;
}

/* ---- ESMTP parameters (RFC 5321 4.1.2 Mail-parameters) ---- */

struct param {
	const char *key;
	size_t key_len;
	const char *val; /* NULL: no "=value" */
	size_t val_len;
};

/*
 * Next " keyword[=value]" at s[*i]. Returns OK (param filled), AGAIN when
 * there is none left, or SYNTAX.
 */
static enum smtp_parse_result
next_param(const char *s, size_t len, size_t *i, struct param *p)
{
	size_t k = *i;

	if (k >= len)
		return SMTP_PARSE_AGAIN;
	if (s[k] != ' ')
		return SMTP_PARSE_ERR_SYNTAX;
	while (k < len && s[k] == ' ')
		k++;
	if (k >= len)
		return SMTP_PARSE_AGAIN;
	p->key = s + k;
	if (!is_alpha((unsigned char)s[k]) && !is_digit((unsigned char)s[k]))
		return SMTP_PARSE_ERR_SYNTAX;
	while (k < len && (is_alpha((unsigned char)s[k]) ||
			   is_digit((unsigned char)s[k]) || s[k] == '-'))
		k++;
	p->key_len = (size_t)(s + k - p->key);
	p->val = NULL;
	p->val_len = 0;
	if (k < len && s[k] == '=') {
		k++;
		p->val = s + k;
		while (k < len) {
			unsigned char c = (unsigned char)s[k];
			if (!((c >= 33 && c <= 60) || (c >= 62 && c <= 126) ||
			      c >= 0x80))
				break;
			k++;
		}
		p->val_len = (size_t)(s + k - p->val);
		if (p->val_len == 0)
			return SMTP_PARSE_ERR_SYNTAX;
		if (!smtp_utf8_valid((const uint8_t *)p->val, p->val_len))
			return SMTP_PARSE_ERR_UTF8;
	}
	if (k < len && s[k] != ' ')
		return SMTP_PARSE_ERR_SYNTAX;
	*i = k;
	return SMTP_PARSE_OK;
}

static bool
parse_u64(const char *s, size_t len, uint64_t *v)
{
	uint64_t x = 0;

	if (len == 0 || len > 20)
		return false;
	for (size_t i = 0; i < len; i++) {
		unsigned d;
		if (!is_digit((unsigned char)s[i]))
			return false;
		d = (unsigned)(s[i] - '0');
		if (x > (UINT64_MAX - d) / 10)
			return false;
		x = x * 10 + d;
	}
	*v = x;
	return true;
}

/* ---- DSN parameter values (RFC 3461 4) ---- */

static bool
is_upper_hex(unsigned char c)
{
	return is_digit(c) || (c >= 'A' && c <= 'F');
}

bool
smtp_xtext_valid(const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c == '+') {
			if (n - i < 3 || !is_upper_hex((unsigned char)s[i + 1]) ||
			    !is_upper_hex((unsigned char)s[i + 2]))
				return false;
			i += 2;
		} else if (c < '!' || c > '~' || c == '=') {
			return false;
		}
	}
	return true;
}

/* NOTIFY="NEVER" / notify-list-element *("," notify-list-element). */
static bool
parse_notify(const char *v, size_t n, uint8_t *out)
{
	uint8_t bits = 0;
	size_t i = 0;

	for (;;) {
		const char *e = memchr(v + i, ',', n - i);
		size_t k = e ? (size_t)(e - (v + i)) : n - i;
		const char *w = v + i;
		if (equal_ci(w, k, "NEVER"))
			bits |= FD_NOTIFY_NEVER;
		else if (equal_ci(w, k, "SUCCESS"))
			bits |= FD_NOTIFY_SUCCESS;
		else if (equal_ci(w, k, "FAILURE"))
			bits |= FD_NOTIFY_FAILURE;
		else if (equal_ci(w, k, "DELAY"))
			bits |= FD_NOTIFY_DELAY;
		else
			return false; /* unknown word or empty element */
		if (!e)
			break;
		i += k + 1;
	}
	/* RFC 3461 4.1: NEVER must appear by itself. */
	if ((bits & FD_NOTIFY_NEVER) && bits != FD_NOTIFY_NEVER)
		return false;
	*out = bits;
	return true;
}

/*
 * ORCPT=addr-type ";" xtext, addr-type = atom (RFC 3461 4.2). XXX for the
 * "utf-8" address type RFC 6533 3 also allows raw UTF-8 (utf-8-addr-
 * unitext): those octets are accepted (next_param() checked the UTF-8), the
 * "\x{...}" escapes are plain xtext characters anyway.
 */
static bool
orcpt_valid(const char *v, size_t n)
{
	const char *semi = memchr(v, ';', n);
	size_t tl, i;
	bool utf8_type;

	if (!semi || semi == v || n > SMTP_ORCPT_MAX)
		return false;
	tl = (size_t)(semi - v);
	for (i = 0; i < tl; i++) {
		unsigned char c = (unsigned char)v[i];
		if (c >= 0x80 || !is_atext(c))
			return false;
	}
	utf8_type = equal_ci(v, tl, "utf-8");
	for (i = tl + 1; i < n; i++) {
		unsigned char c = (unsigned char)v[i];
		if (c >= 0x80 && utf8_type)
			continue;
		if (c == '+') {
			if (n - i < 3 || !is_upper_hex((unsigned char)v[i + 1]) ||
			    !is_upper_hex((unsigned char)v[i + 2]))
				return false;
			i += 2;
		} else if (c < '!' || c > '~' || c == '=') {
			return false;
		}
	}
	return true;
}

/* "FROM:" or "TO:" then an optional SP (a common client habit). */
static size_t
skip_keyword(const char *arg, size_t len, const char *kw)
{
	size_t i = strlen(kw);

	if (!prefix_ci(arg, len, kw))
		return 0;
	if (i < len && arg[i] == ' ')
		i++;
	return i;
}

enum smtp_parse_result
smtp_parse_mail(const char *arg, size_t len, struct smtp_mail_args *m)
{
	enum smtp_parse_result r;
	struct param p;
	size_t i, used;

	memset(m, 0, sizeof(*m));
	i = skip_keyword(arg, len, "FROM:");
	if (i == 0)
		return SMTP_PARSE_ERR_SYNTAX;
	r = parse_path(arg + i, len - i, SMTP_PATH_ALLOW_NULL, &m->path,
		       &used);
	if (r != SMTP_PARSE_OK)
		return r;
	m->path_ok = true;
	i += used;
	while ((r = next_param(arg, len, &i, &p)) == SMTP_PARSE_OK) {
		m->n_params++;
		if (equal_ci(p.key, p.key_len, "SIZE")) {
			/* RFC 1870 6: size-value = 1*20DIGIT */
			if (m->has_size || !p.val ||
			    !parse_u64(p.val, p.val_len, &m->size))
				return SMTP_PARSE_ERR_SYNTAX;
			m->has_size = true;
		} else if (equal_ci(p.key, p.key_len, "BODY")) {
			if (m->body != FD_BODY_NONE || !p.val)
				return SMTP_PARSE_ERR_SYNTAX;
			if (equal_ci(p.val, p.val_len, "7BIT"))
				m->body = FD_BODY_7BIT;
			else if (equal_ci(p.val, p.val_len, "8BITMIME"))
				m->body = FD_BODY_8BITMIME;
			else /* BINARYMIME is not advertised (RFC 3030 3) */
				return SMTP_PARSE_ERR_PARAM_VALUE;
		} else if (equal_ci(p.key, p.key_len, "SMTPUTF8")) {
			/* RFC 6531 3.4: no value. */
			if (m->smtputf8 || p.val)
				return SMTP_PARSE_ERR_SYNTAX;
			m->smtputf8 = true;
		} else if (equal_ci(p.key, p.key_len, "RET")) {
			/* RFC 3461 4.3 */
			if (m->ret != FD_RET_NONE || !p.val)
				return SMTP_PARSE_ERR_SYNTAX;
			if (equal_ci(p.val, p.val_len, "FULL"))
				m->ret = FD_RET_FULL;
			else if (equal_ci(p.val, p.val_len, "HDRS"))
				m->ret = FD_RET_HDRS;
			else
				return SMTP_PARSE_ERR_SYNTAX;
		} else if (equal_ci(p.key, p.key_len, "ENVID")) {
			/* RFC 3461 4.4 */
			if (m->envid || !p.val || p.val_len > SMTP_ENVID_MAX ||
			    !smtp_xtext_valid(p.val, p.val_len))
				return SMTP_PARSE_ERR_SYNTAX;
			m->envid = p.val;
			m->envid_len = p.val_len;
		} else {
			return SMTP_PARSE_ERR_PARAM_UNKNOWN;
		}
	}
	return r == SMTP_PARSE_AGAIN ? SMTP_PARSE_OK : r;
}

enum smtp_parse_result
smtp_parse_rcpt(const char *arg, size_t len, struct smtp_rcpt_args *ra)
{
	enum smtp_parse_result r;
	struct param p;
	size_t i, used;

	memset(ra, 0, sizeof(*ra));
	i = skip_keyword(arg, len, "TO:");
	if (i == 0)
		return SMTP_PARSE_ERR_SYNTAX;
	r = parse_path(arg + i, len - i, SMTP_PATH_ALLOW_POSTMASTER, &ra->path,
		       &used);
	if (r != SMTP_PARSE_OK)
		return r;
	ra->path_ok = true;
	i += used;
	while ((r = next_param(arg, len, &i, &p)) == SMTP_PARSE_OK) {
		ra->n_params++;
		if (equal_ci(p.key, p.key_len, "NOTIFY")) {
			/* RFC 3461 4.1 */
			if (ra->notify || !p.val ||
			    !parse_notify(p.val, p.val_len, &ra->notify))
				return SMTP_PARSE_ERR_SYNTAX;
		} else if (equal_ci(p.key, p.key_len, "ORCPT")) {
			/* RFC 3461 4.2 */
			if (ra->orcpt || !p.val || !orcpt_valid(p.val, p.val_len))
				return SMTP_PARSE_ERR_SYNTAX;
			ra->orcpt = p.val;
			ra->orcpt_len = p.val_len;
		} else {
			return SMTP_PARSE_ERR_PARAM_UNKNOWN;
		}
	}
	return r == SMTP_PARSE_AGAIN ? SMTP_PARSE_OK : r;
}

enum smtp_parse_result
smtp_parse_bdat(const char *arg, size_t len, uint64_t *size, bool *last)
{
	size_t i = 0;

	while (i < len && is_digit((unsigned char)arg[i]))
		i++;
	if (!parse_u64(arg, i, size))
		return SMTP_PARSE_ERR_SYNTAX;
	*last = false;
	if (i == len)
		return SMTP_PARSE_OK;
	if (arg[i] != ' ')
		return SMTP_PARSE_ERR_SYNTAX;
	while (i < len && arg[i] == ' ')
		i++;
	if (!equal_ci(arg + i, len - i, "LAST"))
		return SMTP_PARSE_ERR_SYNTAX;
	*last = true;
	return SMTP_PARSE_OK;
}

bool
smtp_domain_equal(const char *a, size_t alen, const char *b, size_t blen)
{
	if (alen > 0 && a[alen - 1] == '.')
		alen--;
	if (blen > 0 && b[blen - 1] == '.')
		blen--;
	if (alen != blen || alen == 0)
		return false;
	for (size_t i = 0; i < alen; i++)
		if (lower((unsigned char)a[i]) != lower((unsigned char)b[i]))
			return false;
	return true;
}
