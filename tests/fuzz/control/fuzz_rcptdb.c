/*
 * The recipients file parser on arbitrary bytes. A load either fails with a
 * reason naming a line, or succeeds and then every entry line of the input
 * is found again by rcptdb_check(): exact addresses as themselves (and in
 * upper case), @domain entries for some local part of that domain. A
 * leading UTF-8 byte order mark is skipped.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "rcptdb.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int
blank(char c)
{
	return c == ' ' || c == '\t' || c == '\r';
}

static void
check_entry(const struct rcptdb *db, const char *s, size_t n)
{
	char a[600];

	if (n == 0 || s[0] == '#' || n > 512)
		return;
	if (s[0] == '@') {
		a[0] = 'x';
		memcpy(a + 1, s, n);
		a[n + 1] = '\0';
		if (n + 1 <= 512 && rcptdb_check(db, a) != 1)
			abort();
		return;
	}
	memcpy(a, s, n);
	a[n] = '\0';
	if (rcptdb_check(db, a) != 1)
		abort();
	for (size_t i = 0; i < n; i++)
		if (a[i] >= 'a' && a[i] <= 'z')
			a[i] = (char)(a[i] - 'a' + 'A');
	if (rcptdb_check(db, a) != 1)
		abort();
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const char *p = (const char *)data, *end = p + size;
	char why[160];
	size_t lines = 1;
	struct rcptdb *db = rcptdb_load_mem(p, size, why, sizeof(why));

	if (!db) {
		if (errno == EINVAL && !strstr(why, "<memory>:"))
			abort();
		return 0;
	}
	/* a UTF-8 byte order mark before the first entry is not part of it */
	if (size >= 3 && memcmp(p, "\xef\xbb\xbf", 3) == 0)
		p += 3;
	while (p < end) {
		const char *nl = memchr(p, '\n', (size_t)(end - p));
		const char *s = p, *e = nl ? nl : end;
		while (s < e && blank(*s))
			s++;
		while (e > s && blank(e[-1]))
			e--;
		check_entry(db, s, (size_t)(e - s));
		if (!nl)
			break;
		p = nl + 1;
		lines++;
	}
	if (rcptdb_count(db) > lines)
		abort();
	rcptdb_free(db);
	return 0;
}
