/*
 * The DPDK transport: one shard per lcore (its queue pair of the port,
 * net_stack, SMTP sessions and spool), the lcore loop, and the glue between
 * the stack's TCP upcalls and the connection layer (conn/conn.h). The port
 * and the stack are net/'s.
 */
#ifndef FINALDOT_DPDK_H
#define FINALDOT_DPDK_H

#include <stdint.h>

struct cplane;
struct fd_config;

/*
 * Run finaldot on DPDK until SIGTERM/SIGINT. cfg->dpdk_eal holds the EAL
 * arguments, cfg->dpdk_ip ADDR/PREFIX, cfg->dpdk_gateway the next hop;
 * the TCP ports come from cfg->listen. seed_msgid[i]: the largest message
 * id recovery found for worker i (256 entries). cp: the control plane,
 * started here on the non-polled CPUs, stopped after the shards (NULL:
 * none). reload: what SIGHUP does (run on a thread of its own, one at a
 * time, never on a polled core). Returns 0 on a clean stop.
 */
int dpdk_transport_main(const struct fd_config *cfg, const uint64_t *seed_msgid,
			struct cplane *cp, void (*reload)(void));

#endif
