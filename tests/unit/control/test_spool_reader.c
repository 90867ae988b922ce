/*
 * The spool reader on segments written by the real writer, then damaged the
 * ways a power cut or an attacker could: a torn batch (bytes overwritten,
 * second half never written, a zero block), a truncated file, a recycled
 * segment's stale bytes, a record forged inside a message body.
 */
#include <criterion/criterion.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../testdir.h"
#include "finaldot/crc32c.h"
#include "finaldot/spool_format.h"
#include "spool.h"
#include "spool_reader.h"

static char root[64];
static unsigned n_done, n_ok;

/* pread64 as the scan's walk sees it: with fail_reads set, a read of 64
 * KiB or more at or past 1 MiB fails with EIO (a bad sector). With
 * fail_file set, reads of the file whose path ends so fail: those of 64
 * KiB or more (its records), or every one with fail_file_all (its
 * header too). */
static int fail_reads;
static unsigned failed_reads;
static const char *fail_file;
static int fail_file_all;

static bool
is_fail_file(int fd)
{
	char link[64], path[512];
	ssize_t k;
	size_t fl = strlen(fail_file);

	snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
	k = readlink(link, path, sizeof(path) - 1);
	if (k < 0 || (size_t)k < fl)
		return false;
	path[k] = 0;
	return strcmp(path + k - fl, fail_file) == 0;
}

/* open64 (what open() is here): with fail_open set, opening the file
 * whose path ends so fails with EIO. */
static const char *fail_open;

int open64(const char *path, int flags, ...);
int
open64(const char *path, int flags, ...)
{
	static int (*real)(const char *, int, ...);
	size_t pl = strlen(path);
	mode_t mode = 0;

	if (!real)
		*(void **)&real = dlsym(RTLD_NEXT, "open64");
	if (flags & O_CREAT) {
		va_list ap;
		va_start(ap, flags);
		mode = (mode_t)va_arg(ap, int);
		va_end(ap);
	}
	if (fail_open && pl >= strlen(fail_open) &&
	    strcmp(path + pl - strlen(fail_open), fail_open) == 0) {
		errno = EIO;
		return -1;
	}
	return real(path, flags, mode);
}

ssize_t pread64(int fd, void *buf, size_t n, off_t off);
ssize_t
pread64(int fd, void *buf, size_t n, off_t off)
{
	static ssize_t (*real)(int, void *, size_t, off_t);

	if (!real)
		*(void **)&real = dlsym(RTLD_NEXT, "pread64");
	if ((fail_reads && n >= 65536 && off >= (off_t)(1u << 20)) ||
	    (fail_file && (fail_file_all || n >= 65536) && is_fail_file(fd))) {
		failed_reads++;
		errno = EIO;
		return -1;
	}
	return real(fd, buf, n, off);
}

static void
on_done(void *ctx, uint64_t id, int status)
{
	(void)ctx;
	(void)id;
	n_done++;
	n_ok += status == 0;
}

static void
setup(void)
{
	fd_test_dir_make(root, sizeof(root), "/var/tmp", "reader");
	n_done = n_ok = 0;
}

static void
teardown(void)
{
	fd_test_dir_remove(root);
}

TestSuite(spool_reader, .init = setup, .fini = teardown, .timeout = 60);

static const char *const rcpts[] = { "r1@example.org", "r2@example.org" };

static struct fd_envelope
env(void)
{
	struct fd_envelope e = {
		.mail_from = "s@example.org",
		.rcpts = rcpts,
		.n_rcpts = 2,
		.helo = "h.example",
		.client_addr = "198.51.100.7",
		.proto = "ESMTP",
		.arrival_us = 1712345678901234ull,
		.body = FD_BODY_8BITMIME,
	};
	return e;
}

static struct spool *
open_spool(void)
{
	struct spool_params p;

	spool_params_defaults(&p);
	p.dir = root;
	p.worker = 1;
	p.segment_size = 4u << 20;
	p.batch_size = 16384;
	p.batches = 4;
	p.max_msgs = 16;
	p.spare_segments = 1;
	p.done = on_done;
	struct spool *sp = spool_create(&p);
	if (!sp && (errno == EINVAL || errno == ENOSYS || errno == EPERM))
		cr_skip_test("io_uring or O_DIRECT unavailable");
	cr_assert_not_null(sp);
	return sp;
}

