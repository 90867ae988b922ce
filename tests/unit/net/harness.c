/* See harness.h. Frames are parsed and checked independently of the stack's
 * own code (its checksum routine is not used here). */
#include "harness.h"

#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>
#include "csum_oracle.h"

const uint8_t h_our_mac[6] = {0x02, 0, 0, 0, 0, 0x01};
const uint8_t h_peer_mac[6] = {0x02, 0, 0, 0, 0, 0x02};
const uint8_t h_gw_mac[6] = {0x02, 0, 0, 0, 0, 0xfe};

static uint16_t
rd16(const uint8_t *p)
{
	return (uint16_t)((p[0] << 8) | p[1]);
}
static uint32_t
rd32(const uint8_t *p)
{
	return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) |
	       ((uint32_t)p[2] << 8) | p[3];
}
static void
wr16(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)(v >> 8);
	p[1] = (uint8_t)v;
}
static void
wr32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)(v >> 24);
	p[1] = (uint8_t)(v >> 16);
	p[2] = (uint8_t)(v >> 8);
	p[3] = (uint8_t)v;
}

/* ---- stack callbacks ---- */

static uint64_t
h_clock(void *ctx)
{
	return ((struct harness *)ctx)->now_us;
}

uint32_t
h_rand(struct harness *h)
{
	/* xorshift64* */
	h->rng ^= h->rng >> 12;
	h->rng ^= h->rng << 25;
	h->rng ^= h->rng >> 27;
	return (uint32_t)((h->rng * 2685821657736338717ULL) >> 32);
}

static void
capture(struct harness *h, const uint8_t *f, size_t len,
	const struct net_tx_meta *meta)
{
	struct h_pkt *p;

	if (h->qtail - h->qhead >= H_MAXQ)
		cr_assert_fail("capture queue overflow");
	p = &h->q[h->qtail++ % H_MAXQ];
	memcpy(p->raw, f, len);
	p->len = len;
	p->meta = *meta;
}

static int
h_tx(void *ctx, const struct net_iov *iov, unsigned n,
     const struct net_tx_meta *meta)
{
	struct harness *h = ctx;
	uint8_t f[2048];
	size_t len = 0;

	for (unsigned i = 0; i < n; i++) {
		cr_assert(len + iov[i].len <= sizeof(f), "frame too long");
		memcpy(f + len, iov[i].base, iov[i].len);
		len += iov[i].len;
	}
	cr_assert(len <= (size_t)h->cfg.mtu + 14, "frame %zu > MTU", len);
	h->tx_total++;
	if (h->faults_tx) {
		uint32_t r = h_rand(h) % 100;
		if (r < h->drop_pct)
			return 0;
		if (r < h->drop_pct + h->dup_pct)
			capture(h, f, len, meta);
	}
	capture(h, f, len, meta);
	return 0;
}

static struct h_upper *
u_of(void *uctx)
{
	return uctx;
}

static void *
h_accept(void *arg, struct tcp_conn *c, const struct tcp_endpoint *remote,
	 uint16_t lport)
{
	struct harness *h = arg;

	(void)lport;
	if (h->refuse_accept)
		return NULL;
	for (unsigned i = 0; i < H_MAXU; i++) {
		struct h_upper *u = &h->up[i];
		if (u->used)
			continue;
		memset(u, 0, sizeof(*u));
		u->used = true;
		u->c = c;
		u->remote = *remote;
		u->consume_max = h->default_consume;
		h->last_accepted = u;
		if (h->greeting)
			cr_assert_eq(tcp_send(c, h->greeting,
					      strlen(h->greeting)),
				     strlen(h->greeting));
		if (h->close_in_accept || h->abort_in_accept) {
			if (h->close_in_accept)
				tcp_close(c);
			else
				tcp_abort(c);
			u->used = false;
			u->c = NULL;
		}
		return u;
	}
	return NULL;
}

static size_t
h_recv(void *uctx, const uint8_t *p, size_t n)
{
	struct h_upper *u = u_of(uctx);
	size_t k = n < u->consume_max ? n : u->consume_max;

	u->recv_calls++;
	if (k == 0)
		return 0;
	if (u->rx_len + k > u->rx_cap) {
		size_t cap = u->rx_cap ? u->rx_cap * 2 : 65536;
		while (cap < u->rx_len + k)
			cap *= 2;
		u->rx = realloc(u->rx, cap);
		cr_assert(u->rx);
		u->rx_cap = cap;
	}
	memcpy(u->rx + u->rx_len, p, k);
	u->rx_len += k;
	return k;
}

