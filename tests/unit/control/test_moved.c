/*
 * Moved messages' files (moved.h): written and read back whole, the
 * envelope intact; a torn or altered file refused; a body source that
 * fails leaves no file behind.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../testdir.h"
#include "finaldot/spool_format.h"
#include "moved.h"

TestSuite(moved);

struct src {
	const uint8_t *p;
	size_t n;
	long fail_at; /* -1: never */
	int overread; /* return one more octet than asked */
};

static long
src_read(void *ctx, uint64_t off, void *buf, size_t n)
{
	struct src *s = ctx;

	if (s->fail_at >= 0 && off + n > (uint64_t)s->fail_at)
		return -EIO;
	if (s->overread)
		return (long)n + 1;
	if (off >= s->n)
		return 0;
	if (n > s->n - off)
		n = s->n - (size_t)off;
	if (n > 1000) /* short reads: the writer loops */
		n = 1000;
	memcpy(buf, s->p + off, n);
	return (long)n;
}

static char dir[128];

static void
setup(void)
{
	char md[200];

	fd_test_dir_make(dir, sizeof(dir), "/tmp", "moved");
	snprintf(md, sizeof(md), "%s/" MOVED_DIR, dir);
	cr_assert_eq(mkdir(md, 0700), 0);
}

static void
teardown(void)
{
	fd_test_dir_remove(dir);
}

static const char *rcpts[] = {"a@example.com", "B@Example.org"};
static const uint8_t notify[] = {FD_NOTIFY_SUCCESS | FD_NOTIFY_FAILURE, 0};
static const char *orcpts[] = {"rfc822;a@example.com", ""};

static struct fd_envelope
envelope(void)
{
	return (struct fd_envelope){
		.mail_from = "s@client.test", .rcpts = rcpts, .n_rcpts = 2,
		.helo = "client.test", .client_addr = "192.0.2.7",
		.proto = "ESMTP", .arrival_us = 1764900000123456ull,
		.body = FD_BODY_8BITMIME, .smtputf8 = true, .envid = "ENV1",
		.ret = FD_RET_HDRS, .notify = notify, .orcpts = orcpts};
}

static uint8_t *
body(size_t n)
{
	uint8_t *b = malloc(n);

	cr_assert_not_null(b);
	for (size_t i = 0; i < n; i++)
		b[i] = (uint8_t)(i * 7 + 3);
	return b;
}

static int
open_moved(uint64_t id, uint64_t *size)
{
	char p[300];
	struct stat st;
	int fd;

	moved_path(p, sizeof(p), dir, id, 0);
	fd = open(p, O_RDONLY);
	cr_assert_geq(fd, 0, "%s", p);
	cr_assert_eq(fstat(fd, &st), 0);
	*size = (uint64_t)st.st_size;
	return fd;
}

Test(moved, written_and_read_back, .init = setup, .fini = teardown)
{
	struct fd_envelope env = envelope();
	size_t n = 300000;
	uint8_t *b = body(n), *got = malloc(n);
	struct src s = {b, n, -1, 0};
	struct moved_info mi;
	void *scratch = malloc(moved_scratch_max());
	uint64_t off = 0, size;
	int fd;

	cr_assert_eq(moved_write(dir, 0x0661dc0000000abcull, 3, &env, n,
				 0x12345678, src_read, &s, &off),
		     0);
	fd = open_moved(0x0661dc0000000abcull, &size);
	cr_assert_eq(moved_read(fd, size, &mi, scratch, moved_scratch_max()),
		     0);
	cr_assert_eq(mi.id, 0x0661dc0000000abcull);
	cr_assert_eq(mi.worker, 3);
	cr_assert_eq(mi.body_len, n);
	cr_assert_eq(mi.body_crc, 0x12345678);
	cr_assert_eq(mi.body_off, off);
	cr_assert_str_eq(mi.env.mail_from, "s@client.test");
	cr_assert_eq(mi.env.n_rcpts, 2);
	cr_assert_str_eq(mi.env.rcpts[1], "B@Example.org");
	cr_assert_str_eq(mi.env.helo, "client.test");
	cr_assert_str_eq(mi.env.client_addr, "192.0.2.7");
	cr_assert_eq(mi.env.arrival_us, 1764900000123456ull);
	cr_assert_eq(mi.env.body, FD_BODY_8BITMIME);
	cr_assert(mi.env.smtputf8);
	cr_assert_str_eq(mi.env.envid, "ENV1");
	cr_assert_eq(mi.env.ret, FD_RET_HDRS);
	cr_assert_not_null(mi.env.notify);
	cr_assert_eq(mi.env.notify[0], FD_NOTIFY_SUCCESS | FD_NOTIFY_FAILURE);
	cr_assert_not_null(mi.env.orcpts);
	cr_assert_str_eq(mi.env.orcpts[0], "rfc822;a@example.com");
	cr_assert_eq(pread(fd, got, n, (off_t)off), (ssize_t)n);
	cr_assert_eq(memcmp(got, b, n), 0, "body differs");
	close(fd);
	free(b);
	free(got);
	free(scratch);
}

