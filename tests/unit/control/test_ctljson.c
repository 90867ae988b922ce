/*
 * ctljson: the control protocol's JSON reader and writer, and base64.
 * Every rejection the protocol document promises is a case here.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "ctljson.h"

static struct ctl_json_tok tok[256];

static int
parse(struct ctl_json *j, const char *s)
{
	return ctl_json_parse(j, s, strlen(s), tok, 256);
}

TestSuite(ctljson);

Test(ctljson, request_shape)
{
	struct ctl_json j;
	const char *s = " {\"cmd\":\"queue.hold\",\"args\":{\"ids\":"
			"[\"0006475E1C3B2A00\",\"0006475E1C3B2A01\"]}} \r\n";
	char buf[64];

	cr_assert_eq(parse(&j, s), 0);
	cr_assert_eq(tok[0].type, CTL_JSON_OBJECT);
	cr_assert_eq(tok[0].count, 2);
	cr_assert_eq(tok[0].end, j.n);
	int cmd = ctl_json_get(&j, 0, "cmd");
	cr_assert_geq(cmd, 0);
	cr_assert(ctl_json_streq(&j, (uint32_t)cmd, "queue.hold"));
	int args = ctl_json_get(&j, 0, "args");
	cr_assert_eq(tok[args].type, CTL_JSON_OBJECT);
	int ids = ctl_json_get(&j, (uint32_t)args, "ids");
	cr_assert_eq(tok[ids].type, CTL_JSON_ARRAY);
	cr_assert_eq(tok[ids].count, 2);
	uint32_t k = ctl_json_child((uint32_t)ids);
	cr_assert_eq(ctl_json_string(&j, k, buf, sizeof(buf)), 16);
	cr_assert_str_eq(buf, "0006475E1C3B2A00");
	k = ctl_json_next(&j, k);
	cr_assert_eq(ctl_json_string(&j, k, buf, sizeof(buf)), 16);
	cr_assert_str_eq(buf, "0006475E1C3B2A01");
	cr_assert_eq(ctl_json_get(&j, 0, "nope"), -1);
	cr_assert_eq(ctl_json_get(&j, (uint32_t)ids, "cmd"), -1,
		     "get on an array");
}

Test(ctljson, skips_nested_values)
{
	struct ctl_json j;

	cr_assert_eq(parse(&j, "{\"a\":{\"x\":[1,{\"y\":[]}]},\"b\":true}"), 0);
	int b = ctl_json_get(&j, 0, "b");
	bool v = false;
	cr_assert(ctl_json_bool(&j, (uint32_t)b, &v));
	cr_assert(v);
}

Test(ctljson, string_escapes)
{
	struct ctl_json j;
	char buf[64];

	cr_assert_eq(parse(&j, "\"a\\\"b\\\\c\\/d\\b\\f\\n\\r\\t\\u00e9"
			       "\\ud83d\\ude00\""), 0);
	static const char want[] =
		"a\"b\\c/d\b\f\n\r\t\xc3\xa9\xf0\x9f\x98\x80";
	long n = ctl_json_string(&j, 0, buf, sizeof(buf));
	cr_assert_eq(n, (long)sizeof(want) - 1);
	cr_assert_eq(memcmp(buf, want, (size_t)n), 0);
	cr_assert_eq(ctl_json_string(&j, 0, buf, 5), -ENOSPC);
	cr_assert_eq(parse(&j, "\"caf\xc3\xa9\""), 0, "raw UTF-8");
	cr_assert(ctl_json_streq(&j, 0, "caf\xc3\xa9"));
	cr_assert_eq(parse(&j, "\"\\u0063md\""), 0);
	cr_assert(ctl_json_streq(&j, 0, "cmd"), "escaped key compares");
}

Test(ctljson, numbers)
{
	struct ctl_json j;
	uint64_t v;

	cr_assert_eq(parse(&j, "18446744073709551615"), 0);
	cr_assert(ctl_json_u64(&j, 0, &v));
	cr_assert_eq(v, UINT64_MAX);
	cr_assert_eq(parse(&j, "18446744073709551616"), 0, "valid JSON");
	cr_assert_not(ctl_json_u64(&j, 0, &v), "but not a u64");
	const char *not_u64[] = {"-1", "1.5", "1e3", "0.0"};
	for (size_t i = 0; i < sizeof(not_u64) / sizeof(*not_u64); i++) {
		cr_assert_eq(parse(&j, not_u64[i]), 0, "%s", not_u64[i]);
		cr_assert_not(ctl_json_u64(&j, 0, &v), "%s", not_u64[i]);
	}
	cr_assert_eq(parse(&j, "\"1\""), 0);
	cr_assert_not(ctl_json_u64(&j, 0, &v), "a string is not a number");
}

Test(ctljson, rejects)
{
	static const char *const bad[] = {
		"", " ", "{", "}", "[", "{\"a\"}", "{\"a\":}", "{\"a\":1,}",
		"[1,]", "[1 2]", "{1:2}", "01", "1.", "-", "+1", ".5", "1e",
		"tru", "nul", "True", "\"abc", "\"\\x\"", "\"\\u12\"",
		"\"\\u0000\"", "\"\\ud800\"", "\"\\udc00x\"",
		"\"\\ud800\\u0041\"", "\"a\tb\"", "\"\x01\"", "\"\xff\"",
		"\"\xc0\x80\"", "\"\xed\xa0\x80\"", "\"\xe2\x82\"",
		"\"\xf5\x80\x80\x80\"", "{} x", "{}{}", "'a'", "[]]",
		"{\"a\" 1}", "nan", "Infinity",
	};
	struct ctl_json j;

	for (size_t i = 0; i < sizeof(bad) / sizeof(*bad); i++) {
		cr_assert_eq(parse(&j, bad[i]), -EINVAL, "accepted [%s]",
			     bad[i]);
		cr_assert_not_null(j.err);
		cr_assert_leq(j.err_off, strlen(bad[i]));
	}
	/* An embedded NUL is not white space. */
	cr_assert_eq(ctl_json_parse(&j, "{}\0", 3, tok, 256), -EINVAL);
}