static void
drain(struct spool *sp)
{
	while (spool_inflight(sp))
		cr_assert_geq(spool_wait(sp), 0);
}

/* One message per batch (flushed and completed before the next). */
static uint64_t
write_msg(struct spool *sp, const uint8_t *body, size_t n)
{
	struct fd_envelope e = env();
	uint64_t id;
	int err;
	struct spool_msg *m = spool_msg_begin(sp, &e, NULL, &id, &err);

	cr_assert_not_null(m);
	while (n) {
		size_t r = spool_room(sp), k = n < r ? n : r;
		if (!k) {
			spool_flush(sp);
			spool_wait(sp);
			continue;
		}
		cr_assert_eq(spool_msg_append(sp, m, body, k), 0);
		body += k;
		n -= k;
	}
	cr_assert_eq(spool_msg_commit(sp, m), 0);
	spool_flush(sp);
	drain(sp);
	return id;
}

static uint8_t *
pattern(size_t n, unsigned seed)
{
	uint8_t *b = malloc(n);
	for (size_t i = 0; i < n; i++)
		b[i] = (uint8_t)rand_r(&seed);
	return b;
}

static struct ctl_spool_scan *
scan(void)
{
	int err = 0;
	struct ctl_spool_scan *s = ctl_spool_scan_dir(root, &err);
	cr_assert_not_null(s, "scan: %d", err);
	return s;
}

static int
cmp_feed(void *ctx, const void *p, size_t n)
{
	const uint8_t **exp = ctx;
	if (memcmp(*exp, p, n))
		return 1;
	*exp += n;
	return 0;
}

static void
assert_body(struct ctl_spool_scan *s, uint64_t id, const uint8_t *b, size_t n)
{
	const struct ctl_spool_msg *m = ctl_spool_scan_find(s, id);
	cr_assert_not_null(m, "message missing");
	cr_assert_eq(m->body_len, n);
	const uint8_t *p = b;
	cr_assert_eq(ctl_spool_read_body(s, m, cmp_feed, &p), 0);
	cr_assert_eq((size_t)(p - b), n);
}

/* Three messages A, B, C in three batches; returns B's segment path and the
 * file range of B's batch. */
struct abc {
	uint64_t id[3];
	uint8_t *body[3];
	size_t len[3];
	char path[512];
	uint64_t b_start, b_end; /* B's batch: [start, end) */
};

static void
write_abc(struct abc *x)
{
	struct spool *sp = open_spool();
	for (int i = 0; i < 3; i++) {
		x->len[i] = 3000 + 2500 * (size_t)i;
		x->body[i] = pattern(x->len[i], (unsigned)i + 10);
		x->id[i] = write_msg(sp, x->body[i], x->len[i]);
	}
	spool_destroy(sp);
	cr_assert_eq(n_ok, 3);
	struct ctl_spool_scan *s = scan();
	cr_assert_eq(ctl_spool_scan_count(s), 3);
	const struct ctl_spool_msg *b = ctl_spool_scan_find(s, x->id[1]);
	const struct ctl_spool_msg *c = ctl_spool_scan_find(s, x->id[2]);
	cr_assert(b && c);
	strcpy(x->path, ctl_spool_scan_segment(s, b->env_seg)->path);
	x->b_start = b->env_off;
	x->b_end = c->env_off;
	cr_assert_eq(x->b_start % SPOOL_BLOCK, 0);
	cr_assert_eq(x->b_end % SPOOL_BLOCK, 0);
	cr_assert_gt(x->b_end - x->b_start, SPOOL_BLOCK, "B spans 2+ blocks");
	ctl_spool_scan_free(s);
}

static void
free_abc(struct abc *x)
{
	for (int i = 0; i < 3; i++)
		free(x->body[i]);
}

static void
patch(const char *path, uint64_t off, const void *p, size_t n)
{
	int fd = open(path, O_WRONLY);
	cr_assert_geq(fd, 0);
	cr_assert_eq(pwrite(fd, p, n, (off_t)off), (ssize_t)n);
	close(fd);
}