static void
h_eof(void *uctx)
{
	struct h_upper *u = u_of(uctx);
	u->eof_calls++;
	if (u->close_on_eof) {
		tcp_close(u->c);
		u->c = NULL;
	}
}

static void
h_sent(void *uctx, size_t room)
{
	(void)room;
	u_of(uctx)->sent_calls++;
}

static void
h_closed(void *uctx, enum tcp_close_reason why, size_t unacked)
{
	struct h_upper *u = u_of(uctx);
	u->closed_calls++;
	u->closed_reason = (int)why;
	u->closed_unacked = unacked;
	u->c = NULL;
}

static const struct tcp_upcall_ops h_ops = {
	.accept = h_accept,
	.recv = h_recv,
	.eof = h_eof,
	.sent = h_sent,
	.closed = h_closed,
};

void
h_config(struct net_config *cfg)
{
	net_config_defaults(cfg);
	cfg->addr = H_OUR_IP;
	cfg->prefix_len = 24;
	cfg->gateway = H_GW_IP;
	memcpy(cfg->mac, h_our_mac, 6);
	cfg->ports[0] = H_PORT;
	cfg->n_ports = 1;
	cfg->seed = 42;
	cfg->limits.max_conns = 64;
	cfg->limits.syn_backlog = 16;
	cfg->limits.rcv_slots = 64;
	cfg->limits.snd_slots = 64;
}

struct harness *
h_new(const struct net_config *cfg)
{
	struct harness *h = calloc(1, sizeof(*h));

	cr_assert(h);
	h->q = calloc(H_MAXQ, sizeof(*h->q));
	cr_assert(h->q);
	h->edges = calloc(65536, sizeof(*h->edges));
	cr_assert(h->edges);
	if (cfg)
		h->cfg = *cfg;
	else
		h_config(&h->cfg);
	h->cfg.tx = h_tx;
	h->cfg.tx_ctx = h;
	h->cfg.clock = h_clock;
	h->cfg.clock_ctx = h;
	h->cfg.ops = &h_ops;
	h->cfg.ops_arg = h;
	h->now_us = 1000000; /* t = 1 s */
	h->default_consume = SIZE_MAX;
	h->rng = 0x9e3779b97f4a7c15ULL;
	h->st = net_stack_create(&h->cfg);
	cr_assert(h->st, "net_stack_create failed");
	return h;
}

void
h_free(struct harness *h)
{
	net_stack_destroy(h->st);
	for (unsigned i = 0; i < H_MAXU; i++)
		free(h->up[i].rx);
	free(h->q);
	free(h->edges);
	free(h);
}

struct harness *
h_new_ready(const struct net_config *cfg)
{
	struct harness *h = h_new(cfg);
	uint8_t f[64];
	static const uint8_t zero[6];
	size_t n;

	net_stack_start(h->st);
	h_drain(h);
	n = h_build_arp(f, 1, h_peer_mac, H_PEER_IP, zero, H_OUR_IP,
			(const uint8_t *)"\xff\xff\xff\xff\xff\xff");
	h_input(h, f, n);
	h_drain(h);
	return h;
}

void
h_advance(struct harness *h, uint64_t ms)
{
	for (uint64_t i = 0; i < ms; i++) {
		h->now_us += 1000;
		net_stack_poll_timers(h->st);
	}
}

void
h_input(struct harness *h, const uint8_t *f, size_t len)
{
	net_stack_input(h->st, f, len, 0);
}

unsigned
h_pending(const struct harness *h)
{
	return h->qtail - h->qhead;
}

void
h_drain(struct harness *h)
{
	h->qhead = h->qtail;
}