/* A member name twice in one object is refused, escapes decoded: readers
 * disagree on which one counts (the daemon ran the first "cmd" with the
 * last "args"; most libraries take the last of both), so a request read
 * as "status" by a filtering proxy deleted the queue. */
Test(ctljson, duplicate_member_names)
{
	static const char *const dup[] = {
		"{\"cmd\":\"queue.delete\",\"cmd\":\"status\"}",
		"{\"a\":1,\"b\":2,\"a\":3}",
		"{\"cmd\":1,\"\\u0063md\":2}",
		"{\"args\":{\"x\":1,\"x\":1}}",
		"[{\"k\":1},{\"k\":2,\"k\":3}]",
	};
	static struct ctl_json_tok big[1200];
	char text[8192];
	size_t n = 0;
	struct ctl_json j;

	for (size_t i = 0; i < sizeof(dup) / sizeof(*dup); i++) {
		cr_assert_eq(parse(&j, dup[i]), -EINVAL, "accepted [%s]",
			     dup[i]);
		cr_assert_str_eq(j.err, "duplicate member name");
	}
	/* the same name in different objects, and names differing only in
	 * case, are fine */
	cr_assert_eq(parse(&j, "[{\"k\":1},{\"k\":2,\"K\":3}]"), 0);
	/* CTL_JSON_MEMBERS_MAX members, and one more */
	n += (size_t)snprintf(text + n, sizeof(text) - n, "{");
	for (unsigned i = 0; i < CTL_JSON_MEMBERS_MAX; i++)
		n += (size_t)snprintf(text + n, sizeof(text) - n, "%s\"m%u\":0",
				      i ? "," : "", i);
	cr_assert_eq(ctl_json_parse(&j, text, n, big, 1200), -EINVAL);
	text[n] = '}';
	cr_assert_eq(ctl_json_parse(&j, text, n + 1, big, 1200), 0);
	memcpy(text + n, ",\"x\":0}", 7);
	cr_assert_eq(ctl_json_parse(&j, text, n + 7, big, 1200), -EINVAL);
	cr_assert_str_eq(j.err, "object with too many members");
}

Test(ctljson, depth_and_room)
{
	struct ctl_json j;
	char deep[64];
	struct ctl_json_tok few[3];

	memset(deep, 0, sizeof(deep));
	for (int i = 0; i < CTL_JSON_MAX_DEPTH; i++)
		deep[i] = '[';
	for (int i = 0; i < CTL_JSON_MAX_DEPTH; i++)
		deep[CTL_JSON_MAX_DEPTH + i] = ']';
	cr_assert_eq(parse(&j, deep), 0, "depth %d is fine",
		     CTL_JSON_MAX_DEPTH);
	memmove(deep + 1, deep, strlen(deep) + 1);
	deep[0] = '[';
	strcat(deep, "]");
	cr_assert_eq(parse(&j, deep), -EINVAL, "one deeper is not");
	cr_assert_eq(ctl_json_parse(&j, "[1,2]", 5, few, 3), 0);
	cr_assert_eq(ctl_json_parse(&j, "[1,2,3]", 7, few, 3), -E2BIG);
}

