/*
 * The TLS layer (tls/tls.h) between a real OpenSSL client and the real
 * SMTP engine, all in memory (tls_test_util.h): the handshake and a
 * transaction through it, which certificate a client gets (key type, SNI),
 * ticket resumption and key rotation, what fd_tls_server_new() refuses,
 * reload, the handshake deadline, garbage, flow control, the ciphertext
 * offsets of RFC 1047's ack points, close_notify both ways, and a
 * thousand handshakes cut short.
 *
 * The ticket keys rotate on the wall clock (CLOCK_REALTIME): this binary
 * is linked with --wrap=clock_gettime so that a test can move that clock
 * for the code under test (OpenSSL's own clock is left alone).
 */
#include <criterion/criterion.h>
#include <criterion/logging.h>
#include <time.h>

#include "../smtp/smtp_test_lsan.h"
#include "tls_test_util.h"

/* ---- the wall clock seen by tls.c ---- */

static long wall_shift_s;
static unsigned wall_reads;

int __real_clock_gettime(clockid_t id, struct timespec *ts);
int __wrap_clock_gettime(clockid_t id, struct timespec *ts);

int
__wrap_clock_gettime(clockid_t id, struct timespec *ts)
{
	int r = __real_clock_gettime(id, ts);

	if (r == 0 && id == CLOCK_REALTIME) {
		ts->tv_sec += wall_shift_s;
		wall_reads++;
	}
	return r;
}

/* ---- fixtures ---- */

#define NOW 1000000ull /* the transport's monotonic clock, us */
#define NCONN 8

struct conn {
	struct td t;
	struct tt_client cl;
	struct tt_link l;
	bool open;
};

static struct tt_dir dir;
static struct fd_tls_server *srv, *srv2;
static struct conn K[NCONN];
static struct tt_pair made[16]; /* freed by teardown() */
static unsigned nmade;

#define PAIRS(...) ((struct tt_pair *[]){__VA_ARGS__})

static void
setup(void)
{
	wall_shift_s = 0;
	if (tt_dir_make(&dir) != 0)
		cr_skip_test("no temp dir for the certificates");
}

static void
conn_end(struct conn *k)
{
	if (!k->open)
		return;
	tt_link_free(&k->l);
	td_close(&k->t);
	tt_client_free(&k->cl);
	k->open = false;
}

/* Free everything the test made (also after a failed assertion). */
static void
cleanup(void)
{
	for (unsigned i = 0; i < NCONN; i++)
		conn_end(&K[i]);
	fd_tls_server_free(srv);
	fd_tls_server_free(srv2);
	srv = srv2 = NULL;
	while (nmade)
		tt_pair_free(&made[--nmade]);
	tt_dir_remove(&dir);
}

TestSuite(tls, .init = setup, .fini = cleanup, .timeout = 120);

/*
 * Each test ends by freeing everything and asking LeakSanitizer (in the
 * ASan build): Criterion 2.4 ignores a failed assertion, even an abort,
 * in a suite's .fini, so the check must run in the test's body.
 */
#define TLS_TEST(name)                                                         \
	static void name##_body(void);                                         \
	Test(tls, name)                                                        \
	{                                                                      \
		name##_body();                                                 \
		cleanup();                                                     \
		lsan_fini();                                                   \
	}                                                                      \
	static void name##_body(void)

static const char *
ossl_err(void)
{
	static char buf[256];
	unsigned long e = ERR_peek_last_error();

	if (!e)
		return "no OpenSSL error";
	ERR_error_string_n(e, buf, sizeof(buf));
	return buf;
}

/* A pair valid from from_s to to_s (relative to now), in DIR/FILE.crt
 * and .key. */
static struct tt_pair *
pair_dated(const char *file, enum tt_kind kind, const char *name, long from_s,
	   long to_s)
{
	struct tt_pair *p = &made[nmade];

	cr_assert_lt(nmade, sizeof(made) / sizeof(made[0]));
	if (tt_pair_make(p, &dir, file, kind, name, from_s, to_s) != 0)
		cr_skip_test("cannot make a %s key and certificate: %s",
			     kind == TT_RSA ? "RSA-2048" : "EC P-256",
			     ossl_err());
	nmade++;
	return p;
}

static struct tt_pair *
pair(const char *file, enum tt_kind kind, const char *name)
{
	return pair_dated(file, kind, name, -TT_DAY, 30 * TT_DAY);
}

static struct fd_tls_server *
server(struct tt_pair *const *pairs, unsigned n)
{
	struct fd_tls_opts o;
	struct fd_tls_server *t = NULL;
	char err[512] = "";

	tt_opts(&o, pairs, n);
	cr_assert_eq(fd_tls_server_new(&o, &t, err, sizeof(err)), 0, "%s",
		     err);
	return t;
}

/* Session to the 220 to STARTTLS, a client, the link: TLS not yet run. */
static void
conn_start_on(struct conn *k, struct fd_tls_server *s,
	      const struct tt_client_opts *o)
{
	struct smtp_config cfg;

	tt_config(&cfg);
	cr_assert(tt_session_to_starttls(&k->t, &cfg));
	k->open = true;
	cr_assert_eq(tt_client_new(&k->cl, o), 0, "client: %s", ossl_err());
	cr_assert_eq(tt_link_init(&k->l, &k->t, s, &k->cl, NOW), 0);
}

/* ... and the handshake, which must complete. */
static void
conn_up_on(struct conn *k, struct fd_tls_server *s,
	   const struct tt_client_opts *o)
{
	conn_start_on(k, s, o);
	cr_assert(tt_run(&k->l));
	cr_assert(k->cl.done && !k->cl.failed, "client: error %d",
		  k->cl.last_error);
	cr_assert_eq(k->l.st, FD_TLS_OK, "server: %s",
		     fd_tls_conn_error(k->l.c));
	cr_assert(fd_tls_conn_established(k->l.c));
	cr_assert(smtp_session_tls_active(k->t.s));
}

