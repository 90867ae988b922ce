/*
 * The per-shard entry points: create (every table and pool sized from
 * cfg.limits, allocated here and nowhere else), input of one frame, the
 * timer poll, transmit accounting, counters and the memory report.
 *
 * Contract: one thread per struct net_stack; no locks, nothing shared.
 * The clock is read once per entry point (net_update_clock) so one frame's
 * processing sees one time.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "net/net_priv.h"

void
net_config_defaults(struct net_config *cfg)
{
	memset(cfg, 0, sizeof(*cfg));
	cfg->limits.max_conns = 1024;
	cfg->limits.syn_backlog = 256;
	cfg->limits.rcv_buf = 16384;
	cfg->limits.snd_buf = 16384;
	cfg->limits.rcv_slots = 256;
	cfg->limits.snd_slots = 256;
	cfg->limits.arp_entries = 64;
	cfg->limits.arp_queue = 32;
	cfg->mtu = 1500;
	cfg->arp_reply = true;
	cfg->rto_init_ms = 1000;
	cfg->rto_min_ms = 200;
	cfg->rto_max_ms = 60000;
	cfg->delack_ms = 40;
	cfg->time_wait_ms = 60000;
	cfg->fin_wait2_ms = 60000;
	cfg->idle_ms = 600000;
	cfg->arp_timeout_ms = 60000;
	cfg->arp_retry_ms = 1000;
	cfg->arp_retries = 3;
	cfg->synack_retries = 5;
	cfg->data_retries = 12;
	cfg->challenge_ack_limit = 1000;
}

static bool
pow2_in(uint32_t v, uint32_t lo, uint32_t hi)
{
	return v >= lo && v <= hi && (v & (v - 1)) == 0;
}

static bool
config_valid(const struct net_config *cfg)
{
	const struct net_limits *l = &cfg->limits;

	if (!cfg->tx || !cfg->clock || !cfg->ops || cfg->addr == 0)
		return false;
	if (cfg->prefix_len > 32 || cfg->n_ports > NET_MAX_LISTEN)
		return false;
	if (cfg->mtu < 576 || cfg->mtu > 9000)
		return false;
	if (l->max_conns == 0 || l->max_conns > (1u << 24))
		return false;
	if (!pow2_in(l->rcv_buf, 1024, 1u << 20) ||
	    !pow2_in(l->snd_buf, 1024, 1u << 20))
		return false;
	if (l->rcv_slots == 0 || l->snd_slots == 0 || l->arp_entries == 0)
		return false;
	if (cfg->rto_min_ms == 0 || cfg->rto_init_ms < cfg->rto_min_ms ||
	    cfg->rto_max_ms < cfg->rto_init_ms || cfg->delack_ms >= 500)
		return false;
	return true;
}

static void *
take(struct net_stack *st, size_t n, size_t size)
{
	void *p = calloc(n ? n : 1, size);
	if (p)
		st->mem_total += n * size;
	return p;
}

void
net_stack_destroy(struct net_stack *st)
{
	if (!st)
		return;
	free(st->arp);
	free(st->held);
	free(st->held_frames);
	free(st->conns);
	free(st->buckets);
	free(st->rcv_mem);
	free(st->snd_mem);
	free(st->rcv_free);
	free(st->snd_free);
	free(st->wheel);
	free(st);
}

struct net_stack *
net_stack_create(const struct net_config *cfg)
{
	struct net_stack *st;
	const struct net_limits *l = &cfg->limits;
	uint32_t nb = 1;

	if (!config_valid(cfg))
		return NULL;
	st = aligned_alloc(FD_CACHE_LINE,
			   (sizeof(*st) + FD_CACHE_LINE - 1) &
				   ~(size_t)(FD_CACHE_LINE - 1));
	if (!st)
		return NULL;
	memset(st, 0, sizeof(*st));
	st->mem_total = sizeof(*st);
	st->cfg = *cfg;
	st->netmask = cfg->prefix_len ? ~0u << (32 - cfg->prefix_len) : 0;

	if (cfg->seed) {
		uint64_t s = cfg->seed;
		memcpy(st->secret, &s, 8);
		s = s * 6364136223846793005ULL + 1442695040888963407ULL;
		memcpy(st->secret + 8, &s, 8);
	} else if (getrandom(st->secret, sizeof(st->secret), 0) !=
		   (ssize_t)sizeof(st->secret)) {
		goto out_free;
	}

	st->arp = take(st, l->arp_entries, sizeof(*st->arp));
	st->held = take(st, l->arp_queue, sizeof(*st->held));
	st->held_stride = (size_t)cfg->mtu + ETH_HLEN;
	st->held_frames = take(st, l->arp_queue, st->held_stride);
	st->conns = take(st, l->max_conns, sizeof(*st->conns));
	while (nb < l->max_conns)
		nb <<= 1;
	st->buckets = take(st, nb, sizeof(*st->buckets));
	st->bucket_mask = nb - 1;
	st->rcv_mem = take(st, l->rcv_slots, l->rcv_buf);
	st->snd_mem = take(st, l->snd_slots, l->snd_buf);
	st->rcv_free = take(st, l->rcv_slots, sizeof(uint32_t));
	st->snd_free = take(st, l->snd_slots, sizeof(uint32_t));
	st->wheel = take(st, TCP_WHEEL_SLOTS, sizeof(uint32_t));
	if (!st->arp || !st->held || !st->held_frames || !st->conns ||
	    !st->buckets || !st->rcv_mem || !st->snd_mem || !st->rcv_free ||
	    !st->snd_free || !st->wheel)
		goto out_free;

	for (uint32_t i = 0; i < nb; i++)
		st->buckets[i] = NET_NIL;
	for (uint32_t i = 0; i < TCP_WHEEL_SLOTS; i++)
		st->wheel[i] = NET_NIL;
	st->free_head = NET_NIL;
	for (uint32_t i = l->max_conns; i-- > 0;) {
		st->conns[i].idx = i;
		st->conns[i].st = st;
		st->conns[i].hnext = st->free_head;
		st->free_head = i;
	}
	for (uint32_t i = 0; i < l->rcv_slots; i++)
		st->rcv_free[i] = l->rcv_slots - 1 - i;
	st->n_rcv_free = l->rcv_slots;
	for (uint32_t i = 0; i < l->snd_slots; i++)
		st->snd_free[i] = l->snd_slots - 1 - i;
	st->n_snd_free = l->snd_slots;
	st->rcv_mask = l->rcv_buf - 1;
	st->snd_mask = l->snd_buf - 1;
	st->swait_head = st->swait_tail = NET_NIL;
	st->tw_head = st->tw_tail = NET_NIL;
	tcp_init_cookie_table(st);
	st->chack_second = UINT64_MAX; /* no second seen yet */
	net_update_clock(st);
	st->wheel_ms = st->now_ms;
	return st;

