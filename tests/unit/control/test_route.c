/*
 * Route targets, rules and the route table: every accepted form with its
 * canonical text, every refused form with its reason, and lookup
 * precedence (own route > default > none).
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "route.h"

TestSuite(route);

struct good {
	const char *in;
	enum route_kind kind;
	const char *host;
	unsigned port;
	const char *path;
	const char *text;
};

static const struct good goods[] = {
	{ "smtp:127.0.0.1:25", ROUTE_SMTP, "127.0.0.1", 25, "",
	  "smtp:127.0.0.1:25" },
	{ "smtp:[::1]:2525", ROUTE_SMTP, "::1", 2525, "", "smtp:[::1]:2525" },
	{ "smtp:[0:0::0001]:2525", ROUTE_SMTP, "::1", 2525, "",
	  "smtp:[::1]:2525" },
	{ "smtp:[2001:DB8::A]:25", ROUTE_SMTP, "2001:db8::a", 25, "",
	  "smtp:[2001:db8::a]:25" },
	{ "smtp:[::ffff:192.0.2.1]:25", ROUTE_SMTP, "::ffff:192.0.2.1", 25, "",
	  "smtp:[::ffff:192.0.2.1]:25" },
	{ "smtp:MX1.Example.ORG:25", ROUTE_SMTP, "mx1.example.org", 25, "",
	  "smtp:mx1.example.org:25" },
	{ "smtp:localhost:65535", ROUTE_SMTP, "localhost", 65535, "",
	  "smtp:localhost:65535" },
	{ "smtp:a-b.c:1", ROUTE_SMTP, "a-b.c", 1, "", "smtp:a-b.c:1" },
	{ "smtp:mx:00025", ROUTE_SMTP, "mx", 25, "", "smtp:mx:25" },
	{ "lmtp:10.1.2.3:24", ROUTE_LMTP, "10.1.2.3", 24, "",
	  "lmtp:10.1.2.3:24" },
	{ "lmtp:[fe80::1]:24", ROUTE_LMTP, "fe80::1", 24, "",
	  "lmtp:[fe80::1]:24" },
	{ "lmtp:unix:/run/dovecot/lmtp", ROUTE_LMTP_UNIX, "", 0,
	  "/run/dovecot/lmtp", "lmtp:unix:/run/dovecot/lmtp" },
	{ "lmtp:unix:rel/sock", ROUTE_LMTP_UNIX, "", 0, "rel/sock",
	  "lmtp:unix:rel/sock" },
	{ "maildir:./var/maildir", ROUTE_MAILDIR, "", 0, "./var/maildir",
	  "maildir:./var/maildir" },
	{ "maildir:/srv/mail dir", ROUTE_MAILDIR, "", 0, "/srv/mail dir",
	  "maildir:/srv/mail dir" },
};

Test(route, valid_targets_parse_to_canonical_text)
{
	for (size_t i = 0; i < sizeof(goods) / sizeof(goods[0]); i++) {
		const struct good *g = &goods[i];
		struct route_target t, t2;
		char why[128] = "";
		int r = route_parse_target(g->in, &t, why, sizeof(why));
		cr_assert_eq(r, 0, "%s: %d %s", g->in, r, why);
		cr_expect_eq(t.kind, g->kind, "%s", g->in);
		cr_expect_str_eq(t.host, g->host, "%s", g->in);
		cr_expect_eq(t.port, g->port, "%s", g->in);
		cr_expect_str_eq(t.path, g->path, "%s", g->in);
		cr_expect_str_eq(t.text, g->text, "%s", g->in);
		/* The canonical text is a fixed point. */
		cr_assert_eq(route_parse_target(t.text, &t2, why, sizeof(why)),
			     0, "%s", t.text);
		cr_expect_str_eq(t2.text, t.text);
	}
}

struct bad {
	const char *in;
	const char *why; /* substring of the reason */
};

