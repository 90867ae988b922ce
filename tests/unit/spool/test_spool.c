/*
 * The spool writer against a real io_uring and real O_DIRECT files (a temp
 * dir under /var/tmp, removed at the end). Skips when the machine lacks
 * io_uring or O_DIRECT. What was written is checked with the spool reader.
 */
#include <criterion/criterion.h>
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <ftw.h>
#include <liburing.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/capability.h>
#include <linux/fiemap.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#include "../testdir.h"
#include "finaldot/msgid.h"
#include "finaldot/spool_format.h"
#include "spool.h"
#include "spool_reader.h"

#define MAXM 256

struct done_rec {
	uint64_t id;
	int status;
};

static struct done_rec dones[4096];
static unsigned n_done;
static char root[64];

/* The path of worker 5's segment file_no (the tests' spool). */
static void
seg_file(char *path, size_t n, uint64_t file_no)
{
	snprintf(path, n, "%s/w05/%08llx.seg", root,
		 (unsigned long long)file_no);
}

/* Faults the preparer meets at a start (the review of 2026-12-05): its
 * directory's opendir(), the open of one segment, or the read of one
 * segment's header fails once with the errno given; paths are matched by
 * their tail. */
static const char *fail_opendir_of, *fail_open_of, *fail_hdr_of;
static int fail_errno;
static unsigned failed_calls;
/* the Nth O_DIRECT open of a segment (a publish) fails, once; 0: none */
static unsigned fail_direct_open_n, direct_opens;
/* fopen() of the segment list's temporary file fails */
static bool fail_list_write;

static bool
tail_is(const char *path, const char *tail)
{
	size_t a = strlen(path), b = strlen(tail);

	return tail && a >= b && strcmp(path + a - b, tail) == 0;
}

DIR *opendir(const char *name);
DIR *
opendir(const char *name)
{
	static DIR *(*real)(const char *);

	if (!real)
		*(void **)&real = dlsym(RTLD_NEXT, "opendir");
	if (fail_opendir_of && tail_is(name, fail_opendir_of)) {
		fail_opendir_of = NULL;
		failed_calls++;
		errno = fail_errno;
		return NULL;
	}
	return real(name);
}

int open64(const char *path, int flags, ...);
int
open64(const char *path, int flags, ...)
{
	static int (*real)(const char *, int, ...);
	mode_t mode = 0;

	if (!real)
		*(void **)&real = dlsym(RTLD_NEXT, "open64");
	if (flags & O_CREAT) {
		va_list ap;
		va_start(ap, flags);
		mode = (mode_t)va_arg(ap, int);
		va_end(ap);
	}
	if ((flags & O_DIRECT) && tail_is(path, ".seg") &&
	    fail_direct_open_n && ++direct_opens == fail_direct_open_n) {
		failed_calls++;
		errno = fail_errno;
		return -1;
	}
	if (fail_open_of && tail_is(path, fail_open_of) &&
	    (flags & O_ACCMODE) == O_RDONLY) {
		fail_open_of = NULL;
		failed_calls++;
		errno = fail_errno;
		return -1;
	}
	return real(path, flags, mode);
}

FILE *fopen64(const char *path, const char *mode);
FILE *
fopen64(const char *path, const char *mode)
{
	static FILE *(*real)(const char *, const char *);

	if (!real)
		*(void **)&real = dlsym(RTLD_NEXT, "fopen64");
	if (fail_list_write && tail_is(path, ".tmp") &&
	    strstr(path, "/w05/") && !tail_is(path, ".seg.tmp")) {
		failed_calls++;
		errno = EMFILE;
		return NULL;
	}
	return real(path, mode);
}

ssize_t pread64(int fd, void *buf, size_t n, off_t off);
ssize_t
pread64(int fd, void *buf, size_t n, off_t off)
{
	static ssize_t (*real)(int, void *, size_t, off_t);
	char l[64], p[512];
	ssize_t k;

	if (!real)
		*(void **)&real = dlsym(RTLD_NEXT, "pread64");
	if (fail_hdr_of && off == 0 && n == SPOOL_SEG_HDR_LEN) {
		snprintf(l, sizeof(l), "/proc/self/fd/%d", fd);
		k = readlink(l, p, sizeof(p) - 1);
		p[k < 0 ? 0 : k] = '\0';
		if (tail_is(p, fail_hdr_of)) {
			fail_hdr_of = NULL;
			failed_calls++;
			errno = fail_errno;
			return -1;
		}
	}
	return real(fd, buf, n, off);
}

static void
on_done(void *ctx, uint64_t id, int status)
{
	(void)ctx;
	cr_assert_lt(n_done, 4096);
	dones[n_done].id = id;
	dones[n_done].status = status;
	n_done++;
}

static void
setup(void)
{
	fd_test_dir_make(root, sizeof(root), "/var/tmp", "spool");
	n_done = 0;
	fail_opendir_of = fail_open_of = fail_hdr_of = NULL;
	failed_calls = 0;
	fail_direct_open_n = direct_opens = 0;
	fail_list_write = false;
}

static void
teardown(void)
{
	fd_test_dir_remove(root);
}

TestSuite(spool, .init = setup, .fini = teardown, .timeout = 60);

static void
params(struct spool_params *p, const char *fault)
{
#ifndef FINALDOT_FAULT_INJECTION
	if (fault)
		cr_skip_test("built without the fault seam "
			     "(-Dfault_injection=false)");
#endif
	spool_params_defaults(p);
	p->dir = root;
	p->worker = 5;
	p->segment_size = 4u << 20;
	p->batch_size = 16384;
	p->batches = 4;
	p->max_msgs = 64;
	p->spare_segments = 2;
	p->fault = fault;
	p->done = on_done;
}

static struct spool *
make(const struct spool_params *p)
{
	struct spool *sp = spool_create(p);

	if (!sp && (errno == EINVAL || errno == ENOSYS || errno == EPERM ||
		    errno == EOPNOTSUPP))
		cr_skip_test("io_uring or O_DIRECT unavailable (errno %d)",
			     errno);
	cr_assert_not_null(sp, "spool_create: %s", strerror(errno));
	return sp;
}

static const char *const rcpt1[] = { "rcpt@example.org" };

static struct fd_envelope
env1(void)
{
	struct fd_envelope e = {
		.mail_from = "from@example.org",
		.rcpts = rcpt1,
		.n_rcpts = 1,
		.helo = "client.example",
		.client_addr = "192.0.2.1",
		.proto = "ESMTP",
		.arrival_us = 1700000000000000ull,
	};
	return e;
}

static void
drain(struct spool *sp)
{
	for (int i = 0; i < 100000 && spool_inflight(sp); i++)
		cr_assert_geq(spool_wait(sp), 0);
	cr_assert_eq(spool_inflight(sp), 0);
}

/* Append n bytes, waiting for room as the engine would. */
static void
append_all(struct spool *sp, struct spool_msg *m, const uint8_t *p, size_t n)
{
	while (n) {
		size_t room = spool_room(sp);
		if (room == 0) {
			spool_flush(sp);
			cr_assert_geq(spool_wait(sp), 0);
			continue;
		}
		size_t k = n < room ? n : room;
		cr_assert_eq(spool_msg_append(sp, m, p, k), 0);
		p += k;
		n -= k;
	}
}

/* Begin a message as the engine would: -EAGAIN (no free buffer, or the
 * next segment still being zeroed by the preparer) holds the session until
 * the spool has room; any other error fails the test. Up to 10 s. */
static struct spool_msg *
begin_waiting(struct spool *sp, const struct fd_envelope *e, uint64_t *id)
{
	struct spool_msg *m;
	int err = 0;

	for (int i = 0; !(m = spool_msg_begin(sp, e, NULL, id, &err)); i++) {
		cr_assert_eq(err, -EAGAIN, "begin: %d", err);
		cr_assert_lt(i, 10000, "no room for 10 s");
		spool_flush(sp);
		spool_poll(sp);
		usleep(1000);
	}
	return m;
}

static uint64_t
put_msg(struct spool *sp, const void *body, size_t n)
{
	struct fd_envelope e = env1();
	uint64_t id = 0;
	struct spool_msg *m = begin_waiting(sp, &e, &id);

	append_all(sp, m, body, n);
	cr_assert_eq(spool_msg_commit(sp, m), 0);
	return id;
}

static int
cmp_feed(void *ctx, const void *p, size_t n)
{
	const uint8_t **exp = ctx;
	if (memcmp(*exp, p, n) != 0)
		return 1;
	*exp += n;
	return 0;
}

/* The reader finds message id with exactly this body. */
static void
check_on_disk(uint64_t id, const void *body, size_t n)
{
	int err = 0;
	struct ctl_spool_scan *s = ctl_spool_scan_dir(root, &err);
	cr_assert_not_null(s, "scan: %d", err);
	const struct ctl_spool_msg *m = ctl_spool_scan_find(s, id);
	cr_assert_not_null(m, "message %016llx not found", (unsigned long long)id);
	cr_assert_eq(m->body_len, n);
	cr_assert_str_eq(m->env.mail_from, "from@example.org");
	const uint8_t *exp = body;
	cr_assert_eq(ctl_spool_read_body(s, m, cmp_feed, &exp), 0);
	cr_assert_eq((size_t)(exp - (const uint8_t *)body), n);
	ctl_spool_scan_free(s);
}

