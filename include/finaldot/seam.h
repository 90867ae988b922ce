/*
 * Test seams (test builds only, -Dfault_injection=true): a fault or a
 * left-out durability point a test asks for by naming it in an
 * environment variable, e.g. FINALDOT_PORT_FAULT=txq.
 */
#ifndef FINALDOT_SEAM_H
#define FINALDOT_SEAM_H

#include <stdbool.h>

#ifdef FINALDOT_FAULT_INJECTION
/* Whether the environment variable var is exactly what. */
bool fd_seam(const char *var, const char *what);
#else
/* A release build: never, and without the variable's name in the binary
 * (test_release_build looks for it) or a read of the environment. */
#define fd_seam(var, what) ((void)(what), false)
#endif

#endif
