/* The DATA body scanner (smtp_data.h). */
#include <criterion/criterion.h>
#include <string.h>

#include "smtp/smtp_data.h"
#include "smtp_test_lsan.h"
#include "smtp_test_sink.h"

TestSuite(smtp_data, .fini = lsan_fini);

#define FD_MIN_T(a, b) ((a) < (b) ? (a) : (b))

struct scan_out {
	struct tbuf body;
	size_t consumed; /* through the end of data, or everything */
	bool end, bare, long_line;
	size_t body_at_bare; /* body length when bare was first seen */
};

/*
 * Scan in[0..n) in pieces of `piece` octets (0: at once) with a budget of
 * `budget` per call (0: unlimited), like the session does.
 */
static void
scan(const char *in, size_t n, size_t piece, size_t budget,
     struct scan_out *o)
{
	struct smtp_data d;
	size_t off = 0;

	memset(o, 0, sizeof(*o));
	smtp_data_init(&d);
	while (off < n && !o->end) {
		size_t end = piece ? FD_MIN_T(off + piece, n) : n;
		while (off < end) {
			struct smtp_data_run run;
			enum smtp_data_result r = smtp_data_scan(
				&d, (const uint8_t *)in + off, end - off,
				budget ? budget : SIZE_MAX, &run);
			off += run.used;
			if (d.bare && !o->bare) {
				cr_assert_eq(run.len, 0);
				o->bare = true;
				o->body_at_bare = o->body.len;
			}
			if (d.long_line && !o->long_line) {
				cr_assert_eq(run.len, 0);
				o->long_line = true;
			}
			cr_assert(budget == 0 || run.len <= budget);
			tbuf_put(&o->body, run.p, run.len);
			if (r == SMTP_DATA_END) {
				cr_assert_eq(run.len, 0);
				o->end = true;
				break;
			}
			if (r == SMTP_DATA_AGAIN)
				cr_assert_eq(off, end);
		}
	}
	o->consumed = off;
}

static void
check(const char *in, const char *body, bool end, bool bare)
{
	struct scan_out ref, o;
	size_t n = strlen(in);

	scan(in, n, 0, 0, &ref);
	cr_assert_str_eq(ref.body.p ? ref.body.p : "", body, "input %s", in);
	cr_assert_eq(ref.end, end, "input %s", in);
	cr_assert_eq(ref.bare, bare, "input %s", in);
	/* Every piece size and every budget gives the same result. */
	for (size_t piece = 1; piece <= n; piece++) {
		for (size_t budget = 0; budget <= 3; budget++) {
			scan(in, n, piece, budget, &o);
			cr_assert_eq(o.body.len, ref.body.len);
			cr_assert(memcmp(o.body.p, ref.body.p, o.body.len) == 0);
			cr_assert_eq(o.end, ref.end);
			cr_assert_eq(o.consumed, ref.consumed);
			cr_assert_eq(o.bare, ref.bare);
			cr_assert_eq(o.body_at_bare, ref.body_at_bare);
			tbuf_free(&o.body);
		}
	}
	tbuf_free(&ref.body);
}

Test(smtp_data, end_of_data)
{
	check(".\r\n", "", true, false);
	check("a\r\n.\r\n", "a\r\n", true, false);
	check("a\r\n.\r\nMAIL", "a\r\n", true, false);
	check("a\r\n.\r", "a\r\n", false, false);
	check("a\r\n.", "a\r\n", false, false);
}

Test(smtp_data, dot_unstuffing)
{
	check("..\r\n.\r\n", ".\r\n", true, false);
	check("...\r\n.\r\n", "..\r\n", true, false);
	check(".a\r\n.b\r\n.\r\n", "a\r\nb\r\n", true, false);
	check("a.\r\nb..c\r\n.\r\n", "a.\r\nb..c\r\n", true, false);
}

Test(smtp_data, smuggling_sequences_never_end_data)
{
	check("x\n.\nMAIL", "x\n.\nMAIL", false, true);
	check("x\r.\rMAIL", "x\r.\rMAIL", false, true);
	check("x\n.\r\nMAIL", "x\n.\r\nMAIL", false, true);
	check("x\r\n.\nMAIL", "x\r\n\nMAIL", false, true);
	check("x\r\n.\rMAIL", "x\r\n\rMAIL", false, true);
	check("x\r.\r\nMAIL", "x\r.\r\nMAIL", false, true);
	check("x\n.\n\r\n.\r\n", "x\n.\n\r\n", true, true);
}