static bool
found_on_disk(uint64_t id)
{
	int err = 0;
	struct ctl_spool_scan *s = ctl_spool_scan_dir(root, &err);
	cr_assert_not_null(s);
	bool f = ctl_spool_scan_find(s, id) != NULL;
	ctl_spool_scan_free(s);
	return f;
}

Test(spool, commit_then_callback_after_write)
{
	struct spool_params p;
	params(&p, NULL);
	struct spool *sp = make(&p);
	uint64_t id = put_msg(sp, "Received: x\r\n\r\nhello\r\n", 22);

	cr_assert_eq(n_done, 0, "no callback from inside commit");
	cr_assert_eq(spool_flush(sp), 0);
	cr_assert_eq(n_done, 0, "no callback before completion");
	cr_assert_eq(spool_inflight(sp), 1);
	drain(sp);
	cr_assert_eq(n_done, 1);
	cr_assert_eq(dones[0].id, id);
	cr_assert_eq(dones[0].status, 0);
	const struct spool_stats *st = spool_get_stats(sp);
	cr_assert_eq(st->batches, 1);
	cr_assert_eq(st->flushes, 1);
	cr_assert_eq(st->messages, 1);
	cr_assert_eq(st->bytes, 4096);
	check_on_disk(id, "Received: x\r\n\r\nhello\r\n", 22);
	spool_destroy(sp);
}

Test(spool, batches_complete_in_order)
{
	struct spool_params p;
	params(&p, NULL);
	p.flush_inflight = 3; /* three idle flushes may be in flight */
	struct spool *sp = make(&p);
	uint64_t ids[3];

	for (int i = 0; i < 3; i++) {
		ids[i] = put_msg(sp, "abc", 3);
		spool_flush(sp);
	}
	cr_assert_eq(spool_inflight(sp), 3);
	drain(sp);
	cr_assert_eq(n_done, 3);
	for (int i = 0; i < 3; i++) {
		cr_assert_eq(dones[i].id, ids[i]);
		cr_assert_eq(dones[i].status, 0);
	}
	spool_destroy(sp);
}

Test(spool, group_commit_waits_for_the_write_in_flight)
{
	struct spool_params p;
	params(&p, NULL);
	p.flush_inflight = 1;
	struct spool *sp = make(&p);
	uint64_t ids[4];

	ids[0] = put_msg(sp, "first", 5);
	spool_flush(sp);
	cr_assert_eq(spool_inflight(sp), 1);
	/* Three more commits while the first write is in flight: an idle
	 * flush leaves them in the open batch... */
	for (int i = 1; i < 4; i++) {
		ids[i] = put_msg(sp, "next", 4);
		spool_flush(sp);
		cr_assert_eq(spool_inflight(sp), 1);
	}
	/* ...which goes out, as one write, when the first completes. */
	drain(sp);
	cr_assert_eq(n_done, 4);
	for (int i = 0; i < 4; i++) {
		cr_assert_eq(dones[i].id, ids[i]);
		cr_assert_eq(dones[i].status, 0);
	}
	cr_assert_eq(spool_get_stats(sp)->flushes, 2);
	spool_destroy(sp);
}

Test(spool, idle_flush_skips_a_batch_nobody_waits_for)
{
	struct spool_params p;
	params(&p, NULL);
	struct spool *sp = make(&p);
	struct fd_envelope e = env1();
	uint64_t id;
	int err;

	/* DATA started (ENV record) and some body: no commit yet, so an
	 * idle flush has nobody to serve and writes nothing. */
	struct spool_msg *m = spool_msg_begin(sp, &e, NULL, &id, &err);
	cr_assert(m);
	append_all(sp, m, (const uint8_t *)"partial", 7);
	spool_flush(sp);
	cr_assert_eq(spool_inflight(sp), 0);
	cr_assert_eq(spool_get_stats(sp)->flushes, 0);
	cr_assert_eq(spool_msg_commit(sp, m), 0);
	spool_flush(sp);
	cr_assert_eq(spool_inflight(sp), 1);
	drain(sp);
	cr_assert_eq(n_done, 1);
	cr_assert_eq(spool_get_stats(sp)->flushes, 1);
	check_on_disk(id, "partial", 7);
	spool_destroy(sp);
}

Test(spool, interleaved_messages)
{
	struct spool_params p;
	params(&p, NULL);
	struct spool *sp = make(&p);
	struct fd_envelope e = env1();
	uint8_t a[3000], b[5000];
	uint64_t ida, idb;
	int err;

	for (size_t i = 0; i < sizeof(a); i++)
		a[i] = (uint8_t)('a' + i % 26);
	for (size_t i = 0; i < sizeof(b); i++)
		b[i] = (uint8_t)('A' + i % 23);
	struct spool_msg *ma = spool_msg_begin(sp, &e, NULL, &ida, &err);
	struct spool_msg *mb = spool_msg_begin(sp, &e, NULL, &idb, &err);
	cr_assert(ma && mb);
	cr_assert_neq(ida, idb);
	for (size_t i = 0; i < 10; i++) {
		append_all(sp, ma, a + i * 300, 300);
		append_all(sp, mb, b + i * 500, 500);
	}
	cr_assert_eq(spool_msg_commit(sp, mb), 0);
	cr_assert_eq(spool_msg_commit(sp, ma), 0);
	spool_flush(sp);
	drain(sp);
	cr_assert_eq(n_done, 2);
	cr_assert_eq(dones[0].status, 0);
	cr_assert_eq(dones[1].status, 0);
	check_on_disk(ida, a, sizeof(a));
	check_on_disk(idb, b, sizeof(b));
	spool_destroy(sp);
}

/* A body of n pseudo-random octets (caller frees). */
static uint8_t *
rand_body(size_t n, unsigned seed)
{
	uint8_t *body = malloc(n);

	cr_assert_not_null(body);
	for (size_t i = 0; i < n; i++)
		body[i] = (uint8_t)rand_r(&seed);
	return body;
}

/* One message of n pseudo-random octets, committed, flushed and drained:
 * it was answered ok. Its body (caller frees) and id (may be NULL). */
static uint8_t *
put_one_ok(struct spool *sp, size_t n, unsigned seed, uint64_t *id)
{
	uint8_t *body = rand_body(n, seed);
	uint64_t i = put_msg(sp, body, n);

	if (id)
		*id = i;
	spool_flush(sp);
	drain(sp);
	cr_assert_eq(n_done, 1);
	cr_assert_eq(dones[0].status, 0);
	return body;
}

Test(spool, body_larger_than_several_batches)
{
	struct spool_params p;
	params(&p, NULL);
	struct spool *sp = make(&p);
	size_t n = 6 * p.batch_size + 1234;
	uint64_t id;
	uint8_t *body = put_one_ok(sp, n, 1, &id);
	cr_assert_geq(spool_get_stats(sp)->batches, 6);
	check_on_disk(id, body, n);
	free(body);
	spool_destroy(sp);
}

/* DURABLE announcements, in order (the control plane's view). */
static uint64_t durable_offs[256];
static unsigned n_durable;

static void
on_announce(void *actx, const struct spool_announce *a)
{
	(void)actx;
	if (a->type == SPOOL_AN_DURABLE && n_durable < 256)
		durable_offs[n_durable++] = a->off;
}

/*
 * In fdatasync mode only the batch holding the END is flushed: the middle
 * of a large message is written without a flush, and announced durable
 * only with the flush that covers it.
 */
Test(spool, fdatasync_mode_flushes_only_batches_with_an_end)
{
	struct spool_params p;

	params(&p, NULL);
	p.linked_fdatasync = true;
	p.announce = on_announce;
	n_durable = 0;
	struct spool *sp = make(&p);
	size_t n = 6 * p.batch_size + 1234;
	uint64_t id;
	uint8_t *body = put_one_ok(sp, n, 7, &id);
	const struct spool_stats *st = spool_get_stats(sp);
	cr_assert_geq(st->batches, 7);
	cr_assert_eq(st->flushes, 1, "one flush, for the END: %" PRIu64,
		     st->flushes);
	cr_assert_eq(st->unflushed, st->batches - 1);
	cr_assert_eq(n_durable, 1, "no DURABLE for an unflushed batch");
	uint64_t flat = 0;
	for (unsigned b = 0; b <= FD_LAT_BUCKETS; b++)
		flat += st->flush_lat[b];
	cr_assert_eq(flat, 1, "flush latency counts flushes only");
	check_on_disk(id, body, n);
	free(body);
	spool_destroy(sp);
}

/* With RWF_DSYNC every batch carries its own flush: on a disk with FUA a
 * DSYNC write makes only itself durable, never the writes before it. */
