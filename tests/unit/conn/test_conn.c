/*
 * The connection layer (conn/conn.h) over a fake transport, with the real
 * SMTP engine, the engine tests' fake spool (smtp_test_sink.h) and, for
 * STARTTLS, the real TLS layer against a real OpenSSL client
 * (tls_test_util.h). The clock is the test's: conn_set_clock().
 *
 * The fake transport takes output synchronously, at most `cap` octets a
 * call (as DPDK's tcp_send() does when its buffer fills), or
 * asynchronously (as io_uring: one send in flight, completed by the test).
 * It keeps the input the layer did not take, as a transport holds it, and
 * offers it again when the layer asks (resume()).
 *
 * What the daemon links from worker.c and the spool is stubbed below:
 * the pause flag, the TLS server, the in-doubt report and the spool's
 * in-flight count.
 */
#include <criterion/criterion.h>
#include <criterion/logging.h>
#include <stdatomic.h>

#include "../tls/tls_test_util.h"
#include "conn/conn.h"
#include "finaldot/config.h"
#include "spool/spool.h"
#include "worker.h"

/* ---- stubs for what conn.c takes from worker.c and the spool ---- */

atomic_bool fd_paused;
struct fd_tls_server *fd_tls;
static uint64_t indoubt[8];
static unsigned nindoubt;
static unsigned fake_inflight;

void
fd_worker_indoubt(struct fd_worker *w, uint64_t msgid)
{
	(void)w;
	if (nindoubt < 8)
		indoubt[nindoubt++] = msgid;
}

unsigned
spool_inflight(const struct spool *sp)
{
	(void)sp;
	return fake_inflight;
}

/* ---- the fake transport ---- */

#define NFT 4
#define MS 1000ull /* us */
#define T0 1000000000ull

struct ft {
	struct conn conn;
	bool used;
	size_t cap;        /* octets send() takes a call; SIZE_MAX: all */
	bool async;        /* send() arms; the test completes it */
	const uint8_t *armed_p;
	size_t armed_n;
	unsigned sends;
	struct tbuf out;   /* every octet taken */
	struct tbuf held;  /* input the layer did not take */
	unsigned resumes;
	bool closed;
	enum conn_close_how how;
	char why[32];
	uint64_t acked;    /* what acked() reports */
	bool released;
};

static struct ft F[NFT];
static struct ft *close_order[NFT];
static unsigned nclosed;
static struct fd_config cfg;
static struct fd_worker w;
static struct fake_sink sink;
static struct conn_set cs;
static uint64_t now;

static struct ft *
ft_of(struct conn *c)
{
	return (struct ft *)(void *)((char *)c - offsetof(struct ft, conn));
}

static size_t
ft_send(struct conn *c, const uint8_t *p, size_t n, bool final)
{
	struct ft *t = ft_of(c);
	size_t k = n < t->cap ? n : t->cap;

	t->sends++;
	if (t->async && !final) {
		cr_assert_null(t->armed_p, "a second send while one is armed");
		t->armed_p = p;
		t->armed_n = n;
		return CONN_SEND_ARMED;
	}
	tbuf_put(&t->out, p, k);
	return k;
}

/* Offer what the transport holds (as sock.c's conn_offer does). */
static void
ft_offer(struct ft *t)
{
	size_t used;

	if (!t->held.len)
		return;
	used = conn_input(&t->conn, (const uint8_t *)t->held.p, t->held.len);
	if (t->closed)
		return;
	memmove(t->held.p, t->held.p + used, t->held.len - used);
	t->held.len -= used;
}

/* What the layer asked of the transport, in order: 'R' resume, 'P' push. */
static char trace[64];
static unsigned ntrace;
static unsigned pushes;

static void
trace_add(char e)
{
	if (ntrace + 1 < sizeof(trace))
		trace[ntrace++] = e;
}

static void
ft_resume(struct conn *c)
{
	struct ft *t = ft_of(c);

	trace_add('R');
	t->resumes++;
	ft_offer(t);
}

static int
ft_acked(struct conn *c, uint64_t sent, uint64_t *acked)
{
	(void)sent;
	*acked = ft_of(c)->acked;
	return 0;
}

static void
ft_close(struct conn *c, enum conn_close_how how, const char *why)
{
	struct ft *t = ft_of(c);

	cr_assert_not(t->closed, "closed twice");
	t->closed = true;
	t->how = how;
	snprintf(t->why, sizeof(t->why), "%s", why);
	t->held.len = 0;
	close_order[nclosed++] = t;
	if (!t->armed_p) {
		conn_release(c);
		t->released = true;
	}
}

