/*
 * The valid-recipients table: the file format (entries, wildcards,
 * comments, whitespace, line ends), case-insensitive matching, every load
 * error with its line number, a million entries, concurrent lookups.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <ftw.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../testdir.h"
#include "rcptdb.h"

static char dir[64];

static void
setup(void)
{
	fd_test_dir_make(dir, sizeof(dir), "/tmp", "rcptdb");
}

static void
teardown(void)
{
	fd_test_dir_remove(dir);
}

TestSuite(rcptdb, .init = setup, .fini = teardown, .timeout = 60);

static struct rcptdb *
mem(const char *text, char *why, size_t why_len)
{
	return rcptdb_load_mem(text, strlen(text), why, why_len);
}

static void
write_file(const char *path, const void *p, size_t n)
{
	FILE *f = fopen(path, "wb");

	cr_assert_not_null(f);
	cr_assert_eq(fwrite(p, 1, n, f), n);
	cr_assert_eq(fclose(f), 0);
}

Test(rcptdb, exact_and_wildcard_entries)
{
	char why[128];
	struct rcptdb *db = mem("alice@example.org\n"
				"@hosted.example\n"
				"bob@other.net\n",
				why, sizeof(why));

	cr_assert_not_null(db, "%s", why);
	cr_expect_eq(rcptdb_count(db), 3);
	cr_expect_eq(rcptdb_check(db, "alice@example.org"), 1);
	cr_expect_eq(rcptdb_check(db, "bob@other.net"), 1);
	cr_expect_eq(rcptdb_check(db, "anyone@hosted.example"), 1);
	cr_expect_eq(rcptdb_check(db, "x.y+tag@hosted.example"), 1);
	cr_expect_eq(rcptdb_check(db, "carol@example.org"), 0);
	cr_expect_eq(rcptdb_check(db, "alice@other.net"), 0);
	cr_expect_eq(rcptdb_check(db, "alice@example.org.evil"), 0);
	cr_expect_eq(rcptdb_check(db, "alice@sub.example.org"), 0);
	cr_expect_eq(rcptdb_check(db, "u@sub.hosted.example"), 0,
		     "a wildcard is for its domain only");
	cr_expect_eq(rcptdb_check(db, "alic@example.org"), 0);
	cr_expect_eq(rcptdb_check(db, "alicee@example.org"), 0);
	rcptdb_free(db);
}

Test(rcptdb, matching_is_case_insensitive)
{
	char why[128];
	struct rcptdb *db = mem("Alice@Example.ORG\n@Hosted.Example\n", why,
				sizeof(why));

	cr_assert_not_null(db, "%s", why);
	cr_expect_eq(rcptdb_check(db, "alice@example.org"), 1);
	cr_expect_eq(rcptdb_check(db, "ALICE@EXAMPLE.ORG"), 1);
	cr_expect_eq(rcptdb_check(db, "aLiCe@eXample.org"), 1);
	cr_expect_eq(rcptdb_check(db, "Who@HOSTED.example"), 1);
	/* ASCII folding only: UTF-8 bytes must match as they are. */
	rcptdb_free(db);
	db = mem("j\xc3\xb6rg@example.org\n", why, sizeof(why));
	cr_assert_not_null(db, "%s", why);
	cr_expect_eq(rcptdb_check(db, "J\xc3\xb6RG@example.org"), 1);
	cr_expect_eq(rcptdb_check(db, "j\xc3\x96rg@example.org"), 0);
	rcptdb_free(db);
}

Test(rcptdb, comments_blank_lines_and_whitespace)
{
	char why[128];
	struct rcptdb *db = mem("# the recipients\n"
				"\n"
				"   \t\n"
				"  # indented comment with @ and \x01 bytes\n"
				"  a@x.org  \n"
				"\tb@x.org\t\r\n"
				"c@x.org\r\n"
				"\r\n"
				"@y.org\n"
				"d@x.org", /* no final line end */
				why, sizeof(why));

	cr_assert_not_null(db, "%s", why);
	cr_expect_eq(rcptdb_count(db), 5);
	cr_expect_eq(rcptdb_check(db, "a@x.org"), 1);
	cr_expect_eq(rcptdb_check(db, "b@x.org"), 1);
	cr_expect_eq(rcptdb_check(db, "c@x.org"), 1);
	cr_expect_eq(rcptdb_check(db, "d@x.org"), 1);
	cr_expect_eq(rcptdb_check(db, "z@y.org"), 1);
	cr_expect_eq(rcptdb_check(db, "#@x.org"), 0);
	cr_expect_eq(rcptdb_check(db, " a@x.org"), 0,
		     "lookups are not trimmed");
	rcptdb_free(db);
}

