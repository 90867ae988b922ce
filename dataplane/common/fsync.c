/* Making names durable, reading without writing (finaldot/fsync.h). */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "finaldot/fsync.h"
#include "finaldot/seam.h"

int
fd_fsync_dir(const char *dir)
{
	int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	int r = 0;

	if (fd < 0)
		return -errno;
	if (fsync(fd) != 0)
		r = -errno;
	close(fd);
	return r;
}

int
fd_fsync_parent(const char *path)
{
	const char *sl = strrchr(path, '/');
	char parent[4096];

	if (!sl)
		return fd_fsync_dir(".");
	if (sl == path)
		return fd_fsync_dir("/");
	if ((size_t)(sl - path) >= sizeof(parent))
		return -ENAMETOOLONG;
	memcpy(parent, path, (size_t)(sl - path));
	parent[sl - path] = '\0';
	return fd_fsync_dir(parent);
}

int
fd_mkdir_durable(const char *path, mode_t mode)
{
	int r;

	if (mkdir(path, mode) == 0)
		return fd_fsync_parent(path);
	if (errno != EEXIST)
		return -errno;
	/* Found is not durable: a start that died between its mkdir and
	 * this sync, or a directory another program just made, may still
	 * be gone after a power cut, with what is written in it. A parent
	 * we may not open, or whose filesystem cannot sync a directory
	 * (read-only, some network filesystems), is left as it is. */
	r = fd_fsync_parent(path);
	if (r == -EACCES || r == -EPERM || r == -EROFS || r == -EINVAL)
		r = 0;
	return r;
}

int
fd_open_noatime(const char *path, int flags)
{
	int fd = open(path, flags | O_NOATIME);

	if (fd < 0 && errno == EPERM)
		fd = open(path, flags);
	return fd;
}

bool
fd_delivery_fault(const char *what)
{
	return fd_seam("FINALDOT_DELIVERY_FAULT", what);
}
