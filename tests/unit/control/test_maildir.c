/*
 * Maildir delivery into a temporary root: the tree and modes it creates,
 * byte-exact content (prefix, CRLF -> LF, lone CRs, CRLF split across
 * reads), unsafe names refused with nothing created, unusable roots, a
 * failing body source leaving no file, unique names, symlinks not followed.
 */
#include <criterion/criterion.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../testdir.h"
#include "maildir.h"

static char tdir[64], root[96];

/* Every fsync the module makes, by path (the test links with
 * -Wl,--wrap=fsync); recorded while `recording`. */
int __real_fsync(int fd);
int __wrap_fsync(int fd);
static pthread_mutex_t synced_mu = PTHREAD_MUTEX_INITIALIZER;
static char synced[32][256];
static unsigned n_synced;
static int recording;

int
__wrap_fsync(int fd)
{
	char l[64], p[256];
	ssize_t n;

	pthread_mutex_lock(&synced_mu);
	if (recording && n_synced < 32) {
		snprintf(l, sizeof(l), "/proc/self/fd/%d", fd);
		n = readlink(l, p, sizeof(p) - 1);
		p[n < 0 ? 0 : n] = '\0';
		memcpy(synced[n_synced++], p, sizeof(p));
	}
	pthread_mutex_unlock(&synced_mu);
	return __real_fsync(fd);
}

static void
record_syncs(void)
{
	n_synced = 0;
	recording = 1;
}

/* The directory root/sub was synced since record_syncs(). */
static bool
was_synced(const char *sub)
{
	char p[256];

	snprintf(p, sizeof(p), "%s%s%s", root, *sub ? "/" : "", sub);
	for (unsigned i = 0; i < n_synced; i++)
		if (strcmp(synced[i], p) == 0)
			return true;
	return false;
}

static void
setup(void)
{
	fd_test_dir_make(tdir, sizeof(tdir), "/tmp", "maildir");
	snprintf(root, sizeof(root), "%s/root", tdir);
	cr_assert_eq(mkdir(root, 0700), 0);
}

static void
teardown(void)
{
	fd_test_dir_remove(tdir);
}

TestSuite(maildir, .init = setup, .fini = teardown, .timeout = 60);

/* A body in memory, handed out at most `max` bytes per read (cycling
 * through 1..max when `vary`), failing at `fail_at` if set. */
struct src {
	const char *p;
	size_t n;
	size_t max;
	int vary;
	size_t calls;
	long fail_at; /* -1: never */
	long err;     /* returned there */
	int overread; /* return one byte more than asked */
};

static long
src_read(void *ctx, uint64_t off, void *buf, size_t n)
{
	struct src *s = ctx;
	size_t k = n;

	s->calls++;
	if (s->fail_at >= 0 && off + n > (uint64_t)s->fail_at) {
		if (off >= (uint64_t)s->fail_at)
			return s->err;
		k = (size_t)((uint64_t)s->fail_at - off);
	}
	if (s->overread)
		return (long)n + 1;
	if (off >= s->n)
		return 0;
	if (k > s->n - off)
		k = s->n - (size_t)off;
	if (s->max) {
		size_t lim = s->vary ? 1 + s->calls % s->max : s->max;
		if (k > lim)
			k = lim;
	}
	memcpy(buf, s->p + off, k);
	return (long)k;
}

static struct src
src_of(const char *p, size_t n)
{
	return (struct src){ .p = p, .n = n, .fail_at = -1 };
}

static char *
slurp(const char *path, size_t *n)
{
	FILE *f = fopen(path, "rb");
	char *buf;
	long len;

	cr_assert_not_null(f, "%s", path);
	fseek(f, 0, SEEK_END);
	len = ftell(f);
	rewind(f);
	buf = malloc((size_t)len + 1);
	cr_assert_not_null(buf);
	cr_assert_eq(fread(buf, 1, (size_t)len, f), (size_t)len);
	fclose(f);
	buf[len] = '\0';
	*n = (size_t)len;
	return buf;
}

