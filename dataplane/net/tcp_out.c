/*
 * TCP output: build and send segments (RFC 9293 3.1 header, options of
 * RFC 9293 3.2, 7323, 2018), decide what the windows allow (the peer's
 * window and cwnd), and compute the window we advertise.
 *
 * Contract: one segment = one frame = one call of cfg.tx. Headers are built
 * in st->hdr; payload is handed as up to two pieces of the connection's send
 * ring (no copy). No Nagle (every tcp_send() is pushed at once: the SMTP
 * engine writes whole replies), but sender-side SWS avoidance (RFC 9293
 * 3.8.6.2.1). Receiver-side SWS avoidance: the right edge we advertise moves
 * only by min(rcv_buf/2, MSS) or more (RFC 9293 3.8.6.2.2), and it never
 * moves left. Every segment after the SYN carries ACK, the current window
 * and, when negotiated, a timestamp and up to 4 (3 with timestamps) SACK
 * blocks, the most recent first (RFC 2018 4).
 */
#include <string.h>

#include "net/net_priv.h"

#define TH_FIN 0x01u
#define TH_SYN 0x02u
#define TH_RST 0x04u
#define TH_PSH 0x08u
#define TH_ACK 0x10u

uint16_t
tcp_mss_for_mtu(const struct net_stack *st)
{
	return (uint16_t)(st->cfg.mtu - IP_HLEN - TCP_HLEN);
}

static void
tcp_emit(struct net_stack *st, uint32_t raddr, uint16_t rport, uint16_t lport,
	 uint32_t seq, uint32_t ack, uint8_t flags, uint16_t wnd,
	 const uint8_t *opts, size_t olen, const struct net_iov *pl,
	 unsigned npl)
{
	uint8_t *th = st->hdr + ETH_HLEN + IP_HLEN;
	struct net_iov iov[3];
	size_t hl = TCP_HLEN + olen, plen = 0;
	unsigned n = 1, offload = 0;
	uint32_t sum;

	for (unsigned i = 0; i < npl; i++)
		if (pl[i].len) {
			iov[n++] = pl[i];
			plen += pl[i].len;
		}
	net_wr16(th, lport);
	net_wr16(th + 2, rport);
	net_wr32(th + 4, seq);
	net_wr32(th + 8, ack);
	th[12] = (uint8_t)((hl / 4) << 4);
	th[13] = flags;
	net_wr16(th + 14, wnd);
	net_wr16(th + 16, 0);
	net_wr16(th + 18, 0);
	if (olen)
		memcpy(th + TCP_HLEN, opts, olen);
	sum = net_csum_pseudo(st->cfg.addr, raddr, IP_PROTO_TCP,
			      (uint16_t)(hl + plen));
	if (st->cfg.tx_offload & NET_OFFLOAD_L4_CKSUM) {
		/* the port completes it: leave the pseudo-header sum */
		while (sum >> 16)
			sum = (sum & 0xffffu) + (sum >> 16);
		net_wr16(th + 16, (uint16_t)sum);
		offload = NET_OFFLOAD_L4_CKSUM;
	} else {
		size_t odd = 0;
		sum = net_csum_add(sum, th, hl);
		for (unsigned i = 1; i < n; i++) {
			uint32_t s = net_csum_add(0, iov[i].base, iov[i].len);
			if (odd & 1) /* piece starts at an odd offset */
				s = ((s & 0xffu) << 8) | (s >> 8);
			sum += s;
			odd += iov[i].len;
		}
		net_wr16(th + 16, net_csum_fold(sum));
	}
	iov[0].base = st->hdr;
	iov[0].len = ETH_HLEN + IP_HLEN + hl;
	st->ctr.tcp_segs_tx++;
	if (flags & TH_RST)
		st->ctr.tcp_rst_tx++;
	ipv4_output(st, raddr, IP_PROTO_TCP, iov, n, (uint16_t)hl, offload);
}

static size_t
opt_ts(uint8_t *o, uint32_t tsval, uint32_t tsecr)
{
	o[0] = 1;
	o[1] = 1;
	o[2] = 8;
	o[3] = 10;
	net_wr32(o + 4, tsval);
	net_wr32(o + 8, tsecr);
	return 12;
}

