/*
 * The SMTP session through its public interface (smtp.h), driven like a
 * transport drives it, against a fake spool (smtp_test_sink.h).
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <string.h>

#include "smtp_test_lsan.h"
#include "finaldot/spool_format.h"
#include "smtp_test_sink.h"

TestSuite(smtp_session, .fini = lsan_fini);

#define HELLO "EHLO client.example.net\r\n"
#define FROM "MAIL FROM:<alice@example.net>\r\n"
#define TO "RCPT TO:<bob@example.com>\r\n"
#define GREETING "220 mx.example.com ESMTP finaldot\r\n"
#define EHLO_REPLY                                                             \
	"250-mx.example.com\r\n250-PIPELINING\r\n250-SIZE 33554432\r\n"         \
	"250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250-DSN\r\n"              \
	"250-SMTPUTF8\r\n250 CHUNKING\r\n"
#define RECEIVED_ONE                                                           \
	"Received: from client.example.net ([192.0.2.1])\r\n"                  \
	"\tby mx.example.com (finaldot) with ESMTP id 0000000000000001\r\n"   \
	"\tfor <bob@example.com>; Tue, 14 Nov 2023 22:13:20 +0000\r\n"

static struct td t;

static void
start(void)
{
	struct smtp_config cfg;
	td_config(&cfg);
	cr_assert(td_open(&t, &cfg, NULL));
}

static void
start_cfg(const struct smtp_config *cfg, const char *addr)
{
	cr_assert(td_open(&t, cfg, addr));
}

static void
finish(void)
{
	cr_assert_eq(t.fs.violations, 0, "sink contract violated");
	td_close(&t);
	lsan_check(); /* here: a failure in .fini would not count */
}

/* The output since the last call, then forget it. */
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

static void
expect(const char *input, const char *replies)
{
	td_feeds(&t, input);
	cr_assert_str_eq(take(), replies, "after input %s", input);
}

static void
to_rcpt(void)
{
	take();
	expect(HELLO FROM TO,
	       EHLO_REPLY "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n");
}

Test(smtp_session, greeting_and_ehlo)
{
	start();
	cr_assert_str_eq(take(), GREETING);
	expect(HELLO, EHLO_REPLY);
	cr_assert(!smtp_session_want_close(t.s));
	finish();
}

Test(smtp_session, helo_has_no_esmtp)
{
	start();
	take();
	expect("HELO c.example.net\r\n", "250 mx.example.com\r\n");
	expect("MAIL FROM:<a@b.example> SIZE=10\r\n",
	       "555 5.5.4 MAIL parameters require EHLO\r\n");
	expect("MAIL FROM:<a@b.example>\r\n", "250 2.1.0 Ok\r\n");
	expect(TO "DATA\r\nx\r\n.\r\n",
	       "250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
	       "250 2.0.0 Ok: queued as 0000000000000001\r\n");
	cr_assert_str_eq(t.fs.proto, "SMTP");
	cr_assert(strstr(t.fs.body.p, " with SMTP id "));
	finish();
}

Test(smtp_session, data_transaction_queues_only_after_commit_done)
{
	start();
	to_rcpt();
	t.auto_commit = false;
	expect("DATA\r\n", "354 End data with <CR><LF>.<CR><LF>\r\n");
	expect("Subject: hi\r\n\r\nhello\r\n.\r\n", "");
	cr_assert(smtp_session_commit_pending(t.s));
	cr_assert_eq(t.fs.commits, 1);
	cr_assert_str_eq(t.fs.body.p, RECEIVED_ONE "Subject: hi\r\n\r\nhello\r\n");
	cr_assert_str_eq(t.fs.mail_from, "alice@example.net");
	cr_assert_str_eq(t.fs.rcpt0, "bob@example.com");
	cr_assert_str_eq(t.fs.helo, "client.example.net");
	cr_assert_str_eq(t.fs.client, "192.0.2.1");
	cr_assert_str_eq(t.fs.proto, "ESMTP");
	cr_assert_eq(t.fs.arrival_us, td_clock());
	t.fs.pending = NULL;
	smtp_session_commit_done(t.s, 1, 0);
	td_drain(&t);
	cr_assert_str_eq(take(), "250 2.0.0 Ok: queued as 0000000000000001\r\n");
	cr_assert(!smtp_session_commit_pending(t.s));
	cr_assert_eq(smtp_server_stats(t.srv)->messages_committed, 1);
	expect("QUIT\r\n", "221 2.0.0 Bye\r\n");
	cr_assert(smtp_session_want_close(t.s));
	finish();
}

Test(smtp_session, input_paused_while_commit_pending)
{
	const char *in = "DATA\r\nx\r\n.\r\nNOOP\r\n";
	size_t n;

	start();
	to_rcpt();
	n = smtp_session_input(t.s, (const uint8_t *)in, strlen(in));
	cr_assert_eq(n, strlen("DATA\r\nx\r\n.\r\n"));
	cr_assert(smtp_session_commit_pending(t.s));
	cr_assert_eq(smtp_session_input(t.s, (const uint8_t *)in + n,
					strlen(in) - n),
		     0);
	td_drain(&t);
	cr_assert_str_eq(take(), "354 End data with <CR><LF>.<CR><LF>\r\n");
	t.fs.pending = NULL;
	smtp_session_commit_done(t.s, 1, 0);
	cr_assert_eq(smtp_session_input(t.s, (const uint8_t *)in + n,
					strlen(in) - n),
		     strlen(in) - n);
	td_drain(&t);
	cr_assert_str_eq(take(), "250 2.0.0 Ok: queued as 0000000000000001\r\n"
				 "250 2.0.0 Ok\r\n");
	finish();
}

Test(smtp_session, pipelined_transaction_in_one_input)
{
	start();
	take();
	expect(HELLO FROM TO "RCPT TO:<eve@elsewhere.example>\r\n"
			     "RCPT TO:<carol@example.org>\r\nDATA\r\n"
			     "..dot\r\nbody\r\n.\r\nMAIL FROM:<>\r\n"
			     "RSET\r\nQUIT\r\n",
	       EHLO_REPLY "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
			  "550 5.7.1 Relay access denied\r\n250 2.1.5 Ok\r\n"
			  "354 End data with <CR><LF>.<CR><LF>\r\n"
			  "250 2.0.0 Ok: queued as 0000000000000001\r\n"
			  "250 2.1.0 Ok\r\n250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n");
	cr_assert_eq(t.fs.n_rcpts, 2);
	/* Two recipients: no "for" clause (RFC 5321 7.2). */
	cr_assert(strstr(t.fs.body.p, "id 0000000000000001;\r\n\tTue, 14 Nov "
				      "2023 22:13:20 +0000\r\n.dot\r\nbody\r\n"));
	cr_assert_null(strstr(t.fs.body.p, "for <"));
	finish();
}

Test(smtp_session, sequence_errors)
{
	start();
	take();
	expect(FROM, "503 5.5.1 Error: send HELO/EHLO first\r\n");
	expect(HELLO, EHLO_REPLY);
	expect(TO, "503 5.5.1 Error: need MAIL command\r\n");
	expect("DATA\r\n", "503 5.5.1 Error: need MAIL command\r\n");
	expect(FROM, "250 2.1.0 Ok\r\n");
	expect("DATA\r\n", "503 5.5.1 Error: need RCPT command\r\n");
	expect(FROM, "503 5.5.1 Error: nested MAIL command\r\n");
	expect("RCPT TO:<x@nowhere.example>\r\nDATA\r\n",
	       "550 5.7.1 Relay access denied\r\n"
	       "554 5.5.1 Error: no valid recipients\r\n");
	expect(TO "BDAT 3\r\nabcDATA\r\n",
	       "250 2.1.5 Ok\r\n250 2.0.0 Ok: 3 octets received\r\n"
	       "503 5.5.1 Error: only BDAT, RSET, NOOP, QUIT during BDAT "
	       "transfer\r\n");
	expect("RSET\r\n", "250 2.0.0 Ok\r\n");
	cr_assert_eq(t.fs.aborts, 1);
	expect(TO, "503 5.5.1 Error: need MAIL command\r\n");
	finish();
}

Test(smtp_session, simple_commands)
{
	start();
	take();
	expect("NOOP\r\n", "250 2.0.0 Ok\r\n");
	expect("noop anything\r\n", "250 2.0.0 Ok\r\n");
	expect("VRFY bob\r\n", "252 2.5.2 Cannot VRFY user, but will accept "
			       "message and attempt delivery\r\n");
	expect("VRFY\r\n", "501 5.5.4 Syntax: VRFY address\r\n");
	expect("HELP\r\n", "214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA "
			   "BDAT RSET NOOP QUIT VRFY HELP\r\n");
	expect("EXPN list\r\n", "502 5.5.1 Error: command not implemented\r\n");
	expect("FOO\r\n", "500 5.5.2 Error: command not recognized\r\n");
	expect("\r\n", "500 5.5.2 Error: command not recognized\r\n");
	expect("NO\001OP\r\n", "500 5.5.2 Error: bad character in command\r\n");
	expect("NOOP\rX\r\n", "500 5.5.2 Error: bad character in command\r\n");
	expect("EHLO\r\n", "501 5.5.4 Syntax: EHLO hostname\r\n");
	expect("RSET x\r\n", "501 5.5.4 Syntax: RSET\r\n");
	expect("RSET\r\n", "250 2.0.0 Ok\r\n");
	expect("QUIT\r\nNOOP\r\n", "221 2.0.0 Bye\r\n");
	cr_assert(smtp_session_want_close(t.s));
	finish();
}