static void
conn_up(struct conn *k, const struct tt_client_opts *o)
{
	conn_up_on(k, srv, o);
}

/* Send s through TLS, run until quiet, return the replies it brought. */
static const char *
say(struct conn *k, const char *s)
{
	static char buf[1 << 17];
	size_t from = k->cl.got.len, n;

	tt_sends(&k->cl, s);
	cr_assert(tt_run(&k->l), "the link never settled");
	n = k->cl.got.len - from;
	cr_assert_lt(n, sizeof(buf));
	memcpy(buf, k->cl.got.p ? k->cl.got.p + from : "", n);
	buf[n] = '\0';
	return buf;
}

static bool
peer_is(struct conn *k, const struct tt_pair *p)
{
	X509 *x = SSL_get0_peer_certificate(k->cl.ssl);

	return x && X509_cmp(x, p->x) == 0;
}

static struct fd_tls_stats
stats(const struct fd_tls_server *s)
{
	struct fd_tls_stats st;

	fd_tls_server_stats(s, &st);
	return st;
}

static uint32_t
rnd(uint32_t *st)
{
	*st ^= *st << 13;
	*st ^= *st >> 17;
	*st ^= *st << 5;
	return *st;
}

#define HELLO "EHLO client.example.net\r\n"
#define MAIL "MAIL FROM:<alice@example.net>\r\n"
#define RCPT "RCPT TO:<bob@example.com>\r\n"

/* ---- 1. handshake and a transaction ---- */

static void
transaction(int max_version, const char *using)
{
	struct tt_pair *ec;
	struct tt_client_opts o = {.max_version = max_version};
	struct fd_tls_stats st;
	const char *r;

	ec = pair("ec", TT_EC, "mx.example.com");
	srv = server(PAIRS(ec), 1);
	conn_up(&K[0], &o);
	/* In the clear: STARTTLS offered, then the 220. */
	cr_assert(strstr(K[0].t.out.p, "250-STARTTLS\r\n"));
	cr_assert(strstr(K[0].t.out.p, "220 2.0.0 Ready to start TLS\r\n"));
	cr_assert_eq(K[0].l.wire_base, K[0].t.out.len);

	r = say(&K[0], HELLO);
	cr_assert(strncmp(r, "250-mx.example.com\r\n", 20) == 0, "%s", r);
	cr_assert_null(strstr(r, "STARTTLS"), "not offered inside TLS: %s", r);
	r = say(&K[0], MAIL RCPT "DATA\r\n");
	cr_assert_str_eq(r, "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
			    "354 End data with <CR><LF>.<CR><LF>\r\n");
	r = say(&K[0], "Subject: through TLS\r\n\r\nhello\r\n.\r\n");
	cr_assert_str_eq(r, "250 2.0.0 Ok: queued as 0000000000000001\r\n");
	cr_assert_str_eq(K[0].t.fs.proto, "ESMTPS");
	cr_assert(strstr(K[0].t.fs.body.p, " with ESMTPS id "), "%s",
		  K[0].t.fs.body.p);
	cr_assert(strstr(K[0].t.fs.body.p, using), "%s", K[0].t.fs.body.p);
	cr_assert(strstr(K[0].t.fs.body.p,
			 "+0000\r\nSubject: through TLS\r\n\r\nhello\r\n"),
		  "%s", K[0].t.fs.body.p);
	r = say(&K[0], "QUIT\r\n");
	cr_assert(strncmp(r, "221 ", 4) == 0, "%s", r);
	cr_assert(smtp_session_want_close(K[0].t.s));
	cr_assert_eq(K[0].t.fs.violations, 0);

	st = stats(srv);
	cr_assert_eq(st.handshakes, 1);
	cr_assert_eq(st.resumed, 0);
	cr_assert_eq(st.failed, 0);
	cr_assert_eq(smtp_server_stats(K[0].t.srv)->tls_established, 1);
	cr_assert_eq(fd_tls_conn_deadline_us(K[0].l.c), 0);
	cr_assert_str_eq(fd_tls_conn_error(K[0].l.c), "");
}

TLS_TEST(handshake_then_transaction_tls13)
{
	transaction(0, "\t(using TLSv1.3 with cipher ");
}

TLS_TEST(handshake_then_transaction_tls12)
{
	transaction(TLS1_2_VERSION, "\t(using TLSv1.2 with cipher ");
}

/* ---- 2. ECDSA and RSA for one name ---- */

TLS_TEST(ecdsa_and_rsa_pairs_client_offer_chooses)
{
	struct tt_pair *ec, *rsa;
	struct tt_client_opts want_rsa = {
		.sigalgs = "RSA-PSS+SHA256:RSA+SHA256"};
	struct tt_client_opts want_ec = {.sigalgs = "ECDSA+SHA256"};
	struct tt_client_opts want_rsa12 = {
		.sigalgs = "RSA+SHA256", .max_version = TLS1_2_VERSION};

	ec = pair("ec", TT_EC, "mx.example.com");
	rsa = pair("rsa", TT_RSA, "mx.example.com");
	srv = server(PAIRS(ec, rsa), 2);
	conn_up(&K[0], &want_rsa);
	cr_assert(peer_is(&K[0], rsa), "RSA-only client got the RSA cert");
	conn_up(&K[1], &want_ec);
	cr_assert(peer_is(&K[1], ec), "ECDSA-only client got the EC cert");
	conn_up(&K[2], NULL);
	cr_assert(peer_is(&K[2], ec) || peer_is(&K[2], rsa));
	conn_up(&K[3], &want_rsa12);
	cr_assert(peer_is(&K[3], rsa), "TLS 1.2, RSA only");
	cr_assert(strncmp(say(&K[0], HELLO), "250-", 4) == 0);
	cr_assert(strncmp(say(&K[1], HELLO), "250-", 4) == 0);
	cr_assert_eq(stats(srv).handshakes, 4);
}

