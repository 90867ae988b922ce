/*
 * Checks of fd-loadgen's message generator (lg_msg.c): exact sizes, line
 * limits, no bare CR or LF, dot-stuffing that unstuffs back to the raw text
 * and never yields an end-of-data line, and unique Message-IDs. Plain C
 * (tools/ does not depend on Criterion); prints TAP (plan at the end) and
 * exits 1 if anything failed.
 */
#include "lg_msg.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures;
static int reported; /* TAP lines printed: the plan comes last */
static bool quiet;

#define CHECK(cond, ...)                                                       \
	do {                                                                   \
		if (!(cond)) {                                                 \
			printf("not ok - %s:%d: ", __FILE__, __LINE__);        \
			reported++;                                            \
			printf(__VA_ARGS__);                                   \
			printf("\n");                                          \
			failures++;                                            \
			return;                                                \
		}                                                              \
	} while (0)

/* Lines of t: CRLF-terminated, no bare CR/LF, at most max octets each. */
static bool
lines_ok(const char *t, size_t len, size_t max, size_t *bad_at)
{
	size_t start = 0;
	for (size_t i = 0; i < len; i++) {
		if (t[i] == '\n' && (i == 0 || t[i - 1] != '\r')) {
			*bad_at = i;
			return false;
		}
		if (t[i] == '\r' && (i + 1 >= len || t[i + 1] != '\n')) {
			*bad_at = i;
			return false;
		}
		if (t[i] == '\n') {
			if (i - 1 - start > max) {
				*bad_at = start;
				return false;
			}
			start = i + 1;
		}
	}
	*bad_at = start;
	return start == len;
}

static size_t
unstuff(char *dst, const char *src, size_t len)
{
	size_t o = 0;
	bool bol = true;
	for (size_t i = 0; i < len; i++) {
		if (bol && src[i] == '.') {
			bol = false;
			continue;
		}
		dst[o++] = src[i];
		bol = src[i] == '\n';
	}
	return o;
}

static void
check_size(size_t size)
{
	struct lg_msg m;
	CHECK(lg_msg_build(&m, size, "loadgen@localhost", "user@localhost",
	                   "loadgen.invalid", "Thu, 01 Jan 2026 00:00:00 +0000",
	                   0x1234) == 0,
	      "build %zu", size);
	size_t total = m.head_len + m.body_raw_len;
	if (size >= m.head_len + 2)
		CHECK(total == size, "size %zu gave %zu", size, total);
	else
		CHECK(total <= m.head_len + 2, "size %zu gave %zu", size,
		      total);

	char *msg = malloc(total + 1);
	memcpy(msg, m.head, m.head_len);
	memcpy(msg + m.head_len, m.body_raw, m.body_raw_len);
	size_t at;
	CHECK(lines_ok(msg, total, 998, &at), "size %zu: bad line at %zu", size,
	      at);
	CHECK(lines_ok(m.body_stuffed, m.body_stuffed_len, 998, &at),
	      "size %zu: stuffed line too long or bad at %zu", size, at);

	/* no stuffed line is a lone "." (that would end the data early) */
	for (size_t i = 0; i + 2 < m.body_stuffed_len; i++) {
		bool bol = i == 0 || m.body_stuffed[i - 1] == '\n';
		CHECK(!(bol && m.body_stuffed[i] == '.' &&
		        m.body_stuffed[i + 1] == '\r'),
		      "size %zu: lone dot at %zu", size, i);
	}
	char *back = malloc(m.body_stuffed_len + 1);
	size_t blen = unstuff(back, m.body_stuffed, m.body_stuffed_len);
	CHECK(blen == m.body_raw_len && memcmp(back, m.body_raw, blen) == 0,
	      "size %zu: unstuff(stuff(x)) != x", size);
	free(back);

	/* large bodies must contain dot lines, or the test proves nothing */
	if (size > 20000)
		CHECK(m.body_stuffed_len > m.body_raw_len,
		      "size %zu: no line starts with a dot", size);

	/* unique ids, and only the id digits differ */
	char *h1 = malloc(m.head_len), *h2 = malloc(m.head_len);
	memcpy(h1, m.head, m.head_len);
	memcpy(h2, m.head, m.head_len);
	lg_msg_set_id(&m, h1, 1);
	lg_msg_set_id(&m, h2, 0xfedcba9876543210ull);
	CHECK(memcmp(h1, h2, m.head_len) != 0, "ids equal");
	CHECK(memcmp(h1, h2, m.id_off) == 0, "head before id differs");
	CHECK(memcmp(h1 + m.id_off + LG_MSG_ID_DIGITS,
	             h2 + m.id_off + LG_MSG_ID_DIGITS,
	             m.head_len - m.id_off - LG_MSG_ID_DIGITS) == 0,
	      "head after id differs");
	CHECK(memcmp(h2 + m.id_off, "fedcba9876543210", 16) == 0, "id digits");
	free(h1);
	free(h2);
	free(msg);
	lg_msg_free(&m);
	if (!quiet) {
		printf("ok - size %zu\n", size);
		reported++;
	}
}

static void
check_stuff_edges(void)
{
	static const struct {
		const char *in, *out;
	} cases[] = {
	        {".\r\n", "..\r\n"},
	        {"a\r\n.\r\n", "a\r\n..\r\n"},
	        {"..x\r\n", "...x\r\n"},
	        {"a.b\r\n", "a.b\r\n"},
	        {"x\r\n.y\r\n.\r\n", "x\r\n..y\r\n..\r\n"},
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		char out[64];
		size_t n = lg_dotstuff(out, cases[i].in, strlen(cases[i].in));
		CHECK(n == strlen(cases[i].out) &&
		              memcmp(out, cases[i].out, n) == 0,
		      "stuff case %zu", i);
		CHECK(n <= lg_dotstuff_bound(strlen(cases[i].in)),
		      "bound case %zu", i);
	}
	printf("ok - dot-stuffing edge cases\n");
	reported++;
}

int
main(void)
{
	static const size_t sizes[] = {0,    1,     100,   250,    251,
	                               252,  253,   300,   1000,   1003,
	                               4096, 10000, 65536, 1000000};
	check_stuff_edges();
	for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++)
		check_size(sizes[i]);
	/* every size around a line boundary near the head */
	quiet = true;
	for (size_t s = 200; s < 3000; s++)
		check_size(s);
	if (!failures) {
		printf("ok - sizes 200..2999\n");
		reported++;
	}
	printf("1..%d\n", reported);
	return failures ? 1 : 0;
}
