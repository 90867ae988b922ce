/*
 * One code point of UTF-8 (RFC 3629), strict: no overlong forms, no
 * surrogates, nothing past U+10FFFF. The one decoder both sides share:
 * the SMTP parser's SMTPUTF8 check and, in the control plane, the JSON
 * codec, /metrics label values, the DSN builder and the SMTP client.
 */
#ifndef FINALDOT_UTF8_H
#define FINALDOT_UTF8_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/*
 * One code point at s (n > 0 octets left): its value, and its length in
 * *used. An octet that does not start a well-formed sequence gives
 * U+FFFD with *used 1 (a U+FFFD written out in the input gives 3).
 */
static inline uint32_t
fd_utf8_next(const unsigned char *s, size_t n, size_t *used)
{
	unsigned char c = s[0];
	size_t k;
	uint32_t cp, min;

	*used = 1;
	if (c < 0x80)
		return c;
	if (c >= 0xc2 && c <= 0xdf)
		k = 1, cp = c & 0x1fu, min = 0x80;
	else if (c >= 0xe0 && c <= 0xef)
		k = 2, cp = c & 0x0fu, min = 0x800;
	else if (c >= 0xf0 && c <= 0xf4)
		k = 3, cp = c & 0x07u, min = 0x10000;
	else
		return 0xfffd;
	if (n <= k)
		return 0xfffd;
	for (size_t j = 1; j <= k; j++) {
		if ((s[j] & 0xc0) != 0x80)
			return 0xfffd;
		cp = cp << 6 | (s[j] & 0x3fu);
	}
	if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
		return 0xfffd;
	*used = k + 1;
	return cp;
}

/*
 * The length of the well-formed sequence at s (n > 0 octets left), 1 to
 * 4, or 0 when there is none (a stray or cut sequence, an overlong form,
 * a surrogate, past U+10FFFF): fd_utf8_next()'s U+FFFD of one octet.
 */
static inline size_t
fd_utf8_len(const unsigned char *s, size_t n)
{
	size_t used;

	if (s[0] < 0x80)
		return 1;
	return fd_utf8_next(s, n, &used) == 0xfffd && used == 1 ? 0 : used;
}

/* Whether s[0..n) is well-formed UTF-8 throughout. */
static inline bool
fd_utf8_valid(const unsigned char *s, size_t n)
{
	for (size_t i = 0, l; i < n; i += l)
		if (!(l = fd_utf8_len(s + i, n - i)))
			return false;
	return true;
}

#endif
