/*
 * Test harness for the stack core: a fake peer on the other end of the
 * wire, a virtual clock, a capture of every frame the stack sends (parsed,
 * with its checksums verified), an upper layer that records what it is
 * given, and a seeded fault layer (drop, duplicate, reorder).
 */
#ifndef NET_TEST_HARNESS_H
#define NET_TEST_HARNESS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "net/net.h"
#include "net/tcp.h"

#define H_OUR_IP 0x0a000001u  /* 10.0.0.1/24 */
#define H_PEER_IP 0x0a000002u /* 10.0.0.2 */
#define H_GW_IP 0x0a0000feu   /* 10.0.0.254 */
#define H_PORT 25
#define H_MAXQ 8192
#define H_MAXU 64

#define TH_FIN 0x01
#define TH_SYN 0x02
#define TH_RST 0x04
#define TH_PSH 0x08
#define TH_ACK 0x10
#define TH_URG 0x20

extern const uint8_t h_our_mac[6], h_peer_mac[6], h_gw_mac[6];

struct h_pkt {
	uint8_t raw[2048];
	size_t len;
	struct net_tx_meta meta;
	uint8_t dst[6], src[6];
	uint16_t type;
	/* ARP */
	bool arp;
	uint16_t arp_op;
	uint8_t arp_sha[6], arp_tha[6];
	uint32_t arp_spa, arp_tpa;
	/* IPv4 */
	bool ip, ip_cksum_ok;
	uint32_t ip_src, ip_dst;
	uint8_t ip_proto, ip_ttl;
	uint16_t ip_len, ip_frag;
	/* ICMP */
	bool icmp, icmp_cksum_ok;
	uint8_t icmp_type, icmp_code;
	uint16_t icmp_id, icmp_seq;
	/* TCP */
	bool tcp, tcp_cksum_ok;
	uint16_t sport, dport, wnd;
	uint32_t seq, ack;
	uint8_t flags;
	bool has_mss, has_ws, sack_ok, has_ts;
	uint16_t mss;
	uint8_t ws;
	uint32_t tsval, tsecr;
	unsigned n_sack;
	uint32_t sack[4][2];
	const uint8_t *data; /* into raw */
	size_t dlen;
};

/* The upper layer's per-connection record. */
struct h_upper {
	bool used;
	struct tcp_conn *c;
	struct tcp_endpoint remote;
	uint8_t *rx;
	size_t rx_len, rx_cap;
	size_t consume_max;    /* per recv() call; SIZE_MAX: all */
	unsigned recv_calls, eof_calls, sent_calls, closed_calls;
	int closed_reason;
	size_t closed_unacked; /* RFC 1047: what the peer had not acked */
	bool close_on_eof;
};

struct harness {
	struct net_config cfg;
	struct net_stack *st;
	uint64_t now_us;
	struct h_pkt *q;     /* captured frames, FIFO */
	unsigned qhead, qtail;
	unsigned long long tx_total;
	struct h_upper up[H_MAXU];
	bool refuse_accept;
	const char *greeting; /* sent from inside accept(), like SMTP's 220 */
	bool close_in_accept, abort_in_accept;
	size_t default_consume;
	/* fault layer, applied to frames fed with h_input_faulty() and to
	 * frames captured while faults_tx is set */
	uint64_t rng;
	unsigned drop_pct, dup_pct, reorder_pct;
	bool faults_tx;
	uint8_t held[2048];
	size_t held_len;
	/* the stack's SYN-ACK/ACK interplay is checked with these */
	struct h_upper *last_accepted;
	/* per peer port: the stack's window scale and advertised edge */
	struct h_edge {
		bool valid;
		uint8_t ws;
		uint32_t edge;
	} *edges;
};

/* A fake TCP client. */
struct h_peer {
	uint16_t port;
	uint32_t iss, snd_nxt, rcv_nxt;
	uint32_t ts; /* our TSval, advances with the clock */
	bool ts_on, sack_on, ws_on;
	uint8_t ws;      /* the stack's window scale (from its SYN-ACK) */
	uint32_t ts_recent;
	uint32_t stack_wnd; /* last window the stack advertised, scaled */
	uint16_t mss;       /* the stack's MSS */
	struct h_upper *u;
};

/* Option sets for h_connect(). */
#define HO_MSS 0x1
#define HO_WS 0x2
#define HO_TS 0x4
#define HO_SACK 0x8
#define HO_ALL (HO_MSS | HO_WS | HO_TS | HO_SACK)

void h_config(struct net_config *cfg);
/* cfg NULL: defaults from h_config(). Does not start (no gratuitous ARP). */
struct harness *h_new(const struct net_config *cfg);
void h_free(struct harness *h);
/* Start, drop the gratuitous ARP, teach the stack the peer's MAC. */
struct harness *h_new_ready(const struct net_config *cfg);

void h_advance(struct harness *h, uint64_t ms);
void h_input(struct harness *h, const uint8_t *f, size_t len);

/* Captured frames. */
unsigned h_pending(const struct harness *h);
bool h_next(struct harness *h, struct h_pkt *p);
void h_drain(struct harness *h);
/* Parse a frame (also used by the fuzz tests of the harness itself). */
void h_parse(struct h_pkt *p);

/* Crafting (peer -> stack). Returns the frame length. */
size_t h_build_arp(uint8_t *f, uint16_t op, const uint8_t *sha, uint32_t spa,
		   const uint8_t *tha, uint32_t tpa, const uint8_t *dst);
size_t h_build_ip(uint8_t *f, uint32_t src, uint32_t dst, uint8_t proto,
		  const uint8_t *l4, size_t l4len);
size_t h_build_tcp(uint8_t *f, uint32_t src, uint16_t sport, uint16_t dport,
		   uint32_t seq, uint32_t ack, uint8_t flags, uint16_t wnd,
		   const uint8_t *opt, size_t olen, const void *data,
		   size_t dlen);
void h_send_tcp(struct harness *h, uint16_t sport, uint32_t seq, uint32_t ack,
		uint8_t flags, uint16_t wnd, const uint8_t *opt, size_t olen,
		const void *data, size_t dlen);

/* Peer-level helpers. */
void h_peer_init(struct harness *h, struct h_peer *p, uint16_t port,
		 unsigned opts);
/* SYN; returns the parsed SYN-ACK (asserts one came). */
void h_peer_syn(struct harness *h, struct h_peer *p, unsigned opts,
		struct h_pkt *synack);
/* Full handshake; asserts accept() ran. */
void h_connect(struct harness *h, struct h_peer *p, unsigned opts);
/* One segment from the peer (options: timestamps if on). */
void h_peer_seg(struct harness *h, struct h_peer *p, uint32_t seq,
		uint8_t flags, const void *data, size_t len);
void h_peer_send(struct harness *h, struct h_peer *p, const void *data,
		 size_t len);
void h_peer_ack(struct harness *h, struct h_peer *p);
/* Account a segment from the stack (rcv_nxt, ts_recent, window). */
void h_peer_saw(struct h_peer *p, const struct h_pkt *k);

/* Next captured TCP segment (skipping nothing); asserts one exists. */
void h_expect_tcp(struct harness *h, struct h_pkt *k);

/* Fault layer. */
void h_faults(struct harness *h, uint64_t seed, unsigned drop_pct,
	      unsigned dup_pct, unsigned reorder_pct);
uint32_t h_rand(struct harness *h);
void h_input_faulty(struct harness *h, const uint8_t *f, size_t len);

#endif
