/*
 * Test seams (test builds only, -Dfault_injection=true): a fault or a
 * left-out durability point a test asks for by naming it in an
 * environment variable, e.g. FINALDOT_PORT_FAULT=txq.
 */
#ifndef FINALDOT_SEAM_H
#define FINALDOT_SEAM_H

#include <stdbool.h>

/* Whether the environment variable var is exactly what. Always false in
 * a release build, which never reads the environment for it. */
bool fd_seam(const char *var, const char *what);

#endif