Test(spool, dsync_mode_flushes_every_batch)
{
	struct spool_params p;

	params(&p, NULL);
	struct spool *sp = make(&p);
	size_t n = 6 * p.batch_size + 1234;
	uint8_t *body = put_one_ok(sp, n, 8, NULL);
	const struct spool_stats *st = spool_get_stats(sp);
	cr_assert_geq(st->batches, 7);
	cr_assert_eq(st->flushes, st->batches);
	cr_assert_eq(st->unflushed, 0);
	free(body);
	spool_destroy(sp);
}

/*
 * A message across segment files: an fdatasync of one file promises
 * nothing for another, so each file's last batch is flushed, and the
 * message waits for all of them (one flush per file it touched).
 */
Test(spool, fdatasync_mode_flushes_each_files_last_batch)
{
	struct spool_params p;

	params(&p, NULL);
	p.linked_fdatasync = true;
	p.max_msgs = 4;
	p.segment_size = 4096 + 2 * (16384 + 69632 + 4096);
	p.spare_segments = 1;
	p.announce = on_announce;
	n_durable = 0;
	struct spool *sp = make(&p);
	size_t n = 24 * p.batch_size;
	uint64_t id;
	uint8_t *body = put_one_ok(sp, n, 9, &id);
	const struct spool_stats *st = spool_get_stats(sp);
	cr_assert_geq(st->segments_used, 3);
	cr_assert_eq(st->flushes, st->segments_used,
		     "a flush per file: %" PRIu64 " flushes, %" PRIu64
		     " files", st->flushes, st->segments_used);
	cr_assert_eq(st->unflushed, st->batches - st->flushes);
	cr_assert_eq(n_durable, st->flushes);
	check_on_disk(id, body, n);
	free(body);
	spool_destroy(sp);
}

/*
 * The flush of a batch with an END waits for the unflushed writes before
 * it: with them submitted last (the seam's lazy-late, as io-wq may order
 * them), the END batch goes as a plain write and its fdatasync follows
 * their completion, in a ring the caller owns (the socket transport's).
 * Whether the flush really came after them only a power cut can tell
 * (test_powercut's lazy-nowait mutant); here: no hang, nothing lost, one
 * flush.
 */
Test(spool, fdatasync_waits_for_unflushed_writes_in_a_shared_ring)
{
	struct io_uring ring;
	struct spool_params p;

	if (io_uring_queue_init(64, &ring, 0) < 0)
		cr_skip_test("io_uring unavailable");
	params(&p, "lazy-late");
	p.ring = &ring;
	p.linked_fdatasync = true;
	p.batches = 8; /* the unflushed ones wait for the END's batch */
	struct spool *sp = make(&p);
	size_t n = 3 * p.batch_size + 100;
	uint8_t *body = rand_body(n, 10);
	struct fd_envelope e = env1();
	uint64_t id = 0;
	int err = 0;
	struct spool_msg *m = spool_msg_begin(sp, &e, NULL, &id, &err);
	const uint8_t *q = body;
	size_t left = n;

	cr_assert_not_null(m);
	while (left || n_done == 0) {
		struct io_uring_cqe *cqe;
		size_t k = spool_room(sp);

		if (k > left)
			k = left;
		if (k) {
			cr_assert_eq(spool_msg_append(sp, m, q, k), 0);
			q += k;
			left -= k;
			if (left == 0)
				cr_assert_eq(spool_msg_commit(sp, m), 0);
		}
		spool_flush(sp);
		if (!io_uring_sq_ready(&ring) && spool_inflight(sp) == 0)
			continue;
		cr_assert_geq(io_uring_submit_and_wait(&ring, 1), 0);
		while (io_uring_peek_cqe(&ring, &cqe) == 0) {
			struct io_uring_cqe c = *cqe;
			io_uring_cqe_seen(&ring, cqe);
			cr_assert(spool_owns_cqe(&c));
			spool_handle_cqe(sp, &c);
		}
	}
	const struct spool_stats *st = spool_get_stats(sp);
	cr_assert_eq(n_done, 1);
	cr_assert_eq(dones[0].status, 0);
	cr_assert_geq(st->batches, 4);
	cr_assert_eq(st->flushes, 1);
	cr_assert_eq(st->late_flushes, 1, "the END's flush waited");
	cr_assert_eq(spool_inflight(sp), 0);
	spool_destroy(sp);
	io_uring_queue_exit(&ring);
	check_on_disk(id, body, n);
	free(body);
}

/* The batch buffers go to the kernel once (registered, write_fixed) and
 * messages spanning every buffer land intact, in order. */
Test(spool, registered_buffers_write_what_was_given)
{
	struct spool_params p;
	params(&p, NULL);
	struct spool *sp = make(&p);
	size_t n = 3 * p.batch_size + 777;
	uint8_t *body = rand_body(n, 5);
	uint64_t ids[4];

	if (!spool_buffers_registered(sp)) {
		spool_destroy(sp);
		free(body);
		cr_skip_test("the kernel refused to register the buffers "
			     "(RLIMIT_MEMLOCK?): plain writes, covered above");
	}
	for (unsigned k = 0; k < 4; k++) {
		body[0] = (uint8_t)k; /* four different messages */
		ids[k] = put_msg(sp, body, n);
		spool_flush(sp);
		drain(sp);
		check_on_disk(ids[k], body, n);
	}
	cr_assert_eq(n_done, 4);
	for (unsigned k = 0; k < 4; k++)
		cr_assert_eq(dones[k].status, 0);
	cr_assert_geq(spool_get_stats(sp)->batches, 12);
	free(body);
	spool_destroy(sp);
}

/* Without the right to lock memory at will, registration is held to
 * RLIMIT_MEMLOCK: the spool registers as many buffers as the limit takes
 * (halving from all of them) and writes from the rest plain; a message
 * whose batches go through both kinds lands intact. */
Test(spool, memlock_limit_registers_part_of_the_buffers)
{
	struct __user_cap_header_struct h = {
		.version = _LINUX_CAPABILITY_VERSION_3};
	struct __user_cap_data_struct d[2];
	struct spool_params p;
	unsigned nfixed;

	cr_assert_eq(syscall(SYS_capget, &h, d), 0);
	d[CAP_TO_INDEX(CAP_IPC_LOCK)].effective &=
		~CAP_TO_MASK(CAP_IPC_LOCK);
	cr_assert_eq(syscall(SYS_capset, &h, d), 0, "capset: %d", errno);
	params(&p, NULL);
	p.batch_size = 256 * 1024;
	p.batches = 8;
	/* 832 KiB, where a buffer is ~324 KiB (the batch and its headroom):
	 * 8 and 4 buffers are refused, 2 are taken. */
	rlim_t lim = 3 * p.batch_size + 65536;
	struct rlimit rl = {lim, lim};
	cr_assert_eq(setrlimit(RLIMIT_MEMLOCK, &rl), 0);
	struct spool *sp = make(&p);
	size_t n = 6 * p.batch_size + 999; /* seven batches, none drained */
	uint64_t id;

	/* (The limit counts the user's locked memory in every process
	 * without CAP_IPC_LOCK: none other here.) */
	nfixed = spool_buffers_registered(sp);
	cr_assert(nfixed >= 1 && nfixed <= 2,
		  "%u buffers registered under a limit of 3", nfixed);
	uint8_t *body = put_one_ok(sp, n, 9, &id);
	cr_assert_eq(spool_get_stats(sp)->batch_errors, 0);
	cr_assert_geq(spool_get_stats(sp)->batches, 7);
	check_on_disk(id, body, n);
	free(body);
	spool_destroy(sp);
}

