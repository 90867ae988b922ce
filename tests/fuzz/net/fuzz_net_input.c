/*
 * Fuzz target: the stack core fed a sequence of frames, clock steps and
 * upper-layer actions. Input = records [op][len lo][len hi][len bytes]:
 *   op 0: a raw Ethernet frame (rx flags from the first byte's low bits
 *         are not used: raw frames get no checksum help)
 *   op 1: an IPv4 payload from the peer: byte 0 = protocol, the rest the
 *         L4 bytes; Ethernet/IP headers and the TCP/ICMP checksum are made
 *         valid here so the bytes reach the deep state machines
 *   op 2: same as 1 but delivered with "checksums verified" rx flags and
 *         no checksum fixing
 *   op 3: advance the virtual clock by (b0 | b1 << 8) * 4 ms
 *   op 4: an upper-layer call on accepted connection b0 % N: b1 % 5 =
 *         send(len bytes), close, abort, resume, toggle consumption; with
 *         b0 >= 0xf0, what later accept() calls do (b1 % 5): accept,
 *         greet, greet+close, abort, refuse
 * Oracles: every frame the stack sends fits the MTU and carries correct
 * IPv4/TCP/ICMP checksums; the right edge a connection advertises never
 * moves left (but for window-scale truncation), judged per connection as
 * its peer sees it (struct edge_rec); pool counters stay within bounds;
 * after every timer ran out, every entry and buffer is back in its pool.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "net/net.h"
#include "net/tcp.h"
#include "../../unit/net/csum_oracle.h"

#define OUR_IP 0x0a000001u
#define PEER_IP 0x0a000002u
#define NU 16

static const uint8_t our_mac[6] = {2, 0, 0, 0, 0, 1};
static const uint8_t peer_mac[6] = {2, 0, 0, 0, 0, 2};

struct fz {
	uint64_t now_us;
	unsigned accept_mode; /* 0 normal, 1 greet, 2 close, 3 abort, 4 refuse */
	struct tcp_conn *conn[NU];
	bool used[NU];
	bool consume[NU];
	uint8_t sink[4096];
	uint32_t stack_nxt; /* end of the last segment the stack sent */
	struct net_stack *st;
	/* The frame being fed, while net_stack_input() runs: its 4-tuple
	 * (fed_tcp: it parsed as TCP) and the figures before it that tell
	 * a connection's birth (note_birth()). */
	bool feeding, fed_tcp, fed_arp, born;
	uint16_t fed_port;
	uint32_t fed_ip, fed_seq;
	uint32_t syn_received0;
	uint64_t cookies_ok0, cookies_sent0;
	/* Per step (step_begin(), step_end()): the stack's segment counts
	 * before it, and the segments with a window it sent at once. */
	uint64_t segs0, rsts0;
	uint32_t sent_win;
	/* steps that ended with no frame held for ARP; held_any: the value
	 * when a step not tied to one 4-tuple (timers, upper-layer calls)
	 * made a segment with a window that did not leave at once */
	uint32_t drained, held_any, held_any_gen;
};

/*
 * The window oracle: the right edge (ACK + window << scale) that the
 * connection now on a 4-tuple advertised to its peer never moves left by a
 * scale unit or more (RFC 9293 3.8.6.2.2; RFC 7323 2.4 lets truncation
 * take less than one unit).
 *
 * A record follows one connection, not a peer port: a port is reused by a
 * later connection (RST, then a new SYN) with an unrelated sequence space,
 * and edges of two connections do not compare. Hence:
 * - the birth of a connection (note_birth()) starts its 4-tuple's record
 *   over, before that connection's first frame is judged (else, when its
 *   SYN-ACK never left, its first ACK met the edge of the connection the
 *   port had before: regress-port-reused-synack-dropped);
 * - a SYN-ACK sets the edge and the scale; a connection made from a SYN
 *   cookie (no window scaling: the cookie SYN-ACK offers none) starts from
 *   the cookie SYN-ACK it acknowledged, or else from its first segment;
 * - a frame sent while an ARP frame is fed was held until the peer's
 *   address resolved (arp.c): it left later than it was made, maybe after
 *   its connection was reset and another took the 4-tuple. It is judged
 *   only when it cannot be older than the record's connection: when that
 *   one was born, no segment with a window made for its port (or by a
 *   step that could have made one for any port) had failed to leave since
 *   the ARP queue was last empty, or the queue has been empty since. The
 *   input kept as regress-held-synack-port-reused did that: the SYN-ACK of
 *   a connection reset since, let out of the ARP queue, set the edge of
 *   port 40005, whose new connection (its own SYN-ACK dropped by the full
 *   queue) then seemed to move it 2^31 octets left.
 * Indexed by peer port, the peer's address kept to tell two peers apart;
 * gen tells this input's records from earlier ones without clearing.
 */
