/*
 * A moved message's file (moved.h) read from arbitrary bytes. Either it is
 * refused (-EBADMSG: not a whole, intact moved message), or every field
 * read is consistent with the bytes: the body lies exactly at the end of
 * the input, the envelope encodes again to the length the header gave,
 * and its recipients are as many as it says, each a string.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "finaldot/spool_format.h"
#include "moved.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static void *scratch;
	struct moved_info mi;
	int fd, r;

	if (!scratch && !(scratch = malloc(moved_scratch_max())))
		abort();
	fd = memfd_create("moved", MFD_CLOEXEC);
	if (fd < 0)
		abort();
	if (size && write(fd, data, size) != (ssize_t)size)
		abort();
	r = moved_read(fd, size, &mi, scratch, moved_scratch_max());
	close(fd);
	if (r != 0) {
		if (r != -EBADMSG)
			abort();
		return 0;
	}
	if (mi.body_off < MOVED_HDR_LEN || mi.body_off > size ||
	    size - mi.body_off != mi.body_len)
		abort();
	if (spool_env_encoded_len(&mi.env) != mi.body_off - MOVED_HDR_LEN)
		abort();
	for (unsigned i = 0; i < mi.env.n_rcpts; i++)
		if (!mi.env.rcpts[i] || strlen(mi.env.rcpts[i]) > SPOOL_ITEM_MAX)
			abort();
	if (!mi.env.mail_from || !mi.env.helo || !mi.env.envid)
		abort();
	return 0;
}
