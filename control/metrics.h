/*
 * The operator's numbers: what the workers publish (struct ctl_worker_stats,
 * the final-dot-to-250 latency buckets), what the DPDK transport adds
 * (struct ctl_net_stats), where the control socket and /metrics read them
 * (struct ctl_sources), and the /metrics server itself.
 *
 * Workers never wait for a reader: each keeps plain counters on its own
 * thread and copies them into per-field relaxed atomics from its loop,
 * every 5 ms while busy and at least every 100 ms (the loops' longest
 * wait; dataplane/worker.c); the readers here only load those.
 *
 * The /metrics server: one thread (started with the control plane's CPU
 * set, never on a worker or a busy-polled lcore) that answers GET /metrics
 * (and HEAD) in the Prometheus text exposition format 0.0.4, one request
 * per connection (HTTP/1.0 and 1.1, "Connection: close"); other paths get
 * 404, other methods 405, anything malformed 400. At most
 * METRICS_MAX_CONNS connections at once, each dropped after a few seconds
 * without a complete request. docs/operations.md lists every metric.
 */
#ifndef FINALDOT_CONTROL_METRICS_H
#define FINALDOT_CONTROL_METRICS_H

#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>

#include "finaldot/lathist.h"

struct cplane;

/* final-dot-to-250 latency buckets (finaldot/lathist.h: 50 us to 10 s,
 * and one more for what is above). */
#define CTL_LAT_BUCKETS FD_LAT_BUCKETS
/* Messages per flush: up to 1, 2, 4 ... 256; bytes per flush: up to 4 KiB,
 * 16 KiB ... 4 MiB (the spool's buckets: worker.c copies them). */
#define CTL_FLUSH_MSG_BUCKETS 9
#define CTL_FLUSH_BYTE_BUCKETS 6
static inline uint64_t
ctl_lat_bound_us(unsigned i)
{
	return fd_lat_bound_us(i);
}
/* The bucket of a latency in nanoseconds: 0..CTL_LAT_BUCKETS. */
static inline unsigned
ctl_lat_bucket(uint64_t ns)
{
	return fd_lat_bucket(ns);
}

/* One worker's counters, as last published (a plain copy for readers). */
struct ctl_worker_stats {
	uint64_t conns_current;   /* SMTP sessions open now */
	uint64_t sessions;        /* sessions opened */
	uint64_t refused_busy;    /* 421 4.7.0: no session free */
	uint64_t refused_paused;  /* 421 4.3.2: the listener is paused */
	uint64_t messages;        /* 250 after the final dot */
	uint64_t message_bytes;   /* their stored bytes (Received included) */
	uint64_t failed;          /* 451/452 after the spool said no */
	uint64_t rejected;        /* 5xx at the end of data */
	uint64_t syntax_errors;   /* 500/501/503/555..., relay denials not */
	uint64_t relay_denied;    /* 550 5.7.1 */
	uint64_t rcpt_unknown;    /* 550 5.1.1 */
	uint64_t early_talkers;   /* 554 */
	uint64_t timeouts;        /* 421 4.4.2 */
	uint64_t flushes;         /* durable writes issued */
	uint64_t batches;         /* batch writes completed ok */
	uint64_t batch_errors;    /* ... failed */
	uint64_t unflushed;       /* ok, written without a flush of their
				   * own (a later flush covers them) */
	uint64_t spool_bytes;     /* bytes written, padding included */
	uint64_t spool_payload;   /* record bytes */
	uint64_t segments;        /* segments taken into use */
	uint64_t reclaimed;       /* segments handed back */
	uint64_t room_waits;      /* a message waited for a batch buffer */
	uint64_t starttls;        /* 220 to STARTTLS */
	uint64_t tls_ok;          /* handshakes completed */
	uint64_t tls_resumed;     /* ... of which by session ticket */
	uint64_t tls_failed;      /* handshakes failed or timed out */
	uint64_t tls_injected;    /* plaintext pipelined behind STARTTLS */
	uint64_t tls_required;    /* 530 5.7.0 */
	/* DPDK: the lcore's wall time in loop iterations that moved
	 * something, and in iterations that polled and found nothing (the
	 * busy-polling); 0 on the kernel transport, whose workers sleep. */
	uint64_t lcore_busy_ns, lcore_idle_ns;
	uint64_t lat[CTL_LAT_BUCKETS + 1]; /* per bucket, not cumulative */
	uint64_t lat_sum_ns;
	/* per completed batch: messages made durable, bytes written
	 * (buckets of spool.h's spool_stats; not cumulative) */
	uint64_t flush_msgs[CTL_FLUSH_MSG_BUCKETS + 1];
	uint64_t flush_msgs_sum;
	uint64_t flush_bytes[CTL_FLUSH_BYTE_BUCKETS + 1];
	/* per completed batch: submission to completion (CTL_LAT buckets) */
	uint64_t flush_lat[CTL_LAT_BUCKETS + 1];
	uint64_t flush_lat_sum_ns;
};

_Static_assert(sizeof(struct ctl_worker_stats) % sizeof(uint64_t) == 0,
	       "ctl_worker_stats: 64-bit fields only");

