/*
 * TCP input: validate a segment, find its connection, and run the "segment
 * arrives" procedure of RFC 9293 3.10.7 for a passive opener, with the
 * blind-attack mitigations of RFC 5961, PAWS of RFC 7323 5 and SYN cookies
 * of RFC 4987 when the SYN backlog is full.
 *
 * Order of checks on a connection (RFC 9293 3.10.7.4 with RFC 5961):
 *   PAWS; sequence acceptability (else ACK, drop); trim to the window;
 *   RST (exactly rcv_nxt: reset; else in window: challenge ACK);
 *   SYN (always a challenge ACK); ACK (acceptable range RFC 5961 5.2;
 *   SYN_RECEIVED -> ESTABLISHED; send-side bookkeeping, RTT, NewReno);
 *   window update; text (in order or into reassembly); FIN.
 * Then the upper layer is offered held bytes and output runs once, so a
 * reply written from recv() carries the ACK.
 *
 * Contract: never trusts a length; everything dropped is counted.
 */
#include <string.h>

#include "net/net_priv.h"

#define TH_FIN 0x01u
#define TH_SYN 0x02u
#define TH_RST 0x04u
#define TH_PSH 0x08u
#define TH_ACK 0x10u
#define TH_URG 0x20u

/* PAWS: RFC 7323 5.5, TS.Recent older than 24 days is invalid */
#define PAWS_IDLE_MS (24ull * 24 * 3600 * 1000)

struct tcp_seg {
	uint32_t seq, ack;
	uint16_t sport, dport, wnd, mss;
	uint8_t flags, ws;
	bool has_mss, has_ws, sack_ok, has_ts;
	uint32_t tsval, tsecr;
	const uint8_t *data;
	uint32_t len;
};

/* false: malformed option list (runs past the header) */
static bool
parse_options(const uint8_t *o, size_t n, struct tcp_seg *s)
{
	size_t i = 0;

	while (i < n) {
		uint8_t kind = o[i], len;

		if (kind == 0)
			break;
		if (kind == 1) {
			i++;
			continue;
		}
		if (i + 1 >= n)
			return false;
		len = o[i + 1];
		if (len < 2 || i + len > n)
			return false;
		switch (kind) {
		case 2:
			if (len == 4) {
				s->has_mss = true;
				s->mss = net_rd16(o + i + 2);
			}
			break;
		case 3:
			if (len == 3) {
				s->has_ws = true;
				s->ws = o[i + 2];
			}
			break;
		case 4:
			if (len == 2)
				s->sack_ok = true;
			break;
		case 8:
			if (len == 10) {
				s->has_ts = true;
				s->tsval = net_rd32(o + i + 2);
				s->tsecr = net_rd32(o + i + 6);
			}
			break;
		default:
			break; /* SACK blocks from the peer and others: unused */
		}
		i += len;
	}
	return true;
}

static bool
port_listening(const struct net_stack *st, uint16_t port)
{
	for (unsigned i = 0; i < st->cfg.n_ports; i++)
		if (st->cfg.ports[i] == port)
			return true;
	return false;
}

static uint32_t
seg_seqlen(const struct tcp_seg *s)
{
	return s->len + ((s->flags & TH_SYN) ? 1u : 0u) +
	       ((s->flags & TH_FIN) ? 1u : 0u);
}

static void
reply_rst(struct net_stack *st, uint32_t src, const struct tcp_seg *s)
{
	/* RFC 9293 3.10.7.1 */
	if (s->flags & TH_RST)
		return;
	if (s->flags & TH_ACK)
		tcp_send_rst_noconn(st, src, s->sport, s->dport, s->ack, 0,
				    false);
	else
		tcp_send_rst_noconn(st, src, s->sport, s->dport, 0,
				    s->seq + seg_seqlen(s), true);
}

static void
conn_init_common(struct tcp_conn *c, uint32_t irs, uint32_t iss)
{
	struct net_stack *st = c->st;

	c->irs = irs;
	c->rcv_nxt = irs + 1;
	c->rcv_adv = c->rcv_nxt;
	c->iss = iss;
	c->snd_una = iss;
	c->snd_nxt = iss + 1;
	c->snd_max = iss + 1;
	c->ssthresh = 1u << 30;
	c->t_idle = st->now_ms + st->cfg.idle_ms;
}