/* After damage to B's batch: A and C intact, B gone. */
static void
expect_b_lost(struct abc *x, bool expect_bad)
{
	struct ctl_spool_scan *s = scan();
	const struct ctl_spool_summary *sum = ctl_spool_scan_summary(s);

	assert_body(s, x->id[0], x->body[0], x->len[0]);
	assert_body(s, x->id[2], x->body[2], x->len[2]);
	cr_assert_null(ctl_spool_scan_find(s, x->id[1]));
	cr_assert_eq(sum->msgs_committed, 2);
	if (expect_bad)
		cr_assert_geq(sum->records_bad, 1);
	ctl_spool_scan_free(s);
}

Test(spool_reader, all_found_byte_identical)
{
	struct spool *sp = open_spool();
	struct fd_envelope e = env();
	enum { N = 12 };
	uint64_t ids[N];
	uint8_t *bodies[N];
	size_t lens[N];
	struct spool_msg *ms[N];
	int err;

	/* interleaved appends in shared batches, sizes 0 .. ~40 KiB */
	for (int i = 0; i < N; i++) {
		lens[i] = (size_t)i * 3500;
		bodies[i] = pattern(lens[i] + 1, (unsigned)i);
		ms[i] = spool_msg_begin(sp, &e, NULL, &ids[i], &err);
		cr_assert_not_null(ms[i]);
	}
	for (size_t off = 0; off < 40000; off += 700)
		for (int i = 0; i < N; i++) {
			if (off >= lens[i])
				continue;
			size_t k = lens[i] - off < 700 ? lens[i] - off : 700;
			while (spool_room(sp) < k) {
				spool_flush(sp);
				spool_wait(sp);
			}
			cr_assert_eq(spool_msg_append(sp, ms[i], bodies[i] + off, k), 0);
		}
	for (int i = 0; i < N; i++)
		cr_assert_eq(spool_msg_commit(sp, ms[i]), 0);
	spool_flush(sp);
	drain(sp);
	spool_destroy(sp);
	cr_assert_eq(n_ok, N);

	struct ctl_spool_scan *s = scan();
	const struct ctl_spool_summary *sum = ctl_spool_scan_summary(s);
	cr_assert_eq(sum->msgs_committed, N);
	cr_assert_eq(sum->msgs_incomplete, 0);
	cr_assert_eq(sum->records_bad, 0);
	cr_assert_eq(sum->records_stale, 0);
	cr_assert_eq(sum->max_msgid[1], ids[N - 1]);
	for (int i = 0; i < N; i++) {
		assert_body(s, ids[i], bodies[i], lens[i]);
		const struct ctl_spool_msg *m = ctl_spool_scan_find(s, ids[i]);
		cr_assert_str_eq(m->env.mail_from, "s@example.org");
		cr_assert_eq(m->env.n_rcpts, 2);
		cr_assert_str_eq(m->env.rcpts[1], "r2@example.org");
		cr_assert_eq(m->env.arrival_us, 1712345678901234ull);
		cr_assert_eq(m->worker, 1);
		free(bodies[i]);
	}
	for (size_t i = 1; i < ctl_spool_scan_count(s); i++)
		cr_assert_lt(ctl_spool_scan_msg(s, i - 1)->id,
			     ctl_spool_scan_msg(s, i)->id);
	ctl_spool_scan_free(s);
}

Test(spool_reader, torn_batch_overwritten_bytes)
{
	struct abc x;
	write_abc(&x);
	uint8_t junk[100];
	memset(junk, 0x5a, sizeof(junk));
	patch(x.path, x.b_start + 2000, junk, sizeof(junk));
	expect_b_lost(&x, true);
	free_abc(&x);
}

Test(spool_reader, torn_batch_second_half_missing)
{
	struct abc x;
	write_abc(&x);
	size_t half = (size_t)(x.b_end - x.b_start) / 2;
	uint8_t *z = calloc(1, half);
	patch(x.path, x.b_end - half, z, half);
	free(z);
	expect_b_lost(&x, false);
	free_abc(&x);
}

