/*
 * Differential fuzz target: the DATA scanner (smtp_data.c) against the
 * byte-at-a-time scanner it replaced (smtp_data_ref.c, the oracle), and
 * against itself built with its portable span (smtp_data_swar.c).
 *
 * Input: byte 0 picks a budget pattern (bits 0-2), a split pattern (bits
 * 3-5) and whether more input may arrive while the scanner still has some
 * (bit 6); bytes 1-4 seed the generator of budgets and split points; the
 * rest is the body as sent after DATA.
 *
 * The three scanners are driven in lock step the way the session drives
 * one: the same window of input and the same budget for every call. After
 * every call the result, the run (where it points and what it holds), the
 * octets used and the whole state (pos, line_len, bare, long_line, nul)
 * must be identical; abort() otherwise. Independently of the oracle, the
 * body, the octet count at which each flag was raised, and the end must be
 * those of one unsplit, unlimited scan.
 *
 * Each window is copied into an allocation of exactly its size, so that a
 * read past the end of the input is an ASan report, not a silent look at
 * the next segment.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "smtp_data_ref.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define HDR 5
#define NSCAN 3

typedef enum smtp_data_result (*scan_fn)(struct smtp_data *d,
					 const uint8_t *p, size_t n,
					 size_t budget,
					 struct smtp_data_run *run);

static const scan_fn scanners[NSCAN] = {
	smtp_data_scan_ref,
	smtp_data_scan,
	smtp_data_scan_swar,
};
static const char *const names[NSCAN] = {"ref", "new", "swar"};

/* What a scan produced, for the split-independence check. */
struct outcome {
	uint8_t *body;
	size_t len;
	size_t consumed;
	size_t at_bare, at_long, at_nul; /* body length at the flag */
	bool end;
};

static uint32_t
rnd(uint32_t *st)
{
	*st ^= *st << 13;
	*st ^= *st >> 17;
	*st ^= *st << 5;
	return *st;
}

static size_t
next_budget(unsigned mode, uint32_t *st, uint8_t fixed)
{
	switch (mode) {
	case 0:
		return SIZE_MAX;
	case 1:
		return rnd(st) % 4;
	case 2:
		return rnd(st) % 16;
	case 3:
		/* Around the line limit, so both bounds meet. */
		return rnd(st) % 1100;
	case 4:
		return fixed;
	case 5: {
		uint32_t r = rnd(st);
		switch (r % 4) {
		case 0:
			return 0;
		case 1:
			return 1;
		case 2:
			return SIZE_MAX;
		default:
			return (r >> 8) % 64;
		}
	}
	case 6:
		return rnd(st) % 2 ? 0 : rnd(st) % 9;
	default:
		return rnd(st) % 5000;
	}
}

static size_t
next_piece(unsigned mode, uint32_t *st, uint8_t fixed, size_t left)
{
	size_t piece;

	switch (mode) {
	case 0:
		piece = left;
		break;
	case 1:
		piece = 1;
		break;
	case 2:
		piece = 1 + rnd(st) % 8;
		break;
	case 3:
		piece = 1 + rnd(st) % 64;
		break;
	case 4:
		piece = 1 + rnd(st) % 1100;
		break;
	case 5:
		piece = 1 + fixed % 32;
		break;
	default: {
		uint32_t r = rnd(st);
		piece = r % 3 == 0 ? 1 : r % 3 == 1 ? 2 + (r >> 8) % 15
						 : 990 + (r >> 8) % 20;
		break;
	}
	}
	return piece < left ? piece : left;
}

static void
mismatch(const char *what, unsigned k, size_t call)
{
	fprintf(stderr, "fuzz_smtp_data_diff: %s differs (%s vs ref, call %zu)\n",
		what, names[k], call);
	abort();
}

static bool
in_window(const uint8_t *q, const uint8_t *p, size_t n)
{
	return q >= p && q < p + n;
}

/* Everything the oracle says must hold for scanner k too. */
static void
compare(unsigned k, size_t call, const uint8_t *p, size_t n,
	enum smtp_data_result r0, const struct smtp_data_run *run0,
	const struct smtp_data *d0, enum smtp_data_result r,
	const struct smtp_data_run *run, const struct smtp_data *d)
{
	if (r != r0)
		mismatch("result", k, call);
	if (run->used != run0->used)
		mismatch("used", k, call);
	if (run->len != run0->len)
		mismatch("run length", k, call);
	if (run->len) {
		/* A run points into the input, at the same octet, except the
		 * CR of ".<CR>x", which is a constant of each scanner. */
		bool in0 = in_window(run0->p, p, n), in = in_window(run->p, p, n);
		if (in != in0 || (in && run->p != run0->p))
			mismatch("run pointer", k, call);
		if (memcmp(run->p, run0->p, run->len) != 0)
			mismatch("run octets", k, call);
	}
	if (d->pos != d0->pos)
		mismatch("pos", k, call);
	if (d->line_len != d0->line_len)
		mismatch("line_len", k, call);
	if (d->bare != d0->bare)
		mismatch("bare", k, call);
	if (d->long_line != d0->long_line)
		mismatch("long_line", k, call);
	if (d->nul != d0->nul)
		mismatch("nul", k, call);
}

static void
note_flags(const struct smtp_data *was, const struct smtp_data *d,
	   const struct smtp_data_run *run, struct outcome *o)
{
	bool raised = false;

	if (d->bare && !was->bare) {
		o->at_bare = o->len;
		raised = true;
	}
	if (d->long_line && !was->long_line) {
		o->at_long = o->len;
		raised = true;
	}
	if (d->nul && !was->nul) {
		o->at_nul = o->len;
		raised = true;
	}
	/* smtp_data.h: a new flag comes with an empty run. */
	if (raised && run->len)
		abort();
}

