/*
 * The DPDK port (port.h): EAL, queues, RSS, offloads, mbufs, and frames
 * between the port and the shards' stacks.
 *
 * Which shard owns a flow. net_flow_hash() is a Toeplitz hash with a
 * symmetric key (net.h). Where the port does RSS on IPv4/TCP we program the
 * same key and a round-robin redirection table, so the NIC puts a flow on
 * its owner's queue. Where it does not (tap, af_packet, virtio, fewer queues
 * than lcores, another RETA size), the receiving shard computes the owner
 * itself and hands the frame over on the owner's ring: correctness never
 * depends on the NIC (user-space stacks that trusted the NIC's RSS sent
 * replies to the wrong core). ARP frames go to every shard (each has its
 * own ARP cache).
 *
 * Checksums: the port's rx verdicts are used only when it reports GOOD; tx
 * offloads are used only when the port advertises them, and
 * --dpdk-offloads none|ip|l4|all narrows that further (some virtual ports
 * advertise offloads they do not perform, e.g. VMware and bonding ports).
 *
 * mbufs: one pool sized from the lcore count; each frame the stack sends is
 * copied out of its gather list into one mbuf. Nothing is shared between
 * queues but the pool (per-lcore caches) and the hand-off rings.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include <rte_common.h>
#include <rte_cycles.h>
#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_ethdev.h>
#include <rte_lcore.h>
#include <rte_malloc.h>
#include <rte_mbuf.h>
#include <rte_mempool.h>
#include <rte_ring.h>

#include "metrics.h" /* control/ */
#include "finaldot/log.h"
#include "finaldot/seam.h"
#include "net/port.h"

#define BURST 32
#define RX_DESC 1024
#define TX_DESC 1024
#define HANDOFF_RING 4096

struct net_port_q {
	unsigned id;
	uint16_t queue;
	struct net_stack *st;
	struct rte_ring *handoff; /* frames other queues received for us */
	struct rte_mbuf *tx[BURST];
	unsigned ntx;
	struct net_port_q_stats stats;
} __rte_cache_aligned;

static struct {
	bool eal;
	bool configured; /* rte_eth_dev_configure() done: close it */
	bool started;
	uint16_t port;
	unsigned nq;
	unsigned nlcores;
	struct net_port_q *q[RTE_MAX_LCORE];
	struct rte_mempool *pool;
	unsigned pool_n;
	unsigned in_use_start;
	unsigned rx_cksum; /* net_port_info.rx_cksum */
} g;

/* Split "a b 'c d'" into argv (single and double quotes, no escapes). */
static int
split_args(char *s, char **argv, int max)
{
	int argc = 0;

	while (*s) {
		while (*s == ' ' || *s == '\t')
			s++;
		if (!*s)
			break;
		if (argc >= max - 1)
			return -1;
		char q = (*s == '"' || *s == '\'') ? *s++ : 0;
		argv[argc++] = s;
		while (*s && (q ? *s != q : (*s != ' ' && *s != '\t')))
			s++;
		if (*s)
			*s++ = '\0';
	}
	argv[argc] = NULL;
	return argc;
}

int
net_port_init(const char *eal_args, cpu_set_t *helper_cpus)
{
	static char eal_buf[1024 + 16];
	char *argv[128];
	int argc;
	cpu_set_t all;

	snprintf(eal_buf, sizeof(eal_buf), "finaldot %s", eal_args);
	argc = split_args(eal_buf, argv, (int)(sizeof(argv) / sizeof(argv[0])));
	if (argc < 0) {
		fd_log(FD_LOG_ERR, "dpdk", "event=bad_eal_args");
		return -EINVAL;
	}
	/* The CPUs we may use, before EAL pins this thread to its lcore. */
	if (sched_getaffinity(0, sizeof(*helper_cpus), helper_cpus) != 0)
		CPU_ZERO(helper_cpus);
	if (rte_eal_init(argc, argv) < 0) {
		fd_log(FD_LOG_ERR, "dpdk", "event=eal_init_failed error=\"%s\"",
		       rte_strerror(rte_errno));
		return -EINVAL;
	}
	g.eal = true;
	/* The spool's helper threads (io-wq flush workers, the segment
	 * preparer) and the control plane go where no lcore busy-polls; if
	 * every CPU is an lcore, they may go anywhere we may. */
	all = *helper_cpus;
	for (unsigned lc = 0; lc < RTE_MAX_LCORE; lc++) {
		int cpu = rte_lcore_is_enabled(lc)
				  ? rte_lcore_to_cpu_id((int)lc)
				  : -1;
		if (cpu >= 0 && cpu < CPU_SETSIZE)
			CPU_CLR((size_t)cpu, helper_cpus);
	}
	if (CPU_COUNT(helper_cpus) == 0)
		*helper_cpus = all;
	return 0;
}

