/* Command-line reader and argument parsers (smtp_parse.h). */
#include <criterion/criterion.h>
#include <criterion/parameterized.h>
#include <string.h>

#include "smtp/smtp_parse.h"
#include "smtp_test_lsan.h"

TestSuite(smtp_parse, .fini = lsan_fini);

Test(smtp_parse, line_reader_holds_lf_and_strips_cr)
{
	struct smtp_line l;
	const char *c;
	size_t used;

	smtp_line_reset(&l);
	cr_assert_eq(smtp_line_feed(&l, (const uint8_t *)"NO", 2, &used),
		     SMTP_PARSE_AGAIN);
	cr_assert_eq(used, 2);
	cr_assert_eq(smtp_line_feed(&l, (const uint8_t *)"OP\r\nX", 5, &used),
		     SMTP_PARSE_OK);
	cr_assert_eq(used, 3, "the LF is left to the caller");
	/* Offering the same LF again gives the same line. */
	cr_assert_eq(smtp_line_feed(&l, (const uint8_t *)"\nX", 2, &used),
		     SMTP_PARSE_OK);
	cr_assert_eq(used, 0);
	cr_assert_eq(smtp_line_content(&l, &c), 4);
	cr_assert(memcmp(c, "NOOP", 4) == 0);
	smtp_line_reset(&l);
	cr_assert_eq(smtp_line_feed(&l, (const uint8_t *)"QUIT\n", 5, &used),
		     SMTP_PARSE_OK);
	cr_assert_eq(smtp_line_content(&l, &c), 4);
}

Test(smtp_parse, line_reader_limit_512)
{
	struct smtp_line l;
	uint8_t buf[1200];
	size_t used, off = 0;

	memset(buf, 'a', sizeof(buf));
	buf[510] = '\r';
	buf[511] = '\n';
	smtp_line_reset(&l);
	cr_assert_eq(smtp_line_feed(&l, buf, 512, &used), SMTP_PARSE_OK);
	cr_assert_eq(used, 511);
	/* 513 octets, fed one at a time. */
	memset(buf, 'a', sizeof(buf));
	buf[511] = '\r';
	buf[512] = '\n';
	smtp_line_reset(&l);
	for (off = 0; off < 512; off++)
		cr_assert_eq(smtp_line_feed(&l, buf + off, 1, &used),
			     SMTP_PARSE_AGAIN);
	cr_assert_eq(smtp_line_feed(&l, buf + 512, 1, &used),
		     SMTP_PARSE_ERR_TOO_LONG);
	/* A much longer line is discarded to its LF. */
	buf[1199] = '\n';
	smtp_line_reset(&l);
	cr_assert_eq(smtp_line_feed(&l, buf + 513, 1200 - 513, &used),
		     SMTP_PARSE_ERR_TOO_LONG);
	cr_assert_eq(used, 1200 - 513 - 1);
}

Test(smtp_parse, command_split)
{
	struct smtp_cmd c;

	cr_assert_eq(smtp_parse_command("MAIL FROM:<a@b>  ", 17, &c),
		     SMTP_PARSE_OK);
	cr_assert_eq(c.verb_len, 4);
	cr_assert_eq(c.arg_len, 10);
	cr_assert(memcmp(c.arg, "FROM:<a@b>", 10) == 0);
	cr_assert_eq(smtp_parse_command("quit", 4, &c), SMTP_PARSE_OK);
	cr_assert_eq(c.arg_len, 0);
	cr_assert_eq(smtp_parse_command("", 0, &c), SMTP_PARSE_ERR_SYNTAX);
	cr_assert_eq(smtp_parse_command("MAIL:x", 6, &c),
		     SMTP_PARSE_ERR_SYNTAX);
	cr_assert_eq(smtp_parse_command("NO\0OP", 5, &c), SMTP_PARSE_ERR_CHAR);
	cr_assert_eq(smtp_parse_command("NOOP\tx", 6, &c),
		     SMTP_PARSE_ERR_CHAR);
	cr_assert_str_eq(smtp_parse_result_name(SMTP_PARSE_ERR_CHAR),
			 "bad-char");
}

struct path_case {
	char arg[300];
	enum smtp_parse_result result;
	char mailbox[128];
	char domain[128];
	bool special;
	bool non_ascii;
};

