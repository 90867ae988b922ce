/*
 * The reader's segment walk and message assembly on an in-memory segment.
 * The harness builds a valid segment header (so the fuzzer need not find a
 * CRC), then, when byte 0 is odd, re-seals every structurally valid record
 * it finds walking in order with the segment's epoch, so that message
 * assembly (ordering, gaps, duplicates, END checks) is reached too.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "finaldot/crc32c.h"
#include "finaldot/spool_format.h"
#include "spool_reader.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define EPOCH 0x5eed5eed5eed5eedull

static int
count_body(void *ctx, const void *p, size_t n)
{
	(void)p;
	*(size_t *)ctx += n;
	return 0;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 1 || size > (1u << 20))
		return 0;
	bool reseal = data[0] & 1;
	size_t seg_len = SPOOL_BLOCK + spool_align_block(size - 1 ? size - 1 : 1);
	uint8_t *seg = calloc(1, seg_len);
	if (!seg)
		return 0;
	struct spool_seg_hdr h = { .worker = 3, .file_no = 1, .use_seq = 1,
				   .epoch = EPOCH, .size = seg_len };
	if (h.size < 2 * SPOOL_BLOCK)
		h.size = 2 * SPOOL_BLOCK;
	spool_seg_hdr_encode(&h, seg);
	memcpy(seg + SPOOL_BLOCK, data + 1, size - 1);
	if (reseal) {
		size_t pos = SPOOL_BLOCK;
		while (pos + SPOOL_REC_HDR_LEN <= seg_len) {
			struct spool_rec_hdr rh;
			if (spool_rec_hdr_decode(seg + pos, SPOOL_REC_HDR_LEN,
						 &rh) != SPOOL_DEC_OK ||
			    spool_rec_size(rh.len) > seg_len - pos) {
				pos = (pos / SPOOL_BLOCK + 1) * SPOOL_BLOCK;
				continue;
			}
			spool_put64(seg + pos + 16, EPOCH);
			size_t end = pos + SPOOL_REC_HDR_LEN + rh.len;
			memset(seg + end, 0,
			       (size_t)spool_rec_size(rh.len) - SPOOL_REC_HDR_LEN -
				       rh.len);
			spool_rec_seal(seg + pos,
				       fd_crc32c(0, seg + pos + SPOOL_REC_HDR_LEN,
						 rh.len));
			pos += (size_t)spool_rec_size(rh.len);
		}
	}
	struct ctl_spool_scan *s = ctl_spool_scan_mem(seg, seg_len);
	if (s) {
		const struct ctl_spool_summary *sum = ctl_spool_scan_summary(s);
		if (sum->msgs_committed != ctl_spool_scan_count(s))
			abort();
		for (size_t i = 0; i < ctl_spool_scan_count(s); i++) {
			const struct ctl_spool_msg *m = ctl_spool_scan_msg(s, i);
			size_t got = 0;
			if (ctl_spool_read_body(s, m, count_body, &got) != 0 ||
			    got != m->body_len)
				abort();
		}
		ctl_spool_scan_free(s);
	}
	free(seg);
	return 0;
}
