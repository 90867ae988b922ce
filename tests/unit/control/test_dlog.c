/*
 * The delivery log: the record codec (round trip, truncation at every byte,
 * every bit flip), then real logs in a temporary directory: append, wait
 * and replay in order; group commit under concurrent appenders; the
 * checkpoint and its crash rules; torn tails at every 8-byte offset; a
 * damaged byte mid-file; damaged headers; and I/O failures injected through
 * the fault seam (FINALDOT_FAULT_INJECTION), which also lets a test see
 * what was in the file at each fdatasync, i.e. what a power cut would keep.
 */
#include <criterion/criterion.h>
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "../testdir.h"
#include "dlog.h"
#include "finaldot/log.h"

#if defined(__SANITIZE_ADDRESS__)
#define DLOG_TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define DLOG_TEST_ASAN 1
#endif
#endif
#ifdef DLOG_TEST_ASAN
#include <sanitizer/lsan_interface.h>
#endif

#ifndef FINALDOT_FAULT_INJECTION
#error "test_dlog needs the fault seam: configure with -Dfault_injection=true"
#endif

/* pread64 as the replay sees it: with block0_eio set, a read that starts
 * in the file's first 4096 bytes fails with EIO (a bad block 0). */
static int block0_eio;

ssize_t pread64(int fd, void *buf, size_t n, off_t off);
ssize_t
pread64(int fd, void *buf, size_t n, off_t off)
{
	static ssize_t (*real)(int, void *, size_t, off_t);

	if (!real)
		*(void **)&real = dlsym(RTLD_NEXT, "pread64");
	if (block0_eio && off < DLOG_FILE_HDR1_OFF) {
		errno = EIO;
		return -1;
	}
	return real(fd, buf, n, off);
}

static char root[64];
/* The file at the last fdatasync (see capture()). */
static uint8_t *img;
static size_t img_len;
static bool img_failed;

static void
setup(void)
{
	fd_log_set_level(FD_LOG_ERR); /* warnings are expected here */
	fd_test_dir_make(root, sizeof(root), "/var/tmp", "dlog");
}

static void
teardown(void)
{
	dlog_set_io_hook(NULL, NULL);
	fd_test_dir_remove(root);
	free(img);
	img = NULL;
#ifdef DLOG_TEST_ASAN
	/* a leak only fails a Criterion run when checked here */
	cr_assert_eq(__lsan_do_recoverable_leak_check(), 0, "memory leaked");
#endif
}

TestSuite(dlog, .init = setup, .fini = teardown, .timeout = 120);

/* ---- helpers ---------------------------------------------------------- */

static char texts[64][DLOG_TEXT_MAX + 200];

/* A varied record: every type in turn, texts from empty to over the max. */
static struct dlog_rec
mk(unsigned i)
{
	struct dlog_rec r;
	unsigned len = (i * 37u) % 140u;
	char *t = texts[i % 64];

	memset(&r, 0, sizeof(r));
	r.type = (enum dlog_type)(1 + i % 11);
	r.msgid = 0x1000000000ull + i;
	r.rcpt = i % 7 == 0 ? DLOG_ALL : i % 5;
	r.attempts = i % 4;
	r.time_us = 1712345678000000ull + i;
	r.next_us = r.type == DLOG_DEFERRED ? r.time_us + 60000000u : 0;
	r.aux = r.type == DLOG_SUPPRESSED ? 0xabcdef00ull + i : 0;
	if (i % 13 == 12)
		len = DLOG_TEXT_MAX + 100; /* truncated */
	for (unsigned k = 0; k < len; k++)
		t[k] = (char)('a' + (i + k) % 26);
	r.text = len ? t : NULL;
	r.text_len = (uint16_t)len;
	return r;
}

static bool
rec_eq(const struct dlog_rec *a, const struct dlog_rec *b)
{
	size_t la = a->text_len > DLOG_TEXT_MAX ? DLOG_TEXT_MAX : a->text_len;
	size_t lb = b->text_len > DLOG_TEXT_MAX ? DLOG_TEXT_MAX : b->text_len;

	return a->type == b->type && a->msgid == b->msgid &&
	       a->rcpt == b->rcpt && a->attempts == b->attempts &&
	       a->time_us == b->time_us && a->next_us == b->next_us &&
	       a->aux == b->aux && la == lb &&
	       (la == 0 || memcmp(a->text, b->text, la) == 0);
}

/* Replayed records, with their texts copied out. */
struct coll {
	size_t n, cap;
	struct dlog_rec *r;
	int stop_at; /* return 42 at this record (1-based); 0 never */
};

static int
collect(void *ctx, const struct dlog_rec *r)
{
	struct coll *c = ctx;

	cr_assert(dlog_type_is_public(r->type), "internal type replayed");
	cr_assert_leq(r->text_len, DLOG_TEXT_MAX);
	if (c->stop_at && (int)c->n + 1 == c->stop_at)
		return 42;
	if (c->n == c->cap) {
		c->cap = c->cap ? 2 * c->cap : 64;
		c->r = realloc(c->r, c->cap * sizeof(*c->r));
		cr_assert_not_null(c->r);
	}
	c->r[c->n] = *r;
	if (r->text_len) {
		char *t = malloc(r->text_len);
		memcpy(t, r->text, r->text_len);
		c->r[c->n].text = t;
	}
	c->n++;
	return 0;
}

static void
coll_free(struct coll *c)
{
	for (size_t i = 0; i < c->n; i++)
		free((void *)c->r[i].text);
	free(c->r);
	memset(c, 0, sizeof(*c));
}

static struct dlog *
open_at(const char *dir, const struct dlog_params *p, struct coll *c,
	struct dlog_open_stats *st)
{
	int err = 0;
	struct dlog *l = dlog_open(dir, p, c ? collect : NULL, c, st, &err);

	cr_assert_not_null(l, "dlog_open(%s): %d", dir, err);
	return l;
}

static void
path_of(char *buf, size_t len, const char *dir, uint64_t gen,
	const char *ext)
{
	snprintf(buf, len, "%s/%016" PRIx64 ".%s", dir, gen, ext);
}

static bool
exists(const char *dir, uint64_t gen, const char *ext)
{
	char p[256];

	path_of(p, sizeof(p), dir, gen, ext);
	return access(p, F_OK) == 0;
}

static unsigned
count_files(const char *dir)
{
	char cmd[300];
	unsigned n = 0;
	FILE *f;

	snprintf(cmd, sizeof(cmd), "ls -1 %s", dir);
	f = popen(cmd, "r");
	cr_assert_not_null(f);
	for (int ch; (ch = fgetc(f)) != EOF;)
		n += ch == '\n';
	pclose(f);
	return n;
}

static uint8_t *
slurp(const char *path, size_t *n)
{
	FILE *f = fopen(path, "rb");
	uint8_t *b;
	long sz;

	cr_assert_not_null(f, "open %s", path);
	fseek(f, 0, SEEK_END);
	sz = ftell(f);
	rewind(f);
	b = malloc((size_t)sz + 1);
	cr_assert_eq(fread(b, 1, (size_t)sz, f), (size_t)sz);
	fclose(f);
	*n = (size_t)sz;
	return b;
}

static void
spit(const char *path, const void *p, size_t n)
{
	FILE *f = fopen(path, "wb");

	cr_assert_not_null(f, "create %s", path);
	cr_assert_eq(fwrite(p, 1, n, f), n);
	cr_assert_eq(fclose(f), 0);
}

/* Append recs [from, to) of mk() and wait for the last. */
static void
append_range(struct dlog *l, unsigned from, unsigned to)
{
	uint64_t lsn = 0;

	for (unsigned i = from; i < to; i++) {
		struct dlog_rec r = mk(i);
		lsn = dlog_append(l, &r);
		cr_assert_gt(lsn, 0);
	}
	if (lsn)
		cr_assert_eq(dlog_wait(l, lsn), 0);
}

/* The same without waiting. */
static void
append_range_nowait(struct dlog *l, unsigned from, unsigned to)
{
	for (unsigned i = from; i < to; i++) {
		struct dlog_rec r = mk(i);
		cr_assert_gt(dlog_append(l, &r), 0);
	}
}

static void
assert_range(const struct coll *c, size_t at, unsigned from, unsigned to)
{
	cr_assert_geq(c->n, at + (to - from));
	for (unsigned i = from; i < to; i++) {
		struct dlog_rec r = mk(i);
		cr_assert(rec_eq(&c->r[at + i - from], &r),
			  "record %u differs", i);
	}
}

/* Offset just past record i of a fresh log with mk(0..n) appended: the
 * header copies, an empty checkpoint (BEGIN, END), then the records. */
