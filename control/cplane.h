/*
 * The control plane: what happens to an accepted message after its 250
 * (DESIGN.md). It rebuilds the queue at start from the spool scan plus the
 * delivery log, follows every worker's spool as it becomes durable, hands
 * messages to delivery threads (SMTP/LMTP relay, Maildir), retries with
 * back-off, sends DSNs, and gives finished segments back to their workers.
 *
 * Threads: one queue-manager thread and `delivery_threads` delivery
 * threads, all ordinary pthreads started by cp_start() with the CPU set
 * given (never a busy-polled DPDK lcore). The workers talk to it only
 * through their ports (finaldot/ctlport.h).
 *
 * Life cycle (main thread): cp_create() before the workers start (after
 * the recovery scan), cp_attach() and cp_port() for each worker,
 * cp_start(), the workers run, the workers stop, cp_stop(), cp_free().
 */
#ifndef FINALDOT_CONTROL_CPLANE_H
#define FINALDOT_CONTROL_CPLANE_H

#include <sched.h>
#include <stdbool.h>
#include <stdint.h>

struct ctl_spool_scan;
struct fd_ctl_port;
struct cplane;

struct cp_config {
	const char *spool_dir;
	const char *hostname;
	const char *const *domains; /* accepted domains */
	unsigned n_domains;
	const char *const *routes;  /* "DOMAIN=TARGET" */
	unsigned n_routes;
	const char *relay;          /* TARGET or "" */
	const char *bounce_relay;   /* TARGET or "" */
	const char *default_route;  /* used when no route and no relay */
	const char *recipients;     /* valid-recipients file or "" */
	unsigned delivery_threads;
	unsigned dest_concurrency;  /* per next hop, at most */
	uint64_t retry_min_ms;
	uint64_t retry_max_ms;
	uint64_t queue_lifetime_ms;
	uint64_t connect_timeout_ms;
	uint64_t cmd_timeout_ms;    /* RFC 5321 4.5.3.2: 5 minutes */
	uint64_t data_timeout_ms;   /* reply to the final dot: 10 minutes */
	uint64_t dlog_rotate_bytes;
	uint64_t shutdown_timeout_ms;
	bool delivery;              /* false: queue, never deliver */
};

/*
 * Parse and check the routing settings alone (for --check-config and
 * before anything starts): 0, or -EINVAL with one line in why.
 */
int cp_check_config(const struct cp_config *c, char *why, size_t why_len);

/*
 * Rebuild the queue from a recovery scan (the caller frees the scan after)
 * and the delivery log under spool_dir/dlog. NULL with *err = -errno and a
 * log line on failure.
 */
struct cplane *cp_create(const struct cp_config *c,
			 const struct ctl_spool_scan *scan, int *err);
/* The number of workers is known only once the transport is set up (a
 * DPDK port may give fewer queues than lcores): make their ports. 0 or
 * -errno. */
int cp_attach(struct cplane *cp, unsigned workers);
struct fd_ctl_port *cp_port(struct cplane *cp, unsigned worker);
void *cp_rcpt_ctx(const struct cplane *cp);
/* The SMTP engine's recipient check (see smtp_config.rcpt_check), or
 * NULL when no --recipients table is configured. */
int (*cp_rcpt_check_fn(const struct cplane *cp))(void *, const char *);
int cp_start(struct cplane *cp, const cpu_set_t *cpus);
/* Stops dispatching, waits (at most shutdown_timeout) for deliveries in
 * flight, makes the log durable. Call after the workers stopped. */
void cp_stop(struct cplane *cp);
void cp_free(struct cplane *cp);

#endif
