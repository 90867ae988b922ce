/*
 * The Received: trace header the acceptor prepends to every message
 * (RFC 5321 4.4, RFC 5322 3.6.7).
 */
#ifndef FINALDOT_SMTP_RECEIVED_H
#define FINALDOT_SMTP_RECEIVED_H

#include <stddef.h>
#include <stdint.h>

/* Upper bound of smtp_received_format()'s output (names are capped). */
#define SMTP_RECEIVED_MAX 1280
#define SMTP_RECEIVED_TLS_MAX 160

struct smtp_received_info {
	const char *helo; /* client-controlled: sanitized, capped at 255 */
	size_t helo_len;
	const char *client_addr; /* "192.0.2.1" or "2001:db8::1" */
	const char *hostname;    /* ours, capped at 255 */
	const char *proto;       /* "SMTP", "ESMTP", "ESMTPS" (RFC 3848),
				  * "UTF8SMTP", "UTF8SMTPS" (RFC 6531) */
	const char *tls; /* "TLSv1.3 with cipher ..." or NULL (no TLS):
			  * printable ASCII, at most SMTP_RECEIVED_TLS_MAX */
	uint64_t msgid;
	const char *rcpt; /* the one recipient, or NULL (several) */
	uint64_t now_us;  /* CLOCK_REALTIME microseconds */
};

/*
 * Writes the header, folded with CRLF TAB, ending in CRLF, into buf (size
 * >= SMTP_RECEIVED_MAX). Returns its length; not NUL-terminated.
 */
size_t smtp_received_format(char *buf, size_t size,
			    const struct smtp_received_info *ri);

/* RFC 5322 3.3 date-time in UTC: "Thu, 01 Jan 1970 00:00:00 +0000". */
size_t smtp_rfc5322_date(char *buf, size_t size, uint64_t now_us);

#endif