static void
set_smss(struct tcp_conn *c, uint32_t peer_mss)
{
	uint32_t m = FD_MIN(peer_mss, (uint32_t)tcp_mss_for_mtu(c->st));

	if (c->flags & TF_TS)
		m -= 12;
	if (m < 64)
		m = 64;
	c->smss = (uint16_t)m;
	/* RFC 5681 3.1 / RFC 6928: IW = min(10*MSS, max(2*MSS, 14600)) */
	c->cwnd = FD_MIN(10 * m, FD_MAX(2 * m, 14600u));
}

static void listen_input(struct net_stack *st, uint32_t src,
			 struct tcp_seg *s);
static void conn_input(struct tcp_conn *c, struct tcp_seg *s);

void
tcp_input(struct net_stack *st, uint32_t src, uint32_t dst, const uint8_t *p,
	  size_t len, unsigned rx_flags)
{
	struct tcp_seg s;
	size_t hl;
	struct tcp_conn *c;

	st->ctr.tcp_rx++;
	if (len < TCP_HLEN) {
		st->ctr.tcp_too_short++;
		return;
	}
	hl = (size_t)(p[12] >> 4) * 4;
	if (hl < TCP_HLEN || hl > len) {
		st->ctr.tcp_bad_off++;
		return;
	}
	if (!(rx_flags & NET_RX_L4_CKSUM_GOOD)) {
		uint32_t sum = net_csum_pseudo(src, dst, IP_PROTO_TCP,
					       (uint16_t)len);
		if (net_csum_fold(net_csum_add(sum, p, len)) != 0) {
			st->ctr.tcp_bad_cksum++;
			return;
		}
	}
	memset(&s, 0, sizeof(s));
	s.sport = net_rd16(p);
	s.dport = net_rd16(p + 2);
	s.seq = net_rd32(p + 4);
	s.ack = net_rd32(p + 8);
	s.flags = p[13] & 0x3f;
	s.wnd = net_rd16(p + 14);
	s.data = p + hl;
	s.len = (uint32_t)(len - hl);
	if (s.sport == 0 || s.dport == 0 ||
	    ((s.flags & TH_SYN) && (s.flags & (TH_FIN | TH_RST)))) {
		st->ctr.tcp_bad_flags++;
		return;
	}
	if (!parse_options(p + TCP_HLEN, hl - TCP_HLEN, &s)) {
		st->ctr.tcp_bad_options++;
		return;
	}
	c = tcp_lookup(st, src, s.sport, s.dport);
	if (!c)
		listen_input(st, src, &s);
	else
		conn_input(c, &s);
}

/* ---- no connection: LISTEN (RFC 9293 3.10.7.2) and SYN cookies ---- */

static void
cookie_ack(struct net_stack *st, uint32_t src, struct tcp_seg *s)
{
	uint16_t mss = tcp_cookie_check(st, src, s->sport, s->dport,
					s->seq - 1, s->ack - 1);
	struct tcp_conn *c;

	if (!mss) {
		st->ctr.tcp_syncookies_bad++;
		st->ctr.tcp_listen_bad_ack++;
		reply_rst(st, src, s);
		return;
	}
	c = tcp_conn_alloc(st, src, s->sport, s->dport);
	if (!c)
		return; /* counted; the peer will retransmit */
	st->ctr.tcp_syncookies_ok++;
	c->flags |= TF_COOKIE;
	conn_init_common(c, s->seq - 1, s->ack - 1);
	c->ts_offset = 0;
	set_smss(c, mss);
	tcp_enter_state(c, TCPS_SYN_RECEIVED);
	c->rcv_adv = c->rcv_nxt + FD_MIN(st->cfg.limits.rcv_buf, 65535u);
	conn_input(c, s);
}