/* Every 250 handed over so far, across the fake connections. */
static unsigned
queued_replies(void)
{
	unsigned n = 0;

	for (unsigned i = 0; i < NFT; i++)
		for (const char *p = F[i].out.p; p &&
		     (p = strstr(p, "250 2.0.0 Ok: queued")); p++)
			n++;
	return n;
}

static unsigned queued_at_push;

static void
ft_push(struct conn_set *set)
{
	cr_assert_eq(set, &cs);
	trace_add('P');
	pushes++;
	queued_at_push = queued_replies();
}

static const struct conn_ops ft_ops = {
	.send = ft_send,
	.resume = ft_resume,
	.push = ft_push,
	.acked = ft_acked,
	.close = ft_close,
};

/* Octets from the peer: what the layer did not take is held. */
static void
ft_input(struct ft *t, const char *s)
{
	size_t n = strlen(s), used;

	cr_assert_eq(t->held.len, 0, "input while the transport holds some");
	used = conn_input(&t->conn, (const uint8_t *)s, n);
	if (!t->closed && used < n)
		tbuf_put(&t->held, s + used, n - used);
}

/* The armed send completes with res. */
static void
ft_complete(struct ft *t, int res)
{
	cr_assert_not_null(t->armed_p);
	if (res > 0)
		tbuf_put(&t->out, t->armed_p, (size_t)res);
	t->armed_p = NULL;
	t->armed_n = 0;
	conn_send_done(&t->conn, res);
	if (t->closed && !t->released) {
		conn_release(&t->conn);
		t->released = true;
	}
}

static void
tick(uint64_t at_ms)
{
	now = T0 + at_ms * MS;
	conn_set_clock(&cs, now);
	conn_set_tick(&cs);
}

/* The spool's verdict, as worker.c delivers it. */
static bool
complete_commit(int status)
{
	struct fake_msg *m = sink.pending;

	if (!m)
		return false;
	sink.pending = NULL;
	smtp_session_commit_done(m->sctx, m->id, status);
	conn_wake(smtp_session_tctx(m->sctx));
	return true;
}

static struct ft *
ft_open(void)
{
	const char *reply;
	size_t len;

	for (unsigned i = 0; i < NFT; i++) {
		struct ft *t = &F[i];
		if (t->used)
			continue;
		tbuf_free(&t->out);
		tbuf_free(&t->held);
		memset(t, 0, sizeof(*t));
		t->cap = SIZE_MAX;
		cr_assert_eq(conn_open(&cs, &t->conn, "192.0.2.7", &reply,
				       &len), 0);
		t->used = true;
		return t;
	}
	cr_assert_fail("no free fake slot");
	return NULL;
}

static struct smtp_config sc;

static void
setup_with(bool starttls)
{
	memset(&cfg, 0, sizeof(cfg));
	cfg.idle_timeout_ms = 300000;
	cfg.shutdown_timeout_ms = 10000;
	cfg.tls_max_handshakes = 1;
	td_config(&sc);
	sc.max_sessions = NFT;
	sc.starttls = starttls;
	memset(&sink, 0, sizeof(sink));
	memset(&w, 0, sizeof(w));
	w.id = 3;
	w.cfg = &cfg;
	snprintf(w.paused_reply, sizeof(w.paused_reply),
		 "421 4.3.2 mx Service not available\r\n");
	w.paused_len = strlen(w.paused_reply);
	nindoubt = 0;
	nclosed = 0;
	ntrace = 0;
	memset(trace, 0, sizeof(trace));
	pushes = 0;
	queued_at_push = 0;
	fake_inflight = 0;
	atomic_store(&fd_paused, false);
	now = T0;
}

/* The server (after the test set cfg: greet_delay is read at create). */
static void
start(void)
{
	sc.greet_delay = cfg.greet_delay_ms > 0;
	w.smtp = smtp_server_create(&sc, &fs_ops, &sink);
	cr_assert_not_null(w.smtp);
	conn_set_init(&cs, &w, &ft_ops, now);
}

static void
setup(void)
{
	setup_with(false);
}

static void
teardown(void)
{
	for (unsigned i = 0; i < NFT; i++) {
		if (F[i].used && conn_is_open(&F[i].conn))
			conn_close(&F[i].conn, "teardown", CONN_CLOSE_ABORT);
		if (F[i].used && !F[i].released)
			conn_release(&F[i].conn);
		tbuf_free(&F[i].out);
		tbuf_free(&F[i].held);
		memset(&F[i], 0, sizeof(F[i]));
	}
	if (w.smtp)
		smtp_server_destroy(w.smtp);
	w.smtp = NULL;
	tbuf_free(&sink.log);
	tbuf_free(&sink.body);
}

