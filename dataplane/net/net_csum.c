/*
 * Internet checksum (RFC 1071): the one's complement of the one's complement
 * sum of 16-bit big-endian words, and the TCP pseudo-header (RFC 9293 3.1).
 * Software only; the transmit path asks the port to compute it instead when
 * cfg.tx_offload says so (IP and L4 separately). Works on unaligned bytes.
 */
#include <string.h>

#include "net/net_priv.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
/* Little-endian hosts: sum the buffer as native 32-bit words into a 64-bit
 * accumulator (RFC 1071 2(B): the sum is byte-order independent), fold to
 * 16 bits, then swap the result into network order. */
uint32_t
net_csum_add(uint32_t sum, const void *buf, size_t n)
{
	const uint8_t *p = buf;
	uint64_t s = 0;
	uint32_t w;

	while (n >= 16) {
		uint64_t a, b;
		memcpy(&a, p, 8);
		memcpy(&b, p + 8, 8);
		s += (a & 0xffffffffu) + (a >> 32);
		s += (b & 0xffffffffu) + (b >> 32);
		p += 16;
		n -= 16;
	}
	while (n >= 4) {
		memcpy(&w, p, 4);
		s += w;
		p += 4;
		n -= 4;
	}
	if (n >= 2) {
		s += (uint32_t)p[0] | (uint32_t)p[1] << 8;
		p += 2;
		n -= 2;
	}
	if (n)
		s += p[0]; /* low byte in little-endian word order */
	while (s >> 16)
		s = (s & 0xffffu) + (s >> 16);
	s = ((s & 0xffu) << 8) | (s >> 8); /* to network order */
	s += sum;
	while (s >> 16)
		s = (s & 0xffffu) + (s >> 16);
	return (uint32_t)s;
}
#else
uint32_t
net_csum_add(uint32_t sum, const void *buf, size_t n)
{
	const uint8_t *p = buf;
	uint64_t s = sum;

	while (n >= 2) {
		s += ((uint32_t)p[0] << 8) | p[1];
		p += 2;
		n -= 2;
	}
	if (n)
		s += (uint32_t)p[0] << 8;
	while (s >> 16)
		s = (s & 0xffffu) + (s >> 16);
	return (uint32_t)s;
}
#endif

uint16_t
net_csum_fold(uint32_t sum)
{
	while (sum >> 16)
		sum = (sum & 0xffffu) + (sum >> 16);
	return (uint16_t)~sum;
}

uint32_t
net_csum_pseudo(uint32_t src, uint32_t dst, uint8_t proto, uint16_t len)
{
	uint32_t s = 0;

	s += src >> 16;
	s += src & 0xffffu;
	s += dst >> 16;
	s += dst & 0xffffu;
	s += proto;
	s += len;
	return s;
}