static uint64_t
end_of(unsigned i)
{
	uint64_t off = DLOG_FILE_DATA_OFF + 2 * DLOG_REC_HDR_LEN;

	for (unsigned k = 0; k <= i; k++)
		off += dlog_rec_size(mk(k).text_len);
	return off;
}

/* ---- codec ------------------------------------------------------------ */

Test(dlog, codec_round_trip_every_type)
{
	uint8_t buf[DLOG_REC_MAX + 8];

	for (unsigned t = 1; t <= DLOG_INDOUBT; t++) {
		for (unsigned v = 0; v < 3; v++) {
			struct dlog_rec r = mk(t - 1 + 11 * v), d;
			size_t n, used = 0;

			r.type = (enum dlog_type)t;
			n = dlog_encode(&r, buf, sizeof(buf));
			cr_assert_gt(n, 0);
			cr_assert_eq(n % 8, 0);
			cr_assert_eq(n, dlog_rec_size(r.text_len));
			cr_assert_eq(dlog_decode(buf, n, &d, &used), DLOG_DEC_OK);
			cr_assert_eq(used, n);
			cr_assert(rec_eq(&r, &d), "type %u", t);
			if (!r.text_len)
				cr_assert_null(d.text);
		}
	}
	/* internal records too, for tools reading whole files */
	struct dlog_rec b = { .type = DLOG_CKPT_END, .msgid = 7, .aux = 99 }, d;
	size_t used;
	size_t n = dlog_encode(&b, buf, sizeof(buf));
	cr_assert_eq(n, DLOG_REC_HDR_LEN);
	cr_assert_eq(dlog_decode(buf, n, &d, &used), DLOG_DEC_OK);
	cr_assert(rec_eq(&b, &d));
}

Test(dlog, codec_text_truncated_and_invalid_rejected)
{
	uint8_t buf[2 * DLOG_REC_MAX];
	char big[3000];
	struct dlog_rec r = { .type = DLOG_BOUNCED, .msgid = 1 }, d;
	size_t used;

	memset(big, 'x', sizeof(big));
	r.text = big;
	r.text_len = sizeof(big);
	cr_assert_eq(dlog_encode(&r, buf, sizeof(buf)), DLOG_REC_MAX);
	cr_assert_eq(dlog_decode(buf, sizeof(buf), &d, &used), DLOG_DEC_OK);
	cr_assert_eq(d.text_len, DLOG_TEXT_MAX);
	/* cap too small, NULL text with a length, bad types */
	cr_assert_eq(dlog_encode(&r, buf, DLOG_REC_MAX - 1), 0);
	r.text = NULL;
	cr_assert_eq(dlog_encode(&r, buf, sizeof(buf)), 0);
	r.text_len = 0;
	r.type = (enum dlog_type)0;
	cr_assert_eq(dlog_encode(&r, buf, sizeof(buf)), 0);
	r.type = (enum dlog_type)(DLOG_INDOUBT + 1); /* the first unused */
	cr_assert_eq(dlog_encode(&r, buf, sizeof(buf)), 0);
	r.type = DLOG_CKPT_BEGIN;
	r.text = big;
	r.text_len = 3;
	cr_assert_eq(dlog_encode(&r, buf, sizeof(buf)), 0);
	/* decoder: wrong version, type, length, reserved field */
	r = mk(5);
	size_t n = dlog_encode(&r, buf, sizeof(buf));
	buf[4] = 2;
	cr_assert_eq(dlog_decode(buf, n, &d, &used), DLOG_DEC_ERR_VERSION);
	buf[4] = 1;
	buf[5] = 0;
	cr_assert_eq(dlog_decode(buf, n, &d, &used), DLOG_DEC_ERR_TYPE);
	buf[5] = (uint8_t)r.type;
	buf[6] = 0x01;
	buf[7] = 0x08; /* 2049 */
	cr_assert_eq(dlog_decode(buf, n, &d, &used), DLOG_DEC_ERR_LEN);
	n = dlog_encode(&r, buf, sizeof(buf));
	buf[53] = 1;
	cr_assert_eq(dlog_decode(buf, n, &d, &used), DLOG_DEC_ERR_FIELD);
	buf[53] = 0;
	buf[0] = 'X';
	cr_assert_eq(dlog_decode(buf, n, &d, &used), DLOG_DEC_ERR_MAGIC);
}

Test(dlog, codec_every_prefix_is_again_never_ok)
{
	uint8_t buf[DLOG_REC_MAX];

	for (unsigned i = 0; i < 30; i++) {
		struct dlog_rec r = mk(i), d;
		size_t used, n = dlog_encode_salted(&r, 0x1234u + i, buf,
						    sizeof(buf));

		cr_assert_gt(n, 0);
		for (size_t k = 0; k < n; k++)
			cr_assert_eq(dlog_decode_salted(buf, k, 0x1234u + i,
							&d, &used),
				     DLOG_DEC_AGAIN, "record %u prefix %zu", i,
				     k);
		cr_assert_eq(dlog_decode_salted(buf, n, 0x1234u + i, &d,
						&used),
			     DLOG_DEC_OK);
	}
}

Test(dlog, codec_every_bit_flip_detected)
{
	uint8_t buf[DLOG_REC_MAX + 64];
	struct dlog_rec r = mk(3), d; /* 111 bytes of text, 1 padding */
	size_t used, n = dlog_encode(&r, buf, sizeof(buf));

	cr_assert_eq(n % 8, 0);
	cr_assert_neq(n, DLOG_REC_HDR_LEN + r.text_len, "want padding");
	memset(buf + n, 0, 64);
	for (size_t bit = 0; bit < n * 8; bit++) {
		buf[bit / 8] ^= (uint8_t)(1u << (bit % 8));
		cr_assert_neq(dlog_decode(buf, n + 64, &d, &used),
			      DLOG_DEC_OK, "bit %zu", bit);
		buf[bit / 8] ^= (uint8_t)(1u << (bit % 8));
	}
	cr_assert_eq(dlog_decode(buf, n, &d, &used), DLOG_DEC_OK);
}

Test(dlog, codec_salt_binds_record_to_its_file)
{
	uint8_t buf[DLOG_REC_MAX];
	struct dlog_rec r = mk(8), d;
	size_t used, n = dlog_encode_salted(&r, 111, buf, sizeof(buf));

	cr_assert_eq(dlog_decode_salted(buf, n, 111, &d, &used), DLOG_DEC_OK);
	cr_assert_eq(dlog_decode_salted(buf, n, 112, &d, &used),
		     DLOG_DEC_ERR_CRC);
	cr_assert_eq(dlog_decode(buf, n, &d, &used), DLOG_DEC_ERR_CRC);
}

Test(dlog, codec_file_header_round_trip_and_damage)
{
	uint8_t b[DLOG_FILE_HDR_LEN];
	struct dlog_file_hdr h = { .generation = 9, .prev_generation = 8,
				   .created_us = 1712345678000000ull,
				   .salt = 0x55aa }, d;

	dlog_file_hdr_encode(&h, b);
	cr_assert_eq(dlog_file_hdr_decode(b, sizeof(b), &d), DLOG_DEC_OK);
	cr_assert(d.generation == 9 && d.prev_generation == 8 &&
		  d.created_us == h.created_us && d.salt == 0x55aa);
	cr_assert_eq(d.version, DLOG_FILE_VERSION, "encoded as the current");
	h.version = 1;
	dlog_file_hdr_encode(&h, b);
	cr_assert_eq(dlog_file_hdr_decode(b, sizeof(b), &d), DLOG_DEC_OK);
	cr_assert_eq(d.version, 1, "version 1 headers still read");
	h.version = 3;
	dlog_file_hdr_encode(&h, b);
	cr_assert_eq(dlog_file_hdr_decode(b, sizeof(b), &d),
		     DLOG_DEC_ERR_VERSION);
	h.version = 0;
	dlog_file_hdr_encode(&h, b);
	for (size_t k = 0; k < sizeof(b); k++)
		cr_assert_eq(dlog_file_hdr_decode(b, k, &d), DLOG_DEC_AGAIN);
	for (size_t bit = 0; bit < sizeof(b) * 8; bit++) {
		b[bit / 8] ^= (uint8_t)(1u << (bit % 8));
		cr_assert_neq(dlog_file_hdr_decode(b, sizeof(b), &d),
			      DLOG_DEC_OK, "bit %zu", bit);
		b[bit / 8] ^= (uint8_t)(1u << (bit % 8));
	}
}

/* ---- append, wait, replay --------------------------------------------- */