TestSuite(conn, .init = setup, .fini = teardown, .timeout = 60);

static const char *
outp(struct ft *t)
{
	return t->out.p ? t->out.p : "";
}

/* ---- output ---- */

Test(conn, greeting_drains_through_short_sends)
{
	struct ft *t;

	start();
	t = ft_open();
	t->cap = 7;
	conn_set_service(&cs);
	/* 7 octets, then the transport had no room: nothing more is
	 * pushed until it says so. */
	cr_assert_eq(t->out.len, 7);
	cr_assert_eq(t->sends, 1, "sends %u", t->sends);
	conn_writable(&t->conn);
	cr_assert_eq(t->out.len, 14);
	t->cap = SIZE_MAX;
	conn_writable(&t->conn);
	cr_assert_str_eq(outp(t), "220 mx.example.com ESMTP finaldot\r\n");
}

Test(conn, pipelined_input_goes_on_once_the_replies_left)
{
	/* 1000 NOOPs in one read: their replies overflow the session's
	 * output buffer (4 KiB). A transport that takes replies at once
	 * calls nothing back, so the layer itself must offer the rest of
	 * the input as soon as the replies left (the DPDK pipelining
	 * hang). */
	static char in[1000 * 6 + 1];
	struct ft *t;

	start();
	t = ft_open();
	conn_set_service(&cs);
	for (unsigned i = 0; i < 1000; i++)
		memcpy(in + i * 6, "NOOP\r\n", 6);
	ft_input(t, in);
	cr_assert_eq(t->held.len, 0, "input left: %zu", t->held.len);
	cr_assert_eq(count_str(outp(t), "250 2.0.0 Ok\r\n"), 1000);
	cr_assert_eq(t->resumes, 0);
}

Test(conn, pipelined_replies_through_short_sends)
{
	static char in[1000 * 6 + 1];
	struct ft *t;
	size_t last = 0;

	start();
	t = ft_open();
	conn_set_service(&cs);
	for (unsigned i = 0; i < 1000; i++)
		memcpy(in + i * 6, "NOOP\r\n", 6);
	t->cap = 1000;
	ft_input(t, in);
	/* A short send stops the drain until the transport has room. */
	for (unsigned i = 0; i < 100 && (i == 0 || t->out.len != last); i++) {
		last = t->out.len;
		conn_writable(&t->conn);
	}
	cr_assert_eq(t->held.len, 0, "input left: %zu", t->held.len);
	cr_assert_eq(count_str(outp(t), "250 2.0.0 Ok\r\n"), 1000);
}

Test(conn, async_send_one_in_flight_and_partial_completion)
{
	struct ft *t;
	const char *greet = "220 mx.example.com ESMTP finaldot\r\n";

	start();
	t = ft_open();
	t->async = true;
	conn_set_service(&cs);
	cr_assert_eq(t->sends, 1);
	cr_assert_eq(t->armed_n, strlen(greet));
	/* Replies queue behind the send in flight: no second send. */
	ft_input(t, "NOOP\r\n");
	cr_assert_eq(t->sends, 1);
	/* 10 octets went: the rest of the greeting and the 250 next. */
	ft_complete(t, 10);
	cr_assert_eq(t->sends, 2);
	ft_complete(t, (int)t->armed_n);
	cr_assert_null(t->armed_p);
	cr_assert_str_eq(outp(t), "220 mx.example.com ESMTP finaldot\r\n"
				  "250 2.0.0 Ok\r\n");
	/* A failed send ends the connection now. */
	ft_input(t, "NOOP\r\n");
	ft_complete(t, -ECONNRESET);
	cr_assert(t->closed);
	cr_assert_eq(t->how, CONN_CLOSE_ABORT);
	cr_assert_str_eq(t->why, "send_error");
}

/* ---- held input ---- */