static void
listen_input(struct net_stack *st, uint32_t src, struct tcp_seg *s)
{
	struct tcp_conn *c;

	if (s->flags & TH_RST) {
		st->ctr.tcp_rst_bad++;
		return;
	}
	if (!port_listening(st, s->dport)) {
		st->ctr.tcp_no_port++;
		reply_rst(st, src, s);
		return;
	}
	if (s->flags & TH_ACK) {
		if (s->flags & TH_SYN) {
			st->ctr.tcp_syn_bad++;
			reply_rst(st, src, s);
			return;
		}
		cookie_ack(st, src, s);
		return;
	}
	if (!(s->flags & TH_SYN)) {
		st->ctr.tcp_no_ack++;
		return;
	}
	st->ctr.tcp_syn_rx++;
	if (st->n_rcv_free < st->cfg.limits.admit_min_rcv_free) {
		st->ctr.tcp_syn_overload++;
		return; /* the client retries its SYN later */
	}
	if (st->n_synrcvd >= st->cfg.limits.syn_backlog ||
	    !tcp_conn_room(st)) {
		uint16_t mss = s->has_mss ? s->mss : 536;
		uint32_t iss;
		mss = FD_MIN(mss, tcp_mss_for_mtu(st));
		iss = tcp_cookie_make(st, src, s->sport, s->dport, s->seq,
				      mss);
		st->ctr.tcp_syncookies_sent++;
		tcp_send_cookie_synack(st, src, s->sport, s->dport, iss,
				       s->seq);
		return;
	}
	c = tcp_conn_alloc(st, src, s->sport, s->dport);
	if (!c)
		return;
	conn_init_common(c, s->seq,
			 tcp_iss(st, src, s->sport, s->dport));
	if (s->has_ts) {
		c->flags |= TF_TS;
		c->ts_recent = s->tsval;
		c->ts_recent_ms = st->now_ms;
		c->ts_offset = tcp_ts_offset(st, src, s->sport, s->dport);
	}
	if (s->sack_ok)
		c->flags |= TF_SACK;
	if (s->has_ws) {
		uint32_t r = st->cfg.limits.rcv_buf;
		c->flags |= TF_WS;
		c->snd_wscale = (uint8_t)FD_MIN(s->ws, 14);
		while ((r >> c->rcv_wscale) > 65535u)
			c->rcv_wscale++;
	}
	set_smss(c, s->has_mss ? s->mss : 536);
	c->snd_wnd = s->wnd; /* RFC 7323 2.2: never scaled in a SYN */
	c->max_snd_wnd = c->snd_wnd;
	c->snd_wl1 = s->seq;
	c->snd_wl2 = 0;
	tcp_enter_state(c, TCPS_SYN_RECEIVED);
	tcp_send_synack(c);
	tcp_rexmt_arm(c);
	tcp_timer_update(c);
}

/* ---- a connection exists (RFC 9293 3.10.7.4) ---- */

static bool
acceptable(const struct tcp_conn *c, uint32_t seq, uint32_t seglen,
	   uint32_t wnd)
{
	uint32_t nxt = c->rcv_nxt;

	if (seglen == 0) {
		if (wnd == 0)
			return seq == nxt;
		return seq_leq(nxt, seq) && seq_lt(seq, nxt + wnd);
	}
	if (wnd == 0)
		return false;
	return (seq_leq(nxt, seq) && seq_lt(seq, nxt + wnd)) ||
	       (seq_leq(nxt, seq + seglen - 1) &&
		seq_lt(seq + seglen - 1, nxt + wnd));
}

static void
challenge_ack(struct tcp_conn *c)
{
	struct net_stack *st = c->st;
	uint64_t sec = st->now_ms / 1000;

	/* RFC 5961 7: a shard-wide limit per second. A fixed limit is
	 * itself a side channel (CVE-2016-5696): each second's limit is
	 * drawn from [limit/2, 3*limit/2) with the shard's secret. */
	if (sec != st->chack_second) {
		uint32_t lim = st->cfg.challenge_ack_limit;
		st->chack_second = sec;
		st->chack_count = 0;
		st->chack_limit = lim ? lim / 2 + (uint32_t)(net_siphash(
						  st->secret, &sec,
						  sizeof(sec)) % lim)
				      : 0;
	}
	if (st->cfg.challenge_ack_limit &&
	    st->chack_count >= st->chack_limit) {
		st->ctr.tcp_challenge_limited++;
		return;
	}
	st->chack_count++;
	st->ctr.tcp_challenge_acks++;
	tcp_send_ack(c);
}

