/*
 * One daemon per spool root (issue 10). Two daemons on one spool would each
 * take the other's leftover segments for their own: each worker directory
 * has one writer by design (spool_seg.c classifies, reuses and recycles
 * segments on that assumption), and recovery would count the other's live
 * records as stale. So the owner locks the root before recovery.
 *
 * The lock is flock(LOCK_EX | LOCK_NB) on ROOT/lock: a kernel lock, released
 * when its open file description is closed, so also by kill -9 or a crash;
 * a lock file left behind by a dead owner never blocks a restart. The file
 * holds the owner's pid, one decimal line: informational only (for the
 * error a second daemon prints), never used to decide anything. The file
 * is opened O_CLOEXEC, so nothing the daemon might exec inherits the lock.
 *
 * Limits: flock() works between processes of one host. On NFS it is
 * emulated with byte-range locks (and the spool does not belong on NFS: its
 * O_DIRECT + RWF_DSYNC writes are the durability rule).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

#include "spool_lock.h"

static pid_t
read_pid(int fd)
{
	char buf[32];
	ssize_t n = pread(fd, buf, sizeof(buf) - 1, 0);
	long v;
	char *end;

	if (n <= 0)
		return 0;
	buf[n] = '\0';
	v = strtol(buf, &end, 10);
	if (end == buf || v <= 0 || v > 0x7fffffff)
		return 0;
	return (pid_t)v;
}

int
spool_lock_take(const char *root, pid_t *holder)
{
	char path[4200], line[32];
	int fd, n, r;

	*holder = 0;
	if ((size_t)snprintf(path, sizeof(path), "%s/%s", root,
			     SPOOL_LOCK_NAME) >= sizeof(path))
		return -ENAMETOOLONG;
	fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0640);
	if (fd < 0)
		return -errno;
	if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
		r = -errno;
		if (r == -EWOULDBLOCK) {
			/* The holder writes its pid right after locking: a
			 * second start racing the first may read it empty. */
			for (int i = 0; i < 50 && !*holder; i++) {
				*holder = read_pid(fd);
				if (!*holder)
					usleep(2000);
			}
		}
		close(fd);
		return r;
	}
	n = snprintf(line, sizeof(line), "%ld\n", (long)getpid());
	if (pwrite(fd, line, (size_t)n, 0) != n ||
	    ftruncate(fd, n) != 0) {
		/* The pid is informational: the lock is what counts. */
	}
	return fd;
}