Test(conn, held_input_offered_again_after_the_verdict)
{
	struct ft *t;

	start();
	t = ft_open();
	conn_set_service(&cs);
	ft_input(t, "EHLO c.test\r\nMAIL FROM:<a@c.test>\r\n"
		    "RCPT TO:<u@example.com>\r\nDATA\r\n"
		    "Subject: x\r\n\r\nbody\r\n.\r\n"
		    "MAIL FROM:<b@c.test>\r\nQUIT\r\n");
	/* The commit is in flight: replies stay in order (RFC 2920), the
	 * rest waits with the transport. */
	cr_assert_not_null(sink.pending);
	cr_assert_str_eq(t->held.p, "MAIL FROM:<b@c.test>\r\nQUIT\r\n");
	cr_assert_eq(t->resumes, 0);
	conn_set_service(&cs);
	cr_assert_eq(t->resumes, 0, "nothing woke it: not offered");
	cr_assert(complete_commit(0));
	conn_set_service(&cs);
	cr_assert_eq(t->resumes, 1);
	cr_assert_eq(t->held.len, 0);
	const char *q = strstr(outp(t), "250 2.0.0 Ok: queued as");
	const char *m = strstr(outp(t), "250 2.1.0");
	cr_assert_not_null(q);
	cr_assert(m && strstr(q, "250 2.1.0"), "MAIL's reply after the 250");
	cr_assert(strstr(q, "221 2.0.0"));
	cr_assert(t->closed, "QUIT: closed once the 221 left");
	cr_assert_eq(t->how, CONN_CLOSE_FIN);
	cr_assert_eq(nindoubt, 0, "QUIT: the client read its replies");
}

/*
 * RFC 1047's gap: one group commit wakes two sessions whose clients
 * pipelined their next message behind the dot. Both 250s are handed over
 * and pushed before either session is offered its held input: a 250 does
 * not wait while another session parses a message.
 */
Test(conn, woken_250s_leave_before_any_held_input_is_parsed)
{
	static const char *const tx =
		"EHLO c.test\r\nMAIL FROM:<a@c.test>\r\n"
		"RCPT TO:<u@example.com>\r\nDATA\r\n"
		"Subject: x\r\n\r\nbody\r\n.\r\n"
		"MAIL FROM:<b@c.test>\r\nRCPT TO:<u@example.com>\r\n";
	struct fake_msg *m[2];
	struct ft *t[2];

	start();
	for (unsigned i = 0; i < 2; i++) {
		t[i] = ft_open();
		conn_set_service(&cs);
		ft_input(t[i], tx);
		m[i] = sink.pending;
		cr_assert_not_null(m[i], "session %u committed", i);
		sink.pending = NULL; /* the fake sink keeps one */
		cr_assert(t[i]->held.len > 0, "its next message waits");
	}
	ntrace = 0;
	pushes = 0;
	for (unsigned i = 0; i < 2; i++) {
		smtp_session_commit_done(m[i]->sctx, m[i]->id, 0);
		conn_wake(smtp_session_tctx(m[i]->sctx));
	}
	conn_set_service(&cs);
	cr_assert_eq(pushes, 1, "one push per service");
	cr_assert_eq(queued_at_push, 2, "both 250s out at the push (%u)",
		     queued_at_push);
	cr_assert_eq(trace[0], 'P', "the push before any resume: %s", trace);
	for (unsigned i = 0; i < 2; i++) {
		cr_assert_eq(t[i]->resumes, 1, "held input offered once");
		cr_assert_eq(t[i]->held.len, 0);
		cr_assert(strstr(outp(t[i]), "250 2.1.0"),
			  "the pipelined MAIL answered after the push");
	}
}

Test(conn, spool_room_offers_held_input_again)
{
	struct ft *t;

	start();
	sink.room_cap = 8;
	sink.room_left = 8;
	t = ft_open();
	conn_set_service(&cs);
	ft_input(t, "EHLO c.test\r\nMAIL FROM:<a@c.test>\r\n"
		    "RCPT TO:<u@example.com>\r\nDATA\r\n"
		    "0123456789abcdef0123456789\r\n.\r\n");
	cr_assert(t->held.len > 0, "room for 8 octets only");
	conn_set_room(&cs);
	conn_set_service(&cs);
	cr_assert_eq(t->resumes, 1, "offered again, room or not");
	sink.room_cap = 0; /* unlimited from now on */
	conn_set_room(&cs);
	conn_set_service(&cs);
	cr_assert_eq(t->held.len, 0);
	cr_assert_not_null(sink.pending, "the message was committed");
}

/* ---- timers ---- */