/* ---- 3. SNI ---- */

TLS_TEST(sni_picks_the_pair_default_is_first)
{
	struct tt_pair *one, *two;
	struct tt_client_opts to_two = {.sni = "mx2.example.com"};
	struct tt_client_opts to_two_upper = {.sni = "MX2.Example.COM"};
	struct tt_client_opts to_one = {.sni = "mx1.example.com"};
	struct tt_client_opts unknown = {.sni = "other.example.org"};

	one = pair("one", TT_EC, "mx1.example.com");
	two = pair("two", TT_EC, "mx2.example.com");
	srv = server(PAIRS(one, two), 2);
	conn_up(&K[0], &to_two);
	cr_assert(peer_is(&K[0], two), "SNI mx2 gets cert 2");
	conn_up(&K[1], NULL);
	cr_assert(peer_is(&K[1], one), "no SNI: the default");
	conn_up(&K[2], &unknown);
	cr_assert(peer_is(&K[2], one), "unknown name: the default");
	conn_up(&K[3], &to_one);
	cr_assert(peer_is(&K[3], one));
	conn_up(&K[4], &to_two_upper);
	cr_assert(peer_is(&K[4], two), "DNS names compare without case");
	/* The connection switched to cert 2's context works. */
	cr_assert(strncmp(say(&K[0], HELLO), "250-mx.example.com", 18) == 0);
	/* Its ticket resumes under that name only (RFC 6066 3). */
	cr_assert_not_null(K[0].cl.ticket);
	conn_end(&K[1]);
	conn_end(&K[2]);
	to_two.resume = K[0].cl.ticket;
	conn_up(&K[1], &to_two);
	cr_assert_eq(SSL_session_reused(K[1].cl.ssl), 1, "same name");
	cr_assert(peer_is(&K[1], two));
	conn_up(&K[2], &(struct tt_client_opts){.resume = K[0].cl.ticket});
	cr_assert_eq(SSL_session_reused(K[2].cl.ssl), 0, "another name");
	cr_assert(peer_is(&K[2], one));
}

/* ---- 4. tickets ---- */

static SSL_SESSION *
ticket_of(struct conn *k)
{
	/* TLS 1.3 sends the ticket after the handshake: the EHLO round
	 * trip makes sure the client has read it. */
	say(k, HELLO);
	cr_assert_not_null(k->cl.ticket, "no ticket issued");
	return k->cl.ticket;
}

static void
resumes(int max_version)
{
	struct tt_pair *ec;
	struct tt_client_opts o = {.max_version = max_version};
	struct tt_client_opts again = {.max_version = max_version};
	struct fd_tls_stats st;

	ec = pair("ec", TT_EC, "mx.example.com");
	srv = server(PAIRS(ec), 1);
	conn_up(&K[0], &o);
	cr_assert_eq(SSL_session_reused(K[0].cl.ssl), 0);
	again.resume = ticket_of(&K[0]);
	conn_up(&K[1], &again);
	cr_assert_eq(SSL_session_reused(K[1].cl.ssl), 1, "resumed");
	cr_assert(strncmp(say(&K[1], HELLO), "250-", 4) == 0);
	st = stats(srv);
	cr_assert_eq(st.handshakes, 2);
	cr_assert_eq(st.resumed, 1);
	cr_assert_eq(st.failed, 0);
}

TLS_TEST(ticket_resumes_on_the_same_server_tls13)
{
	resumes(0);
}

TLS_TEST(ticket_resumes_on_the_same_server_tls12)
{
	resumes(TLS1_2_VERSION);
}

TLS_TEST(ticket_of_another_server_is_a_full_handshake)
{
	struct tt_pair *ec;
	struct tt_client_opts again = {0};

	ec = pair("ec", TT_EC, "mx.example.com");
	srv = server(PAIRS(ec), 1);
	srv2 = server(PAIRS(ec), 1); /* same certificate, its own ticket keys */
	conn_up(&K[0], NULL);
	again.resume = ticket_of(&K[0]);
	conn_up_on(&K[1], srv2, &again);
	cr_assert_eq(SSL_session_reused(K[1].cl.ssl), 0);
	cr_assert_eq(stats(srv2).resumed, 0);
	cr_assert_eq(stats(srv2).handshakes, 1);
	/* The full handshake was a good one. */
	cr_assert(strncmp(say(&K[1], HELLO), "250-", 4) == 0);
}

/*
 * Rotation, lifetime L: the current key issues tickets until it is L old
 * (a ticket issued after that rotates first), then is the previous key,
 * still accepted (and the ticket renewed) until it is 2L old.
 */
