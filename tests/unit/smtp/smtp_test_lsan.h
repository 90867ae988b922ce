/*
 * LeakSanitizer check. Without an explicit check a leak does not fail a
 * Criterion run, and Criterion 2.4 ignores a failure in a suite's .fini
 * (the test is already reported): call lsan_check() at the end of a test
 * body (the session tests' finish() does). lsan_fini stays as the suites'
 * .fini for the report it prints.
 */
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
static inline void
lsan_check(void)
{
	cr_assert_eq(__lsan_do_recoverable_leak_check(), 0, "memory leaked");
}
#else
static inline void
lsan_check(void)
{
}
#endif
static inline void
lsan_fini(void)
{
	lsan_check();
}

#endif