struct edge_rec {
	uint32_t gen, ip;
	bool have;     /* edge and ws are known */
	bool ws0;      /* cookie connection, no edge yet: its next segment's */
	bool held_old; /* frames older than this connection may be held */
	uint8_t ws;
	uint32_t edge;
	uint32_t drained; /* fz.drained at the birth */
	/* fz.drained when a step fed on this port made a segment with a
	 * window that did not leave at once */
	uint32_t held_gen, held_at;
	/* the last cookie SYN-ACK sent to this port */
	uint32_t ck_gen, ck_ip, ck_ack, ck_edge;
};
static struct edge_rec edges[65536];
static uint32_t gen;

static uint32_t
rd32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 |
	       (uint32_t)p[2] << 8 | p[3];
}

static uint64_t
fz_clock(void *ctx)
{
	return ((struct fz *)ctx)->now_us;
}

/*
 * Only a fed segment makes a connection, and only on its own 4-tuple: the
 * stack made a SYN_RECEIVED entry, or one from a valid SYN cookie, when
 * the pool's SYN_RECEIVED count or the cookies-accepted counter rose since
 * the segment went in. Then the peer's record of that 4-tuple is of an
 * older connection: start it over. Runs before every frame is judged and
 * once more after the input, for a birth whose frames never left.
 */
static void
note_birth(struct fz *z)
{
	const struct net_counters *k;
	struct net_pool_stats ps;
	struct edge_rec *r;
	bool cookie;

	if (!z->feeding || z->born)
		return;
	k = net_stack_counters(z->st);
	net_stack_pools(z->st, &ps);
	cookie = k->tcp_syncookies_ok != z->cookies_ok0;
	if (!cookie && ps.syn_received <= z->syn_received0)
		return;
	z->born = true;
	if (!z->fed_tcp) {
		/* cannot tell whose: forget every record, and trust no
		 * held frame until the ARP queue drains */
		gen++;
		z->held_any_gen = gen;
		z->held_any = z->drained;
		return;
	}
	r = &edges[z->fed_port];
	r->gen = gen;
	r->ip = z->fed_ip;
	r->have = false;
	r->ws0 = cookie;
	r->held_old = (r->held_gen == gen && r->held_at == z->drained) ||
		      (z->held_any_gen == gen && z->held_any == z->drained);
	r->drained = z->drained;
	/* the ACK that made it acknowledged the cookie SYN-ACK: the
	 * SYN-ACK's ack (IRS + 1) is that segment's seq */
	if (cookie && r->ck_gen == gen && r->ck_ip == z->fed_ip &&
	    r->ck_ack == z->fed_seq) {
		r->have = true;
		r->ws = 0;
		r->edge = r->ck_edge;
	}
}

/* The window scale a SYN-ACK offers (0: none). */
static uint8_t
synack_ws(const uint8_t *t, size_t thl)
{
	uint8_t ws = 0;

	for (size_t o = 20; o + 2 < thl;) {
		if (t[o] == 0)
			break;
		if (t[o] == 1) {
			o++;
			continue;
		}
		if (t[o] == 3)
			ws = t[o + 2];
		o += t[o + 1] ? t[o + 1] : 1;
	}
	return ws;
}

/* The window oracle (struct edge_rec) on a TCP segment the stack sent to
 * dst; t: its header, thl octets with options. */
static void
judge_edge(struct fz *z, uint32_t dst, const uint8_t *t, size_t thl)
{
	uint16_t dport = (uint16_t)(t[2] << 8 | t[3]);
	uint32_t ack = rd32(t + 8);
	uint32_t wnd = (uint32_t)(t[14] << 8 | t[15]);
	struct edge_rec *r = &edges[dport];
	uint32_t e;

	if (!(t[13] & 0x10) || (t[13] & 0x04))
		return; /* RST or no ACK: no window to judge */
	if (!(z->feeding && z->fed_arp))
		z->sent_win++;
	if (z->feeding && z->fed_arp &&
	    (r->gen != gen || r->ip != dst ||
	     (r->held_old && r->drained == z->drained)))
		return; /* held for ARP, maybe by an older connection */
	note_birth(z);
	if (t[13] & 0x02) {
		/* RFC 7323 2.2: a SYN's window is never scaled */
		if (z->feeding &&
		    net_stack_counters(z->st)->tcp_syncookies_sent !=
			    z->cookies_sent0) {
			/* from no connection: kept for the one its ACK
			 * may make */
			r->ck_gen = gen;
			r->ck_ip = dst;
			r->ck_ack = ack;
			r->ck_edge = ack + wnd;
			return;
		}
		r->gen = gen;
		r->ip = dst;
		r->have = true;
		r->ws0 = false;
		r->ws = synack_ws(t, thl);
		r->edge = ack + wnd;
		return;
	}
	if (r->gen != gen || r->ip != dst)
		return;
	if (!r->have) {
		if (r->ws0) {
			r->have = true;
			r->ws = 0;
			r->edge = ack + wnd;
		}
		return;
	}
	e = ack + (wnd << r->ws);
	if ((int32_t)(e + (1u << r->ws) - r->edge) <= 0)
		__builtin_trap();
	if ((int32_t)(e - r->edge) > 0)
		r->edge = e;
}

