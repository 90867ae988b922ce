/*
 * Threads: the calling thread's scheduling niceness.
 */
#ifndef FINALDOT_THREAD_H
#define FINALDOT_THREAD_H

/* Lower the calling thread's priority (Linux: per thread, not per
 * process) by incr nice steps from where it is now, at most to 19; the
 * daemon's own nice (systemd's Nice=, nice(1)) stays the base. Raising the
 * nice value needs no privilege. incr 0 does nothing. A failure is logged
 * as comp's event=nice_failed (the thread runs on at its priority). 0 or
 * -errno. */
int fd_thread_nice_by(unsigned incr, const char *comp);

#endif
