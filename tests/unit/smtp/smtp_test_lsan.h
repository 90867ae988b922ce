/* LeakSanitizer check in a suite's .fini: without an explicit check a leak
 * does not fail a Criterion run. */
#ifndef SMTP_TEST_LSAN_H
#define SMTP_TEST_LSAN_H

#include <criterion/criterion.h>

#if defined(__SANITIZE_ADDRESS__)
#define SMTP_TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SMTP_TEST_ASAN 1
#endif
#endif

#ifdef SMTP_TEST_ASAN
#include <sanitizer/lsan_interface.h>
static void
lsan_fini(void)
{
	cr_assert_eq(__lsan_do_recoverable_leak_check(), 0, "memory leaked");
}
#else
static void
lsan_fini(void)
{
}
#endif

#endif
