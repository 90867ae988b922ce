/*
 * Route targets and the route table (contract in route.h).
 *
 * Parsing is strict on purpose: an operator's typo must stop the daemon at
 * start (--check-config), not turn into deferred mail. Host names follow
 * the RFC 5321 section 4.1.2 domain grammar; an all-numeric name must be a
 * valid dotted-quad IPv4 address, so "10.0.0.256" is refused instead of
 * being looked up in the DNS. IPv6 literals are checked with inet_pton()
 * and stored in inet_ntop()'s form, so that the canonical text (the key of
 * a per-destination queue) is the same however the operator spelled it.
 *
 * The table is an open-addressing hash (linear probing, power-of-two size,
 * at most half full) of pointers to individually allocated entries, so
 * that a pointer returned by route_lookup() stays valid while more routes
 * are added. Routes are few (one per local or hosted domain); the per-entry
 * allocation is only at start.
 *
 * Limits: no wildcard or parent-domain routes; IPv6 zone ids ("%eth0") are
 * refused; host names are not resolved here.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/un.h>

#include "finaldot/mailbox.h"
#include "route.h"

/* Longest domain (RFC 5321 section 4.5.3.1.2) and label (RFC 1035
 * section 2.3.4). */
#define DOMAIN_MAX 255
#define LABEL_MAX 63
#define UNIX_PATH_MAX (sizeof(((struct sockaddr_un *)0)->sun_path) - 1)

struct route_entry {
	uint64_t hash;
	char domain[DOMAIN_MAX + 1];
	struct route_target t;
};

struct route_table {
	struct route_entry **slots;
	size_t cap; /* power of two */
	size_t n;
	bool has_default;
	struct route_target def;
};

/* ---- helpers ----------------------------------------------------------- */

static char
lower(char c)
{
	return c >= 'A' && c <= 'Z' ? (char)(c - 'A' + 'a') : c;
}

static bool
is_alnum(char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
	       (c >= '0' && c <= '9');
}

static bool
is_ctl(unsigned char c)
{
	return c < 0x20 || c == 0x7f;
}

/* The input, printable and short, for a reason line. */
static void
quote(char *dst, size_t dstsz, const char *s)
{
	size_t o = 0;

	for (size_t i = 0; s[i] && o + 4 < dstsz; i++) {
		unsigned char c = (unsigned char)s[i];
		dst[o++] = c >= 0x20 && c < 0x7f ? (char)c : '?';
		if (i == 60 && s[i + 1]) {
			memcpy(dst + o, "...", 3);
			o += 3;
			break;
		}
	}
	dst[o] = '\0';
}

__attribute__((format(printf, 3, 4))) static int
fail(char *why, size_t why_len, const char *fmt, ...)
{
	va_list ap;

	if (why && why_len) {
		va_start(ap, fmt);
		vsnprintf(why, why_len, fmt, ap);
		va_end(ap);
	}
	return -EINVAL;
}

/*
 * RFC 5321 section 4.1.2: Domain = sub-domain *("." sub-domain),
 * sub-domain = Let-dig [Ldh-str]: no empty label, no hyphen at either end
 * of a label. NULL if s[0..n) is one, else what is wrong.
 */
static const char *
domain_error(const char *s, size_t n)
{
	size_t label = 0;

	if (n == 0)
		return "empty domain";
	if (n > DOMAIN_MAX)
		return "domain longer than 255 bytes";
	for (size_t i = 0; i < n; i++) {
		char c = s[i];
		if (c == '.') {
			if (label == 0)
				return "empty label in domain";
			if (s[i - 1] == '-')
				return "label ends with '-' in domain";
			label = 0;
			continue;
		}
		if (!is_alnum(c) && c != '-')
			return "bad character in domain";
		if (c == '-' && label == 0)
			return "label starts with '-' in domain";
		if (++label > LABEL_MAX)
			return "label longer than 63 bytes in domain";
	}
	if (label == 0)
		return "empty label in domain";
	if (s[n - 1] == '-')
		return "label ends with '-' in domain";
	return NULL;
}

