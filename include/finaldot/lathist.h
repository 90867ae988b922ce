/*
 * Latency histograms: one set of buckets for every latency finaldot
 * counts (final dot to 250, a spool flush, a delivery), so that their
 * metrics line up. Upper bounds in microseconds, 50 us to 10 s; one more
 * bucket counts what is above the last bound.
 */
#ifndef FINALDOT_LATHIST_H
#define FINALDOT_LATHIST_H

#include <stdint.h>

#define FD_LAT_BUCKETS 17

/* The mean in microseconds of n latencies that sum to sum_ns (0 for none). */
static inline uint64_t
fd_lat_mean_us(uint64_t sum_ns, uint64_t n)
{
	return n ? sum_ns / 1000u / n : 0;
}

static inline uint64_t
fd_lat_bound_us(unsigned i)
{
	static const uint64_t b[FD_LAT_BUCKETS] = {
		50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000,
		100000, 250000, 500000, 1000000, 2500000, 5000000, 10000000};
	return b[i];
}

/* The bucket of a latency in nanoseconds: 0..FD_LAT_BUCKETS. */
static inline unsigned
fd_lat_bucket(uint64_t ns)
{
	unsigned i = 0;

	while (i < FD_LAT_BUCKETS && ns > fd_lat_bound_us(i) * 1000)
		i++;
	return i;
}

/*
 * Fine histograms, for the percentiles the logs print: quarter octaves of
 * microseconds. Bucket 4e+f holds x = us + 1 in [(4+f) << (e-2),
 * (5+f) << (e-2)) (a bucket is at most a quarter wider than its lower
 * bound); 0, 1 and 2 us have their own; the last bucket takes everything
 * from about 2^23 us (8 s) up.
 */
#define FD_QLAT_BUCKETS 96

static inline unsigned
fd_qlat_bucket(uint64_t us)
{
	uint64_t x = us + 1;
	unsigned e = 63u - (unsigned)__builtin_clzll(x), b;

	if (e < 2)
		b = (unsigned)x - 1; /* 0, 1, 2 */
	else
		b = e * 4 + (unsigned)((x >> (e - 2)) & 3);
	return b < FD_QLAT_BUCKETS ? b : FD_QLAT_BUCKETS - 1;
}

/* The largest value in microseconds that bucket b holds. */
static inline uint64_t
fd_qlat_upper_us(unsigned b)
{
	unsigned e = b / 4, f = b % 4;

	if (b < 3)
		return b;
	if (b < 8)
		return 2; /* not used: x < 4 takes buckets 0..2 */
	return ((uint64_t)(5 + f) << (e - 2)) - 2;
}

/* The p-th percentile (0..100) of h[0..FD_QLAT_BUCKETS), as the upper
 * bound of the bucket that holds it; 0 for an empty histogram. */
static inline uint64_t
fd_qlat_percentile_us(const uint64_t h[FD_QLAT_BUCKETS], unsigned p)
{
	uint64_t total = 0, seen = 0;

	for (unsigned b = 0; b < FD_QLAT_BUCKETS; b++)
		total += h[b];
	if (total == 0)
		return 0;
	for (unsigned b = 0; b < FD_QLAT_BUCKETS; b++) {
		seen += h[b];
		if (seen * 100 >= total * p)
			return fd_qlat_upper_us(b);
	}
	return fd_qlat_upper_us(FD_QLAT_BUCKETS - 1);
}

#endif
