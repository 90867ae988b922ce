/* Long transfers through the seeded fault layer: 5% of frames dropped in
 * both directions (plus duplicates and reordering), 200 KB each way; every
 * byte must arrive, in order, intact, and no connection may be reset. */
#include <criterion/criterion.h>
#include <string.h>

#include "harness.h"

TestSuite(tcp_loss);

#define TOTAL 200000

static uint8_t up_data[TOTAL], down_data[TOTAL];

struct run {
	unsigned drop, dup, reorder;
	uint64_t seed;
	unsigned opts;
};

static void
peer_seg(struct harness *h, struct h_peer *p, uint32_t seq, uint8_t flags,
	 const void *d, size_t n)
{
	uint8_t o[12], f[2048];
	size_t ol = 0, len;

	if (p->ts_on) {
		o[0] = 1;
		o[1] = 1;
		o[2] = 8;
		o[3] = 10;
		p->ts = (uint32_t)(h->now_us / 1000) + 7;
		o[4] = (uint8_t)(p->ts >> 24);
		o[5] = (uint8_t)(p->ts >> 16);
		o[6] = (uint8_t)(p->ts >> 8);
		o[7] = (uint8_t)p->ts;
		o[8] = (uint8_t)(p->ts_recent >> 24);
		o[9] = (uint8_t)(p->ts_recent >> 16);
		o[10] = (uint8_t)(p->ts_recent >> 8);
		o[11] = (uint8_t)p->ts_recent;
		ol = 12;
	}
	len = h_build_tcp(f, H_PEER_IP, p->port, H_PORT, seq, p->rcv_nxt,
			  flags, 65535, o, ol, d, n);
	h_input_faulty(h, f, len);
}

static void
transfer(const struct run *r)
{
	struct net_config cfg;
	struct harness *h;
	struct h_peer p;
	struct h_pkt k;
	uint32_t base, dbase;
	size_t up_una = 0, up_nxt = 0, down_sent = 0, down_got = 0;
	uint64_t last_progress = 0, t;
	struct h_upper *u;

	for (size_t i = 0; i < TOTAL; i++) {
		up_data[i] = (uint8_t)(i * 13 + 1);
		down_data[i] = (uint8_t)(i * 29 + (i >> 10));
	}
	h_config(&cfg);
	cfg.limits.rcv_buf = 65536;
	cfg.limits.snd_buf = 32768;
	h = h_new_ready(&cfg);
	h_peer_init(h, &p, 47000, r->opts);
	h_connect(h, &p, r->opts);
	u = p.u;
	base = p.snd_nxt;
	dbase = p.rcv_nxt;
	h_faults(h, r->seed, r->drop, r->dup, r->reorder);
	h->faults_tx = true;

	for (t = 0; t < 300000; t++) {
		bool need_ack = false;
		uint64_t now = h->now_us / 1000;
		uint32_t wnd;

		/* the stack's upper layer pushes the download */
		if (u->c && down_sent < TOTAL)
			down_sent += tcp_send(u->c, down_data + down_sent,
					      TOTAL - down_sent);
		/* the peer reads what the stack sent */
		while (h_next(h, &k)) {
			if (!k.tcp || k.dport != p.port)
				continue;
			cr_assert_not(k.flags & TH_RST, "connection reset");
			if (k.has_ts)
				p.ts_recent = k.tsval;
			if ((int32_t)(k.ack - (base + (uint32_t)up_una)) > 0) {
				up_una = k.ack - base;
				last_progress = now;
				if (up_nxt < up_una)
					up_nxt = up_una;
			}
			p.stack_wnd = (uint32_t)k.wnd << p.ws;
			if (k.dlen) {
				need_ack = true;
				if (k.seq == p.rcv_nxt) {
					cr_assert_leq(down_got + k.dlen, TOTAL);
					cr_assert(memcmp(k.data,
							 down_data + down_got,
							 k.dlen) == 0,
						  "corrupt data at %zu",
						  down_got);
					down_got += k.dlen;
					p.rcv_nxt += (uint32_t)k.dlen;
				}
				/* one ACK per segment: duplicates for holes */
				peer_seg(h, &p, base + (uint32_t)up_nxt, TH_ACK,
					 NULL, 0);
				need_ack = false;
			}
		}
		if (need_ack)
			peer_seg(h, &p, base + (uint32_t)up_nxt, TH_ACK, NULL,
				 0);
		/* the peer sends: go-back-N with a 300 ms timer */
		if (up_una < up_nxt && now - last_progress > 300) {
			up_nxt = up_una;
			last_progress = now;
		}
		wnd = p.stack_wnd < 8 * 1460 ? p.stack_wnd : 8 * 1460;
		while (up_nxt < TOTAL && up_nxt - up_una < wnd) {
			size_t n = TOTAL - up_nxt;
			if (n > 1400)
				n = 1400;
			if (up_nxt - up_una + n > wnd)
				break;
			peer_seg(h, &p, base + (uint32_t)up_nxt,
				 TH_ACK | TH_PSH, up_data + up_nxt, n);
			up_nxt += n;
		}
		if (up_una == TOTAL && down_got == TOTAL &&
		    u->rx_len == TOTAL)
			break;
		h_advance(h, 1);
	}
	cr_assert_eq(u->rx_len, TOTAL, "upload incomplete: %zu", u->rx_len);
	cr_assert(memcmp(u->rx, up_data, TOTAL) == 0, "upload corrupted");
	cr_assert_eq(down_got, TOTAL, "download incomplete: %zu", down_got);
	cr_assert_eq(up_una, TOTAL);
	cr_assert_eq(p.rcv_nxt, dbase + TOTAL);
	cr_assert_eq(u->closed_calls, 0);
	if (r->drop)
		cr_assert_gt(net_stack_counters(h->st)->tcp_retransmits, 0);
	cr_log_info("done in %lu ms virtual; retransmits=%lu rto=%lu fast=%lu",
		    (unsigned long)t,
		    (unsigned long)net_stack_counters(h->st)->tcp_retransmits,
		    (unsigned long)net_stack_counters(h->st)->tcp_rto,
		    (unsigned long)net_stack_counters(h->st)->tcp_fast_retransmits);
	h_free(h);
}

Test(tcp_loss, clean_link)
{
	struct run r = {0, 0, 0, 1, HO_MSS};
	transfer(&r);
}

Test(tcp_loss, five_percent_loss)
{
	struct run r = {5, 0, 0, 12345, HO_MSS | HO_SACK};
	transfer(&r);
}

Test(tcp_loss, five_percent_loss_all_options)
{
	struct run r = {5, 0, 0, 777, HO_ALL};
	transfer(&r);
}

Test(tcp_loss, loss_duplicates_reordering)
{
	struct run r = {5, 2, 5, 4242, HO_ALL};
	transfer(&r);
}

Test(tcp_loss, many_seeds)
{
	for (uint64_t s = 100; s < 108; s++) {
		struct run r = {5, 1, 2, s, (unsigned)(s & 1 ? HO_ALL : HO_MSS)};
		transfer(&r);
	}
}