static uint32_t
tcp_tsval(const struct tcp_conn *c)
{
	return (uint32_t)c->st->now_ms + c->ts_offset;
}

uint32_t
tcp_rcv_window(const struct tcp_conn *c)
{
	const struct net_stack *st = c->st;
	uint32_t r = st->cfg.limits.rcv_buf;
	uint32_t space = tcp_rcv_space(c);
	uint32_t edge = c->rcv_nxt + space;
	uint32_t sws = FD_MIN(r / 2, (uint32_t)c->smss);
	uint32_t maxw = (uint32_t)65535 << c->rcv_wscale;

	if (seq_gt(edge, c->rcv_adv) && edge - c->rcv_adv < sws &&
	    seq_geq(c->rcv_adv, c->rcv_nxt))
		edge = c->rcv_adv; /* too small an increase: hold the edge */
	if (seq_lt(edge, c->rcv_adv))
		edge = c->rcv_adv; /* never shrink (RFC 9293 3.8.6.2.2) */
	return FD_MIN(edge - c->rcv_nxt, maxw);
}

/* Fill the window field and account what it advertises. The scaled
 * value is rounded down, so the advertised edge never passes the ring's
 * free room; with a shift > 0 it may retract by less than 2^shift bytes
 * through that truncation (RFC 7323 2.4 has senders cope with it). */
static uint16_t
tcp_adv_window(struct tcp_conn *c)
{
	uint32_t w = tcp_rcv_window(c);
	uint16_t field = (uint16_t)(w >> c->rcv_wscale);
	uint32_t edge = c->rcv_nxt + ((uint32_t)field << c->rcv_wscale);

	if (seq_gt(edge, c->rcv_adv))
		c->rcv_adv = edge;
	if (field == 0)
		c->flags |= TF_ZERO_WND;
	else
		c->flags &= ~TF_ZERO_WND;
	return field;
}

/* Options of a non-SYN segment: timestamps and SACK blocks. */
static size_t
tcp_opts(struct tcp_conn *c, uint8_t *o)
{
	size_t n = 0;

	if (c->flags & TF_TS)
		n += opt_ts(o, tcp_tsval(c), c->ts_recent);
	if ((c->flags & TF_SACK) && c->n_ooo) {
		unsigned max = (c->flags & TF_TS) ? 3 : 4;
		unsigned k = FD_MIN(max, (unsigned)c->n_ooo);
		o[n++] = 1;
		o[n++] = 1;
		o[n++] = 5;
		o[n++] = (uint8_t)(2 + 8 * k);
		for (unsigned i = 0; i < k; i++) {
			net_wr32(o + n, c->ooo[i].start);
			net_wr32(o + n + 4, c->ooo[i].end);
			n += 8;
		}
	}
	return n;
}

/* Payload that fits one segment now: SACK blocks take room from the
 * data (RFC 6691: the MSS counts options); smss already excludes TS. */
static uint32_t
tcp_seg_max(const struct tcp_conn *c)
{
	uint32_t sack = 0;

	if ((c->flags & TF_SACK) && c->n_ooo) {
		unsigned max = (c->flags & TF_TS) ? 3 : 4;
		sack = 4 + 8 * FD_MIN(max, (unsigned)c->n_ooo);
	}
	return c->smss > sack + 1 ? c->smss - sack : 1;
}

/* Send a segment carrying slen bytes of the send buffer from offset off
 * (relative to snd_una), at sequence number seq. */
