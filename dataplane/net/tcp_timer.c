/*
 * TCP timers on a coarse wheel: TCP_WHEEL_SLOTS slots of 1 ms. Each
 * connection sits in at most one slot, the one of its earliest deadline
 * among: retransmission (RFC 6298), persist (RFC 9293 3.8.6.1), delayed ACK
 * (RFC 1122 4.2.3.2), idle, and close (TIME_WAIT's 2*MSL, FIN_WAIT_2's
 * timeout). Deadlines further than the wheel's span wait for their lap:
 * an entry visited early is put back.
 *
 * RTO (RFC 6298): SRTT/RTTVAR from timestamp echoes or from one timed
 * segment per window (Karn: never from a retransmission), RTO = SRTT +
 * max(G, 4*RTTVAR) within [rto_min_ms, rto_max_ms], doubled at each
 * expiry; after data_retries expiries the connection is reset. An expiry
 * collapses cwnd to one segment and halves ssthresh (RFC 5681 3.1).
 */
#include "net/net_priv.h"

void
tcp_timer_remove(struct tcp_conn *c)
{
	struct net_stack *st = c->st;

	if (!c->wdeadline)
		return;
	if (c->wprev != NET_NIL)
		st->conns[c->wprev].wnext = c->wnext;
	else
		st->wheel[c->wdeadline % TCP_WHEEL_SLOTS] = c->wnext;
	if (c->wnext != NET_NIL)
		st->conns[c->wnext].wprev = c->wprev;
	c->wprev = c->wnext = NET_NIL;
	c->wdeadline = 0;
}

static void
wheel_insert(struct net_stack *st, struct tcp_conn *c, uint64_t deadline)
{
	uint32_t slot;

	if (deadline <= st->wheel_ms)
		deadline = st->wheel_ms + 1;
	slot = (uint32_t)(deadline % TCP_WHEEL_SLOTS);
	c->wdeadline = deadline;
	c->wprev = NET_NIL;
	c->wnext = st->wheel[slot];
	if (c->wnext != NET_NIL)
		st->conns[c->wnext].wprev = c->idx;
	st->wheel[slot] = c->idx;
}

void
tcp_timer_update(struct tcp_conn *c)
{
	uint64_t t[5] = {c->t_rexmt, c->t_persist, c->t_delack, c->t_idle,
			 c->t_close};
	uint64_t d = 0;

	for (unsigned i = 0; i < 5; i++)
		if (t[i] && (!d || t[i] < d))
			d = t[i];
	if (c->state == TCPS_CLOSED)
		d = 0;
	if (d && d <= c->st->wheel_ms)
		d = c->st->wheel_ms + 1;
	if (d == c->wdeadline)
		return;
	tcp_timer_remove(c);
	if (d)
		wheel_insert(c->st, c, d);
}

void
tcp_rexmt_arm(struct tcp_conn *c)
{
	c->t_rexmt = c->st->now_ms + c->rto_ms;
}

static uint32_t
rto_from_rtt(const struct tcp_conn *c)
{
	const struct net_config *cfg = &c->st->cfg;
	uint32_t var4 = 4 * c->rttvar_us;
	uint64_t rto_us = (uint64_t)c->srtt_us + (var4 > 1000 ? var4 : 1000);
	uint64_t ms = (rto_us + 999) / 1000;

	if (ms < cfg->rto_min_ms)
		ms = cfg->rto_min_ms;
	if (ms > cfg->rto_max_ms)
		ms = cfg->rto_max_ms;
	return (uint32_t)ms;
}

void
tcp_rto_reset(struct tcp_conn *c)
{
	c->rto_ms = c->srtt_us ? rto_from_rtt(c) : c->st->cfg.rto_init_ms;
}

void
tcp_rtt_sample(struct tcp_conn *c, uint32_t r)
{
	if (r == 0)
		r = 1;
	if (c->srtt_us == 0) {
		c->srtt_us = r;
		c->rttvar_us = r / 2;
	} else {
		uint32_t d = c->srtt_us > r ? c->srtt_us - r : r - c->srtt_us;
		c->rttvar_us = (3 * c->rttvar_us + d) / 4;
		c->srtt_us = (7 * c->srtt_us + r) / 8;
	}
	c->rto_ms = rto_from_rtt(c);
}

