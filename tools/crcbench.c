/*
 * fd-crcbench: CRC-32C throughput of fd_crc32c() (the path the spool, the
 * tailer and the delivery threads use) and of the portable tables, per
 * buffer size, in GB/s; then the nanoseconds of one
 * spool_crc32c_combine() (the spool and the tailer join a message's CRC
 * from its records' with it) per length. A measuring instrument for
 * docs/bench.md, not a test: it prints figures and checks only that the
 * paths agree.
 *
 * Usage: fd-crcbench [MIB_PER_SIZE]   (default 256 MiB hashed per size)
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "finaldot/crc32c.h"
#include "finaldot/spool_format.h"

static double
now_s(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static double
rate(uint32_t (*fn)(uint32_t, const void *, size_t), const uint8_t *b,
     size_t n, size_t total, uint32_t *out)
{
	size_t reps = total / n ? total / n : 1;
	uint32_t c = 0;
	double t0 = now_s(), t;

	for (size_t r = 0; r < reps; r++)
		c = fn(c, b, n); /* chained: no call can be skipped */
	t = now_s() - t0;
	*out = c;
	return (double)(reps * n) / t / 1e9;
}

int
main(int argc, char **argv)
{
	static const size_t sizes[] = {256, 4096, 16384, 65536, 1u << 20};
	size_t total = (argc > 1 ? strtoul(argv[1], NULL, 10) : 256) << 20;
	uint8_t *b = malloc(1u << 20);
	unsigned seed = 1;

	if (!b || total == 0) {
		fprintf(stderr, "usage: fd-crcbench [MIB_PER_SIZE]\n");
		return 2;
	}
	for (size_t i = 0; i < (1u << 20); i++)
		b[i] = (uint8_t)rand_r(&seed);
	printf("%10s %14s %14s\n", "bytes", "fd_crc32c GB/s", "tables GB/s");
	for (size_t k = 0; k < sizeof(sizes) / sizeof(sizes[0]); k++) {
		uint32_t a, s;
		double ra = rate(fd_crc32c, b, sizes[k], total, &a);
		double rs = rate(fd_crc32c_sw, b, sizes[k], total / 8, &s);
		uint32_t one_a = fd_crc32c(0, b, sizes[k]);
		uint32_t one_s = fd_crc32c_sw(0, b, sizes[k]);

		if (one_a != one_s) {
			fprintf(stderr, "fd-crcbench: the paths disagree at %zu "
				"bytes: %08x != %08x\n", sizes[k], one_a, one_s);
			return 1;
		}
		printf("%10zu %14.2f %14.2f\n", sizes[k], ra, rs);
		(void)a;
		(void)s;
	}
	/* Lengths with few and with many bits set: one multiplication per
	 * set bit, and one more. */
	static const uint64_t lens[] = {4096, 4000, 65535, (1u << 20) - 1};
	printf("%10s %14s\n", "length", "combine ns");
	for (size_t k = 0; k < sizeof(lens) / sizeof(lens[0]); k++) {
		size_t reps = total >> 8;
		uint32_t c = 1;
		double t0 = now_s();
		for (size_t r = 0; r < reps; r++)
			c = spool_crc32c_combine(c, (uint32_t)r, lens[k]);
		printf("%10llu %14.1f\n", (unsigned long long)lens[k],
		       (now_s() - t0) * 1e9 / (double)reps);
		if (c == 0x5eed)
			printf("(chained)\n"); /* keeps c live */
	}
	free(b);
	return 0;
}
