/*
 * The DPDK transport: EAL and port set-up, and the lcore loop that joins the
 * user-space TCP/IP stack (net_stack, pure C) to the SMTP engine and the
 * spool. The only file of finaldot that includes DPDK headers.
 *
 * Shards. Every lcore the EAL gives us runs one shard, up to the number of
 * queue pairs the port has: its own rx/tx queue, net_stack, SMTP sessions and
 * spool (a struct fd_worker, as on the kernel transport). Nothing is shared
 * between shards but the mbuf pool (per-lcore caches) and the rings below.
 *
 * Which shard owns a flow. net_flow_hash() is a Toeplitz hash with a
 * symmetric key (net.h). Where the port does RSS on IPv4/TCP we program the
 * same key and a round-robin redirection table, so the NIC puts a flow on
 * its owner's queue. Where it does not (tap, af_packet, virtio, fewer queues
 * than lcores, another RETA size), the receiving shard computes the owner
 * itself and hands the frame over on the owner's ring: correctness never
 * depends on the NIC (user-space stacks that trusted the NIC's RSS sent
 * replies to the wrong core). ARP frames go to every shard (each has its own ARP cache).
 *
 * The loop, per iteration (DPDK l2fwd/l3fwd shape):
 *   rx burst -> frames to the stack (which calls the SMTP glue below),
 *   frames handed over by other shards, stack timers, spool completions
 *   (the 250s), spool_flush() when the rx burst was not full (natural
 *   batching: nothing more to read now), session timers every 100 ms,
 *   tx burst of everything queued in this iteration (never held back).
 *
 * Checksums: the port's rx verdicts are used only when it reports GOOD; tx
 * offloads are used only when the port advertises them, and
 * --dpdk-offloads none|ip|l4|all narrows that further (some virtual ports
 * advertise offloads they do not perform, e.g. VMware and
 * bonding ports).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <rte_common.h>
#include <rte_cycles.h>
#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_ethdev.h>
#include <rte_lcore.h>
#include <rte_malloc.h>
#include <rte_mbuf.h>
#include <rte_mempool.h>
#include <rte_ring.h>

#include "control/cplane.h"
#include "control/ctlsock.h"
#include "control/sdnotify.h"
#include "finaldot/config.h"
#include "finaldot/log.h"
#include "finaldot/msgid.h"
#include "net/dpdk.h"
#include "net/net.h"
#include "net/tcp.h"
#include "smtp/smtp.h"
#include "spool/spool.h"
#include "tls/tls.h"
#include "worker.h"

#define BURST 32
#define RX_DESC 1024
#define TX_DESC 1024
#define HANDOFF_RING 4096
#define TIMER_SCAN_US 100000

struct shard;

/* The glue's state for one TCP connection carrying one SMTP session. */
struct dp_conn {
	struct shard *sh;
	struct tcp_conn *tc;
	struct smtp_session *s;
	bool in_use;
	bool paused; /* the session did not take all it was offered */
	bool woken;  /* on the shard's woken list */
	struct dp_conn *woken_next;
	uint64_t last_active_us;
	uint64_t greet_due_us;
	struct dp_conn *next_free;
	/* STARTTLS: from the octet after the 220 on (tls/tls.h) */
	struct fd_tls_conn *tls;
	bool hs_running;  /* counted in shard->handshakes */
	bool hs_waiting;  /* waits for a handshake slot */
	bool tls_closing; /* close_notify queued */
	uint64_t hs_wait_us;
	char addr[INET_ADDRSTRLEN];
};

struct shard {
	unsigned id;
	uint16_t queue;
	struct net_stack *st;
	struct fd_worker w;
	struct rte_ring *handoff; /* frames other shards received for us */
	struct rte_mbuf *tx[BURST];
	unsigned ntx;
	struct dp_conn *conns;
	struct dp_conn *free;
	struct dp_conn *woken; /* commit verdicts delivered, to service */
	unsigned nconns;
	unsigned in_use;
	unsigned npaused; /* connections with paused set */
	unsigned handshakes, hs_waiting; /* TLS: running, waiting a slot */
	unsigned ntls; /* connections with TLS */
	uint64_t sid;
	uint64_t now_us;
	uint64_t next_scan_us;
	bool stopping;
	uint64_t stop_deadline_us;
	/* counters */
	uint64_t tx_dropped, handoff_out, handoff_in, handoff_full;
	uint64_t rx_multiseg_dropped, refused;
	/* the stack's drops by reason, for /metrics (shard_publish) */
	_Atomic uint64_t pub_drops[CTL_DROP_N] __rte_cache_aligned;
} __rte_cache_aligned;

