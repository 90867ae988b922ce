/*
 * finaldot's user-space TCP/IP stack: the per-shard entry points, shared
 * types and counters. Pure C: no DPDK header here or in any file of the core.
 *
 * The stack's boundary is "frames in / frames out + a clock":
 *   - net_stack_input() takes one received Ethernet frame (borrowed: the
 *     stack copies what it keeps, the caller frees the buffer afterwards);
 *   - every frame the stack sends goes through cfg.tx as a gather list
 *     (headers in the stack's scratch area, payload straight from a
 *     connection's send buffer), valid only during the call: the DPDK glue
 *     copies it into an mbuf (or the test harness into its capture list);
 *   - cfg.clock gives monotonic microseconds; net_stack_poll_timers() runs
 *     the ~1 ms timer wheel (retransmission, delayed ACK, persist, TIME_WAIT,
 *     idle, ARP).
 * One struct net_stack per shard (lcore), nothing shared between shards.
 * Everything is allocated by net_stack_create() from cfg.limits; nothing is
 * allocated afterwards. See docs/net.md.
 *
 * Byte order: addresses and ports in this API are in HOST order.
 */
#ifndef FINALDOT_NET_H
#define FINALDOT_NET_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct net_stack;
struct tcp_upcall_ops;

/* One piece of an outgoing frame. */
struct net_iov {
	const void *base;
	size_t len;
};

/* Offloads the port performs on transmit (cfg.tx_offload), and the request
 * passed with each frame (meta.flags). IP and L4 are separate switches:
 * some virtual ports advertise one and not the other, or an offload
 * they do not perform. */
#define NET_OFFLOAD_IPV4_CKSUM 0x1u
#define NET_OFFLOAD_L4_CKSUM 0x2u

/*
 * Per-frame metadata for the transmit glue. flags: NET_OFFLOAD_* the stack
 * left to the port for this frame (then the IPv4 checksum field is 0 and/or
 * the TCP checksum field holds the pseudo-header sum, as DPDK expects).
 * l2/l3/l4_len: header lengths (l4_len 0 for non-TCP).
 */
struct net_tx_meta {
	unsigned flags;
	uint16_t l2_len, l3_len, l4_len;
};

/* Send one frame made of iov[0..n). Returns 0, or <0 when it was dropped
 * (counted as tx_errors; TCP recovers by retransmission). */
typedef int (*net_tx_fn)(void *ctx, const struct net_iov *iov, unsigned n,
			 const struct net_tx_meta *meta);
/* Monotonic time in microseconds. */
typedef uint64_t (*net_clock_fn)(void *ctx);

/* Receive flags for net_stack_input(): checksums the port verified. */
#define NET_RX_IPV4_CKSUM_GOOD 0x1u
#define NET_RX_L4_CKSUM_GOOD 0x2u

#define NET_MAX_LISTEN 8

struct net_limits {
	uint32_t max_conns;   /* connection table and pool (incl. TIME_WAIT) */
	uint32_t syn_backlog; /* SYN_RECEIVED entries; beyond: SYN cookies */
	uint32_t rcv_buf;     /* receive buffer (window + reassembly), bytes,
			       * power of two, 1 KiB..1 MiB */
	uint32_t snd_buf;     /* send buffer, bytes, power of two */
	uint32_t rcv_slots;   /* receive buffers in the shard's pool */
	uint32_t snd_slots;   /* send buffers in the shard's pool */
	uint32_t arp_entries; /* ARP cache size */
	uint32_t arp_queue;   /* frames held while their next hop resolves */
	/* Admission control: new SYNs are dropped (counted) while fewer
	 * than this many receive buffers are free, so that established
	 * sessions keep theirs (a stack without this back-pressure stalls
	 * whole when its mbuf pool runs dry). 0: off. */
	uint32_t admit_min_rcv_free;
};

struct net_config {
	struct net_limits limits;
	uint32_t addr;       /* our IPv4 address */
	uint8_t prefix_len;  /* on-link prefix */
	uint32_t gateway;    /* next hop for off-link destinations, 0: none */
	uint8_t mac[6];
	uint16_t mtu;        /* IP MTU, 576..9000; default 1500 */
	uint16_t ports[NET_MAX_LISTEN]; /* TCP ports we accept on */
	unsigned n_ports;
	unsigned tx_offload; /* NET_OFFLOAD_*: checksums the port computes */
	/* Answer ARP requests for our address (default true). With several
	 * shards on one address, the glue gives every ARP frame to every
	 * shard (each keeps its own cache) and lets one shard answer. */
	bool arp_reply;