Test(spool, natural_batching_one_write)
{
	struct spool_params p;
	params(&p, NULL);
	p.batch_size = 256 * 1024;
	struct spool *sp = make(&p);
	struct timespec t0, t1;

	for (int i = 0; i < 50; i++)
		put_msg(sp, "short body\r\n", 12);
	cr_assert_eq(spool_inflight(sp), 0, "nothing sent before the flush");
	clock_gettime(CLOCK_MONOTONIC, &t0);
	spool_flush(sp);
	drain(sp);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	cr_assert_eq(n_done, 50);
	for (unsigned i = 0; i < n_done; i++) {
		cr_assert_eq(dones[i].status, 0);
		if (i)
			cr_assert_gt(dones[i].id, dones[i - 1].id,
				     "callbacks in commit order");
	}
	cr_assert_eq(spool_get_stats(sp)->flushes, 1);
	cr_assert_eq(spool_get_stats(sp)->messages, 50);
	/* The flush histograms: one write of 50 messages (bucket "up to
	 * 64"), its bytes in the bucket of its length. */
	const struct spool_stats *st = spool_get_stats(sp);
	for (unsigned b = 0; b <= SPOOL_FLUSH_MSG_BUCKETS; b++)
		cr_assert_eq(st->flush_msgs[b], b == 6 ? 1u : 0u, "bucket %u", b);
	cr_assert_eq(st->flush_msgs_sum, 50);
	cr_assert_eq(st->flush_bytes[spool_flush_bucket(
			     st->bytes, 4096, SPOOL_FLUSH_BYTE_BUCKETS)], 1);
	/* Its latency: one count, in the bucket of its sum, which lies
	 * within the time from the flush to the last callback. */
	uint64_t wall = (uint64_t)(t1.tv_sec - t0.tv_sec) * 1000000000u +
			(uint64_t)t1.tv_nsec - (uint64_t)t0.tv_nsec;
	unsigned lat_n = 0;
	for (unsigned b = 0; b <= FD_LAT_BUCKETS; b++)
		lat_n += (unsigned)st->flush_lat[b];
	cr_assert_eq(lat_n, 1);
	cr_assert_gt(st->flush_lat_sum_ns, 0);
	cr_assert_leq(st->flush_lat_sum_ns, wall, "%" PRIu64 " ns > %" PRIu64,
		      st->flush_lat_sum_ns, wall);
	cr_assert_eq(st->flush_lat[fd_lat_bucket(st->flush_lat_sum_ns)], 1);
	/* The log's finer copy: the same one count, its bucket's upper bound
	 * at most a quarter (and the rounding to us) above the value. */
	uint64_t us = st->flush_lat_sum_ns / 1000u, p50;
	cr_assert_eq(st->flush_qlat[fd_qlat_bucket(us)], 1);
	p50 = fd_qlat_percentile_us(st->flush_qlat, 50);
	cr_assert(p50 >= us && p50 <= us + us / 4 + 2, "p50 %" PRIu64
		  " for %" PRIu64 " us", p50, us);
	spool_destroy(sp);
}

Test(spool, flush_latency_counts_every_ok_batch)
{
	struct spool_params p;

	/* Ten batches, one after the other: ten latencies. */
	params(&p, NULL);
	p.batch_size = 4096;
	struct spool *sp = make(&p);
	for (int i = 0; i < 10; i++) {
		put_msg(sp, "one batch each\r\n", 16);
		spool_flush(sp);
		drain(sp);
	}
	const struct spool_stats *st = spool_get_stats(sp);
	uint64_t lat_n = 0;
	for (unsigned b = 0; b <= FD_LAT_BUCKETS; b++)
		lat_n += st->flush_lat[b];
	cr_assert_eq(st->batches, 10);
	cr_assert_eq(lat_n, st->batches, "one latency per ok batch");
	lat_n = 0;
	for (unsigned b = 0; b < FD_QLAT_BUCKETS; b++)
		lat_n += st->flush_qlat[b];
	cr_assert_eq(lat_n, st->batches, "and one in the finer histogram");
	spool_destroy(sp);
}


Test(spool, flush_buckets)
{
	cr_assert_eq(spool_flush_bucket(1, 1, SPOOL_FLUSH_MSG_BUCKETS), 0);
	cr_assert_eq(spool_flush_bucket(2, 1, SPOOL_FLUSH_MSG_BUCKETS), 1);
	cr_assert_eq(spool_flush_bucket(3, 1, SPOOL_FLUSH_MSG_BUCKETS), 2);
	cr_assert_eq(spool_flush_bucket(256, 1, SPOOL_FLUSH_MSG_BUCKETS), 8);
	cr_assert_eq(spool_flush_bucket(257, 1, SPOOL_FLUSH_MSG_BUCKETS), 9);
	cr_assert_eq(spool_flush_bucket(4096, 4096, SPOOL_FLUSH_BYTE_BUCKETS),
		     0);
	cr_assert_eq(spool_flush_bucket(4097, 4096, SPOOL_FLUSH_BYTE_BUCKETS),
		     1);
	cr_assert_eq(spool_flush_bucket(4u << 20, 4096,
					SPOOL_FLUSH_BYTE_BUCKETS), 5);
	cr_assert_eq(spool_flush_bucket((4u << 20) + 1, 4096,
					SPOOL_FLUSH_BYTE_BUCKETS), 6);
}

Test(spool, fault_fail_write_then_recovers)
{
	struct spool_params p;
	params(&p, "fail-write");
	struct spool *sp = make(&p);
	uint64_t id1 = put_msg(sp, "one", 3);
	uint64_t id2 = put_msg(sp, "two", 3);

	spool_flush(sp);
	drain(sp);
	cr_assert_eq(n_done, 2);
	cr_assert_eq(dones[0].status, -EIO);
	cr_assert_eq(dones[1].status, -EIO);
	cr_assert_eq(spool_get_stats(sp)->batch_errors, 1);
#ifdef FINALDOT_FAULT_INJECTION
	cr_assert_eq(spool_set_fault(sp, NULL), 0);
#endif
	uint64_t id3 = put_msg(sp, "three", 5);
	spool_flush(sp);
	drain(sp);
	cr_assert_eq(n_done, 3);
	cr_assert_eq(dones[2].id, id3);
	cr_assert_eq(dones[2].status, 0);
	cr_assert_not(found_on_disk(id1));
	cr_assert_not(found_on_disk(id2));
	check_on_disk(id3, "three", 5);
	spool_destroy(sp);
}

Test(spool, fault_fail_write_n)
{
	struct spool_params p;
	params(&p, "fail-write:2");
	struct spool *sp = make(&p);

	for (int i = 0; i < 3; i++) {
		put_msg(sp, "x", 1);
		spool_flush(sp);
	}
	drain(sp);
	cr_assert_eq(n_done, 3);
	cr_assert_eq(dones[0].status, 0);
	cr_assert_eq(dones[1].status, -EIO);
	cr_assert_eq(dones[2].status, -EIO);
	spool_destroy(sp);
}

Test(spool, fault_fail_once_spanning_message)
{
	struct spool_params p;
	params(&p, "fail-once:2");
	struct spool *sp = make(&p);
	struct fd_envelope e = env1();
	uint64_t ida, idb;
	int err;

	/* A: ENV and body in batch 1 (ok), more body filling batch 2
	 * (fails), the rest and END in batch 3. Full batches are written
	 * without waiting for an idle flush. */
	struct spool_msg *a = spool_msg_begin(sp, &e, NULL, &ida, &err);
	size_t big = 2 * p.batch_size + 100;
	uint8_t *body = calloc(1, big);
	append_all(sp, a, body, big);
	free(body);
	cr_assert_geq(spool_inflight(sp), 2, "two full batches went out");
	uint64_t idc = put_msg(sp, "c", 1); /* wholly in batch 3 */
	cr_assert_eq(spool_msg_commit(sp, a), 0);
	spool_flush(sp);
	drain(sp);
	(void)ida;
	cr_assert_eq(n_done, 2);
	for (unsigned i = 0; i < 2; i++) {
		if (dones[i].id == ida)
			cr_assert_eq(dones[i].status, -EIO);
		else
			cr_assert_eq(dones[i].id, idc);
	}
	idb = put_msg(sp, "b", 1);
	spool_flush(sp);
	drain(sp);
	cr_assert_eq(dones[2].id, idb);
	cr_assert_eq(dones[2].status, 0);
	for (unsigned i = 0; i < 2; i++)
		if (dones[i].id == idc)
			cr_assert_eq(dones[i].status, 0);
	cr_assert_not(found_on_disk(ida));
	spool_destroy(sp);
}

Test(spool, fault_enospc_begin_fails)
{
	struct spool_params p;
	params(&p, "enospc");
	struct spool *sp = make(&p);
	struct fd_envelope e = env1();
	uint64_t id;
	int err = 0;

	cr_assert_null(spool_msg_begin(sp, &e, NULL, &id, &err));
	cr_assert_eq(err, -ENOSPC);
	spool_destroy(sp);
}

/* A spool whose writes are held (the seam's hold) while the file hold
 * names exists; the test removes it to let them go. */
static struct spool *
make_held(char *hold, size_t holdlen)
{
	char spec[160];
	struct spool_params p;

	snprintf(hold, holdlen, "%s.hold", root);
	FILE *f = fopen(hold, "w");
	cr_assert_not_null(f);
	fclose(f);
	snprintf(spec, sizeof(spec), "hold:%s", hold);
	params(&p, spec);
	return make(&p);
}

Test(spool, fault_hold_path)
{
	char hold[128];
	struct spool *sp = make_held(hold, sizeof(hold));
	uint64_t id = put_msg(sp, "held", 4);
	spool_flush(sp);
	for (int i = 0; i < 50; i++) {
		spool_poll(sp);
		usleep(2000);
	}
	cr_assert_eq(n_done, 0, "no callback while %s exists", hold);
	unlink(hold);
	for (int i = 0; i < 5000 && n_done == 0; i++) {
		spool_poll(sp);
		usleep(1000);
	}
	cr_assert_eq(n_done, 1);
	cr_assert_eq(dones[0].id, id);
	cr_assert_eq(dones[0].status, 0);
	spool_destroy(sp);
}

/* A batch held back before its submission (the seam's hold): the time it
 * waits to be sent is not the disk's, and is not in its flush latency. */