Test(smtp_session, mail_parameters)
{
	start();
	take();
	expect(HELLO, EHLO_REPLY);
	expect("MAIL FROM:<a@b.example> SIZE=33554433\r\n",
	       "552 5.3.4 Message size exceeds fixed limit\r\n");
	expect("MAIL FROM:<a@b.example> BODY=BINARYMIME\r\n",
	       "555 5.5.4 Unsupported MAIL parameter value\r\n");
	expect("MAIL FROM:<a@b.example> FOO=BAR\r\n",
	       "555 5.5.4 Unsupported MAIL parameter\r\n");
	expect("MAIL FROM:<a@b.example> SIZE=abc\r\n",
	       "501 5.5.4 Syntax error in MAIL parameters\r\n");
	expect("MAIL FROM:<a@@b.example>\r\n",
	       "501 5.1.7 Bad sender address syntax\r\n");
	expect("MAIL FROM:<j\xc3\xb6rg@b.example>\r\n",
	       "553 5.6.7 Non-ASCII address requires SMTPUTF8\r\n");
	expect("MAIL FROM:<j\xc3\xb6rg@b.example> SMTPUTF8 BODY=8BITMIME "
	       "SIZE=1000\r\n",
	       "250 2.1.0 Ok\r\n");
	expect("RCPT TO:<b\xc3\xa9@example.com>\r\nDATA\r\nx\r\n.\r\n",
	       "250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
	       "250 2.0.0 Ok: queued as 0000000000000001\r\n");
	cr_assert(t.fs.smtputf8);
	cr_assert_eq(t.fs.body_type, FD_BODY_8BITMIME);
	cr_assert_eq(t.fs.size_param, 1000);
	cr_assert(strstr(t.fs.body.p, " with UTF8SMTP id "));
	expect("MAIL FROM:<>\r\nRCPT TO:<b\xc3\xa9@example.com>\r\n",
	       "250 2.1.0 Ok\r\n553 5.6.7 Non-ASCII address requires "
	       "SMTPUTF8\r\n");
	expect("RCPT TO:<bob@example.com> X-FOO=1\r\n",
	       "555 5.5.4 Unsupported RCPT parameter\r\n");
	expect("RCPT TO:<bob@example.com>\r\nDATA\r\n.\r\n",
	       "250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
	       "250 2.0.0 Ok: queued as 0000000000000002\r\n");
	cr_assert_str_eq(t.fs.mail_from, "");
	finish();
}

Test(smtp_session, relay_attempts_denied)
{
	static const char *const denied[] = {
		"RCPT TO:<bob@elsewhere.example>\r\n",
		"RCPT TO:<bob@mail.example.com>\r\n",
		"RCPT TO:<bob%elsewhere.example@example.com>\r\n",
		"RCPT TO:<elsewhere.example!bob@example.com>\r\n",
		"RCPT TO:<\"bob@elsewhere.example\"@example.com>\r\n",
		"RCPT TO:<\"bob%elsewhere\"@example.com>\r\n",
		"RCPT TO:<@example.com:bob@elsewhere.example>\r\n",
		"RCPT TO:<@example.com,@example.org:bob@evil.example>\r\n",
		"RCPT TO:<bob@[192.0.2.7]>\r\n",
		"RCPT TO:<bob@example.com.evil.example>\r\n",
	};
	static const char *const accepted[] = {
		"RCPT TO:<postmaster>\r\n",
		"RCPT TO:<PostMaster>\r\n",
		"RCPT TO:<bob@EXAMPLE.COM>\r\n",
		"RCPT TO:<bob@example.org.>\r\n",
		"RCPT TO:<@elsewhere.example:bob@example.com>\r\n",
		"RCPT TO: <bob@example.com>\r\n",
		"RCPT TO:<\"bob smith\"@example.com>\r\n",
	};

	start();
	take();
	expect(HELLO FROM, EHLO_REPLY "250 2.1.0 Ok\r\n");
	for (size_t i = 0; i < sizeof(denied) / sizeof(denied[0]); i++)
		expect(denied[i], "550 5.7.1 Relay access denied\r\n");
	for (size_t i = 0; i < sizeof(accepted) / sizeof(accepted[0]); i++)
		expect(accepted[i], "250 2.1.5 Ok\r\n");
	cr_assert_eq(smtp_server_stats(t.srv)->relay_denied,
		     sizeof(denied) / sizeof(denied[0]));
	expect("RCPT TO:<postmaster@elsewhere.example>\r\n",
	       "550 5.7.1 Relay access denied\r\n");
	expect("RCPT TO:<bob@>\r\n", "501 5.1.3 Bad recipient address "
				     "syntax\r\n");
	expect("RCPT TO:bob@example.com\r\n", "501 5.1.3 Bad recipient "
					      "address syntax\r\n");
	finish();
}

Test(smtp_session, received_header_ipv6_and_sanitized_helo)
{
	struct smtp_config cfg;

	td_config(&cfg);
	start_cfg(&cfg, "2001:db8::1");
	take();
	expect("EHLO evil;(x)\xff\r\n" FROM TO "DATA\r\n.\r\n",
	       EHLO_REPLY "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
			  "354 End data with <CR><LF>.<CR><LF>\r\n"
			  "250 2.0.0 Ok: queued as 0000000000000001\r\n");
	cr_assert_str_eq(t.fs.body.p,
			 "Received: from evil??x?? ([IPv6:2001:db8::1])\r\n"
			 "\tby mx.example.com (finaldot) with ESMTP id "
			 "0000000000000001\r\n"
			 "\tfor <bob@example.com>; Tue, 14 Nov 2023 22:13:20 "
			 "+0000\r\n");
	finish();
}

Test(smtp_session, dot_stuffing_removed)
{
	start();
	to_rcpt();
	expect("DATA\r\n..\r\n...x\r\n.y\r\na.b\r\n.\r\n",
	       "354 End data with <CR><LF>.<CR><LF>\r\n"
	       "250 2.0.0 Ok: queued as 0000000000000001\r\n");
	cr_assert_str_eq(t.fs.body.p, RECEIVED_ONE ".\r\n..x\r\ny\r\na.b\r\n");
	finish();
}

/* ---- smuggling (bare CR / LF in DATA) ---- */

static void
smuggle(const char *variant)
{
	char in[1024];

	snprintf(in, sizeof(in),
		 "DATA\r\nhello%sMAIL FROM:<evil@evil.example>\r\n"
		 "RCPT TO:<victim@example.com>\r\nDATA\r\nsmuggled\r\n"
		 "\r\n.\r\nNOOP\r\n",
		 variant);
	start();
	to_rcpt();
	td_feeds(&t, in);
	{
		const char *out = take();
		cr_assert_str_eq(out,
				 "354 End data with <CR><LF>.<CR><LF>\r\n"
				 "550 5.6.0 Error: bare CR or LF in message "
				 "data (CRLF line endings required)\r\n"
				 "250 2.0.0 Ok\r\n",
				 "variant %s: %s", variant, out);
	}
	cr_assert_eq(t.fs.begins, 1);
	cr_assert_eq(t.fs.commits, 0);
	cr_assert_eq(t.fs.aborts, 1);
	cr_assert_eq(smtp_server_stats(t.srv)->messages_rejected, 1);
	finish();
}

Test(smtp_session, smuggling_lf_dot_lf) { smuggle("\n.\n"); }
Test(smtp_session, smuggling_cr_dot_cr) { smuggle("\r.\r"); }
Test(smtp_session, smuggling_lf_dot_crlf) { smuggle("\n.\r\n"); }
Test(smtp_session, smuggling_crlf_dot_lf) { smuggle("\r\n.\n"); }
Test(smtp_session, smuggling_crlf_dot_cr) { smuggle("\r\n.\r"); }
Test(smtp_session, smuggling_cr_dot_crlf) { smuggle("\r.\r\n"); }

Test(smtp_session, bare_lf_message_then_good_message)
{
	start();
	to_rcpt();
	expect("DATA\r\na\nb\r\n.\r\n" FROM TO "DATA\r\nok\r\n.\r\n",
	       "354 End data with <CR><LF>.<CR><LF>\r\n"
	       "550 5.6.0 Error: bare CR or LF in message data (CRLF line "
	       "endings required)\r\n"
	       "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
	       "354 End data with <CR><LF>.<CR><LF>\r\n"
	       "250 2.0.0 Ok: queued as 0000000000000002\r\n");
	cr_assert_eq(t.fs.commits, 1);
	cr_assert_eq(t.fs.aborts, 1);
	finish();
}

/* ---- limits ---- */

Test(smtp_session, command_line_512_octets)
{
	char line[600];

	start();
	take();
	memset(line, 'x', sizeof(line));
	memcpy(line, "NOOP ", 5);
	memcpy(line + 510, "\r\n", 3); /* 512 with CRLF */
	expect(line, "250 2.0.0 Ok\r\n");
	memset(line, 'x', sizeof(line));
	memcpy(line, "NOOP ", 5);
	memcpy(line + 511, "\r\n", 3); /* 513 */
	expect(line, "500 5.5.2 Error: line too long\r\n");
	expect("NOOP\r\n", "250 2.0.0 Ok\r\n");
	finish();
}

Test(smtp_session, text_line_1000_octets)
{
	char body[2100];

	start();
	to_rcpt();
	memset(body, 'y', sizeof(body));
	memcpy(body + 998, "\r\n", 2); /* 1000 with CRLF: fine */
	memcpy(body + 1000 + 999, "\r\n.\r\n", 6); /* 1001 */
	expect("DATA\r\n", "354 End data with <CR><LF>.<CR><LF>\r\n");
	expect(body, "550 5.6.0 Error: text line longer than 1000 octets\r\n");
	cr_assert_eq(t.fs.commits, 0);
	cr_assert_eq(t.fs.aborts, 1);
	memcpy(body + 1000 + 998, "\r\n.\r\n", 6);
	expect(FROM TO "DATA\r\n", "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
				   "354 End data with <CR><LF>.<CR><LF>\r\n");
	expect(body, "250 2.0.0 Ok: queued as 0000000000000002\r\n");
	finish();
}

Test(smtp_session, message_size_limit)
{
	struct smtp_config cfg;
	const char *body = "0123456789\r\n0123456789\r\n.\r\n"; /* 24 */

	td_config(&cfg);
	cfg.max_message_size = 20;
	start_cfg(&cfg, NULL);
	take();
	expect(HELLO FROM TO "DATA\r\n",
	       "250-mx.example.com\r\n250-PIPELINING\r\n250-SIZE 20\r\n"
	       "250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250-DSN\r\n"
	       "250-SMTPUTF8\r\n250 CHUNKING\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
	       "354 End data with <CR><LF>.<CR><LF>\r\n");
	expect(body, "552 5.3.4 Error: message size exceeds fixed limit\r\n");
	cr_assert_eq(t.fs.aborts, 1);
	cr_assert_eq(t.fs.commits, 0);
	/* Never more than the limit of body octets was appended. */
	cr_assert_eq(t.fs.body.len, strlen(RECEIVED_ONE) + 20);
	expect(FROM TO "DATA\r\n0123456789\r\n012345\r\n.\r\n",
	       "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
	       "354 End data with <CR><LF>.<CR><LF>\r\n"
	       "250 2.0.0 Ok: queued as 0000000000000002\r\n");
	expect(FROM TO "BDAT 21 LAST\r\n012345678901234567890NOOP\r\n",
	       "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
	       "552 5.3.4 Error: message size exceeds fixed limit\r\n"
	       "250 2.0.0 Ok\r\n");
	cr_assert_eq(t.fs.begins, 2);
	finish();
}