Test(spool_reader, zeroed_block)
{
	struct abc x;
	write_abc(&x);
	uint8_t z[SPOOL_BLOCK] = { 0 };
	patch(x.path, x.b_start, z, sizeof(z)); /* B's ENV block */
	expect_b_lost(&x, false);
	free_abc(&x);
}

Test(spool_reader, header_torn_mid_record)
{
	struct abc x;
	write_abc(&x);
	uint8_t one = 0xff;
	patch(x.path, x.b_start + 9, &one, 1); /* ENV length byte */
	expect_b_lost(&x, true);
	free_abc(&x);
}

Test(spool_reader, truncated_file)
{
	struct abc x;
	write_abc(&x);
	cr_assert_eq(truncate(x.path, (off_t)(x.b_start + SPOOL_BLOCK)), 0);
	struct ctl_spool_scan *s = scan();
	assert_body(s, x.id[0], x.body[0], x.len[0]);
	cr_assert_null(ctl_spool_scan_find(s, x.id[1]));
	cr_assert_null(ctl_spool_scan_find(s, x.id[2]));
	ctl_spool_scan_free(s);
	free_abc(&x);
}

Test(spool_reader, stale_epoch_ignored)
{
	struct abc x;
	write_abc(&x);
	/* Recycle the segment: same bytes, new header with another epoch. */
	uint8_t hb[SPOOL_SEG_HDR_LEN];
	struct spool_seg_hdr h;
	int fd = open(x.path, O_RDONLY);
	cr_assert_eq(pread(fd, hb, sizeof(hb), 0), (ssize_t)sizeof(hb));
	close(fd);
	cr_assert_eq(spool_seg_hdr_decode(hb, sizeof(hb), &h), SPOOL_DEC_OK);
	h.epoch ^= 0x0101010101010101ull;
	h.use_seq++;
	spool_seg_hdr_encode(&h, hb);
	patch(x.path, 0, hb, sizeof(hb));
	struct ctl_spool_scan *s = scan();
	const struct ctl_spool_summary *sum = ctl_spool_scan_summary(s);
	cr_assert_eq(sum->msgs_committed, 0);
	cr_assert_geq(sum->records_stale, 3);
	cr_assert_eq(sum->records_ok, 0);
	ctl_spool_scan_free(s);
	free_abc(&x);
}

/* A whole forged message (ENV, DATA, END) encoded with a guessed epoch. */
static size_t
forge(uint8_t *out, size_t cap, uint64_t fake_id)
{
	struct fd_envelope e = env();
	uint8_t pl[512];
	size_t n = spool_env_encode(&e, pl, sizeof(pl)), o = 0;
	struct spool_rec_hdr h = { .epoch = 0x4242424242424242ull,
				   .msgid = fake_id };

	h.type = SPOOL_REC_ENV;
	o += spool_rec_encode(&h, pl, n, out + o, cap - o);
	h.type = SPOOL_REC_DATA;
	o += spool_rec_encode(&h, "FORGED", 6, out + o, cap - o);
	h.type = SPOOL_REC_END;
	h.offset = 6;
	h.aux = fd_crc32c(0, "FORGED", 6);
	o += spool_rec_encode(&h, NULL, 0, out + o, cap - o);
	return o;
}