Test(spool, flush_latency_starts_at_submission)
{
	char hold[128];
	struct timespec t0, t1;
	struct spool *sp = make_held(hold, sizeof(hold));

	put_msg(sp, "held", 4);
	spool_flush(sp);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	do {
		spool_poll(sp);
		usleep(1000);
		clock_gettime(CLOCK_MONOTONIC, &t1);
	} while (t1.tv_sec - t0.tv_sec < 2);
	cr_assert_eq(n_done, 0);
	unlink(hold);
	for (int i = 0; i < 10000 && n_done == 0; i++) {
		spool_poll(sp);
		usleep(500);
	}
	cr_assert_eq(n_done, 1);
	const struct spool_stats *st = spool_get_stats(sp);
	cr_assert_eq(st->batches, 1);
	cr_assert_lt(st->flush_lat_sum_ns, 1000000000u,
		     "the time the batch was held counted as flush time");
	spool_destroy(sp);
}

/*
 * Segment preparation (issue 9): a preparer slowed to a crawl (a busy
 * disk) makes the worker wait for room, never fail or lose a message:
 * every commit completes, in order.
 */
Test(spool, slowed_preparer_still_answers)
{
	struct spool_params p;
	params(&p, "prep-slow:30");
	p.max_msgs = 4;
	p.segment_size = 4096 + 2 * (16384 + 69632 + 4096);
	p.spare_segments = 1;
	struct spool *sp = make(&p);
	enum { N = 80 };
	uint8_t body[1000];

	memset(body, 's', sizeof(body));
	for (int i = 0; i < N; i++) {
		struct fd_envelope e = env1();
		uint64_t id;

		body[0] = (uint8_t)i;
		/* No room until the preparer delivers: -EAGAIN, and the
		 * engine would hold the session and come back, as here. */
		struct spool_msg *m = begin_waiting(sp, &e, &id);
		append_all(sp, m, body, sizeof(body));
		cr_assert_eq(spool_msg_commit(sp, m), 0);
		spool_flush(sp);
		drain(sp);
	}
	cr_assert_eq(n_done, N);
	for (int i = 0; i < N; i++) {
		cr_assert_eq(dones[i].status, 0, "message %d", i);
		if (i)
			cr_assert_gt(dones[i].id, dones[i - 1].id);
	}
	/* Three segments or more were made while messages waited: each one
	 * after the seam's sleep (whether a message then waits in begin()
	 * or with its END pending is the scheduler's choice). */
	cr_assert_geq(spool_get_stats(sp)->segments_used, 4);
	spool_destroy(sp);
}

/* A crash while zeroing leaves NNNNNNNN.tmp (never the .seg name): the
 * next start discards it, and the spool works. */
Test(spool, leftover_tmp_from_a_crash_is_discarded)
{
	struct spool_params p;
	params(&p, NULL);
	struct spool *sp = make(&p);
	char wdir[256], tmp[300];
	uint8_t junk[8192];
	int fd;

	put_msg(sp, "before\r\n", 8);
	spool_flush(sp);
	drain(sp);
	spool_destroy(sp);
	snprintf(wdir, sizeof(wdir), "%s/w05", root);
	snprintf(tmp, sizeof(tmp), "%s/%08x.tmp", wdir, 0x77u);
	fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL, 0640);
	cr_assert_geq(fd, 0, "%s: %s", tmp, strerror(errno));
	memset(junk, 0, sizeof(junk));
	cr_assert_eq(write(fd, junk, sizeof(junk)), (ssize_t)sizeof(junk));
	close(fd);

	n_done = 0;
	sp = make(&p);
	cr_assert_neq(access(tmp, F_OK), 0, "the half-made segment is gone");
	put_msg(sp, "after\r\n", 7);
	spool_flush(sp);
	drain(sp);
	cr_assert_eq(n_done, 1);
	cr_assert_eq(dones[0].status, 0);
	spool_destroy(sp);
}

Test(spool, segment_rollover)
{
	struct spool_params p;
	params(&p, NULL);
	/* room for exactly two maximal batches per segment */
	p.max_msgs = 4;
	p.segment_size = 4096 + 2 * (16384 + 69632 + 4096);
	p.spare_segments = 1;
	struct spool *sp = make(&p);
	enum { N = 60 }; /* small batches: ~24 fit one such segment */
	uint64_t ids[N];
	uint8_t body[1000];

	memset(body, 'r', sizeof(body));
	for (int i = 0; i < N; i++) {
		body[0] = (uint8_t)i;
		ids[i] = put_msg(sp, body, sizeof(body));
		spool_flush(sp);
		drain(sp);
	}
	cr_assert_eq(n_done, N);
	for (int i = 0; i < N; i++)
		cr_assert_eq(dones[i].status, 0);
	cr_assert_geq(spool_get_stats(sp)->segments_used, 3);
	for (int i = 0; i < N; i += 7) {
		body[0] = (uint8_t)i;
		check_on_disk(ids[i], body, sizeof(body));
	}
	spool_destroy(sp);
}

Test(spool, restart_reuses_spares_and_ids_grow)
{
	struct spool_params p;
	params(&p, NULL);
	struct spool *sp = make(&p);
	uint64_t id1 = put_msg(sp, "first run", 9);
	spool_flush(sp);
	drain(sp);
	spool_destroy(sp);

	int err = 0;
	struct ctl_spool_scan *s = ctl_spool_scan_dir(root, &err);
	cr_assert_not_null(s);
	uint64_t spare_files[16];
	size_t n_spares = 0, n_files = ctl_spool_scan_nsegs(s);
	for (size_t i = 0; i < ctl_spool_scan_nsegs(s); i++) {
		const struct ctl_spool_seg *g = ctl_spool_scan_segment(s, i);
		cr_assert(g->header_ok);
		if (g->records_ok == 0)
			spare_files[n_spares++] = g->file_no;
	}
	cr_assert_geq(n_spares, 1, "spares left by the first run");
	uint64_t seed = ctl_spool_scan_summary(s)->max_msgid[5];
	cr_assert_eq(seed, id1);
	ctl_spool_scan_free(s);

	/* a seed in the future proves the generator honours it */
	p.seed_msgid = seed + ((uint64_t)60000000 << 8);
	sp = make(&p);
	uint64_t id2 = put_msg(sp, "second run", 10);
	spool_flush(sp);
	drain(sp);
	cr_assert_gt(id2, p.seed_msgid);
	spool_destroy(sp);

	s = ctl_spool_scan_dir(root, &err);
	cr_assert_not_null(s);
	const struct ctl_spool_msg *m1 = ctl_spool_scan_find(s, id1);
	const struct ctl_spool_msg *m2 = ctl_spool_scan_find(s, id2);
	cr_assert(m1 && m2);
	uint64_t f2 = ctl_spool_scan_segment(s, m2->env_seg)->file_no;
	bool reused = false;
	for (size_t i = 0; i < n_spares; i++)
		reused |= spare_files[i] == f2;
	cr_assert(reused, "second run wrote into a spare of the first");
	cr_assert_leq(ctl_spool_scan_nsegs(s), n_files + p.spare_segments);
	ctl_spool_scan_free(s);
}

Test(spool, abort_leaves_no_message)
{
	struct spool_params p;
	params(&p, NULL);
	struct spool *sp = make(&p);
	struct fd_envelope e = env1();
	uint64_t ida;
	int err;
	struct spool_msg *a = spool_msg_begin(sp, &e, NULL, &ida, &err);

	append_all(sp, a, (const uint8_t *)"gone", 4);
	spool_msg_abort(sp, a);
	uint64_t idb = put_msg(sp, "kept", 4);
	spool_flush(sp);
	drain(sp);
	cr_assert_eq(n_done, 1);
	cr_assert_eq(dones[0].id, idb);
	cr_assert_not(found_on_disk(ida));
	check_on_disk(idb, "kept", 4);
	spool_destroy(sp);
}

/* One message "x", committed, detached (its session gone), flushed. */
static uint64_t
commit_detached(struct spool *sp)
{
	struct fd_envelope e = env1();
	uint64_t id;
	int err;
	struct spool_msg *m = spool_msg_begin(sp, &e, NULL, &id, &err);

	append_all(sp, m, (const uint8_t *)"x", 1);
	spool_msg_commit(sp, m);
	spool_msg_detach(sp, m);
	spool_flush(sp);
	drain(sp);
	return id;
}

Test(spool, detach_suppresses_callback)
{
	struct spool_params p;
	params(&p, NULL);
	struct spool *sp = make(&p);
	uint64_t id = commit_detached(sp);

	cr_assert_eq(n_done, 0);
	cr_assert_eq(spool_get_stats(sp)->messages, 1);
	check_on_disk(id, "x", 1);
	spool_destroy(sp);
}

/* There is a message per connection (max_msgs). A session gone while its
 * message commits leaves the message until its batch completes, and its
 * connection may be taken again meanwhile: the next begin is told to wait
 * (-EAGAIN: the session holds DATA until room comes back), not refused
 * (-EMFILE, a 451 to a client that did nothing wrong). With every message
 * held by a live session, -EMFILE stays. */