static const struct bad bads[] = {
	{ "", "empty target" },
	{ "smtp:x:0", "bad port in 'smtp:x:0'" },
	{ "smtp:x:65536", "bad port" },
	{ "smtp:x:99999999999999999999", "bad port" },
	{ "smtp:x:25a", "bad port" },
	{ "smtp:x:-25", "bad port" },
	{ "smtp:x:+25", "bad port" },
	{ "smtp:x: 25", "bad port" },
	{ "smtp:x:", "bad port" },
	{ "smtp:x", "missing port" },
	{ "smtp:", "missing port" },
	{ "smtp::25", "empty host" },
	{ "smtp:::1:25", "empty host" },
	{ "smtp:fe80::1:25", "IPv6 address needs brackets" },
	{ "smtp:[::1]", "missing port" },
	{ "smtp:[::1]25", "missing port" },
	{ "smtp:[::1:25", "missing ']'" },
	{ "smtp:[]:25", "bad IPv6" },
	{ "smtp:[::g]:25", "bad IPv6" },
	{ "smtp:[1.2.3.4]:25", "bad IPv6" },
	{ "smtp:[fe80::1%eth0]:25", "bad IPv6" },
	{ "smtp:10.0.0.256:25", "bad IPv4" },
	{ "smtp:1.2.3:25", "bad IPv4" },
	{ "smtp:01.2.3.4:25", "bad IPv4" },
	/* getaddrinfo() would read these as 127.0.0.1 and 10.1.2.3 */
	{ "smtp:0x7f.0.0.1:25", "dotted-quad" },
	{ "smtp:0x0a.1.2.3:25", "dotted-quad" },
	{ "smtp:0x7f000001:25", "dotted-quad" },
	{ "smtp:a..b:25", "empty label" },
	{ "smtp:.a:25", "empty label" },
	{ "smtp:a.:25", "empty label" },
	{ "smtp:-a.b:25", "starts with '-'" },
	{ "smtp:a-.b:25", "ends with '-'" },
	{ "smtp:a_b:25", "bad character" },
	{ "smtp:a b:25", "bad character" },
	{ "SMTP:x:25", "unknown scheme" },
	{ "http:x:25", "unknown scheme" },
	{ "x", "unknown scheme" },
	{ "lmtp:unix:", "empty path" },
	{ "lmtp:unix:/a\nb", "control character" },
	{ "maildir:", "empty path" },
	{ "maildir:/a\tb", "control character" },
	/* an option where there are none was taken into the path */
	{ "lmtp:unix:/run/dovecot/lmtp,tls=verify", "TCP only" },
	{ "maildir:/srv/mail,tls=none", "TCP only" },
	{ "maildir:/srv/mail,ca=/x.pem", "TCP only" },
	/* Would print as "lmtp:unix:2", a socket path. */
	{ "lmtp:Unix:2", "host 'unix' is ambiguous" },
};

Test(route, invalid_targets_are_refused_with_a_reason)
{
	for (size_t i = 0; i < sizeof(bads) / sizeof(bads[0]); i++) {
		struct route_target t;
		char why[128] = "";
		int r = route_parse_target(bads[i].in, &t, why, sizeof(why));
		cr_expect_eq(r, -EINVAL, "'%s' accepted", bads[i].in);
		cr_expect(strstr(why, bads[i].why) != NULL,
			  "'%s': reason '%s', want '%s'", bads[i].in, why,
			  bads[i].why);
		cr_expect(strchr(why, '\n') == NULL, "one line");
	}
}

Test(route, overlong_parts_are_refused)
{
	static char s[2048];
	struct route_target t;
	char why[128];

	/* Host of 256 bytes (labels of 63). */
	strcpy(s, "smtp:");
	for (int i = 0; i < 4; i++) {
		memset(s + strlen(s), 'a', 63);
		s[5 + (i + 1) * 64 - 1] = '.';
		s[5 + (i + 1) * 64] = '\0';
	}
	strcat(s, "a:25");
	cr_expect_eq(route_parse_target(s, &t, why, sizeof(why)), -EINVAL);
	/* A 64-byte label. */
	strcpy(s, "smtp:");
	memset(s + 5, 'b', 64);
	strcpy(s + 69, ":25");
	cr_expect_eq(route_parse_target(s, &t, why, sizeof(why)), -EINVAL);
	cr_expect(strstr(why, "label longer") != NULL, "%s", why);
	/* 63 is fine. */
	strcpy(s + 68, ":25");
	cr_expect_eq(route_parse_target(s, &t, why, sizeof(why)), 0, "%s", why);
	/* A unix socket path must fit sun_path (107 bytes + NUL). */
	strcpy(s, "lmtp:unix:/");
	memset(s + 11, 'p', 106);
	s[117] = '\0';
	cr_expect_eq(route_parse_target(s, &t, why, sizeof(why)), 0, "%s", why);
	strcat(s, "p");
	cr_expect_eq(route_parse_target(s, &t, why, sizeof(why)), -EINVAL);
	cr_expect(strstr(why, "path longer") != NULL, "%s", why);
	/* A Maildir root of 511 bytes fits, 512 does not. */
	strcpy(s, "maildir:/");
	memset(s + 9, 'd', 510);
	s[519] = '\0';
	cr_expect_eq(route_parse_target(s, &t, why, sizeof(why)), 0, "%s", why);
	cr_expect_eq(strlen(t.path), 511);
	strcat(s, "d");
	cr_expect_eq(route_parse_target(s, &t, why, sizeof(why)), -EINVAL);
	/* The reason stays short whatever the input. */
	cr_expect_lt(strlen(why), 127);
}

