/*
 * SMTP command-line reader and argument parsers (RFC 5321 4.1, 4.1.2;
 * RFC 3461 DSN parameters).
 * Pure functions over byte slices: no session, no allocation, no I/O.
 * Returned pointers point into the caller's buffer (valid as long as it).
 */
#ifndef FINALDOT_SMTP_PARSE_H
#define FINALDOT_SMTP_PARSE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "finaldot/envelope.h"

/* RFC 5321 4.5.3.1.4: a command line is at most 512 octets with its CRLF. */
#define SMTP_LINE_MAX 512
/*
 * Extensions may lengthen MAIL and RCPT lines (RFC 5321 4.5.3.1.4): RFC 3461
 * 4 adds 100 octets to MAIL (ENVID) and 500 to RCPT (NOTIFY, ORCPT),
 * RFC 1870 26 to MAIL (SIZE). Both get this one limit, other verbs keep 512.
 */
#define SMTP_PARAM_LINE_MAX 1024
/* RFC 3461 4.4 and 4.2. */
#define SMTP_ENVID_MAX 100
#define SMTP_ORCPT_MAX 500
/* RFC 5321 4.5.3.1.1-3. */
#define SMTP_LOCAL_MAX 64
#define SMTP_DOMAIN_MAX 255
#define SMTP_PATH_MAX 256

enum smtp_parse_result {
	SMTP_PARSE_OK = 0,
	SMTP_PARSE_AGAIN,             /* line reader: need more bytes */
	SMTP_PARSE_ERR_TOO_LONG,      /* line, path, local part or domain */
	SMTP_PARSE_ERR_SYNTAX,        /* grammar of RFC 5321 4.1.2 violated */
	SMTP_PARSE_ERR_CHAR,          /* control octet (NUL, bare CR, TAB..) */
	SMTP_PARSE_ERR_UTF8,          /* malformed UTF-8 (RFC 3629) */
	SMTP_PARSE_ERR_PARAM_UNKNOWN, /* MAIL/RCPT parameter we do not know */
	SMTP_PARSE_ERR_PARAM_VALUE,   /* known parameter, unsupported value */
};

const char *smtp_parse_result_name(enum smtp_parse_result r);

/*
 * Incremental command-line reader. Lines end at LF; a CR just before the LF
 * is dropped (a bare-LF command line is tolerated: only DATA is strict).
 *
 * smtp_line_feed() scans p[0..n): the octets before an LF are copied into
 * the line and consumed; the LF itself is NOT consumed (*used stops in front
 * of it) so that the caller may decline to execute the line now (output or
 * spool full) and offer the same LF again later. Returns
 *   SMTP_PARSE_AGAIN         no LF yet, *used == n (partial line kept),
 *   SMTP_PARSE_OK            line complete: buf[0..len) without CR LF,
 *   SMTP_PARSE_ERR_TOO_LONG  the line exceeded its limit (its octets were
 *                            discarded up to the LF).
 * After OK or ERR the caller consumes the LF and calls smtp_line_reset(),
 * which sets the limit to SMTP_LINE_MAX; smtp_line_set_max() raises it (up
 * to SMTP_PARAM_LINE_MAX) for a reader that applies per-verb limits itself
 * with smtp_line_limit().
 */
struct smtp_line {
	char buf[SMTP_PARAM_LINE_MAX];
	size_t len;
	size_t max; /* octets with the LF */
	bool overflow;
};

void smtp_line_reset(struct smtp_line *l);
void smtp_line_set_max(struct smtp_line *l, size_t max);
enum smtp_parse_result smtp_line_feed(struct smtp_line *l, const uint8_t *p,
				      size_t n, size_t *used);
/* The complete line's content (CR dropped). Valid after SMTP_PARSE_OK. */
size_t smtp_line_content(const struct smtp_line *l, const char **p);
/* The line as received, with its CR (if any) and LF: what limits count. */
size_t smtp_line_wire_len(const struct smtp_line *l);
/*
 * The longest line allowed for this command line (content, any length):
 * SMTP_PARAM_LINE_MAX for MAIL and RCPT, SMTP_LINE_MAX for anything else.
 */
size_t smtp_line_limit(const char *line, size_t len);

/*
 * Split a complete line into verb and argument: verb = leading letters,
 * then one or more SP, then the argument (trailing SP removed). Control
 * octets anywhere -> SMTP_PARSE_ERR_CHAR; no verb -> SMTP_PARSE_ERR_SYNTAX.
 */