Test(conn, greeting_and_idle_timers_fire_in_due_order)
{
	struct ft *a, *b;

	cfg.greet_delay_ms = 100;
	cfg.idle_timeout_ms = 300;
	start();
	a = ft_open(); /* t = 0 */
	conn_set_service(&cs);
	cr_assert_eq(a->out.len, 0, "greeting delayed");
	tick(50);
	b = ft_open();
	tick(99);
	cr_assert_eq(a->out.len, 0);
	tick(100);
	cr_assert_str_eq(outp(a), "220 mx.example.com ESMTP finaldot\r\n");
	cr_assert_eq(b->out.len, 0);
	tick(150);
	cr_assert_str_eq(outp(b), "220 mx.example.com ESMTP finaldot\r\n");
	/* Input moves a to the tail: b (due 350) times out first. */
	tick(200);
	ft_input(a, "NOOP\r\n");
	tick(349);
	cr_assert_eq(nclosed, 0);
	tick(350);
	cr_assert_eq(nclosed, 1);
	cr_assert_eq(close_order[0], b);
	cr_assert(strstr(outp(b), "421 4.4.2"));
	cr_assert_not(a->closed);
	tick(499);
	cr_assert_not(a->closed);
	tick(500);
	cr_assert(a->closed);
	cr_assert(strstr(outp(a), "421 4.4.2"));
}

/*
 * A reload's idle timeout and greeting delay (the worker took the policy:
 * w.policy_seen) apply to the connections open now, counted from their
 * last input or their open, and to the ones that come later; the engine
 * and the timer agree on whether a new session waits for its greeting.
 */
Test(conn, reload_retimes_idle_and_greeting)
{
	static struct fd_policy pol;
	struct ft *a, *b, *c;

	cfg.greet_delay_ms = 0;
	cfg.idle_timeout_ms = 10000;
	start();
	a = ft_open(); /* t = 0 */
	conn_set_service(&cs);
	cr_assert_str_eq(outp(a), "220 mx.example.com ESMTP finaldot\r\n");
	tick(100);
	b = ft_open();
	conn_set_service(&cs);
	tick(200);
	ft_input(b, "NOOP\r\n"); /* b's idle time runs from 200 */

	memset(&pol, 0, sizeof(pol));
	pol.idle_timeout_ms = 1000;
	pol.greet_delay_ms = 300;
	/* What fd_worker_poll() does on the worker's thread. */
	smtp_server_set_policy(w.smtp, NULL, 0, 1 << 20, 10, 10, 300000,
			       600000, true);
	w.policy_seen = &pol;

	tick(999);
	cr_assert_eq(nclosed, 0, "a's idle time ends at 1000, not 10000");
	tick(1000);
	cr_assert(a->closed && strstr(outp(a), "421 4.4.2"), "%s", outp(a));
	cr_assert_not(b->closed);
	c = ft_open(); /* t = 1000, with the delay */
	conn_set_service(&cs);
	cr_assert_eq(c->out.len, 0, "the new delay holds the greeting");
	tick(1199);
	cr_assert_not(b->closed);
	tick(1200);
	cr_assert(b->closed, "1000 ms after its last input");
	tick(1299);
	cr_assert_eq(c->out.len, 0);
	tick(1300);
	cr_assert_str_eq(outp(c), "220 mx.example.com ESMTP finaldot\r\n");
}

/* Input again on the connection with the latest input (the idle list's
 * tail), alone or behind another: its timer stays on the list and fires. */
Test(conn, idle_timer_rearmed_at_the_tail_still_fires)
{
	struct ft *a, *b;

	cfg.idle_timeout_ms = 300;
	start();
	a = ft_open(); /* t = 0 */
	conn_set_service(&cs);
	tick(10);
	ft_input(a, "NOOP\r\n");
	tick(20);
	ft_input(a, "NOOP\r\n"); /* alone on the list, its tail */
	tick(319);
	cr_assert_not(a->closed);
	tick(320);
	cr_assert(a->closed, "idle 300 ms after its last input");
	cr_assert(strstr(outp(a), "421 4.4.2"));

	b = ft_open(); /* t = 320 */
	a = ft_open();
	conn_set_service(&cs);
	tick(330);
	ft_input(a, "NOOP\r\n"); /* a is the tail, b before it */
	tick(340);
	ft_input(a, "NOOP\r\n");
	tick(620);
	cr_assert(b->closed);
	cr_assert_not(a->closed);
	tick(640);
	cr_assert(a->closed, "a's timer survived being re-armed at the tail");
}

Test(conn, timers_due_together_fire_oldest_first)
{
	struct ft *a, *b, *c;

	cfg.idle_timeout_ms = 300;
	start();
	a = ft_open();
	tick(10);
	b = ft_open();
	tick(20);
	c = ft_open();
	tick(30);
	ft_input(a, "NOOP\r\n"); /* a: due 330, after b and c */
	tick(1000);
	cr_assert_eq(nclosed, 3);
	cr_assert_eq(close_order[0], b);
	cr_assert_eq(close_order[1], c);
	cr_assert_eq(close_order[2], a);
}