Test(route, why_may_be_null_or_tiny)
{
	struct route_target t;
	char why[4] = "xyz";

	cr_expect_eq(route_parse_target("bogus", &t, NULL, 0), -EINVAL);
	cr_expect_eq(route_parse_target("bogus", &t, why, 1), -EINVAL);
	cr_expect_str_eq(why, "");
	cr_expect_eq(route_parse_target(NULL, &t, why, sizeof(why)), -EINVAL);
	cr_expect_eq(route_parse_rule(NULL, why, 4, &t, NULL, 0), -EINVAL);
}

Test(route, rule_lowercases_and_checks_the_domain)
{
	struct route_target t;
	char d[256], why[128];

	cr_assert_eq(route_parse_rule("Example.ORG=smtp:[::1]:2525", d,
				      sizeof(d), &t, why, sizeof(why)),
		     0, "%s", why);
	cr_expect_str_eq(d, "example.org");
	cr_expect_eq(t.kind, ROUTE_SMTP);
	cr_expect_str_eq(t.text, "smtp:[::1]:2525");

	cr_assert_eq(route_parse_rule("local=maildir:/var/m=x", d, sizeof(d),
				      &t, why, sizeof(why)),
		     0, "%s", why);
	cr_expect_str_eq(d, "local");
	cr_expect_str_eq(t.path, "/var/m=x", "only the first '=' splits");

	static const struct bad rb[] = {
		{ "example.org", "missing '='" },
		{ "=smtp:x:25", "empty domain" },
		{ "a..b=smtp:x:25", "empty label" },
		{ "a.b.=smtp:x:25", "empty label" },
		{ "a_b=smtp:x:25", "bad character" },
		{ "-a=smtp:x:25", "starts with '-'" },
		{ "a-=smtp:x:25", "ends with '-'" },
		{ "*.example.org=smtp:x:25", "bad character" },
		{ "[1.2.3.4]=smtp:x:25", "bad character" },
		{ "exa mple=smtp:x:25", "bad character" },
		{ "example.org=", "empty target" },
		{ "example.org=smtp:x:0", "bad port in 'smtp:x:0'" },
		{ "example.org=ftp:x", "unknown scheme" },
	};
	for (size_t i = 0; i < sizeof(rb) / sizeof(rb[0]); i++) {
		cr_expect_eq(route_parse_rule(rb[i].in, d, sizeof(d), &t, why,
					      sizeof(why)),
			     -EINVAL, "'%s' accepted", rb[i].in);
		cr_expect(strstr(why, rb[i].why) != NULL,
			  "'%s': reason '%s', want '%s'", rb[i].in, why,
			  rb[i].why);
	}
	/* Domain buffer too small. */
	cr_expect_eq(route_parse_rule("example.org=smtp:x:25", d, 11, &t, why,
				      sizeof(why)),
		     -EINVAL);
	cr_expect_eq(route_parse_rule("example.org=smtp:x:25", d, 12, &t, why,
				      sizeof(why)),
		     0);
}

Test(route, rule_domain_length_limit_is_255)
{
	static char s[600];
	struct route_target t;
	char d[256], why[128];
	size_t n = 0;

	/* 4 labels of 63 + 3 dots = 255 bytes. */
	for (int i = 0; i < 4; i++) {
		if (i)
			s[n++] = '.';
		memset(s + n, 'a' + i, 63);
		n += 63;
	}
	cr_assert_eq(n, 255);
	strcpy(s + n, "=smtp:x:25");
	cr_expect_eq(route_parse_rule(s, d, sizeof(d), &t, why, sizeof(why)),
		     0, "%s", why);
	cr_expect_eq(strlen(d), 255);
	memmove(s + 2, s, strlen(s) + 1);
	s[0] = 'z';
	s[1] = '.';
	cr_expect_eq(route_parse_rule(s, d, sizeof(d), &t, why, sizeof(why)),
		     -EINVAL);
	cr_expect(strstr(why, "longer than 255") != NULL, "%s", why);
}

