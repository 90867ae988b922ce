/*
 * The control plane: what happens to an accepted message after its 250
 * (the durable write is the acceptor's; all slow work is here). It rebuilds the queue at start from the spool scan plus the
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
	unsigned delivery_nice;     /* nice steps: delivery, dlog writer */
	unsigned dest_concurrency;  /* per next hop, at most */
	uint64_t retry_min_ms;
	uint64_t retry_max_ms;
	/* a queued message in a segment sealed this long ago is copied to
	 * spool/moved/ (qmgr.c, "moved messages"); 0: the default, 60 s */
	uint64_t move_after_ms;
	uint64_t queue_lifetime_ms;
	uint64_t connect_timeout_ms;
	uint64_t cmd_timeout_ms;    /* RFC 5321 4.5.3.2: 5 minutes */
	uint64_t data_timeout_ms;   /* reply to the final dot: 10 minutes */
	uint64_t dlog_rotate_bytes;
	uint64_t shutdown_timeout_ms;
	bool delivery;              /* false: queue, never deliver */
	/* RFC 1047: a message whose 250 may not have reached its client is
	 * remembered for dedup_window (0: off) and held for dedup_settle
	 * before delivery; a later message with the same fingerprint within
	 * the window is answered 250 as usual but not delivered again. */
	uint64_t dedup_window_ms;
	uint64_t dedup_settle_ms;
	/* STARTTLS to next hops without a tls= of their own (route.h):
	 * "none", "may" (the default), "encrypt" or "verify"; the CA file for
	 * verify ("" or NULL: the system store). */
	const char *smtp_tls;
	const char *smtp_tls_ca;
	/* RCPT-time verification by probing the next hop (verify.h), when
	 * there is no recipients table; TTLs 0: the defaults. */
	bool verify_recipients;
	uint64_t verify_positive_ttl_ms;
	uint64_t verify_negative_ttl_ms;
	uint64_t verify_timeout_ms; /* 0: VERIFY_TIMEOUT_MS */
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
/*
 * Raise seeds[w] (the recovery scan's largest id of worker w, n workers)
 * past every message id the delivery log named at cp_create(): a message
 * whose segments were reclaimed is on no disk, but its records (DELIVERED,
 * DELETED...) stay in the log until a checkpoint, and a new message given
 * its id (a clock stepped back at the restart) would be finished by them
 * at the next replay, never delivered.
 */
void cp_raise_msgid_seeds(const struct cplane *cp, uint64_t *seeds,
			  unsigned n);
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

/*
 * A message's history from the delivery log: every record about id in the
 * log files (since the last compaction: a checkpoint keeps the state, not
 * the steps), oldest first, to fn (return non-zero to stop). Reads the
 * files on the caller's thread (a control thread, never the queue
 * manager's): milliseconds per MiB of log. 0, or -errno.
 */
struct dlog_rec;
typedef int (*cp_history_fn)(void *ctx, const struct dlog_rec *r);
int cp_history(struct cplane *cp, uint64_t id, cp_history_fn fn, void *ctx);

/*
 * SIGHUP: a new configuration for delivery: routes, relay, bounce relay,
 * --smtp-tls and its CA, retry settings, queue lifetime, per-destination
 * concurrency, the accepted domains (bounces to senders there are routed
 * like mail to them; copied). Checked first (a bad route: -EINVAL with why, nothing
 * changes); then swapped in on the queue manager's thread: deliveries in
 * flight finish where they were going, every message takes the new routes
 * when it is next tried. Other fields of nc are ignored (read at start).
 * The strings of nc are not kept.
 */
int cp_reload(struct cplane *cp, const struct cp_config *nc, char *why,
	      size_t why_len);

/* SIGHUP: read the --recipients file again; on failure (why says it) the
 * table in use stays. 0 also when there is no table. One caller at a time
 * (the thread that takes signals). */
int cp_reload_recipients(struct cplane *cp, char *why, size_t why_len);
/* Stops dispatching, waits (at most shutdown_timeout) for deliveries in
 * flight, makes the log durable. Call after the workers stopped. */
void cp_stop(struct cplane *cp);
void cp_free(struct cplane *cp);

/* ---- the operator's view (control socket, metrics) ----------------------
 *
 * Counters and queue sizes, published by the queue manager a few times a
 * second; any thread may read them (a copy under a lock). */
#define CP_ROUTES_PUB 32

struct cp_stats {
	uint64_t started_us;
	uint64_t messages;   /* in memory: queued, and finished ones whose
			      * segments are not reclaimed yet */
	uint64_t active;     /* a delivery is running */
	uint64_t deferred;   /* waiting for a retry (or the first try) */
	uint64_t held;
	uint64_t segments;
	uint64_t queued_total, delivered_total, deferred_total, bounced_total;
	uint64_t expired_total, dsn_sent_total, dsn_dropped_total;
	uint64_t damaged_total; /* held: the body failed its checksum */
	uint64_t reclaimed_total;
	/* messages copied out of their segments into spool/moved/, and
	 * moves that failed (the message stays where it was) */
	uint64_t moved_total, move_failed_total;
	uint64_t indoubt_total, suppressed_total, indoubt_unknown_total;
	uint64_t indoubt_entries; /* remembered now */
	/* errno of the delivery log's permanent failure, 0 while it works:
	 * no delivery is attempted until a restart reopens it */
	uint64_t log_error;
	/* 1 while a delivery-log batch waits for space on a full disk:
	 * deliveries wait with it and go on by themselves once there is
	 * room */
	uint64_t log_no_space;
	/* Per next hop (route), for /metrics: the first CP_ROUTES_PUB to
	 * have traffic (each keeps its series: a counter never moves from
	 * one to another), the rest summed as route "other" (bounded
	 * labels; in practice every route fits: routes are configuration).
	 * Latency is from a delivery thread taking the job to its outcome,
	 * buckets as the final dot's (metrics.h). */
	unsigned n_routes;
	struct cp_route_stats {
		char route[128];
		uint64_t lat[18]; /* CTL_LAT_BUCKETS + 1 */
		uint64_t lat_sum_ns;
		uint64_t delivered, deferred, bounced; /* per recipient */
		uint64_t batches; /* taken by a delivery thread at once */
	} routes[CP_ROUTES_PUB + 1];
};
void cp_get_stats(struct cplane *cp, struct cp_stats *st);

