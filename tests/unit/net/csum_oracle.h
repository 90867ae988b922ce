/*
 * The tests' own Internet checksum (RFC 1071), written plainly and kept
 * apart from dataplane/net/net_csum.c on purpose: frames the stack sends are
 * checked, and frames fed to it are built, with an independent oracle. Used
 * by the unit-test harness, the fuzz target and the micro-benchmark.
 */
#ifndef FINALDOT_TEST_CSUM_ORACLE_H
#define FINALDOT_TEST_CSUM_ORACLE_H

#include <stddef.h>
#include <stdint.h>

/* Add p[0..n) as big-endian 16-bit words (odd byte padded) to s. */
static inline uint32_t
sum16(uint32_t s, const uint8_t *p, size_t n)
{
	for (size_t i = 0; i + 1 < n; i += 2)
		s += (uint32_t)(p[i] << 8 | p[i + 1]);
	if (n & 1)
		s += (uint32_t)p[n - 1] << 8;
	return s;
}

/* Fold the carries and complement: the checksum field's value. */
static inline uint16_t
fold(uint32_t s)
{
	while (s >> 16)
		s = (s & 0xffff) + (s >> 16);
	return (uint16_t)~s;
}

#endif