	net_tx_fn tx;
	void *tx_ctx;
	net_clock_fn clock;
	void *clock_ctx;
	const struct tcp_upcall_ops *ops;
	void *ops_arg;

	/* Secret for ISNs, SYN cookies and hashes. 0: from getrandom(). */
	uint64_t seed;

	/* Timers, milliseconds. */
	uint32_t rto_init_ms;    /* RFC 6298 2.1: 1000 */
	uint32_t rto_min_ms;     /* 200 (XXX: RFC 6298 2.4 says 1 s; Linux
				  * and most stacks use 200 ms) */
	uint32_t rto_max_ms;     /* 60000 */
	uint32_t delack_ms;      /* 40, < 500 (RFC 1122 4.2.3.2) */
	uint32_t time_wait_ms;   /* 2*MSL: 60000 */
	uint32_t fin_wait2_ms;   /* 60000 */
	uint32_t idle_ms;        /* no segment received: RST; 600000 */
	uint32_t arp_timeout_ms; /* validity of a cache entry: 60000 */
	uint32_t arp_retry_ms;   /* request interval while resolving: 1000 */
	unsigned arp_retries;    /* requests before giving up: 3 */
	unsigned synack_retries; /* 5 */
	unsigned data_retries;   /* RTO expirations before abort: 12 */
	/* Challenge ACKs per second for the whole shard (RFC 5961 7):
	 * 1000; 0 = no limit. */
	unsigned challenge_ack_limit;
};

/*
 * Drop and event counters, one writer (the shard). Every drop has a reason.
 */
struct net_counters {
	/* Ethernet */
	uint64_t rx_frames, rx_bytes, rx_runt, rx_not_for_us, rx_ethertype;
	uint64_t tx_frames, tx_bytes, tx_errors;
	/* ARP */
	uint64_t arp_rx, arp_malformed, arp_not_for_us, arp_requests_answered;
	uint64_t arp_replies_rx, arp_requests_tx, arp_gratuitous_tx;
	uint64_t arp_resolve_failed, arp_queue_full, arp_table_full;
	uint64_t arp_queued_dropped; /* held frames dropped: resolution failed */
	/* IPv4 */
	uint64_t ip_rx, ip_too_short, ip_bad_version, ip_bad_ihl, ip_bad_len;
	uint64_t ip_bad_cksum, ip_options, ip_fragments, ip_ttl_zero;
	uint64_t ip_not_for_us, ip_bad_src, ip_unknown_proto, ip_no_route;
	/* ICMP */
	uint64_t icmp_rx, icmp_too_short, icmp_bad_cksum, icmp_echo_replied;
	uint64_t icmp_other;
	/* TCP: input validation */
	uint64_t tcp_rx, tcp_too_short, tcp_bad_off, tcp_bad_cksum;
	uint64_t tcp_bad_flags, tcp_bad_options, tcp_no_port;
	/* TCP: connection setup */
	uint64_t tcp_syn_rx, tcp_dup_syn, tcp_syn_bad, tcp_syncookies_sent;
	uint64_t tcp_syncookies_ok, tcp_syncookies_bad, tcp_conn_full;
	uint64_t tcp_accepted, tcp_accept_refused, tcp_synack_timeouts;
	uint64_t tcp_listen_bad_ack, tcp_syn_overload;
	/* TCP: segment checks */
	uint64_t tcp_paws_drop, tcp_out_of_window, tcp_ack_unsent;
	uint64_t tcp_ack_too_old, tcp_challenge_acks, tcp_challenge_limited;
	uint64_t tcp_rst_rx;
	uint64_t tcp_rst_bad, tcp_rst_tx, tcp_syn_in_window, tcp_no_ack;
	uint64_t tcp_urg_ignored, tcp_no_ts;
	/* TCP: data */
	uint64_t tcp_segs_rx, tcp_bytes_rx, tcp_segs_tx, tcp_bytes_tx;
	uint64_t tcp_dup_data, tcp_ooo_segs, tcp_ooo_drop, tcp_rcv_nobuf;
	uint64_t tcp_snd_nobuf, tcp_data_after_close, tcp_delayed_acks;
	uint64_t tcp_window_probes_rx;
	/* TCP: loss recovery and timers */
	uint64_t tcp_rto, tcp_retransmits, tcp_fast_retransmits;
	uint64_t tcp_partial_acks, tcp_dup_acks, tcp_persist_probes;
	uint64_t tcp_rexmt_timeouts, tcp_idle_timeouts, tcp_fin_wait2_timeouts;
	uint64_t tcp_time_wait_expired, tcp_time_wait_reused;
	uint64_t tcp_time_wait_recycled, tcp_closed;
	uint64_t tcp_resets;
};

