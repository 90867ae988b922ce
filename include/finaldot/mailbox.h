/*
 * A mailbox's parts as every part of finaldot reads them: the SMTP engine
 * (postmaster), the recipients table, routing and Maildir delivery. One
 * rule each, so that they cannot disagree on which mailbox a spelling
 * names (they did: "bob"@example.com was bob's Maildir and an unknown user
 * to the table).
 */
#ifndef FINALDOT_MAILBOX_H
#define FINALDOT_MAILBOX_H

#include <stddef.h>
#include <string.h>

/*
 * Local part s[0..n) into out: a quoted-string (it starts and ends with
 * '"') without its quotes and backslashes ("bob" and "b\ob" are bob, RFC
 * 5321 4.1.2), anything else as it is. At most cap - 1 octets are written,
 * then a NUL (cap > 0). Returns the whole length, which is cap or more
 * when out was too small.
 */
static inline size_t
fd_local_part(const char *s, size_t n, char *out, size_t cap)
{
	size_t k = 0;

	if (n >= 2 && s[0] == '"' && s[n - 1] == '"') {
		for (size_t i = 1; i < n - 1; i++) {
			if (s[i] == '\\' && i + 1 < n - 1)
				i++;
			if (k + 1 < cap)
				out[k] = s[i];
			k++;
		}
	} else {
		if (cap)
			memcpy(out, s, n < cap ? n : cap - 1);
		k = n;
	}
	if (cap)
		out[k < cap ? k : cap - 1] = '\0';
	return k;
}

/* The length of domain s[0..n) without one trailing dot, which the SMTP
 * engine takes ("example.com." is example.com); a lone "." stays. */
static inline size_t
fd_domain_len(const char *s, size_t n)
{
	return n > 1 && s[n - 1] == '.' ? n - 1 : n;
}

#endif
