/*
 * Routes: where a recipient domain's mail goes. A route target is parsed
 * from the text an operator writes (--route DOMAIN=TARGET, --relay TARGET);
 * a route table maps lower-cased domains to targets, with one optional
 * default (the relay) for every other domain.
 *
 * Target forms:
 *   smtp:HOST:PORT        relay by SMTP (RFC 5321)
 *   lmtp:HOST:PORT        deliver by LMTP over TCP (RFC 2033)
 *   lmtp:unix:PATH        deliver by LMTP over a unix socket
 *   maildir:DIR           deliver into DIR/DOMAIN/LOCALPART/ (maildir.h)
 * HOST is an IPv4 literal, an IPv6 literal in brackets ("[::1]"), or a host
 * name (letters, digits, hyphens, dots). PORT is 1..65535 and required.
 *
 * SMTP and LMTP over TCP take options after a comma (RFC 3207 STARTTLS to
 * the next hop; the default is the daemon's --smtp-tls):
 *   smtp:HOST:PORT,tls=none|may|encrypt|verify[,ca=FILE]
 *     none     never STARTTLS
 *     may      STARTTLS when offered, any certificate; in the clear when
 *              not offered, and once more in the clear when the handshake
 *              fails (opportunistic, RFC 7435)
 *     encrypt  STARTTLS or defer; any certificate
 *     verify   STARTTLS or defer; the certificate must chain to the system
 *              CA store (or ca=FILE) and name HOST
 *   ca=FILE    PEM CA certificates for verify, instead of the system store
 * "lmtp:unix:" always introduces a socket path, so an LMTP host named
 * "unix" is refused.
 *
 * Thread-safety: parsing is reentrant. A table is built at start, then only
 * read: lookups from many threads at once are safe as long as nobody adds
 * or sets the default at the same time.
 */
#ifndef FINALDOT_CONTROL_ROUTE_H
#define FINALDOT_CONTROL_ROUTE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum route_kind { ROUTE_SMTP, ROUTE_LMTP, ROUTE_LMTP_UNIX, ROUTE_MAILDIR };

/* STARTTLS to the next hop (see above). DEFAULT: the daemon's setting. */
enum route_tls {
	ROUTE_TLS_DEFAULT = 0,
	ROUTE_TLS_NONE,
	ROUTE_TLS_MAY,
	ROUTE_TLS_ENCRYPT,
	ROUTE_TLS_VERIFY,
};

/* "none", "may", "encrypt", "verify" -> ROUTE_TLS_*; -1 otherwise. */
int route_tls_parse(const char *s, size_t n);
const char *route_tls_name(enum route_tls t);

struct route_target {
	enum route_kind kind;
	/* SMTP/LMTP: IPv4 literal, IPv6 literal without brackets (in the
	 * canonical form of inet_ntop), or a lower-cased host name. "" for
	 * the other kinds. */
	char host[256];
	uint16_t port; /* SMTP/LMTP; 0 for the other kinds */
	/* LMTP unix socket path (at most 107 bytes: it must fit sun_path),
	 * or Maildir root directory. "" for SMTP/LMTP over TCP. */
	char path[512];
	enum route_tls tls; /* SMTP/LMTP over TCP */
	char tls_ca[256];   /* ca=FILE, or "" */
	/* Canonical text form, for logs and --check-config:
	 * "smtp:127.0.0.1:25", "smtp:[::1]:2525",
	 * "lmtp:unix:/run/dovecot/lmtp", "maildir:./var/maildir",
	 * "smtp:mx.example.org:25,tls=verify,ca=/etc/ca.pem".
	 * It is also the stable key of the next hop, for per-destination
	 * queues: same text => same destination. It parses back to the same
	 * target. */
	char text[600];
};

/*
 * Parse one target (forms above). 0, or -EINVAL with a one-line reason in
 * why (e.g. "bad port in 'smtp:x:0'"); why may be NULL. t is only valid
 * after 0.
 */
int route_parse_target(const char *s, struct route_target *t, char *why,
		       size_t why_len);

/*
 * Parse "DOMAIN=TARGET" (as given to --route). The domain is lower-cased
 * into domain (domain_len bytes, 256 is always enough) and checked as an
 * RFC 5321 domain (section 4.1.2: labels of letters, digits and inner
 * hyphens, no empty label, labels <= 63 bytes, the whole <= 255 bytes).
 * 0, or -EINVAL with a one-line reason in why.
 */
int route_parse_rule(const char *s, char *domain, size_t domain_len,
		     struct route_target *t, char *why, size_t why_len);

struct route_table;

/* NULL on allocation failure. */
struct route_table *route_table_new(void);
void route_table_free(struct route_table *rt);

/*
 * Add the route for one domain (copied, lower-cased; must be a valid domain
 * as for route_parse_rule). t is copied. 0, -EEXIST for a domain that
 * already has a route (whatever its case), -EINVAL for a bad domain,
 * -ENOMEM.
 */
int route_table_add(struct route_table *rt, const char *domain,
		    const struct route_target *t);

/* The --relay target, for every domain without its own route; copied.
 * NULL clears it. */
void route_table_set_default(struct route_table *rt,
			     const struct route_target *t);

/*
 * The route for a recipient domain: case-insensitive exact match (no
 * wildcard, no parent-domain match; one trailing dot is ignored, as the
 * SMTP engine ignores it when it accepts the domain), else
 * the default, else NULL. The pointer is the table's own copy: valid until
 * the table is freed (the default's until the next set_default).
 */
const struct route_target *route_lookup(const struct route_table *rt,
					const char *domain);

/*
 * Domain part of an address without <> ("u@Example.ORG" -> "Example.ORG"):
 * what follows the last '@' (a quoted local part may hold '@'). "" if there
 * is no '@'. Pointer into addr (or to a static "" when addr is NULL).
 */
const char *route_addr_domain(const char *addr);

/*
 * Whether two domains name the same one: ASCII case ignored, and one
 * trailing dot on either ("Example.COM." is example.com), as the SMTP
 * engine and route_lookup() take them. A lone "." is not "".
 */
bool route_same_domain(const char *a, const char *b);

#endif