Test(spool_reader, forged_record_in_body_rejected)
{
	struct fd_envelope e = env();
	size_t elen = spool_env_encoded_len(&e);
	/* fresh spool: batch at 4096, ENV record, then the DATA header */
	uint64_t payload_off = SPOOL_BLOCK + spool_rec_size(elen) +
			       SPOOL_REC_HDR_LEN;
	size_t at = (size_t)(2 * SPOOL_BLOCK - payload_off);
	size_t n = 3 * SPOOL_BLOCK;
	uint8_t *body = pattern(n, 3);
	uint64_t fake = 0x00000000DEAD0001ull;
	size_t fl = forge(body + at, n - at, fake);
	cr_assert_gt(fl, 0);

	struct spool *sp = open_spool();
	uint64_t id = write_msg(sp, body, n);
	spool_destroy(sp);

	struct ctl_spool_scan *s = scan();
	assert_body(s, id, body, n); /* sequential walk never looks inside */
	const struct ctl_spool_msg *m = ctl_spool_scan_find(s, id);
	cr_assert_eq(m->pieces[0].file_off, payload_off, "layout as assumed");
	char path[512];
	strcpy(path, ctl_spool_scan_segment(s, m->env_seg)->path);
	ctl_spool_scan_free(s);

	/* Break the real DATA header: the walk resyncs at the next block,
	 * exactly where the forged records sit. The octet is one of the
	 * segment's random epoch: flipped, not overwritten with a constant
	 * it holds once in 256 spools (a constant made this test fail then). */
	uint64_t at_hdr = payload_off - SPOOL_REC_HDR_LEN + 20;
	uint8_t junk;
	int rfd = open(path, O_RDONLY);
	cr_assert_geq(rfd, 0);
	cr_assert_eq(pread(rfd, &junk, 1, (off_t)at_hdr), 1);
	close(rfd);
	junk ^= 0xff;
	patch(path, at_hdr, &junk, 1);
	s = scan();
	const struct ctl_spool_summary *sum = ctl_spool_scan_summary(s);
	cr_assert_null(ctl_spool_scan_find(s, fake), "forged message accepted");
	cr_assert_null(ctl_spool_scan_find(s, id));
	cr_assert_geq(sum->records_stale, 1, "forged record seen as foreign");
	cr_assert_geq(sum->records_bad, 1);
	cr_assert_eq(sum->msgs_committed, 0);
	ctl_spool_scan_free(s);
	free(body);
}

Test(spool_reader, empty_and_missing_root)
{
	int err = 0;
	cr_assert_null(ctl_spool_scan_dir("/nonexistent/finaldot", &err));
	cr_assert_eq(err, -ENOENT);
	struct ctl_spool_scan *s = scan();
	cr_assert_eq(ctl_spool_scan_count(s), 0);
	cr_assert_eq(ctl_spool_scan_summary(s)->segments, 0);
	ctl_spool_scan_free(s);
}

/* ---- issue 10: a damaged header, a copy, a deleted segment ---- */

static void
read_file(const char *path, uint64_t off, void *p, size_t n)
{
	int fd = open(path, O_RDONLY);
	cr_assert_geq(fd, 0);
	cr_assert_eq(pread(fd, p, n, (off_t)off), (ssize_t)n);
	close(fd);
}

static void
expect_abc(struct abc *x)
{
	struct ctl_spool_scan *s = scan();
	for (int i = 0; i < 3; i++)
		assert_body(s, x->id[i], x->body[i], x->len[i]);
	cr_assert_eq(ctl_spool_scan_summary(s)->msgs_committed, 3);
	ctl_spool_scan_free(s);
}

/*
 * One flipped or zeroed byte anywhere in the header: the messages are
 * still found (the epoch comes from the header's field, or, when that is
 * the damaged one, from a record one byte away from it), and the segment
 * is reported as salvaged. Before issue 10 the segment was skipped whole.
 */
Test(spool_reader, damaged_header_byte_salvaged)
{
	struct abc x;
	uint8_t hdr[SPOOL_SEG_HDR_LEN];

	write_abc(&x);
	read_file(x.path, 0, hdr, sizeof(hdr));
	for (unsigned pos = 0; pos < SPOOL_SEG_HDR_LEN; pos++) {
		for (int zero = 0; zero < 2; zero++) {
			uint8_t b = zero ? 0 : (uint8_t)(hdr[pos] ^ 0x10);
			if (b == hdr[pos])
				continue;
			patch(x.path, pos, &b, 1);
			struct ctl_spool_scan *s = scan();
			const struct ctl_spool_summary *sum =
				ctl_spool_scan_summary(s);
			cr_assert_eq(sum->msgs_committed, 3,
				     "byte %u %s: %llu messages", pos,
				     zero ? "zeroed" : "flipped",
				     (unsigned long long)sum->msgs_committed);
			cr_assert_eq(sum->segments_damaged, 1);
			cr_assert_eq(sum->segments_salvaged, 1);
			for (int i = 0; i < 3; i++)
				assert_body(s, x.id[i], x.body[i], x.len[i]);
			for (size_t k = 0; k < ctl_spool_scan_nsegs(s); k++) {
				const struct ctl_spool_seg *g =
					ctl_spool_scan_segment(s, k);
				if (g->salvaged)
					cr_assert_eq(g->file_no, 0,
						     "the number from the name");
			}
			ctl_spool_scan_free(s);
			patch(x.path, pos, &hdr[pos], 1);
		}
	}
	free_abc(&x);
}

