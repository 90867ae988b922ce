/*
 * The spool writer: one per worker thread (lcore), shared-nothing. It packs
 * records back to back into aligned batch buffers and makes each batch
 * durable with one O_DIRECT write carrying RWF_DSYNC (or followed by a
 * linked fdatasync) into pre-zeroed blocks of a recycled segment file (the
 * durability rule: no 250 before that write is durable). Completion of the
 * flush, and nothing else, produces the done callback with status 0. In
 * fdatasync mode a batch holding no END record (the middle of large
 * messages) is written without a flush of its own: the flush of the next
 * batch with an END in the same file, issued only after that write has
 * completed, covers it; a file's last batch is always flushed.
 *
 * Natural batching: a batch closes when it reaches batch_size, or when the
 * caller says the poll loop is idle (spool_flush()). Up to `batches` batch
 * buffers exist; all but the one being filled may be in flight. Batches are
 * completed in submission order (a message's records may span several
 * batches; its callback fires once every batch up to the one holding its END
 * record has completed, and reports failure if any of them failed).
 *
 * Threading: every function must be called from the owning worker thread.
 * The only other thread is the segment preparer (spool_seg.c) that zeroes
 * spare segment files ahead of need; it is hidden behind this interface.
 *
 * Rings: with params.ring == NULL the spool owns an io_uring and
 * spool_poll() harvests it. With a ring given, the caller owns the ring and
 * its submission; CQEs whose user_data satisfies spool_owns_cqe() must be
 * handed to spool_handle_cqe(). The kernel-socket transport shares its ring
 * this way so that one io_uring_submit_and_wait() serves network and disk.
 *
 * Fault injection (test builds only, -Dfault_injection=true; see
 * docs/spool-format.md): params.fault, or the environment variable
 * FINALDOT_SPOOL_FAULT (never read by a release build), selects
 *   "fail-write"        every batch write completes with -EIO
 *   "fail-write:N"      the N-th batch write (1-based) and later ones fail
 *   "fail-once:N"       only the N-th batch write fails
 *   "fail-flush:N"      the N-th batch write reaches the file, but the
 *                       completion carrying its flush reports -EIO (a
 *                       failed flush: whether the bytes are durable is
 *                       unknown); a write without a flush of its own
 *                       is not affected
 *   "enospc"            no segment can be made: begin() fails with -ENOSPC
 *   "hold:PATH"         batches are not submitted while PATH exists
 *   "prep-slow:MS"      the segment preparer sleeps MS ms per chunk of
 *                       zeros it writes (a slow or busy disk)
 *   "lazy-late"         a batch written without a flush goes to the
 *                       kernel only after a later batch did (the
 *                       reordering io-wq may do)
 * and durability mutants for the power-cut tests: "no-dsync", "no-dirsync",
 * "lazy-nowait" (lazy-late, and flushes do not wait for unflushed writes
 * before them), "lazy-seglast" (a file's last batch may go unflushed).
 * A failed write fails every message with a record in that batch (-EIO), a
 * failed flush every message begun so far; the next batch goes to fresh
 * blocks and later messages are unaffected.
 *
 * CQE tagging in a shared ring: the spool's user_data values all have bit 63
 * set (SPOOL_UD_FLAG); other users of the ring must never set that bit.
 * Below it the spool keeps the batch index, the operation and a few bits of
 * the batch sequence number (checked on completion).
 */
#ifndef FINALDOT_SPOOL_H
#define FINALDOT_SPOOL_H

#include <sched.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "finaldot/envelope.h"
#include "finaldot/lathist.h"

struct io_uring;
struct io_uring_cqe;
struct spool;
struct spool_msg;

/* status: 0 durable; -ENOSPC; -EIO or another -errno. ctx as given. */
typedef void (*spool_done_fn)(void *ctx, uint64_t msgid, int status);

/*
 * Announcements for the control plane (its only view of the spool), made
 * on the owning thread, in this order per spool:
 *   SEGMENT   a segment became active (file_no, use_seq): every later
 *             record goes there until the next SEGMENT;
 *   DURABLE   every batch up to byte `off` of segment use_seq is complete
 *             (written and flushed, or failed and abandoned): a reader may
 *             walk that prefix; the messages committed in it have had
 *             their verdict;
 *   FAILED    msgid was answered 451/452: its records, even if some are
 *             on disk, must not be delivered. Its END record went into
 *             the batch of segment use_seq that ends at `off` (the
 *             DURABLE that follows covers it), whether or not that write
 *             or its flush succeeded; off 0: no END record was written;
 *   ABORTED   msgid was dropped before commit (RSET, session lost);
 *   RECLAIMED the segment (file_no, use_seq) handed back by
 *             spool_reclaim() has a new epoch: its old records are gone.
 * A later DURABLE supersedes an earlier one, so a consumer that misses
 * some loses nothing but latency.
 */
