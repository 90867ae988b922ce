/* Test seams (finaldot/seam.h). */
#include <stdlib.h>
#include <string.h>

#include "finaldot/seam.h"

bool
fd_seam(const char *var, const char *what)
{
#ifdef FINALDOT_FAULT_INJECTION
	const char *f = getenv(var);

	return f && strcmp(f, what) == 0;
#else
	(void)var;
	(void)what;
	return false;
#endif
}