Test(dlog, new_log_then_append_wait_reopen_replays_in_order)
{
	struct dlog_open_stats st;
	struct coll c = { 0 };
	struct dlog *l = open_at(root, NULL, &c, &st);
	struct dlog_stats s;

	cr_assert_eq(c.n, 0);
	cr_assert_eq(st.generation, 1);
	cr_assert(st.complete && !st.checkpoint_used);
	cr_assert(exists(root, 1, "log"));
	struct dlog_rec r0 = mk(0);
	cr_assert_eq(dlog_append(l, &r0), 1, "LSNs start at 1");
	append_range(l, 1, 200);
	cr_assert_eq(dlog_durable(l), 200);
	dlog_get_stats(l, &s);
	cr_assert_eq(s.appended, 200);
	cr_assert_eq(s.durable_lsn, 200);
	cr_assert_eq(s.syncs, s.flushes, "one fdatasync per batch");
	cr_assert_eq(s.bytes, end_of(199) - end_of(0) +
				      dlog_rec_size(mk(0).text_len));
	dlog_close(l);

	l = open_at(root, NULL, &c, &st);
	cr_assert_eq(c.n, 200);
	assert_range(&c, 0, 0, 200);
	cr_assert_eq(st.records, 200);
	cr_assert_eq(st.records_bad, 0);
	cr_assert_eq(st.bytes, end_of(199));
	cr_assert_eq(st.tail_bytes, 0);
	/* appends continue after the replayed ones */
	append_range(l, 200, 210);
	dlog_close(l);
	coll_free(&c);
	l = open_at(root, NULL, &c, NULL);
	assert_range(&c, 0, 0, 210);
	cr_assert_eq(c.n, 210);
	dlog_close(l);
	coll_free(&c);
}

Test(dlog, close_makes_pending_records_durable)
{
	struct coll c = { 0 };
	struct dlog *l = open_at(root, NULL, NULL, NULL);

	for (unsigned i = 0; i < 500; i++) {
		struct dlog_rec r = mk(i);
		cr_assert_gt(dlog_append(l, &r), 0);
	}
	dlog_close(l);
	l = open_at(root, NULL, &c, NULL);
	cr_assert_eq(c.n, 500);
	assert_range(&c, 0, 0, 500);
	dlog_close(l);
	coll_free(&c);
}

Test(dlog, append_rejects_invalid_records_and_wait_rejects_future_lsn)
{
	struct dlog *l = open_at(root, NULL, NULL, NULL);
	struct dlog_rec r = mk(1);

	r.type = (enum dlog_type)0;
	cr_assert_eq(dlog_append(l, &r), 0);
	r.type = (enum dlog_type)(DLOG_INDOUBT + 1); /* the first unused */
	cr_assert_eq(dlog_append(l, &r), 0);
	r.type = DLOG_CKPT_BEGIN;
	cr_assert_eq(dlog_append(l, &r), 0);
	r = mk(1);
	r.text = NULL;
	r.text_len = 4;
	cr_assert_eq(dlog_append(l, &r), 0);
	cr_assert_eq(dlog_wait(l, 1), -EINVAL);
	cr_assert_eq(dlog_wait(l, 0), 0);
	r = mk(1);
	cr_assert_eq(dlog_append(l, &r), 1);
	cr_assert_eq(dlog_wait(l, 1), 0);
	dlog_close(l);
}

Test(dlog, replay_stop_fails_open_and_leaves_dir_alone)
{
	struct coll c = { .stop_at = 3 };
	struct dlog *l = open_at(root, NULL, NULL, NULL);
	int err = 0;

	append_range(l, 0, 10);
	dlog_close(l);
	cr_assert_null(dlog_open(root, NULL, collect, &c, NULL, &err));
	cr_assert_eq(err, 42);
	cr_assert_eq(c.n, 2);
	coll_free(&c);
	l = open_at(root, NULL, &c, NULL);
	cr_assert_eq(c.n, 10);
	dlog_close(l);
	coll_free(&c);
}

Test(dlog, open_fails_on_unusable_dir)
{
	char f[128];
	int err = 0;

	snprintf(f, sizeof(f), "%s/plain", root);
	spit(f, "x", 1);
	cr_assert_null(dlog_open(f, NULL, NULL, NULL, NULL, &err));
	cr_assert_eq(err, -ENOTDIR);
	snprintf(f, sizeof(f), "%s/no/such/dir", root);
	cr_assert_null(dlog_open(f, NULL, NULL, NULL, NULL, &err));
	cr_assert_eq(err, -ENOENT);
	cr_assert_null(dlog_open("", NULL, NULL, NULL, NULL, &err));
	cr_assert_eq(err, -EINVAL);
}

/* ---- group commit ----------------------------------------------------- */

#define NTHR 8
#define PER_THR 400

struct thr {
	struct dlog *l;
	unsigned id;
	unsigned n;
	bool wait;
	pthread_mutex_t *mu; /* caller lock around state + append */
	unsigned *state;     /* records appended by this thread */
	const char *bad;     /* what failed: asserts stay in the main thread
			      * (Criterion's abort is not for other threads) */
};

static void *
appender(void *arg)
{
	struct thr *t = arg;

	for (unsigned i = 0; i < t->n; i++) {
		struct dlog_rec r = {
			.type = DLOG_ATTEMPT,
			.msgid = t->id,
			.rcpt = i,
			.attempts = i,
			.time_us = i,
		};
		uint64_t lsn;

		if (t->mu) {
			pthread_mutex_lock(t->mu);
			lsn = dlog_append(t->l, &r);
			(*t->state)++;
			pthread_mutex_unlock(t->mu);
		} else {
			lsn = dlog_append(t->l, &r);
		}
		if (lsn == 0) {
			t->bad = "append returned 0";
			return NULL;
		}
		if (t->wait && dlog_wait(t->l, lsn) != 0) {
			t->bad = "wait failed";
			return NULL;
		}
		if (t->wait && dlog_durable(t->l) < lsn) {
			t->bad = "durable below a waited lsn";
			return NULL;
		}
	}
	return NULL;
}

static uint64_t cb_last, cb_calls;
static bool cb_monotone = true;

static void
on_durable(void *ctx, uint64_t lsn)
{
	(void)ctx;
	if (lsn <= cb_last)
		cb_monotone = false;
	cb_last = lsn;
	cb_calls++;
}

/* Per-thread sequences 0..n-1 in order, interleaved in any way. */
static void
assert_thread_sequences(const struct coll *c, unsigned nthr, unsigned n)
{
	unsigned next[NTHR] = { 0 };

	cr_assert_eq(c->n, (size_t)nthr * n);
	for (size_t i = 0; i < c->n; i++) {
		unsigned id = (unsigned)c->r[i].msgid;
		cr_assert_lt(id, nthr);
		cr_assert_eq(c->r[i].attempts, next[id], "thread %u", id);
		next[id]++;
	}
}

Test(dlog, concurrent_appenders_share_fdatasyncs)
{
	struct dlog *l = open_at(root, NULL, NULL, NULL);
	pthread_t th[NTHR];
	struct thr t[NTHR];
	struct dlog_stats s;
	struct coll c = { 0 };

	dlog_set_durable_cb(l, on_durable, NULL);
	for (unsigned i = 0; i < NTHR; i++) {
		t[i] = (struct thr){ .l = l, .id = i, .n = PER_THR,
				     .wait = true };
		pthread_create(&th[i], NULL, appender, &t[i]);
	}
	for (unsigned i = 0; i < NTHR; i++) {
		pthread_join(th[i], NULL);
		cr_assert_null(t[i].bad, "thread %u: %s", i, t[i].bad);
	}
	dlog_get_stats(l, &s);
	cr_assert_eq(s.appended, NTHR * PER_THR);
	cr_assert_eq(s.durable_lsn, NTHR * PER_THR);
	cr_assert_lt(s.flushes, NTHR * PER_THR, "no group commit: %" PRIu64,
		     s.flushes);
	cr_assert_eq(s.syncs, s.flushes);
	cr_log_info("group commit: %u records, %" PRIu64 " flushes",
		    NTHR * PER_THR, s.flushes);
	dlog_close(l); /* joins the writer: the callback has run */
	cr_assert(cb_monotone);
	cr_assert_eq(cb_last, NTHR * PER_THR);
	cr_assert_eq(cb_calls, s.flushes);
	l = open_at(root, NULL, &c, NULL);
	assert_thread_sequences(&c, NTHR, PER_THR);
	dlog_close(l);
	coll_free(&c);
}

