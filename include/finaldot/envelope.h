/*
 * The SMTP envelope of one message, as the SMTP engine hands it to the spool
 * and as the spool reader gives it back after a scan.
 *
 * This struct crosses the SMTP -> spool boundary (DESIGN.md). It only points:
 * every string is owned by whoever filled it in (the session's arena for the
 * engine, the scan buffer for the reader) and is valid until that owner says
 * otherwise. Strings are NUL-terminated and never NULL.
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
};

#endif
