/*
 * The DSN report generator (contract in dsn.h): RFC 3464 delivery status
 * notifications in an RFC 6522 multipart/report, for the RFC 3461
 * parameters (RET, ENVID, ORCPT) the SMTP engine kept in the envelope.
 *
 * How: the three parts are built into their own buffers first, then a
 * boundary is chosen that occurs in none of them, then the message is
 * assembled. Every line is written by one of three writers (a header field
 * folded at spaces, wrapped prose, or the included message copied line by
 * line), each of which ends its lines with CRLF and keeps them at most
 * LINE_HARD octets, so the output never has a bare CR, a bare LF or a line
 * over 998 octets (RFC 5322 2.1.1), whatever the inputs hold.
 *
 * Trust: the recipients' strings, the ORCPT / ENVID values and the message
 * come from the network (through the spool); they are sanitised where they
 * are written: control octets become '?', and in the 7bit delivery-status
 * part so do octets >= 0x80 (except Final-Recipient, see below).
 *
 * Limits: the original message is read at most once, up to full_limit
 * (RET=FULL) or DSN_HEADERS_MAX octets; the report is about that plus
 * a few hundred octets per recipient. Addresses are cut at ADDR_MAX
 * octets, diagnostics at DIAG_MAX.
 *
 * RFC 6533 in part: a returned message or header section whose headers
 * are raw UTF-8 goes as message/global or message/global-headers; the
 * report itself stays a 7-bit message/delivery-status (no
 * message/global-delivery-status): a non-ASCII final recipient is written
 * as "utf-8; " + utf-8-addr-xtext (RFC 6533 3),
 * and a non-ASCII envelope sender appears raw in To: (the report is then
 * 8bit and needs an SMTPUTF8 next hop: deliver.c asks for SMTPUTF8 when
 * the sender is not ASCII, and such a DSN to a next hop without it is
 * refused 5.6.7 and dropped, logged).
 */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "dsn.h"
#include "utf8addr.h"

#define LINE_SOFT 78  /* fold header fields here when a space allows */
#define TEXT_WIDTH 76 /* wrap prose here */
#define LINE_HARD 990 /* never more octets on a line (998 allowed) */
#define HOST_MAX 255
#define ADDR_MAX 1024
#define DIAG_MAX 8192 /* a diagnostic is cut here */

/* ---- output buffers with a sticky error -------------------------------- */

struct wbuf {
	struct dsn_buf b;
	int err;
	bool eight_bit; /* an octet >= 0x80 was written */
	size_t col;     /* octets on the current line */
};

void
dsn_buf_free(struct dsn_buf *b)
{
	if (!b)
		return;
	free(b->p);
	b->p = NULL;
	b->len = b->cap = 0;
}

static void
w_put(struct wbuf *w, const void *p, size_t n)
{
	const char *s = p;

	if (w->err || n == 0)
		return;
	if (n > w->b.cap - w->b.len) {
		size_t cap = w->b.cap ? w->b.cap : 4096;
		char *np;
		while (cap - w->b.len < n) {
			if (cap > SIZE_MAX / 2) {
				w->err = -ENOMEM;
				return;
			}
			cap *= 2;
		}
		np = realloc(w->b.p, cap);
		if (!np) {
			w->err = -ENOMEM;
			return;
		}
		w->b.p = np;
		w->b.cap = cap;
	}
	memcpy(w->b.p + w->b.len, p, n);
	w->b.len += n;
	for (size_t i = 0; i < n; i++) {
		if ((unsigned char)s[i] >= 0x80)
			w->eight_bit = true;
		w->col = s[i] == '\n' ? 0 : w->col + 1;
	}
}

static void
w_puts(struct wbuf *w, const char *s)
{
	w_put(w, s, strlen(s));
}

static void
w_crlf(struct wbuf *w)
{
	w_put(w, "\r\n", 2);
}

