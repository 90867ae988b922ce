/*
 * The DATA body scanner (RFC 5321 4.1.1.4, 4.5.2): finds the end of data,
 * removes dot-stuffing, and flags bare CR / bare LF, NUL octets and
 * over-long lines.
 * A resumable byte state machine: it can stop before any octet and resume
 * there, whatever the split of the input. It moves through ordinary octets
 * many at a time, but stops and flags exactly where a scanner taking one
 * octet at a time would.
 */
#ifndef FINALDOT_SMTP_DATA_H
#define FINALDOT_SMTP_DATA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* RFC 5321 4.5.3.1.6: a text line is at most 1000 octets with its CRLF. */
#define SMTP_TEXT_LINE_MAX 1000

/* Where the scanner stands in the current line. */
enum smtp_data_pos {
	SMTP_DATA_BOL,    /* at the start of a line (after CRLF, or first) */
	SMTP_DATA_TEXT,   /* inside a line */
	SMTP_DATA_CR,     /* after a CR inside a line (already emitted) */
	SMTP_DATA_DOT,    /* after a leading '.' (not emitted) */
	SMTP_DATA_DOT_CR, /* after ".<CR>" (neither emitted) */
	SMTP_DATA_DONE,   /* CRLF.CRLF consumed */
};

struct smtp_data {
	enum smtp_data_pos pos;
	size_t line_len; /* octets of the current line as sent, so far */
	bool bare;       /* a CR not followed by LF, or an LF not after CR */
	bool long_line;  /* a line longer than SMTP_TEXT_LINE_MAX */
	bool nul;        /* a NUL octet (kept in the body, like bare CR/LF) */
};

enum smtp_data_result {
	SMTP_DATA_CONTINUE, /* a run and/or a new flag: handle, call again */
	SMTP_DATA_AGAIN,    /* all input consumed; need more bytes */
	SMTP_DATA_BLOCKED,  /* budget 0 and the next octet is body */
	SMTP_DATA_END,      /* end of data consumed (run is empty) */
};

/*
 * The body octets produced by one call: one contiguous run, pointing into
 * the input (or at a constant "\r" for the CR of a ".<CR>x" line).
 */
struct smtp_data_run {
	const uint8_t *p;
	size_t len;
	size_t used; /* input octets consumed by this call */
};

void smtp_data_init(struct smtp_data *d);

/*
 * Scan p[0..n) producing at most budget body octets. Invariants that make
 * every split of the input give the same body:
 *  - a run never spans a non-body octet (stuffing dot, terminator);
 *  - when bare, nul or long_line becomes true, the call returns with an empty
 *    run first, so everything in earlier runs precedes the offending octet
 *    and everything in later runs follows it;
 *  - on SMTP_DATA_END the CRLF before the dot is already in the body (it
 *    ends the last line) and ".CRLF" is consumed, not emitted.
 */
enum smtp_data_result smtp_data_scan(struct smtp_data *d, const uint8_t *p,
				     size_t n, size_t budget,
				     struct smtp_data_run *run);

#endif