static bool
all_numeric(const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (s[i] != '.' && (s[i] < '0' || s[i] > '9'))
			return false;
	return true;
}

/* Decimal 1..65535, digits only. */
static int
parse_port(const char *s, uint16_t *port)
{
	unsigned long v = 0;

	if (!*s)
		return -EINVAL;
	for (; *s; s++) {
		if (*s < '0' || *s > '9')
			return -EINVAL;
		v = v * 10 + (unsigned long)(*s - '0');
		if (v > 65535)
			return -EINVAL;
	}
	if (v == 0)
		return -EINVAL;
	*port = (uint16_t)v;
	return 0;
}

static int
parse_hostport(const char *rest, struct route_target *t, char *why,
	       size_t why_len, const char *q)
{
	const char *colon, *host = rest;
	size_t hlen;
	char tmp[DOMAIN_MAX + 1];

	if (rest[0] == '[') {
		const char *close = strchr(rest, ']');
		struct in6_addr a6;
		if (!close)
			return fail(why, why_len, "missing ']' in '%s'", q);
		hlen = (size_t)(close - rest - 1);
		if (hlen == 0 || hlen >= sizeof(tmp))
			return fail(why, why_len, "bad IPv6 address in '%s'",
				    q);
		memcpy(tmp, rest + 1, hlen);
		tmp[hlen] = '\0';
		if (inet_pton(AF_INET6, tmp, &a6) != 1)
			return fail(why, why_len, "bad IPv6 address in '%s'",
				    q);
		if (close[1] != ':')
			return fail(why, why_len, "missing port in '%s'", q);
		if (parse_port(close + 2, &t->port) != 0)
			return fail(why, why_len, "bad port in '%s'", q);
		if (!inet_ntop(AF_INET6, &a6, t->host, sizeof(t->host)))
			return fail(why, why_len, "bad IPv6 address in '%s'",
				    q);
		return 0;
	}
	colon = strchr(rest, ':');
	if (!colon)
		return fail(why, why_len, "missing port in '%s'", q);
	hlen = (size_t)(colon - host);
	if (hlen == 0)
		return fail(why, why_len, "empty host in '%s'", q);
	if (strchr(colon + 1, ':'))
		return fail(why, why_len,
			    "IPv6 address needs brackets in '%s'", q);
	if (parse_port(colon + 1, &t->port) != 0)
		return fail(why, why_len, "bad port in '%s'", q);
	if (hlen >= sizeof(t->host))
		return fail(why, why_len, "host too long in '%s'", q);
	if (all_numeric(host, hlen)) {
		struct in_addr a4;
		memcpy(tmp, host, hlen);
		tmp[hlen] = '\0';
		if (inet_pton(AF_INET, tmp, &a4) != 1)
			return fail(why, why_len, "bad IPv4 address in '%s'",
				    q);
	} else {
		const char *e = domain_error(host, hlen);
		struct in_addr a4;
		if (e)
			return fail(why, why_len, "bad host name (%s) in '%s'",
				    e, q);
		/* "0x7f.0.0.1" is a valid name to the checks above, and
		 * getaddrinfo() would take it as 127.0.0.1: an address is
		 * written as a dotted quad or not at all. */
		memcpy(tmp, host, hlen);
		tmp[hlen] = '\0';
		if (inet_aton(tmp, &a4) != 0)
			return fail(why, why_len,
				    "IPv4 address not in dotted-quad form in "
				    "'%s'",
				    q);
	}
	for (size_t i = 0; i < hlen; i++)
		t->host[i] = lower(host[i]);
	t->host[hlen] = '\0';
	return 0;
}