TLS_TEST(ticket_keys_rotate_previous_key_accepted_then_not)
{
	struct tt_pair *ec;
	struct fd_tls_opts o;
	struct tt_client_opts t1 = {0}, t2 = {0};
	char err[512];
	const long L = 100;

	ec = pair("ec", TT_EC, "mx.example.com");
	tt_opts(&o, PAIRS(ec), 1);
	o.ticket_lifetime_s = (uint64_t)L;
	cr_assert_eq(fd_tls_server_new(&o, &srv, err, sizeof(err)), 0, "%s",
		     err);
	wall_reads = 0;
	conn_up(&K[0], NULL); /* key 1, born at 0, issues ticket 1 */
	t1.resume = ticket_of(&K[0]);
	cr_assert_gt(wall_reads, 0, "the clock wrap is not in effect");

	wall_shift_s = L + 10;
	conn_up(&K[1], &t1);
	cr_assert_eq(SSL_session_reused(K[1].cl.ssl), 1, "current key");
	/* A full handshake issues a ticket: key 1 is past its lifetime,
	 * so key 2 is made and key 1 becomes the previous one. */
	conn_up(&K[2], NULL);
	cr_assert_eq(SSL_session_reused(K[2].cl.ssl), 0);
	t2.resume = ticket_of(&K[2]);
	conn_up(&K[3], &t1);
	cr_assert_eq(SSL_session_reused(K[3].cl.ssl), 1,
		     "previous key still accepted");
	cr_assert_not_null(ticket_of(&K[3]), "and the ticket renewed");

	wall_shift_s = 2 * L + 10; /* key 1 is 2L old: gone */
	conn_up(&K[4], &t1);
	cr_assert_eq(SSL_session_reused(K[4].cl.ssl), 0,
		     "a key older than twice the lifetime is refused");
	/* That full handshake rotated again: key 2 is the previous key,
	 * L old, and still good. */
	conn_up(&K[5], &t2);
	cr_assert_eq(SSL_session_reused(K[5].cl.ssl), 1);
	cr_assert_eq(stats(srv).handshakes, 6);
	cr_assert_eq(stats(srv).resumed, 3);
}

/*
 * A TLS 1.3 client uses a ticket once (RFC 8446 C.4): a resumed session
 * gets a fresh ticket. Past the key's lifetime that renewal is what
 * rotates the key when clients only ever resume: the old ticket's key
 * then ages out as the previous one, the renewed ticket goes on.
 */
TLS_TEST(ticket_renewed_on_resumption_and_the_renewal_rotates)
{
	struct tt_pair *ec;
	struct fd_tls_opts o;
	struct tt_client_opts t1 = {0}, t2 = {0}, t3 = {0};
	char err[512];
	const long L = 100;

	ec = pair("ec", TT_EC, "mx.example.com");
	tt_opts(&o, PAIRS(ec), 1);
	o.ticket_lifetime_s = (uint64_t)L;
	cr_assert_eq(fd_tls_server_new(&o, &srv, err, sizeof(err)), 0, "%s",
		     err);
	conn_up(&K[0], NULL);
	t1.resume = ticket_of(&K[0]);
	wall_shift_s = L / 2;
	conn_up(&K[1], &t1);
	cr_assert_eq(SSL_session_reused(K[1].cl.ssl), 1);
	t2.resume = ticket_of(&K[1]); /* renewed, same key */
	/* Past the lifetime, resuming only: the renewal rotates. */
	wall_shift_s = L + 10;
	conn_up(&K[2], &t2);
	cr_assert_eq(SSL_session_reused(K[2].cl.ssl), 1);
	t3.resume = ticket_of(&K[2]);
	wall_shift_s = 2 * L + 10;
	conn_up(&K[3], &t1);
	cr_assert_eq(SSL_session_reused(K[3].cl.ssl), 0,
		     "the first key rotated out");
	conn_up(&K[4], &t3);
	cr_assert_eq(SSL_session_reused(K[4].cl.ssl), 1,
		     "the renewed ticket is under the new key");
}

/* ---- 5. what fd_tls_server_new refuses ---- */

static void
refused(const struct fd_tls_opts *o, const char *want1, const char *want2)
{
	struct fd_tls_server *t = (struct fd_tls_server *)1;
	char err[512] = "";

	cr_assert_eq(fd_tls_server_new(o, &t, err, sizeof(err)), -1);
	cr_assert_null(t);
	cr_assert(strstr(err, want1), "'%s' lacks '%s'", err, want1);
	cr_assert(!want2 || strstr(err, want2), "'%s' lacks '%s'", err,
		  want2);
}

TLS_TEST(new_refuses_an_expired_certificate)
{
	struct tt_pair *old;
	struct fd_tls_opts o;

	old = pair_dated("old", TT_EC, "mx.example.com", -60 * TT_DAY,
		   -TT_DAY);
	tt_opts(&o, PAIRS(old), 1);
	refused(&o, "expired", old->cert);
}

TLS_TEST(new_refuses_a_certificate_not_valid_yet)
{
	struct tt_pair *young;
	struct fd_tls_opts o;

	young = pair_dated("young", TT_EC, "mx.example.com", TT_DAY,
		   30 * TT_DAY);
	tt_opts(&o, PAIRS(young), 1);
	refused(&o, "not valid yet", young->cert);
}

TLS_TEST(new_refuses_a_key_of_the_same_type_that_does_not_match)
{
	struct tt_pair *a, *b;
	struct fd_tls_opts o;

	a = pair("a", TT_EC, "mx.example.com");
	b = pair("b", TT_EC, "mx.example.com");
	tt_opts(&o, PAIRS(a), 1);
	o.key[0] = b->key;
	refused(&o, "does not match", b->key);
}

TLS_TEST(new_refuses_a_key_of_another_type)
{
	struct tt_pair *a, *b;
	struct fd_tls_opts o;

	a = pair("a", TT_EC, "mx.example.com");
	b = pair("b", TT_RSA, "mx.example.com");
	tt_opts(&o, PAIRS(a), 1);
	o.key[0] = b->key;
	refused(&o, "does not match", b->key);
}

TLS_TEST(new_refuses_missing_files_and_bad_options)
{
	struct tt_pair *a;
	struct fd_tls_opts o;
	char nope[400];

	a = pair("a", TT_EC, "mx.example.com");
	snprintf(nope, sizeof(nope), "%s/nope.crt", dir.path);
	tt_opts(&o, PAIRS(a), 1);
	o.cert[0] = nope;
	refused(&o, "cannot read certificate", nope);

	tt_opts(&o, PAIRS(a), 1);
	snprintf(nope, sizeof(nope), "%s/nope.key", dir.path);
	o.key[0] = nope;
	refused(&o, nope, NULL);

	tt_opts(&o, PAIRS(a), 1);
	o.ciphers = "NO-SUCH-CIPHER";
	refused(&o, "no usable cipher", "NO-SUCH-CIPHER");

	tt_opts(&o, PAIRS(a), 0);
	refused(&o, "certificate pairs", NULL);
}