/* Entries of a directory other than . and ..; -1 if it does not exist. */
static int
entries(const char *path)
{
	DIR *d = opendir(path);
	struct dirent *e;
	int n = 0;

	if (!d)
		return -1;
	while ((e = readdir(d)))
		n += strcmp(e->d_name, ".") && strcmp(e->d_name, "..");
	closedir(d);
	return n;
}

static int
entries_in(const char *sub)
{
	char p[256];

	snprintf(p, sizeof(p), "%s/%s", root, sub);
	return entries(p);
}

static mode_t
mode_of(const char *path)
{
	struct stat st;

	cr_assert_eq(lstat(path, &st), 0, "%s", path);
	return st.st_mode;
}

Test(maildir, first_delivery_creates_the_tree_and_a_file_in_new)
{
	const char body[] = "Subject: hi\r\n\r\nline one\r\nline two\r\n";
	const char prefix[] = "Return-Path: <s@x>\r\nDelivered-To: bob@ex\r\n";
	const char want[] = "Return-Path: <s@x>\nDelivered-To: bob@ex\n"
			    "Subject: hi\n\nline one\nline two\n";
	struct src s = src_of(body, sizeof(body) - 1);
	struct maildir_result res;
	char p[256], *got;
	size_t n;

	cr_assert_eq(maildir_deliver(root, "Example.ORG", "Bob", prefix,
				     src_read, &s, sizeof(body) - 1, &res),
		     0, "%s", res.text);
	cr_expect_eq(res.status, 0);
	cr_expect_str_eq(res.enh, "2.0.0");
	cr_expect_not(res.permanent);
	/* Lower-cased names, Maildir tree, modes. */
	snprintf(p, sizeof(p), "%s/example.org/bob/", root);
	cr_expect_eq(strncmp(res.path, p, strlen(p)), 0, "%s", res.path);
	cr_expect_eq(strncmp(res.path + strlen(p), "new/", 4), 0);
	cr_expect(strstr(res.text, "delivered to maildir (new/") == res.text,
		  "%s", res.text);
	cr_expect(strstr(res.text, strrchr(res.path, '/') + 1) != NULL);
	for (int i = 0; i < 5; i++) {
		static const char *const d[] = { "example.org",
						 "example.org/bob",
						 "example.org/bob/tmp",
						 "example.org/bob/new",
						 "example.org/bob/cur" };
		snprintf(p, sizeof(p), "%s/%s", root, d[i]);
		cr_expect(S_ISDIR(mode_of(p)), "%s", p);
		cr_expect_eq(mode_of(p) & 07777, 0700, "%s", p);
	}
	cr_expect_eq(entries_in("example.org/bob/new"), 1);
	cr_expect_eq(entries_in("example.org/bob/tmp"), 0);
	cr_expect_eq(entries_in("example.org/bob/cur"), 0);
	cr_expect(S_ISREG(mode_of(res.path)));
	cr_expect_eq(mode_of(res.path) & 07777, 0600);
	got = slurp(res.path, &n);
	cr_expect_eq(n, sizeof(want) - 1);
	cr_expect_eq(memcmp(got, want, n), 0, "got [%s]", got);
	free(got);
}

Test(maildir, crlf_becomes_lf_and_lone_crs_stay)
{
	const char body[] = "a\r\nb\rc\r\r\nd\n\re\r\n\r";
	const char want[] = "P\r1\na\nb\rc\r\nd\n\re\n\r";
	struct src s = src_of(body, sizeof(body) - 1);
	struct maildir_result res;
	char *got;
	size_t n;

	cr_assert_eq(maildir_deliver(root, "d", "u", "P\r1\r\n", src_read, &s,
				     sizeof(body) - 1, &res),
		     0, "%s", res.text);
	got = slurp(res.path, &n);
	cr_expect_eq(n, sizeof(want) - 1, "%zu", n);
	cr_expect_eq(memcmp(got, want, sizeof(want) - 1), 0);
	free(got);
}

Test(maildir, cr_ending_the_prefix_joins_lf_starting_the_body)
{
	struct src s = src_of("\nx", 2);
	struct maildir_result res;
	char *got;
	size_t n;

	cr_assert_eq(maildir_deliver(root, "d", "u", "H: v\r", src_read, &s, 2,
				     &res),
		     0, "%s", res.text);
	got = slurp(res.path, &n);
	cr_expect_eq(n, 6);
	cr_expect_eq(memcmp(got, "H: v\nx", 6), 0);
	free(got);
}