static int
parse_path(const char *p, size_t max, char *dst, char *why, size_t why_len,
	   const char *q)
{
	size_t n = strlen(p);

	if (n == 0)
		return fail(why, why_len, "empty path in '%s'", q);
	if (n > max)
		return fail(why, why_len, "path longer than %zu bytes in '%s'",
			    max, q);
	for (size_t i = 0; i < n; i++) {
		if (is_ctl((unsigned char)p[i]))
			return fail(why, why_len,
				    "control character in path in '%s'", q);
		/* A path may hold a comma, but ",tls=" here is an option
		 * given where there are none: it was taken into the path. */
		if (p[i] == ',' && (!strncmp(p + i + 1, "tls=", 4) ||
				    !strncmp(p + i + 1, "ca=", 3)))
			return fail(why, why_len,
				    "options (tls=, ca=) are for smtp: and "
				    "lmtp: over TCP only, in '%s'",
				    q);
	}
	memcpy(dst, p, n + 1);
	return 0;
}

/* ---- parsing ----------------------------------------------------------- */

int
route_tls_parse(const char *s, size_t n)
{
	static const char *names[] = {"none", "may", "encrypt", "verify"};

	for (int i = 0; i < 4; i++)
		if (strlen(names[i]) == n && !strncmp(s, names[i], n))
			return ROUTE_TLS_NONE + i;
	return -1;
}

const char *
route_tls_name(enum route_tls t)
{
	switch (t) {
	case ROUTE_TLS_NONE:
		return "none";
	case ROUTE_TLS_MAY:
		return "may";
	case ROUTE_TLS_ENCRYPT:
		return "encrypt";
	case ROUTE_TLS_VERIFY:
		return "verify";
	case ROUTE_TLS_DEFAULT:
		break;
	}
	return "default";
}

/* ",tls=POLICY" and ",ca=FILE" after HOST:PORT. */
static int
parse_options(const char *o, struct route_target *t, char *why,
	      size_t why_len, const char *q)
{
	while (*o == ',') {
		const char *v, *e;
		o++;
		e = strchr(o, ',');
		if (!e)
			e = o + strlen(o);
		v = memchr(o, '=', (size_t)(e - o));
		if (!v)
			return fail(why, why_len, "option without '=' in '%s'",
				    q);
		v++;
		if (v - o == 4 && !strncmp(o, "tls=", 4)) {
			int p = route_tls_parse(v, (size_t)(e - v));
			if (p < 0)
				return fail(why, why_len,
					    "tls= takes none, may, encrypt or "
					    "verify in '%s'",
					    q);
			t->tls = (enum route_tls)p;
		} else if (v - o == 3 && !strncmp(o, "ca=", 3)) {
			size_t n = (size_t)(e - v);
			if (n == 0 || n >= sizeof(t->tls_ca))
				return fail(why, why_len, "bad ca= in '%s'", q);
			memcpy(t->tls_ca, v, n);
			t->tls_ca[n] = '\0';
		} else {
			return fail(why, why_len,
				    "unknown option in '%s' (tls=, ca=)", q);
		}
		o = e;
	}
	if (*o)
		return fail(why, why_len, "trailing text in '%s'", q);
	return 0;
}

