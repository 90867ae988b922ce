/*
 * The delivery log: a durable, append-only record of what happened to each
 * recipient of each queued message, so that after any crash (kill -9, power
 * cut) the control plane knows which recipients are already delivered or
 * bounced and must not be delivered again. docs/delivery-log.md has the
 * byte layout, the group commit, compaction and the replay and crash rules.
 *
 * Files: DIR/GGGGGGGGGGGGGGGG.log (generation, 16 lower-case hex digits).
 * Each file starts with a checkpoint (CKPT_BEGIN, the state records, then
 * CKPT_END), followed by ordinary appends. A new log starts with an empty
 * checkpoint; dlog_checkpoint() writes the next generation.
 *
 * Threads: dlog_append(), dlog_wait(), dlog_durable(), dlog_get_stats(),
 * dlog_want_checkpoint() and dlog_checkpoint() may be called from any
 * thread; dlog_open() and dlog_close() from one thread with no other call
 * in progress. One writer thread does all appending I/O.
 *
 * LSNs (log sequence numbers) are per handle: the first append after
 * dlog_open() gets 1. They are not stored on disk; file order is LSN order.
 *
 * Memory: two pending buffers of at most params.pending_max bytes each, and
 * a 1 MiB window while replaying. A record is at most DLOG_REC_MAX bytes.
 */
#ifndef FINALDOT_CONTROL_DLOG_H
#define FINALDOT_CONTROL_DLOG_H

#include <sched.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum dlog_type {
	/* a delivery attempt of rcpt (or DLOG_ALL) starts: made durable
	 * before the final dot goes out, so a crash mid-attempt is counted as
	 * a possible duplicate */
	DLOG_ATTEMPT = 1,
	DLOG_DELIVERED = 2, /* accepted by the next hop; text = its reply */
	DLOG_DEFERRED = 3,  /* temporary failure; text = reason; next_us */
	DLOG_BOUNCED = 4,   /* permanent failure; text = reason */
	DLOG_EXPIRED = 5,   /* queue lifetime over; text = last reason */
	DLOG_DELETED = 6,   /* operator deleted (rcpt or DLOG_ALL) */
	DLOG_HELD = 7,      /* message held by the operator (DLOG_ALL) */
	DLOG_RELEASED = 8,  /* hold lifted */
	/* the DSN covering rcpt was delivered or given up: never send it
	 * again */
	DLOG_DSN_DONE = 9,
	/* duplicate whose first copy's outcome applies; aux = original id */
	DLOG_SUPPRESSED = 10,
	DLOG_NOTE = 11, /* free-form message-level note */
	/* the 250 of this message may not have reached its client (RFC 1047:
	 * the connection ended with the reply unacknowledged); text = the
	 * message's fingerprint (64 hex digits), time_us = when */
	DLOG_INDOUBT = 12,
	/* Internal, written by the log itself: never handed to a replay
	 * function, refused by dlog_append() and by emit(). The codec
	 * accepts them so that tools and tests can read whole files.
	 * BEGIN: msgid = generation, aux = previous generation (0: new log).
	 * END: msgid = generation, aux = number of state records. */
	DLOG_CKPT_BEGIN = 64,
	DLOG_CKPT_END = 65,
};

/* aux of DEFERRED, BOUNCED and EXPIRED: the text is (EXPIRED: ends with)
 * the next hop's own reply, not a reason of ours; the DSN then names the
 * route's host in Remote-MTA. Records before 2026-12-05 have 0. */
#define DLOG_AUX_REMOTE 1u

#define DLOG_ALL 0xffffffffu
#define DLOG_TEXT_MAX 1024
#define DLOG_VERSION 1u
#define DLOG_REC_HDR_LEN 56u
#define DLOG_REC_MAX (DLOG_REC_HDR_LEN + DLOG_TEXT_MAX)
#define DLOG_FILE_HDR_LEN 64u
/*
 * File layout, by the header's version. 2 (written now): copy 0 at 0,
 * copy 1 at 4096, records from 8192, so that the two copies never share a
 * device block (4096 bytes on most disks) with each other or with appended
 * records. 1 (still read): both copies in the first 128 bytes, records
 * from 128; one unreadable sector there took both.
 */
#define DLOG_FILE_VERSION 2u
#define DLOG_FILE_HDR1_OFF 4096u
#define DLOG_FILE_DATA_OFF 8192u
#define DLOG_FILE_V1_HDR1_OFF 64u
#define DLOG_FILE_V1_DATA_OFF 128u