/* ---- 6. reload ---- */

TLS_TEST(reload_new_connections_get_the_new_certificate)
{
	struct tt_pair *a, *b, *c;
	char err[512] = "";
	FILE *f;
	const char *r;

	a = pair("live", TT_EC, "mx.example.com");
	srv = server(PAIRS(a), 1);
	conn_up(&K[0], NULL);
	cr_assert(peer_is(&K[0], a));
	say(&K[0], HELLO);

	/* New files under the same names (live.crt, live.key). */
	b = pair("live", TT_EC, "mx.example.com");
	cr_assert_eq(fd_tls_server_reload(srv, err, sizeof(err)), 0, "%s",
		     err);
	conn_up(&K[1], NULL);
	cr_assert(peer_is(&K[1], b), "new connection, new certificate");
	/* The established one goes on, a whole transaction. */
	r = say(&K[0], MAIL RCPT "DATA\r\n");
	cr_assert(strstr(r, "354 "), "%s", r);
	r = say(&K[0], "Subject: old\r\n\r\nstill here\r\n.\r\n");
	cr_assert(strstr(r, "250 2.0.0 Ok: queued as"), "%s", r);
	/* A connection started before a reload and not yet handshaking
	 * keeps the set it started with (and that set outlives the
	 * reload that replaced it). */
	conn_start_on(&K[2], srv, NULL);
	c = pair("live", TT_EC, "mx.example.com");
	cr_assert_eq(fd_tls_server_reload(srv, err, sizeof(err)), 0, "%s",
		     err);
	cr_assert(tt_run(&K[2].l));
	cr_assert(fd_tls_conn_established(K[2].l.c));
	cr_assert(peer_is(&K[2], b));
	conn_up(&K[3], NULL);
	cr_assert(peer_is(&K[3], c));

	/* A reload that fails leaves the certificates in place. */
	f = fopen(c->cert, "w");
	cr_assert_not_null(f);
	fputs("not a certificate\n", f);
	fclose(f);
	cr_assert_eq(fd_tls_server_reload(srv, err, sizeof(err)), -1);
	cr_assert(strstr(err, c->cert), "%s", err);
	conn_up(&K[4], NULL);
	cr_assert(peer_is(&K[4], c));
}

/* ---- 7. handshake deadline ---- */

TLS_TEST(handshake_deadline)
{
	struct tt_pair *ec;
	struct fd_tls_opts o;
	char err[512];
	uint64_t d;

	ec = pair("ec", TT_EC, "mx.example.com");
	tt_opts(&o, PAIRS(ec), 1);
	o.handshake_timeout_ms = 5000;
	cr_assert_eq(fd_tls_server_new(&o, &srv, err, sizeof(err)), 0, "%s",
		     err);
	cr_assert_eq(fd_tls_server_handshake_timeout_ms(srv), 5000);
	conn_start_on(&K[0], srv, NULL);
	d = fd_tls_conn_deadline_us(K[0].l.c);
	cr_assert_eq(d, NOW + 5000000);
	/* The ClientHello arrives, the rest never does. */
	K[0].l.hold_s2c = true;
	cr_assert(tt_run(&K[0].l));
	cr_assert_eq(K[0].l.st, FD_TLS_OK);
	cr_assert_gt(K[0].l.s2c.len, 0, "the server answered the hello");
	cr_assert_eq(fd_tls_conn_pump(K[0].l.c, K[0].t.s, d - 1), FD_TLS_OK);
	cr_assert_eq(fd_tls_conn_pump(K[0].l.c, K[0].t.s, d), FD_TLS_FAILED);
	cr_assert_str_eq(fd_tls_conn_error(K[0].l.c), "handshake timeout");
	cr_assert_eq(fd_tls_conn_pump(K[0].l.c, K[0].t.s, d + 1),
		     FD_TLS_FAILED);
	cr_assert_eq(stats(srv).failed, 1);
	cr_assert_eq(stats(srv).handshakes, 0);

	/* Established: no deadline any more. */
	conn_up_on(&K[1], srv, NULL);
	cr_assert_eq(fd_tls_conn_deadline_us(K[1].l.c), 0);
	cr_assert_eq(fd_tls_conn_pump(K[1].l.c, K[1].t.s, NOW + 999000000),
		     FD_TLS_OK);
}

TLS_TEST(session_ended_during_handshake)
{
	struct tt_pair *ec;

	ec = pair("ec", TT_EC, "mx.example.com");
	srv = server(PAIRS(ec), 1);
	conn_start_on(&K[0], srv, NULL);
	smtp_session_shutdown(K[0].t.s); /* the daemon stops */
	cr_assert(smtp_session_want_close(K[0].t.s));
	cr_assert_eq(fd_tls_conn_pump(K[0].l.c, K[0].t.s, NOW), FD_TLS_FAILED);
	cr_assert(strstr(fd_tls_conn_error(K[0].l.c), "session ended"));
}

/* ---- 8. garbage ---- */

