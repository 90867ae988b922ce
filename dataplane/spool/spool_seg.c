/*
 * The segment preparer: one thread per spool that keeps `spares` segment
 * files ready, so the worker never creates, extends or zeroes a file on the
 * hot path (appending writes are metadata to make durable with each
 * flush).
 *
 * Preparing a segment: write zeros over the whole file (new; a leftover of
 * unknown state all but block 0, which keeps its old header until the new
 * one replaces it), or with spool_prepare = fallocate reserve it as
 * unwritten extents (where that is cheap: spool_prepare_fallocate() in
 * spool.h says where), then block 0 with a fresh header (new random epoch,
 * next use sequence), fsync the file and, for a new file, its directory.
 * A leftover segment whose header is valid and whose walk finds no valid
 * record (a spare of an earlier run, or one whose only batches were torn)
 * only gets a new header: its old bytes cannot validate under a new epoch.
 * Segments holding valid records are sealed: never touched here (reclaiming
 * them is the control plane's job once their messages are delivered).
 * A leftover whose header does not decode is sealed too as soon as any
 * intact record of any epoch is found in it (issue 10: a flipped byte in
 * block 0 made such a segment a spare, and its acknowledged messages were
 * overwritten); the reader salvages what it can (control/spool_reader.c).
 * Only a header-less file without a single intact record is remade.
 *
 * The segment list (spool_ledger.h): the preparer keeps wNN/segments naming
 * every segment file it knows, written after a new file is durable and
 * before a file is deleted, so that recovery can tell a segment deleted
 * behind our back from one we reclaimed.
 *
 * Hand-over: a mutex-protected FIFO the worker pops at segment switches
 * (rare: not the hot path). The epoch lives only in the file and in memory;
 * it is never logged.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include "finaldot/fsync.h"
#include "finaldot/log.h"
#include "finaldot/msgid.h"
#include "finaldot/seam.h"
#include "finaldot/spool_format.h"
#include "spool_ledger.h"
#include "spool_seg.h"

/*
 * Zeroing (issue 9: the preparer must not compete with the flushes the
 * clients wait for). Zeros go O_DIRECT, so no flood of dirty pages meets
 * a flush in the page cache's writeback or in the final fsync, in chunks
 * of ZERO_CHUNK, so that one of them ahead of a flush in the device's
 * queue delays it by little. And politely: while at least one spare is
 * ready, each chunk first waits (up to ZERO_YIELD_US) for the worker's
 * flushes in flight to complete; with none ready the worker needs the
 * segment more than any flush needs the disk, and zeroing goes at full
 * speed.
 */
#define ZERO_CHUNK (256u << 10)
#define ZERO_YIELD_US 2000
#define ZERO_POLL_US 100

static uint64_t
min_u64(uint64_t a, uint64_t b)
{
	return a < b ? a : b;
}

struct cand {
	uint64_t file_no;
	bool rezero;
	unsigned fails; /* prepare() failures: abandoned at 3 */
};

/* A line of the segment list. */
struct led {
	uint64_t file_no;
	uint64_t use_seq;
};

/* A segment handed back by the control plane (spool_prep_recycle()). */
struct recyc {
	uint64_t file_no;
	uint64_t use_seq;
};

struct spool_prep {
	char wdir[4096];
	unsigned worker;
	uint64_t seg_size;
	unsigned spares;
	uint64_t max_segments;
	uint64_t min_free;
	bool no_space;
	bool reserve_hit; /* the last new segment was refused for min_free */
	int logged_err;   /* the failure last logged, and when (monotonic) */
	uint64_t logged_us;
	bool no_dirsync; /* test mutant "no-dirsync" (issue 10) */
	bool falloc;     /* new segments by fallocate(), not zeros */
	bool made_one;   /* a segment was prepared since the start */

	pthread_t thr;
	pthread_mutex_t mu;
	pthread_cond_t cv;
	bool stop;
	int err;                 /* last failure, 0 once a spare was made */
	struct spool_seg *head, *tail;
	_Atomic unsigned ready;
	_Atomic uint64_t published;
	int wake_fd;             /* eventfd of the worker, or -1 */
	struct recyc *rq, *rdone; /* requests, and finished ones to report */
	size_t n_rq, cap_rq, n_rdone, cap_rdone;
	_Atomic unsigned rdone_n;

	/* preparer thread only */
	struct cand *cands;
	size_t n_cands;
	struct led *led;
	size_t n_led, cap_led;
	uint64_t next_file_no;
	uint64_t next_use_seq;
	uint64_t n_files;
	uint8_t *zeros;          /* ZERO_CHUNK, aligned for O_DIRECT */
	/* the worker's flushes in flight (spool_prep_flights()) */
	_Atomic unsigned flights;
	uint64_t zero_waits_us;  /* time zeroing gave way, for the log */
	_Atomic unsigned slow_ms; /* test seam: "prep-slow:MS" */
};

#ifdef FINALDOT_FAULT_INJECTION
void
spool_prep_set_slow(struct spool_prep *pp, unsigned ms)
{
	atomic_store(&pp->slow_ms, ms);
}
#endif

void
spool_prep_flights(struct spool_prep *pp, unsigned n)
{
	if (pp)
		atomic_store_explicit(&pp->flights, n, memory_order_relaxed);
}