/* A header block with nothing left to trust: reported, records unused. */
Test(spool_reader, zeroed_header_block_reported)
{
	struct abc x;
	uint8_t z[SPOOL_BLOCK] = {0};

	write_abc(&x);
	patch(x.path, 0, z, sizeof(z));
	struct ctl_spool_scan *s = scan();
	const struct ctl_spool_summary *sum = ctl_spool_scan_summary(s);
	cr_assert_eq(sum->segments_damaged, 1);
	cr_assert_eq(sum->segments_salvaged, 0);
	cr_assert_eq(sum->msgs_committed, 0);
	ctl_spool_scan_free(s);
	free_abc(&x);
}

static void
copy_file(const char *from, const char *to)
{
	int in = open(from, O_RDONLY), out = open(to, O_WRONLY | O_CREAT |
						   O_TRUNC, 0640);
	char buf[65536];
	ssize_t n;

	cr_assert(in >= 0 && out >= 0);
	while ((n = read(in, buf, sizeof(buf))) > 0)
		cr_assert_eq(write(out, buf, (size_t)n), n);
	close(in);
	close(out);
}

/*
 * A copy of a segment under another name (a backup restored beside the
 * original): every message once, the copy reported. Before issue 10 the
 * second ENV of each id broke every message of the segment.
 */
Test(spool_reader, copied_segment_messages_kept_once)
{
	struct abc x;
	char copy[600];

	write_abc(&x);
	snprintf(copy, sizeof(copy), "%.*s/000000ff.seg",
		 (int)(strrchr(x.path, '/') - x.path), x.path);
	copy_file(x.path, copy);
	struct ctl_spool_scan *s = scan();
	const struct ctl_spool_summary *sum = ctl_spool_scan_summary(s);
	cr_assert_eq(sum->msgs_committed, 3);
	cr_assert_eq(sum->msgs_incomplete, 0);
	cr_assert_eq(sum->segments_duplicate, 1);
	cr_assert_geq(sum->records_dup, 9, "ENV, DATA, END of three");
	for (int i = 0; i < 3; i++) {
		assert_body(s, x.id[i], x.body[i], x.len[i]);
		const struct ctl_spool_msg *m = ctl_spool_scan_find(s, x.id[i]);
		cr_assert_str_eq(ctl_spool_scan_segment(s, m->env_seg)->path,
				 x.path, "the original holds it");
	}
	ctl_spool_scan_free(s);
	free_abc(&x);
}

/* Whatever the copy's name and wherever the directory lists it, the file
 * named as its header says is the original: the other is the one reported
 * as the copy (the warning tells the operator to remove it). Before, the
 * directory's order decided, and the original was often named the copy. */
Test(spool_reader, the_copy_is_named_as_the_copy)
{
	static const char *const names[] = {
		"000000ff.seg", "a.seg", "backup-00000000.seg", "0.seg",
		"zz.seg", "00000000.old.seg", "-.seg", "7.seg",
	};
	struct abc x;
	char copy[600];

	write_abc(&x);
	for (size_t k = 0; k < sizeof(names) / sizeof(names[0]); k++) {
		unsigned dups = 0;

		snprintf(copy, sizeof(copy), "%.*s/%s",
			 (int)(strrchr(x.path, '/') - x.path), x.path,
			 names[k]);
		copy_file(x.path, copy);
		struct ctl_spool_scan *s = scan();
		for (size_t i = 0; i < ctl_spool_scan_nsegs(s); i++) {
			const struct ctl_spool_seg *g =
				ctl_spool_scan_segment(s, i);
			if (!g->duplicate)
				continue;
			dups++;
			cr_assert_str_eq(g->path, copy, "%s: the original "
				"reported as the copy", names[k]);
		}
		cr_assert_eq(dups, 1, "%s", names[k]);
		ctl_spool_scan_free(s);
		cr_assert_eq(unlink(copy), 0);
	}
	free_abc(&x);
}

