/*
 * Hashes: SipHash-2-4 (keyed PRF for ISNs per RFC 6528, SYN cookies per
 * RFC 4987, timestamp offsets, table buckets) and the Toeplitz hash that
 * NICs use for RSS, with a symmetric key so both directions of a flow map to
 * the same shard (see net.h). Written from the published algorithms.
 */
#include <string.h>

#include "net/net_priv.h"

#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))

static uint64_t
le64(const uint8_t *p)
{
	uint64_t v = 0;
	for (int i = 7; i >= 0; i--)
		v = (v << 8) | p[i];
	return v;
}

#define SIPROUND                                                               \
	do {                                                                   \
		v0 += v1;                                                      \
		v1 = ROTL(v1, 13);                                             \
		v1 ^= v0;                                                      \
		v0 = ROTL(v0, 32);                                             \
		v2 += v3;                                                      \
		v3 = ROTL(v3, 16);                                             \
		v3 ^= v2;                                                      \
		v0 += v3;                                                      \
		v3 = ROTL(v3, 21);                                             \
		v3 ^= v0;                                                      \
		v2 += v1;                                                      \
		v1 = ROTL(v1, 17);                                             \
		v1 ^= v2;                                                      \
		v2 = ROTL(v2, 32);                                             \
	} while (0)

uint64_t
net_siphash(const uint8_t key[16], const void *buf, size_t n)
{
	const uint8_t *p = buf;
	uint64_t k0 = le64(key), k1 = le64(key + 8);
	uint64_t v0 = 0x736f6d6570736575ULL ^ k0;
	uint64_t v1 = 0x646f72616e646f6dULL ^ k1;
	uint64_t v2 = 0x6c7967656e657261ULL ^ k0;
	uint64_t v3 = 0x7465646279746573ULL ^ k1;
	uint64_t b = (uint64_t)n << 56, m;
	size_t left = n & 7;

	for (; n >= 8; n -= 8, p += 8) {
		m = le64(p);
		v3 ^= m;
		SIPROUND;
		SIPROUND;
		v0 ^= m;
	}
	for (size_t i = 0; i < left; i++)
		b |= (uint64_t)p[i] << (8 * i);
	v3 ^= b;
	SIPROUND;
	SIPROUND;
	v0 ^= b;
	v2 ^= 0xff;
	SIPROUND;
	SIPROUND;
	SIPROUND;
	SIPROUND;
	return v0 ^ v1 ^ v2 ^ v3;
}

/* 0x6d5a repeated: the symmetric RSS key (Woo & Park, "Scalable TCP Session
 * Monitoring with Symmetric Receive-side Scaling"). */
const uint8_t net_rss_key[NET_RSS_KEY_LEN] = {
	0x6d, 0x5a, 0x6d, 0x5a, 0x6d, 0x5a, 0x6d, 0x5a, 0x6d, 0x5a,
	0x6d, 0x5a, 0x6d, 0x5a, 0x6d, 0x5a, 0x6d, 0x5a, 0x6d, 0x5a,
	0x6d, 0x5a, 0x6d, 0x5a, 0x6d, 0x5a, 0x6d, 0x5a, 0x6d, 0x5a,
	0x6d, 0x5a, 0x6d, 0x5a, 0x6d, 0x5a, 0x6d, 0x5a, 0x6d, 0x5a,
};

/* Toeplitz (Microsoft RSS spec): for each input bit set, XOR in the 32-bit
 * window of the key starting at that bit. keylen >= n + 4. */
uint32_t
net_toeplitz(const uint8_t *key, size_t keylen, const uint8_t *in, size_t n)
{
	uint32_t hash = 0;
	uint32_t win;

	if (keylen < n + 4)
		return 0;
	win = net_rd32(key);
	for (size_t i = 0; i < n; i++) {
		for (unsigned b = 0; b < 8; b++) {
			if (in[i] & (0x80u >> b))
				hash ^= win;
			win <<= 1;
			if (key[i + 4] & (0x80u >> b))
				win |= 1;
		}
	}
	return hash;
}

uint32_t
net_flow_hash(uint32_t saddr, uint32_t daddr, uint16_t sport, uint16_t dport)
{
	uint8_t in[12];

	net_wr32(in, saddr);
	net_wr32(in + 4, daddr);
	net_wr16(in + 8, sport);
	net_wr16(in + 10, dport);
	return net_toeplitz(net_rss_key, sizeof(net_rss_key), in, sizeof(in));
}

unsigned
net_shard_of(uint32_t hash, unsigned n_shards)
{
	if (n_shards == 0)
		return 0;
	return (hash % 128u) % n_shards;
}

unsigned
net_reta_queue(unsigned entry, unsigned n_shards)
{
	return net_shard_of(entry, n_shards);
}