Test(smtp_session, max_recipients)
{
	struct smtp_config cfg;

	td_config(&cfg);
	cfg.max_recipients = 2;
	start_cfg(&cfg, NULL);
	take();
	expect(HELLO FROM, EHLO_REPLY "250 2.1.0 Ok\r\n");
	expect(TO TO TO, "250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n"
			 "452 4.5.3 Error: too many recipients\r\n");
	finish();
}

/* RFC 5321 4.5.3.1.8: at least 100 recipients buffered, whatever their
 * length: past the 8 KiB arena the rest go to its overflow, up to
 * max_recipients. (A full arena answered 452 after about 106 of these.) */
Test(smtp_session, long_recipients_fill_max_recipients_not_the_arena)
{
	char rcpt[128];
	unsigned ok = 0, full = 0;
	struct smtp_config cfg;

	td_config(&cfg);
	cfg.max_recipients = 200;
	start_cfg(&cfg, NULL);
	take();
	expect(HELLO FROM, EHLO_REPLY "250 2.1.0 Ok\r\n");
	for (int t2 = 0; t2 < 2; t2++) { /* the overflow reused after RSET */
		ok = full = 0;
		for (int i = 0; i < 210; i++) {
			snprintf(rcpt, sizeof(rcpt),
				 "RCPT TO:<%064d@example.com>\r\n", i);
			td_feeds(&t, rcpt);
			const char *out = take();
			if (strcmp(out, "250 2.1.5 Ok\r\n") == 0)
				ok++;
			else if (strcmp(out, "452 4.5.3 Error: too many "
					     "recipients\r\n") == 0)
				full++;
		}
		cr_assert_eq(ok, 200, "ok %u full %u", ok, full);
		cr_assert_eq(full, 10);
		if (!t2)
			expect("RSET\r\n" FROM,
			       "250 2.0.0 Ok\r\n250 2.1.0 Ok\r\n");
	}
	expect("DATA\r\nx\r\n.\r\n",
	       "354 End data with <CR><LF>.<CR><LF>\r\n"
	       "250 2.0.0 Ok: queued as 0000000000000001\r\n");
	cr_assert_eq(t.fs.n_rcpts, 200);
	finish();
}

Test(smtp_session, max_errors_closes)
{
	struct smtp_config cfg;

	td_config(&cfg);
	cfg.max_errors = 3;
	start_cfg(&cfg, NULL);
	take();
	expect("FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n",
	       "500 5.5.2 Error: command not recognized\r\n"
	       "500 5.5.2 Error: command not recognized\r\n"
	       "500 5.5.2 Error: command not recognized\r\n"
	       "421 4.7.0 mx.example.com Error: too many errors\r\n");
	cr_assert(smtp_session_want_close(t.s));
	cr_assert_eq(smtp_server_stats(t.srv)->syntax_errors, 3);
	finish();
}

/* ---- session life ---- */

Test(smtp_session, early_talker)
{
	struct smtp_config cfg;

	td_config(&cfg);
	cfg.greet_delay = true;
	start_cfg(&cfg, NULL);
	cr_assert_str_eq(take(), "");
	cr_assert_eq(smtp_session_input(t.s, (const uint8_t *)"EHLO x\r\n", 8),
		     0);
	td_drain(&t);
	cr_assert_str_eq(take(), "554 5.5.0 mx.example.com Error: SMTP "
				 "protocol synchronization\r\n");
	cr_assert(smtp_session_want_close(t.s));
	cr_assert_eq(smtp_server_stats(t.srv)->early_talkers, 1);
	finish();
}

Test(smtp_session, greet_delay_then_greeting)
{
	struct smtp_config cfg;

	td_config(&cfg);
	cfg.greet_delay = true;
	start_cfg(&cfg, NULL);
	cr_assert_str_eq(take(), "");
	smtp_session_greet(t.s);
	td_drain(&t);
	cr_assert_str_eq(take(), GREETING);
	expect("NOOP\r\n", "250 2.0.0 Ok\r\n");
	cr_assert_eq(smtp_server_stats(t.srv)->early_talkers, 0);
	finish();
}

Test(smtp_session, timeout_in_data_aborts)
{
	start();
	to_rcpt();
	expect("DATA\r\npartial", "354 End data with <CR><LF>.<CR><LF>\r\n");
	smtp_session_timeout(t.s);
	td_drain(&t);
	cr_assert_str_eq(take(), "421 4.4.2 mx.example.com Error: timeout "
				 "exceeded\r\n");
	cr_assert(smtp_session_want_close(t.s));
	cr_assert_eq(t.fs.aborts, 1);
	cr_assert_eq(smtp_server_stats(t.srv)->timeouts, 1);
	finish();
}

Test(smtp_session, shutdown_with_commit_in_flight)
{
	start();
	to_rcpt();
	t.auto_commit = false;
	expect("DATA\r\nx\r\n.\r\n", "354 End data with <CR><LF>.<CR><LF>\r\n");
	smtp_session_shutdown(t.s);
	td_drain(&t);
	cr_assert_str_eq(take(), "");
	cr_assert(!smtp_session_want_close(t.s));
	t.fs.pending = NULL;
	smtp_session_commit_done(t.s, 1, 0);
	td_drain(&t);
	cr_assert_str_eq(take(), "250 2.0.0 Ok: queued as 0000000000000001\r\n"
				 "421 4.3.2 mx.example.com Service shutting "
				 "down\r\n");
	cr_assert(smtp_session_want_close(t.s));
	finish();
}

Test(smtp_session, shutdown_idle)
{
	start();
	take();
	smtp_session_shutdown(t.s);
	td_drain(&t);
	cr_assert_str_eq(take(), "421 4.3.2 mx.example.com Service shutting "
				 "down\r\n");
	cr_assert(smtp_session_want_close(t.s));
	finish();
}

Test(smtp_session, close_aborts_or_detaches)
{
	start();
	to_rcpt();
	expect("DATA\r\nabc", "354 End data with <CR><LF>.<CR><LF>\r\n");
	smtp_session_close(t.s);
	t.s = NULL;
	cr_assert_eq(t.fs.aborts, 1);
	t.s = smtp_session_open(t.srv, &t, "192.0.2.9", 43);
	cr_assert_not_null(t.s);
	td_drain(&t);
	t.auto_commit = false;
	to_rcpt();
	expect("DATA\r\nabc\r\n.\r\n", "354 End data with <CR><LF>.<CR><LF>\r\n");
	cr_assert(smtp_session_commit_pending(t.s));
	smtp_session_close(t.s);
	t.s = NULL;
	cr_assert_eq(t.fs.detaches, 1);
	cr_assert_eq(t.fs.aborts, 1);
	finish();
}

Test(smtp_session, pool_exhaustion_and_busy_reply)
{
	struct smtp_session *extra[3];
	size_t len;
	const char *busy;

	start();
	for (int i = 0; i < 3; i++)
		cr_assert_not_null(extra[i] = smtp_session_open(t.srv, NULL,
								"192.0.2.2",
								100 + i));
	cr_assert_null(smtp_session_open(t.srv, NULL, "192.0.2.2", 200));
	busy = smtp_busy_reply(t.srv, &len);
	cr_assert_eq(len, strlen(busy));
	cr_assert_str_eq(busy, "421 4.7.0 mx.example.com Too many "
			       "connections, try again later\r\n");
	smtp_session_close(extra[1]);
	extra[1] = smtp_session_open(t.srv, NULL, "192.0.2.2", 300);
	cr_assert_not_null(extra[1]);
	cr_assert_eq(smtp_session_id(extra[1]), 300);
	cr_assert_null(smtp_session_tctx(extra[1]));
	cr_assert_eq(smtp_session_tctx(t.s), &t);
	for (int i = 0; i < 3; i++)
		smtp_session_close(extra[i]);
	cr_assert_eq(smtp_server_stats(t.srv)->sessions, 5);
	finish();
}

/* Sessions are set up when first opened, not at start: one first opened
 * while a reload had lowered max_recipients still gets recipient slots of
 * the size allocated at start, so that after the limit is raised again
 * two such sessions' recipients do not overlap. */
Test(smtp_session, sessions_first_opened_under_a_lower_limit_keep_their_slots)
{
	struct smtp_config cfg;
	struct smtp_session *a = NULL, *b = NULL, *first;

	td_config(&cfg);
	cfg.max_recipients = 3;
	start_cfg(&cfg, NULL);
	smtp_server_set_policy(t.srv, cfg.domains, cfg.n_domains,
			       cfg.max_message_size, 1, cfg.max_errors,
			       cfg.command_timeout_ms, cfg.data_timeout_ms,
			       false);
	a = smtp_session_open(t.srv, &t, "192.0.2.2", 100);
	b = smtp_session_open(t.srv, &t, "192.0.2.3", 101);
	cr_assert(a && b);
	smtp_server_set_policy(t.srv, cfg.domains, cfg.n_domains,
			       cfg.max_message_size, 3, cfg.max_errors,
			       cfg.command_timeout_ms, cfg.data_timeout_ms,
			       false);
	first = t.s;
	t.s = a;
	td_drain(&t);
	take();
	expect(HELLO FROM "RCPT TO:<a1@example.com>\r\n"
	       "RCPT TO:<a2@example.com>\r\nRCPT TO:<a3@example.com>\r\n",
	       EHLO_REPLY "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n"
	       "250 2.1.5 Ok\r\n");
	t.s = b;
	td_drain(&t);
	take();
	expect(HELLO FROM "RCPT TO:<b1@example.com>\r\n"
	       "RCPT TO:<b2@example.com>\r\nRCPT TO:<b3@example.com>\r\n",
	       EHLO_REPLY "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n"
	       "250 2.1.5 Ok\r\n");
	t.s = a;
	expect("DATA\r\n", "354 End data with <CR><LF>.<CR><LF>\r\n");
	cr_assert_eq(t.fs.n_rcpts, 3);
	cr_assert_str_eq(t.fs.rcpt0, "a1@example.com");
	cr_assert_str_eq(t.fs.rcpt_last, "a3@example.com");
	expect("x\r\n.\r\n", "250 2.0.0 Ok: queued as 0000000000000001\r\n");
	t.s = b;
	expect("DATA\r\n", "354 End data with <CR><LF>.<CR><LF>\r\n");
	cr_assert_str_eq(t.fs.rcpt0, "b1@example.com");
	cr_assert_str_eq(t.fs.rcpt_last, "b3@example.com");
	expect("x\r\n.\r\n", "250 2.0.0 Ok: queued as 0000000000000002\r\n");
	smtp_session_close(a);
	smtp_session_close(b);
	t.s = first;
	finish();
}

