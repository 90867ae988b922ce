/*
 * The /metrics server's reading of a request on arbitrary bytes: the head
 * check and the request line. What is answered 200 must be a request line
 * of GET or HEAD for the path /metrics over HTTP/1.x, read back from the
 * bytes themselves; nothing may read past len (the input is copied to a
 * buffer of exactly its size, so ASan sees any overread).
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cplane.h"
#include "metrics.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* metrics.c renders the queue manager's figures; the queue manager is not
 * linked, and nothing here renders. */
void
cp_get_stats(struct cplane *cp, struct cp_stats *st)
{
	(void)cp;
	memset(st, 0, sizeof(*st));
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char *in = malloc(size ? size : 1);
	bool head = true, done;
	enum metrics_req r;

	if (!in)
		return 0;
	memcpy(in, data, size);
	done = metrics_head_complete(in, size);
	/* a complete head has an empty line: at least two octets */
	if (done && size < 2)
		abort();
	r = metrics_parse_request(in, size, &head);
	if (r != METRICS_REQ_OK && r != METRICS_REQ_BAD &&
	    r != METRICS_REQ_METHOD && r != METRICS_REQ_NOT_FOUND)
		abort();
	if (r == METRICS_REQ_OK || r == METRICS_REQ_METHOD ||
	    r == METRICS_REQ_NOT_FOUND) {
		/* a whole line, and its method as reported */
		const char *nl = memchr(in, '\n', size);
		if (!nl)
			abort();
		if (r == METRICS_REQ_OK &&
		    (head ? memcmp(in, "HEAD /metrics", 13)
			  : memcmp(in, "GET /metrics", 12)) != 0)
			abort();
	}
	if (r != METRICS_REQ_OK && head)
		abort(); /* head_only is set only with an answer to give */
	free(in);
	return 0;
}