Test(dlog, flush_delay_gathers_records)
{
	struct dlog_params p;
	struct dlog_stats s;
	struct dlog *l;

	dlog_params_defaults(&p);
	p.flush_delay_us = 50000;
	l = open_at(root, &p, NULL, NULL);
	append_range(l, 0, 100);
	dlog_get_stats(l, &s);
	cr_assert_lt(s.flushes, 100);
	dlog_close(l);
}

static atomic_uint sync_sleep_us;

static int
slow_sync(void *ctx, enum dlog_io op, uint64_t gen)
{
	(void)ctx;
	(void)gen;
	if (op == DLOG_IO_SYNC)
		usleep(sync_sleep_us);
	return 0;
}

Test(dlog, appenders_wait_at_the_pending_cap)
{
	struct dlog_params p;
	struct dlog_stats s;
	pthread_t th[4];
	struct thr t[4];
	struct coll c = { 0 };
	struct dlog *l;

	sync_sleep_us = 2000;
	dlog_set_io_hook(slow_sync, NULL);
	dlog_params_defaults(&p);
	p.pending_max = 2 * DLOG_REC_MAX;
	l = open_at(root, &p, NULL, NULL);
	for (unsigned i = 0; i < 4; i++) {
		t[i] = (struct thr){ .l = l, .id = i, .n = 300 };
		pthread_create(&th[i], NULL, appender, &t[i]);
	}
	for (unsigned i = 0; i < 4; i++) {
		pthread_join(th[i], NULL);
		cr_assert_null(t[i].bad, "thread %u: %s", i, t[i].bad);
	}
	dlog_get_stats(l, &s);
	cr_assert_gt(s.room_waits, 0);
	dlog_close(l);
	dlog_set_io_hook(NULL, NULL);
	l = open_at(root, NULL, &c, NULL);
	assert_thread_sequences(&c, 4, 300);
	dlog_close(l);
	coll_free(&c);
}

/* ---- durability as a power cut sees it -------------------------------- */

/* The file's bytes at the moment of each fdatasync: what survives a power
 * cut that happens right after it. */
static pthread_mutex_t img_mu = PTHREAD_MUTEX_INITIALIZER;

static int
capture(void *ctx, enum dlog_io op, uint64_t gen)
{
	char p[256];
	struct stat sb;
	uint8_t *b = NULL;
	int fd;

	(void)ctx;
	if (op != DLOG_IO_SYNC)
		return 0;
	path_of(p, sizeof(p), root, gen, "log");
	fd = open(p, O_RDONLY);
	if (fd >= 0 && fstat(fd, &sb) == 0)
		b = malloc((size_t)sb.st_size + 1);
	pthread_mutex_lock(&img_mu);
	if (!b || pread(fd, b, (size_t)sb.st_size, 0) != sb.st_size) {
		img_failed = true;
	} else {
		free(img);
		img = b;
		img_len = (size_t)sb.st_size;
		b = NULL;
	}
	pthread_mutex_unlock(&img_mu);
	free(b);
	if (fd >= 0)
		close(fd);
	return 0;
}

Test(dlog, waited_record_is_in_the_synced_image)
{
	struct dlog *l = open_at(root, NULL, NULL, NULL);

	dlog_close(l);
	dlog_set_io_hook(capture, NULL);
	l = open_at(root, NULL, NULL, NULL);
	for (unsigned i = 0; i < 60; i++) {
		struct dlog_rec r = mk(i);
		struct coll c = { 0 };
		struct dlog_scan_result res;
		uint64_t lsn = dlog_append(l, &r);

		cr_assert_eq(dlog_wait(l, lsn), 0);
		pthread_mutex_lock(&img_mu);
		cr_assert(!img_failed);
		cr_assert_not_null(img, "no fdatasync before the wait");
		cr_assert_eq(dlog_scan_mem(img, img_len, collect, &c, &res),
			     0);
		pthread_mutex_unlock(&img_mu);
		cr_assert_eq(c.n, i + 1, "record %u not in the synced file",
			     i);
		assert_range(&c, 0, 0, i + 1);
		coll_free(&c);
	}
	dlog_close(l);
	dlog_set_io_hook(NULL, NULL);
}

static atomic_int fail_op = -1;
static atomic_int fail_err;

static int
fail_hook(void *ctx, enum dlog_io op, uint64_t gen)
{
	(void)ctx;
	(void)gen;
	return (int)op == fail_op ? fail_err : 0;
}

Test(dlog, fdatasync_failure_is_permanent)
{
	struct dlog *l = open_at(root, NULL, NULL, NULL);
	struct dlog_rec r = mk(1);
	struct dlog_stats s;
	struct coll c = { 0 };
	uint64_t a, b;

	dlog_set_io_hook(fail_hook, NULL);
	a = dlog_append(l, &r);
	cr_assert_eq(dlog_wait(l, a), 0);
	fail_err = -EIO;
	fail_op = DLOG_IO_SYNC;
	b = dlog_append(l, &r);
	cr_assert_gt(b, a);
	cr_assert_eq(dlog_wait(l, b), -EIO);
	cr_assert_eq(dlog_durable(l), a);
	fail_op = -1; /* the disk "recovers": the log must not */
	cr_assert_eq(dlog_append(l, &r), 0);
	cr_assert_eq(dlog_wait(l, a), -EIO);
	cr_assert_eq(dlog_checkpoint(l, NULL, NULL), -EIO);
	dlog_get_stats(l, &s);
	cr_assert_eq(s.error, -EIO);
	dlog_close(l);
	dlog_set_io_hook(NULL, NULL);
	l = open_at(root, NULL, &c, NULL);
	cr_assert_geq(c.n, 1);
	cr_assert(rec_eq(&c.r[0], &r));
	dlog_close(l);
	coll_free(&c);
}

Test(dlog, no_sync_skips_fdatasync)
{
	struct dlog_params p;
	struct dlog_stats s;
	struct dlog *l;

	dlog_params_defaults(&p);
	p.no_sync = true;
	l = open_at(root, &p, NULL, NULL);
	append_range(l, 0, 50);
	dlog_get_stats(l, &s);
	cr_assert_gt(s.flushes, 0);
	cr_assert_eq(s.syncs, 0);
	dlog_close(l);
}

/* ---- crash: torn tails and damage ------------------------------------- */

#define NREC 40

static void
write_log(unsigned n)
{
	struct dlog *l = open_at(root, NULL, NULL, NULL);

	append_range(l, 0, n);
	dlog_close(l);
}

/* Every cut at an 8-byte offset within the last records, with three
 * tails: nothing (size cut), zeros (a preallocated file), garbage (a torn
 * write). The replay is always the prefix of whole records, and appends
 * after it replay right after that prefix (no stale record resurfaces). */
Test(dlog, torn_tail_at_every_8_bytes_replays_a_prefix)
{
	char path[256], dir2[128], path2[256], shm[64] = "";
	size_t n;
	uint8_t *orig;

	write_log(NREC);
	path_of(path, sizeof(path), root, 1, "log");
	orig = slurp(path, &n);
	cr_assert_geq(n, end_of(NREC - 1));
	/* The cuts are about reading a tail, not about durability: on tmpfs
	 * where there is one (hundreds of opens, appends and flushes took
	 * 14 s on the test machine's disk, 21 s under the sanitizers). */
	if (access("/dev/shm", W_OK) == 0)
		fd_test_dir_make(shm, sizeof(shm), "/dev/shm", "dlogcut");
	snprintf(dir2, sizeof(dir2), "%s/crash", shm[0] ? shm : root);
	path_of(path2, sizeof(path2), dir2, 1, "log");
	for (uint64_t cut = end_of(NREC - 6); cut <= end_of(NREC - 1);
	     cut += 8) {
		unsigned whole = 0;
		while (whole < NREC && end_of(whole) <= cut)
			whole++;
		for (int tail = 0; tail < 3; tail++) {
			size_t len = tail == 0 ? cut : n;
			uint8_t *b = malloc(n);
			struct dlog_open_stats st;
			struct coll c = { 0 };
			struct dlog *l;

			memcpy(b, orig, cut);
			memset(b + cut, 0, n - cut);
			if (tail == 2)
				for (size_t k = cut; k < n && k < cut + 3000;
				     k++)
					b[k] = (uint8_t)(k * 131 + 7);
			mkdir(dir2, 0700);
			spit(path2, b, len);
			free(b);
			l = open_at(dir2, NULL, &c, &st);
			cr_assert_eq(c.n, whole, "cut %" PRIu64 " tail %d",
				     cut, tail);
			assert_range(&c, 0, 0, whole);
			cr_assert_eq(st.records_bad, 0);
			cr_assert_eq(st.bytes, whole ? end_of(whole - 1)
						    : end_of(0));
			append_range(l, 1000, 1003);
			dlog_close(l);
			coll_free(&c);
			l = open_at(dir2, NULL, &c, &st);
			cr_assert_eq(c.n, whole + 3);
			assert_range(&c, 0, 0, whole);
			assert_range(&c, whole, 1000, 1003);
			cr_assert_eq(st.records_bad, 0);
			dlog_close(l);
			coll_free(&c);
			fd_test_dir_remove(dir2);
		}
	}
	free(orig);
	if (shm[0])
		fd_test_dir_remove(shm);
}

