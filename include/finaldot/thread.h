/*
 * Threads: the calling thread's scheduling niceness.
 */
#ifndef FINALDOT_THREAD_H
#define FINALDOT_THREAD_H

/* Set the calling thread's nice value (Linux: per thread, not per
 * process) to nice, 0..19. Raising it needs no privilege. 0 or -errno. */
int fd_thread_set_nice(int nice);

#endif
