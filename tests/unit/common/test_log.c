/* fd_log_escape(): one safe log value from untrusted bytes. */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "finaldot/log.h"

TestSuite(log);

Test(log, plain_kept)
{
	char d[64];

	cr_assert_str_eq(fd_log_escape(d, sizeof(d), "user@example.org", 16),
			 "user@example.org");
}

Test(log, specials_escaped)
{
	char d[64];

	cr_assert_str_eq(fd_log_escape(d, sizeof(d), "a b=\"c\\", 7),
			 "a\\x20b\\x3d\\x22c\\x5c");
	cr_assert_str_eq(fd_log_escape(d, sizeof(d), "\r\n\0\xff", 4),
			 "\\x0d\\x0a\\x00\\xff");
}

Test(log, truncates_with_ellipsis)
{
	char d[12];
	const char *s = "abcdefghijklmnopqrstuvwxyz";

	fd_log_escape(d, sizeof(d), s, strlen(s));
	cr_assert_lt(strlen(d), sizeof(d));
	cr_assert_eq(strncmp(d, "abcdefg", 7), 0);
	cr_assert_str_eq(d + strlen(d) - 3, "...");
}

Test(log, empty_and_zero_size)
{
	char d[4] = "xyz";

	cr_assert_str_eq(fd_log_escape(d, sizeof(d), "", 0), "");
	fd_log_escape(d, 0, "abc", 3); /* must not write */
	cr_assert_eq(d[0], '\0');
}

/* Buffered mode: many threads, nothing lost, each thread's order kept,
 * and every line whole (never two lines spliced). */
#define LT_THREADS 8
#define LT_LINES 3000

static void *
log_thread(void *arg)
{
	long t = (long)arg;

	for (int i = 0; i < LT_LINES; i++)
		fd_log(FD_LOG_INFO, "test", "t=%ld seq=%d pad=%0*d", t, i,
		       (int)(t * 37 % 200), 0);
	return NULL;
}

Test(log, buffered_lines_all_written_in_thread_order)
{
	char path[] = "/tmp/fdlogtestXXXXXX";
	int fd = mkstemp(path);
	pthread_t th[LT_THREADS];
	int next[LT_THREADS] = {0};
	char line[2048];
	FILE *f;
	long total = 0;

	cr_assert_geq(fd, 0);
	close(fd);
	cr_assert_eq(fd_log_open_file(path), 0);
	cr_assert_eq(fd_log_start(), 0);
	for (long t = 0; t < LT_THREADS; t++)
		pthread_create(&th[t], NULL, log_thread, (void *)t);
	for (long t = 0; t < LT_THREADS; t++)
		pthread_join(th[t], NULL);
	fd_log_stop();
	f = fopen(path, "r");
	cr_assert_not_null(f);
	while (fgets(line, sizeof(line), f)) {
		long t;
		int seq;
		const char *p = strstr(line, " info test t=");
		cr_assert_not_null(p, "not a whole line: %s", line);
		cr_assert_eq(sscanf(p, " info test t=%ld seq=%d", &t, &seq), 2);
		cr_assert(t >= 0 && t < LT_THREADS);
		cr_assert_eq(seq, next[t], "thread %ld: line %d after %d", t,
			     seq, next[t]);
		next[t]++;
		total++;
	}
	fclose(f);
	unlink(path);
	cr_assert_eq(total, (long)LT_THREADS * LT_LINES, "%ld lines", total);
}

/* The time at the head of a line, in microseconds since the epoch, or -1
 * when the head is not YYYY-MM-DDTHH:MM:SS.uuuuuuZ. */
static long long
line_time_us(const char *line)
{
	struct tm tm;
	int us = -1, n = 0;

	memset(&tm, 0, sizeof(tm));
	if (sscanf(line, "%4d-%2d-%2dT%2d:%2d:%2d.%6dZ%n", &tm.tm_year,
		   &tm.tm_mon, &tm.tm_mday, &tm.tm_hour, &tm.tm_min,
		   &tm.tm_sec, &us, &n) != 7 || n != 27)
		return -1;
	tm.tm_year -= 1900;
	tm.tm_mon -= 1;
	return (long long)timegm(&tm) * 1000000 + us;
}

static long long
now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (long long)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* Each line carries its own time, to the microsecond, also on a thread
 * that logged in an earlier second (the date and time to the second are
 * made once a second per thread, not once a line). */
Test(log, each_line_its_own_time)
{
	char path[] = "/tmp/fdlogtimeXXXXXX";
	int fd = mkstemp(path);
	long long before[3], after[3];
	char line[256];
	FILE *f;
	int i = 0;

	cr_assert_geq(fd, 0);
	close(fd);
	cr_assert_eq(fd_log_open_file(path), 0);
	for (int k = 0; k < 3; k++) {
		before[k] = now_us();
		fd_log(FD_LOG_WARN, "clock", "k=%d", k);
		after[k] = now_us();
		if (k == 0) /* the next line in the next second */
			usleep((useconds_t)(1000000 - after[0] % 1000000 +
					    20000));
	}
	f = fopen(path, "r");
	cr_assert_not_null(f);
	while (fgets(line, sizeof(line), f) && i < 3) {
		long long t = line_time_us(line);
		char want[32];

		cr_assert_geq(t, 0, "no time at the head of: %s", line);
		cr_assert(t >= before[i] && t <= after[i],
			  "line %d at %lld us, logged within %lld..%lld: %s",
			  i, t, before[i], after[i], line);
		snprintf(want, sizeof(want), " warn clock k=%d\n", i);
		cr_assert_str_eq(line + 27, want);
		i++;
	}
	fclose(f);
	unlink(path);
	cr_assert_eq(i, 3, "%d lines", i);
}