Test(dlog, corrupt_byte_mid_file_loses_only_that_record)
{
	char path[256];
	size_t n;
	uint8_t *orig;
	const unsigned k = 20;
	uint64_t from = end_of(k - 1), to = end_of(k);

	write_log(NREC);
	path_of(path, sizeof(path), root, 1, "log");
	orig = slurp(path, &n);
	for (uint64_t off = from; off < to; off++) {
		struct dlog_open_stats st;
		struct coll c = { 0 };
		struct dlog *l;

		orig[off] ^= 0x5a;
		spit(path, orig, n);
		orig[off] ^= 0x5a;
		l = open_at(root, NULL, &c, &st);
		cr_assert_eq(c.n, NREC - 1, "byte %" PRIu64, off);
		assert_range(&c, 0, 0, k);
		assert_range(&c, k, k + 1, NREC);
		cr_assert_eq(st.records_bad, 1);
		dlog_close(l);
		coll_free(&c);
	}
	free(orig);
}

Test(dlog, forged_record_in_text_is_not_replayed)
{
	char path[256], text[300];
	uint8_t forged[DLOG_REC_MAX];
	struct dlog_rec f = { .type = DLOG_DELIVERED, .msgid = 666, .rcpt = 0 };
	struct dlog_rec r = { .type = DLOG_DEFERRED, .msgid = 5 };
	struct coll c = { 0 };
	struct dlog_open_stats st;
	size_t n, fl;
	uint8_t *b;
	struct dlog *l = open_at(root, NULL, NULL, NULL);

	/* A remote reply carrying an encoded record at an 8-aligned spot
	 * (the record text starts 8-aligned), sealed with every salt an
	 * attacker could guess without reading the disk. */
	fl = dlog_encode(&f, forged, sizeof(forged));
	memset(text, ' ', sizeof(text));
	memcpy(text + 64, forged, fl);
	r.text = text;
	r.text_len = sizeof(text);
	append_range(l, 0, 3);
	cr_assert_gt(dlog_append(l, &r), 0);
	append_range(l, 3, 6);
	dlog_close(l);
	/* damage the carrying record's header so the scan resyncs inside
	 * its text */
	path_of(path, sizeof(path), root, 1, "log");
	b = slurp(path, &n);
	b[end_of(2) + 20] ^= 1;
	spit(path, b, n);
	free(b);
	l = open_at(root, NULL, &c, &st);
	cr_assert_eq(c.n, 6);
	for (size_t i = 0; i < c.n; i++)
		cr_assert_neq(c.r[i].msgid, 666, "forged record replayed");
	cr_assert_eq(st.records_bad, 1);
	dlog_close(l);
	coll_free(&c);
}

Test(dlog, damaged_header_copy_uses_the_other)
{
	char path[256];
	size_t n;
	uint8_t *b;
	struct coll c = { 0 };
	struct dlog_open_stats st;
	struct dlog *l;

	write_log(10);
	path_of(path, sizeof(path), root, 1, "log");
	b = slurp(path, &n);
	b[10] ^= 0xff;
	spit(path, b, n);
	l = open_at(root, NULL, &c, &st);
	cr_assert_eq(c.n, 10);
	cr_assert_eq(st.files_bad, 0);
	dlog_close(l);
	coll_free(&c);
	/* both copies: the file is set aside, a new log starts */
	b[DLOG_FILE_HDR1_OFF + 10] ^= 0xff;
	spit(path, b, n);
	free(b);
	l = open_at(root, NULL, &c, &st);
	cr_assert_eq(c.n, 0);
	cr_assert_eq(st.files_bad, 1);
	cr_assert_eq(st.generation, 2);
	cr_assert(exists(root, 1, "bad"));
	cr_assert(!exists(root, 1, "log"));
	dlog_close(l);
}

/* The two header copies are a block apart: a first block lost whole
 * (read back as zeros, or unreadable) leaves copy 1, and the log replays.
 * With both copies in the first sector it was set aside and the log
 * restarted empty (every finished delivery repeated). */
Test(dlog, a_lost_first_block_leaves_the_header_copy_in_the_second)
{
	char path[256];
	size_t n;
	uint8_t *b;
	struct coll c = { 0 };
	struct dlog_open_stats st;
	struct dlog *l;

	write_log(10);
	path_of(path, sizeof(path), root, 1, "log");
	b = slurp(path, &n);
	cr_assert_gt(n, DLOG_FILE_DATA_OFF);
	for (unsigned k = 0; k < 2; k++) {
		if (k == 0) {
			memset(b, 0, DLOG_FILE_HDR1_OFF);
			spit(path, b, n);
		} else {
			block0_eio = 1;
		}
		l = open_at(root, NULL, &c, &st);
		block0_eio = 0;
		cr_assert_eq(c.n, 10, "pass %u", k);
		assert_range(&c, 0, 0, 10);
		cr_assert_eq(st.files_bad, 0);
		cr_assert(exists(root, 1, "log"));
		dlog_close(l);
		coll_free(&c);
		memset(&c, 0, sizeof(c));
	}
	free(b);
}

Test(dlog, damaged_checkpoint_end_keeps_the_only_file)
{
	char path[256];
	size_t n;
	uint8_t *b;
	struct coll c = { 0 };
	struct dlog_open_stats st;
	struct dlog *l;

	write_log(10);
	path_of(path, sizeof(path), root, 1, "log");
	b = slurp(path, &n);
	b[DLOG_FILE_DATA_OFF + DLOG_REC_HDR_LEN + 30] ^= 1; /* in END */
	spit(path, b, n);
	free(b);
	l = open_at(root, NULL, &c, &st);
	cr_assert(!st.complete);
	cr_assert_eq(c.n, 10);
	cr_assert_eq(st.records_bad, 1);
	cr_assert_eq(st.generation, 1);
	dlog_close(l);
	coll_free(&c);
}

/* ---- checkpoint ------------------------------------------------------- */

/* The state of the tests below: the last record per message id. */
struct state {
	struct dlog_rec last[16];
	bool have[16];
	struct dlog *l; /* append from inside the snapshot (misuse) */
	int fail;       /* return this from the snapshot */
};

static int
snap_state(void *ctx, dlog_emit_fn emit, void *ectx)
{
	struct state *s = ctx;

	if (s->l) {
		struct dlog_rec r = mk(0);
		cr_assert_eq(dlog_append(s->l, &r), 0);
	}
	for (unsigned i = 0; i < 16; i++) {
		int rc;
		if (!s->have[i])
			continue;
		rc = emit(ectx, &s->last[i]);
		if (rc)
			return rc;
	}
	return s->fail;
}

static void
state_append(struct dlog *l, struct state *s, unsigned from, unsigned to)
{
	for (unsigned i = from; i < to; i++) {
		struct dlog_rec r = mk(i);
		r.msgid = i % 16;
		r.text_len = 0;
		r.text = NULL;
		s->last[i % 16] = r;
		s->have[i % 16] = true;
		cr_assert_eq(dlog_wait(l, dlog_append(l, &r)), 0);
	}
}

static void
assert_state_then(const struct coll *c, const struct state *s,
		  unsigned from, unsigned to)
{
	size_t k = 0;

	for (unsigned i = 0; i < 16; i++)
		if (s->have[i]) {
			cr_assert(rec_eq(&c->r[k], &s->last[i]));
			k++;
		}
	cr_assert_eq(c->n, k + (to - from));
	for (unsigned i = from; i < to; i++) {
		struct dlog_rec r = mk(i);
		r.msgid = i % 16;
		r.text_len = 0;
		r.text = NULL;
		cr_assert(rec_eq(&c->r[k + i - from], &r), "append %u", i);
	}
}