/* Only for our own short, clean texts (no CR/LF from inputs). */
__attribute__((format(printf, 2, 3))) static void
w_printf(struct wbuf *w, const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	int r;

	va_start(ap, fmt);
	r = vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	if (r < 0) {
		if (!w->err)
			w->err = -EINVAL;
		return;
	}
	w_put(w, buf, (size_t)r < sizeof(buf) ? (size_t)r : sizeof(buf) - 1);
}

/* ---- sanitising -------------------------------------------------------- */

/*
 * Copy s (at most max octets) into d (dsz > max) as one line's worth of
 * text: control octets become '?', TAB a space; octets >= 0x80 are kept
 * or, with ascii, become '?'. Returns the length.
 */
static size_t
clean(char *d, size_t dsz, const char *s, size_t max, bool ascii)
{
	size_t n = 0;

	if (!s || dsz == 0)
		return 0;
	for (; s[n] && n < max && n + 1 < dsz; n++) {
		unsigned char c = (unsigned char)s[n];
		if (c == '\t')
			c = ' ';
		else if (c < 0x20 || c == 0x7f || (ascii && c >= 0x80))
			c = '?';
		d[n] = (char)c;
	}
	d[n] = '\0';
	return n;
}

static bool
printable_ascii(const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if ((unsigned char)s[i] < 0x20 || (unsigned char)s[i] > 0x7e)
			return false;
	return true;
}

static bool
ascii_only(const uint8_t *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (p[i] >= 0x80)
			return false;
	return true;
}

static int
hexval(unsigned char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return -1;
}

/*
 * RFC 3461 4: "+XX" is the octet 0xXX. The value must decode to printable
 * US-ASCII (RFC 3461 4.2, 4.4; it is printed in a 7bit part): false
 * otherwise, and the caller leaves the field out.
 */
static bool
xtext_decode(const char *s, char *d, size_t dsz, size_t *len)
{
	size_t n = 0;

	for (size_t i = 0; s[i]; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c == '+') {
			int hi = hexval((unsigned char)s[i + 1]), lo;
			if (hi < 0)
				return false;
			lo = hexval((unsigned char)s[i + 2]);
			if (lo < 0)
				return false;
			c = (unsigned char)(hi << 4 | lo);
			i += 2;
		}
		if (c < 0x20 || c > 0x7e || n + 1 >= dsz)
			return false;
		d[n++] = (char)c;
	}
	d[n] = '\0';
	*len = n;
	return true;
}

/* RFC 3463 2: class "." subject "." detail, 1-3 digits each. */
static bool
status_valid(const char *s)
{
	size_t i = 0;

	if (!s || (s[0] != '2' && s[0] != '4' && s[0] != '5') || s[1] != '.')
		return false;
	i = 2;
	for (int part = 0; part < 2; part++) {
		size_t d = 0;
		while (s[i] >= '0' && s[i] <= '9' && d < 4)
			i++, d++;
		if (d == 0 || d > 3)
			return false;
		if (part == 0 && s[i++] != '.')
			return false;
	}
	return s[i] == '\0';
}

static const char *
status_or_default(const struct dsn_rcpt *r)
{
	if (status_valid(r->status))
		return r->status;
	switch (r->action) {
	case DSN_ACTION_FAILED:
		return "5.0.0";
	case DSN_ACTION_DELAYED:
		return "4.0.0";
	case DSN_ACTION_DELIVERED:
	case DSN_ACTION_RELAYED:
	case DSN_ACTION_EXPANDED:
		break;
	}
	return "2.0.0";
}

const char *
dsn_action_name(enum dsn_action a)
{
	switch (a) {
	case DSN_ACTION_FAILED:
		return "failed";
	case DSN_ACTION_DELAYED:
		return "delayed";
	case DSN_ACTION_DELIVERED:
		return "delivered";
	case DSN_ACTION_RELAYED:
		return "relayed";
	case DSN_ACTION_EXPANDED:
		return "expanded";
	}
	return "?";
}

