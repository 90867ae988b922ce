/*
 * The DPDK transport: the shards and their lcore loop, over the port and the
 * user-space TCP/IP stack of net/ (port.h, net.h). What a connection does
 * with its octets (the session, TLS, timers, shutdown) is the connection
 * layer's (conn/conn.h); this file joins the stack's TCP upcalls to it.
 *
 * Shards. Every lcore the EAL gives us runs one shard, up to the number of
 * queue pairs the port has: its own queue pair, net_stack, SMTP sessions and
 * spool (a struct fd_worker, as on the kernel transport). Nothing is shared
 * between shards but what the port shares (the mbuf pool, the hand-off
 * rings: port.c).
 *
 * The loop, per iteration (DPDK l2fwd/l3fwd shape):
 *   rx burst and frames handed over -> the stack (which calls the upcalls
 *   below: conn_input() and the rest), stack timers, spool completions (the
 *   250s: conn_wake() only marks the sessions, conn_set_tick() services them
 *   after spool_poll() returned, with the session timers: their replies are
 *   pushed out with a tx burst before any session parses held input),
 *   spool_flush() when the rx burst was not full (natural batching: nothing
 *   more to read now), spool_submit() (the writes go to the kernel after
 *   the 250s left), counters every 100 ms, tx burst of everything queued
 *   in this iteration (never held back).
 *
 * The stack is synchronous: tcp_send() copies what it takes, so the layer
 * sees a transport that takes octets at once (or calls conn_writable() from
 * sent() when its buffer had no room), and held input stays in the TCP
 * receive ring (the window shrinks) until tcp_resume() offers it again.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <inttypes.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <rte_common.h>
#include <rte_cycles.h>
#include <rte_launch.h>
#include <rte_lcore.h>
#include <rte_malloc.h>

#include "conn/conn.h"
#include "control/cplane.h"
#include "control/ctlsock.h"
#include "control/sdnotify.h"
#include "dpdk/dpdk.h"
#include "finaldot/config.h"
#include "finaldot/log.h"
#include "finaldot/msgid.h"
#include "net/net.h"
#include "net/port.h"
#include "net/tcp.h"
#include "smtp/smtp.h"
#include "spool/spool.h"
#include "tls/tls.h"
#include "worker.h"

#define PUBLISH_US 100000

struct shard;

/* A shard's start (fd_worker_start()), as shard 0 sees it before it logs
 * event=ready: every shard reports, then waits for g.go. */
enum shard_start {
	SHARD_STARTING,
	SHARD_STARTED,
	SHARD_FAILED,
};

/* One TCP connection carrying one SMTP session. */
struct dp_conn {
	struct conn conn;    /* the connection layer's part */
	struct shard *sh;
	struct tcp_conn *tc; /* NULL once the stack ended it */
	size_t gone_unacked; /* what closed() said was not acknowledged */
	bool in_use;
	struct dp_conn *next_free;
};

struct shard {
	unsigned id;
	struct net_stack *st;
	struct net_port_q *q;
	struct fd_worker w;
	struct conn_set cs;
	struct dp_conn *conns;
	struct dp_conn *free;
	unsigned nconns;
	unsigned in_use;
	uint64_t next_publish_us;
	/* the stack's drops by reason, for /metrics (shard_publish) */
	_Atomic uint64_t pub_drops[CTL_DROP_N] __rte_cache_aligned;
	/* The lcore's time in TSC cycles, stored every iteration (plain
	 * stores on this thread, read by the control plane's): iterations
	 * that moved something (frames, spool completions, replies) and
	 * iterations that polled and found nothing. The back-off sleep
	 * (--dpdk-idle-sleep) is in neither. */
	_Atomic uint64_t busy_cyc, idle_cyc;
	_Atomic int start; /* enum shard_start */
	int start_err;     /* fd_worker_start()'s -errno, before start */
} __rte_cache_aligned;