Test(maildir, empty_body_and_no_prefix)
{
	struct src s = src_of("", 0);
	struct maildir_result res;
	char *got;
	size_t n;

	cr_assert_eq(maildir_deliver(root, "d", "u", NULL, src_read, &s, 0,
				     &res),
		     0, "%s", res.text);
	got = slurp(res.path, &n);
	cr_expect_eq(n, 0);
	free(got);
}

/* Reference conversion, byte by byte. */
static size_t
ref_lf(const char *p, size_t n, char *out)
{
	size_t o = 0;

	for (size_t i = 0; i < n; i++) {
		if (p[i] == '\r' && i + 1 < n && p[i + 1] == '\n')
			continue;
		out[o++] = p[i];
	}
	return o;
}

static void
deliver_big(size_t max, int vary)
{
	const size_t n = 3 * 65536 + 12345;
	char *body = malloc(n), *want = malloc(n), *got;
	struct maildir_result res;
	struct src s;
	size_t wn, gn;

	cr_assert(body && want);
	/* Lines of varying length with CRLF, some lone CRs, so that CRLF
	 * straddles read and buffer boundaries in many positions. */
	for (size_t i = 0, k = 0; i < n; i++, k++) {
		if (k % 17 == 15 && i + 1 < n) {
			body[i++] = '\r';
			body[i] = '\n';
		} else if (k % 101 == 50) {
			body[i] = '\r';
		} else {
			body[i] = (char)('a' + k % 26);
		}
	}
	/* A CRLF exactly across the 64 KiB read boundary. */
	body[65535] = '\r';
	body[65536] = '\n';
	wn = ref_lf(body, n, want);
	s = src_of(body, n);
	s.max = max;
	s.vary = vary;
	cr_assert_eq(maildir_deliver(root, "d", "big", NULL, src_read, &s, n,
				     &res),
		     0, "%s", res.text);
	cr_expect_gt(s.calls, 3, "streamed in several reads");
	got = slurp(res.path, &gn);
	cr_expect_eq(gn, wn, "%zu vs %zu", gn, wn);
	cr_expect_eq(memcmp(got, want, wn < gn ? wn : gn), 0);
	free(got);
	free(body);
	free(want);
}

Test(maildir, large_body_in_full_reads)
{
	deliver_big(0, 0);
}

Test(maildir, large_body_in_short_reads_of_every_size)
{
	deliver_big(13, 1);
}

Test(maildir, large_body_in_one_byte_reads)
{
	deliver_big(1, 0);
}

Test(maildir, unsafe_names_are_refused_permanently_creating_nothing)
{
	static char longname[300];
	const char *bad[] = { "",      ".",    "..",     ".hidden", "a/b",
			      "../x",  "/abs", "a\nb",   "a\x01",   "a\x7f",
			      "x/../..", longname };
	struct src s = src_of("x", 1);
	struct maildir_result res;

	memset(longname, 'l', 256);
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		cr_expect_eq(maildir_deliver(root, "example.org", bad[i], NULL,
					     src_read, &s, 1, &res),
			     -EINVAL, "local part %zu", i);
		cr_expect(res.permanent, "local part %zu", i);
		cr_expect_str_eq(res.enh, "5.1.3");
		cr_expect_str_eq(res.path, "");
		cr_expect_eq(maildir_deliver(root, bad[i], "bob", NULL,
					     src_read, &s, 1, &res),
			     -EINVAL, "domain %zu", i);
		cr_expect(res.permanent);
		cr_expect_str_eq(res.enh, "5.1.3");
		cr_expect(strstr(res.text, "domain") != NULL, "%s", res.text);
	}
	cr_expect_eq(maildir_deliver(root, NULL, "bob", NULL, src_read, &s, 1,
				     &res),
		     -EINVAL);
	cr_expect_eq(maildir_deliver(root, "d", NULL, NULL, src_read, &s, 1,
				     &res),
		     -EINVAL);
	cr_expect(res.permanent);
	cr_expect_eq(entries(root), 0, "nothing created under root");
	cr_expect_eq(entries(tdir), 1, "nothing created beside root");
	cr_expect_eq(s.calls, 0, "body not read");

	/* 255 bytes is a valid name. */
	longname[255] = '\0';
	cr_expect_eq(maildir_deliver(root, "d", longname, NULL, src_read, &s, 1,
				     &res),
		     0, "%s", res.text);
}