/* A segment moved into another worker's directory: its header names its
 * own worker, and its records are not taken for the other one's (they
 * could collide with that worker's own use of the same sequence). Before,
 * the check compared the directory's worker with itself. */
Test(spool_reader, a_segment_in_another_workers_directory_is_not_used)
{
	struct abc x;
	char dir[600], moved[700];

	write_abc(&x);
	snprintf(dir, sizeof(dir), "%s/w02", root);
	cr_assert_eq(mkdir(dir, 0750), 0);
	snprintf(moved, sizeof(moved), "%s/00000000.seg", dir);
	cr_assert_eq(rename(x.path, moved), 0);
	struct ctl_spool_scan *s = scan();
	for (size_t i = 0; i < ctl_spool_scan_nsegs(s); i++) {
		const struct ctl_spool_seg *g = ctl_spool_scan_segment(s, i);
		if (g->path && strcmp(g->path, moved) == 0)
			cr_assert_not(g->header_ok, "taken as worker 2's");
	}
	cr_assert_eq(ctl_spool_scan_summary(s)->msgs_committed, 0);
	cr_assert_geq(ctl_spool_scan_summary(s)->segments_bad, 1);
	ctl_spool_scan_free(s);
	cr_assert_eq(rename(moved, x.path), 0);
	free_abc(&x);
}

/* A segment file that cannot even be opened: said (event=segment_unreadable),
 * counted bad and marked, not passed over in silence as it was (an offline
 * scan or export then reported no error while messages were missing). */
Test(spool_reader, a_segment_that_cannot_be_opened_is_marked)
{
	struct abc x;
	bool seen = false;

	write_abc(&x);
	fail_open = "/w01/00000000.seg";
	struct ctl_spool_scan *s = scan();
	fail_open = NULL;
	for (size_t i = 0; i < ctl_spool_scan_nsegs(s); i++) {
		const struct ctl_spool_seg *g = ctl_spool_scan_segment(s, i);
		if (g->path && strcmp(g->path, x.path) == 0) {
			seen = true;
			cr_assert(g->read_error);
		}
	}
	cr_assert(seen);
	cr_assert_eq(ctl_spool_scan_summary(s)->msgs_committed, 0);
	cr_assert_geq(ctl_spool_scan_summary(s)->segments_bad, 1);
	ctl_spool_scan_free(s);
	free_abc(&x);
}

/* The copy also fills in what the original lost (B's batch torn). */
Test(spool_reader, copy_fills_in_a_torn_original)
{
	struct abc x;
	char copy[600];
	uint8_t junk[100];

	write_abc(&x);
	snprintf(copy, sizeof(copy), "%.*s/000000fe.seg",
		 (int)(strrchr(x.path, '/') - x.path), x.path);
	copy_file(x.path, copy);
	memset(junk, 0x5a, sizeof(junk));
	patch(x.path, x.b_start + 2000, junk, sizeof(junk));
	expect_abc(&x);
	free_abc(&x);
}

/*
 * A segment file the writer listed in wNN/segments and that is gone
 * (deleted by hand, lost with its messages): reported, and only it. A
 * segment the writer itself deleted (reclaimed) is delisted first.
 */
Test(spool_reader, deleted_segment_reported)
{
	struct abc x;
	char wdir[600], gone[700], listed[700];

	write_abc(&x);
	snprintf(wdir, sizeof(wdir), "%.*s",
		 (int)(strrchr(x.path, '/') - x.path), x.path);
	snprintf(listed, sizeof(listed), "%s/segments", wdir);
	cr_assert_eq(access(listed, F_OK), 0, "the writer lists its segments");
	struct ctl_spool_scan *s = scan();
	cr_assert_eq(ctl_spool_scan_summary(s)->segments_missing, 0);
	cr_assert_geq(ctl_spool_scan_nsegs(s), 2, "the active one and a spare");
	/* The spare (not the one with the messages) goes. */
	const struct ctl_spool_seg *victim = NULL;
	for (size_t k = 0; k < ctl_spool_scan_nsegs(s); k++)
		if (strcmp(ctl_spool_scan_segment(s, k)->path, x.path) != 0)
			victim = ctl_spool_scan_segment(s, k);
	cr_assert_not_null(victim);
	snprintf(gone, sizeof(gone), "%s", victim->path);
	ctl_spool_scan_free(s);
	cr_assert_eq(unlink(gone), 0);
	s = scan();
	cr_assert_eq(ctl_spool_scan_summary(s)->segments_missing, 1);
	cr_assert_eq(ctl_spool_scan_summary(s)->msgs_committed, 3);
	ctl_spool_scan_free(s);
	free_abc(&x);
}