static struct {
	const struct fd_config *cfg;
	unsigned nshards;
	struct shard *shards[RTE_MAX_LCORE];
	uint32_t addr, gateway;
	uint8_t prefix;
	uint16_t ports[NET_MAX_LISTEN];
	unsigned nports;
	cpu_set_t helper_cpus; /* ours before EAL pinned us, minus the lcores */
	volatile sig_atomic_t stop;
	volatile sig_atomic_t reload; /* SIGHUP, taken by shard 0 */
	/* Shard 0's verdict once every shard reported its start: 1 run,
	 * -1 one failed (the others stop without serving), 0 not yet. */
	_Atomic int go;
} g;

static void
on_signal(int sig)
{
	if (sig == SIGHUP)
		g.reload = 1;
	else
		g.stop = 1;
}

/* logrotate: the log writer reopens its file (async-signal-safe). */
static void
on_usr1(int sig)
{
	(void)sig;
	fd_log_reopen();
}

static uint64_t
shard_clock(void *ctx)
{
	struct shard *sh = ctx;

	return sh->cs.now_us;
}

/* ---- the connection layer's operations (conn/conn.h) -------------------- */

static inline struct dp_conn *
dp_of(struct conn *c)
{
	return (struct dp_conn *)(void *)((char *)c -
					  offsetof(struct dp_conn, conn));
}

/* tcp_send() copies: never asynchronous, final or not. */
static size_t
dp_send(struct conn *c, const uint8_t *p, size_t n, bool final)
{
	(void)final;
	return tcp_send(dp_of(c)->tc, p, n);
}

static void
dp_resume(struct conn *c)
{
	tcp_resume(dp_of(c)->tc);
}

/* Our stack knows what the client's TCP acknowledged: everything handed
 * to it but what is still queued (SND.UNA). */
static int
dp_acked(struct conn *c, uint64_t sent, uint64_t *acked)
{
	struct dp_conn *d = dp_of(c);
	size_t unacked = d->tc ? tcp_conn_snd_queued(d->tc) : d->gone_unacked;

	*acked = sent > unacked ? sent - unacked : 0;
	return 0;
}

static void
dp_close(struct conn *c, enum conn_close_how how, const char *why)
{
	struct dp_conn *d = dp_of(c);
	struct shard *sh = d->sh;

	(void)why;
	switch (how) {
	case CONN_CLOSE_FIN:
		tcp_close(d->tc); /* FIN after the queued replies */
		break;
	case CONN_CLOSE_ABORT:
		tcp_abort(d->tc);
		break;
	case CONN_CLOSE_GONE:
		break;
	}
	d->tc = NULL;
	conn_release(c); /* tcp_send() copied what it took */
	d->in_use = false;
	d->next_free = sh->free;
	sh->free = d;
	sh->in_use--;
}

/*
 * The frames queued so far go to the port; once none is left waiting, the
 * 250s among them are on the wire as far as software can see, and their
 * gap samples end here (the engine staged them: smtp_server_gap_staged()).
 */
static void
shard_tx_flush(struct shard *sh)
{
	net_port_tx_flush(sh->q);
	if (sh->w.smtp && !net_port_tx_queued(sh->q))
		smtp_server_gap_settle(sh->w.smtp);
}

/* The replies a group commit released leave before the sessions parse
 * the input they hold (conn_set_service()). */
static void
dp_push(struct conn_set *cs)
{
	shard_tx_flush((struct shard *)(void *)((char *)cs -
						offsetof(struct shard, cs)));
}

static const struct conn_ops dp_conn_ops = {
	.send = dp_send,
	.resume = dp_resume,
	.push = dp_push,
	.acked = dp_acked,
	.close = dp_close,
};

/* ---- TCP upcalls (net/tcp.h) -------------------------------------------- */