static void
tcp_send_seg(struct tcp_conn *c, uint32_t seq, uint32_t off, uint32_t len,
	     uint8_t flags)
{
	struct net_stack *st = c->st;
	uint8_t opts[TCP_MAX_OPT];
	struct net_iov pl[2] = {{NULL, 0}, {NULL, 0}};
	size_t olen = tcp_opts(c, opts);
	uint16_t wnd;

	if (len) {
		uint32_t size = st->cfg.limits.snd_buf;
		uint32_t pos = (c->shead + off) & st->snd_mask;
		uint32_t first = FD_MIN(len, size - pos);
		pl[0].base = tcp_snd_base(c) + pos;
		pl[0].len = first;
		pl[1].base = tcp_snd_base(c);
		pl[1].len = len - first;
		flags |= TH_PSH;
		st->ctr.tcp_bytes_tx += len;
	}
	wnd = tcp_adv_window(c);
	c->last_ack_sent = c->rcv_nxt;
	c->flags &= ~(TF_ACKNOW | TF_DELACK);
	c->t_delack = 0;
	tcp_emit(st, c->raddr, c->rport, c->lport, seq, c->rcv_nxt,
		 (uint8_t)(flags | TH_ACK), wnd, opts, olen, pl, 2);
}

void
tcp_send_ack(struct tcp_conn *c)
{
	tcp_send_seg(c, c->snd_nxt, 0, 0, 0);
}

void
tcp_send_synack(struct tcp_conn *c)
{
	struct net_stack *st = c->st;
	uint8_t o[TCP_MAX_OPT];
	size_t n = 0;
	uint16_t mss = tcp_mss_for_mtu(st);
	uint32_t w = FD_MIN(tcp_rcv_space(c), 65535u);

	o[n++] = 2;
	o[n++] = 4;
	net_wr16(o + n, mss);
	n += 2;
	if (c->flags & TF_SACK) {
		if (c->flags & TF_TS) {
			o[n++] = 4;
			o[n++] = 2;
		} else {
			o[n++] = 1;
			o[n++] = 1;
			o[n++] = 4;
			o[n++] = 2;
		}
	}
	if (c->flags & TF_TS) {
		if (c->flags & TF_SACK) {
			o[n++] = 8;
			o[n++] = 10;
			net_wr32(o + n, tcp_tsval(c));
			net_wr32(o + n + 4, c->ts_recent);
			n += 8;
		} else {
			n += opt_ts(o + n, tcp_tsval(c), c->ts_recent);
		}
	}
	if (c->flags & TF_WS) {
		o[n++] = 1;
		o[n++] = 3;
		o[n++] = 3;
		o[n++] = c->rcv_wscale;
	}
	/* RFC 7323 2.2: the window in a SYN is never scaled */
	c->rcv_adv = c->rcv_nxt + w;
	c->last_ack_sent = c->rcv_nxt;
	c->flags &= ~(TF_ACKNOW | TF_DELACK);
	tcp_emit(st, c->raddr, c->rport, c->lport, c->iss, c->rcv_nxt,
		 TH_SYN | TH_ACK, (uint16_t)w, o, n, NULL, 0);
}

void
tcp_send_cookie_synack(struct net_stack *st, uint32_t raddr, uint16_t rport,
		       uint16_t lport, uint32_t iss, uint32_t irs)
{
	uint8_t o[4] = {2, 4, 0, 0};
	uint32_t w = FD_MIN(st->cfg.limits.rcv_buf, 65535u);

	net_wr16(o + 2, tcp_mss_for_mtu(st));
	tcp_emit(st, raddr, rport, lport, iss, irs + 1, TH_SYN | TH_ACK,
		 (uint16_t)w, o, sizeof(o), NULL, 0);
}

void
tcp_send_rst_noconn(struct net_stack *st, uint32_t raddr, uint16_t rport,
		    uint16_t lport, uint32_t seq, uint32_t ack, bool with_ack)
{
	tcp_emit(st, raddr, rport, lport, seq, with_ack ? ack : 0,
		 (uint8_t)(TH_RST | (with_ack ? TH_ACK : 0)), 0, NULL, 0, NULL,
		 0);
}

void
tcp_send_rst(struct tcp_conn *c)
{
	/* RFC 9293 3.10.4 SND.NXT: the highest sent (an RTO rewinds
	 * snd_nxt), but not past the peer's window (a persist probe) */
	uint32_t seq = c->snd_max, edge = c->snd_una + c->snd_wnd;

	if (seq_lt(edge, seq))
		seq = edge;
	tcp_emit(c->st, c->raddr, c->rport, c->lport, seq, c->rcv_nxt,
		 TH_RST | TH_ACK, 0, NULL, 0, NULL, 0);
}