/*
 * Once a line is in the file, so is every line logged before it, by any
 * thread. The writer looks at the rings one after another; here, just
 * before ring 1's turn, thread A logs a line into ring 0 (its turn has
 * passed) and then thread B one into ring 1. Written as soon as the pass
 * ends, B's line was in the file without A's (a test that waited for a
 * queue manager's line and then looked for a delivery thread's line
 * logged before it did not find it).
 */
#ifdef FINALDOT_FAULT_INJECTION
static struct {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	int step; /* 1: A logs, 2: B logs, 3: both did */
	bool warm[2];
	_Atomic bool armed;
	_Atomic int fired, bad, checked;
	char path[64];
} ho = {
	.mu = PTHREAD_MUTEX_INITIALIZER,
	.cv = PTHREAD_COND_INITIALIZER,
};

static bool
file_has(const char *path, const char *what)
{
	char buf[8192];
	FILE *f = fopen(path, "r");
	size_t n;

	if (!f)
		return false;
	n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = '\0';
	return strstr(buf, what) != NULL;
}

static void
order_hook(int what)
{
	if (what == 1 && atomic_exchange(&ho.armed, false)) {
		pthread_mutex_lock(&ho.mu);
		ho.step = 1;
		pthread_cond_broadcast(&ho.cv);
		while (ho.step != 3)
			pthread_cond_wait(&ho.cv, &ho.mu);
		pthread_mutex_unlock(&ho.mu);
		atomic_fetch_add(&ho.fired, 1);
	}
	if (what == -1 && atomic_load(&ho.fired)) {
		atomic_fetch_add(&ho.checked, 1);
		if (file_has(ho.path, "cause=B") && !file_has(ho.path, "cause=A"))
			atomic_fetch_add(&ho.bad, 1);
	}
}

static void *
order_thread(void *arg)
{
	long me = (long)arg; /* 0: A (ring 0), 1: B (ring 1) */

	fd_log(FD_LOG_INFO, "test", "warm=%ld", me);
	pthread_mutex_lock(&ho.mu);
	ho.warm[me] = true;
	pthread_cond_broadcast(&ho.cv);
	while (ho.step != me + 1)
		pthread_cond_wait(&ho.cv, &ho.mu);
	pthread_mutex_unlock(&ho.mu);
	fd_log(FD_LOG_INFO, "test", "cause=%s", me == 0 ? "A" : "B");
	pthread_mutex_lock(&ho.mu);
	ho.step = (int)me + 2;
	pthread_cond_broadcast(&ho.cv);
	pthread_mutex_unlock(&ho.mu);
	return NULL;
}

Test(log, a_written_line_comes_with_every_line_logged_before_it)
{
	pthread_t th[2];
	int fd;

	snprintf(ho.path, sizeof(ho.path), "/tmp/fdlogcauseXXXXXX");
	fd = mkstemp(ho.path);
	cr_assert_geq(fd, 0);
	close(fd);
	cr_assert_eq(fd_log_open_file(ho.path), 0);
	cr_assert_eq(fd_log_start(), 0);
	atomic_store(&fd_log_test_hook, order_hook);
	/* A's ring first (ring 0), then B's (ring 1): nobody else logs. */
	for (long t = 0; t < 2; t++) {
		pthread_create(&th[t], NULL, order_thread, (void *)t);
		pthread_mutex_lock(&ho.mu);
		while (!ho.warm[t])
			pthread_cond_wait(&ho.cv, &ho.mu);
		pthread_mutex_unlock(&ho.mu);
	}
	for (int i = 0; i < 500 && !file_has(ho.path, "warm=1"); i++)
		usleep(10000);
	cr_assert(file_has(ho.path, "warm=1"), "the writer wrote nothing");
	atomic_store(&ho.armed, true);
	for (long t = 0; t < 2; t++)
		pthread_join(th[t], NULL);
	for (int i = 0; i < 500 && !atomic_load(&ho.checked); i++)
		usleep(10000);
	fd_log_stop();
	atomic_store(&fd_log_test_hook, NULL);
	cr_assert_eq(atomic_load(&ho.fired), 1);
	cr_assert_gt(atomic_load(&ho.checked), 0, "no write after the hook");
	cr_assert_eq(atomic_load(&ho.bad), 0,
		     "B's line was written before A's, which was logged first");
	cr_assert(file_has(ho.path, "cause=A") && file_has(ho.path, "cause=B"));
	unlink(ho.path);
}
#else
Test(log, a_written_line_comes_with_every_line_logged_before_it)
{
	cr_skip_test("needs the test hook (-Dfault_injection=true)");
}
#endif