Test(rcptdb, duplicates_count_once)
{
	char why[128];
	struct rcptdb *db =
		mem("a@x.org\nA@X.ORG\na@x.org\n@y\n@Y\n", why, sizeof(why));

	cr_assert_not_null(db, "%s", why);
	cr_expect_eq(rcptdb_count(db), 2);
	cr_expect_eq(rcptdb_check(db, "a@x.org"), 1);
	rcptdb_free(db);
}

Test(rcptdb, empty_input_is_an_empty_table)
{
	char why[128] = "junk";
	struct rcptdb *db = rcptdb_load_mem("", 0, why, sizeof(why));

	cr_assert_not_null(db);
	cr_expect_str_eq(why, "");
	cr_expect_eq(rcptdb_count(db), 0);
	cr_expect_eq(rcptdb_check(db, "a@x.org"), 0);
	rcptdb_free(db);
	db = rcptdb_load_mem(NULL, 5, NULL, 0);
	cr_assert_not_null(db);
	cr_expect_eq(rcptdb_count(db), 0);
	rcptdb_free(db);
	db = mem("# only comments\n\n", NULL, 0);
	cr_assert_not_null(db);
	cr_expect_eq(rcptdb_count(db), 0);
	rcptdb_free(db);
}

/* The spellings the SMTP engine takes for one mailbox find its entry, as
 * delivery finds its Maildir: a quoted local part, one trailing dot on the
 * domain; and entries written so are keyed the same way. They got
 * 550 5.1.1 before 2026-12-05. */
Test(rcptdb, mailbox_spellings_match)
{
	struct rcptdb *db = mem("bob@example.com\n@dest.test\n"
				"ann@hosted.test.\n\"carl\"@example.com\n",
				NULL, 0);

	cr_assert_not_null(db);
	cr_expect_eq(rcptdb_check(db, "bob@example.com."), 1);
	cr_expect_eq(rcptdb_check(db, "\"bob\"@example.com"), 1);
	cr_expect_eq(rcptdb_check(db, "\"b\\ob\"@Example.COM."), 1);
	cr_expect_eq(rcptdb_check(db, "anyone@dest.test."), 1);
	cr_expect_eq(rcptdb_check(db, "ann@hosted.test"), 1);
	cr_expect_eq(rcptdb_check(db, "carl@example.com"), 1);
	/* one dot only, and not a dot of the local part */
	cr_expect_eq(rcptdb_check(db, "bob@example.com.."), 0);
	cr_expect_eq(rcptdb_check(db, "bob.@example.com"), 0);
	cr_expect_eq(rcptdb_check(db, "\"bob \"@example.com"), 0);
	cr_expect_eq(rcptdb_check(db, "\"\"@example.com"), 0);
	rcptdb_free(db);
}

Test(rcptdb, odd_lookups_are_unknown)
{
	struct rcptdb *db = mem("@x.org\na@y.org\n", NULL, 0);
	static char big[1024];

	cr_assert_not_null(db);
	cr_expect_eq(rcptdb_check(db, ""), 0, "null sender");
	cr_expect_eq(rcptdb_check(db, "@x.org"), 0, "empty local part");
	cr_expect_eq(rcptdb_check(db, "a@"), 0);
	cr_expect_eq(rcptdb_check(db, "x.org"), 0);
	cr_expect_eq(rcptdb_check(db, "@"), 0);
	cr_expect_eq(rcptdb_check(db, NULL), 0);
	cr_expect_eq(rcptdb_check(NULL, "a@y.org"), 0);
	cr_expect_eq(rcptdb_count(NULL), 0);
	/* The domain is after the last '@'. */
	cr_expect_eq(rcptdb_check(db, "\"a@b\"@x.org"), 1);
	/* Longer than any entry can be: unknown, and no overflow. */
	memset(big, 'u', sizeof(big) - 8);
	strcpy(big + sizeof(big) - 8, "@x.org");
	cr_expect_eq(rcptdb_check(db, big), 0);
	/* 512 bytes exactly is still looked up. */
	memset(big, 'u', 512 - 6);
	strcpy(big + 512 - 6, "@x.org");
	cr_expect_eq(strlen(big), 512);
	cr_expect_eq(rcptdb_check(db, big), 1);
	rcptdb_free(db);
	rcptdb_free(NULL);
}

struct bad {
	const char *text;
	size_t len; /* 0: strlen */
	const char *why;
};