/* RFC 5322 3.3 date-time in UTC. */
static void
fmt_date(char *d, size_t dsz, uint64_t us)
{
	/* Clamp to what gmtime and a 4-digit year can hold. */
	uint64_t secs = us / 1000000u;
	time_t t = (time_t)(secs > 253402300799ull ? 253402300799ull : secs);
	struct tm tm;

	if (!gmtime_r(&t, &tm) ||
	    strftime(d, dsz, "%a, %d %b %Y %H:%M:%S +0000", &tm) == 0)
		snprintf(d, dsz, "Thu, 01 Jan 1970 00:00:00 +0000");
}

/* ---- line writers ------------------------------------------------------ */

/*
 * "name: value" CRLF, value already one line (clean()ed). Folded before a
 * space (RFC 5322 2.2.3) once the line passes LINE_SOFT; a run without
 * spaces longer than a line allows is broken with CRLF SP (which adds a
 * space to the unfolded value: XXX acceptable in a report, and rare).
 */
static void
put_field(struct wbuf *w, const char *name, const char *v)
{
	size_t i = 0, vlen = strlen(v);

	w_puts(w, name);
	w_put(w, ": ", 2);
	while (i < vlen) {
		size_t j = i, k;
		while (j < vlen && v[j] == ' ')
			j++;
		k = j;
		while (k < vlen && v[k] != ' ')
			k++;
		if (k == j)
			break; /* trailing spaces: dropped */
		if (j > i && w->col + (j - i) + (k - j) > LINE_SOFT) {
			/* Fold: CRLF, then one space of the run. */
			w_put(w, "\r\n ", 3);
		} else {
			w_put(w, v + i, j - i);
		}
		while (j < k) {
			size_t room =
			        LINE_HARD > w->col ? LINE_HARD - w->col : 0;
			size_t take = k - j < room ? k - j : room;
			if (take == 0) {
				w_put(w, "\r\n ", 3);
				continue;
			}
			w_put(w, v + j, take);
			j += take;
		}
		i = k;
	}
	w_crlf(w);
}

/*
 * Prose: indent, then words wrapped at TEXT_WIDTH (continuation lines get
 * the same indent); a word too long for any line is cut at LINE_HARD.
 * text is already clean()ed.
 */
static void
put_text(struct wbuf *w, const char *indent, const char *text)
{
	size_t i = 0, len = strlen(text), ind = strlen(indent);
	bool first = true;

	w_puts(w, indent);
	while (i < len) {
		size_t j = i, k;
		while (j < len && text[j] == ' ')
			j++;
		k = j;
		while (k < len && text[k] != ' ')
			k++;
		if (k == j)
			break;
		if (!first) {
			if (w->col > ind && w->col + 1 + (k - j) > TEXT_WIDTH) {
				w_crlf(w);
				w_puts(w, indent);
			} else {
				w_put(w, " ", 1);
			}
		}
		first = false;
		while (j < k) {
			size_t room =
			        LINE_HARD > w->col ? LINE_HARD - w->col : 0;
			size_t take;
			if (room == 0) {
				w_crlf(w);
				w_puts(w, indent);
				room = LINE_HARD - w->col;
			}
			take = k - j < room ? k - j : room;
			w_put(w, text + j, take);
			j += take;
		}
		i = k;
	}
	w_crlf(w);
}

/*
 * A header section as text/rfc822-headers content: CRLF, and a bare CR or
 * LF, end a line (both are made CRLF); NUL becomes '?'; a line longer than
 * LINE_HARD continues on a new line starting with a space (a fold). The
 * result ends with CRLF.
 */
