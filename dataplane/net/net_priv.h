/*
 * The stack's internals shared by its modules (not by other components):
 * the per-shard struct net_stack, wire-format helpers and the functions one
 * layer calls in another. Includes the TCP and ARP internals.
 */
#ifndef FINALDOT_NET_PRIV_H
#define FINALDOT_NET_PRIV_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "finaldot/compiler.h"
#include "net/net.h"
#include "net/tcp.h"

#define NET_NIL UINT32_MAX

#define ETH_HLEN 14
#define ETH_ALEN 6
#define ETHERTYPE_IPV4 0x0800u
#define ETHERTYPE_ARP 0x0806u
#define IP_HLEN 20
#define IP_PROTO_ICMP 1u
#define IP_PROTO_TCP 6u
#define TCP_HLEN 20
#define TCP_MAX_OPT 40
#define NET_HDR_MAX (ETH_HLEN + IP_HLEN + TCP_HLEN + TCP_MAX_OPT)
#define NET_IP_TTL 64

/* Wire helpers: frames are byte arrays with no alignment promise. */
static inline uint16_t
net_rd16(const uint8_t *p)
{
	return (uint16_t)(((unsigned)p[0] << 8) | p[1]);
}

static inline uint32_t
net_rd32(const uint8_t *p)
{
	return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) |
	       ((uint32_t)p[2] << 8) | p[3];
}

static inline void
net_wr16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)(v >> 8);
	p[1] = (uint8_t)v;
}

static inline void
net_wr32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)(v >> 24);
	p[1] = (uint8_t)(v >> 16);
	p[2] = (uint8_t)(v >> 8);
	p[3] = (uint8_t)v;
}

/* Sequence space arithmetic (RFC 9293 3.4), modulo 2^32. */
static inline bool
seq_lt(uint32_t a, uint32_t b)
{
	return (int32_t)(a - b) < 0;
}
static inline bool
seq_leq(uint32_t a, uint32_t b)
{
	return (int32_t)(a - b) <= 0;
}
static inline bool
seq_gt(uint32_t a, uint32_t b)
{
	return (int32_t)(a - b) > 0;
}
static inline bool
seq_geq(uint32_t a, uint32_t b)
{
	return (int32_t)(a - b) >= 0;
}

/* ---- net_csum.c ---- */
/* One's complement sum of n bytes added to sum (not folded). Handles odd
 * lengths across calls only when every piece but the last is even. */
uint32_t net_csum_add(uint32_t sum, const void *p, size_t n);
uint16_t net_csum_fold(uint32_t sum);
/* Pseudo-header sum for TCP (RFC 9293 3.1) in host-order inputs. */
uint32_t net_csum_pseudo(uint32_t src, uint32_t dst, uint8_t proto,
			 uint16_t len);

/* ---- net_hash.c ---- */
uint64_t net_siphash(const uint8_t key[16], const void *p, size_t n);

/* ---- ARP (arp.c) ---- */
enum arp_entry_state {
	ARP_FREE = 0,
	ARP_INCOMPLETE, /* request sent, no answer yet */
	ARP_REACHABLE,  /* answered within arp_timeout_ms */
	ARP_STALE,      /* expired: still used, refresh request sent */
};

struct arp_entry {
	uint32_t ip;
	uint8_t mac[ETH_ALEN];
	uint8_t state; /* enum arp_entry_state */
	uint8_t tries;
	uint64_t deadline_ms; /* REACHABLE: expiry; others: next retry */
	uint64_t used_ms;     /* LRU for eviction */
};

struct arp_held {
	uint32_t next_hop; /* 0: slot free */
	uint32_t len;
	struct net_tx_meta meta;
};

/* ---- TCP connection (tcp_conn.c owns the pool) ---- */
#define TCP_OOO_MAX 4

/* Connection flags. */
#define TF_ACKNOW 0x00001u     /* send an ACK at the next output */
#define TF_DELACK 0x00002u     /* an ACK is being delayed */
#define TF_TS 0x00004u         /* timestamps negotiated (RFC 7323) */
#define TF_SACK 0x00008u       /* SACK permitted (RFC 2018) */
#define TF_WS 0x00010u         /* window scale negotiated */
#define TF_FIN_QUEUED 0x00020u /* tcp_close(): FIN after the queued data */
#define TF_FIN_SENT 0x00040u   /* our FIN is at fin_seq (in flight) */
#define TF_RCV_FIN 0x00080u    /* peer's FIN processed (rcv_nxt past it) */
#define TF_FIN_OOO 0x00100u    /* peer's FIN seen out of order: rcv_fin */
#define TF_BLOCKED 0x00200u    /* upper layer consumed short: wait resume */
#define TF_DETACHED 0x00400u   /* upper layer gone (close/abort/never) */
#define TF_EOF_DONE 0x00800u   /* eof() delivered */
#define TF_RECOVERY 0x01000u   /* NewReno fast recovery (RFC 6582) */
#define TF_WANT_SENT 0x02000u  /* call sent() when room appears */
#define TF_SND_WAIT 0x04000u   /* on the send-buffer wait list */
#define TF_ZERO_WND 0x08000u   /* last advertised window was 0 */
#define TF_COOKIE 0x10000u     /* created from a SYN cookie */
#define TF_IN_RECV 0x20000u    /* inside recv(): no re-entrant delivery */

