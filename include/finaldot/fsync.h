/*
 * Files: making names durable, and reading without writing.
 *
 * A file's data is made durable by fsync of the
 * file; its name, and a new directory, only by fsync of the directory
 * that holds it (POSIX promises no more, and the power-cut simulator
 * holds us to exactly that: docs/powercut.md).
 */
#ifndef FINALDOT_FSYNC_H
#define FINALDOT_FSYNC_H

#include <sys/types.h>

#include <stdbool.h>

/* fsync the directory dir: its entries as they are now. 0 or -errno. */
int fd_fsync_dir(const char *dir);

/* fsync the directory holding path's last component ("." for a name
 * without a slash, "/" for one right under the root). 0 or -errno. */
int fd_fsync_parent(const char *path);

/* mkdir path (mode) unless it exists, and sync its parent, found or made
 * (a directory found may be one a crash left unsynced): the directory is
 * durable in its parent. A parent that cannot be opened (EACCES, EPERM)
 * or synced (EROFS, EINVAL) is skipped for a directory found. 0 (made or
 * found) or -errno. */
int fd_mkdir_durable(const char *path, mode_t mode);

/* open(2) path with flags (O_RDONLY and any of O_DIRECT, O_CLOEXEC...)
 * plus O_NOATIME where the kernel lets us (we own the file, or hold
 * CAP_FOWNER), flags alone where it does not (EPERM). The spool's
 * readers (the tailer, delivery, recovery, the scan) use it: under
 * relatime a read after each write would otherwise dirty the segment's
 * inode again and again while a worker writes it, and with it the inode
 * table block its next flush may have to write. A descriptor or -1 with
 * errno, as open(2). */
int fd_open_noatime(const char *path, int flags);

/*
 * Test seam (test builds only, -Dfault_injection=true): whether the
 * environment's FINALDOT_DELIVERY_FAULT names `what`: a durability point
 * to be left out (a mutant a power-cut test must catch, docs/powercut.md)
 * or a failure to simulate (dlog-fail, heap-grow-fail, scan-read-fail,
 * scan-read-fail-first).
 * Always false in a release build, which never reads the variable.
 */
bool fd_delivery_fault(const char *what);

#endif