out_free:
	net_stack_destroy(st);
	return NULL;
}

void
net_update_clock(struct net_stack *st)
{
	uint64_t now = st->cfg.clock(st->cfg.clock_ctx);

	if (now > st->now_us)
		st->now_us = now;
	st->now_ms = st->now_us / 1000;
}

void
net_stack_start(struct net_stack *st)
{
	net_update_clock(st);
	arp_announce(st);
}

void
net_stack_input(struct net_stack *st, const uint8_t *frame, size_t len,
		unsigned rx_flags)
{
	net_update_clock(st);
	st->ctr.rx_frames++;
	st->ctr.rx_bytes += len;
	eth_input(st, frame, len, rx_flags);
	tcp_wake_senders(st);
}

void
net_stack_poll_timers(struct net_stack *st)
{
	net_update_clock(st);
	if (st->now_ms >= st->arp_next_scan_ms) {
		arp_timers(st);
		st->arp_next_scan_ms = st->now_ms + 100;
	}
	tcp_timers_run(st);
	tcp_wake_senders(st);
}

void
net_tx(struct net_stack *st, const struct net_iov *iov, unsigned n,
       const struct net_tx_meta *meta)
{
	size_t len = 0;

	for (unsigned i = 0; i < n; i++)
		len += iov[i].len;
	if (st->cfg.tx(st->cfg.tx_ctx, iov, n, meta) < 0) {
		st->ctr.tx_errors++;
		return;
	}
	st->ctr.tx_frames++;
	st->ctr.tx_bytes += len;
}

const struct net_counters *
net_stack_counters(const struct net_stack *st)
{
	return &st->ctr;
}

uint32_t
net_stack_conn_count(const struct net_stack *st)
{
	return st->n_used;
}

uint32_t
net_stack_conn_count_live(const struct net_stack *st)
{
	return st->n_used - st->n_time_wait;
}

void
net_stack_memory(const struct net_stack *st, struct net_memory *m)
{
	memset(m, 0, sizeof(*m));
	m->total = st->mem_total;
	m->per_conn = sizeof(struct tcp_conn);
	/* one bucket head per connection (table sized to the next power of
	 * two: up to 2 per connection) */
	m->per_conn_table =
		(size_t)(st->bucket_mask + 1) * sizeof(uint32_t) /
		st->cfg.limits.max_conns;
	m->rcv_slot = st->cfg.limits.rcv_buf + sizeof(uint32_t);
	m->snd_slot = st->cfg.limits.snd_buf + sizeof(uint32_t);
	m->idle_conn = m->per_conn + m->per_conn_table;
}

void
net_stack_pools(const struct net_stack *st, struct net_pool_stats *ps)
{
	memset(ps, 0, sizeof(*ps));
	ps->conns_used = st->n_used;
	ps->conns_max = st->cfg.limits.max_conns;
	ps->syn_received = st->n_synrcvd;
	ps->rcv_free = st->n_rcv_free;
	ps->rcv_slots = st->cfg.limits.rcv_slots;
	ps->snd_free = st->n_snd_free;
	ps->snd_slots = st->cfg.limits.snd_slots;
	for (uint32_t i = 0; i < st->cfg.limits.arp_queue; i++)
		if (st->held[i].next_hop)
			ps->arp_held++;
}