static struct {
	const struct fd_config *cfg;
	const uint64_t *seeds;
	uint16_t port;
	unsigned nshards;
	struct shard *shards[RTE_MAX_LCORE];
	struct rte_mempool *pool;
	unsigned tx_offload;
	bool rx_cksum;
	bool rss;
	uint32_t addr, gateway;
	uint8_t prefix;
	struct rte_ether_addr mac;
	uint16_t ports[NET_MAX_LISTEN];
	unsigned nports;
	cpu_set_t helper_cpus; /* ours before EAL pinned us, minus the lcores */
	volatile sig_atomic_t stop;
	volatile sig_atomic_t reload; /* SIGHUP, taken by shard 0 */
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

/* ---- transmit ------------------------------------------------------------ */

static void
shard_tx_flush(struct shard *sh)
{
	uint16_t sent;

	if (sh->ntx == 0)
		return;
	sent = rte_eth_tx_burst(g.port, sh->queue, sh->tx, (uint16_t)sh->ntx);
	for (unsigned i = sent; i < sh->ntx; i++) {
		rte_pktmbuf_free(sh->tx[i]);
		sh->tx_dropped++; /* TCP recovers by retransmission */
	}
	sh->ntx = 0;
}

static int
shard_tx(void *ctx, const struct net_iov *iov, unsigned n,
	 const struct net_tx_meta *meta)
{
	struct shard *sh = ctx;
	struct rte_mbuf *m;
	size_t total = 0;
	char *p;

	for (unsigned i = 0; i < n; i++)
		total += iov[i].len;
	m = rte_pktmbuf_alloc(g.pool);
	if (!m)
		return -ENOBUFS;
	if (total > rte_pktmbuf_tailroom(m) ||
	    !(p = rte_pktmbuf_append(m, (uint16_t)total))) {
		rte_pktmbuf_free(m);
		return -EMSGSIZE;
	}
	for (unsigned i = 0; i < n; i++) {
		memcpy(p, iov[i].base, iov[i].len);
		p += iov[i].len;
	}
	if (meta && meta->flags) {
		m->tx_offload = rte_mbuf_tx_offload(meta->l2_len, meta->l3_len,
						    meta->l4_len, 0, 0, 0, 0);
		m->ol_flags |= RTE_MBUF_F_TX_IPV4;
		if (meta->flags & NET_OFFLOAD_IPV4_CKSUM)
			m->ol_flags |= RTE_MBUF_F_TX_IP_CKSUM;
		if (meta->flags & NET_OFFLOAD_L4_CKSUM)
			m->ol_flags |= RTE_MBUF_F_TX_TCP_CKSUM;
	}
	sh->tx[sh->ntx++] = m;
	if (sh->ntx == BURST)
		shard_tx_flush(sh);
	return 0;
}

static uint64_t
shard_clock(void *ctx)
{
	struct shard *sh = ctx;

	return sh->now_us;
}

/* ---- the SMTP glue: TCP upcalls ------------------------------------------ */

static void
set_paused(struct dp_conn *c, bool paused)
{
	if (c->paused == paused)
		return;
	if (paused)
		c->sh->npaused++;
	else
		c->sh->npaused--;
	c->paused = paused;
}

static bool conn_flush(struct dp_conn *c);

/*
 * A TLS handshake ended (or its connection): the slot goes to the
 * connection that waited longest. XXX a scan, once per handshake, only
 * while some wait; the same rule as the kernel transport's.
 */
static void
hs_release(struct dp_conn *c)
{
	struct shard *sh = c->sh;
	struct dp_conn *next = NULL;

	if (c->hs_waiting) {
		c->hs_waiting = false;
		sh->hs_waiting--;
	}
	if (!c->hs_running)
		return;
	c->hs_running = false;
	sh->handshakes--;
	if (sh->hs_waiting == 0)
		return;
	for (unsigned i = 0; i < sh->nconns; i++) {
		struct dp_conn *w = &sh->conns[i];
		if (w->in_use && w->hs_waiting &&
		    (!next || w->hs_wait_us < next->hs_wait_us))
			next = w;
	}
	if (next && conn_flush(next) && next->paused)
		tcp_resume(next->tc);
}

static void
conn_free(struct dp_conn *c)
{
	struct shard *sh = c->sh;

	hs_release(c);
	/* A handshake that never completed, whatever ended it: once. */
	if (c->tls && !fd_tls_conn_established(c->tls))
		sh->w.tls_failed++;
	if (c->tls) {
		fd_tls_conn_free(c->tls); /* tcp_send() copied what it took */
		c->tls = NULL;
		sh->ntls--;
	}
	set_paused(c, false);
	if (c->woken) { /* unlink: the slot may be reused before servicing */
		struct dp_conn **pp = &sh->woken;
		while (*pp && *pp != c)
			pp = &(*pp)->woken_next;
		if (*pp)
			*pp = c->woken_next;
		c->woken = false;
	}
	c->in_use = false;
	c->s = NULL;
	c->tc = NULL;
	c->next_free = sh->free;
	sh->free = c;
	sh->in_use--;
}

/*
 * RFC 1047: the session ends. Our stack knows what the client's TCP has
 * acknowledged: everything handed to it but what is still queued
 * (SND.UNA). A 250 to a final dot that ends beyond that may never have
 * been read; the control plane is told. A session that ended with QUIT is
 * taken as read (as on the kernel transport, sock.c).
 */
static void
conn_check_indoubt(struct dp_conn *c, size_t unacked)
{
	struct smtp_ackpoint ap[SMTP_ACKPOINTS];
	uint64_t acked;
	unsigned n;

	if (!c->s || smtp_session_quit_seen(c->s))
		return;
	n = smtp_session_ackpoints(c->s, ap);
	if (n == 0)
		return;
	/* Under TLS the stream carries ciphertext: compare where the record
	 * with the reply ends. */
	acked = (c->tls ? fd_tls_conn_wire_sent(c->tls)
			: smtp_session_output_total(c->s)) -
		unacked;
	for (unsigned i = 0; i < n; i++) {
		uint64_t end = c->tls ? fd_tls_conn_wire_end(c->tls, ap[i].end)
				      : ap[i].end;
		if (end > acked)
			fd_worker_indoubt(&c->sh->w, ap[i].msgid);
	}
}

/* Session and connection both end; FIN after the queued replies. */
static void
conn_end(struct dp_conn *c)
{
	conn_check_indoubt(c, tcp_conn_snd_queued(c->tc));
	smtp_session_close(c->s);
	tcp_close(c->tc);
	conn_free(c);
}

/* Ciphertext into the TCP send buffer. True: all of it went. */
static bool
tls_push(struct dp_conn *c)
{
	const uint8_t *p;
	size_t n;

	while ((n = fd_tls_conn_out(c->tls, &p)) > 0) {
		size_t k = tcp_send(c->tc, p, n);
		fd_tls_conn_out_done(c->tls, k);
		if (k < n)
			return false; /* sent() will call again */
	}
	return true;
}

/*
 * conn_flush() once TLS has started: run the handshake (within the
 * shard's cap on concurrent ones), feed the session what TLS decrypted,
 * encrypt its replies, send. False when the connection ended.
 */
static bool
conn_flush_tls(struct dp_conn *c)
{
	struct shard *sh = c->sh;
	bool hs = !fd_tls_conn_established(c->tls);
	enum fd_tls_status st;

	if (hs && !c->hs_running) {
		if (sh->handshakes >= g.cfg->tls_max_handshakes) {
			if (!c->hs_waiting) {
				c->hs_waiting = true;
				c->hs_wait_us = sh->now_us;
				sh->hs_waiting++;
			}
			return true; /* hs_release() calls again */
		}
		if (c->hs_waiting) {
			c->hs_waiting = false;
			sh->hs_waiting--;
		}
		c->hs_running = true;
		sh->handshakes++;
	}
again:
	st = fd_tls_conn_pump(c->tls, c->s, sh->now_us);
	if (hs && fd_tls_conn_established(c->tls)) {
		hs_release(c);
		if (fd_tls_conn_resumed(c->tls))
			sh->w.tls_resumed++;
	}
	if (st == FD_TLS_FAILED) {
		tls_push(c); /* the alert, if it fits; then FIN */
		conn_end(c);
		return false;
	}
	if (smtp_session_want_close(c->s) && !c->tls_closing) {
		c->tls_closing = true;
		fd_tls_conn_shutdown(c->tls);
	}
	{
		uint64_t sent0 = fd_tls_conn_wire_sent(c->tls);
		if (!tls_push(c))
			return true; /* sent() calls again */
		/* Everything went into TCP: the TLS ring has room again, and
		 * the pump may have stopped for it (replies waiting to be
		 * encrypted, input waiting for them): pump once more, as
		 * up_recv() does in the clear. */
		if (fd_tls_conn_wire_sent(c->tls) != sent0 && !c->tls_closing &&
		    st == FD_TLS_OK) {
			hs = !fd_tls_conn_established(c->tls);
			goto again;
		}
	}
	if (c->tls_closing || st == FD_TLS_CLOSED) {
		conn_end(c);
		return false;
	}
	return true;
}

/* Move the session's replies into the TCP send buffer; end the connection
 * when the session is done. Returns false when the connection ended. */
static bool
conn_flush(struct dp_conn *c)
{
	const uint8_t *p;
	size_t n;

	if (c->tls)
		return conn_flush_tls(c);
	while ((n = smtp_session_output(c->s, &p)) > 0) {
		size_t k = tcp_send(c->tc, p, n);
		if (k)
			smtp_session_output_done(c->s, k);
		if (k < n)
			return true; /* sent() will call again */
	}
	if (smtp_session_want_close(c->s)) {
		conn_end(c);
		return false;
	}
	/* The 220 to STARTTLS is in the send buffer: the stream is TLS
	 * from the next octet on, both ways. */
	if (smtp_session_tls_wanted(c->s)) {
		c->tls = fd_tls_conn_new(fd_tls, smtp_session_id(c->s),
					 smtp_session_output_total(c->s),
					 c->sh->now_us);
		if (!c->tls) {
			fd_log(FD_LOG_WARN, "dpdk",
			       "%016" PRIx64 " event=tls_no_memory",
			       smtp_session_id(c->s));
			conn_end(c);
			return false;
		}
		c->sh->ntls++;
	}
	return true;
}

static void *
up_accept(void *arg, struct tcp_conn *tc, const struct tcp_endpoint *remote,
	  uint16_t local_port)
{
	struct shard *sh = arg;
	struct dp_conn *c = sh->free;
	struct in_addr a = {.s_addr = htonl(remote->addr)};

	(void)local_port;
	/* Paused (finaldotctl pause): 421 4.3.2 and FIN (tcp_close() from
	 * inside accept(), tcp.h); the sessions already open go on. */
	if (atomic_load_explicit(&fd_paused, memory_order_relaxed)) {
		tcp_send(tc, sh->w.paused_reply, sh->w.paused_len);
		tcp_close(tc);
		sh->w.paused_refused++;
		return NULL;
	}
	if (!c || sh->stopping) {
		sh->refused++;
		return NULL; /* the stack answers RST */
	}
	sh->free = c->next_free;
	memset(c, 0, sizeof(*c));
	c->sh = sh;
	c->tc = tc;
	c->in_use = true;
	sh->in_use++;
	inet_ntop(AF_INET, &a, c->addr, sizeof(c->addr));
	c->s = smtp_session_open(sh->w.smtp, c, c->addr,
				 (uint64_t)sh->id << 56 | sh->sid++);
	if (!c->s) {
		conn_free(c);
		sh->refused++;
		return NULL;
	}
	c->last_active_us = sh->now_us;
	if (g.cfg->greet_delay_ms)
		c->greet_due_us = sh->now_us + g.cfg->greet_delay_ms * 1000;
	if (!conn_flush(c))
		return NULL;
	return c;
}

static size_t
up_recv(void *u, const uint8_t *p, size_t n)
{
	struct dp_conn *c = u;
	size_t used;

	if (c->tls) {
		used = fd_tls_conn_in(c->tls, p, n);
		c->last_active_us = c->sh->now_us;
		set_paused(c, used < n);
		if (!conn_flush(c))
			return n;
		return used;
	}
	/*
	 * The session stops taking input when its replies fill its output
	 * buffer (a client pipelining hundreds of commands). Moving them into
	 * the TCP send buffer makes room again, and when TCP took them all
	 * nothing else would wake this session (no sent() is due, no spool
	 * event: it would hang until its idle timeout), so offer the rest at
	 * once. Stop when an offer neither took input nor sent replies: the
	 * session waits for a commit (service_woken), for spool room
	 * (resume_paused) or for TCP room (sent()).
	 */
	used = 0;
	c->last_active_us = c->sh->now_us;
	for (;;) {
		uint64_t out0 = smtp_session_output_total(c->s);
		size_t k = smtp_session_input(c->s, p + used, n - used);
		used += k;
		if (!conn_flush(c))
			return n; /* ended: nothing more will be read */
		if (used == n || c->tls ||
		    (k == 0 && smtp_session_output_total(c->s) == out0))
			break;
	}
	set_paused(c, used < n);
	return used;
}

static void
up_eof(void *u)
{
	struct dp_conn *c = u;

	if (conn_flush(c))
		conn_end(c);
}

static void
up_sent(void *u, size_t room)
{
	struct dp_conn *c = u;

	(void)room;
	if (conn_flush(c) && c->paused)
		tcp_resume(c->tc);
}

static void
up_closed(void *u, enum tcp_close_reason reason, size_t unacked)
{
	struct dp_conn *c = u;

	(void)reason;
	conn_check_indoubt(c, unacked);
	smtp_session_close(c->s);
	conn_free(c);
}

static const struct tcp_upcall_ops smtp_upcalls = {
	.accept = up_accept,
	.recv = up_recv,
	.eof = up_eof,
	.sent = up_sent,
	.closed = up_closed,
};

/*
 * The spool's verdict reached a session (worker.c). Called from inside the
 * spool's completion loop: only note it; the replies are sent and the input
 * resumed by service_woken() once spool_poll() has returned.
 */
static void
wake_session(void *tctx)
{
	struct dp_conn *c = tctx;

	if (!c->in_use || c->woken)
		return;
	c->woken = true;
	c->woken_next = c->sh->woken;
	c->sh->woken = c;
}

static void
service_woken(struct shard *sh)
{
	while (sh->woken) {
		struct dp_conn *c = sh->woken;
		sh->woken = c->woken_next;
		c->woken = false;
		if (c->in_use && conn_flush(c) && c->paused)
			tcp_resume(c->tc);
	}
}

/* Spool room may have come free: offer paused sessions their input. */
static void
resume_paused(struct shard *sh)
{
	if (sh->npaused == 0 && sh->ntls == 0)
		return;
	for (unsigned i = 0; i < sh->nconns; i++) {
		struct dp_conn *c = &sh->conns[i];
		if (!c->in_use || smtp_session_commit_pending(c->s))
			continue;
		/* Under TLS the session's input waits in the TLS layer. */
		if (c->tls && fd_tls_conn_holding(c->tls) && !conn_flush(c))
			continue;
		if (c->paused)
			tcp_resume(c->tc);
	}
}

/* Greeting delay and SMTP idle timeout. XXX: a scan of the table every
 * 100 ms; a timer wheel shared with the kernel transport would be O(due). */
static void
session_timers(struct shard *sh)
{
	uint64_t idle_us = g.cfg->idle_timeout_ms * 1000;

	for (unsigned i = 0; i < sh->nconns; i++) {
		struct dp_conn *c = &sh->conns[i];
		if (!c->in_use)
			continue;
		if (c->greet_due_us && c->greet_due_us <= sh->now_us) {
			c->greet_due_us = 0;
			smtp_session_greet(c->s);
			if (!conn_flush(c))
				continue;
		}
		/* A TLS handshake's own deadline (a trickling client keeps
		 * the idle timer from firing); the pump ends it. */
		if (c->tls && fd_tls_conn_deadline_us(c->tls) &&
		    fd_tls_conn_deadline_us(c->tls) <= sh->now_us) {
			if (!c->hs_running) {
				fd_log(FD_LOG_INFO, "dpdk",
				       "%016" PRIx64 " event=tls_failed "
				       "reason=\"handshake timeout (waited for "
				       "a handshake slot)\"",
				       smtp_session_id(c->s));
				conn_end(c);
				continue;
			}
			if (!conn_flush(c))
				continue;
		}
		if (c->last_active_us + idle_us <= sh->now_us) {
			c->last_active_us = UINT64_MAX / 2; /* once */
			smtp_session_timeout(c->s);
			conn_flush(c);
		}
	}
}

/* ---- receive and hand-off ------------------------------------------------ */

/* Owner shard of a frame: >= 0 a shard, -1 every shard (ARP), -2 this one. */
static int
frame_owner(const uint8_t *f, size_t len)
{
	uint16_t type;
	size_t ihl;

	if (len < 14)
		return -2;
	type = (uint16_t)(f[12] << 8 | f[13]);
	if (type == 0x0806)
		return -1;
	if (type != 0x0800 || len < 14 + 20)
		return -2;
	ihl = (size_t)(f[14] & 0x0f) * 4;
	if (f[14 + 9] != 6 || len < 14 + ihl + 4)
		return -2;
	const uint8_t *ip = f + 14, *th = ip + ihl;
	uint32_t sa = (uint32_t)ip[12] << 24 | (uint32_t)ip[13] << 16 |
		      (uint32_t)ip[14] << 8 | ip[15];
	uint32_t da = (uint32_t)ip[16] << 24 | (uint32_t)ip[17] << 16 |
		      (uint32_t)ip[18] << 8 | ip[19];
	uint16_t sp = (uint16_t)(th[0] << 8 | th[1]);
	uint16_t dp = (uint16_t)(th[2] << 8 | th[3]);
	return (int)net_shard_of(net_flow_hash(sa, da, sp, dp), g.nshards);
}

static void
shard_input(struct shard *sh, struct rte_mbuf *m)
{
	unsigned fl = 0;

	if (g.rx_cksum) {
		if ((m->ol_flags & RTE_MBUF_F_RX_IP_CKSUM_MASK) ==
		    RTE_MBUF_F_RX_IP_CKSUM_GOOD)
			fl |= NET_RX_IPV4_CKSUM_GOOD;
		if ((m->ol_flags & RTE_MBUF_F_RX_L4_CKSUM_MASK) ==
		    RTE_MBUF_F_RX_L4_CKSUM_GOOD)
			fl |= NET_RX_L4_CKSUM_GOOD;
	}
	net_stack_input(sh->st, rte_pktmbuf_mtod(m, const uint8_t *),
			rte_pktmbuf_data_len(m), fl);
	rte_pktmbuf_free(m);
}

static void
shard_rx(struct shard *sh, struct rte_mbuf *m)
{
	int owner;

	if (m->nb_segs > 1 && rte_pktmbuf_linearize(m) != 0) {
		sh->rx_multiseg_dropped++;
		rte_pktmbuf_free(m);
		return;
	}
	if (g.nshards == 1) {
		shard_input(sh, m);
		return;
	}
	owner = frame_owner(rte_pktmbuf_mtod(m, const uint8_t *),
			    rte_pktmbuf_data_len(m));
	if (owner == -1) {
		/* Every shard reads the same frame: one reference each. */
		rte_mbuf_refcnt_update(m, (int16_t)(g.nshards - 1));
		for (unsigned i = 0; i < g.nshards; i++) {
			if (i == sh->id)
				continue;
			if (rte_ring_enqueue(g.shards[i]->handoff, m) != 0) {
				sh->handoff_full++;
				rte_pktmbuf_free(m);
			}
		}
		shard_input(sh, m);
		return;
	}
	if (owner >= 0 && (unsigned)owner != sh->id) {
		if (rte_ring_enqueue(g.shards[owner]->handoff, m) != 0) {
			sh->handoff_full++;
			rte_pktmbuf_free(m);
		} else {
			sh->handoff_out++;
		}
		return;
	}
	shard_input(sh, m);
}

/* ---- the lcore loop ------------------------------------------------------ */

static void
shard_begin_stop(struct shard *sh)
{
	sh->stopping = true;
	sh->stop_deadline_us = sh->now_us + g.cfg->shutdown_timeout_ms * 1000;
	for (unsigned i = 0; i < sh->nconns; i++) {
		struct dp_conn *c = &sh->conns[i];
		if (c->in_use) {
			smtp_session_shutdown(c->s);
			conn_flush(c);
		}
	}
}

/*
 * The stack's drop counters by reason, where /metrics reads them (every
 * 100 ms, with the worker's own counters).
 */
static void
shard_publish(struct shard *sh)
{
	const struct net_counters *n = net_stack_counters(sh->st);
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
	d[CTL_DROP_HANDOFF_FULL] = sh->handoff_full;
	d[CTL_DROP_TX_FULL] = sh->tx_dropped;
	d[CTL_DROP_RX_MULTISEG] = sh->rx_multiseg_dropped;
	for (unsigned i = 0; i < CTL_DROP_N; i++)
		atomic_store_explicit(&sh->pub_drops[i], d[i],
				      memory_order_relaxed);
	sh->w.conns_current = sh->in_use;
	sh->w.sessions_refused = sh->refused;
}

/* /metrics: the port's counters and every shard's published drops. */
static void
net_stats(void *ctx, struct ctl_net_stats *out)
{
	struct rte_eth_stats st;

	(void)ctx;
	if (rte_eth_stats_get(g.port, &st) == 0) {
		out->rx_packets = st.ipackets;
		out->tx_packets = st.opackets;
		out->rx_bytes = st.ibytes;
		out->tx_bytes = st.obytes;
		out->rx_missed = st.imissed;
		out->rx_errors = st.ierrors;
		out->tx_errors = st.oerrors;
		out->rx_nombuf = st.rx_nombuf;
	}
	for (unsigned i = 0; i < g.nshards; i++)
		for (unsigned k = 0; k < CTL_DROP_N; k++)
			out->drops[k] += atomic_load_explicit(
				&g.shards[i]->pub_drops[k],
				memory_order_relaxed);
}

static void
shards_stats(void *ctx, unsigned i, struct ctl_worker_stats *out)
{
	(void)ctx;
	fd_worker_read_stats(&g.shards[i]->w, out);
}

static int
reload_raise(void *ctx)
{
	(void)ctx;
	return kill(getpid(), SIGHUP) == 0 ? 0 : -errno;
}

static int
shard_main(void *arg)
{
	int idx = rte_lcore_index((int)rte_lcore_id());
	struct shard *sh;
	struct rte_mbuf *pkts[BURST];

	(void)arg;
	if (idx < 0 || (unsigned)idx >= g.nshards)
		return 0;
	sh = g.shards[idx];
	sh->now_us = fd_now_monotonic_us();
	if (fd_worker_start(&sh->w, NULL, wake_session) != 0)
		return -1;
	if (sh->id == 0)
		net_stack_start(sh->st); /* gratuitous ARP, once per port */
	atomic_store(&sh->w.ready, true);

	unsigned idle = 0;
	for (;;) {
		uint16_t n = rte_eth_rx_burst(g.port, sh->queue, pkts, BURST);
		unsigned h;
		int done;

		sh->now_us = fd_now_monotonic_us();
		for (uint16_t i = 0; i < n; i++)
			shard_rx(sh, pkts[i]);
		h = rte_ring_dequeue_burst(sh->handoff, (void **)pkts, BURST,
					   NULL);
		sh->handoff_in += h;
		for (unsigned i = 0; i < h; i++)
			shard_input(sh, pkts[i]);
		net_stack_poll_timers(sh->st);
		done = spool_poll(sh->w.spool);
		/* Room also comes back without a completion: a spare segment
		 * made ready (issue 10). */
		if (done > 0 || spool_room_changed(sh->w.spool)) {
			service_woken(sh);
			resume_paused(sh);
		}
		/* Optional back-off (--dpdk-idle-sleep): on a shared core the
		 * kernel work we depend on (tap, io-wq flushes) runs only
		 * when we let it. */
		if (n == 0 && h == 0 && done == 0 && sh->ntx == 0) {
			if (g.cfg->dpdk_idle_sleep_us && ++idle >= 100) {
				idle = 0;
				usleep((useconds_t)g.cfg->dpdk_idle_sleep_us);
			}
		} else {
			idle = 0;
		}
		if (n < BURST)
			spool_flush(sh->w.spool);
		if (sh->now_us >= sh->next_scan_us) {
			sh->next_scan_us = sh->now_us + TIMER_SCAN_US;
			session_timers(sh);
			shard_publish(sh);
			fd_worker_poll(&sh->w);
			if (sh->id == 0 && g.reload) {
				/* Reload: the TLS certificates, as on the
				 * kernel transport (a file read, on shard 0:
				 * rare, and the operator asked for it). XXX
				 * the rest of the configuration is read at
				 * start only. */
				char err[600];
				g.reload = 0;
				sdnotify_reloading();
				fd_log(FD_LOG_INFO, "main",
				       "event=reload_requested");
				if (fd_tls && fd_tls_server_reload(
						      fd_tls, err, sizeof(err)) == 0)
					fd_log(FD_LOG_INFO, "main",
					       "event=tls_reloaded");
				else if (fd_tls)
					fd_log(FD_LOG_ERR, "main",
					       "event=tls_reload_failed "
					       "kept=previous error=\"%s\"",
					       err);
				sdnotify("READY=1\nSTATUS=accepting mail");
			}
			if (g.stop && !sh->stopping) {
				if (sh->id == 0)
					sdnotify("STOPPING=1");
				shard_begin_stop(sh);
			}
		}
		shard_tx_flush(sh);
		if (sh->stopping &&
		    ((sh->in_use == 0 && net_stack_conn_count(sh->st) == 0) ||
		     sh->now_us >= sh->stop_deadline_us) &&
		    spool_inflight(sh->w.spool) == 0)
			break;
	}
	for (unsigned i = 0; i < sh->nconns; i++)
		if (sh->conns[i].in_use) {
			smtp_session_close(sh->conns[i].s);
			tcp_abort(sh->conns[i].tc);
			conn_free(&sh->conns[i]);
		}
	shard_tx_flush(sh);
	fd_worker_finish(&sh->w);
	const struct net_counters *nc = net_stack_counters(sh->st);
	fd_log(FD_LOG_INFO, "dpdk",
	       "shard=%u event=net_stats rx_frames=%" PRIu64
	       " tx_frames=%" PRIu64 " tcp_accepted=%" PRIu64
	       " tcp_retransmits=%" PRIu64 " tx_dropped=%" PRIu64
	       " handoff_out=%" PRIu64 " handoff_in=%" PRIu64
	       " handoff_full=%" PRIu64 " refused=%" PRIu64,
	       sh->id, nc->rx_frames, nc->tx_frames, nc->tcp_accepted,
	       nc->tcp_retransmits, sh->tx_dropped, sh->handoff_out,
	       sh->handoff_in, sh->handoff_full, sh->refused);
	return 0;
}

/* ---- set-up -------------------------------------------------------------- */

/* Split "a b 'c d'" into argv (single and double quotes, no escapes). */
static int
split_args(char *s, char **argv, int max)
{
	int argc = 0;

	while (*s) {
		while (*s == ' ' || *s == '\t')
			s++;
		if (!*s)
			break;
		if (argc >= max - 1)
			return -1;
		char q = (*s == '"' || *s == '\'') ? *s++ : 0;
		argv[argc++] = s;
		while (*s && (q ? *s != q : (*s != ' ' && *s != '\t')))
			s++;
		if (*s)
			*s++ = '\0';
	}
	argv[argc] = NULL;
	return argc;
}

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
port_setup(unsigned nlcores)
{
	struct rte_eth_dev_info info;
	struct rte_eth_conf conf;
	uint8_t key[128];
	uint16_t nq;
	int r;

	r = rte_eth_dev_info_get(g.port, &info);
	if (r != 0)
		return r;
	unsigned maxq = info.max_rx_queues < info.max_tx_queues
				? info.max_rx_queues
				: info.max_tx_queues;
	nq = (uint16_t)(nlcores < maxq ? nlcores : maxq);
	if (nq == 0)
		return -ENODEV;
	g.nshards = nq;
	memset(&conf, 0, sizeof(conf));
	if (nq > 1 && (info.flow_type_rss_offloads & RTE_ETH_RSS_NONFRAG_IPV4_TCP)) {
		/* The symmetric key, stretched to the port's key size: the
		 * repeated pattern gives the same hash at any length. */
		size_t klen = info.hash_key_size ? info.hash_key_size : 40;
		if (klen > sizeof(key))
			klen = sizeof(key);
		for (size_t i = 0; i < klen; i++)
			key[i] = net_rss_key[i % 2];
		conf.rxmode.mq_mode = RTE_ETH_MQ_RX_RSS;
		conf.rx_adv_conf.rss_conf.rss_key = key;
		conf.rx_adv_conf.rss_conf.rss_key_len = (uint8_t)klen;
		conf.rx_adv_conf.rss_conf.rss_hf = RTE_ETH_RSS_NONFRAG_IPV4_TCP;
		g.rss = true;
	}
	const char *want = g.cfg->dpdk_offloads;
	bool allow_ip = !strcmp(want, "auto") || !strcmp(want, "all") ||
			!strcmp(want, "ip");
	bool allow_l4 = !strcmp(want, "auto") || !strcmp(want, "all") ||
			!strcmp(want, "l4");
	if (allow_ip && (info.tx_offload_capa & RTE_ETH_TX_OFFLOAD_IPV4_CKSUM)) {
		conf.txmode.offloads |= RTE_ETH_TX_OFFLOAD_IPV4_CKSUM;
		g.tx_offload |= NET_OFFLOAD_IPV4_CKSUM;
	}
	if (allow_l4 && (info.tx_offload_capa & RTE_ETH_TX_OFFLOAD_TCP_CKSUM)) {
		conf.txmode.offloads |= RTE_ETH_TX_OFFLOAD_TCP_CKSUM;
		g.tx_offload |= NET_OFFLOAD_L4_CKSUM;
	}
	if ((allow_ip || allow_l4) &&
	    (info.rx_offload_capa & RTE_ETH_RX_OFFLOAD_CHECKSUM) ==
		    RTE_ETH_RX_OFFLOAD_CHECKSUM) {
		conf.rxmode.offloads |= RTE_ETH_RX_OFFLOAD_CHECKSUM;
		g.rx_cksum = true;
	}
	r = rte_eth_dev_configure(g.port, nq, nq, &conf);
	if (r != 0)
		return r;
	for (uint16_t q = 0; q < nq; q++) {
		int sock = rte_eth_dev_socket_id(g.port);
		r = rte_eth_rx_queue_setup(g.port, q, RX_DESC,
					   (unsigned)(sock < 0 ? 0 : sock),
					   NULL, g.pool);
		if (r == 0)
			r = rte_eth_tx_queue_setup(
				g.port, q, TX_DESC,
				(unsigned)(sock < 0 ? 0 : sock), NULL);
		if (r != 0)
			return r;
	}
	r = rte_eth_dev_start(g.port);
	if (r != 0)
		return r;
	if (g.rss && info.reta_size > 0) {
		struct rte_eth_rss_reta_entry64 reta[512 / RTE_ETH_RETA_GROUP_SIZE];
		unsigned sz = RTE_MIN(info.reta_size, 512u);
		memset(reta, 0, sizeof(reta));
		for (unsigned i = 0; i < sz; i++) {
			reta[i / RTE_ETH_RETA_GROUP_SIZE].mask |=
				1ULL << (i % RTE_ETH_RETA_GROUP_SIZE);
			reta[i / RTE_ETH_RETA_GROUP_SIZE]
				.reta[i % RTE_ETH_RETA_GROUP_SIZE] =
				(uint16_t)(i % nq);
		}
		if (rte_eth_dev_rss_reta_update(g.port, reta,
						(uint16_t)sz) != 0)
			fd_log(FD_LOG_WARN, "dpdk", "event=reta_update_failed "
			       "note=software_dispatch_only");
	}
	rte_eth_promiscuous_enable(g.port);
	return 0;
}

int
net_dpdk_main(const struct fd_config *cfg, const uint64_t *seed_msgid,
	      struct cplane *cp)
{
	static char eal_buf[sizeof(cfg->dpdk_eal) + 16];
	struct ctl_ops *ops = NULL;
	char *argv[128];
	int argc, r, status = 0;
	unsigned nlcores, pool_n;