struct dlog_rec {
	enum dlog_type type;
	uint64_t msgid;
	uint32_t rcpt; /* recipient index in the envelope, or DLOG_ALL */
	uint32_t attempts;
	uint64_t time_us; /* CLOCK_REALTIME */
	uint64_t next_us; /* DEFERRED: next attempt; else 0 */
	uint64_t aux;     /* type-specific, else 0 */
	/* text_len bytes, not necessarily NUL-terminated; NULL/0 none;
	 * longer than DLOG_TEXT_MAX is truncated to it (bytes, not
	 * characters). Borrowed: only read during the call. */
	const char *text;
	uint16_t text_len;
};

struct dlog_params {
	/* dlog_want_checkpoint() turns true past this file size (and twice
	 * the last checkpoint's size); default 64 MiB */
	uint64_t rotate_bytes;
	/* group commit: extra wait to gather records after the first
	 * arrives; default 0 (natural batching: what accumulated while the
	 * previous fdatasync ran) */
	uint64_t flush_delay_us;
	/* how long records appended with dlog_append_lazy() alone may wait
	 * for a flush; default 10 ms */
	uint64_t lazy_delay_us;
	/* hard cap on bytes waiting for the writer; appenders block above
	 * it; default 16 MiB, at least DLOG_REC_MAX */
	uint64_t pending_max;
	/* benchmarks only: skip fdatasync. UNSAFE: nothing is durable, and
	 * dlog_wait() still reports success. */
	bool no_sync;
	/* the writer thread runs this many nice steps below the caller's
	 * priority (at most nice 19); default 0 */
	unsigned nice;
};
void dlog_params_defaults(struct dlog_params *p);

/*
 * Called once per replayed record, in log order; r and r->text are valid
 * during the call only. Non-zero stops the replay and is returned.
 */
typedef int (*dlog_replay_fn)(void *ctx, const struct dlog_rec *r);

struct dlog_open_stats {
	uint64_t files;   /* *.log files found */
	uint64_t records; /* replayed through fn */
	uint64_t records_bad; /* damaged regions skipped (one per resync) */
	uint64_t bytes;       /* valid bytes of the file replayed */
	uint64_t generation;  /* of the file now appended to */
	bool checkpoint_used; /* state came from a dlog_checkpoint() file */
	bool complete; /* the file's checkpoint was complete; false only when
			* damage left no complete file (then nothing was
			* deleted; see docs) */
	uint64_t files_bad;     /* header unreadable: renamed *.bad */
	uint64_t files_removed; /* older or incomplete newer, deleted */
	uint64_t tail_bytes;    /* torn tail cut off after the last record */
};

struct dlog;

/*
 * Open (mkdir if needed) the log in `dir`. First replays every valid record
 * of the current state in order through fn (may be NULL): the checkpoint's
 * records first, then later appends. Then starts the writer thread and
 * returns the handle, ready for appends.
 *
 * NULL with *err = -errno on failure (unreadable dir, I/O error), or with
 * *err = fn's non-zero result if fn stopped the replay (the directory is
 * then left as it was). Damaged records are skipped and counted, the scan
 * resynchronises on the next valid record, a torn tail is cut off (normal
 * after a crash); damage is logged at warn level. Never fails because of
 * damaged content. p NULL: defaults. st may be NULL.
 */
struct dlog *dlog_open(const char *dir, const struct dlog_params *p,
		       dlog_replay_fn fn, void *ctx,
		       struct dlog_open_stats *st, int *err);

/*
 * Copy the record into the pending buffer and return its LSN (> 0); the
 * writer thread writes and fdatasyncs pending records in batches (group
 * commit). Never blocks on I/O: only briefly on the mutex, while a
 * checkpoint is written, and while the pending buffer is at pending_max.
 * 0 when the log has failed permanently, is closing, or r is invalid (not a
 * public type, text NULL with text_len > 0, or called from inside snap()).
 */
uint64_t dlog_append(struct dlog *l, const struct dlog_rec *r);

/*
 * The same for a record nobody will dlog_wait() for soon (a delivery's
 * result: only the release of a finished message waits for it, through
 * dlog_durable()). It does not start a flush of its own: it goes with the
 * next one that a dlog_append() or a dlog_wait() starts, or after
 * lazy_delay_us. Each flush is a device cache flush that the spool's
 * durable writes, on the same disk, queue behind.
 */