static int
fz_tx(void *ctx, const struct net_iov *iov, unsigned n,
      const struct net_tx_meta *meta)
{
	uint8_t f[2048];
	size_t len = 0;

	(void)meta;
	for (unsigned i = 0; i < n; i++) {
		if (len + iov[i].len > 1514)
			__builtin_trap();
		memcpy(f + len, iov[i].base, iov[i].len);
		len += iov[i].len;
	}
	if (len >= 34 && f[12] == 0x08 && f[13] == 0x00) {
		const uint8_t *ip = f + 14;
		size_t tot = (size_t)(ip[2] << 8 | ip[3]);
		uint32_t s;
		if (tot + 14 != len || fold(sum16(0, ip, 20)) != 0)
			__builtin_trap();
		if (ip[9] == 6) {
			const uint8_t *t = ip + 20;
			size_t thl = (size_t)(t[12] >> 4) * 4;
			s = sum16(0, ip + 12, 8) + 6 + (uint32_t)(tot - 20);
			if (fold(sum16(s, ip + 20, tot - 20)) != 0)
				__builtin_trap();
			if (thl < 20 || thl > tot - 20)
				__builtin_trap();
			((struct fz *)ctx)->stack_nxt =
				rd32(t + 4) + (uint32_t)(tot - 20 - thl) +
				(t[13] & 1) + ((t[13] >> 1) & 1);
			judge_edge(ctx, rd32(ip + 16), t, thl);
		} else if (ip[9] == 1) {
			if (fold(sum16(0, ip + 20, tot - 20)) != 0)
				__builtin_trap();
		}
	}
	return 0;
}

static void *
fz_accept(void *arg, struct tcp_conn *c, const struct tcp_endpoint *r,
	  uint16_t port)
{
	struct fz *z = arg;

	(void)r;
	(void)port;
	switch (z->accept_mode) {
	case 1:
		tcp_send(c, "220 x\r\n", 7);
		break;
	case 2:
		tcp_send(c, "421 x\r\n", 7);
		tcp_close(c);
		return NULL;
	case 3:
		tcp_abort(c);
		return NULL;
	case 4:
		return NULL;
	default:
		break;
	}
	for (unsigned i = 0; i < NU; i++)
		if (!z->used[i]) {
			z->used[i] = true;
			z->conn[i] = c;
			z->consume[i] = true;
			return &z->used[i];
		}
	return NULL;
}

static struct fz *g_fz;

static unsigned
idx_of(void *u)
{
	return (unsigned)((bool *)u - g_fz->used);
}

static size_t
fz_recv(void *u, const uint8_t *p, size_t n)
{
	unsigned i = idx_of(u);

	if (!g_fz->consume[i])
		return n / 2;
	memcpy(g_fz->sink, p, n < sizeof(g_fz->sink) ? n : sizeof(g_fz->sink));
	return n;
}

static void
fz_eof(void *u)
{
	unsigned i = idx_of(u);
	tcp_close(g_fz->conn[i]);
	g_fz->used[i] = false;
	g_fz->conn[i] = NULL;
}

static void
fz_sent(void *u, size_t room)
{
	(void)u;
	(void)room;
}

static void
fz_closed(void *u, enum tcp_close_reason why, size_t unacked)
{
	unsigned i = idx_of(u);
	(void)why;
	(void)unacked;
	g_fz->used[i] = false;
	g_fz->conn[i] = NULL;
}

static const struct tcp_upcall_ops fz_ops = {fz_accept, fz_recv, fz_eof,
					     fz_sent, fz_closed};