Test(maildir, root_that_is_a_file_is_a_temporary_failure)
{
	char file[128];
	struct src s = src_of("x", 1);
	struct maildir_result res;
	int fd;

	/* Works as root too, where a read-only mode would not stop us. */
	snprintf(file, sizeof(file), "%s/file", tdir);
	fd = open(file, O_WRONLY | O_CREAT, 0600);
	cr_assert_geq(fd, 0);
	close(fd);
	cr_expect_eq(maildir_deliver(file, "d", "u", NULL, src_read, &s, 1,
				     &res),
		     -ENOTDIR);
	cr_expect_not(res.permanent);
	cr_expect_str_eq(res.enh, "4.3.0");
	cr_expect(strstr(res.text, "Not a directory") != NULL, "%s", res.text);
	cr_expect(strstr(res.text, file) != NULL, "names the root: %s",
		  res.text);
	cr_expect_str_eq(res.path, "");
}

Test(maildir, missing_root_is_not_created)
{
	char missing[128];
	struct src s = src_of("x", 1);
	struct maildir_result res;

	snprintf(missing, sizeof(missing), "%s/nope", tdir);
	cr_expect_eq(maildir_deliver(missing, "d", "u", NULL, src_read, &s, 1,
				     &res),
		     -ENOENT);
	cr_expect_not(res.permanent);
	cr_expect_eq(entries(missing), -1);
	cr_expect_eq(maildir_deliver("", "d", "u", NULL, src_read, &s, 1, &res),
		     -EINVAL);
	cr_expect_not(res.permanent);
	cr_expect_eq(maildir_deliver(root, "d", "u", NULL, NULL, &s, 1, &res),
		     -EINVAL);
	cr_expect_eq(maildir_deliver(root, "d", "u", NULL, src_read, &s, 1,
				     NULL),
		     -EINVAL);
}

Test(maildir, read_only_root_is_a_temporary_failure)
{
	struct src s = src_of("x", 1);
	struct maildir_result res;

	if (geteuid() == 0) {
		/* A skipped test does not reach .fini: remove its dir here. */
		teardown();
		cr_skip_test("running as root: mode 0500 does not stop root "
			     "(the root-is-a-file test covers the path)");
	}
	cr_assert_eq(chmod(root, 0500), 0);
	cr_expect_eq(maildir_deliver(root, "d", "u", NULL, src_read, &s, 1,
				     &res),
		     -EACCES);
	cr_expect_not(res.permanent);
	cr_expect_str_eq(res.enh, "4.3.0");
	chmod(root, 0700);
	cr_expect_eq(entries(root), 0);
}

static void
expect_no_file(void)
{
	cr_expect_eq(entries_in("d/u/tmp"), 0, "tmp/ empty");
	cr_expect_eq(entries_in("d/u/new"), 0, "new/ empty");
}

Test(maildir, body_read_error_leaves_no_file)
{
	char *body = malloc(200000);
	struct maildir_result res;
	struct src s;

	cr_assert_not_null(body);
	memset(body, 'b', 200000);
	s = src_of(body, 200000);
	s.fail_at = 150000; /* after some data was written */
	s.err = -EIO;
	cr_expect_eq(maildir_deliver(root, "d", "u", "P: x\r\n", src_read, &s,
				     200000, &res),
		     -EIO);
	cr_expect_not(res.permanent);
	cr_expect_str_eq(res.enh, "4.3.0");
	cr_expect(strstr(res.text, "offset 150000") != NULL, "%s", res.text);
	cr_expect_str_eq(res.path, "");
	expect_no_file();

	/* The source's errno is reported, but as a source failure (4.3.0),
	 * not as a full mailbox. */
	s = src_of(body, 200000);
	s.fail_at = 0;
	s.err = -ENOSPC;
	cr_expect_eq(maildir_deliver(root, "d", "u", NULL, src_read, &s,
				     200000, &res),
		     -ENOSPC);
	cr_expect_str_eq(res.enh, "4.3.0");
	expect_no_file();
	free(body);
}

