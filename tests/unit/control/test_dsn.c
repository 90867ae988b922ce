/*
 * The DSN report generator (control/dsn.h): the report is checked as MIME
 * by a small parser here (boundaries, three parts, their types, the RFC
 * 3464 fields, CRLF everywhere, no line over 998 octets) and, when the
 * machine has python3, once more by Python's email package.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "dsn.h"

TestSuite(dsn);

#define NOW 1700000000000000ull /* Tue, 14 Nov 2023 22:13:20 +0000 */
#define MSGID 0x0123456789abcdefull

static const char received[] =
        "Received: from client.example.net ([192.0.2.1])\r\n"
        "\tby mx.example.com (finaldot) with ESMTP id 0123456789ABCDEF\r\n"
        "\tfor <bob@example.com>; Tue, 14 Nov 2023 22:10:00 +0000\r\n";
static const char message[] = "From: Alice <alice@example.net>\r\n"
                              "To: Bob <bob@example.com>\r\n"
                              "Subject: lunch\r\n"
                              "Message-ID: <m1@example.net>\r\n"
                              "\r\n"
                              "BODY-MARKER shall we?\r\n"
                              "-- \r\nAlice\r\n";

/* ---- the original message, read through dsn_read_fn ---- */

struct src {
	const char *p;
	size_t n;
	long fail; /* < 0: every read fails with it */
	unsigned reads;
};

static long
src_read(void *ctx, uint64_t off, void *buf, size_t n)
{
	struct src *s = ctx;

	s->reads++;
	if (s->fail < 0)
		return s->fail;
	if (off >= s->n)
		return 0;
	if (n > s->n - off)
		n = s->n - off;
	/* Short reads on purpose: the generator must loop. */
	if (n > 100)
		n = 100;
	memcpy(buf, s->p + off, n);
	return (long)n;
}

static char *
orig(const char *msg)
{
	size_t a = strlen(received), b = strlen(msg);
	char *p = malloc(a + b + 1);

	cr_assert_not_null(p);
	memcpy(p, received, a);
	memcpy(p + a, msg, b + 1);
	return p;
}

static struct dsn_params
params(void)
{
	struct dsn_params p = {
	        .reporting_mta = "mx.example.com",
	        .orig_sender = "alice@example.net",
	        .ret = FD_RET_NONE,
	        .arrival_us = NOW - 200000000ull,
	        .now_us = NOW,
	        .msgid = MSGID,
	};
	return p;
}

static struct dsn_rcpt
failed_rcpt(void)
{
	struct dsn_rcpt r = {
	        .addr = "bob@example.com",
	        .action = DSN_ACTION_FAILED,
	        .status = "5.1.1",
	        .remote_mta = "127.0.0.1",
	        .diag = "550 5.1.1 <bob@example.com>: Recipient address "
	                "rejected: User unknown",
	        .last_attempt_us = NOW - 1000000ull,
	};
	return r;
}

/* The report as a NUL-terminated string (it never holds a NUL itself). */
static char *
build(const struct dsn_params *p, const struct dsn_rcpt *r, size_t n,
      const char *msg)
{
	struct src s = {.p = msg, .n = strlen(msg)};
	struct dsn_buf out = {0};
	char *str;

	cr_assert_eq(dsn_build(p, r, n, src_read, &s, s.n, &out), 0);
	cr_assert_gt(out.len, 0);
	cr_assert_null(memchr(out.p, 0, out.len));
	str = malloc(out.len + 1);
	cr_assert_not_null(str);
	memcpy(str, out.p, out.len);
	str[out.len] = '\0';
	dsn_buf_free(&out);
	return str;
}

/* CRLF only, no line over 998 octets (RFC 5322 2.1.1). */
static void
check_lines(const char *s)
{
	size_t line = 0, n = strlen(s);

	for (size_t i = 0; i < n; i++) {
		if (s[i] == '\r') {
			cr_assert_eq(s[i + 1], '\n', "bare CR at %zu", i);
			i++;
			line = 0;
			continue;
		}
		cr_assert_neq(s[i], '\n', "bare LF at %zu", i);
		cr_assert_leq(++line, 998, "line over 998 at %zu", i);
	}
	cr_assert(n >= 2 && s[n - 2] == '\r' && s[n - 1] == '\n');
}

/* ---- a small MIME reader ---- */

struct part {
	char *hdr;  /* header section, unfolded, NUL-terminated */
	char *body; /* NUL-terminated */
};

struct report {
	char *hdr;
	char boundary[128];
	struct part parts[3];
	unsigned n_parts;
};

/* The header section [p, end) unfolded: CRLF + WSP becomes the WSP. */
static char *
unfold(const char *p, size_t n)
{
	char *d = malloc(n + 1);
	size_t k = 0;

	cr_assert_not_null(d);
	for (size_t i = 0; i < n; i++) {
		if (p[i] == '\r' && i + 2 < n && p[i + 1] == '\n' &&
		    (p[i + 2] == ' ' || p[i + 2] == '\t')) {
			i++;
			continue;
		}
		d[k++] = p[i];
	}
	d[k] = '\0';
	return d;
}

/* Value of "Name: value" (first occurrence, at a line start), or NULL. */
static char *
field(const char *hdr, const char *name)
{
	static char v[8192];
	size_t nl = strlen(name);
	const char *p = hdr;

	while (p && *p) {
		if (strncasecmp(p, name, nl) == 0 && p[nl] == ':') {
			const char *e = strstr(p, "\r\n");
			size_t k;
			p += nl + 1;
			while (*p == ' ')
				p++;
			k = e ? (size_t)(e - p) : strlen(p);
			cr_assert_lt(k, sizeof(v));
			memcpy(v, p, k);
			v[k] = '\0';
			return v;
		}
		p = strstr(p, "\r\n");
		if (p)
			p += 2;
	}
	return NULL;
}

