/* Threads (finaldot/thread.h): niceness counted from the thread's own. */
#include <criterion/criterion.h>
#include <pthread.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "finaldot/thread.h"

TestSuite(thread);

static int
my_nice(void)
{
	return getpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid));
}

struct seen {
	int base, after4, after_many;
	int r4, rmany;
	bool set_ok;
};

static void *
body(void *arg)
{
	struct seen *s = arg;

	/* The daemon started at nice 3 (systemd's Nice=3, say); below the
	 * caller's own nice only with CAP_SYS_NICE (root). */
	s->set_ok = setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), 3) ==
		    0;
	s->base = my_nice();
	s->r4 = fd_thread_nice_by(4, "test");
	s->after4 = my_nice();
	s->rmany = fd_thread_nice_by(30, "test");
	s->after_many = my_nice();
	return NULL;
}

Test(thread, nice_steps_from_the_threads_own_and_stop_at_19)
{
	struct seen s = { 0 };
	pthread_t t;
	int main_before = my_nice();

	cr_assert_eq(pthread_create(&t, NULL, body, &s), 0);
	pthread_join(t, NULL);
	cr_assert_eq(s.base, s.set_ok ? 3 : main_before);
	cr_assert_eq(s.r4, 0);
	cr_assert_eq(s.after4, s.base + 4 > 19 ? 19 : s.base + 4);
	cr_assert_eq(s.rmany, 0);
	cr_assert_eq(s.after_many, 19);
	/* Per thread: the caller's priority did not move. */
	cr_assert_eq(my_nice(), main_before);
}
