/*
 * CRC-32C: hardware (SSE4.2 crc32 instruction) when available, otherwise
 * slicing-by-8 over tables built on first use. The running value is kept
 * un-inverted between calls: fd_crc32c(fd_crc32c(0, a), b) == crc of a||b.
 */
#include <pthread.h>
#include <stdbool.h>
#include <string.h>

#include "finaldot/crc32c.h"

#define POLY 0x82F63B78u

static uint32_t table[8][256];
static bool table_ready;

static void
table_init(void)
{
	for (uint32_t i = 0; i < 256; i++) {
		uint32_t c = i;
		for (int k = 0; k < 8; k++)
			c = (c & 1) ? (c >> 1) ^ POLY : c >> 1;
		table[0][i] = c;
	}
	for (uint32_t i = 0; i < 256; i++)
		for (int t = 1; t < 8; t++)
			table[t][i] = (table[t - 1][i] >> 8) ^
				      table[0][table[t - 1][i] & 0xff];
	table_ready = true;
}

uint32_t
fd_crc32c_sw(uint32_t crc, const void *p, size_t n)
{
	const uint8_t *b = p;

	if (!table_ready)
		table_init();
	crc = ~crc;
	while (n >= 8) {
		uint64_t w;
		memcpy(&w, b, 8);
		w ^= crc; /* little-endian hosts (x86-64, arm64) */
		crc = table[7][w & 0xff] ^ table[6][(w >> 8) & 0xff] ^
		      table[5][(w >> 16) & 0xff] ^ table[4][(w >> 24) & 0xff] ^
		      table[3][(w >> 32) & 0xff] ^ table[2][(w >> 40) & 0xff] ^
		      table[1][(w >> 48) & 0xff] ^ table[0][w >> 56];
		b += 8;
		n -= 8;
	}
	while (n--)
		crc = (crc >> 8) ^ table[0][(crc ^ *b++) & 0xff];
	return ~crc;
}

#if defined(__x86_64__)
/*
 * The crc32 instruction has a latency of three cycles and a throughput of
 * one, so a single chain of it runs at a third of the speed the unit can
 * give (perf at 1 MiB messages: 12% of a worker's CPU was this loop). Three
 * independent chains over three adjacent lanes of a block keep it busy;
 * the lanes are then joined. The register update is linear over GF(2):
 * feeding bytes D from state s gives (D fed from 0) xor (as many zero bytes
 * fed from s), so lane results join as
 *   state = shift(shift(a) ^ b) ^ c
 * where shift(s) is s after LANE zero bytes, a linear map on 32 bits, kept
 * as four 256-entry tables (one per byte of s) built with the instruction
 * itself from the 32 unit states.
 */
#define LANE_BIG 4096u
#define LANE_SMALL 256u

struct crc_shift {
	uint32_t t[4][256];
};

static struct crc_shift shift_big, shift_small;
static pthread_once_t shift_once = PTHREAD_ONCE_INIT;

__attribute__((target("sse4.2"))) static void
shift_build(struct crc_shift *sh, size_t lane)
{
	uint32_t unit[32];

	for (unsigned b = 0; b < 32; b++) {
		uint64_t c = 1u << b;
		for (size_t k = 0; k < lane / 8; k++)
			c = __builtin_ia32_crc32di(c, 0);
		unit[b] = (uint32_t)c;
	}
	for (unsigned i = 0; i < 4; i++)
		for (unsigned v = 0; v < 256; v++) {
			uint32_t t = 0;
			for (unsigned bit = 0; bit < 8; bit++)
				if (v & (1u << bit))
					t ^= unit[8 * i + bit];
			sh->t[i][v] = t;
		}
}

static void
shift_init(void)
{
	shift_build(&shift_big, LANE_BIG);
	shift_build(&shift_small, LANE_SMALL);
}

static inline uint64_t
shift(const struct crc_shift *sh, uint64_t s)
{
	return sh->t[0][s & 0xff] ^ sh->t[1][(s >> 8) & 0xff] ^
	       sh->t[2][(s >> 16) & 0xff] ^ sh->t[3][(s >> 24) & 0xff];
}

/* Whole blocks of three lanes from state c; *bp and *np advanced. */
__attribute__((target("sse4.2"))) static inline uint64_t
crc32c_lanes(uint64_t c, const uint8_t **bp, size_t *np, size_t lane,
	     const struct crc_shift *sh)
{
	const uint8_t *b = *bp;
	size_t n = *np;

	while (n >= 3 * lane) {
		uint64_t c0 = c, c1 = 0, c2 = 0;
		for (size_t k = 0; k < lane; k += 8) {
			uint64_t w0, w1, w2;
			memcpy(&w0, b + k, 8);
			memcpy(&w1, b + lane + k, 8);
			memcpy(&w2, b + 2 * lane + k, 8);
			c0 = __builtin_ia32_crc32di(c0, w0);
			c1 = __builtin_ia32_crc32di(c1, w1);
			c2 = __builtin_ia32_crc32di(c2, w2);
		}
		c = shift(sh, shift(sh, c0) ^ c1) ^ c2;
		b += 3 * lane;
		n -= 3 * lane;
	}
	*bp = b;
	*np = n;
	return c;
}

__attribute__((target("sse4.2"))) static uint32_t
crc32c_hw(uint32_t crc, const void *p, size_t n)
{
	const uint8_t *b = p;
	uint64_t c = ~crc;

	if (n >= 3 * LANE_SMALL) {
		pthread_once(&shift_once, shift_init);
		c = crc32c_lanes(c, &b, &n, LANE_BIG, &shift_big);
		c = crc32c_lanes(c, &b, &n, LANE_SMALL, &shift_small);
	}
	while (n >= 8) {
		uint64_t w;
		memcpy(&w, b, 8);
		c = __builtin_ia32_crc32di(c, w);
		b += 8;
		n -= 8;
	}
	uint32_t c32 = (uint32_t)c;
	while (n--)
		c32 = __builtin_ia32_crc32qi(c32, *b++);
	return ~c32;
}
#endif

uint32_t
fd_crc32c(uint32_t crc, const void *p, size_t n)
{
#if defined(__x86_64__)
	static int hw = -1;
	if (hw < 0)
		hw = __builtin_cpu_supports("sse4.2") ? 1 : 0;
	if (hw)
		return crc32c_hw(crc, p, n);
#endif
	return fd_crc32c_sw(crc, p, n);
}