struct tcp_ooo {
	uint32_t start, end; /* sequence range [start, end) held */
};

struct tcp_conn {
	struct net_stack *st;
	void *uctx;
	/* table and timer wheel links (indices, NET_NIL = none) */
	uint32_t idx, hnext, wprev, wnext;
	uint32_t raddr;
	uint16_t rport, lport;
	uint8_t state; /* enum tcp_state */
	uint8_t snd_wscale, rcv_wscale;
	uint8_t dupacks, rxtshift, n_ooo;
	uint16_t smss; /* payload per segment, options excluded */
	uint32_t flags;
	/* send sequence space (RFC 9293 3.3.1); snd_max: highest sent */
	uint32_t iss, snd_una, snd_nxt, snd_max, snd_wnd, max_snd_wnd;
	uint32_t snd_wl1, snd_wl2, fin_seq;
	/* congestion control (RFC 5681, 6582) */
	uint32_t cwnd, ssthresh, recover;
	/* receive sequence space */
	uint32_t irs, rcv_nxt, rcv_adv, last_ack_sent, rcv_fin;
	/* timestamps (RFC 7323) */
	uint32_t ts_recent, ts_offset;
	uint64_t ts_recent_ms;
	/* RTT (RFC 6298), microseconds; rtt_start_ms 0: not timing */
	uint32_t srtt_us, rttvar_us, rto_ms, rtt_seq;
	uint64_t rtt_start_ms;
	/* timers, absolute ms; 0 = off */
	uint64_t t_rexmt, t_persist, t_delack, t_idle, t_close, wdeadline;
	/* buffers: slot indices into the shard's pools */
	uint32_t rslot, rhead, rheld; /* rhead: ring offset of first held */
	uint32_t sslot, shead, slen;  /* shead: ring offset of snd_una */
	uint32_t swnext;              /* send-buffer wait list */
	uint32_t twprev, twnext;      /* TIME_WAIT list, oldest first */
	struct tcp_ooo ooo[TCP_OOO_MAX]; /* ooo[0]: most recent (SACK 1st) */
};

struct net_stack {
	struct net_config cfg;
	struct net_counters ctr;
	uint64_t now_us, now_ms;
	uint32_t netmask;
	uint8_t secret[16];
	uint8_t hdr[NET_HDR_MAX] fd_cache_aligned; /* output scratch */

	/* ARP */
	struct arp_entry *arp;
	struct arp_held *held;
	uint8_t *held_frames; /* arp_queue * held_stride */
	size_t held_stride;
	uint64_t arp_next_scan_ms;

	/* TCP */
	struct tcp_conn *conns;
	uint32_t free_head, n_used, n_synrcvd;
	uint32_t *buckets;
	uint32_t bucket_mask;
	uint8_t *rcv_mem, *snd_mem;
	uint32_t *rcv_free, *snd_free;
	uint32_t n_rcv_free, n_snd_free;
	uint32_t rcv_mask, snd_mask;
	uint32_t swait_head, swait_tail;
	uint32_t tw_head, tw_tail; /* TIME_WAIT entries, oldest first */
	uint32_t n_time_wait;      /* entries in TIME_WAIT (tcp_enter_state) */
	uint32_t *wheel;
	uint64_t wheel_ms; /* last tick processed */
	uint32_t cookie_mss[8];
	uint64_t chack_second; /* RFC 5961 7 rate limit: current second */
	uint32_t chack_count;  /* challenge ACKs sent in it */
	uint32_t chack_limit;  /* this second's limit (randomised) */
	size_t mem_total;
} fd_cache_aligned;

#define TCP_WHEEL_SLOTS 1024u

/* ---- net_stack.c ---- */
void net_update_clock(struct net_stack *st);
/* Send a complete frame: iov[0] starts with the Ethernet header. */
void net_tx(struct net_stack *st, const struct net_iov *iov, unsigned n,
	    const struct net_tx_meta *meta);

/* ---- eth.c ---- */
void eth_input(struct net_stack *st, const uint8_t *f, size_t len,
	       unsigned rx_flags);
void eth_fill(uint8_t *hdr, const uint8_t *dst, const uint8_t *src,
	      uint16_t type);
extern const uint8_t eth_broadcast[ETH_ALEN];

/* ---- arp.c ---- */
void arp_input(struct net_stack *st, const uint8_t *p, size_t len);
/* Frame (iov[0] starts with a 14-byte Ethernet header whose destination is
 * filled here) to next_hop: sent now, or held until resolution. */
void arp_output(struct net_stack *st, uint32_t next_hop, struct net_iov *iov,
		unsigned n, const struct net_tx_meta *meta);
void arp_announce(struct net_stack *st);
void arp_timers(struct net_stack *st);