static void *
up_accept(void *arg, struct tcp_conn *tc, const struct tcp_endpoint *remote,
	  uint16_t local_port)
{
	struct shard *sh = arg;
	struct dp_conn *c = sh->free;
	struct in_addr a = {.s_addr = htonl(remote->addr)};
	char addr[INET_ADDRSTRLEN];
	const char *reply;
	size_t len;

	(void)local_port;
	inet_ntop(AF_INET, &a, addr, sizeof(addr));
	if (c) {
		struct dp_conn *next = c->next_free;
		memset(c, 0, sizeof(*c));
		c->next_free = next;
	}
	if (conn_open(&sh->cs, c ? &c->conn : NULL, addr, &reply, &len) != 0) {
		/* Paused, busy or stopping: the 421 and FIN (tcp_close()
		 * from inside accept(), tcp.h). */
		tcp_send(tc, reply, len);
		tcp_close(tc);
		return NULL;
	}
	sh->free = c->next_free;
	c->sh = sh;
	c->tc = tc;
	c->in_use = true;
	sh->in_use++;
	return c;
}

static size_t
up_recv(void *u, const uint8_t *p, size_t n)
{
	struct dp_conn *c = u;

	return conn_input(&c->conn, p, n);
}

static void
up_eof(void *u)
{
	struct dp_conn *c = u;

	conn_eof(&c->conn);
}

static void
up_sent(void *u, size_t room)
{
	struct dp_conn *c = u;

	(void)room;
	conn_writable(&c->conn);
}

static void
up_closed(void *u, enum tcp_close_reason reason, size_t unacked)
{
	struct dp_conn *c = u;
	static const char *const why[] = {
		[TCP_CLOSE_RESET] = "tcp_reset",
		[TCP_CLOSE_TIMEOUT] = "tcp_timeout",
		[TCP_CLOSE_IDLE] = "tcp_idle",
		[TCP_CLOSE_DONE] = "tcp_done",
	};

	/* The stack ended the connection: tc is gone, RFC 1047's check
	 * uses what it said was not acknowledged. */
	c->tc = NULL;
	c->gone_unacked = unacked;
	conn_close(&c->conn,
		   (unsigned)reason < sizeof(why) / sizeof(why[0]) &&
				   why[reason]
			   ? why[reason]
			   : "tcp_closed",
		   CONN_CLOSE_GONE);
}

static const struct tcp_upcall_ops smtp_upcalls = {
	.accept = up_accept,
	.recv = up_recv,
	.eof = up_eof,
	.sent = up_sent,
	.closed = up_closed,
};

/* ---- the lcore loop ------------------------------------------------------ */

/*
 * The stack's and the port's drop counters by reason, where /metrics reads
 * them (every 100 ms, with the worker's own counters).
 */
static void
shard_publish(struct shard *sh)
{
	const struct net_counters *n = net_stack_counters(sh->st);
	const struct net_port_q_stats *qs = net_port_q_stats(sh->q);
	uint64_t d[CTL_DROP_N];

	d[CTL_DROP_ETH_RUNT] = n->rx_runt;
	d[CTL_DROP_NOT_FOR_US] = n->rx_not_for_us + n->ip_not_for_us +
				 n->arp_not_for_us;
	d[CTL_DROP_ETHERTYPE] = n->rx_ethertype;
	d[CTL_DROP_IP_HEADER] = n->ip_too_short + n->ip_bad_version +
				n->ip_bad_ihl + n->ip_bad_len + n->ip_options +
				n->ip_ttl_zero + n->ip_bad_src;
	d[CTL_DROP_IP_CKSUM] = n->ip_bad_cksum + n->icmp_bad_cksum;
	d[CTL_DROP_IP_FRAGMENT] = n->ip_fragments;
	d[CTL_DROP_IP_PROTO] = n->ip_unknown_proto;
	d[CTL_DROP_IP_NO_ROUTE] = n->ip_no_route;
	d[CTL_DROP_ARP_QUEUE] = n->arp_queue_full + n->arp_queued_dropped;
	d[CTL_DROP_TCP_HEADER] = n->tcp_too_short + n->tcp_bad_off +
				 n->tcp_bad_flags + n->tcp_bad_options;
	d[CTL_DROP_TCP_CKSUM] = n->tcp_bad_cksum;
	d[CTL_DROP_TCP_NO_PORT] = n->tcp_no_port;
	d[CTL_DROP_TCP_CONN_FULL] = n->tcp_conn_full;
	d[CTL_DROP_TCP_SYN_OVERLOAD] = n->tcp_syn_overload;
	d[CTL_DROP_TCP_WINDOW] = n->tcp_out_of_window;
	d[CTL_DROP_TCP_PAWS] = n->tcp_paws_drop;
	d[CTL_DROP_TCP_OOO] = n->tcp_ooo_drop;
	d[CTL_DROP_TCP_RCV_NOBUF] = n->tcp_rcv_nobuf;
	d[CTL_DROP_HANDOFF_FULL] = qs->handoff_full;
	d[CTL_DROP_TX_FULL] = qs->tx_dropped;
	d[CTL_DROP_RX_MULTISEG] = qs->rx_multiseg_dropped;
	for (unsigned i = 0; i < CTL_DROP_N; i++)
		atomic_store_explicit(&sh->pub_drops[i], d[i],
				      memory_order_relaxed);
	sh->w.conns_current = sh->in_use;
}