Test(rcptdb, every_bad_line_fails_the_load_naming_its_line)
{
	static const struct bad bads[] = {
		{ "a@x\nnoat\n", 0, "<memory>:2: no '@'" },
		{ "a@x\n\n# c\nb@x\nuser@\n", 0, "<memory>:5: empty domain" },
		{ "@\n", 0, "<memory>:1: empty domain" },
		{ "a@x\nb@x\x01\n", 0, "<memory>:2: control character" },
		{ "a\x7f@x\n", 0, "<memory>:1: control character" },
		{ "a@x\r\rb@x\n", 0, "<memory>:1: control character" },
		{ "a@\x1bx\n", 0, "<memory>:1: control character" },
		{ "a@x\nb@x\x00\n", 9, "<memory>:2: NUL byte" },
		{ "# comment \x00 here\n", 18, "<memory>:1: NUL byte" },
		{ "a@x\n\n\n\x00", 7, "<memory>:4: NUL byte" },
		{ "a @x\n", 0, "<memory>:1: space inside entry" },
		{ "a@x # comment\n", 0, "<memory>:1: space inside entry" },
		{ "a@x\ta@y\n", 0, "<memory>:1: space inside entry" },
		{ "@a@x\n", 0, "<memory>:1: '@' inside domain" },
		{ "a@x\n<carol@x>\n", 0,
		  "<memory>:2: angle bracket: write the bare address" },
		{ "Carol <carol@x>\n", 0, "<memory>:1: space inside entry" },
	};
	for (size_t i = 0; i < sizeof(bads) / sizeof(bads[0]); i++) {
		char why[128] = "";
		size_t len = bads[i].len ? bads[i].len : strlen(bads[i].text);
		struct rcptdb *db;
		errno = 0;
		db = rcptdb_load_mem(bads[i].text, len, why, sizeof(why));
		cr_expect_null(db, "case %zu accepted", i);
		rcptdb_free(db);
		cr_expect_eq(errno, EINVAL, "case %zu", i);
		cr_expect_str_eq(why, bads[i].why, "case %zu", i);
	}
}

Test(rcptdb, line_length_limit_is_512_bytes)
{
	static char text[2048];
	char why[128];
	struct rcptdb *db;
	size_t n;

	/* 512 bytes of entry, then a CRLF: fine. */
	memset(text, 'u', 512 - 4);
	memcpy(text + 508, "@x.o", 4);
	memcpy(text + 512, "\r\nb@x\n", 7);
	db = mem(text, why, sizeof(why));
	cr_assert_not_null(db, "%s", why);
	cr_expect_eq(rcptdb_count(db), 2);
	text[512] = '\0';
	cr_expect_eq(rcptdb_check(db, text), 1);
	rcptdb_free(db);

	/* 513 on line 2. */
	strcpy(text, "a@x\n");
	n = strlen(text);
	memset(text + n, 'u', 513 - 4);
	memcpy(text + n + 509, "@x.o\n", 6);
	db = mem(text, why, sizeof(why));
	cr_expect_null(db);
	cr_expect_str_eq(why, "<memory>:2: line longer than 512 bytes");

	/* Long comment lines count too. */
	text[0] = '#';
	memset(text + 1, 'c', 600);
	text[601] = '\0';
	db = mem(text, why, sizeof(why));
	cr_expect_null(db);
	cr_expect_str_eq(why, "<memory>:1: line longer than 512 bytes");

	/* Trimmed blanks count: the limit is on the line, not the entry. */
	memset(text, ' ', 510);
	strcpy(text + 510, "a@x");
	db = mem(text, why, sizeof(why));
	cr_expect_null(db);
}

Test(rcptdb, load_from_a_file_and_its_errors)
{
	char path[128], why[256];
	struct rcptdb *db, *old;
	const char good[] = "a@x.org\n@y.org\n";
	const char bad[] = "a@x.org\n# ok\nbroken line\n";

	snprintf(path, sizeof(path), "%s/recipients.txt", dir);
	write_file(path, good, sizeof(good) - 1);
	old = rcptdb_load(path, why, sizeof(why));
	cr_assert_not_null(old, "%s", why);
	cr_expect_eq(rcptdb_count(old), 2);
	cr_expect_eq(rcptdb_check(old, "q@y.org"), 1);

	/* A failed reload leaves the caller with the old table. */
	write_file(path, bad, sizeof(bad) - 1);
	errno = 0;
	db = rcptdb_load(path, why, sizeof(why));
	cr_expect_null(db);
	cr_expect_eq(errno, EINVAL);
	cr_expect(strstr(why, "recipients.txt:3: space inside entry") != NULL,
		  "%s", why);
	cr_expect_eq(rcptdb_check(old, "a@x.org"), 1);
	rcptdb_free(old);

	snprintf(path, sizeof(path), "%s/missing.txt", dir);
	errno = 0;
	db = rcptdb_load(path, why, sizeof(why));
	cr_expect_null(db);
	cr_expect_eq(errno, ENOENT);
	cr_expect(strstr(why, "missing.txt: No such file") != NULL, "%s", why);

	/* A directory cannot be read. */
	errno = 0;
	db = rcptdb_load(dir, why, sizeof(why));
	cr_expect_null(db);
	cr_expect_eq(errno, EISDIR, "%s", why);

	cr_expect_null(rcptdb_load(NULL, why, sizeof(why)));
}