static unsigned
count_lines_starting(const char *s, const char *prefix)
{
	unsigned n = 0;
	size_t l = strlen(prefix);

	if (strncmp(s, prefix, l) == 0)
		n++;
	for (const char *p = strstr(s, "\r\n"); p; p = strstr(p + 2, "\r\n"))
		if (strncmp(p + 2, prefix, l) == 0)
			n++;
	return n;
}

static void
parse(const char *s, struct report *r)
{
	const char *he = strstr(s, "\r\n\r\n"), *b, *ct, *p;
	char delim[140], end[140];

	memset(r, 0, sizeof(*r));
	cr_assert_not_null(he, "no header/body separator");
	r->hdr = unfold(s, (size_t)(he - s) + 2);
	ct = field(r->hdr, "Content-Type");
	cr_assert_not_null(ct);
	cr_assert(strncmp(ct, "multipart/report;", 17) == 0, "%s", ct);
	cr_assert_not_null(strstr(ct, "report-type=delivery-status"));
	b = strstr(ct, "boundary=\"");
	cr_assert_not_null(b);
	b += 10;
	p = strchr(b, '"');
	cr_assert_not_null(p);
	cr_assert_lt((size_t)(p - b), sizeof(r->boundary));
	cr_assert_leq((size_t)(p - b), 70, "RFC 2046: at most 70");
	memcpy(r->boundary, b, (size_t)(p - b));
	snprintf(delim, sizeof(delim), "\r\n--%s\r\n", r->boundary);
	snprintf(end, sizeof(end), "\r\n--%s--\r\n", r->boundary);
	/* The body: preamble, then exactly three parts, then the end. */
	p = strstr(he + 2, delim);
	cr_assert_not_null(p, "first delimiter");
	for (;;) {
		const char *start = p + strlen(delim), *next, *ph;
		struct part *pt;
		bool last = false;
		next = strstr(start, delim);
		if (!next) {
			next = strstr(start, end);
			cr_assert_not_null(next, "close delimiter");
			cr_assert_str_eq(next + strlen(end), "",
			                 "nothing after the close delimiter");
			last = true;
		}
		cr_assert_lt(r->n_parts, 3, "more than three parts");
		pt = &r->parts[r->n_parts++];
		ph = strstr(start, "\r\n\r\n");
		cr_assert(ph && ph < next + 2, "part header");
		pt->hdr = unfold(start, (size_t)(ph - start) + 2);
		pt->body = strndup(
		        ph + 4, next > ph + 4 ? (size_t)(next - (ph + 4)) : 0);
		if (last)
			break;
		p = next;
	}
	cr_assert_eq(r->n_parts, 3);
	/* The delimiter occurs nowhere else. */
	snprintf(delim, sizeof(delim), "--%s", r->boundary);
	cr_assert_eq(count_lines_starting(s, delim), 4);
}

static void
report_free(struct report *r)
{
	free(r->hdr);
	for (unsigned i = 0; i < r->n_parts; i++) {
		free(r->parts[i].hdr);
		free(r->parts[i].body);
	}
}

/* The delivery-status body's blocks (blank-line separated), unfolded. */
static unsigned
status_blocks(const char *body, char **blocks, unsigned max)
{
	unsigned n = 0;
	const char *p = body;

	while (*p && n < max) {
		const char *e = strstr(p, "\r\n\r\n");
		size_t k = e ? (size_t)(e - p) + 2 : strlen(p);
		blocks[n++] = unfold(p, k);
		if (!e)
			break;
		p = e + 4;
	}
	return n;
}

static void
free_blocks(char **b, unsigned n)
{
	for (unsigned i = 0; i < n; i++)
		free(b[i]);
}

/* ---- tests ---- */

