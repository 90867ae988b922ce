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
	bool end, bare, long_line, nul;
	size_t body_at_bare; /* body length when bare was first seen */
	size_t body_at_long; /* ... long_line ... */
	size_t body_at_nul;  /* ... nul ... */
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
				o->body_at_long = o->body.len;
			}
			if (d.nul && !o->nul) {
				cr_assert_eq(run.len, 0);
				o->nul = true;
				o->body_at_nul = o->body.len;
			}
			cr_assert(budget == 0 || run.len <= budget,
				  "run of %zu with a budget of %zu", run.len,
				  budget);
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

/*
 * The scanner takes ordinary octets many at a time (smtp_data.c). Whatever
 * the split and the budget, it must give the body, the flags and the place
 * of each flag (as a body length) of one unsplit, unlimited scan.
 */
static void
sweep(const char *in, size_t n, const size_t *pieces, size_t npieces,
      const size_t *budgets, size_t nbudgets, struct scan_out *ref)
{
	scan(in, n, 0, 0, ref);
	for (size_t i = 0; i < npieces; i++) {
		for (size_t j = 0; j < nbudgets; j++) {
			struct scan_out o;

			scan(in, n, pieces[i], budgets[j], &o);
			cr_assert_eq(o.body.len, ref->body.len,
				     "piece %zu budget %zu", pieces[i],
				     budgets[j]);
			cr_assert(o.body.len == 0 ||
				  memcmp(o.body.p, ref->body.p, o.body.len) == 0);
			cr_assert_eq(o.end, ref->end);
			cr_assert_eq(o.consumed, ref->consumed);
			cr_assert_eq(o.bare, ref->bare);
			cr_assert_eq(o.long_line, ref->long_line);
			cr_assert_eq(o.nul, ref->nul);
			cr_assert_eq(o.body_at_bare, ref->body_at_bare,
				     "piece %zu budget %zu", pieces[i],
				     budgets[j]);
			cr_assert_eq(o.body_at_long, ref->body_at_long,
				     "piece %zu budget %zu", pieces[i],
				     budgets[j]);
			cr_assert_eq(o.body_at_nul, ref->body_at_nul);
			tbuf_free(&o.body);
		}
	}
}

static const size_t sweep_pieces[] = {1, 2, 7, 8, 15, 16, 17, 63, 999,
				      1000, 1001, 1448};
static const size_t sweep_budgets[] = {0, 1, 3, 8, 16, 17, 998, 999, 1000,
				       1001, 4096};
#define NPIECES (sizeof(sweep_pieces) / sizeof(sweep_pieces[0]))
#define NBUDGETS (sizeof(sweep_budgets) / sizeof(sweep_budgets[0]))

/*
 * RFC 5321 4.5.3.1.6: 1000 octets with the CRLF is the most a line may
 * have. long_line is raised before the 1001st octet of the line, as sent,
 * whatever that octet is, with an empty run first: the body before it
 * holds exactly the first 1000 octets that are body.
 */
Test(smtp_data, long_line_flag_before_the_1001st_octet)
{
	static const struct {
		const char *first; /* start of the long line */
		size_t fill;       /* then this many 'a' */
		bool flag;
		size_t at; /* body length when flagged */
	} cases[] = {
		{"", 998, false, 0},  /* 998 + CRLF = 1000: fits */
		{"", 999, true, 1000}, /* before its LF */
		{"", 1000, true, 1000}, /* before its CR */
		{"", 1500, true, 1000}, /* before the 1001st 'a' */
		{".", 997, false, 0},  /* the stuffing dot counts... */
		{".", 998, true, 999}, /* ...but is not body */
		{"..", 1200, true, 999},
	};
	char in[2000];

	for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
		struct scan_out ref;
		size_t n = 0, head;

		/* A short line first, so the long one starts mid-run. */
		memcpy(in, "xy\r\n", 4);
		n = 4;
		memcpy(in + n, cases[c].first, strlen(cases[c].first));
		n += strlen(cases[c].first);
		memset(in + n, 'a', cases[c].fill);
		n += cases[c].fill;
		memcpy(in + n, "\r\nz\r\n.\r\n", 8);
		n += 8;
		head = 4;
		sweep(in, n, sweep_pieces, NPIECES, sweep_budgets, NBUDGETS,
		      &ref);
		cr_assert(ref.end);
		cr_assert_eq(ref.long_line, cases[c].flag, "case %zu", c);
		if (cases[c].flag)
			cr_assert_eq(ref.body_at_long, head + cases[c].at,
				     "case %zu: flagged at %zu", c,
				     ref.body_at_long);
		tbuf_free(&ref.body);
	}
}

/* The flag is raised once, at the first long line: after it the span is
 * no longer cut at the limit, and a second long line changes nothing. */
Test(smtp_data, long_line_flag_raised_once)
{
	char in[4100];
	struct scan_out ref;
	size_t n = 0;

	memset(in, 'q', 1200);
	n = 1200;
	memcpy(in + n, "\r\n", 2);
	n += 2;
	memset(in + n, 'r', 2500);
	n += 2500;
	memcpy(in + n, "\r\n.\r\n", 5);
	n += 5;
	sweep(in, n, sweep_pieces, NPIECES, sweep_budgets, NBUDGETS, &ref);
	cr_assert(ref.end);
	cr_assert(ref.long_line);
	cr_assert_eq(ref.body_at_long, 1000);
	cr_assert_eq(ref.body.len, n - 3);
	tbuf_free(&ref.body);
}

