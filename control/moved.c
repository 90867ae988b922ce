/*
 * Moved messages: the file format and its writer and reader (moved.h).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "control/moved.h"
#include "finaldot/crc32c.h"
#include "finaldot/fsync.h"
#include "finaldot/spool_format.h"

/* Test seam (fd_delivery_fault()): no-moved-fsync leaves out the file's
 * fsync, no-moved-dirsync the directory's after the rename: the mutants
 * tests/crash/test_powercut_moved.py must catch. */
#define MOVED_MAGIC "FDMOVED1"
#define MOVED_VERSION 1u
#define COPY_BUF (256u * 1024)

void
moved_path(char *buf, size_t n, const char *spool_dir, uint64_t id, int tmp)
{
	snprintf(buf, n, "%s/" MOVED_DIR "/%s%016" PRIx64 "%s", spool_dir,
		 tmp ? ".tmp-" : "", id, tmp ? "" : ".msg");
}

static uint32_t
hdr_crc(const uint8_t *hdr, const uint8_t *env, size_t env_len)
{
	uint8_t h[MOVED_HDR_LEN];

	memcpy(h, hdr, sizeof(h));
	memset(h + 40, 0, 4);
	return fd_crc32c(fd_crc32c(0, h, sizeof(h)), env, env_len);
}

static int
write_all(int fd, const void *p, size_t n)
{
	const uint8_t *b = p;

	while (n > 0) {
		ssize_t k = write(fd, b, n);
		if (k < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		b += k;
		n -= (size_t)k;
	}
	return 0;
}

int
moved_write(const char *spool_dir, uint64_t id, unsigned worker,
	    const struct fd_envelope *env, uint64_t body_len,
	    uint32_t body_crc,
	    long (*read)(void *ctx, uint64_t off, void *buf, size_t n),
	    void *ctx, uint64_t *body_off)
{
	char tmp[4300], final[4300], dir[4200];
	size_t env_len = spool_env_encoded_len(env);
	uint8_t *buf = NULL, hdr[MOVED_HDR_LEN];
	uint64_t off = 0;
	int fd = -1, r;

	if (env_len == 0 || env_len > SPOOL_ENV_MAX)
		return -EINVAL;
	moved_path(tmp, sizeof(tmp), spool_dir, id, 1);
	moved_path(final, sizeof(final), spool_dir, id, 0);
	snprintf(dir, sizeof(dir), "%s/" MOVED_DIR, spool_dir);
	buf = malloc(env_len > COPY_BUF ? env_len : COPY_BUF);
	if (!buf)
		return -ENOMEM;
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0) {
		r = -errno;
		goto out;
	}
	memset(hdr, 0, sizeof(hdr));
	memcpy(hdr, MOVED_MAGIC, 8);
	spool_put32(hdr + 8, MOVED_VERSION);
	spool_put32(hdr + 12, worker);
	spool_put64(hdr + 16, id);
	spool_put64(hdr + 24, body_len);
	spool_put32(hdr + 32, body_crc);
	spool_put32(hdr + 36, (uint32_t)env_len);
	if (spool_env_encode(env, buf, env_len) != env_len) {
		r = -EINVAL;
		goto out;
	}
	spool_put32(hdr + 40, hdr_crc(hdr, buf, env_len));
	if ((r = write_all(fd, hdr, sizeof(hdr))) != 0 ||
	    (r = write_all(fd, buf, env_len)) != 0)
		goto out;
	/* The body: its reader checks the CRC on the last bytes, so a
	 * damaged copy is never moved (the segment's stays). */
	while (off < body_len) {
		size_t want = body_len - off < COPY_BUF ? (size_t)(body_len - off)
							: COPY_BUF;
		long k = read(ctx, off, buf, want);
		if (k < 0) {
			r = (int)k;
			goto out;
		}
		if (k == 0 || (size_t)k > want) {
			r = -EIO; /* short, or more than asked: a bad source */
			goto out;
		}
		if ((r = write_all(fd, buf, (size_t)k)) != 0)
			goto out;
		off += (uint64_t)k;
	}
	if (!fd_delivery_fault("no-moved-fsync") && fsync(fd) != 0) {
		r = -errno;
		goto out;
	}
	if (close(fd) != 0) {
		fd = -1;
		r = -errno;
		goto out;
	}
	fd = -1;
	if (rename(tmp, final) != 0) {
		r = -errno;
		goto out;
	}
	/* The name durable before the segment copy may go. */
	if (!fd_delivery_fault("no-moved-dirsync") &&
	    (r = fd_fsync_dir(dir)) != 0) {
		unlink(final);
		goto out_nounlink;
	}
	*body_off = MOVED_HDR_LEN + env_len;
	free(buf);
	return 0;
out:
	unlink(tmp);
out_nounlink:
	if (fd >= 0)
		close(fd);
	free(buf);
	return r;
}

size_t
moved_scratch_max(void)
{
	return spool_env_scratch_len(SPOOL_ENV_MAX);
}

/* n bytes at off (spool_read_fd()), or -EBADMSG where the file ends
 * before them. */
static int
read_at(int fd, void *p, size_t n, uint64_t off)
{
	long k = spool_read_fd(&fd, off, p, n);

	return k < 0 ? (int)k : (size_t)k == n ? 0 : -EBADMSG;
}

int
moved_read(int fd, uint64_t size, struct moved_info *mi, void *scratch,
	   size_t scratch_len)
{
	uint8_t hdr[MOVED_HDR_LEN], *env = NULL;
	uint32_t env_len;
	int r;

	memset(mi, 0, sizeof(*mi));
	if (size < MOVED_HDR_LEN)
		return -EBADMSG;
	if ((r = read_at(fd, hdr, sizeof(hdr), 0)) != 0)
		return r;
	if (memcmp(hdr, MOVED_MAGIC, 8) != 0 ||
	    spool_get32(hdr + 8) != MOVED_VERSION)
		return -EBADMSG;
	env_len = spool_get32(hdr + 36);
	mi->worker = spool_get32(hdr + 12);
	mi->id = spool_get64(hdr + 16);
	mi->body_len = spool_get64(hdr + 24);
	mi->body_crc = spool_get32(hdr + 32);
	mi->body_off = MOVED_HDR_LEN + (uint64_t)env_len;
	if (env_len == 0 || env_len > SPOOL_ENV_MAX ||
	    mi->body_len > size || size - mi->body_len != mi->body_off)
		return -EBADMSG;
	if (!(env = malloc(env_len)))
		return -ENOMEM;
	if ((r = read_at(fd, env, env_len, MOVED_HDR_LEN)) != 0)
		goto out;
	r = -EBADMSG;
	if (hdr_crc(hdr, env, env_len) != spool_get32(hdr + 40))
		goto out;
	/* The envelope's strings point into scratch, not into env. */
	if (spool_env_decode(env, env_len, &mi->env, scratch, scratch_len) !=
	    SPOOL_DEC_OK)
		goto out;
	r = 0;
out:
	free(env);
	return r;
}
