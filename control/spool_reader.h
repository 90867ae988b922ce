/*
 * The spool reader: recovery's view of a spool root. Scans every worker
 * directory (dir/wNN/) and every segment in it, validates the segment
 * headers, walks the records (resynchronising at the next 4096-byte block
 * after anything invalid, so a torn batch never hides later ones), and
 * assembles messages. A message is committed iff its ENV, DATA records
 * covering [0, length) contiguously and in order, and its END (length and
 * body CRC32C matching) were all found with the segment's epoch.
 *
 * Damage it reports and works around (issue 10; docs/spool-format.md
 * "Recovery"): a segment whose header block is damaged is salvaged when its
 * epoch can still be established from its records (segments_salvaged),
 * else counted in segments_damaged (its file is never reused: the writer
 * keeps it); a copy of a segment under another name (same worker, use
 * sequence and epoch) is recognised, its records counted in records_dup
 * and every message kept once; a segment file listed in the worker's
 * segment list (wNN/segments) but absent is counted in segments_missing.
 * Each is logged as a warning naming the file.
 *
 * Users: the daemon at start (summary in the log, msgid generators seeded
 * with max_msgid[worker]), finaldotctl, tests, the fuzz target.
 *
 * Memory: an index (one entry and one piece per DATA record per message,
 * the envelopes of committed messages); segment bytes are read through a
 * 1 MiB window and never held whole. Bodies are streamed on demand.
 * Not thread-safe; a scan is a snapshot: it does not follow later writes.
 */
#ifndef FINALDOT_CONTROL_SPOOL_READER_H
#define FINALDOT_CONTROL_SPOOL_READER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "finaldot/envelope.h"

/* Where one DATA record's payload is. */
struct ctl_spool_piece {
	uint32_t seg;      /* index for ctl_spool_scan_segment() */
	uint32_t len;
	uint64_t file_off; /* of the payload in the segment file */
	uint64_t body_off;
};

struct ctl_spool_msg {
	uint64_t id;
	unsigned worker;
	struct fd_envelope env; /* valid while the scan is */
	uint64_t body_len;
	uint32_t body_crc;  /* CRC32C of the body */
	uint32_t env_seg;   /* ENV record: segment index, record offset */
	uint64_t env_off;
	uint32_t end_seg;   /* END record */
	uint64_t end_off;
	size_t n_pieces;
	const struct ctl_spool_piece *pieces; /* in body order */
};

struct ctl_spool_seg {
	const char *path; /* NULL for an in-memory segment */
	unsigned worker;
	bool header_ok;   /* valid, or salvaged */
	bool salvaged;    /* header damaged; epoch found from its records, file
			   * number from its name, use sequence as found */
	bool duplicate;   /* same worker, use sequence and epoch as an earlier
			   * segment: a copy (its records are duplicates) */
	uint64_t file_no;
	uint64_t use_seq;
	uint64_t size;
	uint64_t created_us;
	uint64_t records_ok;
	uint64_t records_bad;
	uint64_t records_stale;
	uint64_t committed; /* committed messages with a record here */
	bool read_error;    /* its open or a read failed: what lies past it
			     * was not scanned; never given back this run */
	bool kept_incomplete; /* holds records of a message left incomplete
			       * while another segment of its worker could
			       * not be read (its missing records may be
			       * there): never given back this run */
};

struct ctl_spool_summary {
	uint64_t segments;
	uint64_t segments_bad; /* header invalid or unreadable */
	uint64_t segments_empty; /* valid header, no valid record: spares */
	uint64_t segments_damaged;   /* header damaged (salvaged or not) */
	uint64_t segments_salvaged;  /* ... of which salvaged */
	uint64_t segments_duplicate; /* copies of another segment */
	uint64_t segments_missing;   /* listed in wNN/segments, not there */
	uint64_t records_dup;        /* valid records seen twice (copies) */
	uint64_t records_ok;
	uint64_t records_bad;   /* torn or damaged (one per resync) */
	uint64_t records_stale; /* intact but another epoch */
	uint64_t msgs_committed;
	uint64_t msgs_incomplete; /* some record seen, not committed */
	uint64_t body_bytes;      /* of committed messages */
	unsigned workers;         /* worker directories seen */
	uint64_t max_msgid[256];  /* largest id in any valid record; 0 none */
};

struct ctl_spool_scan;

/* NULL with *err = -errno (the root itself unreadable). Bad segments are
 * counted, not fatal. */
struct ctl_spool_scan *ctl_spool_scan_dir(const char *root, int *err);
/* One segment held in memory (tests, fuzzing); not copied: keep p alive. */
struct ctl_spool_scan *ctl_spool_scan_mem(const void *p, size_t n);
void ctl_spool_scan_free(struct ctl_spool_scan *s);

const struct ctl_spool_summary *
ctl_spool_scan_summary(const struct ctl_spool_scan *s);
/* One line, key=value, at info level. */
void ctl_spool_scan_log(const struct ctl_spool_scan *s);

/* Committed messages, sorted by id. */
size_t ctl_spool_scan_count(const struct ctl_spool_scan *s);
const struct ctl_spool_msg *ctl_spool_scan_msg(const struct ctl_spool_scan *s,
					       size_t i);
const struct ctl_spool_msg *ctl_spool_scan_find(const struct ctl_spool_scan *s,
						uint64_t id);

size_t ctl_spool_scan_nsegs(const struct ctl_spool_scan *s);
const struct ctl_spool_seg *
ctl_spool_scan_segment(const struct ctl_spool_scan *s, size_t i);

/* Return 0 to go on, anything else stops ctl_spool_read_body(). */
typedef int (*ctl_spool_body_fn)(void *ctx, const void *p, size_t n);
/*
 * Stream m's body, in order, to fn. 0; fn's non-zero result; -EIO if the
 * bytes read no longer match the body CRC (changed since the scan: reported
 * after they were streamed); -errno on a read error.
 */
int ctl_spool_read_body(const struct ctl_spool_scan *s,
			const struct ctl_spool_msg *m, ctl_spool_body_fn fn,
			void *ctx);

#endif