Test(smtp_session, commit_failure_then_session_usable)
{
	start();
	to_rcpt();
	t.commit_status = -ENOSPC;
	expect("DATA\r\nx\r\n.\r\n",
	       "354 End data with <CR><LF>.<CR><LF>\r\n"
	       "452 4.3.1 mx.example.com Error: insufficient system "
	       "storage\r\n");
	t.commit_status = -EIO;
	expect(FROM TO "DATA\r\nx\r\n.\r\n",
	       "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
	       "354 End data with <CR><LF>.<CR><LF>\r\n"
	       "451 4.3.0 mx.example.com Error: local error in "
	       "processing\r\n");
	t.commit_status = 0;
	expect(FROM TO "DATA\r\nx\r\n.\r\n",
	       "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
	       "354 End data with <CR><LF>.<CR><LF>\r\n"
	       "250 2.0.0 Ok: queued as 0000000000000003\r\n");
	cr_assert_eq(smtp_server_stats(t.srv)->messages_failed, 2);
	cr_assert_eq(smtp_server_stats(t.srv)->messages_committed, 1);
	finish();
}

Test(smtp_session, begin_and_append_failures)
{
	start();
	to_rcpt();
	t.fs.begin_err = -ENOSPC;
	expect("DATA\r\n", "452 4.3.1 mx.example.com Error: insufficient "
			   "system storage\r\n");
	/* A 4xx to DATA ends the transaction (issue 10). */
	t.fs.begin_err = -EIO;
	expect(FROM TO "DATA\r\n",
	       "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
	       "451 4.3.0 mx.example.com Error: local error in "
	       "processing\r\n");
	t.fs.begin_err = -ENOSPC;
	expect(FROM TO "BDAT 4 LAST\r\nabcdNOOP\r\n",
	       "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
	       "452 4.3.1 mx.example.com Error: insufficient system "
	       "storage\r\n250 2.0.0 Ok\r\n");
	t.fs.begin_err = 0;
	t.fs.append_err = -EIO;
	expect(FROM TO "DATA\r\nabc\r\n.\r\n",
	       "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
	       "354 End data with <CR><LF>.<CR><LF>\r\n"
	       "451 4.3.0 mx.example.com Error: local error in "
	       "processing\r\n");
	cr_assert_eq(t.fs.aborts, 1);
	t.fs.append_err = 0;
	t.fs.commit_err = -ENOSPC;
	expect(FROM TO "DATA\r\nabc\r\n.\r\n",
	       "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
	       "354 End data with <CR><LF>.<CR><LF>\r\n"
	       "452 4.3.1 mx.example.com Error: insufficient system "
	       "storage\r\n");
	cr_assert_eq(t.fs.commits, 0);
	finish();
}

/* begin() -EAGAIN (every spool buffer in flight) is a pause, not an error:
 * DATA / BDAT is held, nothing is answered, and it runs once retried. */
Test(smtp_session, begin_eagain_holds_the_command)
{
	start();
	to_rcpt();
	t.fs.begin_err = -EAGAIN;
	size_t used = smtp_session_input(t.s, (const uint8_t *)"DATA\r\n", 6);
	cr_assert_lt(used, 6, "the DATA line is held, not consumed");
	cr_assert_str_eq(take(), "", "no reply while held");
	cr_assert_eq(t.fs.begins, 0);
	t.fs.begin_err = 0;
	td_feed(&t, "DATA\r\n" + used, 6 - used);
	cr_assert_str_eq(take(), "354 End data with <CR><LF>.<CR><LF>\r\n");
	td_feeds(&t, "x\r\n.\r\n");
	cr_assert(strstr(take(), "250 2.0.0 Ok: queued as "));
	cr_assert_eq(t.fs.begins, 1);
	/* The same for the first BDAT of a transaction. */
	expect(FROM TO, "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n");
	t.fs.begin_err = -EAGAIN;
	used = smtp_session_input(t.s, (const uint8_t *)"BDAT 2 LAST\r\nok", 15);
	cr_assert_lt(used, 13, "the BDAT line is held");
	cr_assert_str_eq(take(), "");
	t.fs.begin_err = 0;
	td_feed(&t, "BDAT 2 LAST\r\nok" + used, 15 - used);
	cr_assert(strstr(take(), "250 2.0.0 Ok: queued as "));
	finish();
}

/* ---- BDAT ---- */

Test(smtp_session, bdat_chunks)
{
	/* Binary but for NUL (issue 10: a NUL rejects, nul_in_bdat_chunk). */
	static const char chunk[] = "a\r\n.\r\nb\nc\r.\r\n\1z"; /* 15 */
	char in[256];
	size_t n;

	start();
	to_rcpt();
	n = (size_t)snprintf(in, sizeof(in), "BDAT %zu\r\n",
			     sizeof(chunk) - 1);
	memcpy(in + n, chunk, sizeof(chunk) - 1);
	n += sizeof(chunk) - 1;
	memcpy(in + n, "BDAT 3 LAST\r\nend", 16);
	n += 16;
	td_feed(&t, in, n);
	cr_assert_str_eq(take(), "250 2.0.0 Ok: 15 octets received\r\n"
				 "250 2.0.0 Ok: queued as 0000000000000001\r\n");
	cr_assert_eq(t.fs.body.len, strlen(RECEIVED_ONE) + 18);
	cr_assert(memcmp(t.fs.body.p + strlen(RECEIVED_ONE),
			 "a\r\n.\r\nb\nc\r.\r\n\1zend", 18) == 0);
	expect(FROM TO "BDAT 0 LAST\r\n",
	       "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
	       "250 2.0.0 Ok: queued as 0000000000000002\r\n");
	cr_assert_str_eq(t.fs.body.p,
			 "Received: from client.example.net ([192.0.2.1])\r\n"
			 "\tby mx.example.com (finaldot) with ESMTP id "
			 "0000000000000002\r\n"
			 "\tfor <bob@example.com>; Tue, 14 Nov 2023 22:13:20 "
			 "+0000\r\n");
	expect(FROM TO "BDAT 2\r\nabBDAT 0\r\nBDAT 1 LAST\r\nc",
	       "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
	       "250 2.0.0 Ok: 2 octets received\r\n"
	       "250 2.0.0 Ok: 0 octets received\r\n"
	       "250 2.0.0 Ok: queued as 0000000000000003\r\n");
	expect("BDAT x\r\n", "501 5.5.4 Syntax: BDAT size [LAST]\r\n");
	finish();
}

Test(smtp_session, bdat_out_of_sequence_consumes_octets)
{
	start();
	take();
	/* The chunk's octets look like commands: never executed. */
	expect("BDAT 6\r\nQUIT\r\nNOOP\r\n",
	       "503 5.5.1 Error: BDAT without a valid MAIL/RCPT "
	       "transaction\r\n250 2.0.0 Ok\r\n");
	expect(HELLO "BDAT 6 LAST\r\nQUIT\r\n" FROM
		     "RCPT TO:<x@elsewhere.example>\r\nBDAT 6 LAST\r\nQUIT\r\n"
		     "NOOP\r\n",
	       EHLO_REPLY "503 5.5.1 Error: BDAT without a valid MAIL/RCPT "
			  "transaction\r\n250 2.1.0 Ok\r\n"
			  "550 5.7.1 Relay access denied\r\n"
			  "554 5.5.1 Error: no valid recipients\r\n"
			  "250 2.0.0 Ok\r\n");
	cr_assert_eq(t.fs.begins, 0);
	cr_assert(!smtp_session_want_close(t.s));
	finish();
}

/* ---- backpressure and output flow ---- */

static void
big_body(struct tbuf *b)
{
	char line[80];
	for (int i = 0; i < 300; i++) {
		int n = snprintf(line, sizeof(line), "%sline %d %s\r\n",
				 i % 7 == 0 ? "." : "", i,
				 i % 5 == 0 ? "xxxxxxxxxxxxxxxxxxxxxxxxxxxx" : "");
		tbuf_put(b, line, (size_t)n);
	}
}

Test(smtp_session, backpressure_small_room)
{
	struct tbuf body = {0}, in = {0}, ref_body = {0};
	size_t caps[] = {0, 1, 3, 7, 64};

	big_body(&body);
	tbuf_put(&in, HELLO FROM TO "DATA\r\n", strlen(HELLO FROM TO) + 6);
	tbuf_put(&in, body.p, body.len);
	tbuf_put(&in, ".\r\n" FROM TO "BDAT 500\r\n", 3 + strlen(FROM TO) + 10);
	tbuf_put(&in, body.p, 500);
	tbuf_put(&in, "BDAT 10 LAST\r\n0123456789QUIT\r\n", 29);
	for (size_t c = 0; c < sizeof(caps) / sizeof(caps[0]); c++) {
		start();
		t.fs.room_cap = caps[c];
		t.fs.room_left = caps[c];
		td_feed(&t, in.p, in.len);
		cr_assert_eq(t.stalls, 0, "cap %zu", caps[c]);
		cr_assert_eq(t.fs.commits, 2, "cap %zu", caps[c]);
		cr_assert_eq(count_str(take(), "queued as"), 2);
		if (c == 0)
			tbuf_put(&ref_body, t.fs.log.p, t.fs.log.len);
		else
			cr_assert(t.fs.log.len == ref_body.len &&
					  memcmp(t.fs.log.p, ref_body.p,
						 ref_body.len) == 0,
				  "cap %zu", caps[c]);
		finish();
	}
	tbuf_free(&body);
	tbuf_free(&in);
	tbuf_free(&ref_body);
}

Test(smtp_session, room_zero_pauses_then_resumes)
{
	const char *in = "DATA\r\nbody\r\n.\r\n";
	size_t n;

	start();
	to_rcpt();
	t.fs.room_cap = 5;
	t.fs.room_left = 0;
	n = smtp_session_input(t.s, (const uint8_t *)in, strlen(in));
	cr_assert_eq(n, 6, "DATA line consumed, body held");
	cr_assert_eq(smtp_session_input(t.s, (const uint8_t *)in + n,
					strlen(in) - n),
		     0);
	t.fs.room_left = 100000;
	t.fs.room_cap = 0;
	cr_assert_eq(smtp_session_input(t.s, (const uint8_t *)in + n,
					strlen(in) - n),
		     strlen(in) - n);
	cr_assert(smtp_session_commit_pending(t.s));
	finish();
}

