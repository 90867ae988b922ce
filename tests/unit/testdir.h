/*
 * A scratch directory for a unit test, and its removal with everything in
 * it (files a test made read-only too). Header-only: each test includes it
 * as "../testdir.h".
 */
#ifndef FINALDOT_TESTS_UNIT_TESTDIR_H
#define FINALDOT_TESTS_UNIT_TESTDIR_H

#include <criterion/criterion.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>

/* buf (at least 64 octets) := a new directory PARENT/fdNAME.XXXXXX.
 * PARENT: /var/tmp where the test writes with O_DIRECT (tmpfs refuses
 * it), /tmp otherwise. */
static inline void
fd_test_dir_make(char *buf, size_t len, const char *parent, const char *name)
{
	int n = snprintf(buf, len, "%s/fd%s.XXXXXX", parent, name);

	cr_assert(n > 0 && (size_t)n < len, "test dir name too long");
	cr_assert_not_null(mkdtemp(buf), "mkdtemp %s", buf);
}

static inline int
fd_test_rm_one(const char *p, const struct stat *st, int flag,
	       struct FTW *f)
{
	(void)st;
	(void)flag;
	(void)f;
	chmod(p, 0700);
	return remove(p);
}

static inline void
fd_test_dir_remove(const char *path)
{
	nftw(path, fd_test_rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

#endif