Test(rcptdb, one_million_entries)
{
	const size_t n = 1000000;
	char path[128], why[256], a[64];
	size_t cap = n * 40, len = 0;
	char *text = malloc(cap);
	struct timespec t0, t1;
	struct rcptdb *db;

	cr_assert_not_null(text);
	for (size_t i = 0; i < n; i++) {
		if (i % 1000 == 999)
			len += (size_t)snprintf(text + len, cap - len,
						"@dom%zu.example\n", i);
		else
			len += (size_t)snprintf(text + len, cap - len,
						"User.%zu@Dom%zu.example\n", i,
						i % 997);
	}
	snprintf(path, sizeof(path), "%s/big.txt", dir);
	write_file(path, text, len);
	free(text);

	clock_gettime(CLOCK_MONOTONIC, &t0);
	db = rcptdb_load(path, why, sizeof(why));
	clock_gettime(CLOCK_MONOTONIC, &t1);
	cr_assert_not_null(db, "%s", why);
	cr_log_info("loaded %zu entries in %.3f s", rcptdb_count(db),
		    (double)(t1.tv_sec - t0.tv_sec) +
			    (double)(t1.tv_nsec - t0.tv_nsec) / 1e9);
	cr_expect_eq(rcptdb_count(db), n);
	for (size_t i = 0; i < n; i++) {
		if (i % 1000 == 999) {
			snprintf(a, sizeof(a), "anyone%zu@DOM%zu.example", i,
				 i);
		} else {
			snprintf(a, sizeof(a), "user.%zu@dom%zu.example", i,
				 i % 997);
		}
		cr_assert_eq(rcptdb_check(db, a), 1, "%s", a);
		if (i % 1000 != 999) {
			/* Right user, wrong domain. */
			snprintf(a, sizeof(a), "user.%zu@dom%zu.example", i,
				 (i + 1) % 997);
			cr_assert_eq(rcptdb_check(db, a), 0, "%s", a);
		}
	}
	cr_expect_eq(rcptdb_check(db, "user.1000000@dom0.example"), 0);
	rcptdb_free(db);
}

struct worker {
	const struct rcptdb *db;
	unsigned bad;
};

static void *
lookups(void *arg)
{
	struct worker *w = arg;
	char a[64];

	for (unsigned i = 0; i < 200000; i++) {
		snprintf(a, sizeof(a), "u%u@d%u.org", i % 5000, i % 7);
		w->bad += rcptdb_check(w->db, a) != (i % 5000 < 2500);
	}
	return NULL;
}

Test(rcptdb, concurrent_lookups)
{
	size_t cap = 5000 * 7 * 24, len = 0;
	char *text = malloc(cap);
	struct worker w[4];
	pthread_t th[4];
	struct rcptdb *db;

	cr_assert_not_null(text);
	for (unsigned u = 0; u < 2500; u++)
		for (unsigned d = 0; d < 7; d++)
			len += (size_t)snprintf(text + len, cap - len,
						"u%u@d%u.org\n", u, d);
	db = rcptdb_load_mem(text, len, NULL, 0);
	free(text);
	cr_assert_not_null(db);
	for (int i = 0; i < 4; i++) {
		w[i] = (struct worker){ .db = db };
		cr_assert_eq(pthread_create(&th[i], NULL, lookups, &w[i]), 0);
	}
	for (int i = 0; i < 4; i++) {
		pthread_join(th[i], NULL);
		cr_expect_eq(w[i].bad, 0, "thread %d", i);
	}
	rcptdb_free(db);
}

/* A UTF-8 byte order mark before the first entry is not part of it (it
 * was: that user got 550). */
Test(rcptdb, byte_order_mark_is_skipped)
{
	static const char text[] = "\xef\xbb\xbf" "alice@example.com\nbob@x\n";
	char why[128];
	struct rcptdb *db = rcptdb_load_mem(text, sizeof(text) - 1, why,
					    sizeof(why));

	cr_assert_not_null(db, "%s", why);
	cr_assert_eq(rcptdb_check(db, "alice@example.com"), 1);
	cr_assert_eq(rcptdb_check(db, "bob@x"), 1);
	rcptdb_free(db);
}