void
h_parse(struct h_pkt *p)
{
	const uint8_t *f = p->raw, *ip, *l4;
	size_t hl, tot;

	memset(&p->dst, 0, sizeof(*p) - offsetof(struct h_pkt, dst));
	if (p->len < 14)
		return;
	memcpy(p->dst, f, 6);
	memcpy(p->src, f + 6, 6);
	p->type = rd16(f + 12);
	if (p->type == 0x0806 && p->len >= 42) {
		const uint8_t *a = f + 14;
		p->arp = true;
		p->arp_op = rd16(a + 6);
		memcpy(p->arp_sha, a + 8, 6);
		p->arp_spa = rd32(a + 14);
		memcpy(p->arp_tha, a + 18, 6);
		p->arp_tpa = rd32(a + 24);
		return;
	}
	if (p->type != 0x0800 || p->len < 34)
		return;
	ip = f + 14;
	hl = (size_t)(ip[0] & 0xf) * 4;
	tot = rd16(ip + 2);
	if (tot > p->len - 14 || hl < 20)
		return;
	p->ip = true;
	p->ip_cksum_ok = (p->meta.flags & NET_OFFLOAD_IPV4_CKSUM) ||
			 fold(sum16(0, ip, hl)) == 0;
	p->ip_src = rd32(ip + 12);
	p->ip_dst = rd32(ip + 16);
	p->ip_proto = ip[9];
	p->ip_ttl = ip[8];
	p->ip_len = (uint16_t)tot;
	p->ip_frag = rd16(ip + 6);
	l4 = ip + hl;
	if (p->ip_proto == 1 && tot - hl >= 8) {
		p->icmp = true;
		p->icmp_cksum_ok = fold(sum16(0, l4, tot - hl)) == 0;
		p->icmp_type = l4[0];
		p->icmp_code = l4[1];
		p->icmp_id = rd16(l4 + 4);
		p->icmp_seq = rd16(l4 + 6);
		p->data = l4 + 8;
		p->dlen = tot - hl - 8;
	}
	if (p->ip_proto == 6 && tot - hl >= 20) {
		size_t thl = (size_t)(l4[12] >> 4) * 4, tl = tot - hl;
		uint32_t s = 0;
		s += p->ip_src >> 16;
		s += p->ip_src & 0xffff;
		s += p->ip_dst >> 16;
		s += p->ip_dst & 0xffff;
		s += 6;
		s += (uint32_t)tl;
		p->tcp = true;
		if (p->meta.flags & NET_OFFLOAD_L4_CKSUM) {
			/* field must hold the folded pseudo-header sum */
			while (s >> 16)
				s = (s & 0xffff) + (s >> 16);
			p->tcp_cksum_ok = rd16(l4 + 16) == s;
		} else {
			p->tcp_cksum_ok = fold(sum16(s, l4, tl)) == 0;
		}
		p->sport = rd16(l4);
		p->dport = rd16(l4 + 2);
		p->seq = rd32(l4 + 4);
		p->ack = rd32(l4 + 8);
		p->flags = l4[13];
		p->wnd = rd16(l4 + 14);
		for (size_t i = 20; i < thl;) {
			uint8_t k = l4[i], n;
			if (k == 0)
				break;
			if (k == 1) {
				i++;
				continue;
			}
			n = l4[i + 1];
			cr_assert(n >= 2 && i + n <= thl, "bad option list");
			if (k == 2)
				p->has_mss = true, p->mss = rd16(l4 + i + 2);
			if (k == 3)
				p->has_ws = true, p->ws = l4[i + 2];
			if (k == 4)
				p->sack_ok = true;
			if (k == 8) {
				p->has_ts = true;
				p->tsval = rd32(l4 + i + 2);
				p->tsecr = rd32(l4 + i + 6);
			}
			if (k == 5) {
				p->n_sack = (unsigned)(n - 2) / 8;
				for (unsigned b = 0; b < p->n_sack && b < 4;
				     b++) {
					p->sack[b][0] = rd32(l4 + i + 2 + 8 * b);
					p->sack[b][1] =
						rd32(l4 + i + 6 + 8 * b);
				}
			}
			i += n;
		}
		p->data = l4 + thl;
		p->dlen = tl - thl;
	}
}

bool
h_next(struct harness *h, struct h_pkt *p)
{
	if (h->qhead == h->qtail)
		return false;
	*p = h->q[h->qhead++ % H_MAXQ];
	h_parse(p);
	if (p->ip) {
		cr_assert(p->ip_cksum_ok, "bad IPv4 checksum from the stack");
		cr_assert_eq(p->ip_ttl, 64);
		cr_assert_eq(p->ip_frag, 0x4000, "DF, no fragment");
		cr_assert_eq(p->ip_src, H_OUR_IP);
		cr_assert(memcmp(p->src, h_our_mac, 6) == 0);
	}
	if (p->tcp)
		cr_assert(p->tcp_cksum_ok, "bad TCP checksum from the stack");
	/* oracle: the right edge the stack advertises never moves left
	 * (RFC 9293 3.8.6.2.2), except by scaling truncation (< 2^ws) */
	if (p->tcp && (p->flags & TH_ACK) && !(p->flags & TH_RST)) {
		struct h_edge *e = &h->edges[p->dport];
		if (p->flags & TH_SYN) {
			e->valid = true;
			e->ws = p->has_ws ? p->ws : 0;
			e->edge = p->ack + p->wnd;
		} else if (e->valid) {
			uint32_t edge = p->ack + ((uint32_t)p->wnd << e->ws);
			cr_assert((int32_t)(edge + (1u << e->ws) - e->edge) > 0,
				  "window edge moved left: %u -> %u (port %u)",
				  e->edge, edge, p->dport);
			if ((int32_t)(edge - e->edge) > 0)
				e->edge = edge;
		}
	}
	if (p->icmp)
		cr_assert(p->icmp_cksum_ok, "bad ICMP checksum");
	return true;
}

