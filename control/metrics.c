/*
 * /metrics: the Prometheus text exposition (format 0.0.4) of the workers'
 * published counters, the queue manager's stats and, on the DPDK transport,
 * the port's and the stack's counters; and the small HTTP server that
 * serves it (metrics.h has the contract).
 *
 * Names follow Prometheus' conventions: the finaldot_ prefix, base units
 * (seconds, bytes), counters ending in _total, one histogram in seconds.
 * Labels take a fixed, small set of values (transport, state, reason,
 * outcome, direction): never a queue id, an address or a client IP, so the
 * number of series does not grow with traffic.
 *
 * The server is one thread with a poll() loop over non-blocking sockets.
 * It reads at most METRICS_MAX_REQ bytes of request head per connection,
 * answers once, half-closes and drops what else comes until the client
 * closes. Rendering reads only atomics and cp_get_stats() (a copy under
 * the queue manager's lock): a scrape never waits for a worker and a
 * worker never waits for a scrape.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "cplane.h"
#include "finaldot/log.h"
#include "finaldot/msgid.h"
#include "finaldot/utf8.h"
#include "metrics.h"

#define METRICS_MAX_REQ 4096
#define METRICS_TIMEOUT_US 10000000ull
/* After the response, how long the client has to close its side. */
#define METRICS_LINGER_US 2000000ull

/* ---- totals ------------------------------------------------------------ */

void
ctl_sources_totals(const struct ctl_sources *src, struct ctl_worker_stats *t)
{
	struct ctl_worker_stats w;
	uint64_t *dst = (uint64_t *)(void *)t;
	const uint64_t *add = (const uint64_t *)(const void *)&w;

	memset(t, 0, sizeof(*t));
	if (!src->worker_stats)
		return;
	for (unsigned i = 0; i < src->n_workers; i++) {
		memset(&w, 0, sizeof(w));
		src->worker_stats(src->worker_ctx, i, &w);
		/* Every field is a count that adds up, buckets included. */
		for (size_t k = 0; k < sizeof(w) / sizeof(uint64_t); k++)
			dst[k] += add[k];
	}
}

const char *
ctl_net_drop_name(enum ctl_net_drop d)
{
	switch (d) {
	case CTL_DROP_ETH_RUNT: return "eth_runt";
	case CTL_DROP_NOT_FOR_US: return "not_for_us";
	case CTL_DROP_ETHERTYPE: return "ethertype";
	case CTL_DROP_IP_HEADER: return "ip_header";
	case CTL_DROP_IP_CKSUM: return "ip_checksum";
	case CTL_DROP_IP_FRAGMENT: return "ip_fragment";
	case CTL_DROP_IP_PROTO: return "ip_protocol";
	case CTL_DROP_IP_NO_ROUTE: return "ip_no_route";
	case CTL_DROP_ARP_QUEUE: return "arp_queue";
	case CTL_DROP_TCP_HEADER: return "tcp_header";
	case CTL_DROP_TCP_CKSUM: return "tcp_checksum";
	case CTL_DROP_TCP_NO_PORT: return "tcp_no_port";
	case CTL_DROP_TCP_CONN_FULL: return "tcp_conn_table_full";
	case CTL_DROP_TCP_SYN_OVERLOAD: return "tcp_syn_overload";
	case CTL_DROP_TCP_WINDOW: return "tcp_out_of_window";
	case CTL_DROP_TCP_PAWS: return "tcp_paws";
	case CTL_DROP_TCP_OOO: return "tcp_out_of_order";
	case CTL_DROP_TCP_RCV_NOBUF: return "tcp_no_rcv_buffer";
	case CTL_DROP_HANDOFF_FULL: return "handoff_ring_full";
	case CTL_DROP_TX_FULL: return "tx_ring_full";
	case CTL_DROP_RX_MULTISEG: return "rx_multisegment";
	case CTL_DROP_N: break;
	}
	return "other";
}

/* ---- rendering ---------------------------------------------------------- */