/* Strings inline: parameterized Criterion tests crash when the parameter
 * struct points at string literals. */
static struct path_case rcpt_cases[] = {
	{"TO:<bob@example.com>", SMTP_PARSE_OK, "bob@example.com",
	 "example.com", false, false},
	{"to: <bob@example.com>", SMTP_PARSE_OK, "bob@example.com",
	 "example.com", false, false},
	{"TO:<first.last+tag@sub.example.com>", SMTP_PARSE_OK,
	 "first.last+tag@sub.example.com", "sub.example.com", false, false},
	{"TO:<@a.example,@b.example:bob@c.example>", SMTP_PARSE_OK,
	 "bob@c.example", "c.example", false, false},
	{"TO:<\"a b\\\"c\"@example.com>", SMTP_PARSE_OK,
	 "\"a b\\\"c\"@example.com", "example.com", false, false},
	{"TO:<\"x@y\"@example.com>", SMTP_PARSE_OK, "\"x@y\"@example.com",
	 "example.com", true, false},
	{"TO:<a%b@example.com>", SMTP_PARSE_OK, "a%b@example.com",
	 "example.com", true, false},
	{"TO:<b!a@example.com>", SMTP_PARSE_OK, "b!a@example.com",
	 "example.com", true, false},
	{"TO:<a@[192.0.2.1]>", SMTP_PARSE_OK, "a@[192.0.2.1]", "[192.0.2.1]",
	 false, false},
	{"TO:<a@[IPv6:2001:db8::1]>", SMTP_PARSE_OK, "a@[IPv6:2001:db8::1]",
	 "[IPv6:2001:db8::1]", false, false},
	{"TO:<a@example.com.>", SMTP_PARSE_OK, "a@example.com.",
	 "example.com.", false, false},
	{"TO:<j\xc3\xb6rg@b\xc3\xbc.example>", SMTP_PARSE_OK,
	 "j\xc3\xb6rg@b\xc3\xbc.example", "b\xc3\xbc.example", false, true},
	{"TO:<postmaster>", SMTP_PARSE_OK, "postmaster", "", false, false},
	{"TO:<>", SMTP_PARSE_ERR_SYNTAX, "", "", false, false},
	{"TO:<bob>", SMTP_PARSE_ERR_SYNTAX, "", "", false, false},
	{"TO:bob@example.com", SMTP_PARSE_ERR_SYNTAX, "", "", false, false},
	{"TO:<bob@example.com", SMTP_PARSE_ERR_SYNTAX, "", "", false, false},
	{"TO:<bob@@example.com>", SMTP_PARSE_ERR_SYNTAX, "", "", false, false},
	{"TO:<.bob@example.com>", SMTP_PARSE_ERR_SYNTAX, "", "", false, false},
	{"TO:<bob.@example.com>", SMTP_PARSE_ERR_SYNTAX, "", "", false, false},
	{"TO:<bob@-example.com>", SMTP_PARSE_ERR_SYNTAX, "", "", false, false},
	{"TO:<bob@example-.com>", SMTP_PARSE_ERR_SYNTAX, "", "", false, false},
	{"TO:<bob@exa_mple.com>", SMTP_PARSE_ERR_SYNTAX, "", "", false, false},
	{"TO:<bob@example..com>", SMTP_PARSE_ERR_SYNTAX, "", "", false, false},
	{"TO:<bob@[300.1.1.1]>", SMTP_PARSE_ERR_SYNTAX, "", "", false, false},
	{"TO:<bob@[IPv6:zz]>", SMTP_PARSE_ERR_SYNTAX, "", "", false, false},
	{"TO:<@a.example:bob>", SMTP_PARSE_ERR_SYNTAX, "", "", false, false},
	{"TO:<b\xc3\xc3@example.com>", SMTP_PARSE_ERR_UTF8, "", "", false,
	 true},
	{"TO:<b\xc0\xaf@example.com>", SMTP_PARSE_ERR_UTF8, "", "", false,
	 true},
	{"TO:<bob@example.com> X-NOTIFY=NEVER", SMTP_PARSE_ERR_PARAM_UNKNOWN, "",
	 "", false, false},
	{"TO:<bob@example.com>x", SMTP_PARSE_ERR_SYNTAX, "", "", false, false},
	{"TO:<01234567890123456789012345678901234567890123456789012345678901234"
	 "@example.com>",
	 SMTP_PARSE_ERR_TOO_LONG, "", "", false, false},
};