/*
 * Test builds: FINALDOT_PORT_FAULT=start (rte_eth_dev_start() fails) or
 * txq (the first tx queue's setup fails, after its rx queue took mbufs),
 * for the unwinding of a start that fails half-way.
 */
static int
port_fault(const char *what)
{
	return fd_seam("FINALDOT_PORT_FAULT", what) ? -EIO : 0;
}

static int
port_setup(const char *want, struct net_port_info *info)
{
	struct rte_eth_dev_info di;
	struct rte_eth_conf conf;
	uint8_t key[128];
	uint16_t nq;
	int r;

	r = rte_eth_dev_info_get(g.port, &di);
	if (r != 0)
		return r;
	unsigned maxq = di.max_rx_queues < di.max_tx_queues ? di.max_rx_queues
							    : di.max_tx_queues;
	nq = (uint16_t)(g.nlcores < maxq ? g.nlcores : maxq);
	if (nq == 0)
		return -ENODEV;
	info->nqueues = nq;
	memset(&conf, 0, sizeof(conf));
	if (nq > 1 && (di.flow_type_rss_offloads & RTE_ETH_RSS_NONFRAG_IPV4_TCP)) {
		/* The symmetric key, stretched to the port's key size: the
		 * repeated pattern gives the same hash at any length. */
		size_t klen = di.hash_key_size ? di.hash_key_size : 40;
		if (klen > sizeof(key))
			klen = sizeof(key);
		for (size_t i = 0; i < klen; i++)
			key[i] = net_rss_key[i % 2];
		conf.rxmode.mq_mode = RTE_ETH_MQ_RX_RSS;
		conf.rx_adv_conf.rss_conf.rss_key = key;
		conf.rx_adv_conf.rss_conf.rss_key_len = (uint8_t)klen;
		conf.rx_adv_conf.rss_conf.rss_hf = RTE_ETH_RSS_NONFRAG_IPV4_TCP;
		info->rss = true;
	}
	bool allow_ip = !strcmp(want, "auto") || !strcmp(want, "all") ||
			!strcmp(want, "ip");
	bool allow_l4 = !strcmp(want, "auto") || !strcmp(want, "all") ||
			!strcmp(want, "l4");
	if (allow_ip && (di.tx_offload_capa & RTE_ETH_TX_OFFLOAD_IPV4_CKSUM)) {
		conf.txmode.offloads |= RTE_ETH_TX_OFFLOAD_IPV4_CKSUM;
		info->tx_offload |= NET_OFFLOAD_IPV4_CKSUM;
	}
	if (allow_l4 && (di.tx_offload_capa & RTE_ETH_TX_OFFLOAD_TCP_CKSUM)) {
		conf.txmode.offloads |= RTE_ETH_TX_OFFLOAD_TCP_CKSUM;
		info->tx_offload |= NET_OFFLOAD_L4_CKSUM;
	}
	/* A port told to leave a checksum kind alone may get it wrong on
	 * receive too: its verdicts on that kind are not used. */
	if (allow_ip && (di.rx_offload_capa & RTE_ETH_RX_OFFLOAD_IPV4_CKSUM)) {
		conf.rxmode.offloads |= RTE_ETH_RX_OFFLOAD_IPV4_CKSUM;
		info->rx_cksum |= NET_RX_IPV4_CKSUM_GOOD;
	}
	if (allow_l4 && (di.rx_offload_capa & RTE_ETH_RX_OFFLOAD_TCP_CKSUM)) {
		conf.rxmode.offloads |= RTE_ETH_RX_OFFLOAD_TCP_CKSUM;
		info->rx_cksum |= NET_RX_L4_CKSUM_GOOD;
	}
	r = rte_eth_dev_configure(g.port, nq, nq, &conf);
	if (r != 0)
		return r;
	g.configured = true;
	for (uint16_t q = 0; q < nq; q++) {
		int sock = rte_eth_dev_socket_id(g.port);
		r = rte_eth_rx_queue_setup(g.port, q, RX_DESC,
					   (unsigned)(sock < 0 ? 0 : sock),
					   NULL, g.pool);
		if (r == 0)
			r = port_fault("txq");
		if (r == 0)
			r = rte_eth_tx_queue_setup(
				g.port, q, TX_DESC,
				(unsigned)(sock < 0 ? 0 : sock), NULL);
		if (r != 0)
			return r;
	}
	r = port_fault("start");
	if (r == 0)
		r = rte_eth_dev_start(g.port);
	if (r != 0)
		return r;
	g.started = true;
	if (info->rss && di.reta_size > 0) {
		struct rte_eth_rss_reta_entry64 reta[512 / RTE_ETH_RETA_GROUP_SIZE];
		unsigned sz = RTE_MIN(di.reta_size, 512u);
		memset(reta, 0, sizeof(reta));
		for (unsigned i = 0; i < sz; i++) {
			reta[i / RTE_ETH_RETA_GROUP_SIZE].mask |=
				1ULL << (i % RTE_ETH_RETA_GROUP_SIZE);
			reta[i / RTE_ETH_RETA_GROUP_SIZE]
				.reta[i % RTE_ETH_RETA_GROUP_SIZE] =
				(uint16_t)net_reta_queue(i, nq);
		}
		if (rte_eth_dev_rss_reta_update(g.port, reta,
						(uint16_t)sz) != 0)
			fd_log(FD_LOG_WARN, "dpdk", "event=reta_update_failed "
			       "note=software_dispatch_only");
	}
	rte_eth_promiscuous_enable(g.port);
	return 0;
}