Test(dsn, failed_report_is_well_formed_mime)
{
	struct dsn_params p = params();
	struct dsn_rcpt r = failed_rcpt();
	char *msg = orig(message), *out, *blk[8];
	struct report rep;
	unsigned nb;

	out = build(&p, &r, 1, msg);
	check_lines(out);
	parse(out, &rep);
	cr_assert_str_eq(
	        field(rep.hdr, "From"),
	        "\"Mail Delivery System\" <MAILER-DAEMON@mx.example.com>");
	cr_assert_str_eq(field(rep.hdr, "To"), "<alice@example.net>");
	cr_assert_str_eq(field(rep.hdr, "Subject"),
	                 "Undelivered Mail Returned to Sender");
	cr_assert_str_eq(field(rep.hdr, "Date"),
	                 "Tue, 14 Nov 2023 22:13:20 +0000");
	cr_assert_str_eq(field(rep.hdr, "Message-ID"),
	                 "<0123456789abcdef.60a24181e4000.dsn@mx.example.com>");
	cr_assert_str_eq(field(rep.hdr, "Auto-Submitted"), "auto-replied");
	cr_assert_str_eq(field(rep.hdr, "MIME-Version"), "1.0");
	cr_assert_null(field(rep.hdr, "Content-Transfer-Encoding"), "7bit");
	cr_assert_str_eq(rep.boundary, "fd-dsn.0123456789abcdef.60a24181e4000");

	/* 1: prose naming the recipient and the remote reply. */
	cr_assert_str_eq(field(rep.parts[0].hdr, "Content-Type"),
	                 "text/plain; charset=us-ascii");
	cr_assert_not_null(strstr(rep.parts[0].body, "<bob@example.com>: "
	                                             "delivery failed"));
	cr_assert_not_null(strstr(rep.parts[0].body, "127.0.0.1 said: 550 "));

	/* 2: RFC 3464 fields. */
	cr_assert_str_eq(field(rep.parts[1].hdr, "Content-Type"),
	                 "message/delivery-status");
	nb = status_blocks(rep.parts[1].body, blk, 8);
	cr_assert_eq(nb, 2, "per-message and one per-recipient block");
	cr_assert_str_eq(field(blk[0], "Reporting-MTA"), "dns; mx.example.com");
	cr_assert_str_eq(field(blk[0], "Arrival-Date"),
	                 "Tue, 14 Nov 2023 22:10:00 +0000");
	cr_assert_null(field(blk[0], "Original-Envelope-Id"));
	cr_assert_str_eq(field(blk[1], "Final-Recipient"),
	                 "rfc822; bob@example.com");
	cr_assert_null(field(blk[1], "Original-Recipient"));
	cr_assert_str_eq(field(blk[1], "Action"), "failed");
	cr_assert_str_eq(field(blk[1], "Status"), "5.1.1");
	cr_assert_str_eq(field(blk[1], "Remote-MTA"), "dns; 127.0.0.1");
	cr_assert_str_eq(field(blk[1], "Diagnostic-Code"),
	                 "smtp; 550 5.1.1 <bob@example.com>: Recipient address "
	                 "rejected: User unknown");
	cr_assert_str_eq(field(blk[1], "Last-Attempt-Date"),
	                 "Tue, 14 Nov 2023 22:13:19 +0000");
	cr_assert_null(field(blk[1], "Will-Retry-Until"));
	free_blocks(blk, nb);

	/* 3: no RET: the header section only (Postfix's default). */
	cr_assert_str_eq(field(rep.parts[2].hdr, "Content-Type"),
	                 "text/rfc822-headers");
	cr_assert(strncmp(rep.parts[2].body, "Received: from client", 21) == 0);
	cr_assert_not_null(strstr(rep.parts[2].body, "Subject: lunch\r\n"));
	cr_assert_null(strstr(rep.parts[2].body, "BODY-MARKER"));
	report_free(&rep);
	free(out);
	free(msg);
}

/* An RFC 6533 utf-8 ORCPT in raw UTF-8 (the unitext form the SMTP engine
 * takes): Original-Recipient in the 7-bit xtext form, its escapes kept
 * (it was left out: xtext decoding refuses 8-bit octets). */
Test(dsn, orcpt_utf8_unitext_is_written_as_xtext)
{
	struct dsn_params p = params();
	struct dsn_rcpt r = failed_rcpt();
	char *msg = orig(message), *out, *blk[4];
	struct report rep;
	unsigned nb;

	r.orcpt = "utf-8;b\xc3\xa9" "b\\x{2B}1@example.com";
	out = build(&p, &r, 1, msg);
	check_lines(out);
	parse(out, &rep);
	nb = status_blocks(rep.parts[1].body, blk, 4);
	cr_assert_eq(nb, 2);
	cr_assert_str_eq(field(blk[1], "Original-Recipient"),
			 "utf-8; b\\x{E9}b\\x{2B}1@example.com");
	free_blocks(blk, nb);
	report_free(&rep);
	free(out);
	free(msg);
}

Test(dsn, orcpt_and_envid_present_are_decoded)
{
	struct dsn_params p = params();
	struct dsn_rcpt r[3] = {failed_rcpt(), failed_rcpt(), failed_rcpt()};
	char *msg = orig(message), *out, *blk[8];
	struct report rep;
	unsigned nb;

	p.envid = "QQ314159+2Bx+3Dy";
	r[0].orcpt = "rfc822;bob+2B1@example.com";
	r[1].addr = "carol@example.com";
	r[1].orcpt = "rfc822;carol+0D+0AInjected: yes";
	r[2].addr = "dave@example.com";
	r[2].orcpt = "";
	out = build(&p, r, 3, msg);
	check_lines(out);
	parse(out, &rep);
	nb = status_blocks(rep.parts[1].body, blk, 8);
	cr_assert_eq(nb, 4);
	cr_assert_str_eq(field(blk[0], "Original-Envelope-Id"), "QQ314159+x=y");
	cr_assert_str_eq(field(blk[1], "Original-Recipient"),
	                 "rfc822; bob+1@example.com");
	/* Decoding to a control octet: the field is left out, never a
	 * header injection. */
	cr_assert_null(field(blk[2], "Original-Recipient"));
	cr_assert_str_eq(field(blk[2], "Final-Recipient"),
	                 "rfc822; carol@example.com");
	cr_assert_null(field(blk[3], "Original-Recipient"));
	cr_assert_null(strstr(out, "\r\nInjected"));
	free_blocks(blk, nb);
	report_free(&rep);
	free(out);
	/* Absent: no field either (covered above for ORCPT), bad ENVID. */
	p.envid = "bad+ZZ";
	out = build(&p, r, 1, msg);
	parse(out, &rep);
	cr_assert_null(strstr(rep.parts[1].body, "Original-Envelope-Id"));
	report_free(&rep);
	free(out);
	free(msg);
}