static struct route_target
tgt(const char *s)
{
	struct route_target t;
	char why[128];

	cr_assert_eq(route_parse_target(s, &t, why, sizeof(why)), 0, "%s", why);
	return t;
}

Test(route, lookup_prefers_route_then_default_then_null)
{
	struct route_table *rt = route_table_new();
	struct route_target a = tgt("lmtp:unix:/run/lmtp");
	struct route_target b = tgt("maildir:/var/mail");
	struct route_target relay = tgt("smtp:[2001:db8::1]:25");
	const struct route_target *r;

	cr_assert_not_null(rt);
	cr_expect_null(route_lookup(rt, "example.org"));
	cr_assert_eq(route_table_add(rt, "Example.ORG", &a), 0);
	cr_assert_eq(route_table_add(rt, "local", &b), 0);

	r = route_lookup(rt, "example.org");
	cr_assert_not_null(r);
	cr_expect_str_eq(r->text, "lmtp:unix:/run/lmtp");
	r = route_lookup(rt, "EXAMPLE.org");
	cr_assert_not_null(r);
	cr_expect_str_eq(r->text, "lmtp:unix:/run/lmtp");
	r = route_lookup(rt, "LOCAL");
	cr_assert_not_null(r);
	cr_expect_str_eq(r->text, "maildir:/var/mail");
	/* Exact match only; one trailing dot is the same domain (the SMTP
	 * engine accepts "example.org." as example.org: its mail went to
	 * the default route). */
	cr_expect_null(route_lookup(rt, "sub.example.org"));
	r = route_lookup(rt, "Example.org.");
	cr_assert_not_null(r);
	cr_expect_str_eq(r->text, "lmtp:unix:/run/lmtp");
	cr_expect_null(route_lookup(rt, "example.org.."));
	cr_expect_null(route_lookup(rt, "."));
	cr_expect_null(route_lookup(rt, "example.or"));
	cr_expect_null(route_lookup(rt, ""));
	cr_expect_null(route_lookup(rt, NULL));

	route_table_set_default(rt, &relay);
	r = route_lookup(rt, "other.net");
	cr_assert_not_null(r);
	cr_expect_str_eq(r->text, "smtp:[2001:db8::1]:25");
	cr_expect_null(route_lookup(NULL, "other.net"));
	r = route_lookup(rt, "example.org");
	cr_assert_not_null(r);
	cr_expect_str_eq(r->text, "lmtp:unix:/run/lmtp", "route beats default");

	route_table_set_default(rt, NULL);
	cr_expect_null(route_lookup(rt, "other.net"));
	cr_expect_not_null(route_lookup(rt, "local"));
	route_table_free(rt);
}

Test(route, add_refuses_duplicates_and_bad_domains)
{
	struct route_table *rt = route_table_new();
	struct route_target a = tgt("smtp:a:25"), b = tgt("smtp:b:25");

	cr_assert_not_null(rt);
	cr_expect_eq(route_table_add(rt, "example.org", &a), 0);
	cr_expect_eq(route_table_add(rt, "example.org", &b), -EEXIST);
	cr_expect_eq(route_table_add(rt, "EXAMPLE.Org", &b), -EEXIST);
	cr_expect_str_eq(route_lookup(rt, "example.org")->text, "smtp:a:25");
	cr_expect_eq(route_table_add(rt, "", &a), -EINVAL);
	cr_expect_eq(route_table_add(rt, "a..b", &a), -EINVAL);
	cr_expect_eq(route_table_add(rt, "a/b", &a), -EINVAL);
	cr_expect_eq(route_table_add(rt, NULL, &a), -EINVAL);
	cr_expect_eq(route_table_add(rt, "x.org", NULL), -EINVAL);
	route_table_free(rt);
	route_table_free(NULL);
}

Test(route, many_routes_and_pointer_stability)
{
	struct route_table *rt = route_table_new();
	const struct route_target *first;
	char d[64], s[64];

	cr_assert_not_null(rt);
	for (int i = 0; i < 5000; i++) {
		struct route_target t;
		snprintf(d, sizeof(d), "d%d.example", i);
		snprintf(s, sizeof(s), "smtp:h%d:%d", i, 1 + i);
		t = tgt(s);
		cr_assert_eq(route_table_add(rt, d, &t), 0, "%s", d);
		if (i == 0)
			first = route_lookup(rt, "d0.example");
	}
	/* Growth did not move or lose anything. */
	cr_expect_eq(route_lookup(rt, "d0.example"), first);
	for (int i = 0; i < 5000; i++) {
		const struct route_target *r;
		snprintf(d, sizeof(d), "D%d.EXAMPLE", i);
		snprintf(s, sizeof(s), "smtp:h%d:%d", i, 1 + i);
		r = route_lookup(rt, d);
		cr_assert_not_null(r, "%s", d);
		cr_assert_str_eq(r->text, s);
	}
	cr_expect_null(route_lookup(rt, "d5000.example"));
	route_table_free(rt);
}