enum spool_an_type {
	SPOOL_AN_SEGMENT = 1,
	SPOOL_AN_DURABLE = 2,
	SPOOL_AN_FAILED = 3,
	SPOOL_AN_ABORTED = 4,
	SPOOL_AN_RECLAIMED = 5,
};
struct spool_announce {
	enum spool_an_type type;
	uint64_t file_no;
	uint64_t use_seq;
	uint64_t off;
	uint64_t msgid;
};
typedef void (*spool_announce_fn)(void *actx, const struct spool_announce *a);

#define SPOOL_UD_FLAG (1ULL << 63)

struct spool_params {
	const char *dir;          /* spool root; this worker uses dir/wNN/ */
	unsigned worker;          /* 0..255: directory and msgid low byte */
	uint64_t segment_size;    /* bytes, multiple of 4096; default 64 MiB */
	size_t batch_size;        /* close a batch at this size; default 256 KiB */
	unsigned batches;         /* batch buffers; default 8 */
	unsigned max_msgs;        /* open messages at once (one per session) */
	unsigned spare_segments;  /* pre-zeroed segments kept ready; default 2 */
	uint64_t max_segments;    /* per worker, 0 = until the disk is full */
	/* No new segment file while the filesystem would keep less than
	 * min(min_free, a tenth of its size) free; 0: no such reserve. */
	uint64_t min_free;
	uint64_t seed_msgid;      /* largest id recovery found (0: none) */
	struct io_uring *ring;    /* NULL: own ring */
	const char *fault;        /* fault spec or NULL (see above) */
	spool_done_fn done;
	/* Durability by a linked fdatasync SQE after each write instead of
	 * RWF_DSYNC on the write. Chosen automatically (with a warning) when
	 * the kernel rejects RWF_DSYNC. */
	bool linked_fdatasync;
	/* Group commit: spool_flush() leaves the batch being filled open
	 * while this many durable writes are in flight, so the messages that
	 * arrive meanwhile share the next write. Full batches are written
	 * regardless (up to `batches` in flight). Default 1. */
	unsigned flush_inflight;
	/* CPUs for the spool's helper threads: the segment preparer and (own
	 * ring) io_uring's io-wq workers, which perform the durable writes
	 * that cannot complete inline. NULL: inherit the caller's. A DPDK
	 * lcore is pinned to a core it busy-polls: helpers left there wait
	 * for its time slice, milliseconds per flush. */
	const cpu_set_t *helper_cpus;
	/* New segments by fallocate() (unwritten extents) instead of zeros
	 * (spool_prepare_fallocate()); falls back to zeros where the
	 * filesystem has no fallocate. */
	bool fallocate_segments;
	/* Announcements to the control plane; NULL: none. */
	spool_announce_fn announce;
	void *announce_ctx;
	/* The outcome of a detached message (its session gone before the
	 * verdict), called where done() would have been, after the DURABLE
	 * that covers it: status 0 is a message on disk whose client got no
	 * reply, and will send it again. NULL: none. */
	spool_done_fn orphan_done;
	void *orphan_ctx;
};

/* Fills the defaults above; dir, worker, max_msgs, done are left zero. */
void spool_params_defaults(struct spool_params *p);

/*
 * Which durable write suits the disk under dir (config spool_sync), as
 * spool_params.linked_fdatasync. mode: "dsync", "fdatasync" or "auto".
 * auto reads queue/fua in sysfs for dir's device (a partition's: its
 * disk's). Without FUA the kernel completes an O_DIRECT write with
 * RWF_DSYNC through a workqueue that issues the cache flush, and while
 * the CPUs are busy that worker waits for the scheduler's tick (4 ms at
 * HZ=250; measured here: p90 4.0 ms against 0.1-0.2 ms for a write with a
 * linked fdatasync); with FUA the write itself is durable and completes
 * at once. So auto: fdatasync without FUA; dsync with it, or where there
 * is no block device to ask (tmpfs, FUSE, some btrfs setups). why (n
 * octets): the reason, for the log.
 */