Test(dsn, ret_hdrs_includes_headers_only)
{
	struct dsn_params p = params();
	struct dsn_rcpt r = failed_rcpt();
	char *msg = orig(message), *out;
	struct report rep;

	p.ret = FD_RET_HDRS;
	out = build(&p, &r, 1, msg);
	parse(out, &rep);
	cr_assert_str_eq(field(rep.parts[2].hdr, "Content-Type"),
	                 "text/rfc822-headers");
	cr_assert_str_eq(field(rep.parts[2].hdr, "Content-Description"),
	                 "Undelivered Message Headers");
	/* Exactly the header section, with its empty line (the CRLF before
	 * the next delimiter belongs to the delimiter, RFC 2046 5.1.1). */
	size_t hl = dsn_header_section((const uint8_t *)msg, strlen(msg));
	cr_assert_eq(strlen(rep.parts[2].body), hl);
	cr_assert(memcmp(rep.parts[2].body, msg, hl) == 0);
	cr_assert_null(strstr(out, "BODY-MARKER"));
	report_free(&rep);
	free(out);
	free(msg);
}

/* A message whose lines end in bare LFs (BDAT takes them): its header
 * section ends at its first empty line like any other; the whole body was
 * returned as "headers" (RET=HDRS, and RET=FULL's not-clean fallback). */
Test(dsn, lf_only_message_returns_its_headers_only)
{
	struct dsn_params p = params();
	struct dsn_rcpt r = failed_rcpt();
	char *msg = orig("Subject: lf\nX-A: 1\n\nBODY-MARKER one\nBODY-MARKER "
			 "two\n"),
	     *out;
	const int rets[] = {FD_RET_HDRS, FD_RET_FULL};

	for (size_t i = 0; i < sizeof(rets) / sizeof(rets[0]); i++) {
		p.ret = rets[i];
		out = build(&p, &r, 1, msg);
		check_lines(out);
		cr_assert_null(strstr(out, "BODY-MARKER"), "ret %d", rets[i]);
		cr_assert_not_null(strstr(out, "\r\nX-A: 1\r\n"), "ret %d",
				   rets[i]);
		free(out);
	}
	free(msg);
}

/* RFC 6533: a message whose headers are raw UTF-8 (SMTPUTF8) is returned
 * as message/global (RET=FULL) or message/global-headers; an 8-bit body
 * under ASCII headers stays message/rfc822. It went out as message/rfc822
 * and text/rfc822-headers, which may not hold raw UTF-8 headers. */
Test(dsn, utf8_headers_go_as_message_global)
{
	struct dsn_params p = params();
	struct dsn_rcpt r = failed_rcpt();
	char *u8 = orig("Subject: gr\xc3\xbc\xc3\x9f" "e\r\n\r\nhi\r\n");
	char *b8 = orig("Subject: plain\r\n\r\ngr\xc3\xbc\xc3\x9f" "e\r\n");
	struct {
		const char *msg;
		int ret;
		const char *type;
	} cases[] = {
		{u8, FD_RET_FULL, "message/global"},
		{u8, FD_RET_HDRS, "message/global-headers"},
		{b8, FD_RET_FULL, "message/rfc822"},
		{b8, FD_RET_HDRS, "text/rfc822-headers"},
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct report rep;
		char *out;

		p.ret = cases[i].ret;
		out = build(&p, &r, 1, cases[i].msg);
		check_lines(out);
		parse(out, &rep);
		cr_assert_str_eq(field(rep.parts[2].hdr, "Content-Type"),
				 cases[i].type, "case %zu", i);
		cr_assert_str_eq(field(rep.parts[1].hdr, "Content-Type"),
				 "message/delivery-status");
		report_free(&rep);
		free(out);
	}
	free(u8);
	free(b8);
}

Test(dsn, ret_full_includes_whole_message)
{
	struct dsn_params p = params();
	struct dsn_rcpt r = failed_rcpt();
	char *msg = orig(message), *out;
	struct report rep;

	p.ret = FD_RET_FULL;
	out = build(&p, &r, 1, msg);
	check_lines(out);
	parse(out, &rep);
	cr_assert_str_eq(field(rep.parts[2].hdr, "Content-Type"),
	                 "message/rfc822");
	cr_assert_str_eq(field(rep.parts[2].hdr, "Content-Description"),
	                 "Undelivered Message");
	cr_assert_str_eq(rep.parts[2].body, msg);
	cr_assert_null(strstr(rep.parts[0].body, "only its headers"));
	report_free(&rep);
	free(out);
	free(msg);
}

Test(dsn, ret_full_over_limit_falls_back_to_headers)
{
	struct dsn_params p = params();
	struct dsn_rcpt r = failed_rcpt();
	char *msg = orig(message), *out;
	struct report rep;

	p.ret = FD_RET_FULL;
	p.full_limit = strlen(msg) - 1;
	out = build(&p, &r, 1, msg);
	check_lines(out);
	parse(out, &rep);
	cr_assert_str_eq(field(rep.parts[2].hdr, "Content-Type"),
	                 "text/rfc822-headers");
	cr_assert_null(strstr(out, "BODY-MARKER"));
	cr_assert_not_null(strstr(rep.parts[0].body, "larger than"));
	cr_assert_not_null(strstr(rep.parts[0].body, "only its headers"));
	report_free(&rep);
	free(out);
	/* At the limit exactly, it is returned. */
	p.full_limit = strlen(msg);
	out = build(&p, &r, 1, msg);
	cr_assert_not_null(strstr(out, "BODY-MARKER"));
	free(out);
	free(msg);
}