Test(conn, early_talker_before_the_delayed_greeting)
{
	struct ft *t;

	cfg.greet_delay_ms = 100;
	start();
	t = ft_open();
	tick(10);
	ft_input(t, "EHLO c.test\r\n");
	cr_assert(strstr(outp(t), "554 "), "out: %s", outp(t));
	cr_assert(t->closed);
	tick(200); /* its greeting timer went with it */
	cr_assert_null(strstr(outp(t), "220 "));
}

/* ---- refusals, in-doubt ---- */

Test(conn, paused_and_busy_refusals)
{
	const char *reply;
	size_t len;

	start();
	atomic_store(&fd_paused, true);
	cr_assert_eq(conn_open(&cs, &F[0].conn, "192.0.2.1", &reply, &len),
		     -EAGAIN);
	cr_assert_str_eq(reply, w.paused_reply);
	cr_assert_eq(w.paused_refused, 1);
	atomic_store(&fd_paused, false);
	cr_assert_eq(conn_open(&cs, NULL, "192.0.2.1", &reply, &len), -EBUSY);
	cr_assert(len > 10 && !strncmp(reply, "421 4.7.0 ", 10));
	cr_assert_eq(w.sessions_refused, 1);
	cr_assert_eq(conn_set_open_count(&cs), 0);
}

Test(conn, reply_not_acknowledged_is_in_doubt)
{
	struct ft *t;

	start();
	t = ft_open();
	conn_set_service(&cs);
	ft_input(t, "EHLO c.test\r\nMAIL FROM:<a@c.test>\r\n"
		    "RCPT TO:<u@example.com>\r\nDATA\r\n"
		    "Subject: x\r\n\r\nbody\r\n.\r\n");
	cr_assert(complete_commit(0));
	conn_set_service(&cs);
	cr_assert(strstr(outp(t), "250 2.0.0 Ok: queued"));
	/* The client's TCP acknowledged all but the last octet. */
	t->acked = t->out.len - 1;
	conn_eof(&t->conn);
	cr_assert(t->closed);
	cr_assert_str_eq(t->why, "peer_closed");
	cr_assert_eq(nindoubt, 1);
	cr_assert_eq(indoubt[0], sink.next_id);
}

/* ---- shutdown ---- */

Test(conn, stop_force_point_and_deadline)
{
	struct ft *idle, *commit, *stuck;

	cfg.shutdown_timeout_ms = 4000; /* force at 3 s, deadline at 4 s */
	start();
	idle = ft_open();
	commit = ft_open();
	stuck = ft_open();
	conn_set_service(&cs);
	ft_input(commit, "EHLO c.test\r\nMAIL FROM:<a@c.test>\r\n"
			 "RCPT TO:<u@example.com>\r\nDATA\r\n"
			 "Subject: x\r\n\r\nbody\r\n.\r\n");
	cr_assert_not_null(sink.pending);
	stuck->cap = 0; /* never reads: its 421 cannot leave */
	fake_inflight = 1;
	conn_set_begin_stop(&cs);
	conn_set_service(&cs);
	cr_assert(idle->closed);
	cr_assert(strstr(outp(idle), "421 4.3.2"));
	cr_assert_not(commit->closed, "a commit in flight gets its verdict");
	cr_assert_not(conn_set_done(&cs, true));
	tick(2999);
	cr_assert_not(commit->closed);
	tick(3000);
	cr_assert(commit->closed, "the force point: 421 now");
	cr_assert(strstr(outp(commit), "421 4.3.2"));
	cr_assert_null(strstr(outp(commit), "250 2.0.0 Ok: queued"));
	cr_assert_eq(sink.detaches, 1);
	cr_assert_not(stuck->closed);
	cr_assert_not(conn_set_done(&cs, true), "the spool is not done");
	tick(3999);
	cr_assert_not(conn_set_done(&cs, true));
	tick(4000);
	cr_assert(conn_set_past_deadline(&cs));
	cr_assert(conn_set_done(&cs, false), "the deadline ends it");
	conn_set_close_all(&cs);
	cr_assert(stuck->closed);
	cr_assert_eq(stuck->how, CONN_CLOSE_ABORT);
	cr_assert_eq(conn_set_open_count(&cs), 0);
	/* No new sessions while stopping. */
	const char *reply;
	size_t len;
	cr_assert_eq(conn_open(&cs, &F[3].conn, "192.0.2.1", &reply, &len),
		     -EBUSY);
}

