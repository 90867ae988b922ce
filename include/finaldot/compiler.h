/* Small compiler helpers shared by every component. */
#ifndef FINALDOT_COMPILER_H
#define FINALDOT_COMPILER_H

#define FD_CACHE_LINE 64
#define fd_cache_aligned __attribute__((aligned(FD_CACHE_LINE)))
#define fd_likely(x) __builtin_expect(!!(x), 1)
#define fd_unlikely(x) __builtin_expect(!!(x), 0)
#define FD_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define FD_MIN(a, b) ((a) < (b) ? (a) : (b))
#define FD_MAX(a, b) ((a) > (b) ? (a) : (b))

#endif