static void
outcome_init(struct outcome *o, size_t n)
{
	memset(o, 0, sizeof(*o));
	/* Unstuffing only removes octets; ".<CR>x" adds back the CR it
	 * held, never more than was sent. */
	o->body = malloc(n + 1);
	if (!o->body)
		abort();
	o->at_bare = o->at_long = o->at_nul = SIZE_MAX;
}

static void
outcome_put(struct outcome *o, size_t n, const struct smtp_data_run *run)
{
	if (o->len + run->len > n + 1)
		abort();
	memcpy(o->body + o->len, run->p, run->len);
	o->len += run->len;
}

/* One unsplit, unlimited scan by the oracle: what every split must give. */
static void
scan_whole(const uint8_t *body, size_t n, struct outcome *o)
{
	struct smtp_data d, was;
	size_t off = 0;

	outcome_init(o, n);
	smtp_data_init(&d);
	while (off < n) {
		struct smtp_data_run run;
		enum smtp_data_result r;

		was = d;
		r = smtp_data_scan_ref(&d, body + off, n - off, SIZE_MAX, &run);
		off += run.used;
		note_flags(&was, &d, &run, o);
		outcome_put(o, n, &run);
		if (r == SMTP_DATA_END) {
			o->end = true;
			break;
		}
		if (r == SMTP_DATA_BLOCKED)
			abort(); /* an unlimited budget never blocks */
	}
	o->consumed = off;
}

static void
same_outcome(const struct outcome *a, const struct outcome *b)
{
	if (a->len != b->len || memcmp(a->body, b->body, a->len) != 0 ||
	    a->consumed != b->consumed || a->end != b->end ||
	    a->at_bare != b->at_bare || a->at_long != b->at_long ||
	    a->at_nul != b->at_nul) {
		fprintf(stderr, "fuzz_smtp_data_diff: the split changed the "
				"body or a flag's place\n");
		abort();
	}
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const uint8_t *body = data + HDR;
	struct smtp_data d[NSCAN];
	struct outcome whole, split;
	unsigned bmode, smode;
	bool trickle;
	uint32_t st;
	uint8_t *win = NULL;
	size_t n, off = 0, lim = 0, win_base = 0, calls = 0, max_calls;
	unsigned blocked = 0;

	if (size < HDR)
		return 0;
	n = size - HDR;
	bmode = data[0] & 7;
	smode = (data[0] >> 3) & 7;
	trickle = data[0] & 64;
	st = ((uint32_t)data[1] | (uint32_t)data[2] << 8 |
	      (uint32_t)data[3] << 16 | (uint32_t)data[4] << 24) | 1u;

	scan_whole(body, n, &whole);
	outcome_init(&split, n);
	for (unsigned k = 0; k < NSCAN; k++)
		smtp_data_init(&d[k]);
	/* Every call consumes an octet, raises one of three flags, changes
	 * state without consuming (".<CR>x"), or blocks at most 3 times in
	 * a row: more calls than this is a scanner that stopped moving. */
	max_calls = 8 * n + 64;

	while (off < n) {
		struct smtp_data_run run0, run;
		struct smtp_data was;
		enum smtp_data_result r0, r;
		const uint8_t *p;
		size_t budget;

		/* More input arrives when all is consumed, and sometimes
		 * while some is still waiting (a new segment behind it). */
		if (off == lim || (trickle && lim < n && rnd(&st) % 4 == 0)) {
			lim += next_piece(smode, &st, data[2], n - lim);
			free(win);
			win = malloc(lim - off);
			if (!win)
				abort();
			memcpy(win, body + off, lim - off);
			win_base = off;
		}
		p = win + (off - win_base);
		budget = next_budget(bmode, &st, data[1]);
		if (blocked >= 3 && budget == 0)
			budget = 1 + rnd(&st) % 8;
		if (++calls > max_calls) {
			fprintf(stderr, "fuzz_smtp_data_diff: no progress\n");
			abort();
		}

		was = d[0];
		r0 = smtp_data_scan_ref(&d[0], p, lim - off, budget, &run0);
		if (run0.used > lim - off || run0.len > budget)
			abort();
		for (unsigned k = 1; k < NSCAN; k++) {
			r = scanners[k](&d[k], p, lim - off, budget, &run);
			compare(k, calls, p, lim - off, r0, &run0, &d[0], r,
				&run, &d[k]);
		}
		note_flags(&was, &d[0], &run0, &split);
		outcome_put(&split, n, &run0);
		off += run0.used;
		blocked = r0 == SMTP_DATA_BLOCKED ? blocked + 1 : 0;
		if (r0 == SMTP_DATA_AGAIN && off != lim)
			abort(); /* AGAIN means all input consumed */
		if (r0 == SMTP_DATA_END) {
			split.end = true;
			break;
		}
	}
	split.consumed = off;
	/* After the end, every scanner stays there and takes nothing. */
	if (split.end && off < n) {
		struct smtp_data_run run0, run;
		enum smtp_data_result r0 =
			smtp_data_scan_ref(&d[0], body + off, n - off, 1, &run0);

		if (r0 != SMTP_DATA_END || run0.used || run0.len)
			abort();
		for (unsigned k = 1; k < NSCAN; k++) {
			enum smtp_data_result r = scanners[k](
				&d[k], body + off, n - off, 1, &run);
			compare(k, calls + 1, body + off, n - off, r0, &run0,
				&d[0], r, &run, &d[k]);
		}
	}
	same_outcome(&whole, &split);
	free(win);
	free(whole.body);
	free(split.body);
	return 0;
}