/* A read that fails during the scan: the messages before it are found,
 * the segment is marked (never given back this run: the queue manager
 * leaves it unsealed) and counted; scanned again without the error,
 * everything is there. Before, nothing marked it, and the queue manager
 * sealed it with the unscanned messages in it. */
Test(spool_reader, a_read_error_marks_the_segment)
{
	struct spool *sp = open_spool();
	uint8_t *b = pattern(8000, 7);
	struct ctl_spool_scan *s;
	const struct ctl_spool_seg *g = NULL;
	size_t n;

	for (n = 0; n < 300; n++) /* ~3.6 MB in one 4 MiB segment */
		write_msg(sp, b, 8000);
	spool_destroy(sp);
	fail_reads = 1;
	s = scan();
	fail_reads = 0;
	cr_assert_gt(failed_reads, 0);
	cr_assert_lt(ctl_spool_scan_summary(s)->msgs_committed, n);
	cr_assert_geq(ctl_spool_scan_summary(s)->segments_bad, 1);
	for (size_t i = 0; i < ctl_spool_scan_nsegs(s); i++)
		if (ctl_spool_scan_segment(s, i)->records_ok)
			g = ctl_spool_scan_segment(s, i);
	cr_assert_not_null(g);
	cr_assert(g->read_error, "a segment read short is not marked");
	ctl_spool_scan_free(s);
	s = scan();
	cr_assert_eq(ctl_spool_scan_summary(s)->msgs_committed, n);
	for (size_t i = 0; i < ctl_spool_scan_nsegs(s); i++)
		cr_assert_not(ctl_spool_scan_segment(s, i)->read_error);
	ctl_spool_scan_free(s);
	free(b);
}

/* A message whose records span two segments, the second unreadable (its
 * records, then its header too): the first segment holds the message's
 * ENV and part of its body, and is kept (never given back this run: the
 * rest reads again at the next start). Before, only the unreadable one
 * was marked, and the queue manager gave the first back. Read whole, the
 * message is found and nothing is kept. */
Test(spool_reader, a_message_spanning_an_unreadable_segment_keeps_the_other)
{
	struct spool *sp = open_spool();
	size_t big = (4u << 20) + (1u << 20);
	uint8_t *b = pattern(big, 9);
	const struct ctl_spool_seg *g;
	struct ctl_spool_scan *s;

	write_msg(sp, b, big); /* from 00000000.seg into 00000001.seg */
	spool_destroy(sp);
	for (int all = 0; all < 2; all++) {
		bool kept = false, other = false;

		fail_file = "/w01/00000001.seg";
		fail_file_all = all;
		s = scan();
		fail_file = NULL;
		cr_assert_eq(ctl_spool_scan_summary(s)->msgs_committed, 0);
		for (size_t i = 0; i < ctl_spool_scan_nsegs(s); i++) {
			g = ctl_spool_scan_segment(s, i);
			if (g->header_ok && g->file_no == 0)
				kept = g->kept_incomplete;
			else if (g->kept_incomplete)
				other = true;
		}
		cr_assert(kept, "pass %d: the readable part was not kept", all);
		cr_assert_not(other);
		ctl_spool_scan_free(s);
	}
	s = scan();
	cr_assert_eq(ctl_spool_scan_summary(s)->msgs_committed, 1);
	for (size_t i = 0; i < ctl_spool_scan_nsegs(s); i++)
		cr_assert_not(ctl_spool_scan_segment(s, i)->kept_incomplete);
	ctl_spool_scan_free(s);
	free(b);
}