static void
head(FILE *f, const char *name, const char *type, const char *help)
{
	fprintf(f, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void
one(FILE *f, const char *name, const char *type, const char *help,
    uint64_t v)
{
	head(f, name, type, help);
	fprintf(f, "%s %" PRIu64 "\n", name, v);
}

/* A sample with one label. */
static void
lab(FILE *f, const char *name, const char *k, const char *v, uint64_t n)
{
	fprintf(f, "%s{%s=\"%s\"} %" PRIu64 "\n", name, k, v, n);
}

static void
lab2(FILE *f, const char *name, const char *k1, const char *v1,
     const char *k2, const char *v2, uint64_t n)
{
	fprintf(f, "%s{%s=\"%s\",%s=\"%s\"} %" PRIu64 "\n", name, k1, v1, k2,
		v2, n);
}

/* A sample with one label, in seconds from nanoseconds. */
static void
lab_sec(FILE *f, const char *name, const char *k, const char *v,
	uint64_t ns)
{
	fprintf(f, "%s{%s=\"%s\"} %" PRIu64 ".%09" PRIu64 "\n", name, k, v,
		ns / 1000000000u, ns % 1000000000u);
}

/*
 * One histogram's series in the latency buckets of metrics.h: cumulative
 * buckets, +Inf, sum in seconds, count. label: `route="x"` or NULL.
 */
static void
histogram(FILE *f, const char *name, const char *label,
	  const uint64_t lat[CTL_LAT_BUCKETS + 1], uint64_t sum_ns)
{
	static const char *const le[CTL_LAT_BUCKETS] = {
		"5e-05", "0.0001", "0.00025", "0.0005", "0.001", "0.0025",
		"0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1",
		"2.5", "5", "10"};
	const char *sep = label ? "," : "";
	uint64_t cum = 0;

	if (!label)
		label = "";
	for (unsigned b = 0; b < CTL_LAT_BUCKETS; b++) {
		cum += lat[b];
		fprintf(f, "%s_bucket{%s%sle=\"%s\"} %" PRIu64 "\n", name, label,
			sep, le[b], cum);
	}
	cum += lat[CTL_LAT_BUCKETS];
	fprintf(f, "%s_bucket{%s%sle=\"+Inf\"} %" PRIu64 "\n", name, label,
		sep, cum);
	fprintf(f, *label ? "%s_sum{%s} %" PRIu64 ".%09" PRIu64 "\n"
			  : "%s_sum%s %" PRIu64 ".%09" PRIu64 "\n",
		name, label, sum_ns / 1000000000u, sum_ns % 1000000000u);
	fprintf(f, *label ? "%s_count{%s} %" PRIu64 "\n"
			  : "%s_count%s %" PRIu64 "\n",
		name, label, cum);
}

/* A histogram of counts (not seconds): n bounds, per-bucket counts
 * (n + 1, the last above every bound), and their sum. */
static void
histogram_counts(FILE *f, const char *name, const char *help,
		 const char *const *le, unsigned n, const uint64_t *v,
		 uint64_t sum)
{
	uint64_t cum = 0;

	head(f, name, "histogram", help);
	for (unsigned b = 0; b < n; b++) {
		cum += v[b];
		fprintf(f, "%s_bucket{le=\"%s\"} %" PRIu64 "\n", name, le[b],
			cum);
	}
	cum += v[n];
	fprintf(f, "%s_bucket{le=\"+Inf\"} %" PRIu64 "\n", name, cum);
	fprintf(f, "%s_sum %" PRIu64 "\n", name, sum);
	fprintf(f, "%s_count %" PRIu64 "\n", name, cum);
}

static void
render_workers(FILE *f, const struct ctl_sources *src,
	       const struct ctl_worker_stats *t)
{
	const char *tr = src->transport;
	const char *name;

	one(f, "finaldot_workers", "gauge",
	    "Worker threads (DPDK: shards), each with its own sessions and "
	    "spool.", src->n_workers);
	name = "finaldot_connections_open";
	head(f, name, "gauge", "SMTP sessions open now.");
	lab(f, name, "transport", tr, t->conns_current);
	name = "finaldot_connections_total";
	head(f, name, "counter", "Connections given an SMTP session.");
	lab(f, name, "transport", tr, t->sessions);
	name = "finaldot_connections_refused_total";
	head(f, name, "counter",
	     "Connections answered 421 and closed at once: busy (no session "
	     "free) or paused (finaldotctl pause).");
	lab2(f, name, "transport", tr, "reason", "busy", t->refused_busy);
	lab2(f, name, "transport", tr, "reason", "paused", t->refused_paused);
	if (strcmp(tr, "dpdk") == 0) {
		name = "finaldot_dpdk_lcore_seconds_total";
		head(f, name, "counter",
		     "The busy-polled lcores' time in loop iterations that "
		     "moved frames, spool completions or replies (busy) and "
		     "in iterations that found nothing (idle): busy / (busy + "
		     "idle) is how loaded the shards are.");
		lab_sec(f, name, "state", "busy", t->lcore_busy_ns);
		lab_sec(f, name, "state", "idle", t->lcore_idle_ns);
	}

	one(f, "finaldot_messages_accepted_total", "counter",
	    "Messages answered 250 after the final dot (durable in the "
	    "spool).", t->messages);
	one(f, "finaldot_accepted_message_bytes_total", "counter",
	    "Stored bytes of the accepted messages (finaldot's Received "
	    "header included).", t->message_bytes);
	name = "finaldot_smtp_rejections_total";
	head(f, name, "counter",
	     "SMTP replies that refused something, by reply class and "
	     "reason.");
	lab2(f, name, "class", "5xx", "reason", "relay_denied",
	     t->relay_denied);
	lab2(f, name, "class", "5xx", "reason", "unknown_recipient",
	     t->rcpt_unknown);
	lab2(f, name, "class", "5xx", "reason", "syntax", t->syntax_errors);
	lab2(f, name, "class", "5xx", "reason", "early_talker",
	     t->early_talkers);
	lab2(f, name, "class", "5xx", "reason", "message_rejected",
	     t->rejected);
	lab2(f, name, "class", "4xx", "reason", "spool_error", t->failed);
	lab2(f, name, "class", "4xx", "reason", "timeout", t->timeouts);
	lab2(f, name, "class", "4xx", "reason", "busy", t->refused_busy);
	lab2(f, name, "class", "4xx", "reason", "paused", t->refused_paused);
	lab2(f, name, "class", "5xx", "reason", "tls_required",
	     t->tls_required);

	one(f, "finaldot_starttls_total", "counter",
	    "STARTTLS commands answered 220 (the handshake follows).",
	    t->starttls);
	name = "finaldot_tls_handshakes_total";
	head(f, name, "counter",
	     "TLS handshakes after STARTTLS, by result (failed: a bad or "
	     "truncated handshake, or its deadline).");
	lab2(f, name, "transport", tr, "result", "ok", t->tls_ok);
	lab2(f, name, "transport", tr, "result", "failed", t->tls_failed);
	one(f, "finaldot_tls_resumed_total", "counter",
	    "TLS handshakes that resumed a session by ticket.",
	    t->tls_resumed);
	one(f, "finaldot_starttls_pipelining_total", "counter",
	    "Sessions that sent commands behind STARTTLS in the same "
	    "segment (discarded, never answered: CVE-2011-0411).",
	    t->tls_injected);

	name = "finaldot_final_dot_latency_seconds";
	head(f, name, "histogram",
	     "From the final dot (or BDAT LAST) to the 250: the spool's "
	     "group commit.");
	histogram(f, name, NULL, t->lat, t->lat_sum_ns);

	one(f, "finaldot_spool_flushes_total", "counter",
	    "Durable spool writes issued (one per batch, except batches "
	    "without an END record in fdatasync mode; messages per flush = "
	    "accepted / flushes).", t->flushes);
	name = "finaldot_spool_batches_total";
	head(f, name, "counter", "Spool batch writes completed, by result.");
	lab(f, name, "result", "ok", t->batches);
	lab(f, name, "result", "error", t->batch_errors);
	one(f, "finaldot_spool_unflushed_batches_total", "counter",
	    "Batches written ok without a flush of their own (no END record "
	    "in them, fdatasync mode): the next flush in the same file "
	    "covers them.", t->unflushed);
	{
		static const char *const msgs[CTL_FLUSH_MSG_BUCKETS] = {
			"1", "2", "4", "8", "16", "32", "64", "128", "256"};
		static const char *const bytes[CTL_FLUSH_BYTE_BUCKETS] = {
			"4096", "16384", "65536", "262144", "1048576",
			"4194304"};
		histogram_counts(f, "finaldot_spool_flush_messages",
				 "Messages made durable per completed flush "
				 "(group commit: high under load).",
				 msgs, CTL_FLUSH_MSG_BUCKETS, t->flush_msgs,
				 t->flush_msgs_sum);
		histogram_counts(f, "finaldot_spool_flush_bytes",
				 "Bytes per completed spool write, block "
				 "padding included.",
				 bytes, CTL_FLUSH_BYTE_BUCKETS, t->flush_bytes,
				 t->spool_bytes);
	}
	name = "finaldot_spool_flush_seconds";
	head(f, name, "histogram",
	     "From a spool batch's durable write being submitted to its "
	     "completion (the disk's flush as the worker sees it; the final "
	     "dot waits for it).");
	histogram(f, name, NULL, t->flush_lat, t->flush_lat_sum_ns);
	one(f, "finaldot_spool_written_bytes_total", "counter",
	    "Bytes written to the spool, block padding included (bytes per "
	    "batch = this / ok batches).", t->spool_bytes);
	one(f, "finaldot_spool_record_bytes_total", "counter",
	    "Record bytes written to the spool, padding excluded.",
	    t->spool_payload);
	one(f, "finaldot_spool_segments_used_total", "counter",
	    "Spool segments taken into use.", t->segments);
	one(f, "finaldot_spool_segments_reclaimed_total", "counter",
	    "Spool segments handed back once all their messages were done.",
	    t->reclaimed);
	one(f, "finaldot_spool_room_waits_total", "counter",
	    "Times a message waited for a free spool batch buffer.",
	    t->room_waits);
}

/*
 * A label value as the text format wants it: \\, " and newline escaped,
 * and valid UTF-8 (Prometheus rejects the whole scrape otherwise), each
 * byte that is not part of a well-formed sequence written as '?' (a route
 * key cut in the middle of a character, a path in Latin-1).
 */
static const char *
label_value(char *buf, size_t n, const char *str)
{
	const unsigned char *s = (const unsigned char *)str;
	size_t k = 0, left = strlen(str);

	while (left) {
		size_t l = fd_utf8_len(s, left);

		if (l == 0) { /* not a well-formed sequence */
			if (k + 2 > n)
				break;
			buf[k++] = '?';
			l = 1;
		} else if (l == 1 && (*s == '\\' || *s == '"' || *s == '\n')) {
			if (k + 3 > n)
				break;
			buf[k++] = '\\';
			buf[k++] = *s == '\n' ? 'n' : (char)*s;
		} else {
			if (k + l + 1 > n)
				break;
			memcpy(buf + k, s, l);
			k += l;
		}
		s += l;
		left -= l;
	}
	buf[k] = '\0';
	return buf;
}

/* Per next hop: delivery latency and outcomes (bounded: cplane.h). */
static void
render_routes(FILE *f, const struct cp_stats *s)
{
	const char *name = "finaldot_delivery_duration_seconds";
	char rl[300], label[320];
	unsigned n = s->n_routes;

	if (s->routes[CP_ROUTES_PUB].route[0])
		n = CP_ROUTES_PUB + 1; /* "other" too */
	head(f, name, "histogram",
	     "Delivery attempts by route: from a delivery thread taking the "
	     "job to its outcome (connection, transaction, final reply).");
	for (unsigned i = 0; i < n; i++) {
		const struct cp_route_stats *r = &s->routes[i];
		if (!r->route[0])
			continue;
		snprintf(label, sizeof(label), "route=\"%s\"",
			 label_value(rl, sizeof(rl), r->route));
		histogram(f, name, label, r->lat, r->lat_sum_ns);
	}
	name = "finaldot_route_deliveries_total";
	head(f, name, "counter",
	     "Delivery outcomes per recipient, by route.");
	for (unsigned i = 0; i < n; i++) {
		const struct cp_route_stats *r = &s->routes[i];
		if (!r->route[0])
			continue;
		label_value(rl, sizeof(rl), r->route);
		lab2(f, name, "route", rl, "outcome", "delivered", r->delivered);
		lab2(f, name, "route", rl, "outcome", "deferred", r->deferred);
		lab2(f, name, "route", rl, "outcome", "bounced", r->bounced);
	}
	name = "finaldot_route_batches_total";
	head(f, name, "counter",
	     "Batches of delivery attempts, by route: the jobs a delivery "
	     "thread took at once for one next hop (up to 16, 32 for a fast "
	     "one, pipelined over one connection); attempts per batch is the "
	     "delivery duration histogram's count over this.");
	for (unsigned i = 0; i < n; i++) {
		const struct cp_route_stats *r = &s->routes[i];
		if (!r->route[0])
			continue;
		lab(f, name, "route", label_value(rl, sizeof(rl), r->route),
		    r->batches);
	}
}

static void
render_queue(FILE *f, const struct cp_stats *s)
{
	const char *name = "finaldot_queue_messages";

	head(f, name, "gauge", "Messages in the queue, by state.");
	lab(f, name, "state", "active", s->active);
	lab(f, name, "state", "deferred", s->deferred);
	lab(f, name, "state", "held", s->held);
	one(f, "finaldot_queue_segments", "gauge",
	    "Spool segments the queue manager follows (moved messages' "
	    "files in spool/moved/ included).", s->segments);
	one(f, "finaldot_queue_received_total", "counter",
	    "Messages the queue manager took over from the spool.",
	    s->queued_total);
	name = "finaldot_deliveries_total";
	head(f, name, "counter",
	     "Delivery outcomes per recipient: delivered, deferred (one per "
	     "temporary failure), bounced, expired.");
	lab(f, name, "outcome", "delivered", s->delivered_total);
	lab(f, name, "outcome", "deferred", s->deferred_total);
	lab(f, name, "outcome", "bounced", s->bounced_total);
	lab(f, name, "outcome", "expired", s->expired_total);
	name = "finaldot_dsn_total";
	head(f, name, "counter",
	     "Delivery status notifications: sent, or dropped (no route for "
	     "the sender).");
	lab(f, name, "outcome", "sent", s->dsn_sent_total);
	lab(f, name, "outcome", "dropped", s->dsn_dropped_total);
	name = "finaldot_queue_moved_total";
	head(f, name, "counter",
	     "Queued messages copied out of a spool segment sealed "
	     "--move-after ago into spool/moved/ (so that deferred mail does "
	     "not keep whole segments): done, or failed (it stays).");
	lab(f, name, "outcome", "done", s->moved_total);
	lab(f, name, "outcome", "failed", s->move_failed_total);
	one(f, "finaldot_queue_damaged_total", "counter",
	    "Messages held because their body read back from the spool did "
	    "not match its checksum (see the log: event=held "
	    "reason=damaged).",
	    s->damaged_total);
	one(f, "finaldot_delivery_log_failed", "gauge",
	    "1 when the delivery log failed (an I/O error): no delivery is "
	    "attempted until a restart; mail is still accepted.",
	    s->log_error ? 1 : 0);
	one(f, "finaldot_delivery_log_no_space", "gauge",
	    "1 while the delivery log waits for room on a full filesystem: "
	    "deliveries wait with it and go on once there is room.",
	    s->log_no_space);
	/* RFC 1047 (docs/delivery.md): 250s that may not have arrived. */
	one(f, "finaldot_dedup_indoubt_total", "counter",
	    "Messages whose 250 may not have reached the client (its "
	    "connection ended with the reply unacknowledged).",
	    s->indoubt_total);
	one(f, "finaldot_dedup_indoubt_unknown_total", "counter",
	    "Of those, messages too old to fingerprint: a resend is "
	    "delivered again.", s->indoubt_unknown_total);
	one(f, "finaldot_dedup_suppressed_total", "counter",
	    "Resends of an in-doubt message answered 250 and not delivered "
	    "again.", s->suppressed_total);
	one(f, "finaldot_dedup_remembered", "gauge",
	    "In-doubt fingerprints remembered now.", s->indoubt_entries);
}

static void
render_net(FILE *f, const struct ctl_net_stats *n)
{
	const char *name;

	name = "finaldot_dpdk_port_packets_total";
	head(f, name, "counter", "Packets through the DPDK port.");
	lab(f, name, "direction", "rx", n->rx_packets);
	lab(f, name, "direction", "tx", n->tx_packets);
	name = "finaldot_dpdk_port_bytes_total";
	head(f, name, "counter", "Bytes through the DPDK port.");
	lab(f, name, "direction", "rx", n->rx_bytes);
	lab(f, name, "direction", "tx", n->tx_bytes);
	name = "finaldot_dpdk_port_errors_total";
	head(f, name, "counter", "Packets the DPDK port counted as errors.");
	lab(f, name, "direction", "rx", n->rx_errors);
	lab(f, name, "direction", "tx", n->tx_errors);
	one(f, "finaldot_dpdk_port_rx_missed_total", "counter",
	    "Packets the port dropped because no receive descriptor was "
	    "free.", n->rx_missed);
	one(f, "finaldot_dpdk_port_rx_nombuf_total", "counter",
	    "Receive mbuf allocation failures.", n->rx_nombuf);
	name = "finaldot_net_drops_total";
	head(f, name, "counter",
	     "Frames the user-space TCP/IP stack dropped, by reason.");
	for (unsigned i = 0; i < CTL_DROP_N; i++)
		lab(f, name, "reason", ctl_net_drop_name((enum ctl_net_drop)i),
		    n->drops[i]);
}

int
metrics_render(const struct ctl_sources *src, char **buf, size_t *len)
{
	struct ctl_worker_stats tot;
	struct cp_stats cs;
	FILE *f = open_memstream(buf, len);
	bool paused = src->paused && atomic_load(src->paused);

	if (!f)
		return -ENOMEM;
	head(f, "finaldot_build_info", "gauge",
	     "Always 1; the labels say which finaldot runs.");
	fprintf(f, "finaldot_build_info{version=\"%s\",transport=\"%s\"} 1\n",
		src->version, src->transport);
	one(f, "finaldot_start_time_seconds", "gauge",
	    "When the daemon started, in seconds since the epoch.",
	    src->started_us / 1000000u);
	one(f, "finaldot_listener_paused", "gauge",
	    "1 while the listener is paused (finaldotctl pause).",
	    paused ? 1 : 0);
	ctl_sources_totals(src, &tot);
	render_workers(f, src, &tot);
	if (src->cp) {
		cp_get_stats(src->cp, &cs);
		render_queue(f, &cs);
		render_routes(f, &cs);
	}
	if (src->net_stats) {
		struct ctl_net_stats ns;
		memset(&ns, 0, sizeof(ns));
		src->net_stats(src->net_ctx, &ns);
		render_net(f, &ns);
	}
	if (fclose(f) != 0) {
		free(*buf);
		*buf = NULL;
		return -ENOMEM;
	}
	return 0;
}

/* ---- the HTTP server --------------------------------------------------- */

struct mconn {
	int fd;
	char in[METRICS_MAX_REQ];
	size_t in_len;
	char *out;
	size_t out_len, out_off;
	uint64_t deadline_us;
	/* The response is sent and our side shut: what still comes in is
	 * read and dropped until the client closes (see conn_write). */
	bool draining;
};

struct metrics_server {
	struct ctl_sources src;
	int lfd;
	int wake_fd;
	pthread_t thr;
	atomic_bool stop;
	/* as the control socket's: a failed accept4() (EMFILE...) leaves the
	 * listener out of poll() this long, or the thread would spin */
	uint64_t accept_pause_until_us;
	struct mconn c[METRICS_MAX_CONNS];
};

static void
conn_close(struct mconn *c)
{
	close(c->fd);
	free(c->out);
	c->fd = -1;
	c->out = NULL;
	c->in_len = c->out_len = c->out_off = 0;
	c->draining = false;
}

/* Draining: read and drop until the client's end of file (a few reads
 * per call, so that a client that keeps sending cannot hold the thread). */
static void
conn_drain(struct mconn *c)
{
	char sink[4096];

	for (unsigned i = 0; i < 16; i++) {
		ssize_t r = recv(c->fd, sink, sizeof(sink), MSG_DONTWAIT);

		if (r > 0)
			continue;
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return;
		conn_close(c);
		return;
	}
}

/* A response: status line, headers, and the body unless head_only. */
static void
respond(struct mconn *c, const char *status, const char *extra,
	const char *ctype, const char *body, size_t blen, bool head_only)
{
	char h[512];
	int n = snprintf(h, sizeof(h),
			 "HTTP/1.1 %s\r\nContent-Type: %s\r\n"
			 "Content-Length: %zu\r\n%sConnection: close\r\n\r\n",
			 status, ctype, blen, extra);
	size_t hl = (size_t)n, total = hl + (head_only ? 0 : blen);

	free(c->out);
	c->out = malloc(total);
	if (!c->out) {
		c->out_len = 0;
		return;
	}
	memcpy(c->out, h, hl);
	if (!head_only && blen)
		memcpy(c->out + hl, body, blen);
	c->out_len = total;
	c->out_off = 0;
}

static void
respond_text(struct mconn *c, const char *status, const char *extra,
	     const char *text)
{
	respond(c, status, extra, "text/plain; charset=utf-8", text,
		strlen(text), false);
}

enum metrics_req
metrics_parse_request(const char *in, size_t len, bool *head_only)
{
	const char *line_end = memchr(in, '\n', len);
	const char *sp1, *sp2, *target, *version, *q;
	size_t ll, ml, tl, vl, pl;
	bool head;

	*head_only = false;
	if (!line_end)
		return METRICS_REQ_BAD;
	ll = (size_t)(line_end - in);
	if (ll && in[ll - 1] == '\r')
		ll--;
	sp1 = memchr(in, ' ', ll);
	sp2 = sp1 ? memchr(sp1 + 1, ' ', ll - (size_t)(sp1 + 1 - in)) : NULL;
	if (!sp1 || !sp2)
		return METRICS_REQ_BAD;
	ml = (size_t)(sp1 - in);
	target = sp1 + 1;
	tl = (size_t)(sp2 - target);
	version = sp2 + 1;
	vl = ll - (size_t)(version - in);
	if (ml == 0 || ml >= 16 || tl == 0 || tl >= 256)
		return METRICS_REQ_BAD;
	/* HTTP/1.x: exactly one digit-or-whatever after the dot, as before */
	if (vl != 8 || memcmp(version, "HTTP/1.", 7) != 0 ||
	    version[7] == '\0')
		return METRICS_REQ_BAD;
	head = ml == 4 && memcmp(in, "HEAD", 4) == 0;
	if (!head && (ml != 3 || memcmp(in, "GET", 3) != 0))
		return METRICS_REQ_METHOD;
	q = memchr(target, '?', tl);
	pl = q ? (size_t)(q - target) : tl;
	if (pl != 8 || memcmp(target, "/metrics", 8) != 0)
		return METRICS_REQ_NOT_FOUND;
	*head_only = head;
	return METRICS_REQ_OK;
}

bool
metrics_head_complete(const char *in, size_t len)
{
	for (size_t i = 0; i + 1 < len; i++) {
		if (in[i] != '\n')
			continue;
		if (in[i + 1] == '\n')
			return true;
		if (in[i + 1] == '\r' && i + 2 < len && in[i + 2] == '\n')
			return true;
	}
	return false;
}

/*
 * The request head is complete (or the buffer is full): decide. Only the
 * request line matters; headers are not needed to answer.
 */
static void
handle_request(struct metrics_server *m, struct mconn *c)
{
	bool head_only;

	switch (metrics_parse_request(c->in, c->in_len, &head_only)) {
	case METRICS_REQ_BAD:
		respond_text(c, "400 Bad Request", "", "bad request\n");
		return;
	case METRICS_REQ_METHOD:
		respond_text(c, "405 Method Not Allowed",
			     "Allow: GET, HEAD\r\n", "method not allowed\n");
		return;
	case METRICS_REQ_NOT_FOUND:
		respond_text(c, "404 Not Found", "", "not found: try /metrics\n");
		return;
	case METRICS_REQ_OK:
		break;
	}
	char *body = NULL;
	size_t blen = 0;
	if (metrics_render(&m->src, &body, &blen) != 0) {
		respond_text(c, "500 Internal Server Error", "",
			     "out of memory\n");
		return;
	}
	respond(c, "200 OK", "", "text/plain; version=0.0.4; charset=utf-8",
		body, blen, head_only);
	free(body);
}

static void
conn_read(struct metrics_server *m, struct mconn *c)
{
	ssize_t r;

	if (c->draining) {
		conn_drain(c);
		return;
	}
	if (c->out)
		return; /* answered: the rest is not read */
	r = recv(c->fd, c->in + c->in_len, sizeof(c->in) - c->in_len,
		 MSG_DONTWAIT);
	if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
		conn_close(c);
		return;
	}
	if (r < 0)
		return;
	c->in_len += (size_t)r;
	if (metrics_head_complete(c->in, c->in_len))
		handle_request(m, c);
	else if (c->in_len == sizeof(c->in))
		respond_text(c, "431 Request Header Fields Too Large", "",
			     "request head too large\n");
	else
		return;
	if (!c->out) /* no memory for the answer */
		conn_close(c);
}

static void
conn_write(struct mconn *c)
{
	while (c->out_off < c->out_len) {
		ssize_t r = send(c->fd, c->out + c->out_off,
				 c->out_len - c->out_off,
				 MSG_NOSIGNAL | MSG_DONTWAIT);
		if (r > 0) {
			c->out_off += (size_t)r;
			continue;
		}
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return;
		/* the peer is gone */
		conn_close(c);
		return;
	}
	/*
	 * Sent: half-close so the client sees the end. Closing now while
	 * bytes it sent after the request head are unread would make the
	 * kernel answer with a reset and drop whatever of the response is
	 * still in the send queue; so read and drop until the client closes
	 * too, for at most METRICS_LINGER_US.
	 */
	shutdown(c->fd, SHUT_WR);
	free(c->out);
	c->out = NULL;
	c->draining = true;
	c->deadline_us = fd_now_monotonic_us() + METRICS_LINGER_US;
	conn_drain(c);
}

static void
accept_conns(struct metrics_server *m)
{
	for (;;) {
		int fd = accept4(m->lfd, NULL, NULL,
				 SOCK_NONBLOCK | SOCK_CLOEXEC);
		struct mconn *c = NULL;

		if (fd < 0) {
			if (errno != EAGAIN && errno != EWOULDBLOCK &&
			    errno != EINTR && errno != ECONNABORTED)
				m->accept_pause_until_us =
					fd_now_monotonic_us() + 100000u;
			return;
		}
		for (unsigned i = 0; i < METRICS_MAX_CONNS && !c; i++)
			if (m->c[i].fd < 0)
				c = &m->c[i];
		if (!c) {
			static const char busy[] =
				"HTTP/1.1 503 Service Unavailable\r\n"
				"Content-Length: 0\r\nConnection: close\r\n\r\n";
			char sink[4096];

			if (send(fd, busy, sizeof(busy) - 1,
				 MSG_NOSIGNAL | MSG_DONTWAIT) < 0)
				fd_debug("metrics", "event=busy_send_failed");
			/* The request already here, read: closing with it
			 * unread would send a reset, which can reach the
			 * client before it has read the 503. */
			shutdown(fd, SHUT_WR);
			for (unsigned i = 0; i < 4; i++)
				if (recv(fd, sink, sizeof(sink),
					 MSG_DONTWAIT) <= 0)
					break;
			close(fd);
			continue;
		}
		c->fd = fd;
		c->in_len = 0;
		c->deadline_us = fd_now_monotonic_us() + METRICS_TIMEOUT_US;
	}
}

static void *
metrics_main(void *arg)
{
	struct metrics_server *m = arg;
	struct pollfd pfd[METRICS_MAX_CONNS + 2];
	struct mconn *who[METRICS_MAX_CONNS + 2];
	sigset_t all;

	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL);
	while (!atomic_load(&m->stop)) {
		unsigned n = 0;
		uint64_t now = fd_now_monotonic_us();

		pfd[n++] = (struct pollfd){.fd = m->wake_fd, .events = POLLIN};
		pfd[n++] = (struct pollfd){
			.fd = now < m->accept_pause_until_us ? -1 : m->lfd,
			.events = POLLIN};
		for (unsigned i = 0; i < METRICS_MAX_CONNS; i++) {
			struct mconn *c = &m->c[i];
			if (c->fd < 0)
				continue;
			if (now > c->deadline_us) {
				conn_close(c);
				continue;
			}
			who[n] = c;
			pfd[n++] = (struct pollfd){
				.fd = c->fd,
				.events = c->out ? POLLOUT : POLLIN};
		}
		if (poll(pfd, n, pfd[1].fd < 0 ? 100 : 1000) < 0)
			continue;
		if (pfd[1].revents & POLLIN)
			accept_conns(m);
		for (unsigned i = 2; i < n; i++) {
			struct mconn *c = who[i];
			if (!pfd[i].revents)
				continue;
			if (!c->out)
				conn_read(m, c);
			if (c->fd >= 0 && c->out)
				conn_write(c);
		}
	}
	for (unsigned i = 0; i < METRICS_MAX_CONNS; i++)
		if (m->c[i].fd >= 0)
			conn_close(&m->c[i]);
	return NULL;
}