Test(route, addr_domain)
{
	const char *a = "u@Example.ORG";

	cr_expect_str_eq(route_addr_domain(a), "Example.ORG");
	cr_expect_eq(route_addr_domain(a), a + 2, "pointer into addr");
	cr_expect_str_eq(route_addr_domain("\"a@b\"@c.d"), "c.d");
	cr_expect_str_eq(route_addr_domain("nodomain"), "");
	cr_expect_str_eq(route_addr_domain("u@"), "");
	cr_expect_str_eq(route_addr_domain(""), "");
	cr_expect_str_eq(route_addr_domain(NULL), "");
}

/* STARTTLS options after HOST:PORT (route.h): parsed, canonical, refused
 * with a reason; not taken from a path (a path may hold a comma). */
Test(route, same_domain)
{
	cr_expect(route_same_domain("example.com", "Example.COM"));
	cr_expect(route_same_domain("example.com", "example.com."));
	cr_expect(route_same_domain("Example.com.", "example.COM"));
	cr_expect(route_same_domain("example.com.", "example.com."));
	cr_expect(!route_same_domain("example.com", "example.co"));
	cr_expect(!route_same_domain("example.com", "example.com.."),
		  "only one trailing dot is dropped");
	cr_expect(!route_same_domain("example.com", "xexample.com"));
	cr_expect(!route_same_domain("a.example.com", "example.com"));
	cr_expect(!route_same_domain("", "."), "a lone dot is not empty");
	cr_expect(route_same_domain("", ""));
}

Test(route, tls_options)
{
	struct route_target t;
	char why[200];

	cr_assert_eq(route_parse_target("smtp:mx.example.org:25,tls=verify",
					&t, why, sizeof(why)),
		     0, "%s", why);
	cr_assert_eq(t.tls, ROUTE_TLS_VERIFY);
	cr_assert_str_eq(t.host, "mx.example.org");
	cr_assert_eq(t.port, 25);
	cr_assert_str_eq(t.text, "smtp:mx.example.org:25,tls=verify");

	cr_assert_eq(route_parse_target("smtp:[::1]:2525,ca=/etc/ca.pem,"
					"tls=encrypt",
					&t, why, sizeof(why)),
		     0, "%s", why);
	cr_assert_eq(t.tls, ROUTE_TLS_ENCRYPT);
	cr_assert_str_eq(t.tls_ca, "/etc/ca.pem");
	cr_assert_str_eq(t.text, "smtp:[::1]:2525,tls=encrypt,ca=/etc/ca.pem");
	/* The canonical text parses back to the same target. */
	struct route_target u;
	cr_assert_eq(route_parse_target(t.text, &u, why, sizeof(why)), 0);
	cr_assert_str_eq(u.text, t.text);

	cr_assert_eq(route_parse_target("lmtp:10.0.0.1:24,tls=none", &t, why,
					sizeof(why)),
		     0);
	cr_assert_eq(t.tls, ROUTE_TLS_NONE);
	cr_assert_eq(route_parse_target("smtp:h:25", &t, why, sizeof(why)), 0);
	cr_assert_eq(t.tls, ROUTE_TLS_DEFAULT);

	cr_assert_eq(route_parse_target("maildir:/var/a,b", &t, why,
					sizeof(why)),
		     0);
	cr_assert_str_eq(t.path, "/var/a,b");
	cr_assert_eq(t.tls, ROUTE_TLS_DEFAULT);

	cr_assert_eq(route_parse_target("smtp:h:25,tls=maybe", &t, why,
					sizeof(why)),
		     -EINVAL);
	cr_assert(strstr(why, "tls= takes"), "%s", why);
	cr_assert_eq(route_parse_target("smtp:h:25,tls", &t, why, sizeof(why)),
		     -EINVAL);
	cr_assert_eq(route_parse_target("smtp:h:25,foo=1", &t, why,
					sizeof(why)),
		     -EINVAL);
	cr_assert(strstr(why, "unknown option"), "%s", why);
	cr_assert_eq(route_parse_target("smtp:h:25,ca=", &t, why, sizeof(why)),
		     -EINVAL);
}