/* /metrics: the port's counters and every shard's published drops. */
static void
net_stats(void *ctx, struct ctl_net_stats *out)
{
	(void)ctx;
	net_port_stats(out);
	for (unsigned i = 0; i < g.nshards; i++)
		for (unsigned k = 0; k < CTL_DROP_N; k++)
			out->drops[k] += atomic_load_explicit(
				&g.shards[i]->pub_drops[k],
				memory_order_relaxed);
}

static uint64_t
cyc_to_ns(uint64_t cyc)
{
	uint64_t hz = rte_get_tsc_hz();

	if (hz == 0)
		return 0;
	return cyc / hz * 1000000000u + cyc % hz * 1000000000u / hz;
}

static void
shards_stats(void *ctx, unsigned i, struct ctl_worker_stats *out)
{
	struct shard *sh = g.shards[i];

	(void)ctx;
	fd_worker_read_stats(&sh->w, out);
	/* Live, not the last publication: a reader that samples around a
	 * load (tools/bench) gets the lcore's split to the iteration. */
	out->lcore_busy_ns = cyc_to_ns(
		atomic_load_explicit(&sh->busy_cyc, memory_order_relaxed));
	out->lcore_idle_ns = cyc_to_ns(
		atomic_load_explicit(&sh->idle_cyc, memory_order_relaxed));
}

static void (*reload_fn)(void);
static atomic_bool reloading;

static void *
reload_main(void *arg)
{
	(void)arg;
	reload_fn();
	atomic_store(&reloading, false);
	return NULL;
}

/* SIGHUP seen by shard 0: the reload (files read, the control plane
 * called: milliseconds) runs on a thread of its own, never on a polled
 * core; one at a time (a SIGHUP meanwhile is taken after it). */
static void
shard_reload(void)
{
	pthread_attr_t attr;
	pthread_t t;
	int r = -1;

	if (atomic_exchange(&reloading, true))
		return; /* g.reload stays set: the next tick tries again */
	g.reload = 0;
	/* Created from shard 0's lcore, the thread would inherit its
	 * affinity: that one busy-polled core. */
	pthread_attr_init(&attr);
	if (CPU_COUNT(&g.helper_cpus))
		pthread_attr_setaffinity_np(&attr, sizeof(g.helper_cpus),
					    &g.helper_cpus);
	if (reload_fn)
		r = pthread_create(&t, &attr, reload_main, NULL);
	pthread_attr_destroy(&attr);
	if (r != 0) {
		atomic_store(&reloading, false);
		fd_log(FD_LOG_ERR, "main", "event=reload_failed "
		       "error=\"no thread for the reload\"");
		return;
	}
	pthread_setname_np(t, "fd-reload");
	pthread_detach(t);
}

/*
 * Shard 0, once its own start is settled: waits until every shard has
 * reported, then says ready, or names the shards that failed and tells
 * the others to stop. A shard that cannot start must not leave the daemon
 * ready and silently losing the flows its queue owns.
 */