int
net_port_start(const char *offloads, struct net_port_info *info)
{
	struct rte_ether_addr mac;
	int r;

	memset(info, 0, sizeof(*info));
	if (rte_eth_dev_count_avail() == 0) {
		fd_log(FD_LOG_ERR, "dpdk", "event=no_port hint=\"give a PCI "
		       "device or --vdev=net_tap0,iface=NAME in --dpdk-eal\"");
		return -ENODEV;
	}
	g.port = rte_eth_find_next(0); /* the first port the EAL probed */
	g.nlcores = rte_lcore_count();
	/* rx descriptors + tx descriptors + bursts in flight, per lcore. */
	g.pool_n = g.nlcores * (RX_DESC + TX_DESC + 4 * BURST + 2048) + 1024;
	g.pool = rte_pktmbuf_pool_create("fd_mbuf", g.pool_n, 256, 0,
					 RTE_MBUF_DEFAULT_BUF_SIZE,
					 (int)rte_socket_id());
	if (!g.pool) {
		fd_log(FD_LOG_ERR, "dpdk", "event=mbuf_pool_failed n=%u "
		       "error=\"%s\"", g.pool_n, rte_strerror(rte_errno));
		return -ENOMEM;
	}
	r = port_setup(offloads, info);
	if (r != 0) {
		fd_log(FD_LOG_ERR, "dpdk", "event=port_setup_failed port=%u "
		       "error=\"%s\"", g.port, strerror(-r));
		return r;
	}
	g.rx_cksum = info->rx_cksum;
	rte_eth_macaddr_get(g.port, &mac);
	memcpy(info->mac, mac.addr_bytes, 6);
	info->port = g.port;
	info->nlcores = g.nlcores;
	info->mbufs = g.pool_n;
	/* In use now: what the rx rings took. The same figure at the end
	 * means no mbuf leaked (a PMD may keep its rings' mbufs at close). */
	g.in_use_start = g.pool_n - rte_mempool_avail_count(g.pool);
	if (info->nqueues < g.nlcores)
		fd_log(FD_LOG_WARN, "dpdk", "event=fewer_queues_than_lcores "
		       "queues=%u lcores=%u note=\"extra lcores idle\"",
		       info->nqueues, g.nlcores);
	for (unsigned i = 0; i < info->nqueues; i++) {
		struct net_port_q *q = rte_zmalloc_socket(
			"net_port_q", sizeof(*q), RTE_CACHE_LINE_SIZE,
			(int)rte_socket_id());
		char rname[32];
		if (!q)
			return -ENOMEM;
		g.q[i] = q;
		g.nq = i + 1;
		q->id = i;
		q->queue = (uint16_t)i;
		snprintf(rname, sizeof(rname), "fd_handoff%u", i);
		q->handoff = rte_ring_create(rname, HANDOFF_RING,
					     (int)rte_socket_id(),
					     RING_F_SC_DEQ);
		if (!q->handoff)
			return -ENOMEM;
	}
	return 0;
}

struct net_port_q *
net_port_q(unsigned i)
{
	return i < g.nq ? g.q[i] : NULL;
}

void
net_port_q_bind(struct net_port_q *q, struct net_stack *st)
{
	q->st = st;
}

/* ---- transmit ------------------------------------------------------------ */

