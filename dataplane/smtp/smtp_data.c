/*
 * DATA body scanner: end-of-data detection, dot-unstuffing, bare CR/LF and
 * line-length detection (RFC 5321 2.3.8, 4.1.1.4, 4.5.2, 4.5.3.1.6).
 *
 * Contract. The end of data is CRLF "." CRLF and nothing else: a line is
 * ended by CRLF only, so a bare LF or a bare CR never starts a new line and
 * can neither end the message nor start a "." line (this is what defeats
 * the 2023 "SMTP smuggling" family: \n.\n, \r.\r, \n.\r\n, \r\n.\n,
 * \r\n.\r). Bare CR/LF octets stay in the body and set d->bare; the session
 * decides what to do about it (it rejects the message). A NUL octet is
 * treated the same way (d->nul): harmless here, but a next hop that strips
 * NULs turns "\r\n\0.\r\n" into the end of data (issue 10).
 *
 * The scanner walks the input once, returns runs pointing into the input
 * (the body is copied once, by the sink), and keeps its whole position in
 * struct smtp_data, so it can stop before any octet: at the end of the
 * input, when the caller's budget (spool room) is used up, or to report a
 * new flag before the octet that raised it. The body therefore does not
 * depend on how the input was split. See smtp_data.h for the invariants.
 *
 * Line length counts the octets as sent (stuffing dot and CRLF included).
 *
 * Speed. Most of a body is ordinary octets (anything but CR, LF and NUL),
 * which only need copying; the scanner finds the next special octet 16 at a
 * time with SSE2, or 8 at a time with a word test where SSE2 is missing,
 * and checks the line length and the budget once per span instead of once
 * per octet. Each span ends where the line reaches SMTP_TEXT_LINE_MAX or
 * the run reaches the budget, so every stop and every flag falls on the
 * octet where the byte-at-a-time scanner put it: the results of every call
 * are the same as before (tests/fuzz/smtp/fuzz_smtp_data_diff.c checks this
 * against that scanner, kept as smtp_data_ref.c). On tools/scanbench.c's
 * bodies the scanner runs 7 to 9 times fewer instructions than the octet
 * loop did with SSE2, about 4 times fewer with the word test.
 */
#include "smtp/smtp_data.h"

#include <string.h>

/* FINALDOT_DATA_SWAR forces the portable span, so that the tests can run
 * it on machines that have SSE2 (tests/fuzz/smtp/smtp_data_swar.c). */
#if defined(__SSE2__) && !defined(FINALDOT_DATA_SWAR)
#include <emmintrin.h>
#define SMTP_DATA_SSE2 1
#endif

/*
 * The octets that end a run of ordinary text: CR and LF (line structure,
 * bare CR/LF) and NUL (flagged). Everything else, 8-bit octets included,
 * is copied as it is.
 */
static inline bool
special(uint8_t c)
{
	return c == '\r' || c == '\n' || c == 0;
}

#define SWAR_ONES 0x0101010101010101ull
#define SWAR_HIGHS 0x8080808080808080ull

/*
 * The high bit of each zero byte of x is set. Bytes above the first zero
 * byte may be flagged too (the subtraction borrows through it), but none
 * below it is, so the lowest flag is exact: that is all span() needs.
 */
static inline uint64_t
swar_zero(uint64_t x)
{
	return (x - SWAR_ONES) & ~x & SWAR_HIGHS;
}

/* The first special octet in the word at p, or 8 if there is none. */
static inline size_t
swar_first(const uint8_t *p)
{
	uint64_t w, hit;

	memcpy(&w, p, sizeof(w));
	hit = swar_zero(w) | swar_zero(w ^ (SWAR_ONES * '\r')) |
	      swar_zero(w ^ (SWAR_ONES * '\n'));
	if (!hit)
		return 8;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
	/* The first octet in memory is the least significant byte. */
	return (size_t)__builtin_ctzll(hit) / 8;
#else
	for (size_t j = 0;; j++)
		if (special(p[j]))
			return j;
#endif
}

/*
 * The length of the run of ordinary octets at the start of p[0..k): the
 * offset of the first CR, LF or NUL, or k. Reads p[0..k) and nothing
 * outside it (a read past the input could cross into an unmapped page).
 */
static size_t
span(const uint8_t *p, size_t k)
{
	size_t i = 0;

#ifdef SMTP_DATA_SSE2
	const __m128i cr = _mm_set1_epi8('\r');
	const __m128i lf = _mm_set1_epi8('\n');
	const __m128i nul = _mm_setzero_si128();

	for (; i + 16 <= k; i += 16) {
		__m128i v, m;
		unsigned bits;

		memcpy(&v, p + i, sizeof(v));
		m = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(v, cr),
					      _mm_cmpeq_epi8(v, lf)),
				 _mm_cmpeq_epi8(v, nul));
		bits = (unsigned)_mm_movemask_epi8(m);
		if (bits)
			return i + (size_t)__builtin_ctz(bits);
	}
#endif
	for (; i + 8 <= k; i += 8) {
		size_t j = swar_first(p + i);
		if (j < 8)
			return i + j;
	}
	while (i < k && !special(p[i]))
		i++;
	return i;
}

static const uint8_t cr_octet[1] = {'\r'};

void
smtp_data_init(struct smtp_data *d)
{
	d->pos = SMTP_DATA_BOL;
	d->line_len = 0;
	d->bare = false;
	d->long_line = false;
	d->nul = false;
}

enum smtp_data_result
smtp_data_scan(struct smtp_data *d, const uint8_t *p, size_t n, size_t budget,
	       struct smtp_data_run *run)
{
	size_t i = 0, start = 0, rlen = 0, take;

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
			if (special(c)) {
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
			/*
			 * A run of ordinary octets, taken many at a time. The
			 * byte-at-a-time scanner made both checks before each
			 * octet, and each octet adds one to line_len and to
			 * rlen, so they can first fire where line_len reaches
			 * the limit or rlen the budget. The span stops there
			 * at the latest, and the next turn of the loop makes
			 * the checks at that very octet.
			 */
			CHECK_LONG();
			CHECK_BUDGET();
			take = n - i;
			if (take > budget - rlen)
				take = budget - rlen;
			if (!d->long_line &&
			    take > SMTP_TEXT_LINE_MAX - d->line_len)
				take = SMTP_TEXT_LINE_MAX - d->line_len;
			/* take >= 1 and p[i] is ordinary: a span of one at
			 * least. */
			take = span(p + i, take);
			if (rlen == 0)
				start = i;
			rlen += take;
			d->line_len += take;
			i += take;
			d->pos = SMTP_DATA_TEXT;
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
			run->p = cr_octet;
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