	g.cfg = cfg;
	g.seeds = seed_msgid;
	snprintf(eal_buf, sizeof(eal_buf), "finaldot %s", cfg->dpdk_eal);
	argc = split_args(eal_buf, argv, (int)(sizeof(argv) / sizeof(argv[0])));
	if (argc < 0) {
		fd_log(FD_LOG_ERR, "dpdk", "event=bad_eal_args");
		return -EINVAL;
	}
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
	/* The CPUs we may use, before EAL pins this thread to its lcore. */
	if (sched_getaffinity(0, sizeof(g.helper_cpus), &g.helper_cpus) != 0)
		CPU_ZERO(&g.helper_cpus);
	r = rte_eal_init(argc, argv);
	if (r < 0) {
		fd_log(FD_LOG_ERR, "dpdk", "event=eal_init_failed error=\"%s\"",
		       rte_strerror(rte_errno));
		return -EINVAL;
	}
	{
		/* The spool's helper threads (io-wq flush workers, the
		 * segment preparer) go where no lcore busy-polls; if every
		 * CPU is an lcore, they may go anywhere we may. */
		cpu_set_t all = g.helper_cpus;
		for (unsigned lc = 0; lc < RTE_MAX_LCORE; lc++) {
			int cpu = rte_lcore_is_enabled(lc)
					  ? rte_lcore_to_cpu_id((int)lc)
					  : -1;
			if (cpu >= 0 && cpu < CPU_SETSIZE)
				CPU_CLR((size_t)cpu, &g.helper_cpus);
		}
		if (CPU_COUNT(&g.helper_cpus) == 0)
			g.helper_cpus = all;
	}
	signal(SIGTERM, on_signal);
	signal(SIGINT, on_signal);
	signal(SIGHUP, on_signal);
	signal(SIGUSR1, on_usr1);
	signal(SIGPIPE, SIG_IGN);

