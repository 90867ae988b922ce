/*
 * The DPDK port under the stack: the EAL, the first port it probed, one rx/tx
 * queue pair per shard, RSS, checksum offloads and the mbuf pool; frames in
 * (to the stack of the shard that owns their flow) and out (net_config.tx).
 * With the stack core (net_stack, pure C) this is all of net/; the DPDK
 * transport (dpdk/) runs the shards over it. The only file of net/ that
 * includes DPDK headers is port.c.
 */
#ifndef FINALDOT_NET_PORT_H
#define FINALDOT_NET_PORT_H

#include <sched.h>
#include <stdbool.h>
#include <stdint.h>

#include "net/net.h"

struct ctl_net_stats;
struct net_port_q;

struct net_port_info {
	uint16_t port;       /* the DPDK port id */
	unsigned nqueues;    /* queue pairs: one shard each */
	unsigned nlcores;
	uint8_t mac[6];
	unsigned tx_offload; /* NET_OFFLOAD_*, for net_config.tx_offload */
	bool rss;            /* the NIC spreads flows with our key */
	/* the rx checksum verdicts used: NET_RX_IPV4_CKSUM_GOOD and/or
	 * NET_RX_L4_CKSUM_GOOD (each only where --dpdk-offloads allows it
	 * and the port offers it); the other kinds are checked in software */
	unsigned rx_cksum;
	unsigned mbufs;      /* pool size */
};

/*
 * The EAL, from eal_args ("a b 'c d'": single and double quotes, no
 * escapes). helper_cpus: the CPUs this process had before the EAL pinned
 * it, minus the lcores (all of them when every CPU is an lcore), for the
 * threads that must not take a busy-polled core. 0 or -errno, logged.
 */
int net_port_init(const char *eal_args, cpu_set_t *helper_cpus);
/*
 * The first port: as many queue pairs as lcores, up to the port's; RSS on
 * IPv4/TCP with the symmetric key where the port has it; offloads
 * ("auto", "all", "ip", "l4", "none") where it advertises them; the mbuf
 * pool; a hand-off ring per queue. 0 or -errno, logged; on failure
 * net_port_close() still cleans up.
 */
int net_port_start(const char *offloads, struct net_port_info *info);

/* Queue pair i < info.nqueues, for shard i. Its frames go to st. */
struct net_port_q *net_port_q(unsigned i);
void net_port_q_bind(struct net_port_q *q, struct net_stack *st);

/*
 * One poll of q: an rx burst, each frame to its owner (this stack, another
 * shard's hand-off ring, every shard for ARP), then the frames other
 * shards handed over. Returns the frames taken; *full: the rx burst was
 * full (more is waiting).
 */
unsigned net_port_rx(struct net_port_q *q, bool *full);
/* net_tx_fn (ctx: the queue): one mbuf per frame, sent in bursts. */
int net_port_tx(void *ctx, const struct net_iov *iov, unsigned n,
		const struct net_tx_meta *meta);
/* Send what is queued (once per loop round: nothing is held back). */
void net_port_tx_flush(struct net_port_q *q);
bool net_port_tx_queued(const struct net_port_q *q);

struct net_port_q_stats {
	uint64_t tx_dropped;    /* the tx ring was full */
	uint64_t tx_bursts;     /* tx bursts handed to the PMD (on af_xdp
				 * each is a sendto() kick) */
	uint64_t rx_bursts;     /* rx polls that found frames */
	uint64_t handoff_out, handoff_in, handoff_full;
	uint64_t rx_multiseg_dropped;
};
const struct net_port_q_stats *net_port_q_stats(const struct net_port_q *q);

/* The port's own counters (rte_eth_stats), any thread. */
void net_port_stats(struct ctl_net_stats *out);

/* After the shards ended: let the PMDs reap their tx completions and log
 * the mbufs still in use against those at start (a leak check). */
void net_port_finish(void);
/* Rings, port, pool and EAL, whatever net_port_start() got to. */
void net_port_close(void);

#endif