/*
 * The budget bounds every run, and a call stopped by the budget returns a
 * run of exactly the budget: the scanner used all the room it was given
 * (the session asks for more only once that room is filled). The only
 * other stop in this body is the flush before the final dot.
 */
Test(smtp_data, runs_fill_the_budget_exactly)
{
	char in[3000];
	size_t n;

	memset(in, 'b', sizeof(in));
	for (size_t i = 70; i + 2 < sizeof(in); i += 72)
		memcpy(in + i, "\r\n", 2);
	n = sizeof(in) - 5;
	memcpy(in + n, "\r\n.\r\n", 5);
	n += 5;
	for (size_t b = 1; b <= 80; b++) {
		struct smtp_data d;
		size_t off = 0, body = 0;
		enum smtp_data_result r;

		smtp_data_init(&d);
		do {
			struct smtp_data_run run;

			r = smtp_data_scan(&d, (const uint8_t *)in + off,
					   n - off, b, &run);
			off += run.used;
			body += run.len;
			cr_assert(run.len <= b);
			if (r == SMTP_DATA_CONTINUE && in[off] != '.')
				cr_assert_eq(run.len, b,
					     "budget %zu: a run of %zu", b,
					     run.len);
		} while (r == SMTP_DATA_CONTINUE);
		cr_assert_eq(r, SMTP_DATA_END);
		cr_assert_eq(off, n);
		cr_assert_eq(body, n - 3);
	}
}

/*
 * Each special octet is found wherever it sits relative to the 8- and
 * 16-octet blocks the scanner reads, and only those three are special:
 * every other octet value, 8-bit ones included, is plain body.
 */
Test(smtp_data, special_octet_found_at_every_offset)
{
	static const char specials[] = {'\r', '\n', '\0'};
	static const size_t few[] = {1, 5, 16, 1448};
	static const size_t fewb[] = {0, 2, 13};
	char in[128];

	for (size_t s = 0; s < sizeof(specials); s++) {
		for (size_t off = 0; off < 70; off++) {
			struct scan_out ref;
			size_t n;

			memset(in, 'a', off);
			in[off] = specials[s];
			memset(in + off + 1, 'b', 30);
			n = off + 31;
			memcpy(in + n, "\r\n.\r\n", 5);
			n += 5;
			sweep(in, n, few, 4, fewb, 3, &ref);
			cr_assert(ref.end);
			if (specials[s] == '\0') {
				cr_assert(ref.nul && !ref.bare);
				cr_assert_eq(ref.body_at_nul, off);
			} else {
				/* A bare CR is flagged at the octet after
				 * it (it was emitted as a possible CRLF). */
				cr_assert(ref.bare && !ref.nul);
				cr_assert_eq(ref.body_at_bare,
					     specials[s] == '\r' ? off + 1
								 : off);
			}
			cr_assert_eq(ref.body.len, n - 3);
			tbuf_free(&ref.body);
		}
	}
}

Test(smtp_data, other_octet_values_are_plain_body)
{
	char in[64];

	for (unsigned v = 1; v < 256; v++) {
		struct scan_out o;

		if (v == '\r' || v == '\n')
			continue;
		in[0] = 'x'; /* so that a '.' is not at the line start */
		memset(in + 1, (int)v, 40);
		memcpy(in + 41, "\r\n.\r\n", 5);
		scan(in, 46, 0, 0, &o);
		cr_assert(o.end, "octet %u", v);
		cr_assert(!o.bare && !o.nul && !o.long_line, "octet %u", v);
		cr_assert_eq(o.body.len, 43);
		cr_assert(memcmp(o.body.p, in, 43) == 0);
		tbuf_free(&o.body);
	}
	/* A NUL among octets a word test could confuse with it. */
	memcpy(in, "\x01\x01\x01\x80\x01\x00\x01\x01\x01\x01\x01\x01", 12);
	{
		struct scan_out o;

		scan(in, 12, 0, 0, &o);
		cr_assert(o.nul);
		cr_assert_eq(o.body_at_nul, 5);
		tbuf_free(&o.body);
	}
}

/* A body with every shape at once, against itself cut every way. */
Test(smtp_data, mixed_body_any_split_any_budget)
{
	struct tbuf in = {0};
	struct scan_out ref;

	tbuf_put(&in, "Subject: x\r\n\r\n", 14);
	for (int i = 0; i < 40; i++)
		tbuf_put(&in, "ordinary text of a usual length, more or less\r\n",
			 47);
	tbuf_put(&in, "..stuffed\r\n.\r\r\n", 16);
	for (int i = 0; i < 11; i++)
		tbuf_put(&in, "0123456789abcdefghijklmnopqrstuvwxyz0123456789ab"
			      "cdefghijklmnopqrstuvwxyz0123456789abcdefghijklmn"
			      "opqrstuvwxyz0123456789",
			 118);
	tbuf_put(&in, "\r\nlate bare LF\nthen NUL\0x\r\n", 27);
	tbuf_put(&in, "\r\n.\r\nQUIT\r\n", 11);
	sweep(in.p, in.len, sweep_pieces, NPIECES, sweep_budgets, NBUDGETS,
	      &ref);
	cr_assert(ref.end);
	cr_assert(ref.bare && ref.nul && ref.long_line);
	cr_assert_eq(ref.consumed, in.len - 6);
	tbuf_free(&ref.body);
	tbuf_free(&in);
}
