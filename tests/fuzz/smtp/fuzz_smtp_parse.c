/*
 * Fuzz target: the pure parsers (smtp_parse.h) and the DATA scanner
 * (smtp_data.h). The input is used as a command line, as MAIL/RCPT/BDAT
 * arguments, as a domain pair, and as DATA, whole and split at every
 * 1..7-octet step: the scanner's body must not depend on the split, and
 * parsed slices must lie inside the input.
 */
#include <stdlib.h>
#include <string.h>

#include "smtp/smtp_data.h"
#include "smtp/smtp_parse.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void
inside(const char *p, size_t n, const char *base, size_t size)
{
	if (n && (p < base || p + n > base + size))
		abort();
}

static size_t
scan_all(const uint8_t *p, size_t n, size_t piece, size_t budget,
	 uint8_t *body, bool *end, bool *bare)
{
	struct smtp_data d;
	size_t off = 0, blen = 0;

	smtp_data_init(&d);
	*end = false;
	while (off < n && !*end) {
		size_t lim = piece && off + piece < n ? off + piece : n;
		while (off < lim) {
			struct smtp_data_run run;
			enum smtp_data_result r =
				smtp_data_scan(&d, p + off, lim - off, budget,
					       &run);
			off += run.used;
			if (run.len > budget || blen + run.len > 2 * n + 2)
				abort();
			memcpy(body + blen, run.p, run.len);
			blen += run.len;
			if (r == SMTP_DATA_END) {
				*end = true;
				break;
			}
			if (r == SMTP_DATA_BLOCKED)
				abort(); /* budget > 0: never blocked */
		}
	}
	*bare = d.bare;
	return blen;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const char *s = (const char *)data;
	struct smtp_cmd cmd;
	struct smtp_mail_args m;
	struct smtp_rcpt_args ra;
	struct smtp_line l;
	uint64_t bsize;
	bool last, e1, e2, b1, b2;
	size_t used, n1, n2;
	uint8_t *b1buf, *b2buf;

	if (smtp_parse_command(s, size, &cmd) == SMTP_PARSE_OK) {
		inside(cmd.verb, cmd.verb_len, s, size);
		inside(cmd.arg, cmd.arg_len, s, size);
	}
	if (smtp_parse_mail(s, size, &m) == SMTP_PARSE_OK) {
		inside(m.path.mailbox, m.path.mailbox_len, s, size);
		if (m.path.local_len > m.path.mailbox_len)
			abort();
	}
	if (smtp_parse_rcpt(s, size, &ra) == SMTP_PARSE_OK) {
		inside(ra.path.mailbox, ra.path.mailbox_len, s, size);
		if (ra.path.domain)
			inside(ra.path.domain, ra.path.domain_len, s, size);
		if (ra.path.mailbox_len + 2 > SMTP_PATH_MAX ||
		    ra.path.local_len > SMTP_LOCAL_MAX)
			abort();
	}
	(void)smtp_parse_bdat(s, size, &bsize, &last);
	(void)smtp_domain_equal(s, size / 2, s + size / 2, size - size / 2);
	(void)smtp_utf8_valid(data, size);
	smtp_line_reset(&l);
	for (size_t off = 0; off < size;) {
		enum smtp_parse_result r =
			smtp_line_feed(&l, data + off, size - off, &used);
		off += used;
		if (l.len > SMTP_LINE_MAX - 1)
			abort();
		if (r != SMTP_PARSE_AGAIN) {
			off++;
			smtp_line_reset(&l);
		}
	}

	b1buf = malloc(2 * size + 2);
	b2buf = malloc(2 * size + 2);
	if (!b1buf || !b2buf)
		abort();
	n1 = scan_all(data, size, 0, SIZE_MAX, b1buf, &e1, &b1);
	n2 = scan_all(data, size, 1 + (size % 7), 1 + (size % 3), b2buf, &e2,
		      &b2);
	if (n1 != n2 || memcmp(b1buf, b2buf, n1) || e1 != e2 || b1 != b2)
		abort();
	free(b1buf);
	free(b2buf);
	return 0;
}