/* Returns false when the connection was freed. */
static bool
rexmt_fire(struct tcp_conn *c)
{
	struct net_stack *st = c->st;
	uint32_t flight;

	c->t_rexmt = 0;
	if (c->state == TCPS_SYN_RECEIVED) {
		if (c->rxtshift >= st->cfg.synack_retries) {
			st->ctr.tcp_synack_timeouts++;
			tcp_conn_free(c);
			return false;
		}
		c->rxtshift++;
		c->rto_ms = FD_MIN(c->rto_ms * 2, st->cfg.rto_max_ms);
		st->ctr.tcp_retransmits++;
		tcp_send_synack(c);
		tcp_rexmt_arm(c);
		return true;
	}
	if (c->snd_una == c->snd_nxt && c->snd_una == c->snd_max)
		return true; /* nothing outstanding */
	if (c->rxtshift >= st->cfg.data_retries) {
		st->ctr.tcp_rexmt_timeouts++;
		tcp_send_rst(c);
		tcp_drop(c, TCP_CLOSE_TIMEOUT);
		return false;
	}
	st->ctr.tcp_rto++;
	c->rxtshift++;
	c->rto_ms = FD_MIN(c->rto_ms * 2, st->cfg.rto_max_ms);
	flight = c->snd_max - c->snd_una;
	c->ssthresh = FD_MAX(flight / 2, 2u * c->smss);
	c->cwnd = c->smss;
	c->flags &= ~TF_RECOVERY;
	c->recover = c->snd_max;
	c->dupacks = 0;
	c->rtt_start_ms = 0;
	c->snd_nxt = c->snd_una;
	tcp_output(c);
	if (!c->t_rexmt && c->state != TCPS_CLOSED)
		tcp_rexmt_arm(c);
	return true;
}

static bool
persist_fire(struct tcp_conn *c)
{
	struct net_stack *st = c->st;
	uint32_t off = c->snd_nxt - c->snd_una;
	uint64_t ivl;

	c->t_persist = 0;
	if (c->snd_wnd != 0 || c->slen <= off)
		return true;
	/* an orphan (upper layer gone) is not held forever by a zero
	 * window */
	if ((c->flags & TF_DETACHED) && c->rxtshift >= st->cfg.data_retries) {
		st->ctr.tcp_rexmt_timeouts++;
		tcp_send_rst(c);
		tcp_conn_free(c);
		return false;
	}
	/* RFC 9293 3.8.6.1: a one-byte probe past the window; snd_nxt does
	 * not move (the byte is sent again normally if it is not taken) */
	st->ctr.tcp_persist_probes++;
	{
		uint32_t save_wnd = c->snd_wnd, save_cwnd = c->cwnd;
		uint32_t save_slen = c->slen;
		/* reuse the output path for exactly one byte */
		c->snd_wnd = off + 1;
		c->cwnd = FD_MAX(c->cwnd, off + 1);
		c->slen = off + 1;
		{
			uint32_t fq = c->flags & TF_FIN_QUEUED;
			c->flags &= ~TF_FIN_QUEUED;
			tcp_output(c);
			c->flags |= fq;
		}
		c->slen = save_slen;
		c->snd_wnd = save_wnd;
		c->cwnd = save_cwnd;
		c->snd_nxt = c->snd_una + off;
		c->t_rexmt = 0;
	}
	if (c->rxtshift < 16)
		c->rxtshift++;
	ivl = (uint64_t)c->rto_ms << c->rxtshift;
	if (ivl > st->cfg.rto_max_ms)
		ivl = st->cfg.rto_max_ms;
	c->t_persist = st->now_ms + ivl;
	return true;
}

static void
timer_fire(struct tcp_conn *c)
{
	struct net_stack *st = c->st;
	uint64_t now = st->now_ms;

	if (c->t_close && c->t_close <= now) {
		if (c->state == TCPS_TIME_WAIT)
			st->ctr.tcp_time_wait_expired++;
		else
			st->ctr.tcp_fin_wait2_timeouts++;
		tcp_conn_free(c);
		return;
	}
	if (c->t_idle && c->t_idle <= now) {
		st->ctr.tcp_idle_timeouts++;
		tcp_send_rst(c);
		tcp_drop(c, TCP_CLOSE_IDLE);
		return;
	}
	if (c->t_rexmt && c->t_rexmt <= now && !rexmt_fire(c))
		return;
	if (c->t_persist && c->t_persist <= now && !persist_fire(c))
		return;
	if (c->t_delack && c->t_delack <= now) {
		c->t_delack = 0;
		if (c->flags & TF_DELACK) {
			st->ctr.tcp_delayed_acks++;
			tcp_send_ack(c);
		}
	}
	tcp_timer_update(c);
}

void
tcp_timers_run(struct net_stack *st)
{
	uint64_t now = st->now_ms, span;

	if (now <= st->wheel_ms)
		return;
	span = now - st->wheel_ms;
	if (span > TCP_WHEEL_SLOTS)
		span = TCP_WHEEL_SLOTS;
	for (uint64_t i = 1; i <= span; i++) {
		uint64_t tick = now - span + i;
		uint32_t slot = (uint32_t)(tick % TCP_WHEEL_SLOTS);
		uint32_t head = st->wheel[slot];

		st->wheel[slot] = NET_NIL;
		/* detached list: entries are either fired or put back */
		for (uint32_t j = head; j != NET_NIL; j = head) {
			struct tcp_conn *c = &st->conns[j];
			uint64_t d = c->wdeadline;
			head = c->wnext;
			if (head != NET_NIL)
				st->conns[head].wprev = NET_NIL;
			c->wprev = c->wnext = NET_NIL;
			c->wdeadline = 0;
			if (d <= now) {
				timer_fire(c);
			} else {
				uint64_t save = st->wheel_ms;
				st->wheel_ms = tick;
				wheel_insert(st, c, d);
				st->wheel_ms = save;
			}
		}
	}
	st->wheel_ms = now;
}