static void
shards_verdict(void)
{
	unsigned failed = 0;

	for (unsigned i = 0; i < g.nshards; i++) {
		struct shard *sh = g.shards[i];
		int st;

		while ((st = atomic_load(&sh->start)) == SHARD_STARTING)
			usleep(1000);
		if (st == SHARD_FAILED) {
			fd_log(FD_LOG_ERR, "dpdk",
			       "shard=%u event=shard_start_failed error=\"%s\"",
			       i, strerror(-sh->start_err));
			failed++;
		}
	}
	if (failed) {
		fd_log(FD_LOG_ERR, "main",
		       "event=start_failed transport=dpdk shards=%u failed=%u "
		       "note=\"every shard stops\"", g.nshards, failed);
		atomic_store(&g.go, -1);
		return;
	}
	fd_log(FD_LOG_INFO, "main", "event=ready transport=dpdk shards=%u",
	       g.nshards);
	sdnotify("READY=1\nSTATUS=accepting mail");
	atomic_store(&g.go, 1);
}

static int
shard_main(void *arg)
{
	int idx = rte_lcore_index((int)rte_lcore_id());
	struct shard *sh;
	unsigned idle = 0;
	uint64_t t_last, busy_cyc = 0, idle_cyc = 0;
	int r;

	(void)arg;
	if (idx < 0 || (unsigned)idx >= g.nshards)
		return 0;
	sh = g.shards[idx];
	conn_set_clock(&sh->cs, fd_now_monotonic_us());
	r = fd_worker_start(&sh->w, NULL, conn_wake);
	sh->start_err = r;
	atomic_store(&sh->start, r == 0 ? SHARD_STARTED : SHARD_FAILED);
	if (sh->id == 0)
		shards_verdict();
	while (atomic_load(&g.go) == 0)
		usleep(1000);
	if (r != 0)
		return -1;
	if (atomic_load(&g.go) < 0) {
		fd_worker_finish(&sh->w); /* no session was ever opened */
		return 0;
	}
	/* RFC 1047's gap on this path ends at the tx burst, not when the
	 * stack copied the reply. */
	smtp_server_gap_staged(sh->w.smtp, true);
	if (sh->id == 0)
		net_stack_start(sh->st); /* gratuitous ARP, once per port */
	atomic_store(&sh->w.ready, true);

	t_last = rte_rdtsc();
	for (;;) {
		bool full, moved;
		unsigned n;
		int done;
		uint64_t t;

		conn_set_clock(&sh->cs, fd_now_monotonic_us());
		n = net_port_rx(sh->q, &full);
		net_stack_poll_timers(sh->st);
		done = spool_poll(sh->w.spool);
		/* Room also comes back without a completion: a spare segment
		 * made ready (issue 10). */
		if (done > 0 || spool_room_changed(sh->w.spool))
			conn_set_room(&sh->cs);
		/* The sessions the verdicts woke, timers due (O(due)), the
		 * shutdown's force point. */
		conn_set_tick(&sh->cs);
		/* Optional back-off (--dpdk-idle-sleep): on a shared core the
		 * kernel work we depend on (tap, io-wq flushes) runs only
		 * when we let it. */
		moved = n > 0 || done > 0 || net_port_tx_queued(sh->q);
		if (!moved) {
			if (g.cfg->dpdk_idle_sleep_us && ++idle >= 100) {
				idle = 0;
				usleep((useconds_t)g.cfg->dpdk_idle_sleep_us);
				t_last = rte_rdtsc(); /* asleep: not polling */
			}
		} else {
			idle = 0;
		}
		if (!full)
			spool_flush(sh->w.spool);
		/* The writes queued since spool_poll(), now that the 250s
		 * its completions released are out (conn_set_tick()). */
		spool_submit(sh->w.spool);
		if (sh->cs.now_us >= sh->next_publish_us) {
			sh->next_publish_us = sh->cs.now_us + PUBLISH_US;
			shard_publish(sh);
			fd_worker_poll(&sh->w);
			if (sh->id == 0 && g.reload)
				shard_reload();
			if (g.stop && !conn_set_stopping(&sh->cs)) {
				if (sh->id == 0)
					sdnotify("STOPPING=1");
				conn_set_begin_stop(&sh->cs);
				conn_set_service(&sh->cs);
			}
		}
		shard_tx_flush(sh);
		/* The lcore's busy share (the CPU per message without the
		 * busy-polling): an rdtsc and a plain store a turn. */
		t = rte_rdtsc();
		if (moved) {
			busy_cyc += t - t_last;
			atomic_store_explicit(&sh->busy_cyc, busy_cyc,
					      memory_order_relaxed);
		} else {
			idle_cyc += t - t_last;
			atomic_store_explicit(&sh->idle_cyc, idle_cyc,
					      memory_order_relaxed);
		}
		t_last = t;
		/* The sessions, then the stack's own connections (FINs
		 * acknowledged; TIME_WAIT entries are not waited for: they
		 * would hold the stop for 2*MSL after the last QUIT) and the
		 * spool drained; or the shutdown deadline, whatever is still
		 * in flight (issue 10: writes that cannot finish must not
		 * keep the daemon; the sessions waiting for them were
		 * answered 421 at the force point). */
		if (conn_set_done(&sh->cs,
				  net_stack_conn_count_live(sh->st) == 0))
			break;
	}
	/* Past the deadline with writes unfinished: no waiting for them in
	 * spool_destroy() either (it logs what it gave up). */
	if (spool_inflight(sh->w.spool))
		spool_abandon(sh->w.spool);
	conn_set_close_all(&sh->cs);
	shard_tx_flush(sh);
	fd_worker_finish(&sh->w);
	const struct net_counters *nc = net_stack_counters(sh->st);
	const struct net_port_q_stats *qs = net_port_q_stats(sh->q);
	fd_log(FD_LOG_INFO, "dpdk",
	       "shard=%u event=net_stats rx_frames=%" PRIu64
	       " tx_frames=%" PRIu64 " tcp_accepted=%" PRIu64
	       " tcp_retransmits=%" PRIu64 " tx_dropped=%" PRIu64
	       " rx_bursts=%" PRIu64 " tx_bursts=%" PRIu64
	       " handoff_out=%" PRIu64 " handoff_in=%" PRIu64
	       " handoff_full=%" PRIu64 " refused=%" PRIu64
	       " lcore_busy_ms=%" PRIu64 " lcore_idle_ms=%" PRIu64,
	       sh->id, nc->rx_frames, nc->tx_frames, nc->tcp_accepted,
	       nc->tcp_retransmits, qs->tx_dropped, qs->rx_bursts,
	       qs->tx_bursts, qs->handoff_out,
	       qs->handoff_in, qs->handoff_full, sh->w.sessions_refused,
	       cyc_to_ns(busy_cyc) / 1000000u,
	       cyc_to_ns(idle_cyc) / 1000000u);
	return 0;
}