/* Before a chunk of zeros: give way to the worker's flushes (above). */
static void
zero_yield(struct spool_prep *pp)
{
	struct timespec ts = {.tv_nsec = ZERO_POLL_US * 1000};
	unsigned waited = 0;

	while (waited < ZERO_YIELD_US &&
	       atomic_load_explicit(&pp->ready, memory_order_relaxed) > 0 &&
	       atomic_load_explicit(&pp->flights, memory_order_relaxed) > 0) {
		nanosleep(&ts, NULL);
		waited += ZERO_POLL_US;
	}
	pp->zero_waits_us += waited;
}

static int pwrite_all(int fd, const void *p, size_t n, uint64_t off);

/* Zeros over [from, size) of the file at path (from a multiple of
 * SPOOL_BLOCK), O_DIRECT where the filesystem has it (buffered otherwise:
 * the fsync that follows covers both). 0 or -errno. */
static int
zero_file(struct spool_prep *pp, const char *path, int fd, uint64_t from)
{
	int dfd = open(path, O_WRONLY | O_DIRECT | O_CLOEXEC);
	int wfd = dfd >= 0 ? dfd : fd;
	int r = 0;

	for (uint64_t off = from; off < pp->seg_size && !r; off += ZERO_CHUNK) {
		size_t n = (size_t)min_u64(ZERO_CHUNK, pp->seg_size - off);

		zero_yield(pp);
#ifdef FINALDOT_FAULT_INJECTION
		unsigned slow = atomic_load(&pp->slow_ms);
		if (slow) {
			struct timespec ts = {.tv_sec = slow / 1000,
					      .tv_nsec = (slow % 1000) * 1000000L};
			nanosleep(&ts, NULL);
		}
#endif
		r = pwrite_all(wfd, pp->zeros, n, off);
	}
	if (dfd >= 0)
		close(dfd);
	return r;
}

/*
 * The whole file as unwritten extents (spool_prepare = fallocate): blocks
 * reserved, nothing written; they read as zeros until written. Where the
 * filesystem has no fallocate, says so once and leaves pp->falloc off:
 * -EOPNOTSUPP, and the caller writes zeros. 0 or -errno (-ENOSPC: no room,
 * as the zeros would have found).
 */
static int
alloc_file(struct spool_prep *pp, int fd)
{
	if (fallocate(fd, 0, 0, (off_t)pp->seg_size) == 0)
		return 0;
	if (errno != EOPNOTSUPP && errno != ENOSYS)
		return -errno;
	fd_log(FD_LOG_WARN, "spool",
	       "event=fallocate_unsupported worker=%u fallback=zero",
	       pp->worker);
	pp->falloc = false;
	return -EOPNOTSUPP;
}

void
spool_seg_free(struct spool_seg *s)
{
	if (!s)
		return;
	if (s->fd >= 0)
		close(s->fd);
	free(s);
}

static void
seg_path(const struct spool_prep *pp, uint64_t no, char *buf, size_t len)
{
	snprintf(buf, len, "%s/%08" PRIx64 ".seg", pp->wdir, no);
}

static int
stop_at_first(void *ctx, const struct spool_walk_rec *r)
{
	(void)ctx;
	(void)r;
	return 1;
}

static void led_set(struct spool_prep *pp, uint64_t no, uint64_t use_seq);
static int led_write(struct spool_prep *pp);

/*
 * A header-less leftover: does it hold any intact record, whatever its
 * epoch? Walked with epoch 0 (never a real one), every intact record counts
 * as stale. 1 yes (or unreadable: keep it), 0 no.
 */
static int
any_intact_record(int fd, uint64_t size, uint8_t *win, size_t win_len)
{
	struct spool_walk w = {
		.read = spool_read_fd,
		.read_ctx = &fd,
		.size = size,
		.epoch = 0,
		.win = win,
		.win_len = win_len,
	};
	int r = spool_walk_segment(&w, stop_at_first, NULL);

	return r != 0 || w.records_stale || w.records_ok ? 1 : 0;
}

/* Classify one leftover file: sealed (has records) or a candidate. 0, or
 * -errno when the file could not be opened (EMFILE...): the scan, and the
 * start, fail, for a file left out would be missing from the list and its
 * use sequence given again. */