static void
process_fin(struct tcp_conn *c)
{
	c->rcv_nxt++;
	c->flags |= TF_RCV_FIN | TF_ACKNOW;
	c->flags &= ~TF_FIN_OOO;
	switch ((enum tcp_state)c->state) {
	case TCPS_SYN_RECEIVED:
	case TCPS_ESTABLISHED:
		tcp_enter_state(c, TCPS_CLOSE_WAIT);
		break;
	case TCPS_FIN_WAIT_1:
		if ((c->flags & TF_FIN_SENT) && seq_gt(c->snd_una, c->fin_seq))
			tcp_enter_state(c, TCPS_TIME_WAIT);
		else
			tcp_enter_state(c, TCPS_CLOSING);
		break;
	case TCPS_FIN_WAIT_2:
		tcp_enter_state(c, TCPS_TIME_WAIT);
		break;
	case TCPS_CLOSED:
	case TCPS_LISTEN:
	case TCPS_CLOSE_WAIT:
	case TCPS_CLOSING:
	case TCPS_LAST_ACK:
	case TCPS_TIME_WAIT:
		break;
	}
}

/* The ACK moved snd_una forward: returns bytes of data acknowledged. */
static uint32_t
ack_advance(struct tcp_conn *c, const struct tcp_seg *s)
{
	struct net_stack *st = c->st;
	uint32_t acked = s->ack - c->snd_una;
	uint32_t data = FD_MIN(acked, c->slen);
	uint32_t smss = c->smss;

	/* RTT (RFC 6298 3, RFC 7323 4) */
	if ((c->flags & TF_TS) && s->has_ts && s->tsecr) {
		uint32_t sent = s->tsecr - c->ts_offset;
		uint32_t ms = (uint32_t)st->now_ms - sent;
		if (ms < 3600000u && c->rxtshift == 0)
			tcp_rtt_sample(c, ms * 1000u);
	} else if (c->rtt_start_ms && seq_gt(s->ack, c->rtt_seq)) {
		tcp_rtt_sample(c, (uint32_t)(st->now_ms - c->rtt_start_ms) *
					  1000u);
	}
	if (c->rtt_start_ms && seq_gt(s->ack, c->rtt_seq))
		c->rtt_start_ms = 0;
	if (c->rxtshift) {
		/* the backed-off RTO ends with new data acknowledged */
		c->rxtshift = 0;
		tcp_rto_reset(c);
	}

	/* congestion control (RFC 5681 3, RFC 6582 3.2) */
	if (c->flags & TF_RECOVERY) {
		if (seq_geq(s->ack, c->recover)) {
			uint32_t flight = c->snd_max - s->ack;
			c->cwnd = FD_MIN(c->ssthresh,
					 FD_MAX(flight, smss) + smss);
			c->flags &= ~TF_RECOVERY;
			c->dupacks = 0;
		} else {
			st->ctr.tcp_partial_acks++;
			c->cwnd = c->cwnd > acked ? c->cwnd - acked : 0;
			c->cwnd += smss;
		}
	} else {
		c->dupacks = 0;
		if (c->cwnd < c->ssthresh)
			c->cwnd += FD_MIN(acked, smss);
		else
			c->cwnd += FD_MAX(1u, smss * smss / c->cwnd);
	}

	c->snd_una = s->ack;
	c->shead = (c->shead + data) & st->snd_mask;
	c->slen -= data;
	if (seq_lt(c->snd_nxt, c->snd_una))
		c->snd_nxt = c->snd_una;
	if (c->slen == 0)
		tcp_snd_buf_put(c);
	if ((c->flags & TF_RECOVERY)) {
		/* partial ACK: the next hole is lost too (RFC 6582 3.2 5) */
		tcp_retransmit_first(c);
		tcp_rexmt_arm(c);
	} else if (c->snd_una == c->snd_max) {
		c->t_rexmt = 0;
	} else {
		tcp_rexmt_arm(c);
	}
	return data;
}