static void
garbage(struct conn *k, const uint8_t *p, size_t n)
{
	size_t off = 0;
	enum fd_tls_status st = FD_TLS_OK;

	conn_start_on(k, srv, NULL);
	while (off < n && st == FD_TLS_OK) {
		size_t used = fd_tls_conn_in(k->l.c, p + off, n - off);
		off += used;
		st = fd_tls_conn_pump(k->l.c, k->t.s, NOW);
		if (used == 0)
			break;
	}
	cr_assert_eq(st, FD_TLS_FAILED);
	cr_assert_neq(fd_tls_conn_error(k->l.c)[0], '\0');
	cr_assert(!fd_tls_conn_established(k->l.c));
	cr_assert(!smtp_session_tls_active(k->t.s));
	/* After the failure: input is dropped, the pump says so again,
	 * nothing breaks. */
	cr_assert_eq(fd_tls_conn_in(k->l.c, p, n < 100 ? n : 100),
		     n < 100 ? n : 100);
	cr_assert_eq(fd_tls_conn_pump(k->l.c, k->t.s, NOW), FD_TLS_FAILED);
	fd_tls_conn_shutdown(k->l.c);
	cr_assert(!fd_tls_conn_holding(k->l.c));
}

TLS_TEST(garbage_fails_the_handshake)
{
	struct tt_pair *ec;
	static const char http[] = "GET / HTTP/1.1\r\nHost: mx.example.com\r\n"
				   "\r\n";
	static const char smtp[] = "EHLO client.example.net\r\n";
	uint8_t junk[4096];
	uint32_t seed = 12345;

	ec = pair("ec", TT_EC, "mx.example.com");
	srv = server(PAIRS(ec), 1);
	garbage(&K[0], (const uint8_t *)http, sizeof(http) - 1);
	cr_assert(strstr(fd_tls_conn_error(K[0].l.c), "http"), "%s",
		  fd_tls_conn_error(K[0].l.c));
	garbage(&K[1], (const uint8_t *)smtp, sizeof(smtp) - 1);
	for (unsigned i = 0; i < 4; i++) {
		for (size_t j = 0; j < sizeof(junk); j++)
			junk[j] = (uint8_t)rnd(&seed);
		garbage(&K[2 + i], junk, sizeof(junk));
	}
	/* A record and a ClientHello of the right sizes, junk inside. */
	memcpy(junk, "\x16\x03\x01\x00\x40\x01\x00\x00\x3c", 9);
	garbage(&K[6], junk, 5 + 64);
	cr_assert_eq(stats(srv).failed, 7);
}

/* ---- 9. flow control ---- */

static char *
big_body(size_t lines, size_t *len)
{
	char *b = malloc(lines * 80 + 1);
	size_t n = 0;

	cr_assert_not_null(b);
	for (size_t i = 0; i < lines; i++)
		n += (size_t)sprintf(b + n, "line %06zu %066zu\r\n", i,
				     i * 7919);
	*len = n;
	return b;
}

static void
body_stored(const struct td *t, const char *body, size_t n)
{
	const char *hdr_end;

	cr_assert_geq(t->fs.body.len, n);
	cr_assert(memcmp(t->fs.body.p + t->fs.body.len - n, body, n) == 0,
		  "the body arrived whole and in order");
	/* Only the Received header before it. */
	cr_assert(strncmp(t->fs.body.p, "Received: ", 10) == 0);
	hdr_end = strstr(t->fs.body.p, " +0000\r\n");
	cr_assert_not_null(hdr_end);
	cr_assert_eq((size_t)(hdr_end + 8 - t->fs.body.p), t->fs.body.len - n);
}

TLS_TEST(flow_control_spool_room)
{
	struct tt_pair *ec;
	struct conn *k = &K[0];
	size_t blen;
	char *body = big_body(4000, &blen); /* 320 KB */
	const char *r;
	size_t from;

	ec = pair("ec", TT_EC, "mx.example.com");
	srv = server(PAIRS(ec), 1);
	conn_up(k, NULL);
	r = say(k, HELLO MAIL RCPT "DATA\r\n");
	cr_assert(strstr(r, "354 "), "%s", r);
	from = k->cl.got.len;
	/* The spool has no room: the session takes nothing more. */
	k->t.fs.room_cap = 1;
	k->t.fs.room_left = 0;
	tt_send(&k->cl, body, blen);
	tt_sends(&k->cl, ".\r\n");
	cr_assert(tt_run(&k->l));
	cr_assert(fd_tls_conn_holding(k->l.c), "plaintext held");
	cr_assert(k->l.in_short, "fd_tls_conn_in took less than offered");
	cr_assert_lt(k->l.c2s_off, k->l.c2s.len, "the rest stays outside");
	cr_assert_eq(k->t.fs.body.len, 0);
	cr_assert_eq(k->l.st, FD_TLS_OK);
	/* Room again: the next pumps go on, everything arrives. */
	k->t.fs.room_cap = 0;
	cr_assert(tt_run(&k->l));
	cr_assert(!fd_tls_conn_holding(k->l.c));
	cr_assert_eq(k->l.c2s_off, k->l.c2s.len);
	r = tt_got_since(&k->cl, &from);
	cr_assert_str_eq(r, "250 2.0.0 Ok: queued as 0000000000000001\r\n");
	body_stored(&k->t, body, blen);
	cr_assert_eq(k->t.fs.violations, 0);
	free(body);
}