static void
put_headers(struct wbuf *w, const uint8_t *p, size_t n)
{
	size_t i = 0;

	while (i < n) {
		size_t s = i;
		if (w->col >= LINE_HARD) {
			/* Before any octet, '?' included: a full line folds. */
			w_put(w, "\r\n ", 3);
			continue;
		}
		while (i < n && p[i] != '\r' && p[i] != '\n' && p[i] != 0 &&
		       w->col + (i - s) < LINE_HARD)
			i++;
		w_put(w, p + s, i - s);
		if (i >= n)
			break;
		if (p[i] == 0) {
			if (w->col >= LINE_HARD)
				continue; /* fold first */
			w_put(w, "?", 1);
			i++;
		} else if (p[i] == '\r' || p[i] == '\n') {
			i += (p[i] == '\r' && i + 1 < n && p[i + 1] == '\n')
			             ? 2
			             : 1;
			w_crlf(w);
		}
		/* else LINE_HARD reached: folded at the top */
	}
	if (w->col > 0)
		w_crlf(w);
}

/*
 * Fit to be included unchanged as message/rfc822: CRLF lines only, none
 * over 998 octets, no NUL (RFC 5322 2.1.1, 2.3).
 */
static bool
message_is_clean(const uint8_t *p, size_t n)
{
	size_t line = 0;

	for (size_t i = 0; i < n; i++) {
		uint8_t c = p[i];
		if (c == 0)
			return false;
		if (c == '\r') {
			if (i + 1 >= n || p[i + 1] != '\n')
				return false;
			i++;
			line = 0;
			continue;
		}
		if (c == '\n' || ++line > 998)
			return false;
	}
	return true;
}

/* ---- the report -------------------------------------------------------- */

size_t
dsn_header_section(const uint8_t *p, size_t n)
{
	size_t lim = n < DSN_HEADERS_MAX ? n : DSN_HEADERS_MAX;
	bool line_start = true;

	/* Lines end as put_headers() ends them: CRLF, a bare CR or a bare
	 * LF (BDAT stores such bodies as they came). Ending the section only
	 * at CRLF CRLF returned the whole body of an LF-only message as its
	 * "headers" (RET=HDRS, and every headers-only fallback). */
	for (size_t i = 0; i < lim;) {
		if (p[i] == '\r' || p[i] == '\n') {
			size_t e = i + (p[i] == '\r' && i + 1 < lim &&
						p[i + 1] == '\n'
					? 2
					: 1);
			if (line_start)
				return e; /* the empty line ends it */
			line_start = true;
			i = e;
			continue;
		}
		line_start = false;
		i++;
	}
	return lim;
}

bool
dsn_notify_wanted(const char *mail_from, unsigned notify, enum dsn_action a,
                  bool delay_default)
{
	if (!mail_from || !mail_from[0] || (notify & FD_NOTIFY_NEVER))
		return false;
	switch (a) {
	case DSN_ACTION_FAILED:
		return notify == FD_NOTIFY_NONE || (notify & FD_NOTIFY_FAILURE);
	case DSN_ACTION_DELAYED:
		return notify == FD_NOTIFY_NONE
		               ? delay_default
		               : (notify & FD_NOTIFY_DELAY) != 0;
	case DSN_ACTION_DELIVERED:
	case DSN_ACTION_RELAYED:
	case DSN_ACTION_EXPANDED:
		break;
	}
	return (notify & FD_NOTIFY_SUCCESS) != 0;
}

static int
read_all(dsn_read_fn rd, void *ctx, uint8_t *buf, size_t n)
{
	size_t got = 0;

	while (got < n) {
		long r = rd(ctx, got, buf + got, n - got);
		if (r < 0)
			return r < INT_MIN ? -EIO : (int)r;
		if (r == 0 || (unsigned long)r > n - got)
			return -EIO; /* shorter than body_len said */
		got += (size_t)r;
	}
	return 0;
}

/* What part 3 holds. */
enum incl {
	INCL_FULL,
	INCL_HDRS,      /* RET=HDRS or RET absent */
	INCL_TOO_BIG,   /* RET=FULL over full_limit: headers */
	INCL_NOT_CLEAN, /* RET=FULL, but not plain text: headers */
};

struct ctx {
	const struct dsn_params *p;
	const struct dsn_rcpt *r;
	size_t n;
	char host[HOST_MAX + 1];
	enum dsn_action worst;
	size_t full_limit;
};