Test(dsn, ret_full_not_plain_text_falls_back_to_headers)
{
	static const char *const bodies[] = {
	        "Subject: x\r\n\r\nbare\nLF\r\n",
	        "Subject: x\r\n\r\nbare\rCR\r\n",
	};
	struct dsn_params p = params();
	struct dsn_rcpt r = failed_rcpt();
	struct report rep;

	p.ret = FD_RET_FULL;
	for (size_t i = 0; i < 2; i++) {
		char *msg = orig(bodies[i]), *out = build(&p, &r, 1, msg);
		check_lines(out);
		parse(out, &rep);
		cr_assert_str_eq(field(rep.parts[2].hdr, "Content-Type"),
		                 "text/rfc822-headers", "body %zu", i);
		cr_assert_not_null(strstr(rep.parts[0].body, "bare CR or LF"));
		report_free(&rep);
		free(out);
		free(msg);
	}
	/* A line of 999 octets too. */
	char *big = malloc(2000);
	strcpy(big, "Subject: x\r\n\r\n");
	memset(big + 14, 'y', 999);
	strcpy(big + 14 + 999, "\r\n");
	char *msg = orig(big), *out = build(&p, &r, 1, msg);
	check_lines(out);
	parse(out, &rep);
	cr_assert_str_eq(field(rep.parts[2].hdr, "Content-Type"),
	                 "text/rfc822-headers");
	report_free(&rep);
	free(out);
	free(msg);
	free(big);
}

Test(dsn, multiple_recipients_mixed_actions)
{
	struct dsn_params p = params();
	struct dsn_rcpt r[4] = {failed_rcpt(), failed_rcpt(), failed_rcpt(),
	                        failed_rcpt()};
	char *msg = orig(message), *out, *blk[8];
	struct report rep;
	unsigned nb;

	p.retry_until_us = NOW + 5ull * 86400 * 1000000;
	r[1].addr = "carol@example.com";
	r[1].action = DSN_ACTION_DELAYED;
	r[1].status = "4.4.1";
	r[1].diag = "connect to mx.example.org: Connection refused";
	r[1].remote_mta = NULL;
	r[2].addr = "dave@example.com";
	r[2].action = DSN_ACTION_DELIVERED;
	r[2].status = NULL; /* defaults by action */
	r[2].diag = "250 2.0.0 Ok";
	r[3].addr = "erin@example.com";
	r[3].action = DSN_ACTION_RELAYED;
	r[3].status = "bogus";
	r[3].diag = NULL;
	r[3].last_attempt_us = 0;
	out = build(&p, r, 4, msg);
	check_lines(out);
	parse(out, &rep);
	cr_assert_str_eq(field(rep.hdr, "Subject"),
	                 "Undelivered Mail Returned to Sender");
	nb = status_blocks(rep.parts[1].body, blk, 8);
	cr_assert_eq(nb, 5);
	cr_assert_str_eq(field(blk[1], "Action"), "failed");
	cr_assert_null(field(blk[1], "Will-Retry-Until"));
	cr_assert_str_eq(field(blk[2], "Action"), "delayed");
	cr_assert_str_eq(field(blk[2], "Status"), "4.4.1");
	cr_assert_null(field(blk[2], "Remote-MTA"));
	cr_assert_str_eq(field(blk[2], "Diagnostic-Code"),
	                 "X-finaldot; connect to mx.example.org: Connection "
	                 "refused");
	cr_assert_str_eq(field(blk[2], "Will-Retry-Until"),
	                 "Sun, 19 Nov 2023 22:13:20 +0000");
	cr_assert_str_eq(field(blk[3], "Action"), "delivered");
	cr_assert_str_eq(field(blk[3], "Status"), "2.0.0");
	cr_assert_str_eq(field(blk[4], "Final-Recipient"),
	                 "rfc822; erin@example.com");
	cr_assert_str_eq(field(blk[4], "Action"), "relayed");
	cr_assert_str_eq(field(blk[4], "Status"), "2.0.0");
	cr_assert_null(field(blk[4], "Diagnostic-Code"));
	cr_assert_null(field(blk[4], "Last-Attempt-Date"));
	free_blocks(blk, nb);
	cr_assert_not_null(strstr(rep.parts[0].body, "<carol@example.com>: "
	                                             "delivery delayed"));
	cr_assert_not_null(strstr(rep.parts[0].body, "<dave@example.com>: "
	                                             "delivered"));
	report_free(&rep);
	free(out);

	/* The subject follows the most severe action. */
	out = build(&p, r + 1, 3, msg);
	parse(out, &rep);
	cr_assert_str_eq(field(rep.hdr, "Subject"),
	                 "Delayed Mail (still being retried)");
	cr_assert_not_null(strstr(rep.parts[0].body, "retried until Sun, 19 "
	                                             "Nov 2023"));
	report_free(&rep);
	free(out);
	out = build(&p, r + 2, 2, msg);
	parse(out, &rep);
	cr_assert_str_eq(field(rep.hdr, "Subject"),
	                 "Successful Mail Delivery Report");
	cr_assert_str_eq(field(rep.parts[2].hdr, "Content-Description"),
	                 "Delivered Message Headers");
	report_free(&rep);
	free(out);
	free(msg);
}

