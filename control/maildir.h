/*
 * maildir: local delivery of one message into ROOT/DOMAIN/LOCALPART/, a
 * Maildir (tmp/, new/, cur/) that IMAP servers such as Dovecot read.
 *
 * Contract: maildir_deliver() returns only once the message is durable in
 * new/ (file and directory entries fsynced), or has failed and left no
 * file behind. Delivery is safe from many threads at once (names are
 * unique per process via an atomic counter; directory creation races are
 * harmless).
 *
 * Naming: domain and local part are lower-cased (ASCII), so that
 * "Bob@Example.ORG" and "bob@example.org" share a mailbox; the same folding
 * rcptdb applies. A domain or local part that is "", ".", "..", starts
 * with '.', holds a '/', a control character, or is longer than 255 bytes
 * is refused permanently (5.1.3) before anything is created.
 *
 * ROOT itself must exist (it is not created: a missing root usually means
 * a filesystem that is not mounted, and mail written under the mount point
 * would vanish when it is). DOMAIN, LOCALPART and tmp/new/cur are created
 * on first delivery with mode 0700, each opened without following
 * symlinks, so nothing is ever created outside ROOT. Message files are
 * 0600.
 */
#ifndef FINALDOT_CONTROL_MAILDIR_H
#define FINALDOT_CONTROL_MAILDIR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Read up to n body bytes at offset off into buf: the count (may be less
 * than n), 0 at the end, or -errno. */
typedef long (*maildir_read_fn)(void *ctx, uint64_t off, void *buf, size_t n);

struct maildir_result {
	int status;     /* 0 delivered, else -errno */
	bool permanent; /* failure is permanent (bounce), else temporary */
	/* RFC 3463 enhanced status code: "2.0.0" delivered; "5.1.3" bad
	 * local part or domain; "4.2.2" EDQUOT (mailbox full); "4.3.1"
	 * ENOSPC (mail system full); "4.3.2" EROFS (system not accepting
	 * messages); "4.3.5" ROOT path too long; "4.3.0" any other I/O or
	 * body-source error. */
	char enh[8];
	/* One line for logs and DSNs: "delivered to maildir
	 * (new/1733.M123456P1234Q5.host)" or what failed and why. */
	char text[256];
	char path[1024]; /* delivered file's full path on success, else "" */
};

/*
 * Deliver one message of len body bytes, read through rd(rctx, ...).
 * prefix (e.g. "Return-Path: <s@x>\r\nDelivered-To: u@d\r\n"; may be
 * NULL) is written before the body. The body is stored with CRLF line
 * ends; Maildir files use LF, so every CRLF of prefix and body (one
 * stream) becomes LF while copying; a lone CR stays.
 *
 * Steps: write tmp/NAME (O_EXCL, 0600), fsync it, link it to new/NAME,
 * fsync new/, unlink tmp/NAME (not synced: a tmp/ name a power cut brings
 * back is a second link to a complete file, which readers clean up).
 * Before the file, every directory on the way (DOMAIN, LOCALPART, tmp,
 * new, cur) that this call made, or that is not the very directory this
 * process synced there before, is synced in its parent. NAME follows
 * the Maildir convention: SEC.MUSECPPIDQCOUNTER.HOST, HOST with '/' and
 * ':' written as \057 and \072 and other unsafe bytes as '_'.
 *
 * A body source that ends before len bytes, fails, or returns more than
 * asked is a temporary failure (4.3.0). On any failure no file is left in
 * tmp/ or new/. Once new/ is durable, the result is success even if
 * removing the tmp/ name fails (logged): reporting failure then would
 * cause a duplicate delivery on retry.
 *
 * Returns res->status. res is always filled in.
 */
int maildir_deliver(const char *root, const char *domain,
		    const char *localpart, const char *prefix,
		    maildir_read_fn rd, void *rctx, uint64_t len,
		    struct maildir_result *res);

#endif
