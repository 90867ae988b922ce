/*
 * A worker: one thread (or DPDK lcore) with its own SMTP sessions and its
 * own spool, sharing nothing with the others. The transport that runs the
 * worker's loop (sock/ or dpdk/, both through conn/) owns the connections;
 * this module wires the SMTP engine to the spool and routes the spool's
 * completions back to the sessions.
 */
#ifndef FINALDOT_WORKER_H
#define FINALDOT_WORKER_H

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "metrics.h" /* control/ */
#include "finaldot/compiler.h"
#include "finaldot/config.h"

struct fd_ctl_port;
struct fd_wmsg;
struct io_uring;
struct smtp_server;
struct smtp_session;
struct spool;

/* Called after the spool's verdict reached a session, so the transport can
 * send its reply and offer it held input again. tctx: the session's. */
typedef void (*fd_worker_wake_fn)(void *tctx);

struct fd_worker {
	unsigned id;
	const struct fd_config *cfg;
	struct smtp_server *smtp;
	struct spool *spool;
	fd_worker_wake_fn wake;
	uint64_t seed_msgid;          /* from recovery, before start */
	const cpu_set_t *helper_cpus; /* spool helper threads; NULL: inherit */
	struct fd_ctl_port *port;     /* to the control plane; NULL: none */
	/* Recipient check for RCPT (the control plane's --recipients
	 * table); NULL: every local part is accepted. */
	int (*rcpt_check)(void *ctx, const char *addr);
	void *rcpt_ctx;
	const char *domains[FD_CONFIG_MAX_DOMAINS];
	pthread_t thread;
	int wake_fd;                  /* eventfd: main thread -> worker */
	atomic_bool stop;
	atomic_bool ready;            /* listening; main may report "ready" */
	int exit_status;              /* 0 or -errno, set by the loop */
	uint64_t sessions_refused;
	/* The operator's view (control/metrics.h). The transport sets
	 * conns_current and paused_refused; fd_worker_poll() publishes. */
	unsigned conns_current;
	uint64_t paused_refused;
	uint64_t tls_failed, tls_resumed; /* the transport counts these */
	char paused_reply[320];       /* 421 4.3.2 ... CRLF (fd_paused) */
	size_t paused_len;
	struct fd_wmsg *wmsgs, *wmsg_free; /* a commit's start time, size */
	struct ctl_worker_stats priv; /* this thread's part of the counters */
	uint64_t pub_due_us;
	const struct fd_policy *policy_seen; /* the last one applied */
	struct ctl_worker_pub pub fd_cache_aligned; /* read by other threads */
} fd_cache_aligned;

/*
 * The listener is paused (finaldotctl pause): new connections get
 * paused_reply and are closed; open sessions go on. One flag for the
 * process, set by the control socket, read by every accept path.
 */
extern atomic_bool fd_paused;
/* STARTTLS: the certificates and ticket keys every worker shares, or NULL
 * (no --tls-cert: STARTTLS is not offered). Set by main before the workers
 * start; reloaded in place (tls/tls.h). */
struct fd_tls_server;
extern struct fd_tls_server *fd_tls;

/*
 * A reload's SMTP policy (smtp_server_set_policy): published by the thread
 * that takes signals, picked up by each worker in fd_worker_poll(), on its
 * own thread, between commands. Each worker names the one it applies in
 * fd_policy_held[its id] before it takes it (and takes a newer one if one
 * came meanwhile); main frees a retired policy only once no worker names
 * it. (It freed the one two reloads back: a worker that had not polled
 * since, stalled for a second, read freed memory.)
 */
struct fd_policy {
	const char *domains[FD_CONFIG_MAX_DOMAINS];
	char store[FD_CONFIG_MAX_DOMAINS][FD_CONFIG_STR];
	unsigned n_domains;
	uint64_t max_message_size;
	unsigned max_recipients, max_errors;
	uint64_t command_timeout_ms, data_timeout_ms;
	uint64_t idle_timeout_ms, greet_delay_ms; /* the connection layer's */
	struct fd_policy *retired_next; /* main's list of retired ones */
};
extern struct fd_policy *_Atomic fd_policy_live;
#define FD_POLICY_HOLDERS 256 /* worker ids: a spool's wNN */
extern const struct fd_policy *_Atomic fd_policy_held[FD_POLICY_HOLDERS];
/* The program's version (FINALDOT_VERSION), for both transports. */
extern const char fd_version[];

/*
 * The control socket and /metrics, for either transport: what they show
 * (the listen addresses, the workers' published counters through
 * worker_stats, DPDK's port and stack counters through net_stats or NULL)
 * and finaldotctl reload (a SIGHUP to this process). cpus: where their
 * threads run, or NULL. NULL and *err on failure (ctl_ops_start()).
 */
struct cplane;
struct ctl_ops;
struct ctl_ops *fd_ctl_start(const struct fd_config *cfg, struct cplane *cp,
			     const char *transport, unsigned n_workers,
			     void (*worker_stats)(void *ctx, unsigned i,
						  struct ctl_worker_stats *out),
			     void *worker_ctx,
			     void (*net_stats)(void *ctx,
					       struct ctl_net_stats *out),
			     const cpu_set_t *cpus, int *err);

/*
 * Create the worker's SMTP server and spool. ring: the transport's io_uring
 * to share with the spool, or NULL (the spool makes its own). Must run on
 * the worker's own thread (the ring's single issuer). 0 or -errno.
 */
int fd_worker_start(struct fd_worker *w, struct io_uring *ring,
		    fd_worker_wake_fn wake);
/*
 * Once per loop iteration (or timer tick): take the control plane's reclaim
 * requests and retry announcements its ring refused. Cheap when idle.
 */
void fd_worker_poll(struct fd_worker *w);

/* RFC 1047: a session ended with the 250 to msgid not acknowledged by the
 * client's TCP (the transport checked): tell the control plane. */
void fd_worker_indoubt(struct fd_worker *w, uint64_t msgid);

/* Logs the worker's counters as one event=stats line; frees everything. */
void fd_worker_finish(struct fd_worker *w);

/* Totals for the final stats line (filled by fd_worker_finish). */
struct fd_worker_totals {
	uint64_t messages;
	uint64_t failed;
	uint64_t rejected;
	uint64_t flushes;
	uint64_t batches;
	uint64_t bytes;
	uint64_t sessions;
};
void fd_worker_add_totals(const struct fd_worker *w,
			  struct fd_worker_totals *t);
/* The process's final event=stats line (tools/bench reads it): the same
 * fields whatever the transport. */
void fd_worker_log_totals(unsigned workers, const struct fd_worker_totals *t);

/* The worker's last published counters; any thread. */
void fd_worker_read_stats(const struct fd_worker *w,
			  struct ctl_worker_stats *out);

#endif
