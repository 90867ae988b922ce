/* fd_log_escape(): one safe log value from untrusted bytes. */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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
