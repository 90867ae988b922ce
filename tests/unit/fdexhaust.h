/*
 * Out of descriptors on purpose (EMFILE): a unit test lowers the soft
 * RLIMIT_NOFILE and takes every descriptor left, sees what its server
 * thread does, then gives them back. Also the CPU the process used over a
 * stretch (a thread spinning on an error shows there). Header-only: each
 * test includes it as "../fdexhaust.h".
 */
#ifndef FINALDOT_TESTS_UNIT_FDEXHAUST_H
#define FINALDOT_TESTS_UNIT_FDEXHAUST_H

#include <criterion/criterion.h>
#include <errno.h>
#include <sys/resource.h>
#include <unistd.h>

struct fd_exhaust {
	struct rlimit old;
	int fill[256];
	int n;
};

/* Every descriptor below 128 taken: the next open fails with EMFILE. */
static inline void
fd_exhaust_begin(struct fd_exhaust *x)
{
	struct rlimit rl;

	cr_assert_eq(getrlimit(RLIMIT_NOFILE, &x->old), 0);
	rl = x->old;
	rl.rlim_cur = 128;
	cr_assert_eq(setrlimit(RLIMIT_NOFILE, &rl), 0);
	x->n = 0;
	while (x->n < 256 && (x->fill[x->n] = dup(0)) >= 0)
		x->n++;
	cr_assert_eq(errno, EMFILE);
}

static inline void
fd_exhaust_end(struct fd_exhaust *x)
{
	for (int i = 0; i < x->n; i++)
		close(x->fill[i]);
	cr_assert_eq(setrlimit(RLIMIT_NOFILE, &x->old), 0);
}

/* CPU seconds (user + system) the whole process used over us. */
static inline double
fd_cpu_over(unsigned us)
{
	struct rusage a, b;

	getrusage(RUSAGE_SELF, &a);
	usleep(us);
	getrusage(RUSAGE_SELF, &b);
	return (double)(b.ru_utime.tv_sec - a.ru_utime.tv_sec) +
	       (double)(b.ru_stime.tv_sec - a.ru_stime.tv_sec) +
	       ((double)(b.ru_utime.tv_usec - a.ru_utime.tv_usec) +
		(double)(b.ru_stime.tv_usec - a.ru_stime.tv_usec)) / 1e6;
}

#endif
