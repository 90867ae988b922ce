/* CRC-32C: known vectors, software == hardware, incremental == one-shot. */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "finaldot/crc32c.h"

TestSuite(crc32c);

Test(crc32c, check_value)
{
	cr_assert_eq(fd_crc32c(0, "123456789", 9), 0xE3069283u);
	cr_assert_eq(fd_crc32c_sw(0, "123456789", 9), 0xE3069283u);
}

Test(crc32c, rfc3720_vectors)
{
	/* RFC 3720 B.4: 32 bytes of zeros, of ones, incrementing. */
	uint8_t b[32];

	memset(b, 0, sizeof(b));
	cr_assert_eq(fd_crc32c(0, b, 32), 0x8A9136AAu);
	memset(b, 0xff, sizeof(b));
	cr_assert_eq(fd_crc32c(0, b, 32), 0x62A8AB43u);
	for (int i = 0; i < 32; i++)
		b[i] = (uint8_t)i;
	cr_assert_eq(fd_crc32c(0, b, 32), 0x46DD794Eu);
	cr_assert_eq(fd_crc32c(0, b, 0), 0u);
}

Test(crc32c, sw_equals_hw_random)
{
	uint8_t *b = malloc(70000);
	unsigned seed = 12345;

	for (size_t i = 0; i < 70000; i++)
		b[i] = (uint8_t)rand_r(&seed);
	for (size_t off = 0; off < 9; off++)
		for (size_t n = 0; n < 300; n += 7)
			cr_assert_eq(fd_crc32c(0, b + off, n),
				     fd_crc32c_sw(0, b + off, n));
	cr_assert_eq(fd_crc32c(0, b, 70000), fd_crc32c_sw(0, b, 70000));
	free(b);
}

Test(crc32c, incremental_equals_oneshot)
{
	uint8_t b[1000];
	unsigned seed = 7;

	for (size_t i = 0; i < sizeof(b); i++)
		b[i] = (uint8_t)rand_r(&seed);
	uint32_t whole = fd_crc32c(0, b, sizeof(b));
	for (size_t cut = 0; cut <= sizeof(b); cut += 13) {
		uint32_t c = fd_crc32c(0, b, cut);
		c = fd_crc32c(c, b + cut, sizeof(b) - cut);
		cr_assert_eq(c, whole, "cut %zu", cut);
		uint32_t s = fd_crc32c_sw(fd_crc32c_sw(0, b, cut), b + cut,
					  sizeof(b) - cut);
		cr_assert_eq(s, whole);
	}
}

/* The fast path joins three lanes of 256 and of 4096 octets: lengths
 * around every block boundary, odd alignments and a running CRC in. */
Test(crc32c, lanes_equal_sw_around_block_sizes)
{
	static const size_t base[] = {768, 1536, 12288, 24576, 12288 + 768};
	uint8_t *b = malloc(40000);
	unsigned seed = 99;

	for (size_t i = 0; i < 40000; i++)
		b[i] = (uint8_t)rand_r(&seed);
	for (size_t k = 0; k < sizeof(base) / sizeof(base[0]); k++)
		for (size_t n = base[k] - 9; n <= base[k] + 9; n++)
			for (size_t off = 0; off < 3; off++) {
				uint32_t in = (uint32_t)rand_r(&seed);
				cr_assert_eq(fd_crc32c(in, b + off, n),
					     fd_crc32c_sw(in, b + off, n),
					     "n %zu off %zu", n, off);
			}
	for (size_t n = 0; n < 40000; n += 997)
		cr_assert_eq(fd_crc32c(0, b, n), fd_crc32c_sw(0, b, n),
			     "n %zu", n);
	free(b);
}
