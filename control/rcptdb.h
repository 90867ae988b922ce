/*
 * rcptdb: the table of valid recipients (--recipients FILE), asked at RCPT
 * time whether an address is deliverable here.
 *
 * File format (UTF-8 or ASCII text, one entry per line, LF or CRLF):
 *   user@domain    that address is valid
 *   @domain        every local part of that domain is valid
 *   # comment      a line whose first non-blank byte is '#'
 * Blank lines are ignored; spaces, tabs and a CR around an entry are
 * trimmed. An entry may not contain a space or tab inside (so a trailing
 * "# comment" after an entry is an error, not silently part of it). The
 * domain is what follows the last '@'.
 *
 * Entries and lookups are keyed by the mailbox as delivery understands
 * it: a quoted local part without its quotes and backslashes, the domain
 * without one trailing dot ("bob"@example.com. is bob@example.com).
 * Matching is case-insensitive (ASCII letters only) on the domain and on
 * the local part. RFC 5321 section 2.4 lets a local part be case-sensitive,
 * but the providers this serves fold case; there is no case-sensitive mode.
 * Duplicate entries are counted once.
 *
 * The load fails as a whole on any bad line, with "FILE:LINE: reason":
 * a line over 512 bytes (not counting its line end), a NUL byte, another
 * control character inside the entry, no '@', an empty domain. The caller
 * keeps its old table when a reload fails.
 *
 * Cost: the whole file is read once; entries go into one arena of strings
 * and an open-addressing table of 64-bit hashes (no allocation per entry);
 * a lookup is O(1) and allocates nothing. Limits: 4 GiB of entry text.
 *
 * Thread-safety: a loaded db is immutable; any number of threads may call
 * rcptdb_check() and rcptdb_count() at once.
 */
#ifndef FINALDOT_CONTROL_RCPTDB_H
#define FINALDOT_CONTROL_RCPTDB_H

#include <stddef.h>

struct rcptdb;

/*
 * Load path. NULL on failure with errno set (EINVAL for a bad line,
 * ENOMEM, EFBIG, or the open/read error) and a one-line reason in why
 * (e.g. "recipients.txt:12: no '@'"); why may be NULL.
 */
struct rcptdb *rcptdb_load(const char *path, char *why, size_t why_len);

/* The same on text[0..len) (may hold NUL bytes: they are errors); the name
 * in reasons is "<memory>". text is not kept. For tests and fuzzing. */
struct rcptdb *rcptdb_load_mem(const char *text, size_t len, char *why,
			       size_t why_len);

void rcptdb_free(struct rcptdb *db);

/*
 * 1 if addr (without <>) is valid: its exact address or its @domain is in
 * the table; 0 otherwise, and for anything that is not local@domain with
 * both parts non-empty (the null sender "" included).
 */
int rcptdb_check(const struct rcptdb *db, const char *addr);

/* Distinct entries (addresses and @domains). */
size_t rcptdb_count(const struct rcptdb *db);

#endif