/*
 * Run fn(cp, arg) on the queue manager's thread and return its result: the
 * one way another thread may look at or change the queue. Blocks until it
 * ran (the queue manager takes calls every iteration: milliseconds).
 * -ESHUTDOWN once the control plane is stopping.
 */
typedef int (*cp_call_fn)(struct cplane *cp, void *arg);
int cp_call(struct cplane *cp, cp_call_fn fn, void *arg);

/* A message as the operator sees it; every pointer is valid only during
 * the callback (it runs on the queue manager's thread: copy, do not
 * block). */
struct cp_rcpt_view {
	const char *addr;
	const char *orcpt;  /* "" none */
	const char *state;  /* pending, delivered, bounced, expired, deleted */
	const char *reason; /* last reply or reason, "" none */
	const char *route;  /* the next hop's key, "" none */
	uint32_t attempts;
	uint64_t next_us;   /* pending: next attempt (0: now); else 0 */
	uint64_t last_us;   /* last attempt, 0 none */
	bool busy;          /* a delivery is running */
};
struct cp_msg_view {
	uint64_t id;
	unsigned worker;
	uint64_t arrival_us;
	uint64_t size;      /* stored bytes (our Received header included) */
	const char *sender; /* "" = null sender */
	const char *helo;
	const char *client;
	const char *envid;
	bool held;
	bool finished;
	const char *state;  /* active, deferred, held, finished */
	bool indoubt;       /* its 250 may not have reached the client */
	uint64_t dup_of;    /* suppressed as a resend of this id, or 0 */
	uint64_t settle_until;
	unsigned n_rcpts;
	const struct cp_rcpt_view *rcpts;
};
typedef int (*cp_msg_view_fn)(void *ctx, const struct cp_msg_view *v);

/*
 * Queue listing in chunks, so a million-message queue streams without
 * being built in memory: each call passes up to `max` messages (finished
 * ones skipped) from position *cursor (0 to start) to fn and advances
 * *cursor. Returns 1 while more may follow, 0 at the end, fn's non-zero
 * result, or -errno. A live walk (like mailq): messages queued or removed
 * meanwhile may or may not be listed. Call from any thread but the queue
 * manager's.
 */
int cp_queue_list(struct cplane *cp, uint64_t *cursor, unsigned max,
		  cp_msg_view_fn fn, void *ctx);
/* One message: 0, -ENOENT, or fn's result. */
int cp_queue_show(struct cplane *cp, uint64_t id, cp_msg_view_fn fn,
		  void *ctx);
/*
 * The stored bytes of one message, read by the caller a piece at a time so
 * that neither the queue manager nor the caller holds the message whole.
 *
 * cp_queue_cat_open() runs on the queue manager's thread just long enough
 * to find the message, take a reference on each of its segments (a pinned
 * segment is never handed back to its worker, so its bytes stay this
 * message's however long the reading takes) and copy where the body lies
 * (segment, offset, length per piece; a descriptor of its own per
 * segment). 0 with *out, -ENOENT (not in memory, or already released),
 * -ENOMEM, -EBADF (a segment could not be opened) or -ESHUTDOWN. A message
 * that is finished but not yet released can be read, as queue.show shows
 * it.
 *
 * cp_queue_cat_read() runs on the caller's thread, never the queue
 * manager's: the next at most n bytes, read with pread() from where the
 * last call stopped. It returns their count, 0 at the end, -EIO when the
 * body does not match its CRC32C (checked before the bytes that complete
 * the body are returned, so a damaged body never reads to its end) or when
 * the segment is shorter than recorded, or -errno.
 *
 * cp_queue_cat_close() drops the references (a cp_call) and frees k,
 * whatever it returns: 0, -ESTALE when the message was queued at open
 * and has finished since (delivered, bounced, deleted: the bytes read
 * were still its own, but the caller should not present a message that
 * left the queue as a successful read), or -ESHUTDOWN (the queue manager
 * stopped: its segments go with it).
 */
struct cp_cat;
int cp_queue_cat_open(struct cplane *cp, uint64_t id, struct cp_cat **out);
long cp_queue_cat_read(struct cp_cat *k, void *buf, size_t n);
int cp_queue_cat_close(struct cplane *cp, struct cp_cat *k);

enum cp_action {
	CP_HOLD = 1,    /* no delivery until released (jobs running finish) */
	CP_RELEASE = 2,
	CP_DELETE = 3,  /* every recipient not yet final: deleted, no DSN */
	CP_FLUSH = 4,   /* retry now (a dead next hop is tried again too) */
};
/*
 * Apply a to the n messages in ids, or to every queued message when n is
 * 0 (ALL), or, for CP_FLUSH with to_domain, to every message with a
 * pending recipient in that domain. Each change is recorded in the
 * delivery log. *affected: messages changed; *unknown: ids not found
 * (may be NULL). 0 or -errno.
 */
int cp_queue_action(struct cplane *cp, enum cp_action a, const uint64_t *ids,
		    size_t n, const char *to_domain, size_t *affected,
		    size_t *unknown);

#endif