Test(maildir, short_or_overlong_body_source_leaves_no_file)
{
	struct src s = src_of("abc", 3);
	struct maildir_result res;

	/* The source ends before len. */
	cr_expect_eq(maildir_deliver(root, "d", "u", NULL, src_read, &s, 10,
				     &res),
		     -EIO);
	cr_expect_not(res.permanent);
	cr_expect(strstr(res.text, "body ended early") != NULL, "%s",
		  res.text);
	expect_no_file();
	/* A source returning more than asked. */
	s = src_of("abc", 3);
	s.overread = 1;
	cr_expect_eq(maildir_deliver(root, "d", "u", NULL, src_read, &s, 3,
				     &res),
		     -EIO);
	expect_no_file();
}

Test(maildir, two_deliveries_get_distinct_names)
{
	struct src s1 = src_of("one\r\n", 5), s2 = src_of("two\r\n", 5);
	struct maildir_result r1, r2;
	char *a, *b;
	size_t na, nb;

	cr_assert_eq(maildir_deliver(root, "d", "u", NULL, src_read, &s1, 5,
				     &r1),
		     0, "%s", r1.text);
	cr_assert_eq(maildir_deliver(root, "d", "u", NULL, src_read, &s2, 5,
				     &r2),
		     0, "%s", r2.text);
	cr_expect_str_neq(r1.path, r2.path);
	cr_expect_eq(entries_in("d/u/new"), 2);
	a = slurp(r1.path, &na);
	b = slurp(r2.path, &nb);
	cr_expect_str_eq(a, "one\n");
	cr_expect_str_eq(b, "two\n");
	free(a);
	free(b);
	/* Name shape: SEC.MUSECPPIDQN.HOST, nothing unsafe in it. */
	{
		const char *nm = strrchr(r1.path, '/') + 1;
		char pid[32];
		snprintf(pid, sizeof(pid), "P%ldQ", (long)getpid());
		cr_expect(strstr(nm, ".M") != NULL, "%s", nm);
		cr_expect(strstr(nm, pid) != NULL, "%s", nm);
		cr_expect(strchr(nm, ':') == NULL, "%s", nm);
		cr_expect(nm[0] >= '1' && nm[0] <= '9', "%s", nm);
	}
}

struct par {
	struct maildir_result res[50];
};

static void *
deliver_many(void *arg)
{
	struct par *p = arg;

	for (int i = 0; i < 50; i++) {
		struct src s = src_of("m\r\n", 3);
		maildir_deliver(root, "Shared.Example", "Box", NULL, src_read,
				&s, 3, &p->res[i]);
	}
	return NULL;
}

Test(maildir, concurrent_deliveries_race_on_creation_and_stay_distinct)
{
	static struct par par[4];
	pthread_t th[4];

	for (int i = 0; i < 4; i++)
		cr_assert_eq(pthread_create(&th[i], NULL, deliver_many,
					    &par[i]),
			     0);
	for (int i = 0; i < 4; i++)
		pthread_join(th[i], NULL);
	for (int i = 0; i < 4; i++)
		for (int j = 0; j < 50; j++)
			cr_expect_eq(par[i].res[j].status, 0, "%s",
				     par[i].res[j].text);
	cr_expect_eq(entries_in("shared.example/box/new"), 200);
	cr_expect_eq(entries_in("shared.example/box/tmp"), 0);
}