Test(spool, a_detached_message_makes_the_next_begin_wait_not_fail)
{
	struct spool_params p;
	struct fd_envelope e = env1();
	struct spool_msg *m, *m2;
	uint64_t id, id2;
	int err = 0;

	params(&p, NULL);
	p.max_msgs = 1;
	struct spool *sp = make(&p);
	m = spool_msg_begin(sp, &e, NULL, &id, &err);
	cr_assert_not_null(m);
	cr_assert_null(spool_msg_begin(sp, &e, NULL, &id2, &err));
	cr_assert_eq(err, -EMFILE, "a live session holds it: %d", err);
	append_all(sp, m, (const uint8_t *)"x", 1);
	cr_assert_eq(spool_msg_commit(sp, m), 0);
	spool_msg_detach(sp, m);
	spool_msg_detach(sp, m); /* twice changes nothing */
	cr_assert_null(spool_msg_begin(sp, &e, NULL, &id2, &err));
	cr_assert_eq(err, -EAGAIN, "refused instead of held: %d", err);
	spool_flush(sp);
	drain(sp);
	m2 = spool_msg_begin(sp, &e, NULL, &id2, &err);
	cr_assert_not_null(m2, "the slot came back: %d", err);
	spool_msg_abort(sp, m2);
	check_on_disk(id, "x", 1);
	spool_destroy(sp);
}

/* A detached message's outcome goes to orphan_done(), after the DURABLE
 * that covers it (the worker tells the control plane its client got no
 * reply: the message is in doubt, and the control plane, walking up to
 * that DURABLE first, finds it). Its session was closed during the commit
 * (a reset seen by the DPDK stack, a send error, a stop) and nobody knew
 * a message was on disk that its client would send again. */
static uint64_t orphan_id;
static int orphan_status = 1;
static unsigned orphan_after_durables, n_durables;

static void
on_orphan(void *ctx, uint64_t msgid, int status)
{
	cr_assert_eq(ctx, &orphan_id);
	orphan_id = msgid;
	orphan_status = status;
	orphan_after_durables = n_durables;
}

static void
count_durables(void *actx, const struct spool_announce *a)
{
	(void)actx;
	if (a->type == SPOOL_AN_DURABLE)
		n_durables++;
}

Test(spool, a_detached_message_is_told_to_orphan_done)
{
	struct spool_params p;
	params(&p, NULL);
	p.orphan_done = on_orphan;
	p.orphan_ctx = &orphan_id;
	p.announce = count_durables;
	struct spool *sp = make(&p);
	uint64_t id = commit_detached(sp);

	for (int i = 0; i < 500 && orphan_status == 1; i++) {
		spool_poll(sp);
		usleep(1000);
	}
	cr_assert_eq(n_done, 0);
	cr_assert_eq(orphan_status, 0, "not told, or told a failure");
	cr_assert_eq(orphan_id, id);
	cr_assert_geq(orphan_after_durables, 1, "told before its DURABLE");
	check_on_disk(id, "x", 1);
	spool_destroy(sp);
}

Test(spool, max_msgs_emfile)
{
	struct spool_params p;
	params(&p, NULL);
	p.max_msgs = 2;
	struct spool *sp = make(&p);
	struct fd_envelope e = env1();
	uint64_t id;
	int err = 0;

	cr_assert_not_null(spool_msg_begin(sp, &e, NULL, &id, &err));
	cr_assert_not_null(spool_msg_begin(sp, &e, NULL, &id, &err));
	cr_assert_null(spool_msg_begin(sp, &e, NULL, &id, &err));
	cr_assert_eq(err, -EMFILE);
	spool_destroy(sp);
}

Test(spool, shared_ring_linked_fdatasync)
{
	struct io_uring ring;
	struct spool_params p;

	if (io_uring_queue_init(64, &ring, 0) < 0)
		cr_skip_test("io_uring unavailable");
	params(&p, NULL);
	p.ring = &ring;
	p.linked_fdatasync = true;
	struct spool *sp = make(&p);
	uint64_t id = put_msg(sp, "shared", 6);

	/* a foreign CQE in the same ring */
	struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
	io_uring_prep_nop(sqe);
	io_uring_sqe_set_data64(sqe, 42);
	spool_flush(sp);
	unsigned foreign = 0;
	while (n_done == 0) {
		struct io_uring_cqe *cqe;
		cr_assert_geq(io_uring_submit_and_wait(&ring, 1), 0);
		while (io_uring_peek_cqe(&ring, &cqe) == 0) {
			struct io_uring_cqe c = *cqe;
			io_uring_cqe_seen(&ring, cqe);
			if (spool_owns_cqe(&c))
				spool_handle_cqe(sp, &c);
			else
				foreign += c.user_data == 42;
		}
	}
	cr_assert_eq(foreign, 1);
	cr_assert_eq(dones[0].id, id);
	cr_assert_eq(dones[0].status, 0);
	cr_assert_eq(spool_inflight(sp), 0);
	spool_destroy(sp);
	io_uring_queue_exit(&ring);
	check_on_disk(id, "shared", 6);
}

/*
 * Issue 10 section 4: only a test build obeys FINALDOT_SPOOL_FAULT. A
 * release build (-Dfault_injection=false, the default) never reads it: the
 * write succeeds and the daemon starts. A test build must obey it, so the
 * same test shows which build it is and that the switch works.
 */
Test(spool, fault_environment_only_in_test_builds)
{
	struct spool_params p;

	params(&p, NULL);
	cr_assert_eq(setenv("FINALDOT_SPOOL_FAULT", "fail-write", 1), 0);
	struct spool *sp = spool_create(&p);
	unsetenv("FINALDOT_SPOOL_FAULT");
	if (!sp && errno != EINVAL)
		cr_skip_test("io_uring or O_DIRECT unavailable (errno %d)",
			     errno);
	cr_assert_not_null(sp, "the environment stopped spool_create()");
	put_msg(sp, "env", 3);
	spool_flush(sp);
	drain(sp);
	cr_assert_eq(n_done, 1);
#ifdef FINALDOT_FAULT_INJECTION
	cr_assert_eq(dones[0].status, -EIO, "a test build obeys the seam");
#else
	cr_assert_eq(dones[0].status, 0, "a release build ignores the seam");
	cr_assert_eq(spool_get_stats(sp)->batch_errors, 0);
#endif
	spool_destroy(sp);
}

/*
 * Issue 10: a segment whose header block is damaged but which holds valid
 * records is never reused (it was: classified as a spare, rezeroed, and its
 * acknowledged messages destroyed at the next start). Whether or not the
 * reader can salvage it, its bytes stay as they were.
 */
static void
damaged_header_kept(unsigned pos, bool whole_block)
{
	struct spool_params p;
	char path[600];
	uint8_t *before, *after;
	size_t n = 256u << 10;
	uint64_t ids[20];

	params(&p, NULL);
	p.spare_segments = 1;
	struct spool *sp = make(&p);
	for (int i = 0; i < 20; i++) {
		ids[i] = put_msg(sp, "kept across a damaged header", 28);
		spool_flush(sp);
		drain(sp);
	}
	spool_destroy(sp);
	seg_file(path, sizeof(path), 0);
	int fd = open(path, O_RDWR);
	cr_assert_geq(fd, 0);
	if (whole_block) {
		uint8_t z[4096] = {0};
		cr_assert_eq(pwrite(fd, z, sizeof(z), 0), 4096);
	} else {
		uint8_t b;
		cr_assert_eq(pread(fd, &b, 1, pos), 1);
		b ^= 0x41;
		cr_assert_eq(pwrite(fd, &b, 1, pos), 1);
	}
	before = malloc(n);
	after = malloc(n);
	cr_assert_eq(pread(fd, before, n, 0), (ssize_t)n);
	close(fd);

	/* A new run: the preparer classifies, makes spares, and the writer
	 * fills a few segments' worth. */
	sp = make(&p);
	for (int i = 0; i < 40; i++) {
		put_msg(sp, "second run", 10);
		spool_flush(sp);
		drain(sp);
	}
	spool_destroy(sp);
	fd = open(path, O_RDONLY);
	cr_assert_geq(fd, 0);
	cr_assert_eq(pread(fd, after, n, 0), (ssize_t)n);
	close(fd);
	cr_assert(memcmp(before, after, n) == 0,
		  "the damaged segment was written to");
	free(before);
	free(after);
	if (!whole_block)
		for (int i = 0; i < 20; i++)
			check_on_disk(ids[i], "kept across a damaged header",
				      28);
}

Test(spool, damaged_header_epoch_byte_never_reused)
{
	damaged_header_kept(33, false);
}

Test(spool, damaged_header_magic_byte_never_reused)
{
	damaged_header_kept(1, false);
}

Test(spool, zeroed_header_block_never_reused)
{
	damaged_header_kept(0, true);
}

/* spool_sync_linked(): named modes as named; auto asks the disk under
 * the directory (its queue/fua in sysfs) and takes dsync where there is
 * no block device to ask (tmpfs). */