Test(dsn, message_without_header_body_separator)
{
	struct dsn_params p = params();
	struct dsn_rcpt r = failed_rcpt();
	char *msg = orig("Subject: no body\r\nX-Last: 1"), *out;
	struct report rep;

	cr_assert_eq(dsn_header_section((const uint8_t *)msg, strlen(msg)),
	             strlen(msg));
	out = build(&p, &r, 1, msg);
	check_lines(out);
	parse(out, &rep);
	/* All of it, its last line ended with CRLF. */
	cr_assert_not_null(strstr(rep.parts[2].body, "X-Last: 1\r\n"));
	cr_assert(strncmp(rep.parts[2].body, received, strlen(received)) == 0);
	report_free(&rep);
	free(out);
	free(msg);
}

Test(dsn, header_section_bounds)
{
	const uint8_t *a = (const uint8_t *)"A: 1\r\nB: 2\r\n\r\nbody\r\n\r\nx";
	cr_assert_eq(dsn_header_section(a, strlen((const char *)a)), 14);
	cr_assert_eq(dsn_header_section((const uint8_t *)"\r\nbody", 6), 2);
	cr_assert_eq(dsn_header_section((const uint8_t *)"A: 1\r\n\r", 7), 7);
	cr_assert_eq(dsn_header_section((const uint8_t *)"", 0), 0);
	/* A bare LF or CR ends a line too, as put_headers() has it. */
	cr_assert_eq(dsn_header_section((const uint8_t *)"A: 1\nB: 2\n\nbody", 15),
		     11);
	cr_assert_eq(dsn_header_section((const uint8_t *)"A: 1\r\rbody", 10), 6);
	cr_assert_eq(dsn_header_section((const uint8_t *)"A: 1\n\r\nbody", 11), 7);
	cr_assert_eq(dsn_header_section((const uint8_t *)"\nbody", 5), 1);
	/* Capped. */
	size_t n = DSN_HEADERS_MAX + 100;
	uint8_t *big = malloc(n);
	memset(big, 'h', n);
	memcpy(big + n - 4, "\r\n\r\n", 4);
	cr_assert_eq(dsn_header_section(big, n), DSN_HEADERS_MAX);
	free(big);
}

Test(dsn, boundary_in_content_picks_another)
{
	struct dsn_params p = params();
	struct dsn_rcpt r = failed_rcpt();
	char first[80], body[512], *msg, *out;
	struct report rep;

	p.ret = FD_RET_FULL;
	snprintf(first, sizeof(first), "fd-dsn.%016" PRIx64 ".%" PRIx64,
	         p.msgid, p.now_us);
	snprintf(body, sizeof(body),
	         "Subject: x\r\n\r\n--%s\r\nContent-Type: text/plain\r\n\r\n"
	         "evil\r\n--%s.1--\r\n",
	         first, first);
	msg = orig(body);
	out = build(&p, &r, 1, msg);
	check_lines(out);
	parse(out, &rep);
	cr_assert_str_neq(rep.boundary, first);
	cr_assert(strncmp(rep.boundary, first, strlen(first)) == 0);
	cr_assert_str_eq(rep.boundary + strlen(first), ".2",
	                 "the first and second candidates are both taken");
	cr_assert_str_eq(field(rep.parts[2].hdr, "Content-Type"),
	                 "message/rfc822");
	cr_assert_not_null(strstr(rep.parts[2].body, "evil"));
	report_free(&rep);
	free(out);
	free(msg);
	/* Unused candidates: the first one. */
	msg = orig(message);
	out = build(&p, &r, 1, msg);
	parse(out, &rep);
	cr_assert_str_eq(rep.boundary, first);
	report_free(&rep);
	free(out);
	free(msg);
}

Test(dsn, long_diagnostic_is_folded)
{
	struct dsn_params p = params();
	struct dsn_rcpt r = failed_rcpt();
	char *diag = malloc(6000), *msg = orig(message), *out, *blk[4];
	struct report rep;
	unsigned nb;
	size_t k = 0;

	k += (size_t)sprintf(diag, "550 5.7.1 ");
	for (int i = 0; i < 400; i++)
		k += (size_t)sprintf(diag + k, "word%03d ", i);
	memset(diag + k, 'Z', 1500); /* a 1500-octet token */
	k += 1500;
	strcpy(diag + k, " tail-end");
	r.diag = diag;
	out = build(&p, &r, 1, msg);
	check_lines(out);
	parse(out, &rep);
	nb = status_blocks(rep.parts[1].body, blk, 4);
	cr_assert_eq(nb, 2);
	const char *dc = field(blk[1], "Diagnostic-Code");
	cr_assert_not_null(dc);
	cr_assert(strncmp(dc, "smtp; 550 5.7.1 word000 word001 ", 32) == 0);
	cr_assert_not_null(strstr(dc, "word398 word399 ZZZZ"));
	cr_assert_not_null(strstr(dc, "ZZZZ tail-end"));
	free_blocks(blk, nb);
	/* Folded, not just cut: the raw part has many continuation lines. */
	cr_assert_gt(count_lines_starting(out, " word"), 20);
	/* The prose wraps too, at 76 columns where words allow. */
	cr_assert_not_null(strstr(rep.parts[0].body, "\r\n    word"));
	report_free(&rep);
	free(out);
	free(msg);
	free(diag);
}