Test(dlog, checkpoint_then_appends_replay_snapshot_and_appends_only)
{
	struct state s = { 0 };
	struct coll c = { 0 };
	struct dlog_open_stats st;
	struct dlog_stats ds;
	struct dlog_params p;
	struct dlog *l;

	dlog_params_defaults(&p);
	p.rotate_bytes = 2048;
	l = open_at(root, &p, NULL, NULL);
	cr_assert(!dlog_want_checkpoint(l));
	state_append(l, &s, 0, 100);
	cr_assert(dlog_want_checkpoint(l));
	cr_assert_eq(dlog_checkpoint(l, snap_state, &s), 0);
	struct state at = s; /* what the snapshot holds */
	cr_assert(!dlog_want_checkpoint(l));
	cr_assert(!exists(root, 1, "log"), "old file kept");
	cr_assert(exists(root, 2, "log"));
	cr_assert_eq(count_files(root), 1);
	state_append(l, &s, 100, 105);
	dlog_get_stats(l, &ds);
	cr_assert_eq(ds.checkpoints, 1);
	cr_assert_eq(ds.generation, 2);
	cr_assert_eq(ds.durable_lsn, 105);
	dlog_close(l);

	l = open_at(root, NULL, &c, &st);
	cr_assert(st.checkpoint_used && st.complete);
	cr_assert_eq(st.generation, 2);
	cr_assert_eq(st.files, 1);
	cr_assert_eq(st.records, 16 + 5);
	assert_state_then(&c, &at, 100, 105);
	dlog_close(l);
	coll_free(&c);

	/* the measure is the checkpoint's size, also after a reopen */
	l = open_at(root, &p, NULL, NULL);
	cr_assert(!dlog_want_checkpoint(l));
	state_append(l, &s, 105, 205);
	cr_assert(dlog_want_checkpoint(l));
	dlog_close(l);
	l = open_at(root, &p, NULL, NULL);
	cr_assert(dlog_want_checkpoint(l));
	dlog_close(l);
}

Test(dlog, failed_snapshot_keeps_old_file)
{
	struct state s = { .fail = -EIO };
	struct coll c = { 0 };
	struct dlog *l = open_at(root, NULL, NULL, NULL);

	append_range(l, 0, 20);
	cr_assert_eq(dlog_checkpoint(l, snap_state, &s), -EIO);
	cr_assert(exists(root, 1, "log"));
	cr_assert_eq(count_files(root), 1, "temporary file left behind");
	append_range(l, 20, 30);
	dlog_close(l);
	l = open_at(root, NULL, &c, NULL);
	cr_assert_eq(c.n, 30);
	assert_range(&c, 0, 0, 30);
	dlog_close(l);
	coll_free(&c);
}

Test(dlog, snapshot_cannot_append_or_emit_internal_records)
{
	struct state s = { 0 };
	struct coll c = { 0 };
	struct dlog *l = open_at(root, NULL, NULL, NULL);

	state_append(l, &s, 0, 20);
	s.l = l;
	cr_assert_eq(dlog_checkpoint(l, snap_state, &s), 0);
	s.l = NULL;
	s.last[3].type = DLOG_CKPT_END;
	cr_assert_eq(dlog_checkpoint(l, snap_state, &s), -EINVAL);
	cr_assert(exists(root, 2, "log"));
	dlog_close(l);
	l = open_at(root, NULL, &c, NULL);
	cr_assert_eq(c.n, 16);
	dlog_close(l);
	coll_free(&c);
}

static char ops[64][48];
static atomic_uint nops;

static int
record_ops(void *ctx, enum dlog_io op, uint64_t gen)
{
	unsigned i = nops++;

	(void)ctx;
	if (i < 64)
		snprintf(ops[i], sizeof(ops[i]), "%s:%" PRIu64,
			 dlog_io_name(op), gen);
	return 0;
}

static int
find_op(const char *s)
{
	for (unsigned i = 0; i < nops && i < 64; i++)
		if (strcmp(ops[i], s) == 0)
			return (int)i;
	return -1;
}

Test(dlog, checkpoint_is_durable_before_old_files_go)
{
	struct state s = { 0 };
	struct dlog *l = open_at(root, NULL, NULL, NULL);
	int sync_new, ren, sdir, unl;

	state_append(l, &s, 0, 30);
	dlog_set_io_hook(record_ops, NULL);
	cr_assert_eq(dlog_checkpoint(l, snap_state, &s), 0);
	dlog_set_io_hook(NULL, NULL);
	sync_new = find_op("sync_new:2");
	ren = find_op("rename:2");
	sdir = find_op("sync_dir:2");
	unl = find_op("unlink:1");
	cr_assert(sync_new >= 0 && ren >= 0 && sdir >= 0 && unl >= 0);
	cr_assert_lt(sync_new, ren, "renamed before its data was durable");
	cr_assert_lt(ren, sdir);
	cr_assert_lt(sdir, unl, "old file deleted before the new one is "
				"durable");
	dlog_close(l);
}

Test(dlog, checkpoint_sync_failure_keeps_old_file)
{
	struct state s = { 0 };
	struct coll c = { 0 };
	struct dlog *l = open_at(root, NULL, NULL, NULL);

	state_append(l, &s, 0, 30);
	dlog_set_io_hook(fail_hook, NULL);
	fail_err = -EIO;
	for (int op = DLOG_IO_SYNC_NEW; op <= DLOG_IO_RENAME; op++) {
		fail_op = op;
		cr_assert_eq(dlog_checkpoint(l, snap_state, &s), -EIO);
		cr_assert(exists(root, 1, "log"), "old file gone (%d)", op);
		cr_assert_eq(count_files(root), 1);
	}
	fail_op = -1;
	/* the log is still usable on the old file */
	state_append(l, &s, 30, 35);
	dlog_close(l);
	dlog_set_io_hook(NULL, NULL);
	l = open_at(root, NULL, &c, NULL);
	cr_assert_eq(c.n, 35);
	dlog_close(l);
	coll_free(&c);
}

Test(dlog, checkpoint_dir_sync_failure_fails_the_log)
{
	struct state s = { 0 };
	struct coll c = { 0 };
	struct dlog_open_stats st;
	struct dlog_rec r = mk(1);
	struct dlog *l = open_at(root, NULL, NULL, NULL);

	state_append(l, &s, 0, 30);
	dlog_set_io_hook(fail_hook, NULL);
	fail_err = -EIO;
	fail_op = DLOG_IO_SYNC_DIR;
	cr_assert_eq(dlog_checkpoint(l, snap_state, &s), -EIO);
	cr_assert_eq(dlog_append(l, &r), 0);
	fail_op = -1;
	dlog_close(l);
	dlog_set_io_hook(NULL, NULL);
	/* whichever file survived is complete; here both did */
	l = open_at(root, NULL, &c, &st);
	cr_assert_eq(st.generation, 2);
	cr_assert_eq(st.files_removed, 1);
	assert_state_then(&c, &s, 0, 0);
	dlog_close(l);
	coll_free(&c);
}

/* Gen 1 complete with 10 records; a newer file holds CKPT_BEGIN and state
 * records but no CKPT_END, as a checkpoint cut short would leave it. */
/* A newer .log without its checkpoint's end cannot come from a crash
 * (files are renamed into place complete): it is damage, and may hold
 * outcomes appended after its checkpoint. The complete older file is
 * replayed; the newer one is set aside as .bad for the operator, never
 * deleted (it was deleted with whatever it held). */
Test(dlog, incomplete_newer_checkpoint_is_ignored_and_set_aside)
{
	uint8_t b[DLOG_FILE_DATA_OFF + 8 * DLOG_REC_MAX];
	struct dlog_file_hdr h = { .generation = 2, .prev_generation = 1,
				   .created_us = 1, .salt = 77 };
	struct dlog_rec begin = { .type = DLOG_CKPT_BEGIN, .msgid = 2,
				  .aux = 1 };
	struct coll c = { 0 };
	struct dlog_open_stats st;
	char path[256];
	size_t n = DLOG_FILE_DATA_OFF;
	struct dlog *l;

	write_log(10);
	memset(b, 0, DLOG_FILE_DATA_OFF);
	dlog_file_hdr_encode(&h, b);
	memcpy(b + DLOG_FILE_HDR1_OFF, b, DLOG_FILE_HDR_LEN);
	n += dlog_encode_salted(&begin, 77, b + n, sizeof(b) - n);
	for (unsigned i = 0; i < 3; i++) {
		struct dlog_rec r = mk(500 + i);
		n += dlog_encode_salted(&r, 77, b + n, sizeof(b) - n);
	}
	path_of(path, sizeof(path), root, 2, "log");
	spit(path, b, n);
	l = open_at(root, NULL, &c, &st);
	cr_assert_eq(st.files, 2);
	cr_assert_eq(st.generation, 1);
	cr_assert_eq(st.files_removed, 0);
	cr_assert_eq(st.files_bad, 1);
	cr_assert(st.complete);
	cr_assert_eq(c.n, 10);
	assert_range(&c, 0, 0, 10);
	cr_assert(!exists(root, 2, "log"));
	cr_assert(exists(root, 2, "bad"), "the damaged newer file is gone");
	/* the next checkpoint does not reuse the abandoned generation's
	 * number or contents */
	cr_assert_eq(dlog_checkpoint(l, NULL, NULL), 0);
	dlog_close(l);
	cr_assert_eq(count_files(root), 2); /* the new .log and the .bad */
	cr_assert(exists(root, 2, "bad"));
	coll_free(&c);
	l = open_at(root, NULL, &c, &st);
	cr_assert_eq(c.n, 0);
	cr_assert(st.generation >= 2);
	dlog_close(l);
}

