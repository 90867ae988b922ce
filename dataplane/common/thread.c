/* Threads: the calling thread's niceness (finaldot/thread.h). */
#include <errno.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "finaldot/log.h"
#include "finaldot/thread.h"

int
fd_thread_nice_by(unsigned incr, const char *comp)
{
	/* PRIO_PROCESS with a thread id names that thread alone. */
	id_t tid = (id_t)syscall(SYS_gettid);
	int cur, want, r = 0;

	if (!incr)
		return 0;
	errno = 0;
	cur = getpriority(PRIO_PROCESS, tid);
	if (cur == -1 && errno) {
		r = -errno;
	} else {
		want = cur + (int)(incr > 39u ? 39u : incr);
		if (want > 19)
			want = 19;
		if (setpriority(PRIO_PROCESS, tid, want) != 0)
			r = -errno;
	}
	if (r)
		fd_log(FD_LOG_WARN, comp,
		       "event=nice_failed delivery_nice=%u error=\"%s\"", incr,
		       strerror(-r));
	return r;
}