Test(dsn, long_and_broken_header_lines_are_made_safe)
{
	struct dsn_params p = params();
	struct dsn_rcpt r = failed_rcpt();
	static char hdrs[5000]; /* not malloc: GCC's -Warray-bounds with
				 * the sanitizers takes it for NULL */
	char *msg, *out;
	struct report rep;

	strcpy(hdrs, "X-Long: ");
	memset(hdrs + 8, 'L', 2500);
	strcpy(hdrs + 2508, "\r\nX-Bare: a\nX-Cr: b\rX-Nul: c");
	size_t n = strlen(hdrs);
	hdrs[n] = '\0';
	strcat(hdrs, "\r\n\r\nbody\r\n");
	msg = orig(hdrs);
	/* The NUL: put one into the copy handed to the reader. */
	size_t len = strlen(msg);
	char *nul = strstr(msg, "X-Nul: c");
	nul[7] = '\0';
	struct src s = {.p = msg, .n = len};
	struct dsn_buf b = {0};
	cr_assert_eq(dsn_build(&p, &r, 1, src_read, &s, len, &b), 0);
	out = strndup(b.p, b.len);
	cr_assert_eq(strlen(out), b.len, "no NUL in the report");
	check_lines(out);
	parse(out, &rep);
	cr_assert_not_null(strstr(rep.parts[2].body, "\r\nX-Bare: a\r\nX-Cr: "
	                                             "b\r\nX-Nul: ?\r\n"));
	cr_assert_not_null(strstr(rep.parts[2].body, "LLL\r\n LLL"));
	report_free(&rep);
	free(out);
	dsn_buf_free(&b);
	free(msg);
}

/* Found by the fuzzer: NULs (made '?') past the line limit kept the line
 * growing. */
Test(dsn, nul_run_at_the_line_limit_is_folded)
{
	struct dsn_params p = params();
	struct dsn_rcpt r = failed_rcpt();
	size_t len = 990 + 3000;
	char *m = malloc(len);
	struct src s = {.p = m, .n = len};
	struct dsn_buf b = {0};

	/* 990 octets fill a line exactly (the generator's own limit). */
	memset(m, 'H', 990);
	memset(m + 990, 0, 3000);
	cr_assert_eq(dsn_build(&p, &r, 1, src_read, &s, len, &b), 0);
	char *out = strndup(b.p, b.len);
	cr_assert_eq(strlen(out), b.len);
	check_lines(out);
	cr_assert_not_null(strstr(out, "H\r\n ?"));
	cr_assert_not_null(strstr(out, "?\r\n ?"));
	free(out);
	dsn_buf_free(&b);
	free(m);
}

Test(dsn, non_ascii_and_hostile_strings)
{
	struct dsn_params p = params();
	struct dsn_rcpt r = failed_rcpt();
	char *msg = orig(message), *out, *blk[4];
	struct report rep;
	unsigned nb;

	r.addr = "j\xc3\xb6rg+x@example.com";
	r.remote_mta = "mx\r\nInjected: 1";
	r.diag = "550 5.1.1 \xc3\xa9 bad\r\nInjected: 2";
	out = build(&p, &r, 1, msg);
	check_lines(out);
	parse(out, &rep);
	nb = status_blocks(rep.parts[1].body, blk, 4);
	cr_assert_str_eq(field(blk[1], "Final-Recipient"),
	                 "utf-8; j\\x{F6}rg\\x{2B}x@example.com");
	cr_assert_str_eq(field(blk[1], "Remote-MTA"), "dns; mx??Injected: 1");
	cr_assert_str_eq(field(blk[1], "Diagnostic-Code"),
	                 "smtp; 550 5.1.1 ?? bad??Injected: 2");
	free_blocks(blk, nb);
	cr_assert_null(strstr(out, "\r\nInjected"));
	/* The status part is 7bit; the prose keeps the UTF-8 address. */
	for (const char *q = rep.parts[1].body; *q; q++)
		cr_assert_lt((unsigned char)*q, 0x80);
	cr_assert_str_eq(field(rep.parts[0].hdr, "Content-Type"),
	                 "text/plain; charset=utf-8");
	cr_assert_str_eq(field(rep.parts[0].hdr, "Content-Transfer-Encoding"),
	                 "8bit");
	cr_assert_str_eq(field(rep.hdr, "Content-Transfer-Encoding"), "8bit");
	report_free(&rep);
	free(out);
	free(msg);
}

Test(dsn, errors_and_bad_arguments)
{
	struct dsn_params p = params();
	struct dsn_rcpt r = failed_rcpt();
	struct src s = {.p = message, .n = strlen(message)};
	struct dsn_buf b = {0};

	s.fail = -EIO;
	cr_assert_eq(dsn_build(&p, &r, 1, src_read, &s, s.n, &b), -EIO);
	cr_assert_null(b.p);
	cr_assert_eq(b.len, 0);
	/* The source is shorter than body_len says. */
	s.fail = 0;
	cr_assert_eq(dsn_build(&p, &r, 1, src_read, &s, s.n + 10, &b), -EIO);
	cr_assert_eq(dsn_build(&p, &r, 0, src_read, &s, s.n, &b), -EINVAL);
	p.orig_sender = "";
	cr_assert_eq(dsn_build(&p, &r, 1, src_read, &s, s.n, &b), -EINVAL,
	             "never to the null sender");
	p = params();
	p.reporting_mta = NULL;
	cr_assert_eq(dsn_build(&p, &r, 1, src_read, &s, s.n, &b), -EINVAL);
	/* An empty message is fine; an earlier result is replaced. */
	p = params();
	cr_assert_eq(dsn_build(&p, &r, 1, src_read, &s, s.n, &b), 0);
	cr_assert_eq(dsn_build(&p, &r, 1, NULL, NULL, 0, &b), 0);
	cr_assert_gt(b.len, 0);
	dsn_buf_free(&b);
	cr_assert_null(b.p);
}