int
route_parse_target(const char *s, struct route_target *t, char *why,
		   size_t why_len)
{
	char q[72], hp[600];
	const char *comma;
	int r;

	if (!s || !t)
		return fail(why, why_len, "no target");
	quote(q, sizeof(q), s);
	memset(t, 0, sizeof(*t));
	if (!*s)
		return fail(why, why_len, "empty target");
	/* Options follow HOST:PORT of smtp: and lmtp: over TCP. */
	comma = strncmp(s, "maildir:", 8) && strncmp(s, "lmtp:unix:", 10)
			? strchr(s, ',')
			: NULL;
	if (comma) {
		if ((size_t)(comma - s) >= sizeof(hp))
			return fail(why, why_len, "target too long: '%s'", q);
		memcpy(hp, s, (size_t)(comma - s));
		hp[comma - s] = '\0';
		r = parse_options(comma, t, why, why_len, q);
		if (r != 0)
			return r;
		s = hp;
	}
	if (!strncmp(s, "smtp:", 5)) {
		t->kind = ROUTE_SMTP;
		r = parse_hostport(s + 5, t, why, why_len, q);
	} else if (!strncmp(s, "lmtp:unix:", 10)) {
		t->kind = ROUTE_LMTP_UNIX;
		r = parse_path(s + 10, UNIX_PATH_MAX, t->path, why, why_len, q);
	} else if (!strncmp(s, "lmtp:", 5)) {
		t->kind = ROUTE_LMTP;
		r = parse_hostport(s + 5, t, why, why_len, q);
		/* "lmtp:unix:N" is a socket path: a host named "unix" would
		 * not survive its own canonical text. */
		if (r == 0 && !strcmp(t->host, "unix"))
			return fail(why, why_len,
				    "host 'unix' is ambiguous in '%s'", q);
	} else if (!strncmp(s, "maildir:", 8)) {
		t->kind = ROUTE_MAILDIR;
		r = parse_path(s + 8, sizeof(t->path) - 1, t->path, why,
			       why_len, q);
	} else {
		return fail(why, why_len,
			    "unknown scheme in '%s' (smtp:, lmtp:, maildir:)",
			    q);
	}
	if (r != 0)
		return r;
	switch (t->kind) {
	case ROUTE_SMTP:
	case ROUTE_LMTP:
		snprintf(t->text, sizeof(t->text),
			 strchr(t->host, ':') ? "%s:[%s]:%u%s%s%s%s"
					      : "%s:%s:%u%s%s%s%s",
			 t->kind == ROUTE_SMTP ? "smtp" : "lmtp", t->host,
			 (unsigned)t->port, t->tls ? ",tls=" : "",
			 t->tls ? route_tls_name(t->tls) : "",
			 t->tls_ca[0] ? ",ca=" : "", t->tls_ca);
		break;
	case ROUTE_LMTP_UNIX:
		snprintf(t->text, sizeof(t->text), "lmtp:unix:%s", t->path);
		break;
	case ROUTE_MAILDIR:
		snprintf(t->text, sizeof(t->text), "maildir:%s", t->path);
		break;
	}
	return 0;
}

int
route_parse_rule(const char *s, char *domain, size_t domain_len,
		 struct route_target *t, char *why, size_t why_len)
{
	const char *eq, *e;
	char q[72];
	size_t n;

	if (!s || !domain || !t)
		return fail(why, why_len, "no rule");
	quote(q, sizeof(q), s);
	eq = strchr(s, '=');
	if (!eq)
		return fail(why, why_len, "missing '=' in '%s' (DOMAIN=TARGET)",
			    q);
	n = (size_t)(eq - s);
	e = domain_error(s, n);
	if (e)
		return fail(why, why_len, "%s in '%s'", e, q);
	if (n >= domain_len)
		return fail(why, why_len, "domain buffer too small for '%s'",
			    q);
	for (size_t i = 0; i < n; i++)
		domain[i] = lower(s[i]);
	domain[n] = '\0';
	return route_parse_target(eq + 1, t, why, why_len);
}

/* ---- table ------------------------------------------------------------- */

/* FNV-1a over the lower-cased bytes, then a final mix (the low bits pick
 * the slot). */
static uint64_t
hash_domain(const char *s, size_t n)
{
	uint64_t h = 0xcbf29ce484222325ull;

	for (size_t i = 0; i < n; i++) {
		h ^= (uint8_t)lower(s[i]);
		h *= 0x100000001b3ull;
	}
	h ^= h >> 33;
	h *= 0xff51afd7ed558ccdull;
	h ^= h >> 33;
	return h;
}

static bool
same_domain(const char *stored, const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (stored[i] != lower(s[i]))
			return false;
	return stored[n] == '\0';
}

