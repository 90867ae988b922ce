/*
 * Message ids: 64 bits, unique across worker threads and restarts, sortable
 * by arrival.
 *
 *   id = (microseconds since the epoch) << 8 | worker       (worker < 256)
 *
 * Each worker's generator is monotonic: next = max(now_us, last_us + 1), so
 * two messages of one worker never share an id even within one microsecond,
 * and two workers differ in the low byte. Across restarts the generator is
 * seeded with the largest id recovery found, so a clock stepped backwards
 * does not reuse an id. The text form is 16 upper-case hex digits, the
 * "queued as" id in replies and the file-independent name operators use.
 */
#ifndef FINALDOT_MSGID_H
#define FINALDOT_MSGID_H

#include <stdbool.h>
#include <stdint.h>

#define FD_MSGID_TEXT_LEN 16 /* without the NUL */

struct fd_msgid_gen {
	uint64_t last_us;
	uint8_t worker;
};

void fd_msgid_init(struct fd_msgid_gen *g, uint8_t worker, uint64_t seed_id);
uint64_t fd_msgid_next(struct fd_msgid_gen *g, uint64_t now_us);

/* buf must hold FD_MSGID_TEXT_LEN + 1 bytes; returns buf. */
char *fd_msgid_format(uint64_t id, char *buf);
/* Parses exactly 16 hex digits (either case). Returns false otherwise. */
bool fd_msgid_parse(const char *s, uint64_t *id);

static inline unsigned
fd_msgid_worker(uint64_t id)
{
	return (unsigned)(id & 0xff);
}

static inline uint64_t
fd_msgid_time_us(uint64_t id)
{
	return id >> 8;
}

/* CLOCK_REALTIME and CLOCK_MONOTONIC in microseconds. */
uint64_t fd_now_realtime_us(void);
uint64_t fd_now_monotonic_us(void);
/* The same clock in nanoseconds (latencies). */
uint64_t fd_now_monotonic_ns(void);

#endif
