/*
 * Route rules and targets on arbitrary bytes (cut at the first NUL, as a
 * command-line argument would be). Whatever parses must have a canonical
 * text that parses back to the same target (the per-destination queue key
 * is stable), a valid lower-case domain, and a table lookup that finds it.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "route.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void
check_canonical(const struct route_target *t)
{
	struct route_target t2;
	char why[128];

	if (route_parse_target(t->text, &t2, why, sizeof(why)) != 0 ||
	    strcmp(t2.text, t->text) != 0 || t2.kind != t->kind ||
	    t2.port != t->port || strcmp(t2.host, t->host) != 0 ||
	    strcmp(t2.path, t->path) != 0)
		abort();
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char *s = malloc(size + 1);
	struct route_target t;
	char dom[256], why[128];

	if (!s)
		return 0;
	memcpy(s, data, size);
	s[size] = '\0';

	if (route_parse_target(s, &t, why, sizeof(why)) == 0)
		check_canonical(&t);
	else if (!memchr(why, '\0', sizeof(why)))
		abort();

	if (route_parse_rule(s, dom, sizeof(dom), &t, why, sizeof(why)) == 0) {
		struct route_table *rt = route_table_new();
		check_canonical(&t);
		for (const char *p = dom; *p; p++)
			if (*p >= 'A' && *p <= 'Z')
				abort();
		if (rt) {
			if (route_table_add(rt, dom, &t) != 0 ||
			    route_table_add(rt, dom, &t) != -EEXIST ||
			    route_lookup(rt, dom) == NULL ||
			    strcmp(route_lookup(rt, dom)->text, t.text) != 0)
				abort();
			route_table_free(rt);
		}
	}
	(void)route_addr_domain(s);
	free(s);
	return 0;
}