static void
dup_ack(struct tcp_conn *c)
{
	struct net_stack *st = c->st;
	uint32_t smss = c->smss;

	st->ctr.tcp_dup_acks++;
	if (c->dupacks < 255)
		c->dupacks++;
	if (c->dupacks == 3 && !(c->flags & TF_RECOVERY)) {
		uint32_t flight = c->snd_max - c->snd_una;
		/* RFC 6582 4.1: no new recovery for losses of the old one */
		if (seq_gt(c->snd_una, c->recover) || c->recover == 0 ||
		    c->snd_una == c->recover) {
			st->ctr.tcp_fast_retransmits++;
			c->ssthresh = FD_MAX(flight / 2, 2 * smss);
			c->recover = c->snd_max;
			c->flags |= TF_RECOVERY;
			tcp_retransmit_first(c);
			c->cwnd = c->ssthresh + 3 * smss;
			tcp_rexmt_arm(c);
		}
	} else if (c->dupacks > 3 && (c->flags & TF_RECOVERY)) {
		c->cwnd += smss; /* inflate: a segment left the network */
	}
}

static void
established(struct tcp_conn *c, const struct tcp_seg *s)
{
	struct net_stack *st = c->st;
	struct tcp_endpoint remote = {c->raddr, c->rport};
	void *u;

	tcp_enter_state(c, TCPS_ESTABLISHED);
	c->t_rexmt = 0;
	if (!(c->flags & TF_COOKIE) && c->rxtshift == 0) {
		if ((c->flags & TF_TS) && s->has_ts && s->tsecr)
			tcp_rtt_sample(c, ((uint32_t)st->now_ms -
					   (s->tsecr - c->ts_offset)) *
						  1000u);
	}
	if (!c->srtt_us) /* RFC 6298 5.7: 3 s after a SYN-ACK timeout */
		c->rto_ms = c->rxtshift ? FD_MIN(FD_MAX(st->cfg.rto_init_ms,
							 3000u),
						  st->cfg.rto_max_ms)
				      : st->cfg.rto_init_ms;
	c->rxtshift = 0;
	u = st->cfg.ops->accept(st->cfg.ops_arg, c, &remote, c->lport);
	if (c->state == TCPS_CLOSED)
		return; /* tcp_abort() from inside accept() */
	if (c->flags & TF_DETACHED) {
		/* tcp_close() from inside accept() (e.g. a 421 greeting):
		 * the FIN is queued; the upper layer is already gone */
		st->ctr.tcp_accepted++;
		return;
	}
	if (!u) {
		st->ctr.tcp_accept_refused++;
		tcp_send_rst(c);
		c->flags |= TF_DETACHED;
		tcp_conn_free(c);
		return;
	}
	st->ctr.tcp_accepted++;
	c->uctx = u;
}

static void
text_input(struct tcp_conn *c, const struct tcp_seg *s, uint32_t seq)
{
	struct net_stack *st = c->st;
	bool in_order = seq == c->rcv_nxt;

	st->ctr.tcp_segs_rx++;
	st->ctr.tcp_bytes_rx += s->len;
	if (c->flags & TF_DETACHED) {
		/* upper layer closed: acknowledge and discard */
		st->ctr.tcp_data_after_close++;
		if (in_order)
			c->rcv_nxt += s->len;
		c->flags |= TF_ACKNOW;
		return;
	}
	if (!in_order) {
		st->ctr.tcp_ooo_segs++;
		tcp_reass(c, seq, s->data, s->len);
		c->flags |= TF_ACKNOW; /* RFC 5681 4.2: dup ACK at once */
		return;
	}
	if (c->n_ooo)
		c->flags |= TF_ACKNOW; /* filling a hole: ACK at once */
	if (!tcp_reass(c, seq, s->data, s->len))
		return;
	if (c->flags & TF_DELACK) {
		c->flags |= TF_ACKNOW; /* every second segment */
	} else if (!(c->flags & TF_ACKNOW)) {
		c->flags |= TF_DELACK;
		c->t_delack = st->now_ms + st->cfg.delack_ms;
	}
}

