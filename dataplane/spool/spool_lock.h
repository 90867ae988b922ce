/*
 * One daemon per spool: the owner's lock on a spool root (spool_lock.c).
 */
#ifndef FINALDOT_SPOOL_LOCK_H
#define FINALDOT_SPOOL_LOCK_H

#include <sys/types.h>

/* The lock file's name inside the spool root. */
#define SPOOL_LOCK_NAME "lock"

/*
 * Take the exclusive lock on root (which must exist) for the life of the
 * process: returns the lock file's descriptor (>= 0; keep it open, it is
 * released when the process ends, however it ends) and writes our pid in
 * the file. -EWOULDBLOCK: another process holds it; *holder is the pid
 * written in the file (0 if it could not be read). Other -errno: the file
 * could not be made or locked.
 */
int spool_lock_take(const char *root, pid_t *holder);

#endif