ParameterizedTestParameters(smtp_parse, rcpt_paths)
{
	return cr_make_param_array(struct path_case, rcpt_cases,
				   sizeof(rcpt_cases) / sizeof(rcpt_cases[0]));
}

ParameterizedTest(struct path_case *pc, smtp_parse, rcpt_paths)
{
	struct smtp_rcpt_args ra;
	enum smtp_parse_result r =
		smtp_parse_rcpt(pc->arg, strlen(pc->arg), &ra);

	cr_assert_eq(r, pc->result, "%s: got %s", pc->arg,
		     smtp_parse_result_name(r));
	if (r != SMTP_PARSE_OK)
		return;
	cr_assert_eq(ra.path.mailbox_len, strlen(pc->mailbox), "%s", pc->arg);
	cr_assert(memcmp(ra.path.mailbox, pc->mailbox, ra.path.mailbox_len) ==
			  0,
		  "%s", pc->arg);
	if (pc->domain[0]) {
		cr_assert_eq(ra.path.domain_len, strlen(pc->domain));
		cr_assert(memcmp(ra.path.domain, pc->domain,
				 ra.path.domain_len) == 0);
	} else {
		cr_assert(ra.path.postmaster);
	}
	cr_assert_eq(ra.path.local_special, pc->special, "%s", pc->arg);
	cr_assert_eq(ra.path.non_ascii, pc->non_ascii, "%s", pc->arg);
}

Test(smtp_parse, mail_parameters)
{
	struct smtp_mail_args m;
	const char *a;

	a = "FROM:<> SIZE=1000 BODY=8bitmime SMTPUTF8";
	cr_assert_eq(smtp_parse_mail(a, strlen(a), &m), SMTP_PARSE_OK);
	cr_assert(m.path.null);
	cr_assert(m.has_size);
	cr_assert_eq(m.size, 1000);
	cr_assert_eq(m.body, FD_BODY_8BITMIME);
	cr_assert(m.smtputf8);
	cr_assert_eq(m.n_params, 3);
	a = "FROM:<a@b.example> BODY=7BIT";
	cr_assert_eq(smtp_parse_mail(a, strlen(a), &m), SMTP_PARSE_OK);
	cr_assert_eq(m.body, FD_BODY_7BIT);
	a = "FROM:<a@b.example> BODY=BINARYMIME";
	cr_assert_eq(smtp_parse_mail(a, strlen(a), &m),
		     SMTP_PARSE_ERR_PARAM_VALUE);
	a = "FROM:<a@b.example> AUTH=<>";
	cr_assert_eq(smtp_parse_mail(a, strlen(a), &m),
		     SMTP_PARSE_ERR_PARAM_UNKNOWN);
	a = "FROM:<a@b.example> SIZE=1 SIZE=2";
	cr_assert_eq(smtp_parse_mail(a, strlen(a), &m), SMTP_PARSE_ERR_SYNTAX);
	cr_assert(m.path_ok);
	a = "FROM:<a@b.example> SIZE=99999999999999999999";
	cr_assert_eq(smtp_parse_mail(a, strlen(a), &m), SMTP_PARSE_ERR_SYNTAX);
	a = "FROM:<a@b.example> SIZE=18446744073709551615";
	cr_assert_eq(smtp_parse_mail(a, strlen(a), &m), SMTP_PARSE_OK);
	a = "FROM:<a@b.example> SMTPUTF8=yes";
	cr_assert_eq(smtp_parse_mail(a, strlen(a), &m), SMTP_PARSE_ERR_SYNTAX);
	a = "FROM:<a@b.example> =x";
	cr_assert_eq(smtp_parse_mail(a, strlen(a), &m), SMTP_PARSE_ERR_SYNTAX);
	a = "FROM:<a b@b.example>";
	cr_assert_eq(smtp_parse_mail(a, strlen(a), &m), SMTP_PARSE_ERR_SYNTAX);
	cr_assert(!m.path_ok);
	a = "FROM:<postmaster>";
	cr_assert_eq(smtp_parse_mail(a, strlen(a), &m), SMTP_PARSE_ERR_SYNTAX);
	a = "TO:<a@b.example>";
	cr_assert_eq(smtp_parse_mail(a, strlen(a), &m), SMTP_PARSE_ERR_SYNTAX);
}