/* The same, as the worker publishes it. */
struct ctl_worker_pub {
	_Atomic uint64_t v[sizeof(struct ctl_worker_stats) / sizeof(uint64_t)];
};
static inline void
ctl_worker_pub_store(struct ctl_worker_pub *p,
		     const struct ctl_worker_stats *s)
{
	const uint64_t *src = (const uint64_t *)(const void *)s;

	for (size_t i = 0; i < sizeof(p->v) / sizeof(p->v[0]); i++)
		atomic_store_explicit(&p->v[i], src[i], memory_order_relaxed);
}
static inline void
ctl_worker_pub_load(const struct ctl_worker_pub *p,
		    struct ctl_worker_stats *s)
{
	uint64_t *dst = (uint64_t *)(void *)s;

	for (size_t i = 0; i < sizeof(p->v) / sizeof(p->v[0]); i++)
		dst[i] = atomic_load_explicit(&p->v[i], memory_order_relaxed);
}

/* Frames the DPDK stack dropped, by reason (bounded: a fixed list). */
enum ctl_net_drop {
	CTL_DROP_ETH_RUNT,
	CTL_DROP_NOT_FOR_US,
	CTL_DROP_ETHERTYPE,
	CTL_DROP_IP_HEADER,
	CTL_DROP_IP_CKSUM,
	CTL_DROP_IP_FRAGMENT,
	CTL_DROP_IP_PROTO,
	CTL_DROP_IP_NO_ROUTE,
	CTL_DROP_ARP_QUEUE,
	CTL_DROP_TCP_HEADER,
	CTL_DROP_TCP_CKSUM,
	CTL_DROP_TCP_NO_PORT,
	CTL_DROP_TCP_CONN_FULL,
	CTL_DROP_TCP_SYN_OVERLOAD,
	CTL_DROP_TCP_WINDOW,
	CTL_DROP_TCP_PAWS,
	CTL_DROP_TCP_OOO,
	CTL_DROP_TCP_RCV_NOBUF,
	CTL_DROP_HANDOFF_FULL,
	CTL_DROP_TX_FULL,
	CTL_DROP_RX_MULTISEG,
	CTL_DROP_N
};
const char *ctl_net_drop_name(enum ctl_net_drop d);

struct ctl_net_stats {
	/* the port (rte_eth_stats) */
	uint64_t rx_packets, tx_packets, rx_bytes, tx_bytes;
	uint64_t rx_missed, rx_errors, tx_errors, rx_nombuf;
	uint64_t drops[CTL_DROP_N];
};

/*
 * What the control socket and /metrics read, filled by the transport's
 * start-up code (dataplane/main.c, dataplane/net/dpdk.c). Every pointer
 * must stay valid until both servers are stopped.
 */
struct ctl_sources {
	struct cplane *cp;
	const char *version;
	const char *transport;    /* "kernel" or "dpdk" */
	const char *hostname;
	const char *const *listen; /* addresses, as configured */
	unsigned n_listen;
	uint64_t started_us;      /* CLOCK_REALTIME */
	unsigned n_workers;
	/* Worker i's last published counters. */
	void (*worker_stats)(void *ctx, unsigned i,
			     struct ctl_worker_stats *out);
	void *worker_ctx;
	/* DPDK only (NULL otherwise): port and stack counters. */
	void (*net_stats)(void *ctx, struct ctl_net_stats *out);
	void *net_ctx;
	/* The listener's pause flag (dataplane/worker.h: fd_paused). */
	atomic_bool *paused;
	/* A reload was asked for (finaldotctl reload). NULL: refused. */
	int (*reload)(void *ctx);
	void *reload_ctx;
};

/* Sum of every worker's counters (lat buckets included). */
void ctl_sources_totals(const struct ctl_sources *src,
			struct ctl_worker_stats *tot);

/* ---- the /metrics server --------------------------------------------- */

#define METRICS_MAX_CONNS 16

struct metrics_server;

/*
 * Listen on addr (text: the same, for logs) and serve from a thread with
 * affinity cpus (NULL: inherit). NULL with *err = -errno (and a log line)
 * on failure.
 */
struct metrics_server *metrics_start(const struct sockaddr *addr,
				     socklen_t addrlen, const char *text,
				     const struct ctl_sources *src,
				     const cpu_set_t *cpus, int *err);
/* Stop the thread, close everything. NULL is fine. */
void metrics_stop(struct metrics_server *m);

/*
 * The exposition text, as /metrics serves it, appended to *buf (malloc'd,
 * grown as needed; *len its length). 0 or -ENOMEM. For tests and for the
 * server.
 */
int metrics_render(const struct ctl_sources *src, char **buf, size_t *len);

/* The server's reading of a request, on the bytes it received (any bytes:
 * the request comes from the network). The head is complete at the first
 * empty line (CRLF CRLF or LF LF, or LF CRLF). */
bool metrics_head_complete(const char *in, size_t len);

/* Its request line, the first line of in[0..len): "METHOD TARGET
 * HTTP/1.x" with single spaces, METHOD GET or HEAD (*head_only), the
 * target's path "/metrics" (a query is ignored). *head_only is set
 * only with METRICS_REQ_OK. */
enum metrics_req {
	METRICS_REQ_OK,
	METRICS_REQ_BAD,       /* 400: no line, not three parts, not HTTP/1.x,
				* method over 15 or target over 255 octets */
	METRICS_REQ_METHOD,    /* 405 */
	METRICS_REQ_NOT_FOUND, /* 404 */
};
enum metrics_req metrics_parse_request(const char *in, size_t len,
				       bool *head_only);

#endif