struct smtp_cmd {
	const char *verb;
	size_t verb_len;
	const char *arg;
	size_t arg_len;
};
enum smtp_parse_result smtp_parse_command(const char *line, size_t len,
					  struct smtp_cmd *cmd);

/*
 * A reverse- or forward-path (RFC 5321 4.1.2):
 *   "<>" | "<" [ A-d-l ":" ] Mailbox ">"
 * A source route (A-d-l) is parsed and ignored (RFC 5321 3.3, C): the
 * mailbox is what counts. Non-ASCII octets must be well-formed UTF-8 and
 * set non_ascii; whether they are allowed (SMTPUTF8) is the caller's call.
 */
struct smtp_path {
	const char *mailbox; /* local@domain, as given, after any route */
	size_t mailbox_len;
	size_t local_len;    /* mailbox[0..local_len) is the local part */
	const char *domain;  /* NULL for <> and <postmaster> */
	size_t domain_len;
	bool null;           /* <> */
	bool postmaster;     /* <postmaster>, no domain (RFC 5321 4.5.1) */
	bool quoted;         /* local part is a quoted-string */
	bool route;          /* a source route was given (and ignored) */
	bool non_ascii;
	bool domain_literal; /* [192.0.2.1] / [IPv6:...] / [tag:...] */
	bool local_special;  /* local part contains '@', '%' or '!' */
};

#define SMTP_PATH_ALLOW_NULL 0x1       /* MAIL FROM:<> */
#define SMTP_PATH_ALLOW_POSTMASTER 0x2 /* RCPT TO:<postmaster> */

/*
 * MAIL FROM / RCPT TO argument: "FROM:" / "TO:" (case-insensitive, an SP
 * after the colon tolerated), the path, then SP-separated parameters whose
 * keywords are case-insensitive. n_params counts those parsed; an unknown
 * one makes SMTP_PARSE_ERR_PARAM_UNKNOWN after the path parsed fine.
 * MAIL: SIZE=, BODY=7BIT|8BITMIME (BINARYMIME and others:
 * SMTP_PARSE_ERR_PARAM_VALUE), SMTPUTF8, RET=FULL|HDRS, ENVID=xtext (at most
 * SMTP_ENVID_MAX octets). RCPT: NOTIFY=NEVER or a comma list of SUCCESS,
 * FAILURE, DELAY; ORCPT=addr-type;xtext (at most SMTP_ORCPT_MAX octets,
 * addr-type an atom). A duplicate or a malformed value of a known
 * parameter is SMTP_PARSE_ERR_SYNTAX. Slices point into arg.
 */
struct smtp_mail_args {
	struct smtp_path path;
	bool path_ok; /* the path parsed: an error is in the parameters */
	unsigned n_params;
	bool has_size;
	uint64_t size;
	enum fd_body_type body;
	bool smtputf8;
	enum fd_dsn_ret ret;
	const char *envid; /* NULL: no ENVID */
	size_t envid_len;
};
enum smtp_parse_result smtp_parse_mail(const char *arg, size_t len,
				       struct smtp_mail_args *m);
struct smtp_rcpt_args {
	struct smtp_path path;
	bool path_ok;
	unsigned n_params;
	uint8_t notify;    /* enum fd_dsn_notify bits; 0: no NOTIFY */
	const char *orcpt; /* "addr-type;xtext" as given; NULL: no ORCPT */
	size_t orcpt_len;
};
enum smtp_parse_result smtp_parse_rcpt(const char *arg, size_t len,
				       struct smtp_rcpt_args *r);

/* "size [SP LAST]" (RFC 3030 2). */
enum smtp_parse_result smtp_parse_bdat(const char *arg, size_t len,
				       uint64_t *size, bool *last);

/*
 * Case-insensitive (ASCII) domain comparison; one trailing dot on either
 * side is ignored.
 */
bool smtp_domain_equal(const char *a, size_t alen, const char *b,
		       size_t blen);

/* Well-formed UTF-8 (RFC 3629: no overlong forms, no surrogates). */
bool smtp_utf8_valid(const uint8_t *p, size_t n);

/*
 * RFC 3461 4: xtext = *( xchar / hexchar ); xchar is "!".."~" except "+"
 * and "="; hexchar is "+" and two upper-case hex digits.
 */
bool smtp_xtext_valid(const char *s, size_t n);

#endif