/* ---- set-up -------------------------------------------------------------- */

static int
parse_ipv4(const char *s, uint32_t *addr, uint8_t *prefix)
{
	char buf[64];
	char *slash;
	struct in_addr a;

	snprintf(buf, sizeof(buf), "%s", s);
	slash = strchr(buf, '/');
	if (prefix) {
		long p = slash ? strtol(slash + 1, NULL, 10) : 32;
		if (p < 1 || p > 32)
			return -EINVAL;
		*prefix = (uint8_t)p;
	}
	if (slash)
		*slash = '\0';
	if (inet_pton(AF_INET, buf, &a) != 1)
		return -EINVAL;
	*addr = ntohl(a.s_addr);
	return 0;
}

static int
shard_create(unsigned i, const struct net_port_info *pi, struct cplane *cp,
	     const uint64_t *seed_msgid)
{
	const struct fd_config *cfg = g.cfg;
	struct shard *sh = rte_zmalloc_socket("shard", sizeof(*sh),
					      RTE_CACHE_LINE_SIZE,
					      (int)rte_socket_id());
	struct net_config nc;

	if (!sh)
		return -ENOMEM;
	g.shards[i] = sh;
	sh->id = i;
	sh->q = net_port_q(i);
	sh->w.id = i;
	sh->w.cfg = cfg;
	sh->w.seed_msgid = seed_msgid ? seed_msgid[i] : 0;
	sh->w.helper_cpus = CPU_COUNT(&g.helper_cpus) ? &g.helper_cpus : NULL;
	conn_set_init(&sh->cs, &sh->w, &dp_conn_ops, 0);
	if (cp) {
		if (i == 0 && cp_attach(cp, g.nshards) != 0)
			return -ENOMEM;
		sh->w.port = cp_port(cp, i);
		sh->w.rcpt_check = cp_rcpt_check_fn(cp);
		sh->w.rcpt_ctx = cp_rcpt_ctx(cp);
	}
	sh->nconns = cfg->max_connections;
	sh->conns = calloc(sh->nconns, sizeof(*sh->conns));
	if (!sh->conns)
		return -ENOMEM;
	for (unsigned k = sh->nconns; k-- > 0;) {
		sh->conns[k].next_free = sh->free;
		sh->free = &sh->conns[k];
	}
	net_config_defaults(&nc);
	/* Connection entries for every session plus as many in TIME_WAIT;
	 * buffers for a quarter of them at once (an idle connection holds
	 * none, net.h). */
	nc.limits.max_conns = cfg->max_connections * 2;
	nc.limits.rcv_slots = nc.limits.snd_slots =
		RTE_MIN(cfg->max_connections / 4 + 64, 65536u);
	nc.limits.syn_backlog =
		RTE_MAX(nc.limits.syn_backlog, cfg->max_connections / 8);
	nc.addr = g.addr;
	nc.prefix_len = g.prefix;
	nc.gateway = g.gateway;
	memcpy(nc.mac, pi->mac, 6);
	memcpy(nc.ports, g.ports, sizeof(g.ports));
	nc.n_ports = g.nports;
	nc.tx_offload = pi->tx_offload;
	nc.tx = net_port_tx;
	nc.tx_ctx = sh->q;
	nc.clock = shard_clock;
	nc.clock_ctx = sh;
	nc.ops = &smtp_upcalls;
	nc.ops_arg = sh;
	/* Every shard reads ARP (its own cache); one answers it. */
	nc.arp_reply = i == 0;
	sh->st = net_stack_create(&nc);
	if (!sh->st) {
		fd_log(FD_LOG_ERR, "dpdk", "event=stack_create_failed shard=%u",
		       i);
		return -ENOMEM;
	}
	net_port_q_bind(sh->q, sh->st);
	return 0;
}