static void
human_part(struct ctx *c, enum incl inc, struct wbuf *w)
{
	char date[64], buf[ADDR_MAX + 128], a[ADDR_MAX], d[DIAG_MAX];
	const struct dsn_params *p = c->p;

	snprintf(buf, sizeof(buf), "This is the mail system at host %s.",
	         c->host);
	put_text(w, "", buf);
	w_crlf(w);
	switch (c->worst) {
	case DSN_ACTION_FAILED:
		put_text(w, "",
		         "Your message could not be delivered to one "
		         "or more of its recipients. The delivery "
		         "report and the returned message (or its "
		         "headers) are attached.");
		break;
	case DSN_ACTION_DELAYED:
		put_text(w, "",
		         "Your message has not yet been delivered to "
		         "one or more of its recipients. This is only "
		         "a warning: delivery is still being retried "
		         "and you do not need to send it again.");
		if (p->retry_until_us) {
			fmt_date(date, sizeof(date), p->retry_until_us);
			snprintf(buf, sizeof(buf),
			         "Delivery will be retried until %s.", date);
			put_text(w, "", buf);
		}
		break;
	case DSN_ACTION_DELIVERED:
	case DSN_ACTION_RELAYED:
	case DSN_ACTION_EXPANDED:
		put_text(w, "",
		         "Your message was delivered to the "
		         "recipients listed below, as you asked.");
		break;
	}
	w_crlf(w);
	if (p->arrival_us) {
		fmt_date(date, sizeof(date), p->arrival_us);
		snprintf(buf, sizeof(buf),
		         "The message was received on %s with queue id "
		         "%016" PRIx64 ".",
		         date, p->msgid);
		put_text(w, "", buf);
		w_crlf(w);
	}
	for (size_t i = 0; i < c->n; i++) {
		const struct dsn_rcpt *r = &c->r[i];
		const char *what = "";
		clean(a, sizeof(a), r->addr, ADDR_MAX - 1, false);
		switch (r->action) {
		case DSN_ACTION_FAILED:
			what = "delivery failed";
			break;
		case DSN_ACTION_DELAYED:
			what = "delivery delayed, still trying";
			break;
		case DSN_ACTION_DELIVERED:
			what = "delivered";
			break;
		case DSN_ACTION_RELAYED:
			what = "relayed to a server that sends no "
			       "delivery reports";
			break;
		case DSN_ACTION_EXPANDED:
			what = "delivered to a list or alias, which was "
			       "expanded";
			break;
		}
		snprintf(buf, sizeof(buf), "<%s>: %s (status %s)", a, what,
		         status_or_default(r));
		put_text(w, "", buf);
		if (r->diag && r->diag[0]) {
			size_t k;
			char mta[HOST_MAX + 1];
			if (r->remote_mta && r->remote_mta[0]) {
				clean(mta, sizeof(mta), r->remote_mta, HOST_MAX,
				      false);
				k = (size_t)snprintf(d, sizeof(d),
				                     "%s said: ", mta);
			} else {
				k = (size_t)snprintf(d, sizeof(d), "reason: ");
			}
			if (k < sizeof(d))
				clean(d + k, sizeof(d) - k, r->diag,
				      sizeof(d) - k - 1, false);
			put_text(w, "    ", d);
		}
		w_crlf(w);
	}
	switch (inc) {
	case INCL_FULL:
	case INCL_HDRS:
		break;
	case INCL_TOO_BIG:
		snprintf(buf, sizeof(buf),
		         "The message was larger than %zu octets: only its "
		         "headers are returned.",
		         c->full_limit);
		put_text(w, "", buf);
		break;
	case INCL_NOT_CLEAN:
		put_text(w, "",
		         "The message has lines that cannot be "
		         "returned unchanged (over 998 octets, bare "
		         "CR or LF, or NUL): only its headers are "
		         "returned.");
		break;
	}
}