struct metrics_server *
metrics_start(const struct sockaddr *addr, socklen_t addrlen,
	      const char *text, const struct ctl_sources *src,
	      const cpu_set_t *cpus, int *err)
{
	struct metrics_server *m = calloc(1, sizeof(*m));
	pthread_attr_t attr;
	int one = 1, r;

	if (!m) {
		*err = -ENOMEM;
		return NULL;
	}
	m->src = *src;
	for (unsigned i = 0; i < METRICS_MAX_CONNS; i++)
		m->c[i].fd = -1;
	m->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	m->lfd = socket(addr->sa_family,
			SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (m->lfd < 0 || m->wake_fd < 0) {
		r = -errno;
		goto out_close;
	}
	setsockopt(m->lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (addr->sa_family == AF_INET6)
		setsockopt(m->lfd, IPPROTO_IPV6, IPV6_V6ONLY, &one,
			   sizeof(one));
	if (bind(m->lfd, addr, addrlen) != 0 || listen(m->lfd, 64) != 0) {
		r = -errno;
		goto out_close;
	}
	pthread_attr_init(&attr);
	if (cpus)
		pthread_attr_setaffinity_np(&attr, sizeof(*cpus), cpus);
	r = -pthread_create(&m->thr, &attr, metrics_main, m);
	pthread_attr_destroy(&attr);
	if (r)
		goto out_close;
	pthread_setname_np(m->thr, "fd-metrics");
	fd_log(FD_LOG_INFO, "metrics", "event=listening addr=%s path=/metrics",
	       text);
	return m;

out_close:
	fd_log(FD_LOG_ERR, "metrics", "event=metrics_failed addr=%s "
	       "error=\"%s\"", text, strerror(-r));
	if (m->lfd >= 0)
		close(m->lfd);
	if (m->wake_fd >= 0)
		close(m->wake_fd);
	free(m);
	*err = r;
	return NULL;
}

void
metrics_stop(struct metrics_server *m)
{
	uint64_t one = 1;

	if (!m)
		return;
	atomic_store(&m->stop, true);
	if (write(m->wake_fd, &one, sizeof(one)) < 0)
		fd_log(FD_LOG_WARN, "metrics", "event=wake_failed");
	pthread_join(m->thr, NULL);
	close(m->lfd);
	close(m->wake_fd);
	free(m);
}