/* Memory the stack took at create time, and per idle connection. */
struct net_memory {
	size_t total;          /* everything net_stack_create allocated */
	size_t per_conn;       /* one connection entry (idle: no buffer) */
	size_t per_conn_table; /* hash table + timer share per connection */
	size_t rcv_slot, snd_slot;
	size_t idle_conn;      /* per_conn + per_conn_table */
};

void net_config_defaults(struct net_config *cfg);

/* NULL when cfg is invalid or memory is short. */
struct net_stack *net_stack_create(const struct net_config *cfg);
void net_stack_destroy(struct net_stack *st);

/* Send the gratuitous ARP announcing our address (RFC 5227 2.3 style). */
void net_stack_start(struct net_stack *st);

/* One received Ethernet frame (without FCS). Borrowed. rx_flags:
 * NET_RX_*_CKSUM_GOOD when the port verified them. */
void net_stack_input(struct net_stack *st, const uint8_t *frame, size_t len,
		     unsigned rx_flags);

/* Run every timer due at cfg.clock's time. Cheap when nothing is due: call
 * once per poll iteration. */
void net_stack_poll_timers(struct net_stack *st);

const struct net_counters *net_stack_counters(const struct net_stack *st);
void net_stack_memory(const struct net_stack *st, struct net_memory *m);
/* Connections in use (any state but CLOSED). */
uint32_t net_stack_conn_count(const struct net_stack *st);
/* The same without those in TIME_WAIT: what a shutdown waits for. A
 * TIME_WAIT entry has nothing left to send or deliver (it only re-ACKs a
 * retransmitted FIN for 2*MSL), so waiting for it would hold every stop
 * for up to a minute after the last QUIT. */
uint32_t net_stack_conn_count_live(const struct net_stack *st);

/* Pool occupancy, for /metrics and for leak checks in tests. */
struct net_pool_stats {
	uint32_t conns_used, conns_max, syn_received;
	uint32_t rcv_free, rcv_slots, snd_free, snd_slots;
	uint32_t arp_held; /* frames waiting for ARP */
};
void net_stack_pools(const struct net_stack *st, struct net_pool_stats *ps);

/*
 * Shard ownership. A Toeplitz hash over (saddr, daddr, sport, dport) with a
 * key made of one repeated 16-bit pattern (0x6d5a), which makes it
 * symmetric: both directions of a flow give the same hash, so the NIC's RSS
 * (programmed with net_rss_key) and the software agree. The DPDK glue uses
 * net_shard_of() to forward a packet that reached the wrong queue.
 */
#define NET_RSS_KEY_LEN 40
extern const uint8_t net_rss_key[NET_RSS_KEY_LEN];
uint32_t net_toeplitz(const uint8_t *key, size_t keylen, const uint8_t *in,
		      size_t n);
uint32_t net_flow_hash(uint32_t saddr, uint32_t daddr, uint16_t sport,
		       uint16_t dport);
/* hash -> shard, as a 128-entry round-robin RETA does: (hash % 128) % n. */
unsigned net_shard_of(uint32_t hash, unsigned n_shards);
/* The queue for entry `entry` of the port's redirection table, so that the
 * NIC's queue for a hash (the entry hash % size) is net_shard_of()'s for
 * any table whose size is a multiple of 128. A smaller table cannot agree
 * for every n_shards; the receiving shard's hand-off covers the rest. */
unsigned net_reta_queue(unsigned entry, unsigned n_shards);

#endif