void
h_expect_tcp(struct harness *h, struct h_pkt *k)
{
	/* ARP refreshes may come first after long waits: skipped */
	do
		cr_assert(h_next(h, k), "expected a TCP segment, none sent");
	while (k->arp);
	cr_assert(k->tcp, "expected a TCP segment, got type 0x%04x", k->type);
	cr_assert_eq(k->dport != 0, true);
}

/* ---- crafting ---- */

size_t
h_build_arp(uint8_t *f, uint16_t op, const uint8_t *sha, uint32_t spa,
	    const uint8_t *tha, uint32_t tpa, const uint8_t *dst)
{
	uint8_t *a = f + 14;

	memcpy(f, dst, 6);
	memcpy(f + 6, sha, 6);
	wr16(f + 12, 0x0806);
	wr16(a, 1);
	wr16(a + 2, 0x0800);
	a[4] = 6;
	a[5] = 4;
	wr16(a + 6, op);
	memcpy(a + 8, sha, 6);
	wr32(a + 14, spa);
	memcpy(a + 18, tha, 6);
	wr32(a + 24, tpa);
	return 42;
}

size_t
h_build_ip(uint8_t *f, uint32_t src, uint32_t dst, uint8_t proto,
	   const uint8_t *l4, size_t l4len)
{
	uint8_t *ip = f + 14;

	memcpy(f, h_our_mac, 6);
	memcpy(f + 6, h_peer_mac, 6);
	wr16(f + 12, 0x0800);
	memset(ip, 0, 20);
	ip[0] = 0x45;
	wr16(ip + 2, (uint32_t)(20 + l4len));
	wr16(ip + 4, 0x1234);
	wr16(ip + 6, 0x4000);
	ip[8] = 64;
	ip[9] = proto;
	wr32(ip + 12, src);
	wr32(ip + 16, dst);
	wr16(ip + 10, fold(sum16(0, ip, 20)));
	memmove(ip + 20, l4, l4len);
	return 34 + l4len;
}

size_t
h_build_tcp(uint8_t *f, uint32_t src, uint16_t sport, uint16_t dport,
	    uint32_t seq, uint32_t ack, uint8_t flags, uint16_t wnd,
	    const uint8_t *opt, size_t olen, const void *data, size_t dlen)
{
	uint8_t t[2048];
	size_t hl = 20 + ((olen + 3) & ~(size_t)3);
	uint32_t s = 0;

	memset(t, 0, hl);
	wr16(t, sport);
	wr16(t + 2, dport);
	wr32(t + 4, seq);
	wr32(t + 8, ack);
	t[12] = (uint8_t)((hl / 4) << 4);
	t[13] = flags;
	wr16(t + 14, wnd);
	if (olen)
		memcpy(t + 20, opt, olen);
	if (dlen)
		memcpy(t + hl, data, dlen);
	s += src >> 16;
	s += src & 0xffff;
	s += H_OUR_IP >> 16;
	s += H_OUR_IP & 0xffff;
	s += 6;
	s += (uint32_t)(hl + dlen);
	wr16(t + 16, fold(sum16(s, t, hl + dlen)));
	return h_build_ip(f, src, H_OUR_IP, 6, t, hl + dlen);
}

void
h_send_tcp(struct harness *h, uint16_t sport, uint32_t seq, uint32_t ack,
	   uint8_t flags, uint16_t wnd, const uint8_t *opt, size_t olen,
	   const void *data, size_t dlen)
{
	uint8_t f[2048];
	size_t n = h_build_tcp(f, H_PEER_IP, sport, H_PORT, seq, ack, flags,
			       wnd, opt, olen, data, dlen);
	h_input(h, f, n);
}

/* ---- peer ---- */

void
h_peer_init(struct harness *h, struct h_peer *p, uint16_t port,
	    unsigned opts)
{
	memset(p, 0, sizeof(*p));
	p->port = port;
	p->iss = 1000000u * port;
	p->snd_nxt = p->iss;
	p->ts_on = opts & HO_TS;
	p->sack_on = opts & HO_SACK;
	p->ws_on = opts & HO_WS;
	p->ts = (uint32_t)(h->now_us / 1000) + 7;
}