static int
classify(struct spool_prep *pp, uint64_t no, uint8_t *win, size_t win_len)
{
	char path[4200];
	uint8_t hb[SPOOL_SEG_HDR_LEN];
	struct spool_seg_hdr h;
	struct stat st;
	bool rezero = true, have_hdr = false;
	long got;
	int fd;

	seg_path(pp, no, path, sizeof(path));
	fd = fd_open_noatime(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return errno == ENOENT ? 0 : -errno; /* gone since readdir */
	pp->n_files++;
	led_set(pp, no, 0);
	if (fstat(fd, &st) != 0) {
		close(fd); /* unreadable: keep it, sealed */
		return 0;
	}
	got = spool_read_fd(&fd, 0, hb, sizeof(hb));
	if (got < 0) {
		/* A read error is not a short file: whatever it holds stays
		 * (sealed; the reader salvages it if it can). */
		fd_log(FD_LOG_ERR, "spool",
		       "event=segment_unreadable worker=%u file=%08" PRIx64
		       " err=%ld kept=sealed error=\"its header cannot be "
		       "read: never reused\"",
		       pp->worker, no, -got);
		close(fd);
		return 0;
	}
	have_hdr = got == (long)sizeof(hb);
	if (have_hdr &&
	    spool_seg_hdr_decode(hb, sizeof(hb), &h) != SPOOL_DEC_OK) {
		uint64_t use = spool_get64(hb + 24);
		led_set(pp, no, use);
		if (any_intact_record(fd, (uint64_t)st.st_size, win, win_len)) {
			/* Sealed for good: the reader salvages its records if
			 * it can establish their epoch; nothing here may write
			 * over them. Its use sequence, if the damage spared
			 * it, still orders the next ones after it. */
			if (use < (1ull << 62) && use >= pp->next_use_seq)
				pp->next_use_seq = use + 1;
			fd_log(FD_LOG_ERR, "spool",
			       "event=segment_damaged worker=%u file=%08" PRIx64
			       " kept=sealed error=\"header damaged, records "
			       "present: never reused\"",
			       pp->worker, no);
			close(fd);
			return 0;
		}
	} else if (have_hdr) {
		led_set(pp, no, h.use_seq);
		struct spool_walk w = {
			.read = spool_read_fd,
			.read_ctx = &fd,
			.size = min_u64(h.size, (uint64_t)st.st_size),
			.epoch = h.epoch,
			.win = win,
			.win_len = win_len,
		};
		if (h.use_seq >= pp->next_use_seq)
			pp->next_use_seq = h.use_seq + 1;
		int r = spool_walk_segment(&w, stop_at_first, NULL);
		if (r != 0) { /* a valid record (1), or unreadable: keep it */
			close(fd);
			return 0;
		}
		rezero = h.size != pp->seg_size ||
			 (uint64_t)st.st_size != pp->seg_size;
	}
	close(fd);
	struct cand *c = realloc(pp->cands, (pp->n_cands + 1) * sizeof(*c));
	if (!c)
		return 0; /* not reused this run: kept as it is */
	pp->cands = c;
	c[pp->n_cands] = (struct cand){.file_no = no, .rezero = rezero};
	pp->n_cands++;
	return 0;
}

static int
scan_dir(struct spool_prep *pp)
{
	DIR *d = opendir(pp->wdir);
	struct dirent *e;
	size_t win_len = 1u << 20;
	uint8_t *win;
	int r = 0;

	if (!d)
		return -errno;
	win = malloc(win_len);
	if (!win) {
		closedir(d);
		return -ENOMEM;
	}
	while ((e = readdir(d))) {
		uint64_t no;
		char *end;
		size_t l = strlen(e->d_name);

		if (l == 12 && strcmp(e->d_name + 8, ".tmp") == 0) {
			/* A spare a crash interrupted while it was made:
			 * never named .seg, so never used. */
			char tmp[4200];
			snprintf(tmp, sizeof(tmp), "%s/%s", pp->wdir,
				 e->d_name);
			unlink(tmp);
			continue;
		}
		if (l != 12 || strcmp(e->d_name + 8, ".seg") != 0)
			continue;
		no = strtoull(e->d_name, &end, 16);
		if (end != e->d_name + 8)
			continue;
		if (no >= pp->next_file_no)
			pp->next_file_no = no + 1;
		if ((r = classify(pp, no, win, win_len)) != 0)
			break;
	}
	closedir(d);
	free(win);
	if (r)
		return r;
	/* The list now names what is here: a file the previous list named
	 * that is gone was reported by recovery, which ran before us. */
	(void)led_write(pp); /* logged; the next rewrite tries again */
	fd_log(FD_LOG_INFO, "spool",
	       "event=segments_found worker=%u files=%" PRIu64
	       " reusable=%zu",
	       pp->worker, pp->n_files, pp->n_cands);
	return 0;
}


/* ---- the segment list (spool_ledger.h) ---------------------------------- */

static void
led_set(struct spool_prep *pp, uint64_t no, uint64_t use_seq)
{
	for (size_t i = 0; i < pp->n_led; i++) {
		if (pp->led[i].file_no == no) {
			pp->led[i].use_seq = use_seq;
			return;
		}
	}
	if (pp->n_led == pp->cap_led) {
		size_t cap = pp->cap_led ? pp->cap_led * 2 : 32;
		struct led *n = realloc(pp->led, cap * sizeof(*n));
		if (!n)
			return; /* unlisted: only its loss would go unreported */
		pp->led = n;
		pp->cap_led = cap;
	}
	pp->led[pp->n_led++] = (struct led){.file_no = no, .use_seq = use_seq};
}

static void
led_del(struct spool_prep *pp, uint64_t no)
{
	for (size_t i = 0; i < pp->n_led; i++) {
		if (pp->led[i].file_no == no) {
			pp->led[i] = pp->led[--pp->n_led];
			return;
		}
	}
}

/*
 * Replace wNN/segments with the list: a new file, fsynced, renamed over the
 * old one, the directory fsynced. Off the hot path (once per segment made
 * or deleted). 0 or -errno. A failure is logged and never stops the
 * spool; a file is deleted only once a list without it is durable
 * (recycle_one()), since a listed file that is gone reads as lost.
 */
static int
led_write(struct spool_prep *pp)
{
	char tmp[4200], path[4200];
	FILE *f;
	int r = 0;

	snprintf(tmp, sizeof(tmp), "%s/%s", pp->wdir, SPOOL_LEDGER_TMP);
	snprintf(path, sizeof(path), "%s/%s", pp->wdir, SPOOL_LEDGER_NAME);
	f = fopen(tmp, "we");
	if (!f) {
		r = -errno;
		goto out_log;
	}
	fprintf(f, "%s\n", SPOOL_LEDGER_MAGIC);
	for (size_t i = 0; i < pp->n_led; i++)
		fprintf(f, "%08" PRIx64 " %" PRIu64 "\n", pp->led[i].file_no,
			pp->led[i].use_seq);
	if (fflush(f) != 0 || fsync(fileno(f)) != 0)
		r = -errno;
	if (fclose(f) != 0 && r == 0)
		r = -errno;
	if (r == 0 && rename(tmp, path) != 0)
		r = -errno;
	if (r == 0 && !pp->no_dirsync)
		r = fd_fsync_dir(pp->wdir);
out_log:
	if (r)
		fd_log(FD_LOG_WARN, "spool",
		       "event=segment_list_failed worker=%u err=%d",
		       pp->worker, -r);
	return r;
}

static int
pwrite_all(int fd, const void *p, size_t n, uint64_t off)
{
	size_t done = 0;

	while (done < n) {
		ssize_t r = pwrite(fd, (const char *)p + done, n - done,
				   (off_t)(off + done));
		if (r < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		done += (size_t)r;
	}
	return 0;
}

static uint64_t
new_epoch(void)
{
	uint64_t e = 0;

	/* getrandom() of 8 bytes does not return short once the pool is
	 * initialised; zero is reserved (never a valid epoch). */
	while (e == 0)
		if (getrandom(&e, sizeof(e), 0) != (ssize_t)sizeof(e))
			e = 0;
	return e;
}

static int publish(struct spool_prep *pp, const char *path,
		   const struct spool_seg_hdr *hp);

/* A file back among the candidates (a spare made again when needed). */
static void
add_cand(struct spool_prep *pp, uint64_t no, bool rezero)
{
	struct cand *c = realloc(pp->cands, (pp->n_cands + 1) * sizeof(*c));

	if (!c)
		return; /* out of use until the next start's scan */
	pp->cands = c;
	c[pp->n_cands] = (struct cand){.file_no = no, .rezero = rezero};
	pp->n_cands++;
}

/* Make file `no` a ready spare. Returns 0 (for a fresh file made but not
 * handed over too: it is then a candidate) or -errno. */
static int
prepare(struct spool_prep *pp, uint64_t no, bool fresh, bool rezero)
{
	char path[4200], tmp[4200];
	struct spool_seg_hdr h;
	bool renamed = false;
	int fd, r = 0;

	/* A fresh file is made under NNNNNNNN.tmp and renamed once zeroed
	 * and synced, so a reader (recovery, finaldotctl) never meets a
	 * half-made segment under the .seg name. */
	seg_path(pp, no, path, sizeof(path));
	snprintf(tmp, sizeof(tmp), "%.*s.tmp", (int)(strlen(path) - 4), path);
	fd = open(fresh ? tmp : path,
		  O_RDWR | O_CLOEXEC | (fresh ? O_CREAT | O_EXCL : 0), 0640);
	if (fd < 0)
		return -errno;
	/*
	 * A leftover (not fresh) keeps its block 0 until the new header goes
	 * over it, and is never truncated to nothing first: the writes below
	 * may reach the disk in any order and any subset before the fsync,
	 * and a header zeroed in front of the stale records of an earlier
	 * epoch (a reclaimed spare keeps them) reads at the next start as a
	 * damaged segment holding records: sealed for good, its stale
	 * messages salvaged. Instead a shrink to the new size, zeros from
	 * block 1 (or unwritten extents), then the header: at any cut block
	 * 0 holds the old header or the new one, and nothing validates
	 * under either (the old records are stale under both epochs).
	 */
	if (rezero) {
		uint64_t t0 = fd_now_monotonic_us(), w0 = pp->zero_waits_us;
		uint64_t from = fresh ? 0 : SPOOL_BLOCK;
		struct stat st;

		if (fstat(fd, &st) != 0 ||
		    ((uint64_t)st.st_size > pp->seg_size &&
		     ftruncate(fd, (off_t)pp->seg_size) != 0)) {
			r = -errno;
			goto out_close;
		}
		/* The first one since the start is zeroed even so: the
		 * start waits for it anyway (tens of ms for 64 MiB on an
		 * idle disk), and the first minutes on a fresh spool then
		 * write into it at overwrite speed. */
		if (pp->falloc && pp->made_one &&
		    (r = alloc_file(pp, fd)) == 0) {
			fd_log(FD_LOG_INFO, "spool",
			       "event=segment_allocated worker=%u "
			       "file=%08" PRIx64 " ms=%" PRIu64,
			       pp->worker, no,
			       (fd_now_monotonic_us() - t0) / 1000);
		} else if (r && r != -EOPNOTSUPP) {
			goto out_close;
		} else {
			if ((r = zero_file(pp, fresh ? tmp : path, fd,
					   from)) != 0)
				goto out_close;
			fd_log(FD_LOG_INFO, "spool",
			       "event=segment_zeroed worker=%u file=%08" PRIx64
			       " ms=%" PRIu64 " gave_way_ms=%" PRIu64,
			       pp->worker, no,
			       (fd_now_monotonic_us() - t0) / 1000,
			       (pp->zero_waits_us - w0) / 1000);
		}
	}
	h.worker = pp->worker;
	h.file_no = no;
	h.use_seq = pp->next_use_seq;
	h.epoch = new_epoch();
	h.created_us = fd_now_realtime_us();
	h.size = pp->seg_size;
	memset(pp->zeros, 0, SPOOL_BLOCK);
	spool_seg_hdr_encode(&h, pp->zeros);
	r = pwrite_all(fd, pp->zeros, SPOOL_BLOCK, 0);
	memset(pp->zeros, 0, SPOOL_BLOCK);
	if (r)
		goto out_close;
	if (fsync(fd) != 0) {
		r = -errno;
		goto out_close;
	}
	/* Never over an existing segment (a number given twice must fail,
	 * not replace acknowledged mail): EEXIST, and the caller moves on. */
	if (fresh && renameat2(AT_FDCWD, tmp, AT_FDCWD, path,
			       RENAME_NOREPLACE) != 0) {
		r = -errno;
		if (r == -EINVAL) { /* no RENAME_NOREPLACE here: a link */
			r = link(tmp, path) == 0 ? 0 : -errno;
			if (r == 0)
				unlink(tmp);
		}
		if (r)
			goto out_close;
	}
	renamed = fresh;
	if (fresh && !pp->no_dirsync && (r = fd_fsync_dir(pp->wdir)) != 0)
		goto out_close;
	close(fd);
	pp->made_one = true;
	pp->next_use_seq++;
	led_set(pp, no, h.use_seq);
	(void)led_write(pp); /* a new file is listed once it is durable */
	r = publish(pp, path, &h);
	if (r && fresh) {
		/* Made and listed, only not handed over: a candidate, made
		 * ready at the next try (its number is used). */
		add_cand(pp, no, false);
		return 0;
	}
	return r;

out_close:
	close(fd);
	if (fresh && rezero) {
		unlink(tmp); /* a half-made file would only confuse */
		if (renamed) /* ours under the .seg name, nobody else's */
			unlink(path);
	}
	return r;
}

/* The worker's room may have changed: a spare joined, or the disk just
 * ran out (its sessions waiting for a segment, an END record among them,
 * are then answered 452 at once instead of at their data timeout). Counted
 * for spool_room_changed() and written to its eventfd; a full counter
 * (EAGAIN) already means "wake up". */
static void
wake_worker(struct spool_prep *pp)
{
	uint64_t one = 1;

	atomic_fetch_add_explicit(&pp->published, 1, memory_order_release);
	if (pp->wake_fd >= 0 && write(pp->wake_fd, &one, sizeof(one)) < 0 &&
	    errno != EAGAIN)
		fd_log(FD_LOG_WARN, "spool",
		       "event=wake_failed worker=%u err=%d", pp->worker,
		       errno);
}

/* A segment whose new header is durable joins the ready list. */
static int
publish(struct spool_prep *pp, const char *path, const struct spool_seg_hdr *hp)
{
	struct spool_seg_hdr h = *hp;
	struct spool_seg *s;
	int fd = open(path, O_RDWR | O_DIRECT | O_CLOEXEC);

	if (fd < 0)
		return -errno;
	s = calloc(1, sizeof(*s));
	if (!s) {
		close(fd);
		return -ENOMEM;
	}
	s->fd = fd;
	s->file_no = h.file_no;
	s->use_seq = h.use_seq;
	s->epoch = h.epoch;
	s->size = h.size;
	s->off = SPOOL_BLOCK;
	pthread_mutex_lock(&pp->mu);
	if (pp->tail)
		pp->tail->next = s;
	else
		pp->head = s;
	pp->tail = s;
	atomic_fetch_add_explicit(&pp->ready, 1, memory_order_relaxed);
	pp->err = 0;
	pthread_cond_broadcast(&pp->cv);
	pthread_mutex_unlock(&pp->mu);
	wake_worker(pp); /* room for held sessions */
	return 0;
}

bool
spool_prep_out_of_space(struct spool_prep *pp)
{
	bool r;

	pthread_mutex_lock(&pp->mu);
	r = pp->err == -ENOSPC || pp->err == -EDQUOT;
	pthread_mutex_unlock(&pp->mu);
	return r;
}

uint64_t
spool_prep_published(const struct spool_prep *pp)
{
	return atomic_load_explicit(&pp->published, memory_order_acquire);
}

/*
 * A sealed segment whose messages are all finished: a new header with a
 * new epoch first, durable before anything else (its old records are stale
 * from then on, so a crash can never bring finished messages back), then
 * keep it ready, in reserve, or delete it. No zeros are written: the old
 * bytes cannot validate under the new epoch.
 */
static void
recycle_one(struct spool_prep *pp, const struct recyc *q)
{
	char path[4200];
	uint8_t hb[SPOOL_SEG_HDR_LEN];
	struct spool_seg_hdr h;
	struct stat st;
	bool keep_ready, keep_reserve;
	int fd, r = 0;

	seg_path(pp, q->file_no, path, sizeof(path));
	fd = open(path, O_RDWR | O_CLOEXEC);
	if (fd < 0) {
		r = -errno;
		goto out_log;
	}
	if (fstat(fd, &st) != 0 ||
	    spool_read_fd(&fd, 0, hb, sizeof(hb)) != (long)sizeof(hb) ||
	    spool_seg_hdr_decode(hb, sizeof(hb), &h) != SPOOL_DEC_OK) {
		r = -EBADMSG;
		goto out_close;
	}
	if (h.use_seq > q->use_seq) {
		/* Already given a new header (a repeated request): its old
		 * records are stale already; nothing to do. */
		goto out_close;
	}
	if (h.use_seq < q->use_seq) {
		/* An older use than the one asked for: not the segment the
		 * control plane finished, and its records may be live.
		 * Refused, not announced. */
		r = -ESTALE;
		goto out_close;
	}
	h.use_seq = pp->next_use_seq++;
	h.epoch = new_epoch();
	h.created_us = fd_now_realtime_us();
	memset(pp->zeros, 0, SPOOL_BLOCK);
	spool_seg_hdr_encode(&h, pp->zeros);
	r = pwrite_all(fd, pp->zeros, SPOOL_BLOCK, 0);
	memset(pp->zeros, 0, SPOOL_BLOCK);
	if (r == 0 && fdatasync(fd) != 0)
		r = -errno;
	if (r)
		goto out_close;
	close(fd);
	fd = -1;
	pthread_mutex_lock(&pp->mu);
	keep_ready = atomic_load_explicit(&pp->ready, memory_order_relaxed) <
		     pp->spares;
	keep_reserve = !keep_ready && pp->n_cands < pp->spares;
	pthread_mutex_unlock(&pp->mu);
	if (h.size != pp->seg_size || (uint64_t)st.st_size != pp->seg_size)
		keep_ready = keep_reserve = false; /* resized: make anew */
	bool resized = h.size != pp->seg_size ||
		       (uint64_t)st.st_size != pp->seg_size;
	if (keep_ready || keep_reserve) {
		led_set(pp, q->file_no, h.use_seq);
		(void)led_write(pp); /* logged; listed at the next rewrite */
	}
	if (keep_ready && publish(pp, path, &h) != 0) {
		/* Not lost to the preparer: a candidate, made ready again
		 * when a spare is wanted (its header is new; the old
		 * records are stale already). */
		keep_ready = false;
		keep_reserve = true;
	}
	if (keep_reserve) {
		add_cand(pp, q->file_no, false);
	} else if (!keep_ready) {
		/* Delisted before it goes, so that a crash in between never
		 * leaves a listed file that we removed ourselves; a list
		 * that cannot be written keeps the file (deleted, it would
		 * read as lost at the next start). */
		led_del(pp, q->file_no);
		if (led_write(pp) != 0) {
			led_set(pp, q->file_no, h.use_seq);
			add_cand(pp, q->file_no, resized);
			keep_reserve = true;
		} else if (unlink(path) == 0) {
			pp->n_files--;
			r = fd_fsync_dir(pp->wdir);
		} else {
			r = -errno;
		}
	}
	fd_log(FD_LOG_INFO, "spool",
	       "event=segment_reclaimed worker=%u file=%08" PRIx64
	       " kept=%s",
	       pp->worker, q->file_no,
	       keep_ready ? "ready" : keep_reserve ? "reserve" : "deleted");
	goto out_done;
out_close:
	if (fd >= 0)
		close(fd);
out_log:
	if (r) {
		/* No new epoch: its old records are still valid on disk, so
		 * it is not reported reclaimed. Reported, the control plane
		 * would forget its messages and the next checkpoint their
		 * records, and a restart would deliver them again, uncounted.
		 * It stays out of use until the next start's scan. */
		fd_log(FD_LOG_ERR, "spool",
		       "event=reclaim_failed worker=%u file=%08" PRIx64
		       " err=%d action=\"kept as it is; its messages are "
		       "finished in the delivery log, the next start reclaims "
		       "it\"",
		       pp->worker, q->file_no, -r);
		return;
	}
out_done:
	pthread_mutex_lock(&pp->mu);
	if (pp->n_rdone == pp->cap_rdone) {
		size_t cap = pp->cap_rdone ? pp->cap_rdone * 2 : 16;
		struct recyc *n = realloc(pp->rdone, cap * sizeof(*n));
		if (n) {
			pp->rdone = n;
			pp->cap_rdone = cap;
		}
	}
	if (pp->n_rdone < pp->cap_rdone) {
		pp->rdone[pp->n_rdone++] = *q;
		atomic_store_explicit(&pp->rdone_n, (unsigned)pp->n_rdone,
				      memory_order_relaxed);
	}
	pthread_mutex_unlock(&pp->mu);
}

int
spool_prep_recycle(struct spool_prep *pp, uint64_t file_no, uint64_t use_seq)
{
	int r = 0;

	pthread_mutex_lock(&pp->mu);
	if (pp->n_rq == pp->cap_rq) {
		size_t cap = pp->cap_rq ? pp->cap_rq * 2 : 16;
		struct recyc *n = realloc(pp->rq, cap * sizeof(*n));
		if (!n) {
			r = -ENOMEM;
			goto out_unlock;
		}
		pp->rq = n;
		pp->cap_rq = cap;
	}
	pp->rq[pp->n_rq++] =
		(struct recyc){.file_no = file_no, .use_seq = use_seq};
	pthread_cond_broadcast(&pp->cv);
out_unlock:
	pthread_mutex_unlock(&pp->mu);
	return r;
}

unsigned
spool_prep_recycled(struct spool_prep *pp, uint64_t *file_no,
		    uint64_t *use_seq, unsigned max)
{
	unsigned n = 0;

	pthread_mutex_lock(&pp->mu);
	while (n < max && pp->n_rdone) {
		struct recyc *q = &pp->rdone[--pp->n_rdone];
		file_no[n] = q->file_no;
		use_seq[n] = q->use_seq;
		n++;
	}
	atomic_store_explicit(&pp->rdone_n, (unsigned)pp->n_rdone,
			      memory_order_relaxed);
	pthread_mutex_unlock(&pp->mu);
	return n;
}

bool
spool_prep_has_recycled(const struct spool_prep *pp)
{
	return atomic_load_explicit(&pp->rdone_n, memory_order_relaxed) != 0;
}

/*
 * Room for one more segment file above the reserve? The reserve is the
 * delivery log's (in the same spool directory): without it a spool that
 * filled its disk while a next hop was down would leave the log no room
 * to record the deliveries that free the disk again. Capped at a tenth of
 * the filesystem so that a small spool disk still takes mail. Workers
 * check on their own, so several at once can each take one segment out of
 * the reserve: at most (workers - 1) x seg_size.
 */
static int
room_for_one(struct spool_prep *pp)
{
	struct statvfs v;
	uint64_t avail, reserve;

	if (!pp->min_free || statvfs(pp->wdir, &v) != 0 || v.f_blocks == 0)
		return 0; /* no reserve, no answer or no size (some FUSE
			   * filesystems): the write decides */
	avail = (uint64_t)v.f_bavail * v.f_frsize;
	reserve = (uint64_t)v.f_blocks * v.f_frsize / 10;
	if (reserve > pp->min_free)
		reserve = pp->min_free;
	if (avail >= reserve + pp->seg_size) {
		if (pp->reserve_hit)
			fd_log(FD_LOG_INFO, "spool",
			       "event=spool_room_again worker=%u "
			       "available=%" PRIu64,
			       pp->worker, avail);
		pp->reserve_hit = false;
		return 0;
	}
	if (!pp->reserve_hit)
		fd_log(FD_LOG_WARN, "spool",
		       "event=spool_min_free_reached worker=%u "
		       "available=%" PRIu64 " reserve=%" PRIu64
		       " segment_size=%" PRIu64
		       " action=\"new mail gets 452 4.3.1 until delivery or "
		       "an operator frees space; the reserve is the delivery "
		       "log's\"",
		       pp->worker, avail, reserve, pp->seg_size);
	pp->reserve_hit = true;
	return -ENOSPC;
}

static int
make_one(struct spool_prep *pp)
{
	int r;

	if (pp->n_cands) {
		struct cand c = pp->cands[--pp->n_cands];
		r = prepare(pp, c.file_no, false, c.rezero);
		if (r && ++c.fails < 3) {
			/* Back among the candidates, at the bottom (the
			 * others are tried before it), zeroed anew (a failure
			 * may have come half-way through): not lost to the
			 * preparer until a restart while the spool grew. */
			memmove(pp->cands + 1, pp->cands,
				pp->n_cands * sizeof(*pp->cands));
			c.rezero = true;
			pp->cands[0] = c;
			pp->n_cands++;
		} else if (r) {
			fd_log(FD_LOG_ERR, "spool",
			       "event=segment_abandoned worker=%u file=%08"
			       PRIx64 " err=%d note=\"failed three times; out "
			       "of use until the next start\"",
			       pp->worker, c.file_no, -r);
		}
		return r;
	}
	if (pp->max_segments && pp->n_files >= pp->max_segments)
		return -ENOSPC;
	r = room_for_one(pp);
	if (r)
		return r;
	r = prepare(pp, pp->next_file_no, true, true);
	if (r == 0) {
		pp->next_file_no++;
		pp->n_files++;
	} else if (r == -EEXIST) {
		pp->next_file_no++;
	}
	return r;
}

static void *
prep_main(void *arg)
{
	struct spool_prep *pp = arg;
	int r = pp->no_space ? -ENOSPC : scan_dir(pp);
	/* Nothing is made, recycled or listed before the scan has seen
	 * every file here: a new segment numbered from zero would be
	 * renamed over one holding acknowledged mail. A failed scan fails
	 * the start (spool_prep_wait_ready()); this thread then makes
	 * nothing. */
	bool scanned = r == 0;

	pthread_mutex_lock(&pp->mu);
	if (!scanned && !pp->no_space) {
		fd_log(FD_LOG_ERR, "spool",
		       "event=segment_scan_failed worker=%u err=%d "
		       "action=\"no segment is made\"",
		       pp->worker, -r);
		pp->err = r;
		pthread_cond_broadcast(&pp->cv);
		while (!pp->stop)
			pthread_cond_wait(&pp->cv, &pp->mu);
	}
	for (;;) {
		if (pp->n_rq && !pp->stop && !pp->no_space) {
			struct recyc q = pp->rq[0];
			memmove(pp->rq, pp->rq + 1,
				(pp->n_rq - 1) * sizeof(*pp->rq));
			pp->n_rq--;
			pthread_mutex_unlock(&pp->mu);
			recycle_one(pp, &q);
			pthread_mutex_lock(&pp->mu);
			continue;
		}
		if (r == 0 && !pp->stop &&
		    atomic_load_explicit(&pp->ready, memory_order_relaxed) <
			    pp->spares) {
			pthread_mutex_unlock(&pp->mu);
			r = make_one(pp);
			pthread_mutex_lock(&pp->mu);
			if (r == -EEXIST)
				r = 0;
			if (r) {
				uint64_t now = fd_now_monotonic_us();
				bool ran_out = (r == -ENOSPC || r == -EDQUOT) &&
					       pp->err != -ENOSPC &&
					       pp->err != -EDQUOT;

				pp->err = r;
				if (ran_out) {
					pthread_mutex_unlock(&pp->mu);
					wake_worker(pp);
					pthread_mutex_lock(&pp->mu);
				}
				/* Retried each second: logged when it
				 * changes, else once a minute. */
				if (!pp->reserve_hit &&
				    (r != pp->logged_err ||
				     now - pp->logged_us >= 60000000u)) {
					fd_log(FD_LOG_ERR, "spool",
					       "event=segment_prepare_failed "
					       "worker=%u err=%d",
					       pp->worker, -r);
					pp->logged_err = r;
					pp->logged_us = now;
				}
				pthread_cond_broadcast(&pp->cv);
			} else {
				pp->logged_err = 0;
			}
			continue;
		}
		if (pp->stop)
			break;
		if (r && !pp->no_space) {
			/* Retry later: the disk may get space back. */
			struct timespec ts;
			clock_gettime(CLOCK_REALTIME, &ts);
			ts.tv_sec += 1;
			pthread_cond_timedwait(&pp->cv, &pp->mu, &ts);
			r = 0;
		} else {
			if (r && pp->err != r) {
				pp->err = r;
				pthread_cond_broadcast(&pp->cv);
			}
			pthread_cond_wait(&pp->cv, &pp->mu);
		}
	}
	pthread_mutex_unlock(&pp->mu);
	return NULL;
}

struct spool_prep *
spool_prep_start(const char *wdir, unsigned worker, uint64_t seg_size,
		 unsigned spares, uint64_t max_segments, uint64_t min_free,
		 bool no_space,
		 bool falloc, const cpu_set_t *cpus, int wake_fd, int *err)
{
	struct spool_prep *pp = calloc(1, sizeof(*pp));

	if (!pp) {
		*err = -ENOMEM;
		return NULL;
	}
	if (strlen(wdir) >= sizeof(pp->wdir)) {
		*err = -ENAMETOOLONG;
		goto out_free;
	}
	strcpy(pp->wdir, wdir);
	pp->worker = worker;
	pp->seg_size = seg_size;
	pp->spares = spares ? spares : 1;
	pp->max_segments = max_segments;
	pp->min_free = min_free;
	pp->no_space = no_space;
	pp->falloc = falloc;
	/* XXX: read from the environment, not from the spool's parsed spec,
	 * to keep spool_prep_start()'s signature; so params.fault cannot ask
	 * for it. A test mutant only: the renames of a new segment and of
	 * the segment list are left without their directory fsync
	 * (docs/powercut.md). */
	pp->no_dirsync = fd_seam("FINALDOT_SPOOL_FAULT", "no-dirsync");
	pp->wake_fd = wake_fd;
	if (posix_memalign((void **)&pp->zeros, SPOOL_BLOCK, ZERO_CHUNK) != 0)
		pp->zeros = NULL;
	else
		memset(pp->zeros, 0, ZERO_CHUNK);
	if (!pp->zeros) {
		*err = -ENOMEM;
		goto out_free;
	}
	pthread_mutex_init(&pp->mu, NULL);
	pthread_cond_init(&pp->cv, NULL);
	pthread_attr_t attr;
	pthread_attr_init(&attr);
	if (cpus)
		pthread_attr_setaffinity_np(&attr, sizeof(*cpus), cpus);
	int r = pthread_create(&pp->thr, &attr, prep_main, pp);
	pthread_attr_destroy(&attr);
	if (r) {
		*err = -r;
		goto out_zeros;
	}
	return pp;

out_zeros:
	pthread_cond_destroy(&pp->cv);
	pthread_mutex_destroy(&pp->mu);
	free(pp->zeros);
out_free:
	free(pp);
	return NULL;
}

int
spool_prep_wait_ready(struct spool_prep *pp)
{
	int r;

	pthread_mutex_lock(&pp->mu);
	while (!pp->head && !pp->err)
		pthread_cond_wait(&pp->cv, &pp->mu);
	r = pp->head ? 0 : pp->err;
	pthread_mutex_unlock(&pp->mu);
	return r;
}

int
spool_prep_take(struct spool_prep *pp, struct spool_seg **out)
{
	int r;

	pthread_mutex_lock(&pp->mu);
	if (pp->head) {
		*out = pp->head;
		pp->head = pp->head->next;
		if (!pp->head)
			pp->tail = NULL;
		(*out)->next = NULL;
		atomic_fetch_sub_explicit(&pp->ready, 1, memory_order_relaxed);
		pthread_cond_broadcast(&pp->cv);
		r = 0;
	} else {
		r = pp->err == -ENOSPC || pp->err == -EDQUOT ? -ENOSPC
		    : pp->err				    ? pp->err
							    : -EAGAIN;
	}
	pthread_mutex_unlock(&pp->mu);
	return r;
}

unsigned
spool_prep_ready(const struct spool_prep *pp)
{
	return atomic_load_explicit(&pp->ready, memory_order_relaxed);
}

void
spool_prep_stop(struct spool_prep *pp)
{
	if (!pp)
		return;
	pthread_mutex_lock(&pp->mu);
	pp->stop = true;
	pthread_cond_broadcast(&pp->cv);
	pthread_mutex_unlock(&pp->mu);
	pthread_join(pp->thr, NULL);
	while (pp->head) {
		struct spool_seg *s = pp->head;
		pp->head = s->next;
		spool_seg_free(s);
	}
	pthread_cond_destroy(&pp->cv);
	pthread_mutex_destroy(&pp->mu);
	free(pp->cands);
	free(pp->led);
	free(pp->rq);
	free(pp->rdone);
	free(pp->zeros);
	free(pp);
}