Test(smtp_parse, bdat_arguments)
{
	uint64_t size;
	bool last;

	cr_assert_eq(smtp_parse_bdat("100", 3, &size, &last), SMTP_PARSE_OK);
	cr_assert_eq(size, 100);
	cr_assert(!last);
	cr_assert_eq(smtp_parse_bdat("0 last", 6, &size, &last),
		     SMTP_PARSE_OK);
	cr_assert_eq(size, 0);
	cr_assert(last);
	cr_assert_eq(smtp_parse_bdat("", 0, &size, &last),
		     SMTP_PARSE_ERR_SYNTAX);
	cr_assert_eq(smtp_parse_bdat("12 LASTX", 8, &size, &last),
		     SMTP_PARSE_ERR_SYNTAX);
	cr_assert_eq(smtp_parse_bdat("-1", 2, &size, &last),
		     SMTP_PARSE_ERR_SYNTAX);
	cr_assert_eq(smtp_parse_bdat("1x", 2, &size, &last),
		     SMTP_PARSE_ERR_SYNTAX);
}

Test(smtp_parse, domain_equal)
{
	cr_assert(smtp_domain_equal("Example.COM", 11, "example.com", 11));
	cr_assert(smtp_domain_equal("example.com.", 12, "example.com", 11));
	cr_assert(!smtp_domain_equal("mail.example.com", 16, "example.com",
				     11));
	cr_assert(!smtp_domain_equal("example.co", 10, "example.com", 11));
	cr_assert(!smtp_domain_equal(".", 1, "", 0));
}

Test(smtp_parse, utf8_validation)
{
	cr_assert(smtp_utf8_valid((const uint8_t *)"abc", 3));
	cr_assert(smtp_utf8_valid((const uint8_t *)"\xc3\xa9", 2));
	cr_assert(smtp_utf8_valid((const uint8_t *)"\xf0\x9f\x98\x80", 4));
	cr_assert(!smtp_utf8_valid((const uint8_t *)"\xc3", 1));
	cr_assert(!smtp_utf8_valid((const uint8_t *)"\xc0\x80", 2));
	cr_assert(!smtp_utf8_valid((const uint8_t *)"\xed\xa0\x80", 3));
	cr_assert(!smtp_utf8_valid((const uint8_t *)"\xf4\x90\x80\x80", 4));
	cr_assert(!smtp_utf8_valid((const uint8_t *)"\xff", 1));
	/* U+FFFD itself is well-formed: the decoder's "not UTF-8" is U+FFFD
	 * of one octet, never of three. */
	cr_assert(smtp_utf8_valid((const uint8_t *)"a\xef\xbf\xbd", 4));
	cr_assert(!smtp_utf8_valid((const uint8_t *)"\xef\xbf\xbd\x80", 4));
	cr_assert(!smtp_utf8_valid((const uint8_t *)"\xe2\x82", 2));
}

Test(smtp_parse, xtext_rfc3461)
{
	cr_assert(smtp_xtext_valid("", 0));
	cr_assert(smtp_xtext_valid("abc+2B+3D~!", 11));
	cr_assert(!smtp_xtext_valid("a+2b", 4), "hex digits are upper case");
	cr_assert(!smtp_xtext_valid("a+2", 3));
	cr_assert(!smtp_xtext_valid("a+", 2));
	cr_assert(!smtp_xtext_valid("a=b", 3));
	cr_assert(!smtp_xtext_valid("a b", 3));
	cr_assert(!smtp_xtext_valid("a\x7f", 2));
	cr_assert(!smtp_xtext_valid("\xc3\xa9", 2));
}

