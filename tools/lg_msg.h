/*
 * The load generator's messages: deterministic RFC 5322 text of an exact
 * size, split into a small header block (which carries the per-message
 * unique Message-ID and is copied per connection) and a shared body that is
 * built once, both raw (for BDAT) and dot-stuffed (for DATA, RFC 5321
 * 4.5.2). Every line ends in CRLF, has at most LG_MSG_LINE_MAX octets before
 * it, and none holds a bare CR or LF. Some body lines start with '.', and
 * some are a lone ".", so the server's dot-unstuffing is exercised.
 *
 * head + body_raw is the message; head never has a line starting with '.',
 * so stuffing the body alone stuffs the whole message. On the wire (DATA)
 * the sender appends ".\r\n" after the stuffed body, which ends in CRLF.
 */
#ifndef FD_TOOLS_LG_MSG_H
#define FD_TOOLS_LG_MSG_H

#include <stddef.h>
#include <stdint.h>

/* 998 allowed (RFC 5321 4.5.3.1.6), less one for the stuffing dot */
#define LG_MSG_LINE_MAX 997
#define LG_MSG_ID_DIGITS 16

struct lg_msg {
	char *head; /* owned; patch a copy with lg_msg_set_id() */
	size_t head_len;
	size_t id_off;  /* offset of the 16 sequence digits in head */
	char *body_raw; /* owned */
	size_t body_raw_len;
	char *body_stuffed; /* owned */
	size_t body_stuffed_len;
};

/*
 * Build a message of `size` octets in total (head + raw body); when size is
 * smaller than the head alone, the message is the head alone. run_id makes
 * Message-IDs unique across runs, date is an RFC 5322 date text. Returns 0
 * or -ENOMEM / -EINVAL (strings too long for the head).
 */
int lg_msg_build(struct lg_msg *m, size_t size, const char *from,
                 const char *to, const char *host, const char *date,
                 uint64_t run_id);
void lg_msg_free(struct lg_msg *m);

/* Write seq's digits into a copy of m->head (head_len bytes). */
void lg_msg_set_id(const struct lg_msg *m, char *head, uint64_t seq);

/* Room dot-stuffing len bytes may need. */
size_t lg_dotstuff_bound(size_t len);
/*
 * Dot-stuff src (which starts at a line start) into dst: a '.' is doubled at
 * the start of every line. Returns the length written.
 */
size_t lg_dotstuff(char *dst, const char *src, size_t len);

#endif