void
net_port_tx_flush(struct net_port_q *q)
{
	uint16_t sent;

	if (q->ntx == 0)
		return;
	sent = rte_eth_tx_burst(g.port, q->queue, q->tx, (uint16_t)q->ntx);
	q->stats.tx_bursts++;
	for (unsigned i = sent; i < q->ntx; i++) {
		rte_pktmbuf_free(q->tx[i]);
		q->stats.tx_dropped++; /* TCP recovers by retransmission */
	}
	q->ntx = 0;
}

bool
net_port_tx_queued(const struct net_port_q *q)
{
	return q->ntx != 0;
}

int
net_port_tx(void *ctx, const struct net_iov *iov, unsigned n,
	    const struct net_tx_meta *meta)
{
	struct net_port_q *q = ctx;
	struct rte_mbuf *m;
	size_t total = 0;
	char *p;

	for (unsigned i = 0; i < n; i++)
		total += iov[i].len;
	m = rte_pktmbuf_alloc(g.pool);
	if (!m)
		return -ENOBUFS;
	if (total > rte_pktmbuf_tailroom(m) ||
	    !(p = rte_pktmbuf_append(m, (uint16_t)total))) {
		rte_pktmbuf_free(m);
		return -EMSGSIZE;
	}
	for (unsigned i = 0; i < n; i++) {
		memcpy(p, iov[i].base, iov[i].len);
		p += iov[i].len;
	}
	if (meta && meta->flags) {
		m->tx_offload = rte_mbuf_tx_offload(meta->l2_len, meta->l3_len,
						    meta->l4_len, 0, 0, 0, 0);
		m->ol_flags |= RTE_MBUF_F_TX_IPV4;
		if (meta->flags & NET_OFFLOAD_IPV4_CKSUM)
			m->ol_flags |= RTE_MBUF_F_TX_IP_CKSUM;
		if (meta->flags & NET_OFFLOAD_L4_CKSUM)
			m->ol_flags |= RTE_MBUF_F_TX_TCP_CKSUM;
	}
	q->tx[q->ntx++] = m;
	if (q->ntx == BURST)
		net_port_tx_flush(q);
	return 0;
}

/* ---- receive and hand-off ------------------------------------------------ */

/* Owner queue of a frame: >= 0 a queue, -1 every queue (ARP), -2 this one. */
static int
frame_owner(const uint8_t *f, size_t len)
{
	uint16_t type;
	size_t ihl;

	if (len < 14)
		return -2;
	type = (uint16_t)(f[12] << 8 | f[13]);
	if (type == 0x0806)
		return -1;
	if (type != 0x0800 || len < 14 + 20)
		return -2;
	ihl = (size_t)(f[14] & 0x0f) * 4;
	if (f[14 + 9] != 6 || len < 14 + ihl + 4)
		return -2;
	const uint8_t *ip = f + 14, *th = ip + ihl;
	uint32_t sa = (uint32_t)ip[12] << 24 | (uint32_t)ip[13] << 16 |
		      (uint32_t)ip[14] << 8 | ip[15];
	uint32_t da = (uint32_t)ip[16] << 24 | (uint32_t)ip[17] << 16 |
		      (uint32_t)ip[18] << 8 | ip[19];
	uint16_t sp = (uint16_t)(th[0] << 8 | th[1]);
	uint16_t dp = (uint16_t)(th[2] << 8 | th[3]);
	return (int)net_shard_of(net_flow_hash(sa, da, sp, dp), g.nq);
}

static void
q_input(struct net_port_q *q, struct rte_mbuf *m)
{
	unsigned fl = 0;

	if (g.rx_cksum) {
		if ((m->ol_flags & RTE_MBUF_F_RX_IP_CKSUM_MASK) ==
		    RTE_MBUF_F_RX_IP_CKSUM_GOOD)
			fl |= NET_RX_IPV4_CKSUM_GOOD;
		if ((m->ol_flags & RTE_MBUF_F_RX_L4_CKSUM_MASK) ==
		    RTE_MBUF_F_RX_L4_CKSUM_GOOD)
			fl |= NET_RX_L4_CKSUM_GOOD;
		fl &= g.rx_cksum;
	}
	net_stack_input(q->st, rte_pktmbuf_mtod(m, const uint8_t *),
			rte_pktmbuf_data_len(m), fl);
	rte_pktmbuf_free(m);
}

