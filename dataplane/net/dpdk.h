/*
 * The DPDK transport: EAL and port set-up, one shard per lcore (its own rx/tx
 * queue pair, TCP/IP stack, SMTP sessions and spool), and the lcore loop
 * (rx burst -> stack -> SMTP -> spool batches -> tx burst). This is the only
 * part of finaldot that includes DPDK headers.
 */
#ifndef FINALDOT_NET_DPDK_H
#define FINALDOT_NET_DPDK_H

#include <stdint.h>

struct fd_config;

/*
 * Run finaldot on DPDK until SIGTERM/SIGINT. cfg->dpdk_eal holds the EAL
 * arguments, cfg->dpdk_ip ADDR/PREFIX, cfg->dpdk_gateway the next hop;
 * the TCP ports come from cfg->listen. seed_msgid[i]: the largest message
 * id recovery found for worker i (256 entries). Returns 0 on a clean stop.
 */
struct cplane;
/* cp: the control plane, started here on the non-polled CPUs, stopped
 * after the shards (NULL: none). */
int net_dpdk_main(const struct fd_config *cfg, const uint64_t *seed_msgid,
		  struct cplane *cp);

#endif
