/* DURATION values (finaldot/duration.h). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "finaldot/duration.h"

bool
fd_parse_duration_ms(const char *v, uint64_t *ms)
{
	uint64_t n, mul = 1000;
	char *end;

	if (*v < '0' || *v > '9')
		return false;
	errno = 0;
	n = strtoull(v, &end, 10);
	if (errno)
		return false;
	if (strcmp(end, "ms") == 0)
		mul = 1, end += 2;
	else if (*end == 's')
		end++;
	else if (*end == 'm')
		mul = 60000, end++;
	else if (*end == 'h')
		mul = 3600000, end++;
	else if (*end == 'd')
		mul = 86400000, end++;
	if (*end != '\0' || (n != 0 && mul > UINT64_MAX / n))
		return false;
	*ms = n * mul;
	return true;
}
