/*
 * The oracle for the DATA scanner's differential fuzz target and for
 * tools/scanbench: the previous, byte-at-a-time smtp_data_scan(), kept
 * verbatim except for its name. Its behaviour is the contract: the new
 * scanner must return the same sequence of (result, run, used, flags, pos,
 * line_len) for every input, split and budget. Do not "improve" it; a fix
 * to the contract goes into both scanners, with a test.
 *
 * It walks ordinary octets one at a time, checking the line length and the
 * budget before each one.
 */
#include "smtp_data_ref.h"

static const uint8_t ref_cr_octet[1] = {'\r'};

enum smtp_data_result
smtp_data_scan_ref(struct smtp_data *d, const uint8_t *p, size_t n,
		   size_t budget, struct smtp_data_run *run)
{
	size_t i = 0, start = 0, rlen = 0;

#define RETURN(res)                                                            \
	do {                                                                   \
		run->p = p + start;                                            \
		run->len = rlen;                                               \
		run->used = i;                                                 \
		return (res);                                                  \
	} while (0)
/* Report a new flag before the octet at i: flush the run first. */
#define FLAG(f)                                                                \
	do {                                                                   \
		if (!d->f) {                                                   \
			if (rlen == 0)                                         \
				d->f = true;                                   \
			RETURN(SMTP_DATA_CONTINUE);                            \
		}                                                              \
	} while (0)
#define CHECK_LONG()                                                           \
	do {                                                                   \
		if (d->line_len >= SMTP_TEXT_LINE_MAX)                         \
			FLAG(long_line);                                       \
	} while (0)
#define CHECK_BUDGET()                                                         \
	do {                                                                   \
		if (rlen >= budget)                                            \
			RETURN(rlen ? SMTP_DATA_CONTINUE : SMTP_DATA_BLOCKED); \
	} while (0)
/* Consume the octet at i as body. */
#define EMIT()                                                                 \
	do {                                                                   \
		if (rlen++ == 0)                                               \
			start = i;                                             \
		d->line_len++;                                                 \
		i++;                                                           \
	} while (0)

	while (i < n) {
		uint8_t c = p[i];

		switch (d->pos) {
		case SMTP_DATA_BOL:
			if (c == '.') {
				/* Never emitted: flush the run first. */
				if (rlen)
					RETURN(SMTP_DATA_CONTINUE);
				CHECK_LONG();
				d->line_len++;
				i++;
				d->pos = SMTP_DATA_DOT;
				break;
			}
			/* fallthrough */
		case SMTP_DATA_TEXT:
		text:
			/* The state changes only once c is consumed, so a
			 * stop before c leaves the scanner where it was. */
			if (c == '\r' || c == '\n' || c == 0) {
				CHECK_LONG();
				if (c == '\n')
					FLAG(bare); /* LF without CR */
				if (c == 0)
					FLAG(nul);
				CHECK_BUDGET();
				EMIT();
				d->pos = c == '\r' ? SMTP_DATA_CR : SMTP_DATA_TEXT;
				break;
			}
			/* Fast path through ordinary octets. */
			do {
				CHECK_LONG();
				CHECK_BUDGET();
				EMIT();
				d->pos = SMTP_DATA_TEXT;
			} while (i < n && p[i] != '\r' && p[i] != '\n' &&
				 p[i] != 0);
			break;
		case SMTP_DATA_CR:
			if (c != '\n') {
				FLAG(bare); /* CR without LF */
				goto text;
			}
			CHECK_LONG();
			CHECK_BUDGET();
			EMIT();
			d->line_len = 0;
			d->pos = SMTP_DATA_BOL;
			break;
		case SMTP_DATA_DOT:
			if (c == '\r') {
				CHECK_LONG();
				d->line_len++;
				i++;
				d->pos = SMTP_DATA_DOT_CR;
				break;
			}
			/* A stuffed dot: dropped, the rest is text (4.5.2). */
			goto text;
		case SMTP_DATA_DOT_CR:
			if (c == '\n') {
				i++;
				d->pos = SMTP_DATA_DONE;
				RETURN(SMTP_DATA_END);
			}
			/* ".<CR>x": the dot was stuffing, the CR is bare. */
			FLAG(bare);
			if (budget == 0)
				RETURN(SMTP_DATA_BLOCKED);
			d->pos = SMTP_DATA_TEXT;
			run->p = ref_cr_octet;
			run->len = 1;
			run->used = i;
			return SMTP_DATA_CONTINUE;
		case SMTP_DATA_DONE:
			RETURN(SMTP_DATA_END);
		}
	}
	if (d->pos == SMTP_DATA_DONE)
		RETURN(SMTP_DATA_END);
	RETURN(SMTP_DATA_AGAIN);
#undef RETURN
#undef FLAG
#undef CHECK_LONG
#undef CHECK_BUDGET
#undef EMIT
}