Test(moved, torn_or_altered_files_are_refused, .init = setup,
     .fini = teardown)
{
	struct fd_envelope env = envelope();
	uint8_t *b = body(5000);
	struct src s = {b, 5000, -1, 0};
	struct moved_info mi;
	void *scratch = malloc(moved_scratch_max());
	uint64_t off, size;
	uint8_t byte;
	int fd;

	cr_assert_eq(moved_write(dir, 7, 0, &env, 5000, 1, src_read, &s,
				 &off),
		     0);
	fd = open_moved(7, &size);
	/* One byte short, one too many: not a whole file. */
	cr_assert_eq(moved_read(fd, size - 1, &mi, scratch,
				moved_scratch_max()),
		     -EBADMSG);
	cr_assert_eq(moved_read(fd, size + 1, &mi, scratch,
				moved_scratch_max()),
		     -EBADMSG);
	close(fd);
	/* An envelope byte changed: its CRC says so. */
	{
		char p[300];
		moved_path(p, sizeof(p), dir, 7, 0);
		fd = open(p, O_RDWR);
		cr_assert_eq(pread(fd, &byte, 1, MOVED_HDR_LEN + 5), 1);
		byte ^= 0x20;
		cr_assert_eq(pwrite(fd, &byte, 1, MOVED_HDR_LEN + 5), 1);
	}
	cr_assert_eq(moved_read(fd, size, &mi, scratch, moved_scratch_max()),
		     -EBADMSG);
	close(fd);
	free(b);
	free(scratch);
}

/* Message id's file written from a bad source of n octets (failing at
 * fail_at, or returning one more than asked): -EIO, and neither the file
 * nor its temporary one left behind. */
static void
write_fails_leaving_nothing(uint64_t id, size_t n, long fail_at,
			    int overread)
{
	struct fd_envelope env = envelope();
	uint8_t *b = body(n);
	struct src s = {b, n, fail_at, overread};
	char p[300], t[300];
	uint64_t off;

	cr_assert_eq(moved_write(dir, id, 0, &env, n, 1, src_read, &s, &off),
		     -EIO);
	moved_path(p, sizeof(p), dir, id, 0);
	moved_path(t, sizeof(t), dir, id, 1);
	cr_assert_neq(access(p, F_OK), 0, "a file was left");
	cr_assert_neq(access(t, F_OK), 0, "the temporary file was left");
	free(b);
}

Test(moved, a_failed_body_read_leaves_no_file, .init = setup,
     .fini = teardown)
{
	write_fails_leaving_nothing(9, 50000, 20000, 0);
}

/* A source that hands back more than it was asked for is a bad source:
 * nothing is written past what it filled, and no file is left. */
Test(moved, a_source_returning_more_than_asked_leaves_no_file,
     .init = setup, .fini = teardown)
{
	write_fails_leaving_nothing(10, 3000, -1, 1);
}