	if (rte_eth_dev_count_avail() == 0) {
		fd_log(FD_LOG_ERR, "dpdk", "event=no_port hint=\"give a PCI "
		       "device or --vdev=net_tap0,iface=NAME in --dpdk-eal\"");
		status = -ENODEV;
		goto out_eal;
	}
	g.port = rte_eth_find_next(0); /* the first port the EAL probed */
	nlcores = rte_lcore_count();
	/* rx descriptors + tx descriptors + bursts in flight, per lcore. */
	pool_n = nlcores * (RX_DESC + TX_DESC + 4 * BURST + 2048) + 1024;
	g.pool = rte_pktmbuf_pool_create("fd_mbuf", pool_n, 256, 0,
					 RTE_MBUF_DEFAULT_BUF_SIZE,
					 (int)rte_socket_id());
	if (!g.pool) {
		fd_log(FD_LOG_ERR, "dpdk", "event=mbuf_pool_failed n=%u "
		       "error=\"%s\"", pool_n, rte_strerror(rte_errno));
		status = -ENOMEM;
		goto out_eal;
	}
	r = port_setup(nlcores);
	if (r != 0) {
		fd_log(FD_LOG_ERR, "dpdk", "event=port_setup_failed port=%u "
		       "error=\"%s\"", g.port, strerror(-r));
		status = r;
		goto out_pool;
	}
	rte_eth_macaddr_get(g.port, &g.mac);
	/* In use now: what the rx rings took. The same figure at the end
	 * means no mbuf leaked (a PMD may keep its rings' mbufs at close). */
	unsigned in_use_start = pool_n - rte_mempool_avail_count(g.pool);
	if (g.nshards < nlcores)
		fd_log(FD_LOG_WARN, "dpdk", "event=fewer_queues_than_lcores "
		       "queues=%u lcores=%u note=\"extra lcores idle\"",
		       g.nshards, nlcores);