Test(ctljson, writer_escapes_and_commas)
{
	struct ctl_jw w;
	struct ctl_json j;
	char buf[64];

	ctl_jw_init(&w, 0);
	ctl_jw_obj(&w);
	ctl_jw_kstr(&w, "s", "q\"b\\n\n\x01\x7f\xff\xc3\xa9");
	ctl_jw_ku64(&w, "n", 18446744073709551615ull);
	ctl_jw_kbool(&w, "t", true);
	ctl_jw_key(&w, "a");
	ctl_jw_arr(&w);
	ctl_jw_str(&w, "x");
	ctl_jw_null(&w);
	ctl_jw_obj(&w);
	ctl_jw_obj_end(&w);
	ctl_jw_arr_end(&w);
	ctl_jw_obj_end(&w);
	ctl_jw_nl(&w);
	cr_assert_eq(w.err, 0);
	w.buf[w.len] = '\0'; /* room: the buffer grows in powers of two */
	cr_assert_str_eq(w.buf,
			 "{\"s\":\"q\\\"b\\\\n\\n\\u0001\\u007f\\u00ff\xc3\xa9\","
			 "\"n\":18446744073709551615,\"t\":true,"
			 "\"a\":[\"x\",null,{}]}\n");
	cr_assert_eq(ctl_json_parse(&j, w.buf, w.len, tok, 256), 0);
	ctl_json_string(&j, (uint32_t)ctl_json_get(&j, 0, "s"), buf,
			sizeof(buf));
	/* Not UTF-8 comes back as the code point of the same value. */
	cr_assert_str_eq(buf, "q\"b\\n\n\x01\x7f\xc3\xbf\xc3\xa9");
	ctl_jw_free(&w);
	/* C1 controls (U+0080..U+009F; CSI is U+009B) are escaped, never
	 * raw at an operator's terminal; U+00A0 and on are kept */
	ctl_jw_init(&w, 0);
	ctl_jw_str(&w, "\xc2\x9b" "2J\xc2\x80\xc2\x9f\xc2\xa0");
	static const char c1[] = "\"\\u009b2J\\u0080\\u009f\xc2\xa0\"";
	cr_assert_eq(w.len, strlen(c1));
	cr_assert(memcmp(w.buf, c1, w.len) == 0, "%.*s", (int)w.len, w.buf);
	ctl_jw_free(&w);
}

Test(ctljson, writer_rewind_and_limit)
{
	struct ctl_jw w;

	ctl_jw_init(&w, 32);
	ctl_jw_obj(&w);
	ctl_jw_kbool(&w, "ok", true);
	size_t mark = w.len;
	ctl_jw_kstr(&w, "long", "0123456789012345678901234567890123");
	cr_assert_eq(w.err, -E2BIG, "past the limit");
	ctl_jw_rewind(&w, 0);
	cr_assert_eq(w.err, 0);
	cr_assert_eq(w.len, 0);
	ctl_jw_obj(&w);
	ctl_jw_obj_end(&w);
	cr_assert_eq(w.len, 2);
	cr_assert_eq(memcmp(w.buf, "{}", 2), 0, "no comma after a rewind");
	(void)mark;
	ctl_jw_consume(&w, 1);
	cr_assert_eq(w.len, 1);
	cr_assert_eq(w.buf[0], '}');
	ctl_jw_free(&w);
}

Test(ctljson, base64_rfc4648_vectors)
{
	static const char *const plain[] = {"", "f", "fo", "foo", "foob",
					    "fooba", "foobar"};
	static const char *const enc[] = {"", "Zg==", "Zm8=", "Zm9v",
					  "Zm9vYg==", "Zm9vYmE=", "Zm9vYmFy"};
	char out[16], back[16];

	for (int i = 0; i < 7; i++) {
		size_t n = strlen(plain[i]);
		cr_assert_eq(ctl_b64_len(n), strlen(enc[i]));
		ctl_b64_encode(plain[i], n, out);
		cr_assert_eq(memcmp(out, enc[i], strlen(enc[i])), 0, "%s",
			     plain[i]);
		cr_assert_eq(ctl_b64_decode(enc[i], strlen(enc[i]), back),
			     (long)n);
		cr_assert_eq(memcmp(back, plain[i], n), 0);
	}
	static const char *const bad[] = {"Zg=", "Z===", "Zg=a", "Zh==",
					  "Zm9=", "Zm8=Zm8=", "Zm 9", "Zm9*"};
	for (size_t i = 0; i < sizeof(bad) / sizeof(*bad); i++)
		cr_assert_eq(ctl_b64_decode(bad[i], strlen(bad[i]), back),
			     -EINVAL, "%s", bad[i]);
}

Test(ctljson, base64_every_byte)
{
	unsigned char in[256], back[256];
	char enc[400];
	struct ctl_jw w;
	struct ctl_json j;

	for (int i = 0; i < 256; i++)
		in[i] = (unsigned char)i;
	ctl_jw_init(&w, 0);
	ctl_jw_b64(&w, in, sizeof(in));
	cr_assert_eq(ctl_json_parse(&j, w.buf, w.len, tok, 256), 0);
	memcpy(enc, w.buf + 1, tok[0].len);
	cr_assert_eq(ctl_b64_decode(enc, tok[0].len, back), 256);
	cr_assert_eq(memcmp(in, back, 256), 0);
	ctl_jw_free(&w);
}
