/*
 * The RFC 1047 fingerprint (queue.h, struct q_fp): SHA-256 over the
 * sender, the recipients and the body after our own Received header. The
 * delivery log keeps fingerprints (DLOG_INDOUBT) across restarts and
 * versions, so the value itself is pinned here, not only its properties.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <string.h>

#include "control/queue.h"

static const char body[] =
	"Received: from client.example.org\r\n"
	"\tby mx.example.com with ESMTP id 1\r\n"
	"\t; Sat, 5 Dec 2026 12:00:00 +0000\r\n"
	"Subject: hi\r\n"
	"\r\n"
	"Hello\r\n";

/* Python: hashlib.sha256(b"alice@example.org\0bob@example.com\0"
 * b"carol@example.com\0\0" + b"Subject: hi\r\n\r\nHello\r\n") */
static const char want_hex[] =
	"a8a4f337c2373a75841914a88b4680dcca9bd2623dc989e4fe2ec26a64985a19";

static void
hex(const uint8_t *fp, char *out)
{
	for (int i = 0; i < 32; i++)
		sprintf(out + 2 * i, "%02x", fp[i]);
}

static void
msg_init(struct q_msg *m, struct q_rcpt *r)
{
	memset(m, 0, sizeof(*m));
	memset(r, 0, 2 * sizeof(*r));
	r[0].addr = "bob@example.com";
	r[1].addr = "carol@example.com";
	m->sender = "alice@example.org";
	m->rcpts = r;
	m->n_rcpts = 2;
}

/* The body fed in two pieces split at `at` (0: one piece). */
static void
fp_of(const struct q_msg *m, const char *b, size_t n, size_t at,
      uint8_t *out)
{
	struct q_fp f;

	cr_assert_eq(q_fp_begin(&f, m), 0);
	q_fp_feed(&f, (const uint8_t *)b, at);
	q_fp_feed(&f, (const uint8_t *)b + at, n - at);
	cr_assert_eq(q_fp_end(&f, out), 0);
}

Test(fingerprint, known_answer)
{
	struct q_msg m;
	struct q_rcpt r[2];
	uint8_t fp[32];
	char got[65];

	msg_init(&m, r);
	fp_of(&m, body, strlen(body), 0, fp);
	hex(fp, got);
	cr_assert_str_eq(got, want_hex);
}

Test(fingerprint, any_split_gives_the_same_value)
{
	struct q_msg m;
	struct q_rcpt r[2];
	uint8_t fp[32];
	char got[65];

	msg_init(&m, r);
	for (size_t at = 0; at <= strlen(body); at++) {
		fp_of(&m, body, strlen(body), at, fp);
		hex(fp, got);
		cr_assert_str_eq(got, want_hex, "split at %zu", at);
	}
}

Test(fingerprint, our_received_header_does_not_count_the_envelope_does)
{
	struct q_msg m;
	struct q_rcpt r[2];
	uint8_t a[32], b[32];
	const char other[] = "Received: from elsewhere\r\n"
			     " by another.example.com id 2\r\n"
			     "Subject: hi\r\n"
			     "\r\n"
			     "Hello\r\n";

	msg_init(&m, r);
	fp_of(&m, body, strlen(body), 0, a);
	fp_of(&m, other, strlen(other), 0, b);
	cr_assert_arr_eq(a, b, 32, "a resend's own Received header differs");

	r[1].addr = "dave@example.com";
	fp_of(&m, body, strlen(body), 0, b);
	cr_assert_arr_neq(a, b, 32, "another recipient is another message");
}

Test(fingerprint, many_in_a_row_on_one_thread)
{
	struct q_msg m;
	struct q_rcpt r[2];
	uint8_t fp[32];
	char got[65];

	msg_init(&m, r);
	for (int i = 0; i < 1000; i++) {
		struct q_fp f;
		cr_assert_eq(q_fp_begin(&f, &m), 0);
		if (i % 3 == 0) { /* given up half-way: nothing left behind */
			q_fp_feed(&f, (const uint8_t *)body, 10);
			q_fp_abort(&f);
			continue;
		}
		q_fp_feed(&f, (const uint8_t *)body, strlen(body));
		cr_assert_eq(q_fp_end(&f, fp), 0);
		hex(fp, got);
		cr_assert_str_eq(got, want_hex, "message %d", i);
	}
}
