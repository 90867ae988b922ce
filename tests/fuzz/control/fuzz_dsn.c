/*
 * Fuzz target: the DSN report generator (control/dsn.h). Bytes 0-3 pick
 * the parameters (RET, a small RET=FULL limit, the number of recipients
 * and their actions, an ENVID, and how many of the following octets are
 * taken as one recipient's address, ORCPT and diagnostic: hostile strings,
 * CR and LF included); the rest is the original message. Invariants: the
 * build succeeds, and the report has only CRLF line ends, no line over 998
 * octets, no NUL, and ends with its close delimiter.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dsn.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

struct src {
	const uint8_t *p;
	size_t n;
};

static long
src_read(void *ctx, uint64_t off, void *buf, size_t n)
{
	struct src *s = ctx;

	if (off >= s->n)
		return 0;
	if (n > s->n - off)
		n = s->n - off;
	if (n > 777) /* short reads */
		n = 777;
	memcpy(buf, s->p + off, n);
	return (long)n;
}

/* Take up to n octets of the input as a C string (NULs end it early). */
static char *
take(const uint8_t **p, size_t *left, size_t n)
{
	char *s;

	if (n > *left)
		n = *left;
	s = malloc(n + 1);
	if (!s)
		abort();
	memcpy(s, *p, n);
	s[n] = '\0';
	*p += n;
	*left -= n;
	return s;
}

static void
check(const struct dsn_buf *b)
{
	size_t line = 0;
	if (!b->p || b->len < 4)
		abort();
	for (size_t i = 0; i < b->len; i++) {
		char c = b->p[i];
		if (c == '\0')
			abort();
		if (c == '\r') {
			if (i + 1 >= b->len || b->p[i + 1] != '\n')
				abort(); /* bare CR */
			i++;
			line = 0;
			continue;
		}
		if (c == '\n' || ++line > 998)
			abort(); /* bare LF, or a line too long */
	}
	/* "--boundary--" CRLF at the very end. */
	if (memcmp(b->p + b->len - 4, "--\r\n", 4) != 0)
		abort();
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static const char *const statuses[] = {"5.1.1", "4.4.1", "2.0.0",
	                                       "x",     NULL,    "5.999.999"};
	struct dsn_params p = {
	        .reporting_mta = "mx.example.com",
	        .orig_sender = "alice@example.net",
	        .now_us = 1700000000000000ull,
	        .arrival_us = 1699999000000000ull,
	        .msgid = 0x0123456789abcdefull,
	};
	struct dsn_rcpt r[4];
	struct dsn_buf out = {0};
	struct src s;
	const uint8_t *q;
	size_t left, n;
	char *addr, *orcpt, *diag;
	int err;

	if (size < 4)
		return 0;
	p.ret = data[0] % 3;
	p.full_limit = (data[0] & 4) ? 64 : 0;
	n = 1 + (size_t)((data[0] >> 3) & 3);
	p.envid = (data[0] & 32) ? "env+2B+0D+0Aid" : NULL;
	p.retry_until_us = (data[0] & 64) ? 1700400000000000ull : 0;
	q = data + 4;
	left = size - 4;
	addr = take(&q, &left, data[2] % 64);
	orcpt = take(&q, &left, data[3] % 128);
	diag = take(&q, &left, (size_t)data[3] * 12);
	for (size_t i = 0; i < n; i++) {
		unsigned a = (unsigned)(data[1] >> (2 * i)) & 3;
		r[i] = (struct dsn_rcpt){
		        .addr = i == 0 ? addr : "bob@example.com",
		        .orcpt = i == 0 ? orcpt : NULL,
		        .action = a == 3 && (data[0] & 128)
		                          ? DSN_ACTION_EXPANDED
		                          : (enum dsn_action)a,
		        .status = statuses[(data[1] + i) % 6],
		        .remote_mta = (i & 1) ? addr : "192.0.2.7",
		        .diag = diag,
		        .last_attempt_us = i ? 1699999999000000ull : 0,
		};
	}
	s.p = q;
	s.n = left;
	err = dsn_build(&p, r, n, src_read, &s, left, &out);
	if (err != 0)
		abort();
	check(&out);
	dsn_buf_free(&out);
	free(diag);
	free(orcpt);
	free(addr);
	return 0;
}