/* Before each step of the input. */
static void
step_begin(struct fz *z)
{
	const struct net_counters *k = net_stack_counters(z->st);

	z->segs0 = k->tcp_segs_tx;
	z->rsts0 = k->tcp_rst_tx;
	z->sent_win = 0;
	z->fed_tcp = false;
}

/*
 * After each step: if it made a segment with a window (every one the stack
 * makes but a RST) that did not leave at once, that one may be held for ARP
 * (or was dropped): mark its port, or every port when the step was not a
 * frame fed. Then count the step as drained if no frame is held.
 */
static void
step_end(struct fz *z)
{
	const struct net_counters *k = net_stack_counters(z->st);
	struct net_pool_stats ps;
	uint64_t made =
		(k->tcp_segs_tx - z->segs0) - (k->tcp_rst_tx - z->rsts0);

	if (made > z->sent_win) {
		if (z->fed_tcp) {
			edges[z->fed_port].held_gen = gen;
			edges[z->fed_port].held_at = z->drained;
		} else {
			z->held_any_gen = gen;
			z->held_any = z->drained;
		}
	}
	net_stack_pools(z->st, &ps);
	if (ps.arp_held == 0)
		z->drained++;
}

/* One Ethernet frame into the stack, noting what note_birth() and
 * judge_edge() need of it. */
static void
feed(struct fz *z, const uint8_t *f, size_t len, unsigned rx_flags)
{
	const struct net_counters *k = net_stack_counters(z->st);
	struct net_pool_stats ps;
	const uint8_t *ip = f + 14;
	size_t ihl;

	net_stack_pools(z->st, &ps);
	z->syn_received0 = ps.syn_received;
	z->cookies_ok0 = k->tcp_syncookies_ok;
	z->cookies_sent0 = k->tcp_syncookies_sent;
	z->born = false;
	z->fed_arp = len >= 14 && f[12] == 0x08 && f[13] == 0x06;
	z->fed_tcp = false;
	if (len >= 34 && f[12] == 0x08 && f[13] == 0x00 && ip[9] == 6) {
		ihl = (size_t)(ip[0] & 0xf) * 4;
		if (ihl >= 20 && len >= 14 + ihl + 8) {
			z->fed_tcp = true;
			z->fed_ip = rd32(ip + 12);
			z->fed_port = (uint16_t)(ip[ihl] << 8 | ip[ihl + 1]);
			z->fed_seq = rd32(ip + ihl + 4);
		}
	}
	z->feeding = true;
	net_stack_input(z->st, f, len, rx_flags);
	note_birth(z); /* e.g. its SYN-ACK dropped by a full ARP queue */
	z->feeding = false;
}