static void
status_part(struct ctx *c, struct wbuf *w)
{
	const struct dsn_params *p = c->p;
	char v[DIAG_MAX + 64], x[DIAG_MAX], date[64];
	size_t k;

	snprintf(v, sizeof(v), "dns; %s", c->host);
	put_field(w, "Reporting-MTA", v);
	snprintf(v, sizeof(v), "%016" PRIx64, p->msgid);
	put_field(w, "X-Finaldot-Queue-ID", v);
	/* RFC 3464 2.2.1: the envelope id decoded from its xtext. */
	if (p->envid && p->envid[0] && xtext_decode(p->envid, x, ADDR_MAX, &k))
		put_field(w, "Original-Envelope-Id", x);
	if (p->arrival_us) {
		fmt_date(date, sizeof(date), p->arrival_us);
		put_field(w, "Arrival-Date", date);
	}
	for (size_t i = 0; i < c->n; i++) {
		const struct dsn_rcpt *r = &c->r[i];
		w_crlf(w); /* blank line: per-recipient fields follow */
		/* RFC 3464 2.3.1: "addr-type; address", xtext decoded. An
		 * RFC 6533 utf-8 ORCPT given in raw UTF-8 (the unitext form,
		 * which the SMTP engine takes) is written in its 7-bit
		 * utf-8-addr-xtext form; it was left out. */
		if (r->orcpt && r->orcpt[0]) {
			const char *semi = strchr(r->orcpt, ';');
			size_t tl = semi ? (size_t)(semi - r->orcpt) : 0;
			bool unitext = tl == 5 &&
				       strncasecmp(r->orcpt, "utf-8", 5) == 0 &&
				       !printable_ascii(semi + 1,
							strlen(semi + 1));
			if (tl > 0 && tl < 64 &&
			    printable_ascii(r->orcpt, tl) &&
			    !memchr(r->orcpt, ' ', tl) &&
			    (unitext ? utf8addr_xtext(x, sizeof(x), semi + 1,
						      ADDR_MAX, true) > 0
				     : xtext_decode(semi + 1, x, ADDR_MAX,
						    &k))) {
				snprintf(v, sizeof(v), "%.*s; %s", (int)tl,
				         r->orcpt, x);
				put_field(w, "Original-Recipient", v);
			}
		}
		k = r->addr ? strnlen(r->addr, ADDR_MAX) : 0;
		if (printable_ascii(r->addr ? r->addr : "", k)) {
			snprintf(v, sizeof(v), "rfc822; %.*s", (int)k,
			         r->addr ? r->addr : "");
		} else {
			utf8addr_xtext(x, sizeof(x), r->addr, ADDR_MAX,
				       false);
			snprintf(v, sizeof(v), "utf-8; %s", x);
		}
		put_field(w, "Final-Recipient", v);
		put_field(w, "Action", dsn_action_name(r->action));
		put_field(w, "Status", status_or_default(r));
		if (r->remote_mta && r->remote_mta[0]) {
			clean(x, sizeof(x), r->remote_mta, HOST_MAX, true);
			snprintf(v, sizeof(v), "dns; %s", x);
			put_field(w, "Remote-MTA", v);
		}
		if (r->diag && r->diag[0]) {
			/* RFC 3464 2.3.6: "smtp" for an SMTP reply. */
			const char *dg = r->diag;
			bool smtp =
			        dg[0] >= '2' && dg[0] <= '5' && dg[1] >= '0' &&
			        dg[1] <= '9' && dg[2] >= '0' && dg[2] <= '9' &&
			        (dg[3] == ' ' || dg[3] == '-' || dg[3] == '\0');
			clean(x, sizeof(x), dg, sizeof(x) - 1, true);
			snprintf(v, sizeof(v), "%s; %s",
			         smtp ? "smtp" : "X-finaldot", x);
			put_field(w, "Diagnostic-Code", v);
		}
		if (r->last_attempt_us) {
			fmt_date(date, sizeof(date), r->last_attempt_us);
			put_field(w, "Last-Attempt-Date", date);
		}
		if (r->action == DSN_ACTION_DELAYED && p->retry_until_us) {
			fmt_date(date, sizeof(date), p->retry_until_us);
			put_field(w, "Will-Retry-Until", date);
		}
	}
}

