/*
 * STARTTLS in the engine (RFC 3207): what is advertised when, the reply to
 * the command in every state, the reset after the handshake, the octets
 * pipelined behind the command (never read as commands: CVE-2011-0411),
 * --tls-required, and what the Received header says. The handshake itself
 * is the transport's (tls/); here the test plays the transport and calls
 * smtp_session_tls_ready() as it would.
 */
#include <criterion/criterion.h>
#include <string.h>

#include "smtp_test_lsan.h"
#include "smtp_test_sink.h"

TestSuite(smtp_starttls, .fini = lsan_fini);

#define HELLO "EHLO client.example.net\r\n"
#define TLS_DESC "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)"

static struct td t;

static void
start(bool offer, bool required)
{
	struct smtp_config cfg;

	td_config(&cfg);
	cfg.starttls = offer;
	cfg.tls_required = required;
	cr_assert(td_open(&t, &cfg, NULL));
}

static void
finish(void)
{
	cr_assert_eq(t.fs.violations, 0, "sink contract violated");
	td_close(&t);
	lsan_check(); /* here: a failure in .fini would not count */
}

static const char *
take(void)
{
	static char buf[65536];
	size_t n = t.out.len < sizeof(buf) - 1 ? t.out.len : sizeof(buf) - 1;
	memcpy(buf, t.out.p ? t.out.p : "", n);
	buf[n] = '\0';
	t.out.len = 0;
	return buf;
}

/* EHLO, STARTTLS, then the handshake "completes". */
static void
to_tls(void)
{
	const char *r;

	take();
	td_feeds(&t, HELLO);
	cr_assert(strstr(take(), "250-STARTTLS\r\n"));
	td_feeds(&t, "STARTTLS\r\n");
	r = take();
	cr_assert_str_eq(r, "220 2.0.0 Ready to start TLS\r\n");
	cr_assert(smtp_session_tls_wanted(t.s));
	smtp_session_tls_ready(t.s, TLS_DESC);
	cr_assert(!smtp_session_tls_wanted(t.s));
	cr_assert(smtp_session_tls_active(t.s));
}

Test(smtp_starttls, not_offered_without_certificate)
{
	const char *r;

	start(false, false);
	take();
	td_feeds(&t, HELLO);
	r = take();
	cr_assert_null(strstr(r, "STARTTLS"), "%s", r);
	td_feeds(&t, "STARTTLS\r\n");
	cr_assert_str_eq(take(), "502 5.5.1 Error: command not implemented\r\n");
	cr_assert(!smtp_session_tls_wanted(t.s));
	finish();
}

Test(smtp_starttls, advertised_before_tls_only)
{
	const char *r;

	start(true, false);
	to_tls();
	/* RFC 3207 4.2: a new EHLO is needed, and lists no STARTTLS. */
	td_feeds(&t, "MAIL FROM:<a@example.net>\r\n");
	cr_assert_str_eq(take(), "503 5.5.1 Error: send HELO/EHLO first\r\n");
	td_feeds(&t, HELLO);
	r = take();
	cr_assert(strstr(r, "250 CHUNKING\r\n"), "%s", r);
	cr_assert_null(strstr(r, "STARTTLS"), "%s", r);
	td_feeds(&t, "STARTTLS\r\n");
	cr_assert_str_eq(take(), "503 5.5.1 Error: TLS already active\r\n");
	finish();
}

Test(smtp_starttls, pipelined_commands_after_starttls_are_discarded)
{
	start(true, false);
	take();
	td_feeds(&t, HELLO);
	take();
	/* The injection: STARTTLS and a command in one segment. */
	td_feeds(&t, "STARTTLS\r\nMAIL FROM:<evil@example.net>\r\n"
		     "RCPT TO:<bob@example.com>\r\n");
	cr_assert_str_eq(take(), "220 2.0.0 Ready to start TLS\r\n");
	cr_assert(smtp_session_tls_wanted(t.s));
	/* More plaintext before the handshake: dropped too. */
	td_feeds(&t, "DATA\r\n");
	cr_assert_str_eq(take(), "");
	smtp_session_tls_ready(t.s, TLS_DESC);
	/* Nothing of it survived: the session is at its start. */
	td_feeds(&t, "RCPT TO:<bob@example.com>\r\n");
	cr_assert_str_eq(take(), "503 5.5.1 Error: send HELO/EHLO first\r\n");
	cr_assert_eq(smtp_server_stats(t.srv)->tls_injected, 1);
	cr_assert_eq(t.fs.begins, 0);
	finish();
}

