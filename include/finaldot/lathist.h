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
 * The upper bound, in microseconds, of the bucket that holds the p-th
 * percentile of counts h[0..FD_LAT_BUCKETS] (what a reader of the
 * histogram can say: "p99 <= 2.5 ms"); 0 for an empty histogram, and
 * UINT64_MAX when it falls above the last bound.
 */
static inline uint64_t
fd_lat_percentile_us(const uint64_t h[FD_LAT_BUCKETS + 1], unsigned p)
{
	uint64_t n = 0, seen = 0;

	for (unsigned i = 0; i <= FD_LAT_BUCKETS; i++)
		n += h[i];
	if (n == 0)
		return 0;
	for (unsigned i = 0; i < FD_LAT_BUCKETS; i++) {
		seen += h[i];
		if (seen * 100 >= n * p)
			return fd_lat_bound_us(i);
	}
	return UINT64_MAX;
}

#endif
