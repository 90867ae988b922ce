/*
 * Recipient verification by probe (like Postfix's reject_unverified_
 * recipient): at RCPT time, ask the route's next hop whether it takes mail
 * for the address, so that finaldot never accepts mail it would have to
 * bounce (a bounce to a forged sender is backscatter).
 *
 * The SMTP engine asks on a worker thread and must not block, so:
 *  - a cached answer is given at once: valid (250) or unknown (550 5.1.1);
 *  - an address not in the cache (or whose entry expired) is queued for a
 *    probe thread and answered "not known yet" (450 4.1.1: the client
 *    retries, as it does for greylisting, and then finds the answer);
 *  - a probe that cannot tell (next hop down, 4xx, timeout) is cached as
 *    such for a short while and answered 450 4.1.1 meanwhile;
 *  - an address whose route is local (maildir:) is valid without a probe.
 * A probe is MAIL FROM:<> / RCPT TO:<addr> / RSET (smtpc_probe()), over a
 * connection each probe thread keeps to its last next hop.
 *
 * Cache: a fixed table of max_entries slots (open addressing on a 64-bit
 * hash of the address with its domain lower-cased: the local part keeps
 * its case, which only its own host may interpret; a full table
 * overwrites its oldest entry in the probe window); one mutex, held for a
 * lookup or an update only, never across I/O. Probes waiting: at most
 * queue_max, and at most queue_max / VERIFY_HOP_SHARE for one next hop;
 * beyond that the address is answered 450 and not queued (it will be, on a
 * retry). One probe at a time per next hop, each waiting
 * --verify-timeout (VERIFY_TIMEOUT_MS by default) at most for its next hop
 * (the route's timeouts, capped: qmgr.c's verify_open), and a next hop
 * that gave no answer rests for tempfail_ttl_ms (its addresses are
 * answered "could not tell" meanwhile): a dead or hung next hop never
 * holds up the probes of other routes. Before 2026-12-05 a hung one held
 * a thread for --smtp-timeout (300 s) while its addresses filled the
 * whole queue, and every other route's got 450.
 */
#ifndef FINALDOT_CONTROL_VERIFY_H
#define FINALDOT_CONTROL_VERIFY_H

#define VERIFY_TIMEOUT_MS 30000u
#define VERIFY_HOP_SHARE 8u

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct smtpc;
struct smtpc_reply;
struct verify;

/*
 * addr's route: *local = true when it is local (no probe: the address is
 * valid); key: the next hop's identity (its route text), to reuse a
 * connection. With connect, also open a connection to it: NULL with why
 * filled on failure. Without, returns NULL and only resolves (why may be
 * NULL then); it is called on the engine's worker threads: no blocking.
 */
typedef struct smtpc *(*verify_open_fn)(void *ctx, const char *addr,
					 bool connect, char *key,
					 size_t key_len, bool *local,
					 struct smtpc_reply *why);

struct verify_opts {
	unsigned threads;         /* probe threads (default 2) */
	size_t max_entries;       /* cache slots (default 65536) */
	unsigned queue_max;       /* probes waiting (default 1024) */
	uint64_t positive_ttl_ms; /* valid (default 7 days) */
	uint64_t negative_ttl_ms; /* unknown (default 3 hours) */
	uint64_t tempfail_ttl_ms; /* could not tell (default 60 s) */
	/* The clock (CLOCK_MONOTONIC ms); NULL: the real one (tests). */
	uint64_t (*now_ms)(void);
};

void verify_opts_defaults(struct verify_opts *o);

/* Starts the probe threads. NULL on failure (errno). */
struct verify *verify_new(const struct verify_opts *o, verify_open_fn open,
			  void *ctx);
/* Stops the threads (a probe in flight is abandoned at its next timeout
 * at the latest: connections are aborted) and frees everything. */
void verify_free(struct verify *v);

/* The engine's rcpt_check: 1 valid, 0 unknown, -1 not known now. Any
 * thread; never blocks on I/O. */
int verify_check(struct verify *v, const char *addr);

struct verify_stats {
	uint64_t hits;      /* answered from the cache */
	uint64_t misses;    /* not in the cache: probe queued (or full) */
	uint64_t probes;    /* probes done */
	uint64_t not_probed; /* tempfail at once: its next hop is resting */
	uint64_t valid, unknown, tempfail; /* their outcomes */
	uint64_t queue_full; /* a probe could not be queued */
	uint64_t entries;   /* cached now */
};
void verify_get_stats(struct verify *v, struct verify_stats *out);

#endif
