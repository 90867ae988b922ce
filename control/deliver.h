/*
 * Delivery threads (private to the control plane): each takes jobs from
 * the queue manager (queue.h), a batch for one next hop at a time, performs
 * them (SMTP or LMTP to a next hop, pipelined; Maildir; or a DSN to a
 * sender), fills in the per-recipient outcomes and hands the batch back.
 * Blocking I/O with timeouts; one cached connection per thread, reused for
 * the next batch to the same next hop.
 */
#ifndef FINALDOT_CONTROL_DELIVER_H
#define FINALDOT_CONTROL_DELIVER_H

#include <stdbool.h>
#include <stdint.h>

struct cplane;
struct cp_config;
struct dlog;
struct q_job;

struct deliver_ctx {
	struct cplane *cp;
};

struct smtpc;
struct smtpc_reply;

/* A connection to a next hop (enum route_kind, its address, enum route_tls
 * already resolved, the CA file or ""), with the daemon's timeouts and
 * HELO name; each timeout at most cap_ms when cap_ms is not 0 (a recipient
 * probe's). NULL with why filled. Any thread. */
struct smtpc *deliver_connect(struct cplane *cp, int kind, const char *host,
			      uint16_t port, const char *path, int tls,
			      const char *tls_ca, uint64_t cap_ms,
			      struct smtpc_reply *why);

/* pthread entry point; arg is a struct deliver_ctx. */
void *deliver_main(void *arg);

/* The queue manager's side (qmgr.c). take: first the n_done jobs of the
 * thread's last batch back, results filled, with its slot in their next
 * hop's window; then jobs for one next hop, at most max (QJ_BATCH_FAST),
 * preferring next hop `prefer` (the thread's cached connection), waiting
 * at most wait_ms; 0 if none. A next hop at its concurrency window
 * (threads working for it) is skipped; the jobs waiting for a slow one
 * are shared out among the threads its window still allows (at most
 * QJ_BATCH each), a fast one's go in whole batches (qmgr.c,
 * dest_wants_thread). done and out may be the same array. */
unsigned cp_job_take(struct cplane *cp, struct q_job **done, unsigned n_done,
		     const char *prefer, uint64_t wait_ms, struct q_job **out,
		     unsigned max);
bool cp_quitting(struct cplane *cp);
const char *cp_hostname(const struct cplane *cp);
/* The domain a bare <postmaster> stands for: the first accepted one. */
const char *cp_postmaster_domain(const struct cplane *cp);
const struct cp_config *cp_config_of(const struct cplane *cp);
/* d's STARTTLS policy and CA file, copied under the queue manager's lock
 * (a reload rewrites them). */
struct q_dest;
void cp_dest_tls(struct cplane *cp, const struct q_dest *d, int *tls,
		 char *ca, size_t n);
struct dlog *cp_log(const struct cplane *cp);

#endif