Test(conn, stop_done_when_sessions_and_spool_are)
{
	struct ft *t;

	start();
	t = ft_open();
	conn_set_service(&cs);
	fake_inflight = 1;
	conn_set_begin_stop(&cs);
	conn_set_service(&cs);
	cr_assert(t->closed);
	cr_assert_not(conn_set_done(&cs, true), "spool writes in flight");
	fake_inflight = 0;
	cr_assert_not(conn_set_done(&cs, false), "the transport is not");
	cr_assert(conn_set_done(&cs, true));
}

/* ---- STARTTLS ---- */

static struct tt_dir tdir;
static struct tt_pair tpair;
static struct tt_client cl;

static void
tls_setup(void)
{
	struct fd_tls_opts o;
	struct tt_pair *pp[1] = {&tpair};
	char err[300];

	setup_with(true);
	memset(&cl, 0, sizeof(cl));
	if (tt_dir_make(&tdir) != 0)
		cr_skip_test("no temp dir for the certificates");
	if (tt_pair_make(&tpair, &tdir, "mx", TT_EC, "mx.example.com", -TT_DAY,
			 TT_DAY) != 0)
		cr_skip_test("cannot make an EC key and certificate");
	tt_opts(&o, pp, 1);
	cr_assert_eq(fd_tls_server_new(&o, &fd_tls, err, sizeof(err)), 0,
		     "%s", err);
}

static void
tls_teardown(void)
{
	teardown();
	tt_client_free(&cl);
	fd_tls_server_free(fd_tls);
	fd_tls = NULL;
	tt_pair_free(&tpair);
	tt_dir_remove(&tdir);
}

/* Move ciphertext both ways until nothing moves. from: where the
 * server's TLS octets start in t->out. */
static void
tls_pump(struct ft *t, size_t *from)
{
	for (unsigned i = 0; i < 100000; i++) {
		bool moved = false;
		char *q;
		int k;

		if (t->out.len > *from) {
			int wr = BIO_write(cl.net, t->out.p + *from,
					   (int)(t->out.len - *from));
			if (wr > 0) {
				*from += (size_t)wr;
				moved = true;
			}
		}
		tt_client_run(&cl);
		while ((k = BIO_nread0(cl.net, &q)) > 0) {
			char buf[20000];
			cr_assert_lt((size_t)k, sizeof(buf));
			memcpy(buf, q, (size_t)k);
			buf[k] = '\0';
			BIO_nread(cl.net, &q, k);
			if (t->held.len) {
				tbuf_put(&t->held, buf, (size_t)k);
				ft_offer(t);
			} else {
				size_t used = conn_input(
					&t->conn, (uint8_t *)buf, (size_t)k);
				if (used < (size_t)k)
					tbuf_put(&t->held, buf + used,
						 (size_t)k - used);
			}
			moved = true;
		}
		conn_set_service(&cs);
		/* The peer read: a transport with a cap has room again. */
		if (conn_is_open(&t->conn)) {
			size_t out0 = t->out.len;
			conn_writable(&t->conn);
			moved |= t->out.len != out0;
		}
		if (!moved)
			return;
	}
}

Test(conn, starttls_switch_holds_the_handshake_until_the_220_left,
     .init = tls_setup, .fini = tls_teardown)
{
	struct ft *t;
	const char *ready = "220 2.0.0 Ready to start TLS\r\n";
	char *q;
	int k;
	size_t from;

	start();
	t = ft_open();
	conn_set_service(&cs);
	t->cap = 0; /* the transport is full: the 220 cannot leave */
	ft_input(t, "EHLO c.test\r\nSTARTTLS\r\n");
	cr_assert_not(conn_tls_started(&t->conn));
	cr_assert_eq(tt_client_new(&cl, NULL), 0);
	tt_client_run(&cl); /* the ClientHello */
	k = BIO_nread0(cl.net, &q);
	cr_assert_gt(k, 0);
	{
		char hello[4096];
		cr_assert_lt((size_t)k, sizeof(hello));
		memcpy(hello, q, (size_t)k);
		BIO_nread(cl.net, &q, k);
		/* It arrives before the 220 has left: held, never offered
		 * to the session (which would discard it). */
		cr_assert_eq(conn_input(&t->conn, (uint8_t *)hello,
					(size_t)k), 0);
		tbuf_put(&t->held, hello, (size_t)k);
	}
	cr_assert_eq(smtp_server_stats(w.smtp)->tls_injected, 0);
	cr_assert_eq(t->resumes, 0);
	conn_wake(&t->conn);
	conn_set_service(&cs);
	cr_assert_eq(t->resumes, 0, "not offered while the 220 waits");
	cr_assert_eq(t->held.len, (size_t)k);
	/* Room: the 220 leaves, TLS starts, the ClientHello goes to it. */
	t->cap = SIZE_MAX;
	conn_writable(&t->conn);
	cr_assert(conn_tls_started(&t->conn));
	cr_assert_eq(t->resumes, 1);
	cr_assert_eq(t->held.len, 0);
	q = strstr(t->out.p, ready);
	cr_assert_not_null(q);
	from = (size_t)(q - t->out.p) + strlen(ready);
	cr_assert_gt(t->out.len, from, "the ServerHello follows the 220");
	tls_pump(t, &from);
	cr_assert(cl.done, "handshake");
	cr_assert_eq(smtp_server_stats(w.smtp)->tls_injected, 0);
	tt_sends(&cl, "EHLO c.test\r\n");
	tls_pump(t, &from);
	cr_assert(cl.got.p && strstr(cl.got.p, "250-mx.example.com"),
		  "EHLO over TLS: %s", cl.got.p ? cl.got.p : "(nothing)");
	cr_assert_null(strstr(cl.got.p, "STARTTLS"), "not offered again");
	tt_sends(&cl, "QUIT\r\n");
	tls_pump(t, &from);
	cr_assert(t->closed);
	cr_assert_str_eq(t->why, "done");
	cr_assert_eq(w.tls_failed, 0);
}

