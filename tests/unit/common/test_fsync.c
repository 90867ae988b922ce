/* Files (finaldot/fsync.h): reading a spool file never writes its inode. */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "finaldot/fsync.h"
#include "../testdir.h"

TestSuite(files);

/* atime an hour before mtime: under relatime the next read updates it. */
static void
age_atime(const char *path)
{
	struct timespec ts[2] = { { .tv_sec = 1700000000 },
				  { .tv_sec = 1700003600 } };

	cr_assert_eq(utimensat(AT_FDCWD, path, ts, 0), 0, "utimensat: %s",
		     strerror(errno));
}

static time_t
read_with(const char *path, int fd)
{
	char buf[16];
	struct stat st;

	cr_assert_geq(fd, 0, "open %s: %s", path, strerror(errno));
	cr_assert_eq(read(fd, buf, sizeof(buf)), 5);
	close(fd);
	cr_assert_eq(stat(path, &st), 0);
	return st.st_atime;
}

Test(files, noatime_read_leaves_the_inode_alone)
{
	char dir[64], path[128];
	FILE *f;

	fd_test_dir_make(dir, sizeof(dir), "/var/tmp", "files");
	snprintf(path, sizeof(path), "%s/seg", dir);
	cr_assert_not_null(f = fopen(path, "w"));
	fputs("hello", f);
	fclose(f);

	/* The control: a plain read moves atime here (relatime), or the
	 * mount never does (noatime) and there is nothing to show. */
	age_atime(path);
	if (read_with(path, open(path, O_RDONLY)) == 1700000000) {
		fd_test_dir_remove(dir);
		cr_skip_test("this filesystem does not update atime on read "
			     "(noatime mount): nothing to compare");
	}
	age_atime(path);
	cr_assert_eq(read_with(path, fd_open_noatime(path, O_RDONLY |
							   O_CLOEXEC)),
		     1700000000, "the read wrote the inode's atime");
	fd_test_dir_remove(dir);
}

Test(files, noatime_keeps_the_callers_flags)
{
	char dir[64], path[128];
	int fd, fl;
	FILE *f;

	fd_test_dir_make(dir, sizeof(dir), "/var/tmp", "files");
	snprintf(path, sizeof(path), "%s/seg", dir);
	cr_assert_not_null(f = fopen(path, "w"));
	fclose(f);
	fd = fd_open_noatime(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
	cr_assert_geq(fd, 0);
	fl = fcntl(fd, F_GETFL);
	cr_assert(fl & O_NONBLOCK);
	cr_assert(fcntl(fd, F_GETFD) & FD_CLOEXEC);
	cr_assert_eq(fl & O_ACCMODE, O_RDONLY);
	cr_assert(fl & O_NOATIME, "we own the file: O_NOATIME is ours");
	close(fd);
	snprintf(path, sizeof(path), "%s/missing", dir);
	cr_assert_lt(fd_open_noatime(path, O_RDONLY), 0);
	cr_assert_eq(errno, ENOENT);
	fd_test_dir_remove(dir);
}