bool spool_sync_linked(const char *dir, const char *mode, char *why,
		       size_t n);

/*
 * How new segments are made for the spool under dir (config
 * spool_prepare), as spool_params.fallocate_segments. mode: "zero",
 * "fallocate" or "auto". Zeros make every later write an overwrite of
 * allocated, initialised blocks: no metadata to make durable with it, at
 * the price of writing each segment twice (the zeros go to the disk
 * beside the batches while a fresh spool fills). fallocate() writes
 * nothing but leaves unwritten extents: the first write into each block
 * also changes the extent tree, which its flush must then carry. On ext4
 * with a journal, or XFS, that is a journal commit per flush; on ext4
 * without a journal it is the inode block, which each flush writes anyway
 * (its mtime, with i_version). So auto: fallocate on ext4 without a
 * journal (the filesystem's sysfs journal_task says "<none>"), zeros
 * everywhere else. Even with fallocate the first segment the preparer
 * makes after a start is zeroed (the start waits for one anyway, and
 * single sessions on a fresh spool then write at overwrite speed). why (n
 * octets): the reason, for the log.
 */
bool spool_prepare_fallocate(const char *dir, const char *mode, char *why,
			     size_t n);

/* NULL with errno set on failure (and a log line saying why). */
struct spool *spool_create(const struct spool_params *p);
/* Waits for in-flight batches (their callbacks run), then frees all. */
void spool_destroy(struct spool *sp);

/*
 * Open a message. Returns NULL with *err = -ENOSPC (no segment space),
 * -EMFILE (max_msgs open), -EAGAIN (every batch buffer is in flight:
 * spool_room() == 0; retry after completions), -EMSGSIZE (the envelope
 * encodes to more than SPOOL_ENV_MAX bytes) or another -errno. The envelope is encoded into
 * the spool at once; env's strings need not outlive the call.
 */
struct spool_msg *spool_msg_begin(struct spool *sp,
				  const struct fd_envelope *env, void *ctx,
				  uint64_t *msgid, int *err);
/* Body bytes. Never partial: n <= spool_room(). 0 or -errno. */
int spool_msg_append(struct spool *sp, struct spool_msg *m, const void *p,
		     size_t n);
/* Close the message; done(ctx, id, status) follows exactly once, later.
 * -ENOSPC: no segment to put its END in and the disk full (or down to
 * spool_min_free): no done() follows, the message is still open (abort
 * it; the client gets 452 4.3.1). */
int spool_msg_commit(struct spool *sp, struct spool_msg *m);
/* Before commit only: drop the message (recovery will ignore its records). */
void spool_msg_abort(struct spool *sp, struct spool_msg *m);
/* After commit: keep the outcome, suppress the callback (session gone);
 * orphan_done() is told it instead. */
void spool_msg_detach(struct spool *sp, struct spool_msg *m);

/* Body bytes that spool_msg_append() accepts right now. */
size_t spool_room(const struct spool *sp);

/*
 * The poll loop is idle: close the batch being filled and submit it, if a
 * message's END record is in it (somebody waits for this flush) and fewer
 * than flush_inflight writes are in flight; submit any closed batch. A batch
 * holding only the start of messages waits for an END or for batch_size.
 * Call it again after completions were harvested. 0 or -errno.
 */
int spool_flush(struct spool *sp);
/* Own ring only: submit what is queued, harvest completions without
 * waiting, run callbacks. What the callbacks queue waits for the next
 * spool_poll() or spool_submit(), so that the caller can send the replies
 * they produced first. Returns completions handled. */
int spool_poll(struct spool *sp);
/* Own ring only: submit every closed batch and queued operation now. */
void spool_submit(struct spool *sp);
/* The shutdown's deadline passed with writes unfinished: spool_destroy()
 * does not wait for them (nor submits held ones); their messages get no
 * verdict (their sessions were answered 421 and detached). */
void spool_abandon(struct spool *sp);
/* Own ring only: like spool_poll(), but first waits for at least one
 * completion if a batch is in the kernel. For tests and shutdown. */
int spool_wait(struct spool *sp);
/* Shared ring only. Callbacks run from spool_handle_cqe(); they must not
 * call spool_poll()/spool_handle_cqe() themselves. With a shared ring the
 * caller drains (spool_inflight() == 0) before spool_destroy(). */
bool spool_owns_cqe(const struct io_uring_cqe *cqe);
void spool_handle_cqe(struct spool *sp, const struct io_uring_cqe *cqe);