Test(spool, sync_mode_choice)
{
	char why[96], path[128], v = 0;
	struct stat st;
	int fd;

	cr_assert(spool_sync_linked(root, "fdatasync", why, sizeof(why)));
	cr_assert_not(spool_sync_linked(root, "dsync", why, sizeof(why)));
	cr_assert_str_eq(why, "configured");
	if (stat("/dev/shm", &st) == 0 && major(st.st_dev) == 0) {
		cr_assert_not(spool_sync_linked("/dev/shm", "auto", why,
						sizeof(why)));
		cr_assert(strstr(why, "no block device"), "%s", why);
	}
	cr_assert_eq(stat(root, &st), 0);
	snprintf(path, sizeof(path), "/sys/dev/block/%u:%u/queue/fua",
		 major(st.st_dev), minor(st.st_dev));
	fd = open(path, O_RDONLY);
	if (fd < 0) {
		snprintf(path, sizeof(path),
			 "/sys/dev/block/%u:%u/../queue/fua",
			 major(st.st_dev), minor(st.st_dev));
		fd = open(path, O_RDONLY);
	}
	if (fd < 0) {
		fd_test_dir_remove(root); /* a skip does not reach .fini */
		cr_skip_test("no queue/fua for %s's device", root);
	}
	cr_assert_eq(read(fd, &v, 1), 1);
	close(fd);
	cr_assert_eq(spool_sync_linked(root, "auto", why, sizeof(why)),
		     v == '0', "%s", why);
	cr_assert(strstr(why, v == '0' ? "has no FUA" : "has FUA"), "%s",
		  why);
}

/* Bytes of path in extents the filesystem reports unwritten (allocated,
 * never written: they read as zeros); -1 where FIEMAP is not there. */
static long long
unwritten_bytes(const char *path)
{
	enum { NX = 256 };
	size_t len = sizeof(struct fiemap) + NX * sizeof(struct fiemap_extent);
	struct fiemap *fm = calloc(1, len);
	long long n = 0;
	int fd = open(path, O_RDONLY);

	cr_assert_not_null(fm);
	cr_assert_geq(fd, 0, "%s", path);
	fm->fm_length = FIEMAP_MAX_OFFSET;
	fm->fm_flags = FIEMAP_FLAG_SYNC;
	fm->fm_extent_count = NX;
	if (ioctl(fd, FS_IOC_FIEMAP, fm) != 0) {
		close(fd);
		free(fm);
		return -1;
	}
	for (unsigned i = 0; i < fm->fm_mapped_extents; i++)
		if (fm->fm_extents[i].fe_flags & FIEMAP_EXTENT_UNWRITTEN)
			n += (long long)fm->fm_extents[i].fe_length;
	close(fd);
	free(fm);
	return n;
}

/* spool_prepare = fallocate: a new segment is unwritten extents, not
 * zeros (nothing but its header written), except the first since the
 * start (the start waits for one anyway); messages across both kinds of
 * file land intact. */
Test(spool, fallocated_segments_are_unwritten_extents)
{
	struct spool_params p;
	char path[128], seg1[128];
	struct stat st;

	/* Does this filesystem show fallocate()'s unwritten extents? */
	snprintf(path, sizeof(path), "%s/probe", root);
	int pfd = open(path, O_RDWR | O_CREAT, 0600);
	cr_assert_geq(pfd, 0);
	bool shows = fallocate(pfd, 0, 0, 1 << 20) == 0 &&
		     unwritten_bytes(path) > 0;
	close(pfd);
	unlink(path);
	if (!shows) {
		fd_test_dir_remove(root); /* a skip does not reach .fini */
		cr_skip_test("%s shows no unwritten extents after fallocate",
			     root);
	}
	params(&p, NULL);
	p.fallocate_segments = true;
	p.max_msgs = 4;
	p.segment_size = 4096 + 2 * (16384 + 69632 + 4096);
	p.spare_segments = 2; /* the first and one more made at start */
	struct spool *sp = make(&p);
	seg_file(path, sizeof(path), 0);
	seg_file(seg1, sizeof(seg1), 1);
	for (int i = 0; i < 5000 && stat(seg1, &st) != 0; i++)
		usleep(1000);
	cr_assert_eq(stat(seg1, &st), 0, "no spare %s", seg1);
	cr_assert_eq(unwritten_bytes(path), 0, "the first one is zeroed");
	long long u = unwritten_bytes(seg1);
	cr_assert_geq(u, (long long)p.segment_size - 2 * 4096,
		      "%lld unwritten of %llu", u,
		      (unsigned long long)p.segment_size);
	size_t n = 12 * p.batch_size + 77;
	uint64_t id;
	uint8_t *body = put_one_ok(sp, n, 11, &id);
	cr_assert_geq(spool_get_stats(sp)->segments_used, 2);
	check_on_disk(id, body, n);
	free(body);
	spool_destroy(sp);
}

/* spool_prepare = zero: every block of a new segment written (zeros), so
 * that each batch is an overwrite. */
Test(spool, zeroed_segments_have_no_unwritten_extents)
{
	struct spool_params p;
	char path[128];

	params(&p, NULL);
	struct spool *sp = make(&p);
	seg_file(path, sizeof(path), 0);
	long long u = unwritten_bytes(path);
	spool_destroy(sp);
	if (u < 0) {
		fd_test_dir_remove(root);
		cr_skip_test("no FIEMAP on %s", root);
	}
	cr_assert_eq(u, 0, "%lld octets unwritten", u);
}

Test(spool, prepare_mode_choice)
{
	char why[96];
	struct stat st;
	bool f;

	cr_assert(spool_prepare_fallocate(root, "fallocate", why, sizeof(why)));
	cr_assert_str_eq(why, "configured");
	cr_assert_not(spool_prepare_fallocate(root, "zero", why, sizeof(why)));
	if (stat("/dev/shm", &st) == 0 && major(st.st_dev) == 0) {
		cr_assert_not(spool_prepare_fallocate("/dev/shm", "auto", why,
						      sizeof(why)));
		cr_assert(strstr(why, "not ext4"), "%s", why);
	}
	f = spool_prepare_fallocate(root, "auto", why, sizeof(why));
	cr_assert(strncmp(why, "auto: ", 6) == 0, "%s", why);
	cr_assert_eq(f, strstr(why, "has no journal") != NULL, "%d %s", f,
		     why);
}

/* ---- giving a segment back (review 2026-12-05) ------------------------ */

static struct spool_announce seg_an[64], recl_an[64];
static unsigned n_seg_an, n_recl_an;

static void
on_seg_announce(void *actx, const struct spool_announce *a)
{
	(void)actx;
	if (a->type == SPOOL_AN_SEGMENT && n_seg_an < 64)
		seg_an[n_seg_an++] = *a;
	if (a->type == SPOOL_AN_RECLAIMED && n_recl_an < 64)
		recl_an[n_recl_an++] = *a;
}

static bool
reclaimed(uint64_t file_no)
{
	for (unsigned i = 0; i < n_recl_an; i++)
		if (recl_an[i].file_no == file_no)
			return true;
	return false;
}

/* Up to 3 s for the preparer to announce file_no reclaimed. */
static void
wait_reclaimed(struct spool *sp, uint64_t file_no)
{
	for (int i = 0; i < 300 && !reclaimed(file_no); i++) {
		spool_flush(sp);
		usleep(10000);
	}
}

/* A spool of small segments (one spare kept), filled until four were
 * taken into use (seg_an[] says which). */
static struct spool *
four_small_segments(struct spool_params *p)
{
	uint8_t body[1000];
	struct spool *sp;

	params(p, NULL);
	p->max_msgs = 4;
	p->segment_size = 4096 + 2 * (16384 + 69632 + 4096);
	p->spare_segments = 1;
	p->announce = on_seg_announce;
	n_seg_an = n_recl_an = 0;
	sp = make(p);
	memset(body, 'q', sizeof(body));
	for (int i = 0; i < 80 && n_seg_an < 4; i++) {
		put_msg(sp, body, sizeof(body));
		spool_flush(sp);
		drain(sp);
	}
	cr_assert_geq(n_seg_an, 4, "segments used: %u", n_seg_an);
	return sp;
}

/* RECLAIMED is announced once the file has its new epoch; a file that
 * could not get one (its header unreadable) is not announced: announced,
 * the control plane would forget its messages and a restart would deliver
 * them again, uncounted. Before, every failure was announced too. */