static void
conn_input(struct tcp_conn *c, struct tcp_seg *s)
{
	struct net_stack *st = c->st;
	uint32_t seq = s->seq, seglen, wnd, data_acked = 0;
	const uint8_t *data = s->data;
	bool fin;

	/* SYN_RECEIVED: a retransmitted SYN gets the SYN-ACK again */
	if (c->state == TCPS_SYN_RECEIVED && (s->flags & TH_SYN) &&
	    !(s->flags & TH_ACK)) {
		if (seq == c->irs) {
			st->ctr.tcp_dup_syn++;
			tcp_send_synack(c);
		} else {
			/* a new ISN: ACK, the client's RST then frees us */
			st->ctr.tcp_syn_bad++;
			challenge_ack(c);
		}
		return;
	}
	if (c->state == TCPS_TIME_WAIT) {
		/* A new SYN beyond the old connection's sequence space (or
		 * with a newer timestamp) may reuse the 4-tuple (RFC 6191,
		 * RFC 9293 3.10.7.4 note): we are the active closer after
		 * every SMTP QUIT, so busy clients hit this. */
		if ((s->flags & TH_SYN) && !(s->flags & (TH_ACK | TH_RST)) &&
		    (seq_gt(seq, c->rcv_nxt) ||
		     ((c->flags & TF_TS) && s->has_ts &&
		      (int32_t)(s->tsval - c->ts_recent) > 0))) {
			uint32_t raddr = c->raddr;
			st->ctr.tcp_time_wait_reused++;
			tcp_conn_free(c);
			listen_input(st, raddr, s);
			return;
		}
		/* RFC 1337: ignore RST; re-ACK a retransmitted FIN */
		if (s->flags & TH_RST) {
			st->ctr.tcp_rst_bad++;
			return;
		}
		if (s->flags & TH_FIN)
			c->t_close = st->now_ms + st->cfg.time_wait_ms;
		/* ACK a retransmitted FIN or an unacceptable segment, not
		 * an acceptable pure ACK (RFC 9293 3.10.7.4) */
		if ((s->flags & TH_FIN) || s->len || seq != c->rcv_nxt)
			tcp_send_ack(c);
		tcp_timer_update(c);
		return;
	}

	/* PAWS (RFC 7323 5.3) */
	if ((c->flags & TF_TS) && !(s->flags & TH_RST)) {
		if (!s->has_ts) {
			st->ctr.tcp_no_ts++;
		} else if ((int32_t)(s->tsval - c->ts_recent) < 0) {
			if (st->now_ms - c->ts_recent_ms > PAWS_IDLE_MS) {
				c->ts_recent = s->tsval;
			} else {
				st->ctr.tcp_paws_drop++;
				tcp_send_ack(c);
				return;
			}
		}
	}

	/* SYN in a synchronized state, whatever its sequence number
	 * (RFC 5961 4.2): challenge ACK */
	if ((s->flags & TH_SYN) && c->state != TCPS_SYN_RECEIVED) {
		st->ctr.tcp_syn_in_window++;
		challenge_ack(c);
		return;
	}

	/* sequence acceptability */
	seglen = seg_seqlen(s);
	/* the ring's free room: never less than what we advertised (the
	 * advertised edge is rounded down, tcp_out.c), so everything the
	 * window admitted has a place */
	wnd = tcp_rcv_space(c);
	if (c->flags & TF_DETACHED)
		wnd = FD_MAX(wnd, (uint32_t)65535 << c->rcv_wscale);
	if (!acceptable(c, seq, seglen, wnd)) {
		if (s->flags & TH_RST) {
			st->ctr.tcp_rst_bad++;
			return;
		}
		st->ctr.tcp_out_of_window++;
		if (wnd == 0 && s->len)
			st->ctr.tcp_window_probes_rx++;
		else if (s->len && seq_lt(seq, c->rcv_nxt))
			st->ctr.tcp_dup_data++;
		tcp_send_ack(c);
		return;
	}
	fin = (s->flags & TH_FIN) != 0;
	/* trim what we already have (and a SYN) from the front */
	if (seq_lt(seq, c->rcv_nxt)) {
		uint32_t d = c->rcv_nxt - seq;
		if (s->flags & TH_SYN) {
			d--;
			seq++;
		}
		if (d) {
			d = FD_MIN(d, s->len);
			st->ctr.tcp_dup_data++;
			c->flags |= TF_ACKNOW;
			data += d;
			s->len -= d;
			seq += d;
		}
	}
	/* ... and what does not fit from the back */
	if (seq_gt(seq + s->len, c->rcv_nxt + wnd)) {
		s->len = c->rcv_nxt + wnd - seq;
		fin = false;
	}
	s->data = data;

	/* RST (RFC 5961 3.2): judged on the untrimmed SEG.SEQ */
	if (s->flags & TH_RST) {
		if (s->seq != c->rcv_nxt) {
			challenge_ack(c);
			return;
		}
		st->ctr.tcp_rst_rx++;
		if (c->state == TCPS_SYN_RECEIVED) {
			tcp_conn_free(c); /* passive open: back to LISTEN */
			return;
		}
		st->ctr.tcp_resets++;
		tcp_drop(c, TCP_CLOSE_RESET);
		return;
	}
	if (!(s->flags & TH_ACK)) {
		st->ctr.tcp_no_ack++;
		return;
	}
	/* TS.Recent (RFC 7323 4.3) */
	if ((c->flags & TF_TS) && s->has_ts &&
	    seq_leq(seq, c->last_ack_sent) &&
	    (int32_t)(s->tsval - c->ts_recent) >= 0) {
		c->ts_recent = s->tsval;
		c->ts_recent_ms = st->now_ms;
	}

	/* ACK */
	if (c->state == TCPS_SYN_RECEIVED) {
		if (!seq_gt(s->ack, c->snd_una) || seq_gt(s->ack, c->snd_max)) {
			st->ctr.tcp_listen_bad_ack++;
			tcp_send_rst_noconn(st, c->raddr, c->rport, c->lport,
					    s->ack, 0, false);
			return;
		}
		c->snd_una = s->ack;
		c->snd_wnd = (uint32_t)s->wnd << c->snd_wscale;
		c->max_snd_wnd = c->snd_wnd;
		c->snd_wl1 = seq;
		c->snd_wl2 = s->ack;
		established(c, s);
		if (c->state == TCPS_CLOSED)
			return;
	} else {
		uint32_t swnd = (uint32_t)s->wnd << c->snd_wscale;

		if (seq_gt(s->ack, c->snd_max)) {
			st->ctr.tcp_ack_unsent++;
			tcp_send_ack(c);
			return;
		}
		if (seq_lt(s->ack, c->snd_una - c->max_snd_wnd)) {
			st->ctr.tcp_ack_too_old++;
			challenge_ack(c);
			return;
		}
		if (seq_gt(s->ack, c->snd_una)) {
			data_acked = ack_advance(c, s);
		} else if (s->ack == c->snd_una && s->len == 0 && !fin &&
			   swnd == c->snd_wnd && swnd != 0 &&
			   seq_gt(c->snd_max, c->snd_una)) {
			dup_ack(c);
		}
		/* window update (RFC 9293 3.10.7.4, SND.WL1/WL2) */
		if (seq_lt(c->snd_wl1, seq) ||
		    (c->snd_wl1 == seq && seq_leq(c->snd_wl2, s->ack))) {
			if (swnd && !c->snd_wnd) {
				c->t_persist = 0;
				c->rxtshift = 0;
			}
			c->snd_wnd = swnd;
			c->max_snd_wnd = FD_MAX(c->max_snd_wnd, swnd);
			c->snd_wl1 = seq;
			c->snd_wl2 = s->ack;
		}
		if ((c->flags & TF_FIN_SENT) && seq_gt(c->snd_una, c->fin_seq)) {
			switch ((enum tcp_state)c->state) {
			case TCPS_FIN_WAIT_1:
				tcp_enter_state(c, TCPS_FIN_WAIT_2);
				break;
			case TCPS_CLOSING:
				tcp_enter_state(c, TCPS_TIME_WAIT);
				tcp_send_ack(c);
				tcp_timer_update(c);
				return;
			case TCPS_LAST_ACK:
				tcp_conn_free(c);
				return;
			case TCPS_CLOSED:
			case TCPS_LISTEN:
			case TCPS_SYN_RECEIVED:
			case TCPS_ESTABLISHED:
			case TCPS_FIN_WAIT_2:
			case TCPS_TIME_WAIT:
			case TCPS_CLOSE_WAIT:
				break;
			}
		}
	}
	c->t_idle = st->now_ms + st->cfg.idle_ms;
	if (s->flags & TH_URG)
		st->ctr.tcp_urg_ignored++;

	/* text */
	if (s->len) {
		switch ((enum tcp_state)c->state) {
		case TCPS_ESTABLISHED:
		case TCPS_FIN_WAIT_1:
		case TCPS_FIN_WAIT_2:
			text_input(c, s, seq);
			break;
		case TCPS_CLOSED:
		case TCPS_LISTEN:
		case TCPS_SYN_RECEIVED:
		case TCPS_CLOSE_WAIT:
		case TCPS_CLOSING:
		case TCPS_LAST_ACK:
		case TCPS_TIME_WAIT:
			break; /* after the peer's FIN: ignored */
		}
	}
	/* FIN */
	if (fin && !(c->flags & TF_RCV_FIN)) {
		uint32_t fseq = seq + s->len;
		if (fseq == c->rcv_nxt) {
			process_fin(c);
		} else if (seq_gt(fseq, c->rcv_nxt)) {
			c->flags |= TF_FIN_OOO | TF_ACKNOW;
			c->rcv_fin = fseq;
		}
	} else if (fin) {
		c->flags |= TF_ACKNOW; /* retransmitted FIN */
	}
	if ((c->flags & TF_FIN_OOO) && c->rcv_nxt == c->rcv_fin)
		process_fin(c);
	if (c->state == TCPS_TIME_WAIT) {
		tcp_send_ack(c);
		tcp_timer_update(c);
		return;
	}

	tcp_deliver(c);
	if (c->state == TCPS_CLOSED)
		return;
	tcp_output(c);
	tcp_timer_update(c);
	if (data_acked && (c->flags & TF_WANT_SENT) &&
	    !(c->flags & TF_DETACHED) && st->cfg.ops->sent) {
		c->flags &= ~TF_WANT_SENT;
		st->cfg.ops->sent(c->uctx, tcp_send_room(c));
	}
}

