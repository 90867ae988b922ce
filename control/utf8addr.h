/*
 * The RFC 6533 7-bit utf-8-addr-xtext form of an address, for the DSN
 * builder (dsn.c) and the SMTP client (smtpc.c). Header-only: each module
 * is a library of its own, unit-tested alone.
 */
#ifndef FINALDOT_CONTROL_UTF8ADDR_H
#define FINALDOT_CONTROL_UTF8ADDR_H

#include <inttypes.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "finaldot/utf8.h"

/*
 * The utf-8-addr-xtext of s (at most max octets of it) into d (dsz > 12):
 * RFC 6533 3, 1*(QCHAR / EmbeddedUnicodeChar). With keep_escapes false s
 * is an address: QCHAR ("!".."~" but "+", "=" and "\") as is, every other
 * code point as "\x{HEX}". With keep_escapes true s is already a
 * utf-8-addr-unitext (an ORCPT as given with SMTPUTF8): its ASCII, "\x{..}"
 * escapes included, goes as is and only non-ASCII code points are
 * written "\x{HEX}". Its length; cut short (at a whole code point) when d
 * is too small.
 */
static inline size_t
utf8addr_xtext(char *d, size_t dsz, const char *s, size_t max,
	       bool keep_escapes)
{
	const unsigned char *u = (const unsigned char *)s;
	size_t n = 0, i = 0, len = strnlen(s, max);

	while (i < len && n + 12 < dsz) {
		size_t used;
		uint32_t cp = fd_utf8_next(u + i, len - i, &used);
		if (cp > 0x20 && cp < 0x7f &&
		    (keep_escapes ||
		     (cp != '+' && cp != '=' && cp != '\\'))) {
			d[n++] = (char)cp;
		} else {
			int r = snprintf(d + n, dsz - n, "\\x{%" PRIX32 "}",
					 cp);
			if (r < 0 || (size_t)r >= dsz - n)
				break;
			n += (size_t)r;
		}
		i += used;
	}
	d[n] = '\0';
	return n;
}

#endif