uint64_t dlog_append_lazy(struct dlog *l, const struct dlog_rec *r);

/*
 * Block until every record up to lsn is durable. 0, -EINVAL for an LSN not
 * handed out yet, or -errno once the log has failed: an I/O error (write,
 * fdatasync) is permanent and every later wait fails.
 */
int dlog_wait(struct dlog *l, uint64_t lsn);

/* Highest durable LSN; non-blocking. */
uint64_t dlog_durable(const struct dlog *l);
/* Highest LSN handed out (appended, durable or not). */
uint64_t dlog_appended(const struct dlog *l);

/* 0, or the -errno that failed the log (permanent until it is reopened);
 * non-blocking. */
int dlog_error(const struct dlog *l);

/*
 * cb is called from the writer thread after each durable batch with the
 * highest durable LSN, without the log's lock held. It must not block and
 * must not call dlog_wait(), dlog_checkpoint() or dlog_close(). cb NULL
 * removes it; a call of the previous cb may still be running when this
 * returns (the writer copies it before unlocking).
 */
void dlog_set_durable_cb(struct dlog *l,
			 void (*cb)(void *ctx, uint64_t durable_lsn),
			 void *ctx);

/* The current file is past rotate_bytes and twice the size of the
 * checkpoint it began with. */
bool dlog_want_checkpoint(const struct dlog *l);

/*
 * Compaction. A new file (next generation) starts with the full current
 * state, produced by snap(), which calls emit(ectx, rec) once per state
 * record (public types only; emit returns 0 or -errno, and snap should
 * return that). snap NULL: an empty state.
 *
 * Pending records are made durable in the old file first; then appends from
 * other threads wait until the new file is in place. snap() runs in the
 * caller's thread and must not call dlog_append(). It must emit a state that
 * includes every record appended before dlog_checkpoint() was entered and
 * none appended later: the simple way is to update the in-memory state and
 * append under one lock of the caller's, and hold that lock around this call.
 *
 * The new file is made durable (fdatasync, rename into place, directory
 * fsync) before older files are deleted: a crash at any point leaves either
 * the old file (complete) or the new one (complete). 0, or snap's non-zero
 * result, or -errno; old files are kept and appends continue on the old
 * file on failure, except when the directory fsync after the rename fails:
 * then which file a crash would leave is unknown and the log fails
 * permanently (the error is returned and later waits fail).
 */
typedef int (*dlog_emit_fn)(void *ectx, const struct dlog_rec *r);
typedef int (*dlog_snapshot_fn)(void *ctx, dlog_emit_fn emit, void *ectx);
int dlog_checkpoint(struct dlog *l, dlog_snapshot_fn snap, void *ctx);

struct dlog_stats {
	uint64_t appended;
	uint64_t flushes; /* batches written and made durable */
	uint64_t bytes;   /* record bytes written by the writer */
	uint64_t checkpoints;
	uint64_t generation;
	uint64_t durable_lsn;
	uint64_t syncs;      /* fdatasync calls on the log file */
	uint64_t room_waits; /* appends that waited for pending room */
	uint64_t file_bytes; /* valid bytes in the current file */
	uint64_t space_waits; /* batch writes refused for want of space
			       * (ENOSPC, EDQUOT) and retried */
	uint64_t grow_failed; /* growths ahead refused for want of space */
	bool no_space;        /* a batch is waiting for space now */
	int error;            /* 0, or the permanent failure */
};
void dlog_get_stats(const struct dlog *l, struct dlog_stats *st);

/* Flush pending records durably, stop the writer, free. No call may be in
 * progress or follow. l NULL: nothing. */
void dlog_close(struct dlog *l);

/* Move the writer thread to cpus (opened before the DPDK EAL pinned the
 * process's cores: it must leave the busy-polled ones). 0 or -errno. */
int dlog_set_affinity(struct dlog *l, const cpu_set_t *cpus);

/* ---- codec (pure; also used by tools, tests and the fuzz target) ------ */