Test(dlog, leftover_older_and_tmp_files_are_removed)
{
	char p1[256], tmp[256];
	size_t n;
	uint8_t *old;
	struct state s = { 0 };
	struct coll c = { 0 };
	struct dlog_open_stats st;
	struct dlog *l = open_at(root, NULL, NULL, NULL);

	state_append(l, &s, 0, 20);
	path_of(p1, sizeof(p1), root, 1, "log");
	old = slurp(p1, &n);
	cr_assert_eq(dlog_checkpoint(l, snap_state, &s), 0);
	struct state at = s;
	state_append(l, &s, 20, 25);
	dlog_close(l);
	/* a crash between the rename and the unlink; and a creation cut
	 * short */
	spit(p1, old, n);
	free(old);
	path_of(tmp, sizeof(tmp), root, 3, "tmp");
	spit(tmp, "partial", 7);
	l = open_at(root, NULL, &c, &st);
	cr_assert_eq(st.generation, 2);
	cr_assert_eq(st.files_removed, 1);
	assert_state_then(&c, &at, 20, 25);
	cr_assert(!exists(root, 1, "log"));
	cr_assert(!exists(root, 3, "tmp"));
	cr_assert_eq(count_files(root), 1);
	/* generations never go back, even over a removed .tmp */
	cr_assert_eq(dlog_checkpoint(l, snap_state, &s), 0);
	cr_assert(exists(root, 4, "log"));
	dlog_close(l);
	coll_free(&c);
}

/* Appenders keep a per-thread count under their own lock (the documented
 * discipline) while the main thread checkpoints repeatedly: replaying
 * snapshot + appends must rebuild exactly the final counts. */
static int
snap_counts(void *ctx, dlog_emit_fn emit, void *ectx)
{
	const unsigned *cnt = ctx;

	for (unsigned i = 0; i < 4; i++) {
		struct dlog_rec r = { .type = DLOG_NOTE, .msgid = 100 + i,
				      .aux = cnt[i] };
		int rc = emit(ectx, &r);
		if (rc)
			return rc;
	}
	return 0;
}

Test(dlog, checkpoints_during_concurrent_appends_lose_nothing)
{
	static unsigned cnt[4];
	pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
	pthread_t th[4];
	struct thr t[4];
	struct coll c = { 0 };
	unsigned rebuilt[4] = { 0 };
	struct dlog *l = open_at(root, NULL, NULL, NULL);

	for (unsigned i = 0; i < 4; i++) {
		t[i] = (struct thr){ .l = l, .id = i, .n = 300, .wait = true,
				     .mu = &mu, .state = &cnt[i] };
		pthread_create(&th[i], NULL, appender, &t[i]);
	}
	for (unsigned k = 0; k < 5; k++) {
		usleep(2000);
		pthread_mutex_lock(&mu);
		cr_assert_eq(dlog_checkpoint(l, snap_counts, cnt), 0);
		pthread_mutex_unlock(&mu);
	}
	for (unsigned i = 0; i < 4; i++) {
		pthread_join(th[i], NULL);
		cr_assert_null(t[i].bad, "thread %u: %s", i, t[i].bad);
	}
	dlog_close(l);
	l = open_at(root, NULL, &c, NULL);
	for (size_t i = 0; i < c.n; i++) {
		const struct dlog_rec *r = &c.r[i];
		if (r->type == DLOG_NOTE) {
			rebuilt[r->msgid - 100] = (unsigned)r->aux;
			continue;
		}
		cr_assert_eq(r->attempts, rebuilt[r->msgid],
			     "thread %" PRIu64, r->msgid);
		rebuilt[r->msgid]++;
	}
	for (unsigned i = 0; i < 4; i++)
		cr_assert_eq(rebuilt[i], 300);
	dlog_close(l);
	coll_free(&c);
}

static uint64_t
mono_ms(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000u + (uint64_t)t.tv_nsec / 1000000u;
}

/* Lazy records (delivery results) do not start a flush of their own: the
 * next ordinary append's flush carries them. */
Test(dlog, lazy_records_wait_for_the_next_flush)
{
	struct dlog_params p;
	struct dlog *l;
	struct dlog_rec r1 = mk(1), r2 = mk(2);
	uint64_t a, b;

	dlog_params_defaults(&p);
	p.lazy_delay_us = 30ull * 1000000; /* longer than the test */
	l = open_at(root, &p, NULL, NULL);
	a = dlog_append_lazy(l, &r1);
	cr_assert_gt(a, 0);
	usleep(200 * 1000);
	cr_assert_lt(dlog_durable(l), a, "a lazy record alone was flushed");
	b = dlog_append(l, &r2);
	cr_assert_eq(dlog_wait(l, b), 0);
	cr_assert_geq(dlog_durable(l), a);
	dlog_close(l);
}

/* Waiting for a lazy record flushes it at once, not after the delay. */
Test(dlog, waiting_for_a_lazy_record_flushes_it)
{
	struct dlog_params p;
	struct dlog *l;
	struct dlog_rec r = mk(1);
	uint64_t a, t0;

	dlog_params_defaults(&p);
	p.lazy_delay_us = 30ull * 1000000;
	l = open_at(root, &p, NULL, NULL);
	a = dlog_append_lazy(l, &r);
	t0 = mono_ms();
	cr_assert_eq(dlog_wait(l, a), 0);
	cr_assert_lt(mono_ms() - t0, 10000, "the wait sat out the lazy delay");
	dlog_close(l);
}

/* Alone, a lazy record is flushed after the delay. */
Test(dlog, lazy_record_alone_is_flushed_after_the_delay)
{
	struct dlog_params p;
	struct dlog *l;
	struct dlog_rec r = mk(1);
	uint64_t a, t0;

	dlog_params_defaults(&p);
	p.lazy_delay_us = 50 * 1000;
	l = open_at(root, &p, NULL, NULL);
	a = dlog_append_lazy(l, &r);
	t0 = mono_ms();
	while (dlog_durable(l) < a && mono_ms() - t0 < 20000)
		usleep(5 * 1000);
	cr_assert_geq(dlog_durable(l), a, "never flushed");
	dlog_close(l);
}

/* ---- a full filesystem ------------------------------------------------ */

static atomic_bool space_full;
static atomic_int space_refusals;

static int
space_hook(void *ctx, enum dlog_io op, uint64_t gen)
{
	(void)ctx;
	(void)gen;
	if ((op == DLOG_IO_WRITE || op == DLOG_IO_GROW) &&
	    atomic_load(&space_full)) {
		if (op == DLOG_IO_WRITE)
			atomic_fetch_add(&space_refusals, 1);
		return -ENOSPC;
	}
	return 0;
}

struct waiter {
	struct dlog *l;
	uint64_t lsn;
	int rc;
};

static void *
wait_main(void *arg)
{
	struct waiter *w = arg;

	w->rc = dlog_wait(w->l, w->lsn);
	return NULL;
}

/* A batch refused for want of space is not a failure: it waits, delivery
 * with it, and goes in once there is room, written once, in order. */