void
tcp_retransmit_first(struct tcp_conn *c)
{
	struct net_stack *st = c->st;
	uint32_t len = FD_MIN(c->slen, tcp_seg_max(c));
	uint8_t fin = 0;

	if ((c->flags & TF_FIN_SENT) && len == c->slen)
		fin = TH_FIN;
	if (!len && !fin)
		return;
	st->ctr.tcp_retransmits++;
	tcp_send_seg(c, c->snd_una, 0, len, fin);
	c->rtt_start_ms = 0; /* Karn: no sample from a retransmission */
}

static bool
fin_state(const struct tcp_conn *c)
{
	switch ((enum tcp_state)c->state) {
	case TCPS_FIN_WAIT_1:
	case TCPS_CLOSING:
	case TCPS_LAST_ACK:
		return true;
	case TCPS_CLOSED:
	case TCPS_LISTEN:
	case TCPS_SYN_RECEIVED:
	case TCPS_ESTABLISHED:
	case TCPS_FIN_WAIT_2:
	case TCPS_TIME_WAIT:
	case TCPS_CLOSE_WAIT:
		return false;
	}
	return false;
}

void
tcp_output(struct tcp_conn *c)
{
	struct net_stack *st = c->st;
	bool sent = false;

	switch ((enum tcp_state)c->state) {
	case TCPS_CLOSED:
	case TCPS_LISTEN:
		return;
	case TCPS_SYN_RECEIVED:
		if (c->flags & TF_ACKNOW)
			tcp_send_synack(c);
		return;
	case TCPS_TIME_WAIT:
	case TCPS_FIN_WAIT_2:
		if (c->flags & TF_ACKNOW)
			tcp_send_ack(c);
		return;
	case TCPS_ESTABLISHED:
	case TCPS_FIN_WAIT_1:
	case TCPS_CLOSING:
	case TCPS_CLOSE_WAIT:
	case TCPS_LAST_ACK:
		break;
	}
	for (;;) {
		uint32_t off = c->snd_nxt - c->snd_una;
		uint32_t unsent = off < c->slen ? c->slen - off : 0;
		uint32_t wnd = FD_MIN(c->snd_wnd, c->cwnd);
		uint32_t usable = wnd > off ? wnd - off : 0;
		uint32_t len = FD_MIN(FD_MIN(unsent, usable), tcp_seg_max(c));
		bool fin = (c->flags & TF_FIN_QUEUED) && fin_state(c) &&
			   off <= c->slen && off + len == c->slen;
		uint8_t fl = 0;

		/* sender SWS avoidance: no small segment while more is
		 * waiting, unless nothing is in flight */
		if (len && len < c->smss && len < unsent &&
		    len < c->max_snd_wnd / 2 && off > 0) {
			len = 0;
			fin = false;
		}
		if (!len && !fin)
			break;
		if (fin)
			fl = TH_FIN;
		if (seq_lt(c->snd_nxt, c->snd_max))
			st->ctr.tcp_retransmits++;
		else if (len && c->rtt_start_ms == 0) {
			c->rtt_start_ms = st->now_ms ? st->now_ms : 1;
			c->rtt_seq = c->snd_nxt;
		}
		tcp_send_seg(c, c->snd_nxt, off, len, fl);
		sent = true;
		c->snd_nxt += len;
		if (fin) {
			c->flags |= TF_FIN_SENT;
			c->fin_seq = c->snd_nxt;
			c->snd_nxt++;
		}
		if (seq_gt(c->snd_nxt, c->snd_max))
			c->snd_max = c->snd_nxt;
		if (!c->t_rexmt)
			tcp_rexmt_arm(c);
		c->t_persist = 0;
		if (fin || !len)
			break;
	}
	if (!sent && (c->flags & TF_ACKNOW))
		tcp_send_ack(c);
	/* zero window with data waiting and nothing in flight: persist */
	if (c->snd_wnd == 0 && c->slen > c->snd_nxt - c->snd_una &&
	    c->snd_nxt == c->snd_una && !c->t_persist) {
		c->t_rexmt = 0;
		c->t_persist = st->now_ms + c->rto_ms;
	}
}
