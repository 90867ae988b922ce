/* Threads: the calling thread's niceness (finaldot/thread.h). */
#include <errno.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "finaldot/thread.h"

int
fd_thread_set_nice(int nice)
{
	/* PRIO_PROCESS with a thread id names that thread alone. */
	if (setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), nice) != 0)
		return -errno;
	return 0;
}