static size_t
peer_opts(struct harness *h, struct h_peer *p, uint8_t *o)
{
	if (!p->ts_on)
		return 0;
	p->ts = (uint32_t)(h->now_us / 1000) + 7;
	o[0] = 1;
	o[1] = 1;
	o[2] = 8;
	o[3] = 10;
	wr32(o + 4, p->ts);
	wr32(o + 8, p->ts_recent);
	return 12;
}

void
h_peer_saw(struct h_peer *p, const struct h_pkt *k)
{
	uint32_t end = k->seq + (uint32_t)k->dlen + ((k->flags & TH_SYN) != 0) +
		       ((k->flags & TH_FIN) != 0);

	if (!k->tcp || k->dport != p->port)
		return;
	if ((int32_t)(k->seq - p->rcv_nxt) <= 0 &&
	    (int32_t)(end - p->rcv_nxt) > 0)
		p->rcv_nxt = end;
	if (k->has_ts)
		p->ts_recent = k->tsval;
	if (!(k->flags & TH_SYN))
		p->stack_wnd = (uint32_t)k->wnd << p->ws;
}

void
h_peer_syn(struct harness *h, struct h_peer *p, unsigned opts,
	   struct h_pkt *k)
{
	uint8_t o[40];
	size_t n = 0;

	if (opts & HO_MSS) {
		o[n++] = 2;
		o[n++] = 4;
		wr16(o + n, 1460);
		n += 2;
	}
	if (opts & HO_SACK) {
		o[n++] = 4;
		o[n++] = 2;
	}
	if (opts & HO_TS) {
		o[n++] = 8;
		o[n++] = 10;
		wr32(o + n, p->ts);
		wr32(o + n + 4, 0);
		n += 8;
	}
	if (opts & HO_WS) {
		o[n++] = 1;
		o[n++] = 3;
		o[n++] = 3;
		o[n++] = 7;
	}
	h_send_tcp(h, p->port, p->iss, 0, TH_SYN, 65535, o, n, NULL, 0);
	p->snd_nxt = p->iss + 1;
	h_expect_tcp(h, k);
	cr_assert_eq(k->flags, TH_SYN | TH_ACK, "flags %#x", k->flags);
	cr_assert_eq(k->ack, p->iss + 1);
	p->rcv_nxt = k->seq + 1;
	p->ws = k->has_ws ? k->ws : 0;
	p->mss = k->mss;
	if (k->has_ts)
		p->ts_recent = k->tsval;
	p->stack_wnd = k->wnd;
}

void
h_connect(struct harness *h, struct h_peer *p, unsigned opts)
{
	struct h_pkt k;

	h->last_accepted = NULL;
	h_peer_syn(h, p, opts, &k);
	h_peer_seg(h, p, p->snd_nxt, TH_ACK, NULL, 0);
	cr_assert(h->last_accepted, "accept() not called");
	p->u = h->last_accepted;
	cr_assert_eq(tcp_conn_state(p->u->c), TCPS_ESTABLISHED);
}

void
h_peer_seg(struct harness *h, struct h_peer *p, uint32_t seq, uint8_t flags,
	   const void *data, size_t len)
{
	uint8_t o[40];
	size_t n = peer_opts(h, p, o);

	h_send_tcp(h, p->port, seq, p->rcv_nxt, flags, 65535, o, n, data,
		   len);
}

void
h_peer_send(struct harness *h, struct h_peer *p, const void *data,
	    size_t len)
{
	h_peer_seg(h, p, p->snd_nxt, TH_ACK | TH_PSH, data, len);
	p->snd_nxt += (uint32_t)len;
}

void
h_peer_ack(struct harness *h, struct h_peer *p)
{
	h_peer_seg(h, p, p->snd_nxt, TH_ACK, NULL, 0);
}

/* ---- faults ---- */

void
h_faults(struct harness *h, uint64_t seed, unsigned drop_pct,
	 unsigned dup_pct, unsigned reorder_pct)
{
	h->rng = seed ? seed : 1;
	h->drop_pct = drop_pct;
	h->dup_pct = dup_pct;
	h->reorder_pct = reorder_pct;
}

void
h_input_faulty(struct harness *h, const uint8_t *f, size_t len)
{
	uint32_t r = h_rand(h) % 100;

	if (r < h->drop_pct)
		return;
	r = h_rand(h) % 100;
	if (r < h->reorder_pct && !h->held_len) {
		memcpy(h->held, f, len); /* delivered after the next one */
		h->held_len = len;
		return;
	}
	h_input(h, f, len);
	if (h_rand(h) % 100 < h->dup_pct)
		h_input(h, f, len);
	if (h->held_len) {
		size_t n = h->held_len;
		h->held_len = 0;
		h_input(h, h->held, n);
	}
}