static void
q_rx(struct net_port_q *q, struct rte_mbuf *m)
{
	int owner;

	if (m->nb_segs > 1 && rte_pktmbuf_linearize(m) != 0) {
		q->stats.rx_multiseg_dropped++;
		rte_pktmbuf_free(m);
		return;
	}
	if (g.nq == 1) {
		q_input(q, m);
		return;
	}
	owner = frame_owner(rte_pktmbuf_mtod(m, const uint8_t *),
			    rte_pktmbuf_data_len(m));
	if (owner == -1) {
		/* Every queue reads the same frame: one reference each. */
		rte_mbuf_refcnt_update(m, (int16_t)(g.nq - 1));
		for (unsigned i = 0; i < g.nq; i++) {
			if (i == q->id)
				continue;
			if (rte_ring_enqueue(g.q[i]->handoff, m) != 0) {
				q->stats.handoff_full++;
				rte_pktmbuf_free(m);
			}
		}
		q_input(q, m);
		return;
	}
	if (owner >= 0 && (unsigned)owner != q->id) {
		if (rte_ring_enqueue(g.q[owner]->handoff, m) != 0) {
			q->stats.handoff_full++;
			rte_pktmbuf_free(m);
		} else {
			q->stats.handoff_out++;
		}
		return;
	}
	q_input(q, m);
}

unsigned
net_port_rx(struct net_port_q *q, bool *full)
{
	struct rte_mbuf *pkts[BURST];
	uint16_t n = rte_eth_rx_burst(g.port, q->queue, pkts, BURST);
	unsigned h;

	q->stats.rx_bursts += n != 0;
	for (uint16_t i = 0; i < n; i++)
		q_rx(q, pkts[i]);
	h = rte_ring_dequeue_burst(q->handoff, (void **)pkts, BURST, NULL);
	q->stats.handoff_in += h;
	for (unsigned i = 0; i < h; i++)
		q_input(q, pkts[i]);
	*full = n == BURST;
	return n + h;
}

const struct net_port_q_stats *
net_port_q_stats(const struct net_port_q *q)
{
	return &q->stats;
}

void
net_port_stats(struct ctl_net_stats *out)
{
	struct rte_eth_stats st;

	if (rte_eth_stats_get(g.port, &st) == 0) {
		out->rx_packets = st.ipackets;
		out->tx_packets = st.opackets;
		out->rx_bytes = st.ibytes;
		out->tx_bytes = st.obytes;
		out->rx_missed = st.imissed;
		out->rx_errors = st.ierrors;
		out->tx_errors = st.oerrors;
		out->rx_nombuf = st.rx_nombuf;
	}
}

/* ---- the end ------------------------------------------------------------- */

void
net_port_finish(void)
{
	unsigned in_use_end;

	if (!g.started)
		return;
	/* Let the PMDs reap their tx completions (af_xdp does it lazily,
	 * inside a tx burst) so the count below sees every mbuf we sent. */
	for (int round = 0; round < 3; round++) {
		for (uint16_t q = 0; q < g.nq; q++) {
			rte_eth_tx_done_cleanup(g.port, q, 0);
			rte_eth_tx_burst(g.port, q, NULL, 0);
		}
		rte_delay_us_block(1000);
	}
	in_use_end = g.pool_n - rte_mempool_avail_count(g.pool);
	fd_log(FD_LOG_INFO, "dpdk",
	       "event=mbufs pool=%u in_use_start=%u in_use_end=%u leaked=%u",
	       g.pool_n, g.in_use_start, in_use_end,
	       in_use_end > g.in_use_start ? in_use_end - g.in_use_start : 0);
}

void
net_port_close(void)
{
	for (unsigned i = 0; i < g.nq; i++) {
		struct net_port_q *q = g.q[i];
		struct rte_mbuf *m;
		if (!q)
			continue;
		while (q->handoff && rte_ring_dequeue(q->handoff, (void **)&m) == 0)
			rte_pktmbuf_free(m);
		rte_ring_free(q->handoff);
		rte_free(q);
		g.q[i] = NULL;
	}
	g.nq = 0;
	/* The device before the pool, started or not: its rx queues hold
	 * mbufs from their setup on, and closing it gives them back. A pool
	 * freed first leaves them to rte_eal_cleanup(), whose port release
	 * frees them into freed memory. */
	if (g.configured) {
		if (g.started)
			rte_eth_dev_stop(g.port);
		rte_eth_dev_close(g.port);
	}
	g.configured = g.started = false;
	if (g.pool) {
		/* 0 unless a PMD kept mbufs past its close. */
		fd_log(FD_LOG_INFO, "dpdk", "event=mbufs_after_close in_use=%u",
		       g.pool_n - rte_mempool_avail_count(g.pool));
		rte_mempool_free(g.pool);
		g.pool = NULL;
	}
	if (g.eal)
		rte_eal_cleanup();
	g.eal = false;
}