static void
feed_l4(struct fz *z, const uint8_t *d, size_t n, bool fix)
{
	uint8_t f[1600];
	uint8_t *ip = f + 14;
	size_t l4 = n - 1;
	uint32_t s;

	if (n < 1 || l4 > 1500 - 20)
		return;
	memcpy(f, our_mac, 6);
	memcpy(f + 6, peer_mac, 6);
	f[12] = 0x08;
	f[13] = 0;
	memset(ip, 0, 20);
	ip[0] = 0x45;
	ip[2] = (uint8_t)((20 + l4) >> 8);
	ip[3] = (uint8_t)(20 + l4);
	ip[6] = 0x40;
	ip[8] = 64;
	ip[9] = d[0];
	ip[12] = 10, ip[15] = 2;
	ip[16] = 10, ip[19] = 1;
	s = fold(sum16(0, ip, 20));
	ip[10] = (uint8_t)(s >> 8);
	ip[11] = (uint8_t)s;
	memcpy(ip + 20, d + 1, l4);
	if (fix && d[0] == 6 && l4 >= 18) {
		uint8_t *t = ip + 20;
		/* ACK with ack 0: acknowledge what the stack last sent, so
		 * handshakes complete without knowing the ISS */
		if (l4 >= 14 && (t[13] & 0x10) && rd32(t + 8) == 0) {
			uint32_t a = z->stack_nxt;
			t[8] = (uint8_t)(a >> 24);
			t[9] = (uint8_t)(a >> 16);
			t[10] = (uint8_t)(a >> 8);
			t[11] = (uint8_t)a;
		}
		ip[20 + 16] = ip[20 + 17] = 0;
		s = sum16(0, ip + 12, 8) + 6 + (uint32_t)l4;
		s = fold(sum16(s, ip + 20, l4));
		ip[20 + 16] = (uint8_t)(s >> 8);
		ip[20 + 17] = (uint8_t)s;
	} else if (fix && d[0] == 1 && l4 >= 4) {
		ip[22] = ip[23] = 0;
		s = fold(sum16(0, ip + 20, l4));
		ip[22] = (uint8_t)(s >> 8);
		ip[23] = (uint8_t)s;
	}
	feed(z, f, 34 + l4,
	     fix ? 0 : NET_RX_IPV4_CKSUM_GOOD | NET_RX_L4_CKSUM_GOOD);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static uint8_t payload[8192];
	struct fz z;
	struct net_config cfg;
	struct net_stack *st;
	struct net_pool_stats ps;
	size_t i = 0;

	memset(&z, 0, sizeof(z));
	gen++;
	z.now_us = 5000000;
	g_fz = &z;
	net_config_defaults(&cfg);
	cfg.addr = OUR_IP;
	cfg.prefix_len = 24;
	cfg.gateway = 0x0a0000fe;
	memcpy(cfg.mac, our_mac, 6);
	cfg.ports[0] = 25;
	cfg.n_ports = 1;
	cfg.seed = 1;
	cfg.limits.max_conns = 8;
	cfg.limits.syn_backlog = 4;
	cfg.limits.rcv_buf = 4096;
	cfg.limits.snd_buf = 4096;
	cfg.limits.rcv_slots = 4;
	cfg.limits.snd_slots = 4;
	cfg.limits.arp_entries = 4;
	cfg.limits.arp_queue = 4;
	cfg.tx = fz_tx;
	cfg.tx_ctx = &z;
	cfg.clock = fz_clock;
	cfg.clock_ctx = &z;
	cfg.ops = &fz_ops;
	cfg.ops_arg = &z;
	st = net_stack_create(&cfg);
	if (!st)
		__builtin_trap();
	z.st = st;
	net_stack_start(st);
	for (size_t k = 0; k < sizeof(payload); k++)
		payload[k] = (uint8_t)k;

	while (i + 3 <= size) {
		uint8_t op = data[i] % 5;
		size_t len = (size_t)(data[i + 1] | data[i + 2] << 8) % 1600;
		const uint8_t *d = data + i + 3;

		i += 3;
		if (len > size - i)
			len = size - i;
		i += len;
		step_begin(&z);
		switch (op) {
		case 0:
			feed(&z, d, len, 0);
			break;
		case 1:
			feed_l4(&z, d, len, true);
			break;
		case 2:
			feed_l4(&z, d, len, false);
			break;
		case 3:
			if (len >= 2)
				z.now_us += (uint64_t)(d[0] | d[1] << 8) * 4000;
			else
				z.now_us += 1000;
			net_stack_poll_timers(st);
			break;
		case 4: {
			unsigned u;
			if (len < 2)
				break;
			if (d[0] >= 0xf0) {
				z.accept_mode = d[1] % 5u;
				break;
			}
			u = d[0] % NU;
			if (!z.used[u])
				break;
			switch (d[1] % 5) {
			case 0:
				tcp_send(z.conn[u], payload,
					 (size_t)d[1] * 37 % sizeof(payload));
				break;
			case 1:
				tcp_close(z.conn[u]);
				z.used[u] = false;
				break;
			case 2:
				tcp_abort(z.conn[u]);
				z.used[u] = false;
				break;
			case 3:
				tcp_resume(z.conn[u]);
				break;
			default:
				z.consume[u] = !z.consume[u];
				if (z.consume[u])
					tcp_resume(z.conn[u]);
				break;
			}
			break;
		}
		}
		step_end(&z);
		net_stack_pools(st, &ps);
		if (ps.conns_used > ps.conns_max || ps.rcv_free > ps.rcv_slots ||
		    ps.snd_free > ps.snd_slots || ps.syn_received > ps.conns_used)
			__builtin_trap();
	}
	/* let every timer run out: all entries must go away eventually
	 * (idle 600 s, 12 RTOs of at most 60 s, TIME_WAIT, FIN_WAIT_2) */
	for (int k = 0; k < 20; k++) {
		z.now_us += 60ull * 1000 * 1000;
		net_stack_poll_timers(st);
	}
	for (unsigned u = 0; u < NU; u++)
		if (z.used[u]) {
			tcp_abort(z.conn[u]);
			z.used[u] = false;
		}
	for (int k = 0; k < 3; k++) {
		z.now_us += 60ull * 1000 * 1000;
		net_stack_poll_timers(st);
	}
	net_stack_pools(st, &ps);
	if (ps.conns_used != 0 || ps.rcv_free != ps.rcv_slots ||
	    ps.snd_free != ps.snd_slots)
		__builtin_trap();
	net_stack_destroy(st);
	return 0;
}