/* Room 0 for good (the sink's disk is full): the message fails 452 4.3.1
 * at its end, its octets read and dropped, and the session goes on; it
 * was held until its data timeout. DATA and BDAT. */
Test(smtp_session, sink_full_fails_the_message_at_once)
{
	const char *in = "DATA\r\nbody line\r\n.\r\n";

	start();
	to_rcpt();
	t.fs.room_cap = 5;
	t.fs.room_left = 0;
	t.fs.full = true;
	td_feeds(&t, in);
	cr_assert(!smtp_session_commit_pending(t.s));
	cr_assert_str_eq(take(), "354 End data with <CR><LF>.<CR><LF>\r\n"
				 "452 4.3.1 mx.example.com Error: "
				 "insufficient system storage\r\n");
	cr_assert_eq(t.fs.commits, 0);
	cr_assert_eq(t.fs.aborts, 1);
	expect("MAIL FROM:<a@example.org>\r\nRCPT TO:<bob@example.com>\r\n"
	       "BDAT 4 LAST\r\nabcd",
	       "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
	       "452 4.3.1 mx.example.com Error: insufficient system "
	       "storage\r\n");
	cr_assert_eq(t.fs.aborts, 2);
	finish();
}

Test(smtp_session, output_full_stops_input)
{
	struct tbuf in = {0};
	size_t used, total = 0;
	const uint8_t *p;

	start();
	take();
	for (int i = 0; i < 400; i++)
		tbuf_put(&in, "NOOP\r\n", 6);
	used = smtp_session_input(t.s, (const uint8_t *)in.p, in.len);
	cr_assert(used < in.len, "input stops when output is full");
	/* The partial line is consumed, its LF held back. */
	cr_assert_eq(used % 6, 5);
	cr_assert_eq(smtp_session_output(t.s, &p), used / 6 * 14);
	total = used;
	while (total < in.len) {
		size_t n = smtp_session_output(t.s, &p);
		smtp_session_output_done(t.s, n);
		used = smtp_session_input(t.s, (const uint8_t *)in.p + total,
					  in.len - total);
		cr_assert(used > 0);
		total += used;
	}
	tbuf_free(&in);
	finish();
}

/* ---- every split of golden transcripts ---- */

struct golden {
	char name[24];
	char in[1200];
	size_t len; /* 0: strlen(in) */
	uint64_t max_size;
};

static const struct golden goldens[] = {
	{"simple",
	 "EHLO a.example\r\nMAIL FROM:<a@a.example>\r\n"
	 "RCPT TO:<b@example.com>\r\nDATA\r\nSubject: s\r\n\r\n..x\r\n"
	 "\r\n.\r\nQUIT\r\n",
	 0, 0},
	{"pipelined-errors",
	 "HELO a\r\nFOO\r\nMAIL FROM:<a@a.example> SIZE=5\r\n"
	 "MAIL FROM:<a@a.example>\r\nRCPT TO:<b@evil.example>\r\n"
	 "RCPT TO:<c@example.org>\r\nRCPT TO:<postmaster>\r\nDATA\r\n"
	 "line\r\n.\r\nRSET\r\nMAIL FROM:<>\r\nRCPT TO:<b@example.com>\r\n"
	 "DATA\r\n.\r\nNOOP\r\nQUIT\r\n",
	 0, 0},
	{"bdat-binary",
	 "EHLO a\r\nMAIL FROM:<a@a.example>\r\nRCPT TO:<b@example.com>\r\n"
	 "BDAT 14\r\n\r\n.\r\n\n.\n\r\x01\r\x80\r\nBDAT 3 LAST\r\nxyz"
	 "MAIL FROM:<a@a.example>\r\nRCPT TO:<b@example.com>\r\n"
	 "BDAT 0 LAST\r\nBDAT 2\r\nabQUIT\r\n",
	 0, 0},
	{"smuggling",
	 "EHLO a\r\nMAIL FROM:<a@a.example>\r\nRCPT TO:<b@example.com>\r\n"
	 "DATA\r\nx\n.\nMAIL FROM:<e@e.example>\r\nRCPT TO:<v@example.com>"
	 "\r\nDATA\r\ny\r\n.\r\nMAIL FROM:<a@a.example>\r\n"
	 "RCPT TO:<b@example.com>\r\nDATA\r\nz\r.\r\n..\r\n.\r\n"
	 "MAIL FROM:<a@a.example>\r\nRCPT TO:<b@example.com>\r\n"
	 "DATA\r\nok\r\n.\r\nQUIT\r\n",
	 0, 0},
	{"limits",
	 "EHLO a\r\nMAIL FROM:<a@a.example>\r\nRCPT TO:<b@example.com>\r\n"
	 "DATA\r\n0123456789012345678901234567890123456789\r\n.\r\n"
	 "MAIL FROM:<a@a.example>\r\nRCPT TO:<b@example.com>\r\n"
	 "BDAT 50 LAST\r\n01234567890123456789012345678901234567890123456789"
	 "MAIL FROM:<a@a.example>\r\nRCPT TO:<b@example.com>\r\n"
	 "DATA\r\nshort\r\n.\r\nQUIT\r\n",
	 0, 30},
};

static void
golden_run(const struct golden *g, size_t room, size_t split, size_t piece,
	   struct tbuf *out, struct tbuf *log)
{
	struct smtp_config cfg;
	size_t n = g->len ? g->len : strlen(g->in);

	td_config(&cfg);
	if (g->max_size)
		cfg.max_message_size = g->max_size;
	start_cfg(&cfg, NULL);
	t.fs.room_cap = t.fs.room_left = room;
	if (piece) {
		for (size_t off = 0; off < n; off += piece)
			td_feed(&t, g->in + off,
				off + piece > n ? n - off : piece);
	} else {
		td_feed(&t, g->in, split);
		td_feed(&t, g->in + split, n - split);
	}
	cr_assert_eq(t.stalls, 0);
	cr_assert_eq(t.fs.violations, 0);
	tbuf_put(out, t.out.p, t.out.len);
	tbuf_put(log, t.fs.log.p, t.fs.log.len);
	td_close(&t);
}

static void
golden_all_splits(const struct golden *g, size_t room)
{
	struct tbuf ref_out = {0}, ref_log = {0};
	size_t n = g->len ? g->len : strlen(g->in);

	golden_run(g, 0, n, 0, &ref_out, &ref_log);
	cr_assert(count_str(ref_out.p, "221 2.0.0 Bye") == 1 ||
			  g->max_size,
		  "%s: %s", g->name, ref_out.p);
	for (size_t k = 0; k <= n + 1; k++) {
		struct tbuf out = {0}, log = {0};
		if (k <= n)
			golden_run(g, room, k, 0, &out, &log);
		else
			golden_run(g, room, 0, 1, &out, &log);
		cr_assert(out.len == ref_out.len &&
				  memcmp(out.p, ref_out.p, out.len) == 0,
			  "%s split %zu room %zu:\n%s\n--- expected:\n%s",
			  g->name, k, room, out.p, ref_out.p);
		cr_assert(log.len == ref_log.len &&
				  memcmp(log.p, ref_log.p, log.len) == 0,
			  "%s split %zu room %zu: sink differs", g->name, k,
			  room);
		tbuf_free(&out);
		tbuf_free(&log);
	}
	tbuf_free(&ref_out);
	tbuf_free(&ref_log);
}

Test(smtp_session, golden_simple_every_split)
{
	golden_all_splits(&goldens[0], 0);
	golden_all_splits(&goldens[0], 2);
}

Test(smtp_session, golden_pipelined_errors_every_split)
{
	golden_all_splits(&goldens[1], 0);
	golden_all_splits(&goldens[1], 3);
}

Test(smtp_session, golden_bdat_binary_every_split)
{
	golden_all_splits(&goldens[2], 0);
}

Test(smtp_session, golden_smuggling_every_split)
{
	struct tbuf out = {0}, log = {0};

	golden_all_splits(&goldens[3], 0);
	golden_all_splits(&goldens[3], 1);
	golden_run(&goldens[3], 0, 0, 1, &out, &log);
	cr_assert_eq(count_str(out.p, "550 5.6.0"), 2, "%s", out.p);
	cr_assert_eq(count_str(out.p, "queued as"), 1, "%s", out.p);
	cr_assert_eq(count_str(log.p, "[C]"), 1);
	tbuf_free(&out);
	tbuf_free(&log);
}

Test(smtp_session, golden_limits_every_split)
{
	struct tbuf out = {0}, log = {0};

	golden_all_splits(&goldens[4], 0);
	golden_all_splits(&goldens[4], 4);
	golden_run(&goldens[4], 0, 0, 1, &out, &log);
	cr_assert_eq(count_str(out.p, "552 5.3.4"), 2, "%s", out.p);
	cr_assert_eq(count_str(out.p, "queued as"), 1, "%s", out.p);
	tbuf_free(&out);
	tbuf_free(&log);
}

Test(smtp_session, bdat_0_last_held_until_header_fits)
{
	const char *in = "BDAT 0 LAST\r\n";

	start();
	to_rcpt();
	t.fs.room_cap = 5;
	t.fs.room_left = 5;
	cr_assert_eq(smtp_session_input(t.s, (const uint8_t *)in, 13), 12,
		     "the LF is held while the header cannot fit");
	td_drain(&t);
	cr_assert_str_eq(take(), "");
	cr_assert_eq(t.fs.begins, 0);
	t.fs.room_cap = 0;
	cr_assert_eq(smtp_session_input(t.s, (const uint8_t *)in + 12, 1), 1);
	cr_assert(smtp_session_commit_pending(t.s));
	cr_assert_str_eq(t.fs.body.p,
			 RECEIVED_ONE);
	finish();
}

/* ---- DSN parameters (RFC 3461) ---- */

Test(smtp_session, dsn_advertised_after_ehlo_only)
{
	const char *out;

	start();
	take();
	td_feeds(&t, HELLO);
	out = take();
	cr_assert(strstr(out, "\r\n250-DSN\r\n"), "%s", out);
	td_feeds(&t, "HELO c.example.net\r\n");
	cr_assert_str_eq(take(), "250 mx.example.com\r\n");
	finish();
}