Test(spool, reclaim_announced_only_with_a_new_epoch)
{
	struct spool_params p;
	uint8_t body[1000];
	char path[512];
	int fd;
	struct spool *sp = four_small_segments(&p);

	/* the second one's header damaged on disk */
	seg_file(path, sizeof(path), seg_an[1].file_no);
	fd = open(path, O_WRONLY | O_CLOEXEC);
	cr_assert_geq(fd, 0, "%s", path);
	memset(body, 0x5a, 64);
	cr_assert_eq(pwrite(fd, body, 64, 0), 64);
	close(fd);
	cr_assert_eq(spool_reclaim(sp, seg_an[0].file_no, seg_an[0].use_seq),
		     0);
	cr_assert_eq(spool_reclaim(sp, seg_an[1].file_no, seg_an[1].use_seq),
		     0);
	wait_reclaimed(sp, seg_an[0].file_no);
	cr_assert(reclaimed(seg_an[0].file_no), "the good one");
	for (int i = 0; i < 50; i++) { /* the preparer had time for both */
		spool_flush(sp);
		usleep(10000);
	}
	cr_assert_not(reclaimed(seg_an[1].file_no),
		      "announced without a new epoch");
	spool_destroy(sp);
}

/* A reclaim naming a later use than the file's header holds (here the
 * next segment's, a pair the control plane never sends) is not that
 * segment: refused, not announced, the header untouched. Before, it was
 * announced as done, and the control plane forgot the other segment,
 * never reclaimed. A repeated one (the header newer) is announced: its
 * old records are stale already. */
Test(spool, a_reclaim_of_a_use_the_file_never_had_is_refused)
{
	struct spool_params p;
	uint8_t before[64], after[64];
	char path[512];
	int fd;
	struct spool *sp = four_small_segments(&p);

	seg_file(path, sizeof(path), seg_an[0].file_no);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	cr_assert_geq(fd, 0, "%s", path);
	cr_assert_eq(pread(fd, before, sizeof(before), 0), 64);
	cr_assert_gt(seg_an[1].use_seq, seg_an[0].use_seq);
	cr_assert_eq(spool_reclaim(sp, seg_an[0].file_no, seg_an[1].use_seq),
		     0);
	wait_reclaimed(sp, seg_an[0].file_no); /* 3 s: time enough */
	cr_assert_not(reclaimed(seg_an[0].file_no),
		      "a use the file never had announced reclaimed");
	cr_assert_eq(pread(fd, after, sizeof(after), 0), 64);
	cr_assert_arr_eq(before, after, sizeof(before), "header rewritten");
	cr_assert_eq(spool_reclaim(sp, seg_an[0].file_no, seg_an[0].use_seq),
		     0);
	wait_reclaimed(sp, seg_an[0].file_no);
	cr_assert(reclaimed(seg_an[0].file_no), "the real one");
	n_recl_an = 0;
	cr_assert_eq(spool_reclaim(sp, seg_an[0].file_no, seg_an[0].use_seq),
		     0);
	wait_reclaimed(sp, seg_an[0].file_no);
	cr_assert(reclaimed(seg_an[0].file_no), "a repeated request");
	close(fd);
	spool_destroy(sp);
}

/* ---- faults at a start do not destroy what the spool holds (review
 * 2026-12-05) ------------------------------------------------------------ */

static void
fill_and_close(uint64_t *ids, unsigned n)
{
	struct spool_params p;
	struct spool *sp;
	static uint8_t body[3000];

	params(&p, NULL);
	sp = make(&p);
	memset(body, 'a', sizeof(body));
	for (unsigned i = 0; i < n; i++)
		ids[i] = put_msg(sp, body, sizeof(body));
	drain(sp);
	spool_destroy(sp);
	for (unsigned i = 0; i < n; i++)
		cr_assert(found_on_disk(ids[i]));
}

/* A start with the fault set up: it fails, and makes nothing over the n
 * messages on disk (a start that went on is given time to). */
static void
start_fails_keeping(const uint64_t *ids, unsigned n, const char *why)
{
	struct spool_params p;
	struct spool *sp;

	params(&p, NULL);
	sp = spool_create(&p);
	cr_assert_geq(failed_calls, 1, "the fault was not met");
	if (sp) { /* it may only have waited: nothing made over the mail */
		usleep(1500000);
		spool_destroy(sp);
	}
	cr_assert_null(sp, "%s", why);
	for (unsigned i = 0; i < n; i++)
		cr_assert(found_on_disk(ids[i]), "message %u lost", i);
}

/* The preparer's scan of the worker's directory fails (EMFILE): the start
 * fails, and nothing is made. Before, a second later it made a segment
 * numbered from zero and renamed it over the one holding the mail. */
Test(spool, a_failed_scan_makes_nothing_over_the_old_segments)
{
	struct spool_params p;
	struct spool *sp;
	uint64_t ids[20];

	fill_and_close(ids, 20);
	fail_errno = EMFILE;
	fail_opendir_of = "/w05";
	start_fails_keeping(ids, 20, "the start went on without its scan");
	cr_assert_eq(failed_calls, 1, "the scan's opendir failed %u times",
		     failed_calls);
	params(&p, NULL);
	sp = make(&p); /* and the next start, without the fault, is fine */
	spool_destroy(sp);
	for (unsigned i = 0; i < 20; i++)
		cr_assert(found_on_disk(ids[i]));
}

/* One segment cannot be opened by the scan (EMFILE): the scan fails as a
 * whole (before, the file was left out of the list and its use sequence
 * given again). */
Test(spool, a_segment_the_scan_cannot_open_fails_the_scan)
{
	uint64_t ids[20];

	fill_and_close(ids, 20);
	fail_errno = EMFILE;
	fail_open_of = "/w05/00000000.seg";
	start_fails_keeping(ids, 20, "the start went on with a file left out");
}

/* A segment's header cannot be read (EIO): it is kept as it is, never
 * made a spare. Before, a read error was taken for a short file, and the
 * file was truncated and zeroed with the mail in it. */
Test(spool, a_header_read_error_keeps_the_segment)
{
	struct spool_params p;
	struct spool *sp;
	uint64_t ids[20];

	fill_and_close(ids, 20);
	params(&p, NULL);
	p.spare_segments = 3;
	fail_errno = EIO;
	fail_hdr_of = "/w05/00000000.seg";
	sp = make(&p);
	usleep(300000); /* the preparer makes its spares */
	cr_assert_eq(failed_calls, 1, "the header read was not failed");
	spool_destroy(sp);
	for (unsigned i = 0; i < 20; i++)
		cr_assert(found_on_disk(ids[i]), "message %u lost", i);
}

static unsigned
seg_files(void)
{
	char d[128];
	DIR *dir;
	struct dirent *e;
	unsigned n = 0;

	snprintf(d, sizeof(d), "%s/w05", root);
	dir = opendir(d);
	cr_assert_not_null(dir);
	while ((e = readdir(dir)))
		n += tail_is(e->d_name, ".seg");
	closedir(dir);
	return n;
}

/* A spare left by the last run whose making-ready fails once (its open
 * for the writer: EMFILE) stays a candidate and is made ready at the next
 * try; before, it was dropped until a restart and a new file made in its
 * place (the spool grew, or refused mail at --max-segments). */
Test(spool, a_spare_that_fails_once_is_tried_again)
{
	struct spool_params p;
	struct spool *sp;
	uint8_t body[3000];
	unsigned files;

	params(&p, NULL);
	p.spare_segments = 3;
	sp = make(&p);
	memset(body, 'a', sizeof(body));
	put_msg(sp, body, sizeof(body));
	drain(sp);
	usleep(500000); /* three spares made */
	spool_destroy(sp);
	files = seg_files();
	cr_assert_eq(files, 4, "%u files", files);
	fail_errno = EMFILE;
	fail_direct_open_n = 2; /* the second spare made ready */
	sp = make(&p);
	/* the preparer tries again after a second, and zeroes it anew */
	usleep(2000000);
	cr_assert_eq(failed_calls, 1, "the publish was not failed");
	/* three spares kept ready, three on disk: no new file (one, had the
	 * failed spare been dropped); the writer takes none before mail */
	cr_assert_eq(seg_files(), files, "%u files, were %u", seg_files(),
		     files);
	spool_destroy(sp);
}

/* A reclaimed segment the preparer would delete (spares enough) is kept
 * when the segment list cannot be rewritten without it: deleted while
 * still listed, the next start reported it missing, "the messages it held
 * are lost". */
Test(spool, a_surplus_segment_is_kept_when_it_cannot_be_delisted)
{
	struct spool_params p;
	char path[512];
	struct spool *sp = four_small_segments(&p);

	/* the first goes to the reserve, the second would be deleted */
	cr_assert_eq(spool_reclaim(sp, seg_an[0].file_no, seg_an[0].use_seq),
		     0);
	wait_reclaimed(sp, seg_an[0].file_no);
	cr_assert(reclaimed(seg_an[0].file_no));
	fail_list_write = true;
	cr_assert_eq(spool_reclaim(sp, seg_an[1].file_no, seg_an[1].use_seq),
		     0);
	wait_reclaimed(sp, seg_an[1].file_no);
	fail_list_write = false;
	cr_assert(reclaimed(seg_an[1].file_no));
	cr_assert_geq(failed_calls, 1, "the list was not failed");
	seg_file(path, sizeof(path), seg_an[1].file_no);
	cr_assert_eq(access(path, F_OK), 0,
		     "deleted while the list still names it");
	spool_destroy(sp);
}
