/* RFC 1047 support in the engine: the 250s to a final dot it remembers
 * (message id, where each ends in the output stream), QUIT, and the
 * durable-completion-to-250 gap histogram. */
#include <criterion/criterion.h>
#include <string.h>
#include <unistd.h>

#include "smtp_test_sink.h"

TestSuite(smtp_gap);

static const char *doms[] = {"example.com"};

static void
open_td(struct td *t)
{
	struct smtp_config cfg;

	smtp_config_defaults(&cfg);
	cfg.hostname = "mx.test";
	cfg.domains = doms;
	cfg.n_domains = 1;
	cr_assert(td_open(t, &cfg, NULL));
}

static const char msg[] = "MAIL FROM:<a@example.com>\r\n"
			  "RCPT TO:<b@example.com>\r\nDATA\r\n"
			  "Subject: x\r\n\r\nhello\r\n.\r\n";

Test(smtp_gap, ackpoint_marks_the_end_of_each_250)
{
	struct td t;
	struct smtp_ackpoint ap[SMTP_ACKPOINTS];
	const char *out;

	open_td(&t);
	td_feeds(&t, "EHLO c.test\r\n");
	td_feeds(&t, msg);
	td_feeds(&t, msg);
	cr_assert_eq(smtp_session_ackpoints(t.s, ap), 2);
	/* Everything was handed out: the stream is what t.out holds. */
	cr_assert_eq(smtp_session_output_total(t.s), t.out.len);
	out = (const char *)t.out.p;
	for (int i = 0; i < 2; i++) {
		cr_assert_leq(ap[i].end, t.out.len);
		/* The octets just before the end are the 250's CRLF, and the
		 * line they end is the 250 with this message's id. */
		cr_assert_eq(memcmp(out + ap[i].end - 2, "\r\n", 2), 0);
		const char *line = out + ap[i].end - 2;
		while (line > out && line[-1] != '\n')
			line--;
		cr_assert_eq(strncmp(line, "250 2.0.0 Ok: queued as ", 24), 0,
			     "%.60s", line);
		cr_assert_neq(ap[i].msgid, 0);
	}
	cr_assert_lt(ap[0].end, ap[1].end);
	cr_assert_neq(ap[0].msgid, ap[1].msgid);
	cr_assert(!smtp_session_quit_seen(t.s));
	td_feeds(&t, "QUIT\r\n");
	cr_assert(smtp_session_quit_seen(t.s));
	td_close(&t);
}

Test(smtp_gap, only_the_last_eight_are_kept)
{
	struct td t;
	struct smtp_ackpoint ap[SMTP_ACKPOINTS];
	uint64_t prev = 0;

	open_td(&t);
	td_feeds(&t, "EHLO c.test\r\n");
	for (int i = 0; i < 11; i++)
		td_feeds(&t, msg);
	cr_assert_eq(smtp_session_ackpoints(t.s, ap), SMTP_ACKPOINTS);
	for (unsigned i = 0; i < SMTP_ACKPOINTS; i++) {
		cr_assert_gt(ap[i].end, prev, "oldest first");
		prev = ap[i].end;
	}
	cr_assert_eq(ap[SMTP_ACKPOINTS - 1].end, t.out.len);
	td_close(&t);
}

Test(smtp_gap, a_failed_commit_is_no_ackpoint)
{
	struct td t;
	struct smtp_ackpoint ap[SMTP_ACKPOINTS];

	open_td(&t);
	t.commit_status = -EIO;
	td_feeds(&t, "EHLO c.test\r\n");
	td_feeds(&t, msg);
	cr_assert_eq(smtp_session_ackpoints(t.s, ap), 0, "451 is not a 250");
	td_close(&t);
}

Test(smtp_gap, one_gap_sample_per_250_handed_out)
{
	struct td t;
	uint64_t n = 0;
	const struct smtp_stats *st;

	open_td(&t);
	td_feeds(&t, "EHLO c.test\r\n");
	for (int i = 0; i < 5; i++)
		td_feeds(&t, msg);
	st = smtp_server_stats(t.srv);
	for (unsigned b = 0; b < SMTP_GAP_BUCKETS; b++)
		n += st->gap_hist[b];
	cr_assert_eq(n, 5);
	cr_assert_lt(fd_qlat_percentile_us(st->gap_hist, 99), 1000000,
		     "an in-memory gap is not a second");
	td_close(&t);
}

static uint64_t
samples(const struct smtp_stats *st)
{
	uint64_t n = 0;

	for (unsigned b = 0; b < SMTP_GAP_BUCKETS; b++)
		n += st->gap_hist[b];
	return n;
}

/* Staged (DPDK): a 250 handed over is not yet on the wire; its sample ends
 * when the transport settles, and the wait in between is counted. */
Test(smtp_gap, staged_samples_end_when_the_transport_settles)
{
	struct td t;
	const struct smtp_stats *st;

	open_td(&t);
	smtp_server_gap_staged(t.srv, true);
	td_feeds(&t, "EHLO c.test\r\n");
	for (int i = 0; i < 3; i++)
		td_feeds(&t, msg);
	st = smtp_server_stats(t.srv);
	cr_assert(strstr(t.out.p, "250 2.0.0 Ok: queued"), "%s", t.out.p);
	cr_assert_eq(samples(st), 0, "handed over is not on the wire");
	usleep(3000);
	smtp_server_gap_settle(t.srv);
	cr_assert_eq(samples(st), 3);
	cr_assert_geq(fd_qlat_percentile_us(st->gap_hist, 50), 2500,
		      "the wait before the settle is in the gap");
	smtp_server_gap_settle(t.srv);
	cr_assert_eq(samples(st), 3, "each sample once");
	smtp_server_gap_staged(t.srv, false);
	td_feeds(&t, msg);
	cr_assert_eq(samples(st), 4, "unstaged: recorded when handed over");
	td_close(&t);
}

Test(smtp_gap, percentiles_and_bucket_bounds)
{
	uint64_t h[SMTP_GAP_BUCKETS];

	for (unsigned b = 1; b < SMTP_GAP_BUCKETS; b++)
		cr_assert_geq(fd_qlat_upper_us(b), fd_qlat_upper_us(b - 1),
			      "bucket %u", b);
	memset(h, 0, sizeof(h));
	cr_assert_eq(fd_qlat_percentile_us(h, 50), 0, "empty");
	h[40] = 99; /* e = 10: about 1-1.25 ms */
	h[60] = 1;
	cr_assert_eq(fd_qlat_percentile_us(h, 50), fd_qlat_upper_us(40));
	cr_assert_eq(fd_qlat_percentile_us(h, 99), fd_qlat_upper_us(40));
	cr_assert_eq(fd_qlat_percentile_us(h, 100), fd_qlat_upper_us(60));
	cr_assert(fd_qlat_upper_us(40) >= 1000 && fd_qlat_upper_us(40) < 1300,
		  "%lu", (unsigned long)fd_qlat_upper_us(40));
}