/* The checksum kinds a port computes or judges, for the log. */
static const char *
cksum_kinds(unsigned ip, unsigned l4)
{
	return ip && l4 ? "ip+l4" : ip ? "ip" : l4 ? "l4" : "no";
}

int
dpdk_transport_main(const struct fd_config *cfg, const uint64_t *seed_msgid,
		    struct cplane *cp, void (*reload)(void))
{
	struct ctl_ops *ops = NULL;
	struct net_port_info pi;
	int r, status = 0;

	reload_fn = reload;

	g.cfg = cfg;
	if (parse_ipv4(cfg->dpdk_ip, &g.addr, &g.prefix) != 0) {
		fd_log(FD_LOG_ERR, "dpdk", "event=config_error "
		       "reason=\"--dpdk-ip ADDR/PREFIX is required\"");
		return -EINVAL;
	}
	if (cfg->dpdk_gateway[0] &&
	    parse_ipv4(cfg->dpdk_gateway, &g.gateway, NULL) != 0) {
		fd_log(FD_LOG_ERR, "dpdk", "event=config_error "
		       "reason=\"bad --dpdk-gateway\"");
		return -EINVAL;
	}
	for (unsigned i = 0; i < cfg->n_listen && g.nports < NET_MAX_LISTEN;
	     i++) {
		const struct sockaddr_in *a4 =
			(const struct sockaddr_in *)&cfg->listen[i].addr;
		if (a4->sin_family == AF_INET)
			g.ports[g.nports++] = ntohs(a4->sin_port);
	}
	r = net_port_init(cfg->dpdk_eal, &g.helper_cpus);
	if (r != 0)
		return r;
	/* The log writer started before the EAL pinned us (it may run on
	 * any CPU we had, the lcores' included): off the polled cores. The
	 * delivery log's writer moves in cp_start(). */
	if (CPU_COUNT(&g.helper_cpus) && fd_log_set_affinity(&g.helper_cpus))
		fd_log(FD_LOG_WARN, "dpdk", "event=log_affinity_failed");
	signal(SIGTERM, on_signal);
	signal(SIGINT, on_signal);
	signal(SIGHUP, on_signal);
	signal(SIGUSR1, on_usr1);
	signal(SIGPIPE, SIG_IGN);

