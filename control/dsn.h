/*
 * Delivery status notifications: the report generator (RFC 3464 report in
 * an RFC 6522 multipart/report, for the RFC 3461 DSN parameters the SMTP
 * engine stored in the envelope). Pure: it reads the original message
 * through the caller's function and returns the report's bytes; sending it
 * is the caller's business.
 *
 * Rules the caller (the control plane) follows; the generator only builds
 * the text and does not check them (dsn_notify_wanted() does):
 *  - Never send a DSN to the null sender (MAIL FROM:<>). That also means
 *    never one about a message that is itself a DSN: reports are sent from
 *    the null sender (RFC 5321 4.5.5), so no report can cause another.
 *  - A recipient with NOTIFY=NEVER gets no report of any kind.
 *  - With NOTIFY given, report only what it asks for (RFC 3461 4.1):
 *    FAILURE -> failed, DELAY -> delayed, SUCCESS -> delivered, relayed
 *    (to a next hop that does not offer DSN) and expanded.
 *  - NOTIFY absent means FAILURE, and DELAY at the MTA's option.
 *  - One report may cover several recipients of one message; their
 *    actions may differ (the subject follows the most severe one).
 *  - Send the report with MAIL FROM:<>, and with BODY=8BITMIME when its
 *    top-level header says "Content-Transfer-Encoding: 8bit" (only then
 *    does it contain octets >= 0x80).
 */
#ifndef FINALDOT_CONTROL_DSN_H
#define FINALDOT_CONTROL_DSN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "finaldot/envelope.h"

/* RET=FULL returns the whole message only up to this size by default. */
#define DSN_FULL_LIMIT_DEFAULT (64u * 1024u)
/* The header section returned (RET=HDRS, no RET, or as a fallback) is cut
 * at this many octets. */
#define DSN_HEADERS_MAX (64u * 1024u)

enum dsn_action {
	DSN_ACTION_FAILED,
	DSN_ACTION_DELAYED,
	DSN_ACTION_DELIVERED,
	DSN_ACTION_RELAYED,
	DSN_ACTION_EXPANDED,
};

/* "failed", "delayed", ... (RFC 3464 2.3.3), "?" for anything else. */
const char *dsn_action_name(enum dsn_action a);

struct dsn_rcpt {
	const char *addr;  /* final recipient (as in our envelope) */
	const char *orcpt; /* ORCPT as received (xtext) or NULL/"" */
	enum dsn_action action;
	const char *status;       /* "5.1.1" etc. (RFC 3463); NULL or
	                           * malformed: 5.0.0 / 4.0.0 / 2.0.0 by action */
	const char *remote_mta;   /* "127.0.0.1" / host name of the next hop
	                           * that answered, or NULL */
	const char *diag;         /* the next hop's reply ("550 5.1.1 <u@x>:
	                           * unknown"), or our reason, or NULL */
	uint64_t last_attempt_us; /* 0 = none */
};

struct dsn_params {
	const char *reporting_mta;   /* our hostname */
	const char *orig_sender;     /* the envelope sender the report goes to
	                              * (non-empty) */
	const char *envid;           /* ENVID xtext or NULL/"" */
	int ret;                     /* enum fd_dsn_ret: FULL returns the whole
	                              * message (up to full_limit); HDRS and
	                              * NONE (Postfix's default) its headers */
	uint64_t arrival_us, now_us; /* CLOCK_REALTIME us; arrival 0: omitted */
	uint64_t msgid;              /* our queue id, printed as %016" PRIx64 */
	size_t full_limit;           /* 0: DSN_FULL_LIMIT_DEFAULT */
	uint64_t retry_until_us;     /* Will-Retry-Until of delayed recipients;
	                              * 0: omitted */
};

/* Growable output buffer (malloc'd; the caller frees with dsn_buf_free). */
struct dsn_buf {
	char *p;
	size_t len, cap;
};
void dsn_buf_free(struct dsn_buf *b);

/*
 * Reads the original message (our Received header first, then the client's
 * message) through read(): read(rctx, off, buf, n) returns the octets read
 * (short only at the end) or -errno; body_len is its length.
 *
 * Builds the complete RFC 5322 message to send to orig_sender, CRLF line
 * ends, no line over 998 octets:
 *   From: "Mail Delivery System" <MAILER-DAEMON@reporting_mta>, To, Subject
 *   (Undelivered Mail Returned to Sender / Delayed Mail (still being
 *   retried) / Successful Mail Delivery Report), Date, Message-ID,
 *   Auto-Submitted: auto-replied (RFC 3834), MIME-Version, Content-Type:
 *   multipart/report; report-type=delivery-status; boundary="...":
 *   1. text/plain: what happened, per recipient, with the diagnostic;
 *   2. message/delivery-status (RFC 3464; 7bit: a non-ASCII address is
 *      written as an RFC 6533 utf-8-addr-xtext);
 *   3. message/rfc822 with the whole message (RET=FULL, at most full_limit
 *      octets, and only if it is plain CRLF text without NUL or lines over
 *      998 octets: otherwise part 1 says why only headers follow), or
 *      text/rfc822-headers with its header section (see
 *      dsn_header_section(); bare CR/LF made CRLF, long lines folded).
 * The boundary is "fd-dsn.<msgid %016 PRIx64>.<now_us % PRIx64>", with
 * ".1", ".2", ... appended until "--" + boundary occurs in no part.
 *
 * out must be zeroed or hold an earlier result; it is replaced. Returns 0,
 * -EINVAL (no reporting_mta, empty orig_sender, no recipient), -ENOMEM, or
 * read()'s error (-EIO if the message is shorter than body_len); on error
 * out is left empty.
 */
typedef long (*dsn_read_fn)(void *ctx, uint64_t off, void *buf, size_t n);
int dsn_build(const struct dsn_params *p, const struct dsn_rcpt *r, size_t n,
              dsn_read_fn read, void *rctx, uint64_t body_len,
              struct dsn_buf *out);

/*
 * The header section of a message: its length up to and including the
 * first empty line, lines ending in CRLF, a bare CR or a bare LF (2 if the
 * message starts with CRLF), or all of it when there is none; capped at
 * DSN_HEADERS_MAX. Exposed for tests/fuzz.
 */
size_t dsn_header_section(const uint8_t *p, size_t n);

/*
 * Whether a report of this action is wanted for a recipient (the rules
 * above): never for the null sender or NOTIFY=NEVER; with NOTIFY given,
 * as it says; without, failures always and delays if delay_default.
 */
bool dsn_notify_wanted(const char *mail_from, unsigned notify,
                       enum dsn_action a, bool delay_default);

#endif