Test(dlog, write_refused_for_space_waits_and_then_goes_in)
{
	struct dlog_params p;
	struct dlog *l;
	struct dlog_stats s;
	struct coll c = { 0 };
	struct waiter w;
	pthread_t th;

	dlog_params_defaults(&p);
	p.rotate_bytes = 1; /* a checkpoint would be wanted at once */
	l = open_at(root, &p, NULL, NULL);
	append_range(l, 0, 20);
	dlog_set_io_hook(space_hook, NULL);
	atomic_store(&space_full, true);
	append_range_nowait(l, 20, 40);
	w = (struct waiter){.l = l, .lsn = 40};
	cr_assert_eq(pthread_create(&th, NULL, wait_main, &w), 0);
	for (int i = 0; i < 200 && atomic_load(&space_refusals) < 2; i++)
		usleep(10000);
	dlog_get_stats(l, &s);
	cr_assert_geq(atomic_load(&space_refusals), 2,
		      "the batch is tried again (every second)");
	cr_assert(s.no_space, "the log says it waits for space");
	cr_assert_geq(s.space_waits, 2);
	cr_assert_eq(s.error, 0, "a full disk does not fail the log");
	cr_assert_eq(dlog_durable(l), 20);
	cr_assert(!dlog_want_checkpoint(l), "no checkpoint while full");
	atomic_store(&space_full, false);
	pthread_join(th, NULL);
	cr_assert_eq(w.rc, 0, "the waiter gets its record once there is room");
	dlog_get_stats(l, &s);
	cr_assert(!s.no_space);
	cr_assert_eq(s.error, 0);
	append_range(l, 40, 60);
	dlog_close(l);
	dlog_set_io_hook(NULL, NULL);
	l = open_at(root, NULL, &c, NULL);
	cr_assert_eq(c.n, 60, "each record once: %zu", c.n);
	assert_range(&c, 0, 0, 60);
	dlog_close(l);
	coll_free(&c);
}

/* No room to grow the file ahead is no error: records still go in. */
Test(dlog, growth_refused_for_space_is_not_an_error)
{
	struct dlog *l = open_at(root, NULL, NULL, NULL);
	struct dlog_stats s;
	struct coll c = { 0 };
	unsigned n = 0;

	/* Refuse growth only: the records' own writes go in. */
	dlog_set_io_hook(fail_hook, NULL);
	fail_op = DLOG_IO_GROW;
	fail_err = -ENOSPC;
	do { /* past the first preallocated MiB */
		append_range(l, n, n + 500);
		n += 500;
		dlog_get_stats(l, &s);
	} while (s.file_bytes < (3u << 20) / 2);
	fail_op = -1;
	cr_assert_gt(s.grow_failed, 0, "growth was tried and refused");
	cr_assert_eq(s.error, 0);
	cr_assert_eq(dlog_durable(l), n);
	dlog_close(l);
	dlog_set_io_hook(NULL, NULL);
	l = open_at(root, NULL, &c, NULL);
	cr_assert_eq(c.n, n);
	assert_range(&c, 0, 0, n);
	dlog_close(l);
	coll_free(&c);
}

/* Any other write error still fails the log for good. */
Test(dlog, write_error_other_than_space_is_permanent)
{
	struct dlog *l = open_at(root, NULL, NULL, NULL);
	struct dlog_rec r = mk(3);
	uint64_t a;

	append_range(l, 0, 5);
	dlog_set_io_hook(fail_hook, NULL);
	fail_op = DLOG_IO_WRITE;
	fail_err = -EIO;
	a = dlog_append(l, &r);
	cr_assert_eq(dlog_wait(l, a), -EIO);
	fail_op = -1;
	cr_assert_eq(dlog_append(l, &r), 0);
	dlog_close(l);
}

/* Stopping while a batch waits for space ends the wait at once. */
Test(dlog, close_while_waiting_for_space_returns)
{
	struct dlog *l = open_at(root, NULL, NULL, NULL);
	struct coll c = { 0 };
	struct timespec t0, t1;

	append_range(l, 0, 10);
	dlog_set_io_hook(space_hook, NULL);
	atomic_store(&space_full, true);
	append_range_nowait(l, 10, 20);
	for (int i = 0; i < 200 && atomic_load(&space_refusals) < 1; i++)
		usleep(10000);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	dlog_close(l);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	cr_assert_lt(t1.tv_sec - t0.tv_sec, 3, "close waited for space");
	atomic_store(&space_full, false);
	dlog_set_io_hook(NULL, NULL);
	l = open_at(root, NULL, &c, NULL);
	cr_assert_geq(c.n, 10, "what was durable stays");
	assert_range(&c, 0, 0, 10);
	dlog_close(l);
	coll_free(&c);
}

/* An open that fails after replaying a file (its torn tail could not be
 * cut: the fdatasync failed) leaves no descriptor open: a caller that
 * retries opens leaked one each time. */
static int
open_fds(void)
{
	DIR *d = opendir("/proc/self/fd");
	struct dirent *e;
	int n = 0;

	cr_assert_not_null(d);
	while ((e = readdir(d)))
		n++;
	closedir(d);
	return n;
}

Test(dlog, a_failed_open_leaks_no_descriptor)
{
	char path[256];
	uint8_t junk[8] = "garbage!";
	int before, err = 0;
	struct dlog *l;
	size_t n;
	uint8_t *b;

	write_log(3);
	path_of(path, sizeof(path), root, 1, "log");
	b = slurp(path, &n);
	free(b);
	fail_err = -EIO;
	fail_op = DLOG_IO_SYNC;
	dlog_set_io_hook(fail_hook, NULL);
	for (int i = 0; i < 3; i++) {
		/* a torn tail, which the open cuts and syncs */
		int fd = open(path, O_WRONLY | O_CLOEXEC);
		cr_assert_geq(fd, 0);
		cr_assert_eq(pwrite(fd, junk, sizeof(junk),
				    (off_t)end_of(2) + 16),
			     (ssize_t)sizeof(junk));
		close(fd);
		before = open_fds();
		l = dlog_open(root, NULL, NULL, NULL, NULL, &err);
		cr_assert_null(l, "the open did not fail");
		cr_assert_eq(err, -EIO);
		cr_assert_eq(open_fds(), before, "open %d left a descriptor",
			     i);
	}
	dlog_set_io_hook(NULL, NULL);
	fail_op = -1;
}

/* A file of the first layout (both copies in 128 bytes, records from 128)
 * replays, copy 1 at 64 included; appends go on in it, and the next
 * checkpoint writes the current layout. */
Test(dlog, a_version1_file_replays_and_its_checkpoint_is_version2)
{
	uint8_t b[DLOG_FILE_V1_DATA_OFF + 16 * DLOG_REC_MAX];
	struct dlog_file_hdr h = { .version = 1, .generation = 1,
				   .created_us = 1, .salt = 99 }, d;
	struct dlog_rec mark = { .type = DLOG_CKPT_BEGIN, .msgid = 1,
				 .rcpt = DLOG_ALL };
	struct coll c = { 0 };
	struct dlog_open_stats st;
	struct state s = { 0 };
	char path[256];
	size_t n = DLOG_FILE_V1_DATA_OFF, got;
	uint8_t *f;
	struct dlog *l;

	memset(b, 0, sizeof(b));
	dlog_file_hdr_encode(&h, b);
	memcpy(b + DLOG_FILE_V1_HDR1_OFF, b, DLOG_FILE_HDR_LEN);
	b[10] ^= 0xff; /* copy 0 damaged: copy 1 at 64 is the one */
	n += dlog_encode_salted(&mark, 99, b + n, sizeof(b) - n);
	mark.type = DLOG_CKPT_END;
	n += dlog_encode_salted(&mark, 99, b + n, sizeof(b) - n);
	for (unsigned i = 0; i < 6; i++) {
		struct dlog_rec r = mk(i);
		n += dlog_encode_salted(&r, 99, b + n, sizeof(b) - n);
	}
	path_of(path, sizeof(path), root, 1, "log");
	spit(path, b, n + DLOG_REC_MAX); /* zeros after, as preallocated */
	l = open_at(root, NULL, &c, &st);
	cr_assert_eq(c.n, 6);
	assert_range(&c, 0, 0, 6);
	cr_assert(st.complete);
	cr_assert_eq(st.files_bad, 0);
	append_range(l, 6, 9);
	cr_assert_eq(dlog_checkpoint(l, snap_state, &s), 0);
	dlog_close(l);
	coll_free(&c);

	path_of(path, sizeof(path), root, 2, "log");
	f = slurp(path, &got);
	cr_assert_gt(got, DLOG_FILE_DATA_OFF);
	cr_assert_eq(dlog_file_hdr_decode(f, got, &d), DLOG_DEC_OK);
	cr_assert_eq(d.version, 2);
	cr_assert_eq(memcmp(f, f + DLOG_FILE_HDR1_OFF, DLOG_FILE_HDR_LEN),
		     0, "copy 1 a block on");
	for (size_t k = DLOG_FILE_HDR_LEN; k < DLOG_FILE_DATA_OFF; k++)
		if (k < DLOG_FILE_HDR1_OFF ||
		    k >= DLOG_FILE_HDR1_OFF + DLOG_FILE_HDR_LEN)
			cr_assert_eq(f[k], 0, "byte %zu", k);
	cr_assert_eq(memcmp(f + DLOG_FILE_DATA_OFF, "FDDL", 4), 0);
	free(f);
}
