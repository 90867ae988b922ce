/*
 * Record and envelope decoders on arbitrary bytes. Byte 0 picks the mode:
 * even: the input is a record (decoded with a fixed epoch, then its ENV
 * payload if any); odd: the rest is an envelope payload, decoded and, if
 * valid, re-encoded: the encoding must decode to the same envelope.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "finaldot/spool_format.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void
env_check(const uint8_t *p, size_t n)
{
	size_t sl = spool_env_scratch_len(n);
	void *scr = malloc(sl);
	struct fd_envelope e;

	if (!scr)
		return;
	if (spool_env_decode(p, n, &e, scr, sl) == SPOOL_DEC_OK) {
		uint8_t *out = malloc(n + 1);
		size_t k = out ? spool_env_encode(&e, out, n + 1) : 0;
		/* Canonical order: re-encoding need not match byte for byte
		 * (items may come in another order), but must decode to the
		 * same envelope. */
		if (out && k) {
			struct fd_envelope e2;
			void *scr2 = malloc(spool_env_scratch_len(k));
			if (scr2 && spool_env_decode(out, k, &e2, scr2,
						     spool_env_scratch_len(k)) !=
					    SPOOL_DEC_OK)
				abort();
			if (scr2 && (strcmp(e.mail_from, e2.mail_from) ||
				     e.n_rcpts != e2.n_rcpts ||
				     e.arrival_us != e2.arrival_us))
				abort();
			free(scr2);
		}
		free(out);
	}
	free(scr);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct spool_rec_hdr h;
	const uint8_t *pl;
	size_t used;

	if (size < 1)
		return 0;
	if (data[0] & 1) {
		env_check(data + 1, size - 1);
		return 0;
	}
	data++;
	size--;
	enum spool_dec d = spool_rec_decode(data, size, 0x0123456789abcdefull,
					    &h, &pl, &used);
	if (d == SPOOL_DEC_OK || d == SPOOL_DEC_ERR_EPOCH) {
		if (d == SPOOL_DEC_OK && (used > size || used % 8))
			abort();
		if (d == SPOOL_DEC_OK && h.type == SPOOL_REC_ENV)
			env_check(pl, h.len);
	}
	struct spool_seg_hdr sh;
	(void)spool_seg_hdr_decode(data, size, &sh);
	return 0;
}
