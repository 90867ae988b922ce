/* Files (finaldot/fsync.h): reading a spool file never writes its inode;
 * a directory made or found is synced in its parent. */
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

/* Every fsync, by path (linked with -Wl,--wrap=fsync). */
int __real_fsync(int fd);
int __wrap_fsync(int fd);
static char synced[8][256];
static unsigned n_synced;

int
__wrap_fsync(int fd)
{
	char l[64], p[256];
	ssize_t n;

	snprintf(l, sizeof(l), "/proc/self/fd/%d", fd);
	n = readlink(l, p, sizeof(p) - 1);
	p[n < 0 ? 0 : n] = '\0';
	if (n_synced < 8)
		memcpy(synced[n_synced++], p, sizeof(p));
	return __real_fsync(fd);
}

Test(files, mkdir_durable_syncs_the_parent_whether_made_or_found)
{
	char dir[64], sub[128];

	fd_test_dir_make(dir, sizeof(dir), "/var/tmp", "files");
	snprintf(sub, sizeof(sub), "%s/spool", dir);
	n_synced = 0;
	cr_assert_eq(fd_mkdir_durable(sub, 0700), 0);
	cr_assert_eq(n_synced, 1);
	cr_assert_str_eq(synced[0], dir);
	/* found: a start that died before its sync left it so */
	n_synced = 0;
	cr_assert_eq(fd_mkdir_durable(sub, 0700), 0);
	cr_assert_eq(n_synced, 1, "a directory found is synced in its parent");
	cr_assert_str_eq(synced[0], dir);
	fd_test_dir_remove(dir);
}