	r = net_port_start(cfg->dpdk_offloads, &pi);
	if (r != 0) {
		status = r;
		goto out_port;
	}
	g.nshards = pi.nqueues;
	for (unsigned i = 0; i < g.nshards; i++) {
		r = shard_create(i, &pi, cp, seed_msgid);
		if (r != 0) {
			status = r;
			goto out_shards;
		}
	}
	{
		struct net_memory mem;
		char ip[INET_ADDRSTRLEN];
		struct in_addr a = {.s_addr = htonl(g.addr)};
		net_stack_memory(g.shards[0]->st, &mem);
		inet_ntop(AF_INET, &a, ip, sizeof(ip));
		fd_log(FD_LOG_INFO, "dpdk",
		       "event=port_ready port=%u shards=%u rss=%s "
		       "tx_offload=%s rx_cksum=%s ip=%s/%u mbufs=%u "
		       "stack_bytes_per_shard=%zu bytes_per_idle_conn=%zu",
		       pi.port, g.nshards, pi.rss ? "yes" : "software",
		       cksum_kinds(pi.tx_offload & NET_OFFLOAD_IPV4_CKSUM,
				   pi.tx_offload & NET_OFFLOAD_L4_CKSUM),
		       cksum_kinds(pi.rx_cksum & NET_RX_IPV4_CKSUM_GOOD,
				   pi.rx_cksum & NET_RX_L4_CKSUM_GOOD),
		       ip, g.prefix, pi.mbufs,
		       mem.total, mem.idle_conn);
	}
	/* The control plane's threads go where the spool's helpers go: off
	 * the busy-polled cores. */
	if (cp && cp_start(cp, CPU_COUNT(&g.helper_cpus) ? &g.helper_cpus
							  : NULL) != 0) {
		fd_log(FD_LOG_ERR, "main", "event=control_plane_failed");
		status = -ENOMEM;
		goto out_shards;
	}
	{
		int err = 0;
		/* Off the busy-polled cores, like the control plane. */
		ops = fd_ctl_start(cfg, cp, "dpdk", g.nshards, shards_stats,
				   NULL, net_stats,
				   CPU_COUNT(&g.helper_cpus) ? &g.helper_cpus
							     : NULL,
				   &err);
		if (!ops) {
			status = err;
			if (cp)
				cp_stop(cp);
			goto out_shards;
		}
	}
	/* Every lcore runs shard_main(); shard 0 logs event=ready once all
	 * shards started (shards_verdict()). */
	rte_eal_mp_remote_launch(shard_main, NULL, CALL_MAIN);
	rte_eal_mp_wait_lcore();
	if (atomic_load(&g.go) < 0)
		status = -EIO; /* shards_verdict() said which shard */
	ctl_ops_stop(ops);
	if (cp)
		cp_stop(cp);
	net_port_finish();
	{
		struct fd_worker_totals tot = {0};
		for (unsigned i = 0; i < g.nshards; i++)
			fd_worker_add_totals(&g.shards[i]->w, &tot);
		fd_worker_log_totals(g.nshards, &tot);
	}
out_shards:
	for (unsigned i = 0; i < g.nshards; i++) {
		struct shard *sh = g.shards[i];
		if (!sh)
			continue;
		if (sh->st)
			net_stack_destroy(sh->st);
		free(sh->conns);
		rte_free(sh);
		g.shards[i] = NULL;
	}
out_port:
	net_port_close();
	fd_log(FD_LOG_INFO, "main", "event=exit status=%d", status ? 1 : 0);
	return status;
}