enum dlog_dec {
	DLOG_DEC_OK,
	DLOG_DEC_AGAIN, /* a valid prefix: more bytes needed; never an error */
	DLOG_DEC_ERR_MAGIC,
	DLOG_DEC_ERR_VERSION,
	DLOG_DEC_ERR_TYPE,
	DLOG_DEC_ERR_LEN,
	DLOG_DEC_ERR_CRC,
	DLOG_DEC_ERR_FIELD, /* reserved field or padding not zero */
};
const char *dlog_dec_name(enum dlog_dec d);
const char *dlog_type_name(enum dlog_type t);
/* 1..12: the types a caller may append or emit. */
bool dlog_type_is_public(enum dlog_type t);

/*
 * A record: DLOG_REC_HDR_LEN + text, zero-padded to a multiple of 8.
 * Records in a log file are sealed with the file's secret salt (mixed into
 * the CRC, see docs) so that bytes copied into a text field can never pass
 * for a record; dlog_encode()/dlog_decode() use salt 0.
 * encode: bytes written, or 0 (cap too small, invalid type, text NULL with
 * text_len > 0, text on a CKPT record). decode: OK fills *r (r->text points
 * into p, NULL when empty) and *used.
 */
size_t dlog_encode(const struct dlog_rec *r, uint8_t *out, size_t cap);
enum dlog_dec dlog_decode(const uint8_t *p, size_t n, struct dlog_rec *r,
			  size_t *used);
size_t dlog_encode_salted(const struct dlog_rec *r, uint64_t salt,
			  uint8_t *out, size_t cap);
enum dlog_dec dlog_decode_salted(const uint8_t *p, size_t n, uint64_t salt,
				 struct dlog_rec *r, size_t *used);
/* Bytes a record with this much text occupies (text truncated as above). */
size_t dlog_rec_size(size_t text_len);

/* File header; written twice (see DLOG_FILE_VERSION for where). */
struct dlog_file_hdr {
	uint16_t version; /* 1 or 2; encode writes DLOG_FILE_VERSION for 0 */
	uint64_t generation; /* > 0 */
	uint64_t prev_generation; /* 0: a new log */
	uint64_t created_us;
	uint64_t salt;
};
void dlog_file_hdr_encode(const struct dlog_file_hdr *h, uint8_t *out);
enum dlog_dec dlog_file_hdr_decode(const uint8_t *p, size_t n,
				   struct dlog_file_hdr *h);

/*
 * The scanner replay uses, on a file image in memory (tools, fuzzing):
 * header (either copy), then records with resynchronisation. fn may be
 * NULL. 0 or fn's non-zero result.
 */
struct dlog_scan_result {
	struct dlog_file_hdr hdr;
	bool hdr_ok;
	uint64_t data_off;      /* where records start (by hdr.version) */
	bool complete;          /* CKPT_END of this generation found */
	bool tail_clean;        /* bytes after `end` are all zero */
	uint64_t records;       /* public records handed to fn */
	uint64_t records_bad;   /* resyncs past damage */
	uint64_t ckpt_records;  /* public records before CKPT_END */
	uint64_t ckpt_expected; /* the count CKPT_END states */
	uint64_t ckpt_end;      /* past CKPT_END; 0 without one */
	uint64_t end;           /* past the last valid record */
	uint64_t size;
};
int dlog_scan_mem(const uint8_t *p, size_t n, dlog_replay_fn fn, void *ctx,
		  struct dlog_scan_result *res);

/* ---- fault seam (tests) ----------------------------------------------- */

enum dlog_io {
	DLOG_IO_SYNC,     /* fdatasync of the current file (batch, open) */
	DLOG_IO_SYNC_NEW, /* fdatasync of a new file before its rename */
	DLOG_IO_RENAME,   /* GGGG.tmp -> GGGG.log */
	DLOG_IO_SYNC_DIR, /* fsync of the directory */
	DLOG_IO_UNLINK,   /* deleting an older or incomplete file */
	DLOG_IO_WRITE,    /* a batch's records into the current file */
	DLOG_IO_GROW,     /* zeros that grow the current file ahead */
};
const char *dlog_io_name(enum dlog_io op);

#ifdef FINALDOT_FAULT_INJECTION
/*
 * Called before each durability-relevant operation with the generation it
 * concerns (any thread, the writer's included). A non-zero return (-errno)
 * makes the operation fail with it, without doing it. Process-wide; set it
 * while no log is open. NULL removes it.
 */
typedef int (*dlog_io_hook_fn)(void *ctx, enum dlog_io op, uint64_t gen);
void dlog_set_io_hook(dlog_io_hook_fn fn, void *ctx);
#endif

#endif