Test(smtp_starttls, states_and_syntax)
{
	start(true, false);
	take();
	td_feeds(&t, "STARTTLS\r\n");
	cr_assert_str_eq(take(), "503 5.5.1 Error: send EHLO first\r\n");
	td_feeds(&t, HELLO);
	take();
	td_feeds(&t, "STARTTLS now\r\n");
	cr_assert_str_eq(take(), "501 5.5.4 Syntax: STARTTLS\r\n");
	td_feeds(&t, "MAIL FROM:<a@example.net>\r\n");
	take();
	td_feeds(&t, "STARTTLS\r\n");
	cr_assert_str_eq(take(),
			 "503 5.5.1 Error: MAIL transaction in progress\r\n");
	cr_assert(!smtp_session_tls_wanted(t.s));
	td_feeds(&t, "RSET\r\nSTARTTLS\r\n");
	cr_assert_str_eq(take(),
			 "250 2.0.0 Ok\r\n220 2.0.0 Ready to start TLS\r\n");
	finish();
}

Test(smtp_starttls, received_says_esmtps_and_cipher)
{
	start(true, false);
	to_tls();
	td_feeds(&t, HELLO "MAIL FROM:<alice@example.net>\r\n"
			   "RCPT TO:<bob@example.com>\r\nDATA\r\n"
			   "Subject: x\r\n\r\nhi\r\n.\r\n");
	cr_assert(strstr(take(), "250 2.0.0 Ok: queued as"));
	cr_assert_str_eq(t.fs.proto, "ESMTPS");
	cr_assert(strstr(t.fs.body.p,
			 "Received: from client.example.net ([192.0.2.1])\r\n"
			 "\t(using " TLS_DESC ")\r\n"
			 "\tby mx.example.com (finaldot) with ESMTPS id "),
		  "%s", t.fs.body.p);
	finish();
}

Test(smtp_starttls, tls_description_is_sanitized)
{
	start(true, false);
	take();
	td_feeds(&t, HELLO "STARTTLS\r\n");
	take();
	smtp_session_tls_ready(t.s, "TLSv1.3\r\nX-Evil: 1\\");
	td_feeds(&t, HELLO "MAIL FROM:<alice@example.net>\r\n"
			   "RCPT TO:<bob@example.com>\r\nDATA\r\nhi\r\n.\r\n");
	take();
	cr_assert(strstr(t.fs.body.p, "(using TLSv1.3??X-Evil: 1?)\r\n"),
		  "%s", t.fs.body.p);
	finish();
}

Test(smtp_starttls, required_refuses_mail_before_tls)
{
	start(true, true);
	take();
	td_feeds(&t, HELLO "MAIL FROM:<alice@example.net>\r\n");
	cr_assert(strstr(take(),
			 "530 5.7.0 Must issue a STARTTLS command first\r\n"));
	cr_assert_eq(smtp_server_stats(t.srv)->tls_required_refused, 1);
	td_feeds(&t, "STARTTLS\r\n");
	take();
	smtp_session_tls_ready(t.s, TLS_DESC);
	td_feeds(&t, HELLO "MAIL FROM:<alice@example.net>\r\n");
	cr_assert(strstr(take(), "250 2.1.0 Ok\r\n"));
	finish();
}

Test(smtp_starttls, timeout_while_waiting_for_tls)
{
	start(true, false);
	take();
	td_feeds(&t, HELLO "STARTTLS\r\n");
	take();
	smtp_session_timeout(t.s);
	td_drain(&t);
	cr_assert(smtp_session_want_close(t.s));
	cr_assert(strstr(take(), "421 4.4.2"));
	/* A late handshake does not bring it back. */
	smtp_session_tls_ready(t.s, TLS_DESC);
	cr_assert(!smtp_session_tls_active(t.s));
	finish();
}