Test(smtp_data, bare_cr_lf_flagged_at_their_octet)
{
	struct scan_out o;

	check("ab\ncd\r\n.\r\n", "ab\ncd\r\n", true, true);
	scan("ab\ncd\r\n.\r\n", 11, 0, 0, &o);
	cr_assert_eq(o.body_at_bare, 2);
	tbuf_free(&o.body);
	check("ab\rcd\r\n.\r\n", "ab\rcd\r\n", true, true);
	scan("ab\rcd\r\n.\r\n", 11, 0, 0, &o);
	cr_assert_eq(o.body_at_bare, 3, "CR emitted, flagged at the next");
	tbuf_free(&o.body);
	check("ab\r\r\n.\r\n", "ab\r\r\n", true, true);
	check(".\r\r\n.\r\n", "\r\r\n", true, true);
	check("ok\r\n.\r\n", "ok\r\n", true, false);
}

Test(smtp_data, line_length_limit)
{
	char in[2100];
	struct scan_out o;

	memset(in, 'a', sizeof(in));
	memcpy(in + 998, "\r\n.\r\n", 6); /* 1000 octets with CRLF */
	scan(in, strlen(in), 0, 0, &o);
	cr_assert(o.end);
	cr_assert(!o.long_line);
	tbuf_free(&o.body);
	memset(in, 'a', sizeof(in));
	memcpy(in + 999, "\r\n.\r\n", 6); /* 1001 */
	scan(in, strlen(in), 7, 5, &o);
	cr_assert(o.end);
	cr_assert(o.long_line);
	cr_assert_eq(o.body.len, 1001);
	tbuf_free(&o.body);
	/* A stuffed dot counts: it was sent. */
	memset(in, 'a', sizeof(in));
	in[0] = '.';
	memcpy(in + 999, "\r\n.\r\n", 6);
	scan(in, strlen(in), 0, 0, &o);
	cr_assert(o.long_line);
	tbuf_free(&o.body);
}

Test(smtp_data, zero_budget_blocks_without_consuming)
{
	struct smtp_data d;
	struct smtp_data_run run;

	smtp_data_init(&d);
	cr_assert_eq(smtp_data_scan(&d, (const uint8_t *)"abc", 3, 0, &run),
		     SMTP_DATA_BLOCKED);
	cr_assert_eq(run.used, 0);
	cr_assert_eq(run.len, 0);
	/* The terminator needs no budget. */
	cr_assert_eq(smtp_data_scan(&d, (const uint8_t *)".\r\n", 3, 0, &run),
		     SMTP_DATA_END);
	cr_assert_eq(run.used, 3);
	cr_assert_eq(smtp_data_scan(&d, (const uint8_t *)"x", 1, 0, &run),
		     SMTP_DATA_END);
	cr_assert_eq(run.used, 0);
}

/*
 * Issue 10: a NUL is flagged at its octet, with an empty run first (so
 * the body before it is exactly what preceded it), whatever the split and
 * budget; it ends nothing: "\r\n\0.\r\n" and "\r\n.\0\r\n" are body.
 */
static void
check_nul(const char *in, size_t n, size_t before, bool end)
{
	for (size_t piece = 0; piece <= n; piece++) {
		for (size_t budget = 0; budget <= 3; budget++) {
			struct smtp_data d;
			size_t off = 0, body = 0, at = SIZE_MAX;
			bool done = false;

			smtp_data_init(&d);
			while (off < n && !done) {
				size_t e = piece ? FD_MIN_T(off + piece, n) : n;
				while (off < e && !done) {
					struct smtp_data_run run;
					enum smtp_data_result r = smtp_data_scan(
						&d, (const uint8_t *)in + off,
						e - off,
						budget ? budget : SIZE_MAX, &run);
					off += run.used;
					if (d.nul && at == SIZE_MAX) {
						cr_assert_eq(run.len, 0);
						at = body;
					}
					body += run.len;
					done = r == SMTP_DATA_END;
				}
			}
			cr_assert(d.nul, "no NUL seen (piece %zu)", piece);
			cr_assert_eq(at, before, "piece %zu budget %zu", piece,
				     budget);
			cr_assert_eq(done, end, "piece %zu", piece);
		}
	}
}

Test(smtp_data, nul_flagged_never_ends_data)
{
	check_nul("ab\r\n\0.\r\nc\r\n.\r\n", 14, 4, true);
	check_nul("ab\r\n.\0\r\nc\r\n.\r\n", 14, 4, true);
	check_nul("\0", 1, 0, false);
	check_nul("x\r\0\n", 4, 2, false);
}