Test(smtp_parse, mail_dsn_parameters)
{
	struct smtp_mail_args m;
	const char *a;

	a = "FROM:<a@b.example> RET=hdrs ENVID=x+2By";
	cr_assert_eq(smtp_parse_mail(a, strlen(a), &m), SMTP_PARSE_OK);
	cr_assert_eq(m.ret, FD_RET_HDRS);
	cr_assert_eq(m.envid_len, 5);
	cr_assert(memcmp(m.envid, "x+2By", 5) == 0);
	cr_assert_eq(m.n_params, 2);
	a = "FROM:<a@b.example>";
	cr_assert_eq(smtp_parse_mail(a, strlen(a), &m), SMTP_PARSE_OK);
	cr_assert_eq(m.ret, FD_RET_NONE);
	cr_assert_null(m.envid);
	a = "FROM:<a@b.example> RET=FULL RET=FULL";
	cr_assert_eq(smtp_parse_mail(a, strlen(a), &m), SMTP_PARSE_ERR_SYNTAX);
	a = "FROM:<a@b.example> RET=NONE";
	cr_assert_eq(smtp_parse_mail(a, strlen(a), &m), SMTP_PARSE_ERR_SYNTAX);
}

Test(smtp_parse, rcpt_dsn_parameters)
{
	struct smtp_rcpt_args r;
	const char *a;

	a = "TO:<b@example.com> NOTIFY=failure,DELAY,success "
	    "ORCPT=rfc822;b+2B1@example.com";
	cr_assert_eq(smtp_parse_rcpt(a, strlen(a), &r), SMTP_PARSE_OK);
	cr_assert_eq(r.notify, FD_NOTIFY_FAILURE | FD_NOTIFY_DELAY |
				       FD_NOTIFY_SUCCESS);
	cr_assert_eq(r.orcpt_len, strlen("rfc822;b+2B1@example.com"));
	cr_assert(memcmp(r.orcpt, "rfc822;b+2B1@example.com", r.orcpt_len) ==
		  0);
	a = "TO:<b@example.com> NOTIFY=NEVER";
	cr_assert_eq(smtp_parse_rcpt(a, strlen(a), &r), SMTP_PARSE_OK);
	cr_assert_eq(r.notify, FD_NOTIFY_NEVER);
	cr_assert_null(r.orcpt);
	a = "TO:<b@example.com> NOTIFY=NEVER,NEVER,DELAY";
	cr_assert_eq(smtp_parse_rcpt(a, strlen(a), &r), SMTP_PARSE_ERR_SYNTAX);
	cr_assert(r.path_ok);
	a = "TO:<b@example.com> ORCPT=x-foo;";
	cr_assert_eq(smtp_parse_rcpt(a, strlen(a), &r), SMTP_PARSE_OK,
		     "any atom as addr-type, empty xtext");
	a = "TO:<b@example.com> ORCPT=utf-8;j\xc3\xb6rg@x";
	cr_assert_eq(smtp_parse_rcpt(a, strlen(a), &r), SMTP_PARSE_OK,
		     "RFC 6533 unitext under the utf-8 type");
	a = "TO:<b@example.com> ORCPT=rfc822;j\xc3\xb6rg@x";
	cr_assert_eq(smtp_parse_rcpt(a, strlen(a), &r), SMTP_PARSE_ERR_SYNTAX);
}

Test(smtp_parse, per_verb_line_limits)
{
	struct smtp_line l;
	uint8_t buf[1100];
	size_t used;
	const char *c;

	cr_assert_eq(smtp_line_limit("MAIL FROM:<>", 12), SMTP_PARAM_LINE_MAX);
	cr_assert_eq(smtp_line_limit("rcpt TO:<a@b>", 13), SMTP_PARAM_LINE_MAX);
	cr_assert_eq(smtp_line_limit("NOOP", 4), SMTP_LINE_MAX);
	cr_assert_eq(smtp_line_limit("MAILX", 5), SMTP_LINE_MAX);
	/* A raised limit keeps up to SMTP_PARAM_LINE_MAX octets. */
	memset(buf, 'a', sizeof(buf));
	buf[1022] = '\r';
	buf[1023] = '\n';
	smtp_line_reset(&l);
	smtp_line_set_max(&l, SMTP_PARAM_LINE_MAX);
	cr_assert_eq(smtp_line_feed(&l, buf, 1024, &used), SMTP_PARSE_OK);
	cr_assert_eq(smtp_line_wire_len(&l), 1024);
	cr_assert_eq(smtp_line_content(&l, &c), 1022);
	smtp_line_reset(&l);
	smtp_line_set_max(&l, 100000); /* clamped to the buffer */
	buf[1023] = 'a';
	buf[1024] = '\n';
	cr_assert_eq(smtp_line_feed(&l, buf, 1025, &used),
		     SMTP_PARSE_ERR_TOO_LONG);
}
