/*
 * fd-scanbench: the DATA body scanner (smtp_data.c) against the
 * byte-at-a-time scanner it replaced (tests/fuzz/smtp/smtp_data_ref.c), and
 * against its own portable word-at-a-time span (smtp_data_swar.c), which
 * is what a machine without SSE2 runs.
 *
 * Bodies: fd-loadgen's messages (lg_msg.h: lines of 40-78 octets, every 5th
 * up to 997, dot-stuffed) of 4 KiB and of 1 MiB, and 1 MiB of base64 in
 * 76-octet lines, the usual shape of an attachment. Each is scanned whole
 * with an unlimited budget (the receive buffer holds it all) and in
 * 1448-octet pieces (one TCP segment at a time), and the three scanners
 * must produce the same body length, or the program fails.
 *
 * Prints MB/s (10^6 octets of input per second), the best of 5 rounds of at
 * least 0.2 s each; the machine's other load shows up in it. --once scans
 * each body (or the one named) once per scanner and way of cutting, and
 * prints nothing: for callgrind, whose instruction counts do not depend on
 * the load, e.g.
 *   valgrind --tool=callgrind fd-scanbench --once 1m
 *   callgrind_annotate --inclusive=yes callgrind.out.PID | grep smtp_data_scan
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../tests/fuzz/smtp/smtp_data_ref.h"
#include "lg_msg.h"

typedef enum smtp_data_result (*scan_fn)(struct smtp_data *d,
					 const uint8_t *p, size_t n,
					 size_t budget,
					 struct smtp_data_run *run);

static const struct {
	const char *name;
	scan_fn fn;
} scanners[] = {
	{"old (byte)", smtp_data_scan_ref},
	{"new", smtp_data_scan},
	{"new, portable", smtp_data_scan_swar},
};
#define NSCAN (sizeof(scanners) / sizeof(scanners[0]))

struct body {
	const char *name;
	uint8_t *p;
	size_t n;
};

static double
now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Scan b in pieces of `piece` octets (0: whole); returns the body length. */
static size_t
scan_body(scan_fn fn, const struct body *b, size_t piece)
{
	struct smtp_data d;
	size_t off = 0, lim = 0, out = 0;

	smtp_data_init(&d);
	while (off < b->n) {
		struct smtp_data_run run;
		enum smtp_data_result r;

		if (off == lim)
			lim = piece && b->n - lim > piece ? lim + piece : b->n;
		r = fn(&d, b->p + off, lim - off, SIZE_MAX, &run);
		off += run.used;
		out += run.len;
		if (r == SMTP_DATA_END)
			break;
	}
	return out;
}

static double
mbps(scan_fn fn, const struct body *b, size_t piece, size_t want)
{
	double best = 0;

	for (int round = 0; round < 5; round++) {
		double t0 = now(), t;
		size_t bytes = 0;

		do {
			for (int k = 0; k < 16; k++) {
				if (scan_body(fn, b, piece) != want) {
					fprintf(stderr, "scanbench: body differs\n");
					exit(1);
				}
				bytes += b->n;
			}
			t = now() - t0;
		} while (t < 0.2);
		if ((double)bytes / t / 1e6 > best)
			best = (double)bytes / t / 1e6;
	}
	return best;
}

static int
lg_body(struct body *b, const char *name, size_t size)
{
	struct lg_msg m;

	if (lg_msg_build(&m, size, "a@example.org", "b@example.org",
			 "example.org", "Thu, 1 Jan 2026 00:00:00 +0000",
			 1) != 0)
		return -1;
	/* The DATA stream: head, stuffed body, the terminator. */
	b->n = m.head_len + m.body_stuffed_len + 3;
	b->p = malloc(b->n);
	if (!b->p) {
		lg_msg_free(&m);
		return -1;
	}
	memcpy(b->p, m.head, m.head_len);
	memcpy(b->p + m.head_len, m.body_stuffed, m.body_stuffed_len);
	memcpy(b->p + b->n - 3, ".\r\n", 3);
	b->name = name;
	lg_msg_free(&m);
	return 0;
}

static int
base64_body(struct body *b, const char *name, size_t size)
{
	static const char alpha[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
				    "abcdefghijklmnopqrstuvwxyz0123456789+/";
	uint32_t x = 2463534242u;
	size_t off = 0;

	b->p = malloc(size + 80);
	if (!b->p)
		return -1;
	while (off + 78 <= size) {
		for (int i = 0; i < 76; i++) {
			x ^= x << 13;
			x ^= x >> 17;
			x ^= x << 5;
			b->p[off++] = (uint8_t)alpha[x % 64];
		}
		b->p[off++] = '\r';
		b->p[off++] = '\n';
	}
	memcpy(b->p + off, ".\r\n", 3);
	b->n = off + 3;
	b->name = name;
	return 0;
}

int
main(int argc, char **argv)
{
	static const size_t pieces[] = {0, 1448};
	static const char *const keys[] = {"4k", "1m", "b64"};
	struct body bodies[3];
	bool once = false;
	int only = -1;

	if (argc > 1) {
		once = strcmp(argv[1], "--once") == 0 && argc <= 3;
		for (int i = 0; argc == 3 && i < 3; i++)
			if (strcmp(argv[2], keys[i]) == 0)
				only = i;
		if (!once || (argc == 3 && only < 0)) {
			fprintf(stderr,
				"usage: fd-scanbench [--once [4k|1m|b64]]\n");
			return 2;
		}
	}
	if (lg_body(&bodies[0], "4 KiB text", 4096) != 0 ||
	    lg_body(&bodies[1], "1 MiB text", 1 << 20) != 0 ||
	    base64_body(&bodies[2], "1 MiB base64", 1 << 20) != 0) {
		fprintf(stderr, "scanbench: out of memory\n");
		return 1;
	}
	if (!once)
		printf("%-13s %-6s %14s %14s %14s\n", "body", "pieces",
		       scanners[0].name, scanners[1].name, scanners[2].name);
	for (int i = 0; i < 3; i++) {
		struct body *b = &bodies[i];

		if (only >= 0 && i != only)
			continue;
		for (size_t j = 0; j < 2; j++) {
			size_t want = scan_body(scanners[0].fn, b, pieces[j]);
			double r[NSCAN];

			for (size_t k = 0; k < NSCAN; k++) {
				/* In --once mode the oracle's scan above is
				 * its one scan: the others are checked
				 * against it. */
				if (once) {
					if (k > 0 && scan_body(scanners[k].fn, b,
							       pieces[j]) != want)
						return 1;
					continue;
				}
				r[k] = mbps(scanners[k].fn, b, pieces[j], want);
			}
			if (once)
				continue;
			printf("%-13s %-6s %9.0f MB/s %9.0f MB/s %9.0f MB/s"
			       "  (x%.1f, x%.1f)\n",
			       b->name, pieces[j] ? "1448" : "whole", r[0],
			       r[1], r[2], r[1] / r[0], r[2] / r[0]);
		}
	}
	for (int i = 0; i < 3; i++)
		free(bodies[i].p);
	return 0;
}