Test(conn, handshake_waits_for_a_slot_and_its_deadline, .init = tls_setup,
     .fini = tls_teardown)
{
	struct ft *a, *b;

	start();
	a = ft_open();
	b = ft_open();
	conn_set_service(&cs);
	ft_input(a, "EHLO c.test\r\nSTARTTLS\r\n");
	ft_input(b, "EHLO c.test\r\nSTARTTLS\r\n");
	cr_assert(conn_tls_started(&a->conn));
	cr_assert(conn_tls_started(&b->conn));
	/* One slot (tls_max_handshakes 1): a runs, b waits in line. */
	cr_assert_eq(cs.handshakes, 1);
	cr_assert_not_null(cs.hswait.head);
	/* The deadline (the server's default, 30 s) ends both: a's pump
	 * fails it, b is closed for having waited. */
	tick(31000);
	cr_assert(a->closed);
	cr_assert(b->closed);
	cr_assert_str_eq(b->why, "tls_timeout");
	cr_assert_eq(w.tls_failed, 2);
	cr_assert_eq(cs.handshakes, 0);
}

/* A session taken through STARTTLS and the handshake; *from: where the
 * server's ciphertext starts in t->out. */
static struct ft *
tls_session(size_t *from)
{
	const char *ready = "220 2.0.0 Ready to start TLS\r\n";
	struct ft *t;
	const char *q;

	start();
	t = ft_open();
	conn_set_service(&cs);
	ft_input(t, "EHLO c.test\r\nSTARTTLS\r\n");
	cr_assert(conn_tls_started(&t->conn));
	q = strstr(outp(t), ready);
	cr_assert_not_null(q);
	*from = (size_t)(q - t->out.p) + strlen(ready);
	cr_assert_eq(tt_client_new(&cl, NULL), 0);
	tls_pump(t, from);
	cr_assert(cl.done, "handshake");
	return t;
}

Test(conn, tls_every_reply_before_close_notify, .init = tls_setup,
     .fini = tls_teardown)
{
	/* 700 replies and the 221: more than TLS's ring out holds. The
	 * transport is full while the session reads them all, so it is done
	 * (QUIT) with replies still waiting to be encrypted behind a full
	 * ring. Then room comes at once: the ring empties in one send, and
	 * the connection must not close before the rest and the
	 * close_notify behind them have left. */
	static char in[8 + 700 * 6 + 7];
	size_t from, len = 0;
	struct ft *t = tls_session(&from);

	memcpy(in, "EHLO c\r\n", 8);
	len = 8;
	for (unsigned i = 0; i < 700; i++, len += 6)
		memcpy(in + len, "NOOP\r\n", 6);
	memcpy(in + len, "QUIT\r\n", 7);
	t->cap = 0;
	tt_sends(&cl, in);
	tls_pump(t, &from);
	cr_assert_not(t->closed);
	cr_assert(smtp_session_want_close(t->conn.s), "QUIT was read");
	t->cap = SIZE_MAX;
	tls_pump(t, &from);
	cr_assert(t->closed);
	cr_assert_str_eq(t->why, "done");
	cr_assert_eq(count_str(cl.got.p, "250 2.0.0 Ok\r\n"), 700);
	cr_assert(strstr(cl.got.p, "221 2.0.0"), "the 221 arrived");
	cr_assert(cl.closed, "close_notify after the 221");
}