struct route_table *
route_table_new(void)
{
	struct route_table *rt = calloc(1, sizeof(*rt));

	if (!rt)
		return NULL;
	rt->cap = 16;
	rt->slots = calloc(rt->cap, sizeof(*rt->slots));
	if (!rt->slots) {
		free(rt);
		return NULL;
	}
	return rt;
}

void
route_table_free(struct route_table *rt)
{
	if (!rt)
		return;
	for (size_t i = 0; i < rt->cap; i++)
		free(rt->slots[i]);
	free(rt->slots);
	free(rt);
}

static int
grow(struct route_table *rt)
{
	size_t cap = rt->cap * 2;
	struct route_entry **s = calloc(cap, sizeof(*s));

	if (!s)
		return -ENOMEM;
	for (size_t i = 0; i < rt->cap; i++) {
		struct route_entry *e = rt->slots[i];
		size_t j;
		if (!e)
			continue;
		for (j = (size_t)e->hash & (cap - 1); s[j];
		     j = (j + 1) & (cap - 1))
			;
		s[j] = e;
	}
	free(rt->slots);
	rt->slots = s;
	rt->cap = cap;
	return 0;
}

int
route_table_add(struct route_table *rt, const char *domain,
		const struct route_target *t)
{
	struct route_entry *e;
	uint64_t h;
	size_t n, j;

	if (!rt || !domain || !t)
		return -EINVAL;
	n = strlen(domain);
	if (domain_error(domain, n))
		return -EINVAL;
	h = hash_domain(domain, n);
	for (j = (size_t)h & (rt->cap - 1); rt->slots[j];
	     j = (j + 1) & (rt->cap - 1))
		if (rt->slots[j]->hash == h &&
		    same_domain(rt->slots[j]->domain, domain, n))
			return -EEXIST;
	if ((rt->n + 1) * 2 > rt->cap) {
		if (grow(rt) != 0)
			return -ENOMEM;
		for (j = (size_t)h & (rt->cap - 1); rt->slots[j];
		     j = (j + 1) & (rt->cap - 1))
			;
	}
	e = malloc(sizeof(*e));
	if (!e)
		return -ENOMEM;
	e->hash = h;
	for (size_t i = 0; i < n; i++)
		e->domain[i] = lower(domain[i]);
	e->domain[n] = '\0';
	e->t = *t;
	rt->slots[j] = e;
	rt->n++;
	return 0;
}

void
route_table_set_default(struct route_table *rt, const struct route_target *t)
{
	if (!rt)
		return;
	rt->has_default = t != NULL;
	if (t)
		rt->def = *t;
}

static size_t
domain_len(const char *s)
{
	return fd_domain_len(s, strlen(s));
}

const struct route_target *
route_lookup(const struct route_table *rt, const char *domain)
{
	if (!rt)
		return NULL;
	if (domain) {
		/* The SMTP engine takes "example.com." for example.com:
		 * so does its route. */
		size_t n = domain_len(domain);
		uint64_t h = hash_domain(domain, n);
		for (size_t j = (size_t)h & (rt->cap - 1); rt->slots[j];
		     j = (j + 1) & (rt->cap - 1))
			if (rt->slots[j]->hash == h &&
			    same_domain(rt->slots[j]->domain, domain, n))
				return &rt->slots[j]->t;
	}
	return rt->has_default ? &rt->def : NULL;
}

bool
route_same_domain(const char *a, const char *b)
{
	size_t n = domain_len(a);

	if (n != domain_len(b))
		return false;
	for (size_t i = 0; i < n; i++)
		if (lower(a[i]) != lower(b[i]))
			return false;
	return true;
}

const char *
route_addr_domain(const char *addr)
{
	const char *at;

	if (!addr)
		return "";
	at = strrchr(addr, '@');
	return at ? at + 1 : addr + strlen(addr);
}
