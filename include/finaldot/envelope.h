/*
 * The SMTP envelope of one message, as the SMTP engine hands it to the spool
 * and as the spool reader gives it back after a scan.
 *
 * This struct crosses the SMTP -> spool boundary. It only points:
 * every string is owned by whoever filled it in (the session's arena for the
 * engine, the scan buffer for the reader) and is valid until that owner says
 * otherwise. Strings are NUL-terminated and never NULL, except envid, which
 * a producer that predates DSN may leave NULL (read it as ""); the arrays
 * notify and orcpts are NULL when no recipient carried that parameter.
 */
#ifndef FINALDOT_ENVELOPE_H
#define FINALDOT_ENVELOPE_H

#include <stdbool.h>
#include <stdint.h>

/* MAIL FROM BODY= parameter (RFC 6152, RFC 3030). */
enum fd_body_type {
	FD_BODY_NONE = 0, /* no BODY= given */
	FD_BODY_7BIT = 1,
	FD_BODY_8BITMIME = 2,
	FD_BODY_BINARYMIME = 3,
};

/* MAIL FROM RET= parameter (RFC 3461 4.3). */
enum fd_dsn_ret { FD_RET_NONE = 0, FD_RET_FULL = 1, FD_RET_HDRS = 2 };

/* RCPT TO NOTIFY= parameter (RFC 3461 4.1): NEVER alone, or a set of the
 * other three bits. */
enum fd_dsn_notify {
	FD_NOTIFY_NONE = 0, /* not given */
	FD_NOTIFY_NEVER = 1,
	FD_NOTIFY_SUCCESS = 2,
	FD_NOTIFY_FAILURE = 4,
	FD_NOTIFY_DELAY = 8,
};

struct fd_envelope {
	const char *mail_from;   /* reverse-path without <>, "" = null sender */
	const char *const *rcpts; /* forward-paths without <> */
	unsigned n_rcpts;
	const char *helo;        /* EHLO/HELO argument as given */
	const char *client_addr; /* "192.0.2.1" or "2001:db8::1" (no port) */
	const char *proto;       /* "SMTP" or "ESMTP" (RFC 3848 keyword) */
	uint64_t arrival_us;     /* CLOCK_REALTIME microseconds at DATA/BDAT */
	uint64_t size_param;     /* MAIL SIZE= value, 0 if absent */
	enum fd_body_type body;
	bool smtputf8; /* MAIL ... SMTPUTF8 given (RFC 6531) */
	/* RFC 3461 */
	const char *envid;         /* ENVID as received (xtext), "" if absent */
	enum fd_dsn_ret ret;
	const uint8_t *notify;     /* n_rcpts entries (fd_dsn_notify bits), or
				    * NULL when no RCPT had NOTIFY */
	const char *const *orcpts; /* n_rcpts entries, ORCPT as received
				    * ("rfc822;u@x", xtext), "" when absent;
				    * or NULL when no RCPT had ORCPT */
};

#endif