TLS_TEST(flow_control_commit_in_flight)
{
	struct tt_pair *ec;
	struct conn *k = &K[0];
	size_t blen;
	char *body = big_body(3000, &blen);
	char cmd[64];
	const char *r;
	size_t from;

	ec = pair("ec", TT_EC, "mx.example.com");
	srv = server(PAIRS(ec), 1);
	conn_up(k, NULL);
	say(k, HELLO);
	k->l.auto_commit = false;
	from = k->cl.got.len;
	/* Two BDAT transactions pipelined (RFC 3030): the second waits
	 * behind the first's commit. */
	tt_sends(&k->cl, MAIL RCPT "BDAT 7 LAST\r\nfirst\r\n");
	snprintf(cmd, sizeof(cmd), "BDAT %zu LAST\r\n", blen);
	tt_sends(&k->cl, MAIL RCPT);
	tt_sends(&k->cl, cmd);
	tt_send(&k->cl, body, blen);
	cr_assert(tt_run(&k->l));
	cr_assert(smtp_session_commit_pending(k->t.s));
	cr_assert(fd_tls_conn_holding(k->l.c));
	cr_assert(k->l.in_short);
	cr_assert_eq(k->t.fs.commits, 1);
	/* The verdict; the transport pumps after it. */
	k->l.auto_commit = true;
	cr_assert(tt_run(&k->l));
	r = tt_got_since(&k->cl, &from);
	cr_assert_str_eq(r, "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
			    "250 2.0.0 Ok: queued as 0000000000000001\r\n"
			    "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
			    "250 2.0.0 Ok: queued as 0000000000000002\r\n");
	body_stored(&k->t, body, blen);
	cr_assert_eq(k->t.fs.violations, 0);
	free(body);
}

/* ---- 10. RFC 1047 ack points in ciphertext offsets ---- */

TLS_TEST(wire_end_bounds_each_ackpoint)
{
	struct tt_pair *ec;
	struct conn *k = &K[0];
	struct smtp_ackpoint ap[SMTP_ACKPOINTS];
	unsigned n;
	uint64_t total;

	ec = pair("ec", TT_EC, "mx.example.com");
	srv = server(PAIRS(ec), 1);
	conn_up(k, NULL);
	say(k, HELLO);
	for (unsigned i = 0; i < 20; i++) {
		const char *r = say(k, MAIL RCPT "DATA\r\n");
		cr_assert(strstr(r, "354 "));
		r = say(k, "Subject: x\r\n\r\nbody\r\n.\r\n");
		cr_assert(strstr(r, "250 2.0.0 Ok: queued as"));
	}
	/* The ack points are checked as they are, then again once later
	 * replies pushed them out of the layer's map. */
	for (unsigned round = 0; round < 2; round++) {
		n = smtp_session_ackpoints(k->t.s, ap);
		cr_assert_eq(n, SMTP_ACKPOINTS);
		total = k->l.wire_base + k->l.s2c.len;
		for (unsigned i = 0; i < n; i++) {
			uint64_t w = fd_tls_conn_wire_end(k->l.c, ap[i].end);
			uint64_t rec_end = 0;
			/* The record whose reading gave the client the
			 * whole reply. */
			for (size_t j = 0; j < k->l.nrec; j++) {
				if (k->l.recs[j].plain_end >= ap[i].end) {
					rec_end = k->l.recs[j].wire_end;
					break;
				}
			}
			cr_assert_neq(rec_end, 0, "reply %u was read", i);
			cr_assert_geq(w, rec_end, "round %u reply %u", round, i);
			cr_assert_leq(w, total, "round %u reply %u", round, i);
		}
		/* The newest reply ends before the later records. */
		if (round == 1)
			cr_assert_lt(fd_tls_conn_wire_end(k->l.c,
							  ap[n - 1].end),
				     total);
		/* More replies, one record each: the map wraps. */
		for (unsigned i = 0; i < 20; i++)
			cr_assert_str_eq(say(k, "NOOP\r\n"), "250 2.0.0 Ok\r\n");
	}
	/* Octets of the clear part map to themselves. */
	cr_assert_eq(fd_tls_conn_wire_end(k->l.c, k->l.wire_base),
		     k->l.wire_base);
	cr_assert_eq(fd_tls_conn_wire_end(k->l.c, 10), 10);
	cr_assert_eq(fd_tls_conn_wire_end(k->l.c, 0), 0);
}

/* ---- 11. close_notify ---- */

TLS_TEST(close_notify_from_the_server)
{
	struct tt_pair *ec;
	struct conn *k = &K[0];
	const char *r;

	ec = pair("ec", TT_EC, "mx.example.com");
	srv = server(PAIRS(ec), 1);
	conn_up(k, NULL);
	r = say(k, HELLO "QUIT\r\n");
	cr_assert(strstr(r, "221 "), "%s", r);
	cr_assert(smtp_session_want_close(k->t.s));
	fd_tls_conn_shutdown(k->l.c);
	cr_assert(tt_run(&k->l));
	cr_assert(k->cl.closed, "the client read close_notify");
	cr_assert_eq(k->cl.last_error, SSL_ERROR_ZERO_RETURN);
	cr_assert(!k->cl.failed);
}

TLS_TEST(close_notify_from_the_client)
{
	struct tt_pair *ec;
	struct conn *k = &K[0];

	ec = pair("ec", TT_EC, "mx.example.com");
	srv = server(PAIRS(ec), 1);
	conn_up(k, NULL);
	say(k, HELLO);
	cr_assert_eq(SSL_shutdown(k->cl.ssl), 0, "sent, not yet received");
	cr_assert(tt_run(&k->l));
	cr_assert_eq(k->l.st, FD_TLS_CLOSED);
	cr_assert_eq(fd_tls_conn_pump(k->l.c, k->t.s, NOW), FD_TLS_CLOSED);
	cr_assert_str_eq(fd_tls_conn_error(k->l.c), "");
	cr_assert_eq(stats(srv).failed, 0);
}

/*
 * TLS 1.2 lets a client start a new handshake at will (CPU it spends
 * ours on); the server refuses: the client's renegotiation fails, no
 * second handshake is counted.
 */
