/* Test seams (finaldot/seam.h): built into test builds only. */
#include <stdlib.h>
#include <string.h>

#include "finaldot/seam.h"

bool
fd_seam(const char *var, const char *what)
{
	const char *f = getenv(var);

	return f && strcmp(f, what) == 0;
}
