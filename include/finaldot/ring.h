/*
 * A single-producer single-consumer ring of fixed-size entries: how a
 * worker (a kernel-transport thread or a DPDK lcore) talks to the control
 * plane without a lock or a system call.
 *
 * Contract: exactly one thread calls fd_ring_push() and exactly one other
 * thread calls fd_ring_pop() on a ring, for its whole life. Push never
 * blocks: a full ring refuses the entry (the producer decides what a lost
 * entry means; the spool's announcements are built so that a later one
 * supersedes an earlier one). Entries are copied in and out.
 *
 * Memory ordering: the producer writes the entry, then publishes the new
 * head with release; the consumer reads the head with acquire, copies the
 * entry, then publishes the new tail with release, which the producer reads
 * with acquire before reusing the slot. Each side keeps a cached copy of
 * the other's index so that a push or pop touches the shared cache line
 * only when the cached view says the ring is full or empty.
 */
#ifndef FINALDOT_RING_H
#define FINALDOT_RING_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

struct fd_ring {
	_Alignas(64) _Atomic uint64_t head; /* next slot to fill (producer) */
	uint64_t tail_cache;                /* producer's view of tail */
	uint64_t refused;                   /* pushes refused: ring full */
	_Alignas(64) _Atomic uint64_t tail; /* next slot to read (consumer) */
	uint64_t head_cache;                /* consumer's view of head */
	_Alignas(64) uint64_t mask;
	size_t esize;
	uint8_t *slots;
};

/* entries: a power of two >= 2; esize: bytes per entry. 0 or -ENOMEM /
 * -EINVAL. */
static inline int
fd_ring_init(struct fd_ring *r, uint64_t entries, size_t esize)
{
	memset(r, 0, sizeof(*r));
	if (entries < 2 || (entries & (entries - 1)) || esize == 0)
		return -22; /* EINVAL */
	r->slots = (uint8_t *)calloc((size_t)entries, esize);
	if (!r->slots)
		return -12; /* ENOMEM */
	r->mask = entries - 1;
	r->esize = esize;
	return 0;
}

static inline void
fd_ring_fini(struct fd_ring *r)
{
	free(r->slots);
	r->slots = NULL;
}

/* Producer only. false: full, nothing written (counted in refused). */
static inline bool
fd_ring_push(struct fd_ring *r, const void *e)
{
	uint64_t h = atomic_load_explicit(&r->head, memory_order_relaxed);

	if (h - r->tail_cache > r->mask) {
		r->tail_cache =
			atomic_load_explicit(&r->tail, memory_order_acquire);
		if (h - r->tail_cache > r->mask) {
			r->refused++;
			return false;
		}
	}
	memcpy(r->slots + (size_t)(h & r->mask) * r->esize, e, r->esize);
	atomic_store_explicit(&r->head, h + 1, memory_order_release);
	return true;
}

/* Producer only: room for n more entries now. */
static inline bool
fd_ring_room(struct fd_ring *r, uint64_t n)
{
	uint64_t h = atomic_load_explicit(&r->head, memory_order_relaxed);

	if (h + n - r->tail_cache <= r->mask + 1)
		return true;
	r->tail_cache = atomic_load_explicit(&r->tail, memory_order_acquire);
	return h + n - r->tail_cache <= r->mask + 1;
}

/* Consumer only. false: empty. */
static inline bool
fd_ring_pop(struct fd_ring *r, void *e)
{
	uint64_t t = atomic_load_explicit(&r->tail, memory_order_relaxed);

	if (t == r->head_cache) {
		r->head_cache =
			atomic_load_explicit(&r->head, memory_order_acquire);
		if (t == r->head_cache)
			return false;
	}
	memcpy(e, r->slots + (size_t)(t & r->mask) * r->esize, r->esize);
	atomic_store_explicit(&r->tail, t + 1, memory_order_release);
	return true;
}

#endif
