/* fd_log_escape(): one safe log value from untrusted bytes. */
#include <criterion/criterion.h>
#include <string.h>

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