TLS_TEST(client_renegotiation_refused)
{
	struct tt_pair *ec;
	struct tt_client_opts o = {.max_version = TLS1_2_VERSION};
	struct conn *k = &K[0];

	ec = pair("ec", TT_EC, "mx.example.com");
	srv = server(PAIRS(ec), 1);
	conn_up(k, &o);
	say(k, HELLO);
	cr_assert_eq(SSL_renegotiate(k->cl.ssl), 1);
	k->cl.done = false; /* tt_client_run() drives the handshake */
	cr_assert(tt_run(&k->l));
	cr_assert(!k->cl.done, "the renegotiation completed");
	cr_assert(k->cl.failed, "the client hears it was refused");
	cr_assert_eq(stats(srv).handshakes, 1);
}

/*
 * The session's last reply (221) could not be encrypted yet (the client
 * is not reading: the ring is full) when the transport sees want_close and
 * calls fd_tls_conn_shutdown(), as sock.c does. Every reply, then
 * close_notify, must still reach the client once it reads.
 */
TLS_TEST(shutdown_while_replies_wait_for_room)
{
	struct tt_pair *ec;
	struct conn *k = NULL;
	char *noops;
	unsigned n = 0;
	size_t from;

	ec = pair("ec", TT_EC, "mx.example.com");
	srv = server(PAIRS(ec), 1);
	/* Find a number of NOOPs for which the QUIT was read but its 221
	 * is still in the session's output: a little more than the ring
	 * holds. */
	for (unsigned tries = 0; tries < NCONN; tries++) {
		const uint8_t *p;
		k = &K[tries];
		n = 600 + 60 * tries; /* ring (8 KiB) + session output (4 KiB) */
		conn_up(k, NULL);
		say(k, HELLO);
		noops = malloc(6 * n + 7);
		cr_assert_not_null(noops);
		for (unsigned i = 0; i < n; i++)
			memcpy(noops + 6 * i, "NOOP\r\n", 6);
		memcpy(noops + 6 * n, "QUIT\r\n", 7);
		k->l.stop_out = true;
		tt_sends(&k->cl, noops);
		free(noops);
		cr_assert(tt_run(&k->l));
		if (smtp_session_want_close(k->t.s) &&
		    smtp_session_output(k->t.s, &p) > 0)
			break;
		conn_end(k);
		k = NULL;
	}
	cr_assert_not_null(k, "no case with the 221 waiting was found");
	/* As sock.c: want_close -> close_notify queued. */
	fd_tls_conn_shutdown(k->l.c);
	from = k->cl.got.len;
	k->l.stop_out = false; /* the client reads again */
	cr_assert(tt_run(&k->l));
	cr_assert_neq(k->l.st, FD_TLS_FAILED, "%s", fd_tls_conn_error(k->l.c));
	{
		const char *r = tt_got_since(&k->cl, &from);
		size_t want = 14 * (size_t)n;
		cr_assert_eq(strlen(r), want + strlen("221 2.0.0 Bye\r\n"),
			     "got %zu octets of replies", strlen(r));
		cr_assert_str_eq(r + want, "221 2.0.0 Bye\r\n");
	}
	cr_assert(k->cl.closed, "close_notify after the last reply");
}

/* ---- 12. a thousand handshakes cut short ---- */

/* The client's octets of a whole handshake (and the server's reply to
 * them), for the cut points' range. */
static size_t
full_length(struct conn *k, int max_version)
{
	struct tt_client_opts o = {.max_version = max_version};
	size_t n;

	conn_up(k, &o);
	n = k->l.c2s.len;
	conn_end(k);
	return n;
}

TLS_TEST(truncated_handshakes)
{
	struct tt_pair *ec;
	struct fd_tls_opts o;
	char err[512];
	size_t full[2];
	unsigned completed = 0, failed = 0, timed_out = 0;
	uint32_t seed = 20240229;
	struct fd_tls_stats st;

	ec = pair("ec", TT_EC, "mx.example.com");
	tt_opts(&o, PAIRS(ec), 1);
	o.handshake_timeout_ms = 1000;
	cr_assert_eq(fd_tls_server_new(&o, &srv, err, sizeof(err)), 0, "%s",
		     err);
	full[0] = full_length(&K[0], 0);
	full[1] = full_length(&K[0], TLS1_2_VERSION);
	for (unsigned i = 0; i < 1000; i++) {
		struct tt_client_opts co = {
			.max_version = i % 2 ? TLS1_2_VERSION : 0};
		struct conn *k = &K[0];
		size_t cut = rnd(&seed) % (full[i % 2] + 16);
		/* One in four: the octet at the cut is damaged and the
		 * rest follows (a failure rather than a stall). */
		bool damage = i % 4 == 3;

		conn_start_on(k, srv, &co);
		k->l.c2s_cut = cut;
		cr_assert(tt_run(&k->l));
		if (damage && k->l.c2s.len > cut) {
			k->l.c2s.p[cut] ^= 0x5a;
			k->l.c2s_cut = UINT64_MAX;
			cr_assert(tt_run(&k->l));
		}
		if (k->l.st == FD_TLS_FAILED) {
			failed++;
		} else if (fd_tls_conn_established(k->l.c)) {
			completed++;
		} else {
			uint64_t d = fd_tls_conn_deadline_us(k->l.c);
			cr_assert_eq(fd_tls_conn_pump(k->l.c, k->t.s, d),
				     FD_TLS_FAILED);
			cr_assert_str_eq(fd_tls_conn_error(k->l.c),
					 "handshake timeout");
			timed_out++;
		}
		conn_end(k);
	}
	cr_log_info("1000 cut handshakes: %u completed, %u failed, "
		    "%u timed out (full client flights: %zu, %zu octets)",
		    completed, failed, timed_out, full[0], full[1]);
	cr_assert_eq(completed + failed + timed_out, 1000);
	cr_assert_gt(completed, 0);
	cr_assert_gt(failed, 0);
	cr_assert_gt(timed_out, 0);
	st = stats(srv);
	cr_assert_eq(st.handshakes, completed + 2);
	cr_assert_eq(st.failed, failed + timed_out);
}