	for (unsigned i = 0; i < g.nshards; i++) {
		struct shard *sh = rte_zmalloc_socket("shard", sizeof(*sh),
						      RTE_CACHE_LINE_SIZE,
						      (int)rte_socket_id());
		struct net_config nc;
		char rname[32];
		if (!sh) {
			status = -ENOMEM;
			goto out_shards;
		}
		g.shards[i] = sh;
		sh->id = i;
		sh->queue = (uint16_t)i;
		sh->w.id = i;
		sh->w.cfg = cfg;
		sh->w.seed_msgid = seed_msgid ? seed_msgid[i] : 0;
		sh->w.helper_cpus =
			CPU_COUNT(&g.helper_cpus) ? &g.helper_cpus : NULL;
		if (cp) {
			if (i == 0 && cp_attach(cp, g.nshards) != 0) {
				status = -ENOMEM;
				goto out_shards;
			}
			sh->w.port = cp_port(cp, i);
			sh->w.rcpt_check = cp_rcpt_check_fn(cp);
			sh->w.rcpt_ctx = cp_rcpt_ctx(cp);
		}
		sh->nconns = cfg->max_connections;
		sh->conns = calloc(sh->nconns, sizeof(*sh->conns));
		snprintf(rname, sizeof(rname), "fd_handoff%u", i);
		sh->handoff = rte_ring_create(rname, HANDOFF_RING,
					      (int)rte_socket_id(),
					      RING_F_SC_DEQ);
		if (!sh->conns || !sh->handoff) {
			status = -ENOMEM;
			goto out_shards;
		}
		for (unsigned k = sh->nconns; k-- > 0;) {
			sh->conns[k].next_free = sh->free;
			sh->free = &sh->conns[k];
		}
		net_config_defaults(&nc);
		/* Connection entries for every session plus as many in
		 * TIME_WAIT; buffers for a quarter of them at once (an idle
		 * connection holds none, net.h). */
		nc.limits.max_conns = cfg->max_connections * 2;
		nc.limits.rcv_slots = nc.limits.snd_slots =
			RTE_MIN(cfg->max_connections / 4 + 64, 65536u);
		nc.limits.syn_backlog =
			RTE_MAX(nc.limits.syn_backlog, cfg->max_connections / 8);
		nc.addr = g.addr;
		nc.prefix_len = g.prefix;
		nc.gateway = g.gateway;
		memcpy(nc.mac, g.mac.addr_bytes, 6);
		memcpy(nc.ports, g.ports, sizeof(g.ports));
		nc.n_ports = g.nports;
		nc.tx_offload = g.tx_offload;
		nc.tx = shard_tx;
		nc.tx_ctx = sh;
		nc.clock = shard_clock;
		nc.clock_ctx = sh;
		nc.ops = &smtp_upcalls;
		nc.ops_arg = sh;
		/* Every shard reads ARP (its own cache); one answers it. */
		nc.arp_reply = i == 0;
		sh->st = net_stack_create(&nc);
		if (!sh->st) {
			fd_log(FD_LOG_ERR, "dpdk", "event=stack_create_failed "
			       "shard=%u", i);
			status = -ENOMEM;
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
		       "tx_offload=%s%s rx_cksum=%s ip=%s/%u mbufs=%u "
		       "stack_bytes_per_shard=%zu bytes_per_idle_conn=%zu",
		       g.port, g.nshards, g.rss ? "yes" : "software",
		       g.tx_offload & NET_OFFLOAD_IPV4_CKSUM ? "ip" : "",
		       g.tx_offload & NET_OFFLOAD_L4_CKSUM ? "+l4" : "",
		       g.rx_cksum ? "yes" : "no", ip, g.prefix, pool_n,
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
		static const char *ltext[FD_CONFIG_MAX_LISTEN];
		static struct ctl_sources src;
		int err = 0;
		for (unsigned i = 0; i < cfg->n_listen; i++)
			ltext[i] = cfg->listen[i].text;
		src = (struct ctl_sources){
			.cp = cp, .version = fd_version,
			.transport = "dpdk", .hostname = cfg->hostname,
			.listen = ltext, .n_listen = cfg->n_listen,
			.started_us = fd_now_realtime_us(),
			.n_workers = g.nshards, .worker_stats = shards_stats,
			.net_stats = net_stats, .paused = &fd_paused,
			.reload = reload_raise,
		};
		/* Off the busy-polled cores, like the control plane. */
		ops = ctl_ops_start(cfg, &src,
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
	fd_log(FD_LOG_INFO, "main", "event=ready transport=dpdk shards=%u",
	       g.nshards);
	sdnotify("READY=1\nSTATUS=accepting mail");
	rte_eal_mp_remote_launch(shard_main, NULL, CALL_MAIN);
	rte_eal_mp_wait_lcore();
	ctl_ops_stop(ops);
	if (cp)
		cp_stop(cp);
	/* Let the PMDs reap their tx completions (af_xdp does it lazily,
	 * inside a tx burst) so the count below sees every mbuf we sent. */
	for (int round = 0; round < 3; round++) {
		for (uint16_t q = 0; q < g.nshards; q++) {
			rte_eth_tx_done_cleanup(g.port, q, 0);
			rte_eth_tx_burst(g.port, q, NULL, 0);
		}
		rte_delay_us_block(1000);
	}
	{
		unsigned in_use_end = pool_n - rte_mempool_avail_count(g.pool);
		fd_log(FD_LOG_INFO, "dpdk",
		       "event=mbufs pool=%u in_use_start=%u in_use_end=%u "
		       "leaked=%u",
		       pool_n, in_use_start, in_use_end,
		       in_use_end > in_use_start ? in_use_end - in_use_start
						 : 0);
	}

	{
		struct fd_worker_totals tot = {0};
		for (unsigned i = 0; i < g.nshards; i++)
			fd_worker_add_totals(&g.shards[i]->w, &tot);
		fd_log(FD_LOG_INFO, "main",
		       "event=stats workers=%u sessions=%" PRIu64
		       " messages=%" PRIu64 " failed=%" PRIu64
		       " flushes=%" PRIu64 " batches=%" PRIu64
		       " flushes_per_message=%.4f",
		       g.nshards, tot.sessions, tot.messages, tot.failed,
		       tot.flushes, tot.batches,
		       tot.messages ? (double)tot.flushes /
					      (double)tot.messages
				    : 0.0);
	}
out_shards:
	for (unsigned i = 0; i < g.nshards; i++) {
		struct shard *sh = g.shards[i];
		struct rte_mbuf *m;
		if (!sh)
			continue;
		while (rte_ring_dequeue(sh->handoff, (void **)&m) == 0)
			rte_pktmbuf_free(m);
		if (sh->st)
			net_stack_destroy(sh->st);
		rte_ring_free(sh->handoff);
		free(sh->conns);
		rte_free(sh);
	}
	rte_eth_dev_stop(g.port);
	rte_eth_dev_close(g.port);
	fd_log(FD_LOG_INFO, "dpdk", "event=mbufs_after_close in_use=%u",
	       pool_n - rte_mempool_avail_count(g.pool));
out_pool:
	rte_mempool_free(g.pool);
out_eal:
	rte_eal_cleanup();
	fd_log(FD_LOG_INFO, "main", "event=exit status=%d", status ? 1 : 0);
	return status;
}