Test(smtp_session, dsn_parameters_stored_in_envelope)
{
	start();
	take();
	expect(HELLO "MAIL FROM:<alice@example.net> RET=HDRS "
		     "ENVID=QQ314159+2Bx\r\n"
		     "RCPT TO:<bob@example.com> NOTIFY=SUCCESS,FAILURE "
		     "ORCPT=rfc822;bob+2B1@example.com\r\n"
		     "RCPT TO:<carol@example.org>\r\n"
		     "RCPT TO:<postmaster> NOTIFY=NEVER\r\n"
		     "RCPT TO:<dave@example.com> ORCPT=utf-8;d\\x{E9}@x.example\r\n"
		     "DATA\r\nx\r\n.\r\n",
	       EHLO_REPLY "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n"
			  "250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n"
			  "354 End data with <CR><LF>.<CR><LF>\r\n"
			  "250 2.0.0 Ok: queued as 0000000000000001\r\n");
	cr_assert_eq(t.fs.n_rcpts, 4);
	cr_assert_str_eq(t.fs.envid, "QQ314159+2Bx");
	cr_assert_eq(t.fs.ret, FD_RET_HDRS);
	cr_assert(t.fs.has_notify);
	cr_assert_eq(t.fs.notify[0], FD_NOTIFY_SUCCESS | FD_NOTIFY_FAILURE);
	cr_assert_eq(t.fs.notify[1], FD_NOTIFY_NONE);
	cr_assert_eq(t.fs.notify[2], FD_NOTIFY_NEVER);
	cr_assert_eq(t.fs.notify[3], FD_NOTIFY_NONE);
	cr_assert(t.fs.has_orcpts);
	cr_assert_str_eq(t.fs.orcpt[0], "rfc822;bob+2B1@example.com");
	cr_assert_str_eq(t.fs.orcpt[1], "");
	cr_assert_str_eq(t.fs.orcpt[2], "");
	cr_assert_str_eq(t.fs.orcpt[3], "utf-8;d\\x{E9}@x.example");
	/* The next transaction starts clean. */
	expect(FROM TO "DATA\r\ny\r\n.\r\n",
	       "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
	       "354 End data with <CR><LF>.<CR><LF>\r\n"
	       "250 2.0.0 Ok: queued as 0000000000000002\r\n");
	cr_assert_str_eq(t.fs.envid, "");
	cr_assert_eq(t.fs.ret, FD_RET_NONE);
	cr_assert(!t.fs.has_notify);
	cr_assert(!t.fs.has_orcpts);
	finish();
}

Test(smtp_session, dsn_keywords_case_insensitive_with_bdat)
{
	start();
	take();
	expect(HELLO "MAIL FROM:<> ret=full Envid=abc SIZE=3\r\n"
		     "RCPT TO:<bob@example.com> orcpt=RFC822;b@x "
		     "notify=delay,Success\r\nBDAT 3 LAST\r\nabc",
	       EHLO_REPLY "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
			  "250 2.0.0 Ok: queued as 0000000000000001\r\n");
	cr_assert_eq(t.fs.ret, FD_RET_FULL);
	cr_assert_str_eq(t.fs.envid, "abc");
	cr_assert_eq(t.fs.notify[0], FD_NOTIFY_DELAY | FD_NOTIFY_SUCCESS);
	cr_assert_str_eq(t.fs.orcpt[0], "RFC822;b@x");
	cr_assert_eq(t.fs.size_param, 3);
	finish();
}

static void
long_value(char *buf, size_t n, char c)
{
	memset(buf, c, n);
	buf[n] = '\0';
}

Test(smtp_session, dsn_malformed_or_duplicate_parameters_501)
{
	static const char *const mail_bad[] = {
		"RET=PARTIAL", "RET", "RET=", "RET=FULL RET=HDRS",
		"RET=FULL RET=FULL", "ENVID", "ENVID=a+2", "ENVID=a+zz",
		"ENVID=a+2b", "ENVID=a+", "ENVID=\xc3\xa9t\xc3\xa9",
		"ENVID=a ENVID=b", "ENVID=a=b",
	};
	static const char *const rcpt_bad[] = {
		"NOTIFY=NEVER,SUCCESS", "NOTIFY=SUCCESS,NEVER", "NOTIFY",
		"NOTIFY=", "NOTIFY=SUCCESS,", "NOTIFY=,FAILURE",
		"NOTIFY=SUCCES", "NOTIFY=DELAY NOTIFY=DELAY",
		"ORCPT=rfc822", "ORCPT=;a@b.example", "ORCPT=rfc822;a+ZZ",
		"ORCPT=rfc\"822;a@b", "ORCPT=rfc822;a@b ORCPT=rfc822;a@b",
		"ORCPT=rfc822;a\xc3\xa9@b", "ORCPT",
	};
	char line[1100], v[600];
	struct smtp_config cfg;

	td_config(&cfg);
	cfg.max_errors = 0;
	start_cfg(&cfg, NULL);
	take();
	expect(HELLO, EHLO_REPLY);
	for (size_t i = 0; i < sizeof(mail_bad) / sizeof(mail_bad[0]); i++) {
		snprintf(line, sizeof(line), "MAIL FROM:<a@b.example> %s\r\n",
			 mail_bad[i]);
		expect(line, "501 5.5.4 Syntax error in MAIL parameters\r\n");
	}
	/* ENVID: 100 octets is the limit (RFC 3461 4.4). */
	long_value(v, 101, 'e');
	snprintf(line, sizeof(line), "MAIL FROM:<a@b.example> ENVID=%s\r\n", v);
	expect(line, "501 5.5.4 Syntax error in MAIL parameters\r\n");
	long_value(v, 100, 'e');
	snprintf(line, sizeof(line), "MAIL FROM:<a@b.example> ENVID=%s\r\n", v);
	expect(line, "250 2.1.0 Ok\r\n");
	cr_assert_eq(smtp_server_stats(t.srv)->syntax_errors, 14);
	for (size_t i = 0; i < sizeof(rcpt_bad) / sizeof(rcpt_bad[0]); i++) {
		snprintf(line, sizeof(line), "RCPT TO:<bob@example.com> %s\r\n",
			 rcpt_bad[i]);
		expect(line, "501 5.5.4 Syntax error in RCPT parameters\r\n");
	}
	expect("DATA\r\n", "554 5.5.1 Error: no valid recipients\r\n");
	cr_assert_eq(t.fs.begins, 0);
	finish();
}

Test(smtp_session, dsn_orcpt_longer_than_500_rejected)
{
	char line[1200], v[1100];
	struct smtp_config cfg;

	td_config(&cfg);
	cfg.max_errors = 0;
	start_cfg(&cfg, NULL);
	take();
	expect(HELLO FROM, EHLO_REPLY "250 2.1.0 Ok\r\n");
	/* "rfc822;" + 494 = 501 octets. */
	long_value(v, 494, 'x');
	snprintf(line, sizeof(line),
		 "RCPT TO:<bob@example.com> ORCPT=rfc822;%s\r\n", v);
	expect(line, "501 5.5.4 Syntax error in RCPT parameters\r\n");
	/* 500 is fine, and the line (548 octets) is over 512: RCPT lines
	 * may be longer (RFC 3461 4). */
	long_value(v, 493, 'x');
	snprintf(line, sizeof(line),
		 "RCPT TO:<bob@example.com> ORCPT=rfc822;%s NOTIFY=DELAY\r\n",
		 v);
	cr_assert_gt(strlen(line), 512);
	expect(line, "250 2.1.5 Ok\r\n");
	/* Other verbs keep 512. */
	long_value(v, 600, 'n');
	snprintf(line, sizeof(line), "NOOP %s\r\n", v);
	expect(line, "500 5.5.2 Error: line too long\r\n");
	/* And MAIL/RCPT stop at 1024. */
	long_value(v, 1030, 'x');
	v[0] = '<';
	snprintf(line, sizeof(line), "RCPT TO:%.1050s\r\n", v);
	expect(line, "500 5.5.2 Error: line too long\r\n");
	expect("DATA\r\nx\r\n.\r\n",
	       "354 End data with <CR><LF>.<CR><LF>\r\n"
	       "250 2.0.0 Ok: queued as 0000000000000001\r\n");
	cr_assert_eq(strlen(t.fs.orcpt[0]), 500);
	cr_assert_eq(t.fs.notify[0], FD_NOTIFY_DELAY);
	finish();
}

Test(smtp_session, dsn_parameters_need_ehlo)
{
	start();
	take();
	expect("HELO c.example.net\r\n", "250 mx.example.com\r\n");
	expect("MAIL FROM:<a@b.example> RET=FULL\r\n",
	       "555 5.5.4 MAIL parameters require EHLO\r\n");
	expect("MAIL FROM:<a@b.example>\r\n", "250 2.1.0 Ok\r\n");
	expect("RCPT TO:<bob@example.com> NOTIFY=NEVER\r\n",
	       "555 5.5.4 RCPT parameters require EHLO\r\n");
	finish();
}

/* The spool keeps an envelope in one record of at most SPOOL_ENV_MAX
 * octets. 100 recipients of 252 octets with 500-octet ORCPTs would pass
 * it (the spool then refused the message at DATA with a 451, at every
 * retry): the RCPT that would pass it gets 452 4.5.3, the client sends
 * the rest in another transaction, and what was accepted encodes. */