Test(maildir, symlinks_below_root_are_not_followed)
{
	char outside[128], link[160], p[200];
	struct src s = src_of("x", 1);
	struct maildir_result res;

	snprintf(outside, sizeof(outside), "%s/outside", tdir);
	cr_assert_eq(mkdir(outside, 0700), 0);
	/* DOMAIN is a symlink to a directory outside root. */
	snprintf(link, sizeof(link), "%s/evil.example", root);
	cr_assert_eq(symlink(outside, link), 0);
	cr_expect_neq(maildir_deliver(root, "evil.example", "u", NULL,
				      src_read, &s, 1, &res),
		      0);
	cr_expect_not(res.permanent);
	cr_expect_eq(entries(outside), 0, "nothing written through it");
	/* LOCALPART is one. */
	snprintf(p, sizeof(p), "%s/d", root);
	cr_assert_eq(mkdir(p, 0700), 0);
	snprintf(link, sizeof(link), "%s/d/u", root);
	cr_assert_eq(symlink(outside, link), 0);
	cr_expect_neq(maildir_deliver(root, "d", "u", NULL, src_read, &s, 1,
				      &res),
		      0);
	cr_expect_eq(entries(outside), 0, "nothing written through it");
}

Test(maildir, root_path_too_long_for_the_result)
{
	static char deep[1100];
	struct src s = src_of("x", 1);
	struct maildir_result res;

	snprintf(deep, sizeof(deep), "%s", root);
	while (strlen(deep) < 1000)
		strcat(deep, "/.");
	cr_expect_eq(maildir_deliver(deep, "d", "u", NULL, src_read, &s, 1,
				     &res),
		     -ENAMETOOLONG);
	cr_expect_not(res.permanent);
	cr_expect_str_eq(res.enh, "4.3.5");
	cr_expect_eq(entries(root), 0);
}

/* root/gone removed and bob's mailbox made again by "another program"
 * (mkdir -p), then one delivery to bob with its syncs recorded. */
static void
remake_and_deliver(const char *gone)
{
	struct src s = src_of("hi\r\n", 4);
	struct maildir_result res;
	char cmd[512];

	snprintf(cmd, sizeof(cmd),
		 "rm -rf %s/%s && mkdir -p %s/example.org/bob/tmp "
		 "%s/example.org/bob/new %s/example.org/bob/cur",
		 root, gone, root, root, root);
	cr_assert_eq(system(cmd), 0);
	record_syncs();
	cr_assert_eq(maildir_deliver(root, "example.org", "bob", NULL,
				     src_read, &s, 4, &res), 0, "%s", res.text);
	recording = 0;
}

static bool
has_btime(const char *path)
{
	struct statx st;

	return statx(AT_FDCWD, path, 0, STATX_BTIME, &st) == 0 &&
	       (st.stx_mask & STATX_BTIME);
}

/*
 * A mailbox this process made and synced, removed and made again by
 * another program (an IMAP server creating it at login): the directories
 * are new, not yet in their parents, and are synced again before the
 * message counts as delivered. One left alone is not synced again.
 */
Test(maildir, a_mailbox_made_again_elsewhere_is_synced_again)
{
	struct src s = src_of("hi\r\n", 4);
	struct maildir_result res;

	cr_assert_eq(maildir_deliver(root, "example.org", "bob", NULL,
				     src_read, &s, 4, &res), 0, "%s",
		     res.text);
	/* the same mailbox again: already durable, nothing but the file
	 * and new/ */
	s = src_of("hi\r\n", 4);
	record_syncs();
	cr_assert_eq(maildir_deliver(root, "example.org", "bob", NULL,
				     src_read, &s, 4, &res), 0);
	recording = 0;
	if (has_btime(root)) { /* else nothing is taken as known */
		cr_assert(!was_synced(""));
		cr_assert(!was_synced("example.org"));
		cr_assert(!was_synced("example.org/bob"));
	}
	cr_assert(was_synced("example.org/bob/new"));

	remake_and_deliver("example.org/bob");
	cr_assert(was_synced("example.org"), "bob's entry in its domain");
	cr_assert(was_synced("example.org/bob"), "tmp, new, cur in bob");
	cr_assert(was_synced("example.org/bob/new"));

	/* the whole domain made again */
	remake_and_deliver("example.org");
	cr_assert(was_synced(""), "the domain's entry in the root");
	cr_assert(was_synced("example.org"));
	cr_assert(was_synced("example.org/bob"));
}