void
tcp_deliver(struct tcp_conn *c)
{
	struct net_stack *st = c->st;
	uint32_t size = st->cfg.limits.rcv_buf, consumed = 0;

	if (c->flags & (TF_DETACHED | TF_BLOCKED | TF_IN_RECV) || !c->uctx)
		return;
	c->flags |= TF_IN_RECV;
	while (c->rheld) {
		uint32_t n = FD_MIN(c->rheld, size - c->rhead);
		size_t k = st->cfg.ops->recv(c->uctx, tcp_rcv_base(c) + c->rhead,
					     n);
		if (c->state == TCPS_CLOSED)
			return; /* aborted from inside recv() */
		if (c->flags & TF_DETACHED)
			break; /* closed from inside recv() */
		if (k > n)
			k = n;
		tcp_rcv_consume(c, (uint32_t)k);
		consumed += (uint32_t)k;
		if (k < n) {
			c->flags |= TF_BLOCKED;
			break;
		}
	}
	c->flags &= ~TF_IN_RECV;
	if (c->flags & TF_DETACHED)
		return;
	if (!c->rheld && (c->flags & TF_RCV_FIN) && !(c->flags & TF_EOF_DONE)) {
		c->flags |= TF_EOF_DONE;
		if (st->cfg.ops->eof)
			st->cfg.ops->eof(c->uctx);
		if (c->state == TCPS_CLOSED)
			return;
	}
	if (consumed) {
		/* window update when the edge moved enough (RFC 1122
		 * 4.2.3.3), or at once after a zero window */
		uint32_t edge = c->rcv_nxt + tcp_rcv_space(c);
		uint32_t thr = FD_MIN(size / 2, 2u * c->smss);
		if (c->flags & TF_ZERO_WND)
			thr = FD_MIN(size / 2, (uint32_t)c->smss);
		if (seq_gt(edge, c->rcv_adv) && edge - c->rcv_adv >= thr)
			c->flags |= TF_ACKNOW;
	}
}