Test(smtp_session, recipients_past_what_the_spool_takes_get_452)
{
	static char addrs[100][260], orcpts[100][520];
	const char *rp[100], *op[100];
	static char dom[200];
	const char *doms[1] = { dom };
	char line[900], local[62], v[494];
	unsigned ok = 0, refused = 0;
	struct smtp_config cfg;
	struct fd_envelope e;

	/* local part 64, domain 187 (labels of 59): a 252-octet mailbox */
	for (int k = 0; k < 3; k++) {
		memset(dom + 60 * k, 'd', 59);
		dom[60 * k + 59] = '.';
	}
	strcpy(dom + 180, "example");
	td_config(&cfg);
	cfg.domains = doms;
	cfg.n_domains = 1;
	cfg.max_recipients = 100;
	start_cfg(&cfg, NULL);
	take();
	expect(HELLO FROM, EHLO_REPLY "250 2.1.0 Ok\r\n");
	long_value(local, 61, 'l');
	long_value(v, 491, 'o');
	for (int i = 0; i < 100; i++) {
		snprintf(addrs[i], sizeof(addrs[i]), "%03d%.61s@%.187s", i,
			 local, dom);
		snprintf(orcpts[i], sizeof(orcpts[i]), "rfc822;%02d%s", i % 100,
			 v);
		snprintf(line, sizeof(line),
			 "RCPT TO:<%.259s> ORCPT=%.519s\r\n", addrs[i],
			 orcpts[i]);
		td_feeds(&t, line);
		const char *out = take();
		if (strcmp(out, "250 2.1.5 Ok\r\n") == 0) {
			cr_assert_eq(refused, 0, "accepted after a refusal");
			rp[ok] = addrs[i];
			op[ok] = orcpts[i];
			ok++;
		} else {
			cr_assert_str_eq(out, "452 4.5.3 Error: too many "
					      "recipients\r\n");
			refused++;
		}
	}
	cr_assert_eq(strlen(addrs[0]), 252);
	cr_assert_eq(strlen(orcpts[0]), 500);
	cr_assert_gt(refused, 0, "all 100 taken: the spool would refuse");
	cr_assert_gt(ok, 75, "only %u taken", ok);
	expect("DATA\r\nx\r\n.\r\n",
	       "354 End data with <CR><LF>.<CR><LF>\r\n"
	       "250 2.0.0 Ok: queued as 0000000000000001\r\n");
	cr_assert_eq(t.fs.n_rcpts, ok);
	e = (struct fd_envelope){
		.mail_from = t.fs.mail_from, .rcpts = rp, .n_rcpts = ok,
		.helo = t.fs.helo, .client_addr = t.fs.client,
		.proto = t.fs.proto, .envid = t.fs.envid, .orcpts = op,
	};
	cr_assert_neq(spool_env_encoded_len(&e), 0,
		      "the spool would not take the envelope accepted");
	/* a new transaction starts from nothing */
	expect("MAIL FROM:<alice@example.net>\r\n", "250 2.1.0 Ok\r\n");
	snprintf(line, sizeof(line), "RCPT TO:<%.259s> ORCPT=%.519s\r\n",
		 addrs[99], orcpts[99]);
	expect(line, "250 2.1.5 Ok\r\n");
	finish();
}

/* Long ORCPTs (about 460 octets a recipient) go on past the arena: 40
 * of them all taken, with their ORCPTs whole, also one refused in
 * between taking nothing from the others. (The arena alone took 17.) */
Test(smtp_session, dsn_orcpts_go_on_past_the_arena)
{
	char line[700], v[450];
	unsigned ok = 0;
	struct smtp_config cfg;

	td_config(&cfg);
	cfg.max_recipients = 100;
	start_cfg(&cfg, NULL);
	take();
	expect(HELLO FROM, EHLO_REPLY "250 2.1.0 Ok\r\n");
	long_value(v, 440, 'o');
	for (int i = 0; i < 40; i++) {
		snprintf(line, sizeof(line),
			 "RCPT TO:<r%02d@example.com> ORCPT=rfc822;%02d%s\r\n",
			 i, i, v);
		td_feeds(&t, line);
		const char *out = take();
		if (strcmp(out, "250 2.1.5 Ok\r\n") == 0)
			ok++;
		if (i == 30) /* refused: its copies are undone */
			expect("RCPT TO:<x@elsewhere.test> ORCPT=rfc822;y\r\n",
			       "550 5.7.1 Relay access denied\r\n");
	}
	cr_assert_eq(ok, 40);
	expect("RCPT TO:<s@example.com>\r\n", "250 2.1.5 Ok\r\n");
	expect("DATA\r\nx\r\n.\r\n",
	       "354 End data with <CR><LF>.<CR><LF>\r\n"
	       "250 2.0.0 Ok: queued as 0000000000000001\r\n");
	cr_assert_eq(t.fs.n_rcpts, 41);
	cr_assert(strncmp(t.fs.orcpt[3], "rfc822;03ooo", 12) == 0);
	cr_assert_eq(strlen(t.fs.orcpt[3]), 7 + 2 + 440);
	expect("RSET\r\n" FROM, "250 2.0.0 Ok\r\n250 2.1.0 Ok\r\n");
	for (int i = 0; i < 40; i++) { /* the last one from the overflow */
		snprintf(line, sizeof(line),
			 "RCPT TO:<q%02d@example.com> ORCPT=rfc822;%02d%s\r\n",
			 i, i, v);
		expect(line, "250 2.1.5 Ok\r\n");
	}
	expect("DATA\r\nx\r\n.\r\n",
	       "354 End data with <CR><LF>.<CR><LF>\r\n"
	       "250 2.0.0 Ok: queued as 0000000000000002\r\n");
	cr_assert_str_eq(t.fs.rcpt_last, "q39@example.com");
	cr_assert(strncmp(t.fs.orcpt_last, "rfc822;39ooo", 12) == 0);
	cr_assert_eq(strlen(t.fs.orcpt_last), 7 + 2 + 440);
	finish();
}

/* Every split of a DSN transaction: same replies, same envelope. */
Test(smtp_session, dsn_parameters_every_split)
{
	static const char in[] =
		"EHLO a.example\r\nMAIL FROM:<a@a.example> ENVID=id+2B1 "
		"RET=HDRS\r\nRCPT TO:<b@example.com> NOTIFY=FAILURE,DELAY "
		"ORCPT=rfc822;b+2Bx@example.com\r\nRCPT TO:<c@example.com> "
		"NOTIFY=NEVER\r\nRCPT TO:<d@example.com> NOTIFY=NEVER,DELAY"
		"\r\nDATA\r\nbody\r\n.\r\nQUIT\r\n";
	static const char replies[] =
		EHLO_REPLY "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n"
			   "501 5.5.4 Syntax error in RCPT parameters\r\n"
			   "354 End data with <CR><LF>.<CR><LF>\r\n"
			   "250 2.0.0 Ok: queued as 0000000000000001\r\n"
			   "221 2.0.0 Bye\r\n";
	size_t n = sizeof(in) - 1;

	for (size_t k = 0; k <= n + 1; k++) {
		start();
		take();
		if (k <= n) {
			td_feed(&t, in, k);
			td_feed(&t, in + k, n - k);
		} else {
			for (size_t i = 0; i < n; i++)
				td_feed(&t, in + i, 1);
		}
		cr_assert_str_eq(take(), replies, "split %zu", k);
		cr_assert_str_eq(t.fs.envid, "id+2B1", "split %zu", k);
		cr_assert_eq(t.fs.ret, FD_RET_HDRS, "split %zu", k);
		cr_assert_eq(t.fs.n_rcpts, 2);
		cr_assert_eq(t.fs.notify[0], FD_NOTIFY_FAILURE | FD_NOTIFY_DELAY);
		cr_assert_eq(t.fs.notify[1], FD_NOTIFY_NEVER);
		cr_assert_str_eq(t.fs.orcpt[0], "rfc822;b+2Bx@example.com");
		cr_assert_str_eq(t.fs.orcpt[1], "");
		finish();
	}
}

/* ---- recipient check hook ---- */

struct fake_rcptdb {
	unsigned calls;
	char last[300];
};

static int
fake_rcpt_check(void *ctx, const char *addr)
{
	struct fake_rcptdb *db = ctx;

	db->calls++;
	snprintf(db->last, sizeof(db->last), "%s", addr);
	if (strncmp(addr, "unknown", 7) == 0)
		return 0;
	if (strncmp(addr, "tempfail", 8) == 0)
		return -5;
	return 1;
}

static struct fake_rcptdb rdb;

static void
start_checked(unsigned max_errors)
{
	struct smtp_config cfg;

	memset(&rdb, 0, sizeof(rdb));
	td_config(&cfg);
	cfg.rcpt_check = fake_rcpt_check;
	cfg.rcpt_ctx = &rdb;
	cfg.max_errors = max_errors;
	start_cfg(&cfg, NULL);
	take();
	expect(HELLO FROM, EHLO_REPLY "250 2.1.0 Ok\r\n");
}

Test(smtp_session, rcpt_check_unknown_550_tempfail_450)
{
	start_checked(20);
	expect("RCPT TO:<Bob@Example.COM>\r\n", "250 2.1.5 Ok\r\n");
	cr_assert_eq(rdb.calls, 1);
	cr_assert_str_eq(rdb.last, "Bob@Example.COM");
	expect("RCPT TO:<unknown@example.com> NOTIFY=NEVER\r\n",
	       "550 5.1.1 <unknown@example.com>: Recipient address "
	       "rejected: User unknown\r\n");
	expect("RCPT TO:<tempfail@example.org>\r\n",
	       "450 4.1.1 <tempfail@example.org>: Recipient address "
	       "rejected: try again later\r\n");
	expect("RCPT TO:<carol@example.org> ORCPT=rfc822;c@x\r\n"
	       "DATA\r\nx\r\n.\r\n",
	       "250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
	       "250 2.0.0 Ok: queued as 0000000000000001\r\n");
	/* Only the accepted ones, with their own parameters. */
	cr_assert_eq(t.fs.n_rcpts, 2);
	cr_assert_str_eq(t.fs.rcpt0, "Bob@Example.COM");
	cr_assert(!t.fs.has_notify, "the refused RCPT's NOTIFY is gone");
	cr_assert_str_eq(t.fs.orcpt[0], "");
	cr_assert_str_eq(t.fs.orcpt[1], "rfc822;c@x");
	cr_assert_eq(smtp_server_stats(t.srv)->rcpt_unknown, 1);
	cr_assert_eq(smtp_server_stats(t.srv)->syntax_errors, 0);
	finish();
}

Test(smtp_session, rcpt_check_skips_postmaster_and_relay_denied)
{
	start_checked(20);
	expect("RCPT TO:<postmaster>\r\nRCPT TO:<PostMaster@example.org>\r\n"
	       "RCPT TO:<postmaster@EXAMPLE.com>\r\n",
	       "250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n");
	expect("RCPT TO:<unknown@elsewhere.example>\r\n",
	       "550 5.7.1 Relay access denied\r\n");
	/* Quoted it is the same mailbox (RFC 5322 3.2.4): never asked about
	 * either (it got 550 from a table that had no such spelling). */
	expect("RCPT TO:<\"postmaster\"@example.com>\r\n"
	       "RCPT TO:<\"Post\\master\"@example.org>\r\n",
	       "250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n");
	cr_assert_eq(rdb.calls, 0);
	/* Another quoted local part is asked about, as given. */
	expect("RCPT TO:<\"unknown\"@example.com>\r\n",
	       "250 2.1.5 Ok\r\n");
	cr_assert_eq(rdb.calls, 1);
	cr_assert_str_eq(rdb.last, "\"unknown\"@example.com");
	finish();
}