Test(dsn, notify_rules)
{
	/* Never to the null sender; NEVER suppresses everything. */
	cr_assert(!dsn_notify_wanted("", FD_NOTIFY_NONE, DSN_ACTION_FAILED,
	                             true));
	cr_assert(!dsn_notify_wanted(NULL, FD_NOTIFY_FAILURE, DSN_ACTION_FAILED,
	                             true));
	cr_assert(!dsn_notify_wanted("a@b", FD_NOTIFY_NEVER, DSN_ACTION_FAILED,
	                             true));
	/* Absent: failures; delays at our option; no success. */
	cr_assert(dsn_notify_wanted("a@b", FD_NOTIFY_NONE, DSN_ACTION_FAILED,
	                            false));
	cr_assert(dsn_notify_wanted("a@b", FD_NOTIFY_NONE, DSN_ACTION_DELAYED,
	                            true));
	cr_assert(!dsn_notify_wanted("a@b", FD_NOTIFY_NONE, DSN_ACTION_DELAYED,
	                             false));
	cr_assert(!dsn_notify_wanted("a@b", FD_NOTIFY_NONE,
	                             DSN_ACTION_DELIVERED, true));
	/* Given: exactly what it asks. */
	cr_assert(!dsn_notify_wanted("a@b", FD_NOTIFY_SUCCESS,
	                             DSN_ACTION_FAILED, true));
	cr_assert(!dsn_notify_wanted("a@b", FD_NOTIFY_FAILURE,
	                             DSN_ACTION_DELAYED, true));
	cr_assert(dsn_notify_wanted("a@b", FD_NOTIFY_DELAY | FD_NOTIFY_FAILURE,
	                            DSN_ACTION_DELAYED, false));
	cr_assert(dsn_notify_wanted("a@b", FD_NOTIFY_SUCCESS,
	                            DSN_ACTION_RELAYED, false));
	cr_assert(dsn_notify_wanted("a@b", FD_NOTIFY_SUCCESS,
	                            DSN_ACTION_EXPANDED, false));
	cr_assert_str_eq(dsn_action_name(DSN_ACTION_EXPANDED), "expanded");
}

/* Python's email package reads the report as we mean it. */
Test(dsn, python_email_parser_agrees)
{
	static const char script[] =
	        "import sys, email, email.policy\n"
	        "m = email.message_from_binary_file(open(sys.argv[1], 'rb'),"
	        " policy=email.policy.default)\n"
	        "assert m.get_content_type() == 'multipart/report', "
	        "m.get_content_type()\n"
	        "assert m.get_param('report-type') == 'delivery-status'\n"
	        "p = m.get_payload()\n"
	        "assert len(p) == 3, len(p)\n"
	        "assert p[0].get_content_type() == 'text/plain'\n"
	        "assert 'bob@example.com' in p[0].get_content()\n"
	        "assert p[1].get_content_type() == 'message/delivery-status'\n"
	        "ds = p[1].get_payload()\n"
	        "assert len(ds) == 3, len(ds)\n"
	        "assert ds[0]['Reporting-MTA'] == 'dns; mx.example.com'\n"
	        "assert ds[0]['Original-Envelope-Id'] == 'env+1'\n"
	        "assert ds[1]['Action'] == 'failed' and ds[1]['Status'] == "
	        "'5.1.1'\n"
	        "assert ds[1]['Original-Recipient'] == 'rfc822; "
	        "bob+1@x.example'\n"
	        "assert ds[2]['Action'] == 'delayed'\n"
	        "assert p[2].get_content_type() == 'message/rfc822'\n"
	        "inner = p[2].get_payload()[0]\n"
	        "assert inner['Subject'] == 'lunch', inner['Subject']\n";
	char dir[] = "/tmp/test_dsn.XXXXXX", path[64], spath[64], cmd[256];
	struct dsn_params p = params();
	struct dsn_rcpt r[2] = {failed_rcpt(), failed_rcpt()};
	char *msg = orig(message), *out;
	FILE *f;
	int st;

	if (access("/usr/bin/python3", X_OK) != 0)
		cr_skip("no /usr/bin/python3");
	p.ret = FD_RET_FULL;
	p.envid = "env+2B1";
	r[0].orcpt = "rfc822;bob+2B1@x.example";
	r[1].addr = "carol@example.com";
	r[1].action = DSN_ACTION_DELAYED;
	r[1].status = "4.4.1";
	out = build(&p, r, 2, msg);
	cr_assert_not_null(mkdtemp(dir));
	snprintf(path, sizeof(path), "%s/report.eml", dir);
	snprintf(spath, sizeof(spath), "%s/check.py", dir);
	f = fopen(path, "wb");
	cr_assert_not_null(f);
	fputs(out, f);
	fclose(f);
	f = fopen(spath, "w");
	cr_assert_not_null(f);
	fputs(script, f);
	fclose(f);
	snprintf(cmd, sizeof(cmd), "/usr/bin/python3 %s %s 2>&1", spath, path);
	FILE *pp = popen(cmd, "r");
	cr_assert_not_null(pp);
	char errbuf[2048] = "";
	size_t k = fread(errbuf, 1, sizeof(errbuf) - 1, pp);
	errbuf[k] = '\0';
	st = pclose(pp);
	unlink(path);
	unlink(spath);
	rmdir(dir);
	cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "python: %s", errbuf);
	free(out);
	free(msg);
}
