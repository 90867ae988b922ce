/*
 * Moved messages: a queued message's own file in SPOOL/moved/ (its id in
 * hex, ".msg"), so that a message deferred for days does not keep the
 * whole spool segment it arrived in (and every delivered message in it)
 * on disk. The queue manager decides what to move (qmgr.c); a delivery
 * thread writes the file; the queue manager then points the message at it
 * and drops its segment references.
 *
 * The file: a 64-byte header, the envelope as the spool encodes it
 * (spool_env_encode(): the same items, the same limits), then the body
 * exactly as the spool's pieces held it (after our Received header; the
 * body's CRC32C is the spool's END record's).
 *
 *   0  magic "FDMOVED1"       8  version u32 (1)   12 worker u32
 *   16 message id u64         24 body length u64
 *   32 body CRC32C u32        36 envelope length u32
 *   40 CRC32C of bytes 0..63 (this field zero) and the envelope
 *   44 zeros to 64
 * Little-endian. The body's own CRC is checked whenever it is read whole
 * (q_body_read()), as for a segment.
 *
 * Durability: written to SPOOL/moved/.tmp-ID, fsynced, renamed to ID.msg,
 * and the directory fsynced, before the message's segment references are
 * dropped: a crash at any point leaves the message in its segment, in its
 * file, or in both (recovery keeps the segment's copy then and deletes the
 * file). A file is deleted only once the message is finished and its
 * outcome durable in the delivery log, as a segment is reclaimed.
 */
#ifndef FINALDOT_CONTROL_MOVED_H
#define FINALDOT_CONTROL_MOVED_H

#include <stddef.h>
#include <stdint.h>

#include "finaldot/envelope.h"

#define MOVED_HDR_LEN 64u
#define MOVED_DIR "moved"

/* SPOOL/moved/ID.msg (or .tmp-ID with tmp) into buf. */
void moved_path(char *buf, size_t n, const char *spool_dir, uint64_t id,
		int tmp);

/*
 * Write the file for message id: env, then body_len bytes from read()
 * (offsets 0.. in order, at most n octets a call; a negative return is
 * its -errno, and 0 or more than n is -EIO: a bad source). Durable when
 * this returns 0, with *body_off the body's offset in the file. -errno
 * otherwise, no file left behind (the temporary one removed).
 */
int moved_write(const char *spool_dir, uint64_t id, unsigned worker,
		const struct fd_envelope *env, uint64_t body_len,
		uint32_t body_crc,
		long (*read)(void *ctx, uint64_t off, void *buf, size_t n),
		void *ctx, uint64_t *body_off);

struct moved_info {
	uint64_t id;
	unsigned worker;
	uint64_t body_len;
	uint32_t body_crc;
	uint64_t body_off;
	struct fd_envelope env; /* valid while the scratch given is */
};

/*
 * Read and check the header and envelope of the file open at fd (size
 * bytes long): 0 and *mi filled, the envelope decoded into scratch (of
 * scratch_len >= moved_scratch_max() bytes); -EBADMSG for a file that is
 * not a whole, intact moved message (its envelope checked; the body's CRC
 * is checked when it is read); -errno for a read error.
 */
int moved_read(int fd, uint64_t size, struct moved_info *mi, void *scratch,
	       size_t scratch_len);
size_t moved_scratch_max(void);

#endif