Test(smtp_session, rcpt_check_unknowns_count_toward_max_errors)
{
	start_checked(3);
	expect("RCPT TO:<tempfail1@example.com>\r\n"
	       "RCPT TO:<tempfail2@example.com>\r\n"
	       "RCPT TO:<unknown1@example.com>\r\n"
	       "RCPT TO:<unknown2@example.com>\r\nDATA\r\n",
	       "450 4.1.1 <tempfail1@example.com>: Recipient address "
	       "rejected: try again later\r\n"
	       "450 4.1.1 <tempfail2@example.com>: Recipient address "
	       "rejected: try again later\r\n"
	       "550 5.1.1 <unknown1@example.com>: Recipient address "
	       "rejected: User unknown\r\n"
	       "550 5.1.1 <unknown2@example.com>: Recipient address "
	       "rejected: User unknown\r\n"
	       "554 5.5.1 Error: no valid recipients\r\n");
	expect("RCPT TO:<unknown3@example.com>\r\nNOOP\r\n",
	       "550 5.1.1 <unknown3@example.com>: Recipient address "
	       "rejected: User unknown\r\n"
	       "421 4.7.0 mx.example.com Error: too many errors\r\n");
	cr_assert(smtp_session_want_close(t.s));
	cr_assert_eq(smtp_server_stats(t.srv)->rcpt_unknown, 3);
	cr_assert_eq(t.fs.begins, 0);
	finish();
}

/* ---- issue 10 ---- */

/*
 * After a 4xx to DATA (the spool full or failing) the transaction is over:
 * the client's next MAIL is a new transaction, not a nested MAIL (503) that
 * would count toward max_errors. Here max_errors is 1: one such 503 would
 * have ended the session with 421.
 */
Test(smtp_session, data_4xx_resets_the_transaction)
{
	struct smtp_config cfg;

	td_config(&cfg);
	cfg.max_errors = 1;
	start_cfg(&cfg, NULL);
	to_rcpt();
	t.fs.begin_err = -ENOSPC;
	expect("DATA\r\n", "452 4.3.1 mx.example.com Error: insufficient "
			   "system storage\r\n");
	t.fs.begin_err = -EIO;
	expect(FROM TO "DATA\r\n",
	       "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
	       "451 4.3.0 mx.example.com Error: local error in "
	       "processing\r\n");
	t.fs.begin_err = 0;
	expect(FROM TO "DATA\r\nretry\r\n.\r\n",
	       "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
	       "354 End data with <CR><LF>.<CR><LF>\r\n"
	       "250 2.0.0 Ok: queued as 0000000000000001\r\n");
	cr_assert(!smtp_session_want_close(t.s));
	cr_assert_eq(smtp_server_stats(t.srv)->syntax_errors, 0);
	cr_assert_eq(smtp_server_stats(t.srv)->messages_failed, 2);
	finish();
}

/*
 * NUL octets in DATA: stored and answered 250 before issue 10. A next hop
 * that strips NULs turns "\r\n\0.\r\n" and "\r\n.\0\r\n" into the end of
 * data, so the rest would be smuggled as a second message one hop later.
 * Now a NUL rejects the message like a bare CR/LF: 550 5.6.0 at its end.
 */
static void
nul_variant(const char *v, size_t vlen)
{
	char in[512];
	size_t n = 0;
	static const char head[] = "DATA\r\nhello\r\n";
	static const char tail[] = "MAIL FROM:<evil@evil.example>\r\n"
				   "\r\n.\r\nNOOP\r\n";

	memcpy(in, head, sizeof(head) - 1);
	n += sizeof(head) - 1;
	memcpy(in + n, v, vlen);
	n += vlen;
	memcpy(in + n, tail, sizeof(tail) - 1);
	n += sizeof(tail) - 1;
	start();
	to_rcpt();
	td_feed(&t, in, n);
	const char *out = take();
	cr_assert_str_eq(out,
			 "354 End data with <CR><LF>.<CR><LF>\r\n"
			 "550 5.6.0 Error: NUL octet in message data\r\n"
			 "250 2.0.0 Ok\r\n",
			 "variant %zu: %s", vlen, out);
	cr_assert_eq(t.fs.commits, 0);
	cr_assert_eq(t.fs.aborts, 1);
	cr_assert_eq(smtp_server_stats(t.srv)->messages_rejected, 1);
	finish();
}

Test(smtp_session, nul_before_dot) { nul_variant("\0.\r\n", 4); }
Test(smtp_session, nul_after_dot) { nul_variant(".\0\r\n", 4); }
Test(smtp_session, nul_in_text) { nul_variant("a\0b\r\n", 5); }

/*
 * BDAT without BINARYMIME: a NUL in a chunk rejects the message too, in
 * the reply to that chunk (RFC 3030 2: after a 5xx to a chunk the client
 * sends no more of them), here the first of two.
 */
Test(smtp_session, nul_in_bdat_chunk)
{
	start();
	to_rcpt();
	td_feed(&t, "BDAT 5\r\nab\0cdNOOP\r\n", 19);
	cr_assert_str_eq(take(), "550 5.6.0 Error: NUL octet in message "
				 "data\r\n250 2.0.0 Ok\r\n");
	cr_assert_eq(t.fs.commits, 0);
	cr_assert_eq(t.fs.aborts, 1);
	expect(FROM TO "BDAT 4 LAST\r\nab\r\n",
	       "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
	       "250 2.0.0 Ok: queued as 0000000000000002\r\n");
	finish();
}

/* ---- deadlines (RFC 5321 4.5.3.2; issue 10: slowloris) ---- */

static uint64_t fake_mono;
static uint64_t
fake_clock(void)
{
	return fake_mono;
}

static void
start_deadlines(void)
{
	struct smtp_config cfg;

	td_config(&cfg);
	cfg.mono_us = fake_clock;
	cfg.command_timeout_ms = 60000;
	cfg.data_timeout_ms = 120000;
	fake_mono = 1000000;
	start_cfg(&cfg, NULL);
	take();
}

/* One octet every 10 s keeps any idle timer quiet; the command line has
 * a deadline from its first octet. */
Test(smtp_session, command_trickled_a_byte_at_a_time)
{
	static const char line[] = "NOOP and some more words to trickle\r\n";

	start_deadlines();
	expect(HELLO, EHLO_REPLY);
	size_t i;
	for (i = 0; i < sizeof(line) - 1 && !smtp_session_want_close(t.s);
	     i++) {
		td_feed(&t, line + i, 1);
		fake_mono += 10 * 1000000;
	}
	cr_assert_lt(i, sizeof(line) - 1, "the line completed");
	cr_assert_eq(i, 8, "the octet after 60 s ends it (%zu)", i);
	cr_assert_str_eq(take(), "421 4.4.2 mx.example.com Error: timeout "
				 "exceeded\r\n");
	cr_assert(smtp_session_want_close(t.s));
	cr_assert_eq(smtp_server_stats(t.srv)->timeouts, 1);
	finish();
}

/* Quick commands after a long pause are fine: the deadline runs from the
 * first octet of the line, silence is the transport's idle timeout. */
Test(smtp_session, pause_between_commands_is_not_a_timeout)
{
	start_deadlines();
	expect(HELLO, EHLO_REPLY);
	fake_mono += 3600ull * 1000000;
	expect("NOOP\r\n", "250 2.0.0 Ok\r\n");
	fake_mono += 59 * 1000000;
	expect("NO", "");
	fake_mono += 59 * 1000000;
	expect("OP\r\n", "250 2.0.0 Ok\r\n");
	finish();
}

/* The message's data has a total limit, however fast each piece comes. */
Test(smtp_session, data_total_time_limit)
{
	start_deadlines();
	to_rcpt();
	expect("DATA\r\n", "354 End data with <CR><LF>.<CR><LF>\r\n");
	for (int i = 0; i < 11; i++) {
		expect("a line of the body\r\n", "");
		fake_mono += 10 * 1000000; /* 110 s in all */
	}
	fake_mono += 11 * 1000000;
	expect("one too late\r\n",
	       "421 4.4.2 mx.example.com Error: timeout exceeded\r\n");
	cr_assert(smtp_session_want_close(t.s));
	cr_assert_eq(t.fs.aborts, 1);
	cr_assert_eq(t.fs.commits, 0);
	finish();
}

/* BDAT: the limit spans the chunks and the commands between them. */
Test(smtp_session, bdat_total_time_limit)
{
	start_deadlines();
	to_rcpt();
	expect("BDAT 3\r\nabc", "250 2.0.0 Ok: 3 octets received\r\n");
	fake_mono += 100 * 1000000;
	expect("BDAT 3\r\ndef", "250 2.0.0 Ok: 3 octets received\r\n");
	fake_mono += 21 * 1000000;
	expect("BDAT 3 LAST\r\nghi",
	       "421 4.4.2 mx.example.com Error: timeout exceeded\r\n");
	cr_assert_eq(t.fs.aborts, 1);
	cr_assert_eq(t.fs.commits, 0);
	finish();
}

/* 0 is no limit. */
Test(smtp_session, deadlines_zero_is_no_limit)
{
	struct smtp_config cfg;

	td_config(&cfg);
	cfg.mono_us = fake_clock;
	cfg.command_timeout_ms = 0;
	cfg.data_timeout_ms = 0;
	fake_mono = 1;
	start_cfg(&cfg, NULL);
	take();
	expect("NO", "");
	fake_mono += 86400ull * 1000000;
	expect("OP\r\n", "250 2.0.0 Ok\r\n");
	finish();
}

/* The shutdown deadline: a commit still in flight gets 421 4.3.2 instead
 * of its verdict, and the message is detached (never aborted: it may yet
 * become durable). */
Test(smtp_session, shutdown_now_with_commit_in_flight)
{
	start();
	to_rcpt();
	t.auto_commit = false;
	expect("DATA\r\nx\r\n.\r\n", "354 End data with <CR><LF>.<CR><LF>\r\n");
	smtp_session_shutdown(t.s);
	td_drain(&t);
	cr_assert_str_eq(take(), "");
	smtp_session_shutdown_now(t.s);
	td_drain(&t);
	cr_assert_str_eq(take(), "421 4.3.2 mx.example.com Service shutting "
				 "down\r\n");
	cr_assert(smtp_session_want_close(t.s));
	cr_assert_eq(t.fs.detaches, 1);
	cr_assert_eq(t.fs.aborts, 0);
	cr_assert_eq(smtp_server_stats(t.srv)->messages_committed, 0);
	finish();
}