/* ---- ipv4.c ---- */
void ipv4_input(struct net_stack *st, const uint8_t *p, size_t len,
		unsigned rx_flags);
/* iov[0] = scratch with room for Ethernet + IPv4 headers at its start,
 * followed by the L4 header; the rest payload. Fills Ethernet and IPv4
 * headers, routes. l4_len is the L4 header length (for offload meta). */
void ipv4_output(struct net_stack *st, uint32_t dst, uint8_t proto,
		 struct net_iov *iov, unsigned n, uint16_t l4_len,
		 unsigned offload);

/* ---- icmp.c ---- */
void icmp_input(struct net_stack *st, uint32_t src, const uint8_t *p,
		size_t len);

/* ---- tcp_conn.c ---- */
void tcp_init_cookie_table(struct net_stack *st);
struct tcp_conn *tcp_lookup(struct net_stack *st, uint32_t raddr,
			    uint16_t rport, uint16_t lport);
struct tcp_conn *tcp_conn_alloc(struct net_stack *st, uint32_t raddr,
				uint16_t rport, uint16_t lport);
void tcp_conn_free(struct tcp_conn *c);
/* A new entry can be had (free, or a TIME_WAIT one to recycle). */
bool tcp_conn_room(const struct net_stack *st);
void tcp_enter_state(struct tcp_conn *c, enum tcp_state s);
uint32_t tcp_iss(struct net_stack *st, uint32_t raddr, uint16_t rport,
		 uint16_t lport);
uint32_t tcp_ts_offset(struct net_stack *st, uint32_t raddr, uint16_t rport,
		       uint16_t lport);
uint32_t tcp_cookie_make(struct net_stack *st, uint32_t raddr, uint16_t rport,
			 uint16_t lport, uint32_t peer_isn, uint16_t mss);
/* 0 when invalid, else the MSS it encodes. */
uint16_t tcp_cookie_check(struct net_stack *st, uint32_t raddr,
			  uint16_t rport, uint16_t lport, uint32_t peer_isn,
			  uint32_t cookie);
bool tcp_rcv_buf_get(struct tcp_conn *c);
void tcp_rcv_buf_put(struct tcp_conn *c);
bool tcp_snd_buf_get(struct tcp_conn *c);
void tcp_snd_buf_put(struct tcp_conn *c);
uint8_t *tcp_rcv_base(const struct tcp_conn *c);
uint8_t *tcp_snd_base(const struct tcp_conn *c);
/* The stack ends a connection: closed() upcall if attached, then free. */
void tcp_drop(struct tcp_conn *c, enum tcp_close_reason why);

/* ---- tcp_in.c ---- */
void tcp_input(struct net_stack *st, uint32_t src, uint32_t dst,
	       const uint8_t *p, size_t len, unsigned rx_flags);
/* Offer held bytes to the upper layer (and eof when due). */
void tcp_deliver(struct tcp_conn *c);

/* ---- tcp_reass.c ---- */
/* Store segment data at seq (already trimmed to the window). Returns true
 * if rcv_nxt advanced. */
bool tcp_reass(struct tcp_conn *c, uint32_t seq, const uint8_t *p,
	       uint32_t n);
/* Bytes we can still accept beyond rcv_nxt. */
uint32_t tcp_rcv_space(const struct tcp_conn *c);
void tcp_rcv_consume(struct tcp_conn *c, uint32_t n);

/* ---- tcp_out.c ---- */
void tcp_output(struct tcp_conn *c);
void tcp_send_ack(struct tcp_conn *c);
void tcp_send_synack(struct tcp_conn *c);
/* Resend one segment of up to smss starting at snd_una. */
void tcp_retransmit_first(struct tcp_conn *c);
/* RST for a segment that has no connection (RFC 9293 3.10.7.1). */
void tcp_send_rst_noconn(struct net_stack *st, uint32_t raddr, uint16_t rport,
			 uint16_t lport, uint32_t seq, uint32_t ack,
			 bool with_ack);
void tcp_send_rst(struct tcp_conn *c);
/* SYN-ACK carrying a cookie (iss), no state kept; offers our MSS only. */
void tcp_send_cookie_synack(struct net_stack *st, uint32_t raddr,
			    uint16_t rport, uint16_t lport, uint32_t iss,
			    uint32_t irs);
uint32_t tcp_rcv_window(const struct tcp_conn *c);
uint16_t tcp_mss_for_mtu(const struct net_stack *st);

/* ---- tcp_user.c ---- */
void tcp_wake_senders(struct net_stack *st);

/* ---- tcp_timer.c ---- */
void tcp_timer_update(struct tcp_conn *c);
void tcp_timer_remove(struct tcp_conn *c);
void tcp_timers_run(struct net_stack *st);
void tcp_rexmt_arm(struct tcp_conn *c);
void tcp_rtt_sample(struct tcp_conn *c, uint32_t rtt_us);
/* RTO from SRTT/RTTVAR again (after a backoff ended). */
void tcp_rto_reset(struct tcp_conn *c);

#endif