#ifdef FINALDOT_FAULT_INJECTION
/* Replace the fault spec at run time (tests); NULL clears. "enospc" is only
 * accepted at create. 0 or -EINVAL. */
int spool_set_fault(struct spool *sp, const char *spec);
#endif

/*
 * The control plane is done with a sealed segment: every message with a
 * record in it is finished. The spool checks that no open message of its
 * own may still have records there (a message spans segments while it is
 * written), waits while one might, then hands the file to the preparer,
 * which gives it a new epoch (the old records turn stale at once) and keeps
 * it as a spare, or deletes it when enough spares are kept. RECLAIMED is
 * announced once that is durable. Requests for the active segment, or a
 * file_no/use_seq pair that does not match the file, are refused there and
 * logged. Cheap to call; the work happens in spool_flush(). 0 or -ENOMEM.
 */
int spool_reclaim(struct spool *sp, uint64_t file_no, uint64_t use_seq);

/*
 * Room that does not come from a write completion (issue 10): the segment
 * preparer made a spare ready (new, reclaimed, or space found again after
 * ENOSPC). spool_wake_fd() is an eventfd that becomes readable then (the
 * caller reads its 8 bytes to re-arm it; the spool owns and closes it): a
 * transport that sleeps in its ring polls it there. spool_room_changed()
 * says the same to a polling loop: true once after each such event. Either
 * way the caller offers held sessions their input again and calls
 * spool_flush() (which also writes END records that waited for a
 * segment).
 */
int spool_wake_fd(const struct spool *sp);
/*
 * spool_room() is 0 and will stay so until space is freed: no room in the
 * current batch or the active segment, no spare ready, and the preparer
 * out of space. The SMTP engine then fails the message (452 4.3.1) instead
 * of holding its session for room no completion brings.
 */
bool spool_out_of_space(struct spool *sp);
bool spool_room_changed(struct spool *sp);

/* Batches submitted and not yet completed. */
unsigned spool_inflight(const struct spool *sp);

/* How many batch buffers are registered with the ring (their writes go
 * as write_fixed: no page pinning per write): all of them, or as many as
 * RLIMIT_MEMLOCK allowed (halving until the kernel took them), or 0 where
 * it refused; the rest go as plain writes. */
unsigned spool_buffers_registered(const struct spool *sp);

/* Per completed batch (group commit at work): how many messages it made
 * durable, in buckets up to 1, 2, 4 ... 256 and above; how many bytes, up
 * to 4 KiB, 16 KiB ... 4 MiB and above. spool_flush_bucket() picks. */
#define SPOOL_FLUSH_MSG_BUCKETS 9
#define SPOOL_FLUSH_BYTE_BUCKETS 6
unsigned spool_flush_bucket(uint64_t v, uint64_t first, unsigned n);

struct spool_stats {
	uint64_t batches;       /* batch writes completed ok */
	uint64_t batch_errors;  /* batch writes that failed */
	uint64_t flushes;       /* durable writes issued (batches + errors
				 * - unflushed) */
	uint64_t unflushed;     /* ok batches written without a flush of
				 * their own (no END in them, fdatasync
				 * mode: a later flush covers them) */
	uint64_t late_flushes;  /* fdatasyncs issued after their batch's
				 * write, once the unflushed writes before
				 * it had completed */
	uint64_t messages;      /* messages reported durable */
	uint64_t bytes;         /* bytes written, padding included */
	uint64_t payload_bytes; /* record bytes, padding excluded */
	uint64_t segments_used;
	uint64_t room_waits;    /* spool_room() returned 0, or begin() had
				 * to answer -EAGAIN */
	uint64_t reclaimed;     /* segments handed back by the control plane */
	/* flushed ok batches */
	uint64_t flush_msgs[SPOOL_FLUSH_MSG_BUCKETS + 1];
	uint64_t flush_msgs_sum;
	uint64_t flush_bytes[SPOOL_FLUSH_BYTE_BUCKETS + 1]; /* ok batches */
	/* per flushed ok batch: from its submission to the reaping of its last
	 * completion (the disk's durable write as the worker sees it), in
	 * the buckets of finaldot/lathist.h */
	uint64_t flush_lat[FD_LAT_BUCKETS + 1];
	uint64_t flush_lat_sum_ns;
	uint64_t flush_qlat[FD_QLAT_BUCKETS]; /* the same, finer (the log's) */
};
const struct spool_stats *spool_get_stats(const struct spool *sp);

#endif