static bool
occurs(const struct wbuf *w, const char *s, size_t n)
{
	return w->b.len >= n && memmem(w->b.p, w->b.len, s, n) != NULL;
}

static void
put_part(struct wbuf *o, const char *bnd, const char *desc, const char *type,
         const struct wbuf *body)
{
	w_printf(o, "--%s\r\n", bnd);
	w_printf(o, "Content-Description: %s\r\n", desc);
	w_printf(o, "Content-Type: %s\r\n", type);
	if (body->eight_bit)
		w_puts(o, "Content-Transfer-Encoding: 8bit\r\n");
	w_crlf(o);
	w_put(o, body->b.p, body->b.len);
	/* The CRLF before the next delimiter belongs to it (RFC 2046
	 * 5.1.1); a body that does not end in CRLF still ends its line. */
	w_crlf(o);
}

int
dsn_build(const struct dsn_params *p, const struct dsn_rcpt *r, size_t n,
          dsn_read_fn read, void *rctx, uint64_t body_len, struct dsn_buf *out)
{
	struct ctx c = {.p = p, .r = r, .n = n};
	struct wbuf text = {0}, status = {0}, incl = {0}, o = {0};
	char bnd[80], delim[84], buf[ADDR_MAX + 64], date[64], a[ADDR_MAX];
	const char *subject, *desc, *type;
	enum incl inc;
	uint8_t *msg = NULL;
	size_t want, hl;
	bool hdr8;
	int err;

	dsn_buf_free(out);
	if (!p || !p->reporting_mta || !p->reporting_mta[0] ||
	    !p->orig_sender || !p->orig_sender[0] || n == 0 || !r ||
	    (body_len && !read))
		return -EINVAL;
	clean(c.host, sizeof(c.host), p->reporting_mta, HOST_MAX, true);
	c.full_limit = p->full_limit ? p->full_limit : DSN_FULL_LIMIT_DEFAULT;
	c.worst = DSN_ACTION_DELIVERED;
	for (size_t i = 0; i < n; i++) {
		if (r[i].action == DSN_ACTION_FAILED)
			c.worst = DSN_ACTION_FAILED;
		else if (r[i].action == DSN_ACTION_DELAYED &&
		         c.worst != DSN_ACTION_FAILED)
			c.worst = DSN_ACTION_DELAYED;
	}

	/* Read the message once: whole for RET=FULL if small enough. */
	if (p->ret == FD_RET_FULL && body_len <= c.full_limit) {
		want = (size_t)body_len;
		inc = INCL_FULL;
	} else {
		want = (size_t)(body_len < DSN_HEADERS_MAX ? body_len
		                                           : DSN_HEADERS_MAX);
		inc = p->ret == FD_RET_FULL ? INCL_TOO_BIG : INCL_HDRS;
	}
	if (want) {
		msg = malloc(want);
		if (!msg)
			return -ENOMEM;
		err = read_all(read, rctx, msg, want);
		if (err)
			goto out_free_msg;
	}
	if (inc == INCL_FULL && !message_is_clean(msg, want))
		inc = INCL_NOT_CLEAN;
	hl = want ? dsn_header_section(msg, want) : 0;
	if (inc == INCL_FULL)
		w_put(&incl, msg, want);
	else
		put_headers(&incl, msg, hl);
	human_part(&c, inc, &text);
	status_part(&c, &status);
	err = text.err ? text.err : status.err ? status.err : incl.err;
	if (err)
		goto out_free_parts;

	/* A boundary that none of the parts contains (RFC 2046 5.1.1). */
	for (unsigned k = 0;; k++) {
		int len;
		if (k == 0)
			len = snprintf(bnd, sizeof(bnd),
			               "fd-dsn.%016" PRIx64 ".%" PRIx64,
			               p->msgid, p->now_us);
		else
			len = snprintf(bnd, sizeof(bnd),
			               "fd-dsn.%016" PRIx64 ".%" PRIx64 ".%u",
			               p->msgid, p->now_us, k);
		snprintf(delim, sizeof(delim), "--%s", bnd);
		if (len < 0 || k == UINT_MAX) {
			err = -EINVAL;
			goto out_free_parts;
		}
		if (!occurs(&text, delim, strlen(delim)) &&
		    !occurs(&status, delim, strlen(delim)) &&
		    !occurs(&incl, delim, strlen(delim)))
			break;
	}

	switch (c.worst) {
	case DSN_ACTION_FAILED:
		subject = "Undelivered Mail Returned to Sender";
		desc = "Undelivered Message";
		break;
	case DSN_ACTION_DELAYED:
		subject = "Delayed Mail (still being retried)";
		desc = "Delayed Message";
		break;
	case DSN_ACTION_DELIVERED:
	case DSN_ACTION_RELAYED:
	case DSN_ACTION_EXPANDED:
	default:
		subject = "Successful Mail Delivery Report";
		desc = "Delivered Message";
		break;
	}
	snprintf(buf, sizeof(buf),
	         "\"Mail Delivery System\" <MAILER-DAEMON@%s>", c.host);
	put_field(&o, "From", buf);
	clean(a, sizeof(a), p->orig_sender, sizeof(a) - 1, false);
	snprintf(buf, sizeof(buf), "<%s>", a);
	put_field(&o, "To", buf);
	put_field(&o, "Subject", subject);
	fmt_date(date, sizeof(date), p->now_us);
	put_field(&o, "Date", date);
	snprintf(buf, sizeof(buf), "<%016" PRIx64 ".%" PRIx64 ".dsn@%s>",
	         p->msgid, p->now_us, c.host);
	put_field(&o, "Message-ID", buf);
	put_field(&o, "Auto-Submitted", "auto-replied");
	put_field(&o, "MIME-Version", "1.0");
	w_puts(&o, "Content-Type: multipart/report; "
	           "report-type=delivery-status;\r\n");
	w_printf(&o, "\tboundary=\"%s\"\r\n", bnd);
	if (text.eight_bit || incl.eight_bit || o.eight_bit)
		w_puts(&o, "Content-Transfer-Encoding: 8bit\r\n");
	w_crlf(&o);
	w_puts(&o, "This is a MIME-encapsulated message.\r\n\r\n");
	put_part(&o, bnd, "Notification",
	         text.eight_bit ? "text/plain; charset=utf-8"
	                        : "text/plain; charset=us-ascii",
	         &text);
	put_part(&o, bnd, "Delivery report", "message/delivery-status",
	         &status);
	/* RFC 6533 6.3, 6.4 (RFC 6532 3.7): a header section in raw UTF-8
	 * (an SMTPUTF8 message) is no message/rfc822 or text/rfc822-headers:
	 * message/global and message/global-headers carry it. An 8-bit body
	 * under ASCII headers stays message/rfc822 (8BITMIME). */
	hdr8 = !ascii_only(msg, hl);
	if (inc == INCL_FULL) {
		type = hdr8 ? "message/global" : "message/rfc822";
	} else {
		type = hdr8 ? "message/global-headers" : "text/rfc822-headers";
		snprintf(buf, sizeof(buf), "%s Headers", desc);
		desc = buf;
	}
	put_part(&o, bnd, desc, type, &incl);
	w_printf(&o, "--%s--\r\n", bnd);
	err = o.err;
	if (err)
		goto out_free_parts;
	*out = o.b;
	o.b = (struct dsn_buf){0};

out_free_parts:
	dsn_buf_free(&o.b);
	dsn_buf_free(&incl.b);
	dsn_buf_free(&status.b);
	dsn_buf_free(&text.b);
out_free_msg:
	free(msg);
	return err;
}
