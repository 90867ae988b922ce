/*
 * fd-diskprobe: how fast can this disk make 4 KiB durable?
 *
 * finaldot answers 250 to the final dot only after the message's batch is on
 * stable storage (RFC 1047). The best its
 * one-connection latency can do is one durable write of the device, so this
 * probe measures that floor on the filesystem of the spool, the way the spool
 * writes (io_uring, one request at a time, each waited for):
 *
 *   overwrite   O_DIRECT write with RWF_DSYNC over blocks of a file that was
 *               zeroed and fsynced beforehand: no allocation, no size change,
 *               on XFS/NVMe a single FUA write. The physical floor.
 *   append      buffered write that grows the file + a linked fdatasync
 *               (IOSQE_IO_LINK): what a naive spool does. For contrast.
 *   fallocate   O_DIRECT + RWF_DSYNC into fallocate()d, never written
 *               blocks: each first write converts an unwritten extent, a
 *               metadata commit at the flush (measured: ~184 us
 *               against ~123 us into pre-zeroed blocks).
 *   overwrite_fsync
 *               the overwrite without RWF_DSYNC, with a linked fdatasync:
 *               the spool's other durable write (spool_sync). On a disk
 *               without FUA an RWF_DSYNC write completes through a kernel
 *               workqueue that, while the CPUs are busy, waits for the
 *               scheduler's tick (4 ms at HZ=250); this one does not.
 *
 *   seq         (--seq-mib N) N MiB in 1 MiB O_DIRECT + RWF_DSYNC writes,
 *               4 in flight, over a pre-zeroed file: the disk's sequential
 *               durable bandwidth, what the spool can reach with large
 *               messages (tools/bench's size sweep compares with it).
 *
 * Each mode writes --count requests of --size bytes after a short warm-up
 * and reports p50/p99/mean/min/max of the submit-to-completion time.
 * Requests rotate over a region of at most 64 MiB (overwrite) so a long run
 * does not measure one hot block only.
 *
 * Limits: the numbers are for this machine at this moment; on shared or
 * virtual disks they move by tens of percent between runs, so compare figures
 * taken side by side in one run (tools/bench does). ext4 still journals the
 * mtime update of an "overwrite" (a journal commit); the probe measures what the
 * filesystem does, it does not work around it.
 *
 * Exit: 0 measured, 1 error, 2 usage, 77 skipped (no O_DIRECT here, or the
 * directory is on a RAM filesystem where "durable" means nothing).
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <liburing.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <linux/magic.h>

#define PROBE_EXIT_SKIP 77
#define PROBE_WARMUP 16
#define PROBE_REGION_MAX (64u << 20)
#define PROBE_ALIGN 4096u

struct probe_opts {
	const char *dir;
	unsigned count;
	unsigned size;
	bool json;
	bool fallocate;
	unsigned seq_mib; /* 0: no sequential-bandwidth mode */
};

#define PROBE_SEQ_CHUNK (1u << 20)
#define PROBE_SEQ_DEPTH 4u

struct probe_stats {
	const char *mode;
	const char *what;
	bool done;
	double p50_us, p99_us, mean_us, min_us, max_us;
};

struct probe_files {
	char path[4][4096];
	int n;
};

static struct probe_files probe_files; /* removed at exit, whatever happens */

static void
probe_cleanup(void)
{
	for (int i = 0; i < probe_files.n; i++)
		if (probe_files.path[i][0])
			unlink(probe_files.path[i]);
}

static uint64_t
probe_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int
probe_cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return (x > y) - (x < y);
}

/* Nearest-rank percentile of a sorted array. */
static uint64_t
probe_pct(const uint64_t *v, size_t n, unsigned pct)
{
	size_t rank = (n * pct + 99) / 100;
	if (rank == 0)
		rank = 1;
	return v[rank - 1];
}

static void
probe_summarise(struct probe_stats *st, uint64_t *ns, size_t n)
{
	double sum = 0;
	qsort(ns, n, sizeof(ns[0]), probe_cmp_u64);
	for (size_t i = 0; i < n; i++)
		sum += (double)ns[i];
	st->p50_us = (double)probe_pct(ns, n, 50) / 1e3;
	st->p99_us = (double)probe_pct(ns, n, 99) / 1e3;
	st->mean_us = sum / (double)n / 1e3;
	st->min_us = (double)ns[0] / 1e3;
	st->max_us = (double)ns[n - 1] / 1e3;
	st->done = true;
}

static const char *
probe_fs_name(long type)
{
	switch ((unsigned long)type) {
	case EXT4_SUPER_MAGIC:
		return "ext4";
	case XFS_SUPER_MAGIC:
		return "xfs";
	case BTRFS_SUPER_MAGIC:
		return "btrfs";
	case TMPFS_MAGIC:
		return "tmpfs";
	case RAMFS_MAGIC:
		return "ramfs";
	case OVERLAYFS_SUPER_MAGIC:
		return "overlayfs";
	case F2FS_SUPER_MAGIC:
		return "f2fs";
	case NFS_SUPER_MAGIC:
		return "nfs";
	case FUSE_SUPER_MAGIC:
		return "fuse";
	default:
		return "other";
	}
}

/* Make a unique file in dir; its path is remembered for probe_cleanup(). */
static int
probe_open(const char *dir, const char *tag, int flags)
{
	if (probe_files.n >= 4)
		return -EMFILE;
	char *p = probe_files.path[probe_files.n];
	int len = snprintf(p, sizeof(probe_files.path[0]),
	                   "%s/.fd-diskprobe.%ld.%s", dir, (long)getpid(), tag);
	if (len < 0 || (size_t)len >= sizeof(probe_files.path[0]))
		return -ENAMETOOLONG;
	int fd = open(p, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | flags, 0600);
	if (fd < 0) {
		int e = errno;
		/* O_DIRECT refused at open: EINVAL (no file is left behind) */
		if (e == EINVAL && (flags & O_DIRECT))
			unlink(p);
		p[0] = '\0';
		return -e;
	}
	probe_files.n++;
	return fd;
}

static int
probe_fsync_dir(const char *dir)
{
	int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dfd < 0)
		return -errno;
	int rc = fsync(dfd) < 0 ? -errno : 0;
	close(dfd);
	return rc;
}

/* One write (and optionally a linked fdatasync), waited for. Returns ns. */
static int
probe_one(struct io_uring *ring, int fd, void *buf, unsigned size, uint64_t off,
          bool dsync, bool linked_fdatasync, uint64_t *ns)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
	unsigned want = 1;
	if (!sqe)
		return -EBUSY; /* the ring is empty between calls: cannot be */
	io_uring_prep_write(sqe, fd, buf, size, off);
	if (dsync)
		sqe->rw_flags = RWF_DSYNC;
	if (linked_fdatasync) {
		sqe->flags |= IOSQE_IO_LINK;
		sqe = io_uring_get_sqe(ring);
		if (!sqe)
			return -EBUSY;
		io_uring_prep_fsync(sqe, fd, IORING_FSYNC_DATASYNC);
		want = 2;
	}
	uint64_t t0 = probe_now_ns();
	int rc = io_uring_submit_and_wait(ring, want);
	if (rc < 0)
		return rc;
	int err = 0;
	for (unsigned i = 0; i < want; i++) {
		struct io_uring_cqe *cqe;
		rc = io_uring_wait_cqe(ring, &cqe);
		if (rc < 0)
			return rc;
		if (cqe->res < 0 && err == 0)
			err = cqe->res;
		else if (i == 0 && cqe->res >= 0 &&
		         (unsigned)cqe->res != size && err == 0)
			err = -EIO; /* short write */
		io_uring_cqe_seen(ring, cqe);
	}
	*ns = probe_now_ns() - t0;
	return err;
}

/* Fill a file with zeros up to len and make that durable (file and dir). */
static int
probe_prezero(int fd, const char *dir, void *zbuf, size_t zlen, uint64_t len)
{
	memset(zbuf, 0, zlen);
	for (uint64_t off = 0; off < len;) {
		size_t n = (size_t)(len - off < zlen ? len - off : zlen);
		ssize_t w = pwrite(fd, zbuf, n, (off_t)off);
		if (w < 0)
			return -errno;
		off += (uint64_t)w;
	}
	if (fsync(fd) < 0)
		return -errno;
	return probe_fsync_dir(dir);
}

static void
probe_stamp(void *buf, unsigned size, unsigned i)
{
	/* Different bytes each time, so nothing can elide the write. */
	memset(buf, (int)('a' + i % 26), size);
	memcpy(buf, &i, sizeof(i));
}

enum probe_mode { PM_OVERWRITE, PM_APPEND, PM_FALLOC, PM_OVERWRITE_FSYNC };

static int
probe_run(const struct probe_opts *o, struct io_uring *ring, enum probe_mode m,
          void *buf, void *zbuf, size_t zlen, uint64_t *ns,
          struct probe_stats *st)
{
	static const char *const tags[] = {"overwrite", "append", "falloc",
					   "overwrite-fsync"};
	unsigned total = o->count + PROBE_WARMUP;
	int flags = m == PM_APPEND ? 0 : O_DIRECT;
	int fd = probe_open(o->dir, tags[m], flags);
	if (fd < 0)
		return fd;
	int rc = 0;
	uint64_t region = 0;
	unsigned blocks = 0;
	/* durable by a linked fdatasync; the others by RWF_DSYNC */
	bool linked = m == PM_APPEND || m == PM_OVERWRITE_FSYNC;

	switch (m) {
	case PM_OVERWRITE:
	case PM_OVERWRITE_FSYNC:
		blocks = total;
		if ((uint64_t)blocks * o->size > PROBE_REGION_MAX)
			blocks = PROBE_REGION_MAX / o->size;
		if (blocks == 0)
			blocks = 1;
		region = (uint64_t)blocks * o->size;
		rc = probe_prezero(fd, o->dir, zbuf, zlen, region);
		break;
	case PM_FALLOC:
		/* every block written exactly once: never wrap */
		blocks = total;
		region = (uint64_t)blocks * o->size;
		if (fallocate(fd, 0, 0, (off_t)region) < 0)
			rc = -errno;
		else if (fsync(fd) < 0)
			rc = -errno;
		else
			rc = probe_fsync_dir(o->dir);
		break;
	case PM_APPEND:
		rc = probe_fsync_dir(o->dir);
		break;
	}
	if (rc < 0)
		goto out_close_fd;

	for (unsigned i = 0; i < total; i++) {
		uint64_t t;
		uint64_t off = m == PM_APPEND
		                       ? (uint64_t)i * o->size
		                       : (uint64_t)(i % blocks) * o->size;
		probe_stamp(buf, o->size, i);
		rc = probe_one(ring, fd, buf, o->size, off, !linked, linked,
		               &t);
		if (rc < 0)
			goto out_close_fd;
		if (i >= PROBE_WARMUP)
			ns[i - PROBE_WARMUP] = t;
	}
	probe_summarise(st, ns, o->count);
out_close_fd:
	close(fd);
	return rc;
}

/*
 * The sequential mode: seq_mib MiB over a pre-zeroed file in 1 MiB
 * O_DIRECT + RWF_DSYNC writes, PROBE_SEQ_DEPTH in flight. MB/s (10^6).
 */
static int
probe_seq(const struct probe_opts *o, struct io_uring *ring, void *zbuf,
	  size_t zlen, double *mb_s)
{
	uint64_t len = (uint64_t)o->seq_mib << 20, next = 0, done = 0;
	void *bufs[PROBE_SEQ_DEPTH] = {NULL};
	unsigned inflight = 0;
	uint64_t t0;
	int fd, rc = 0;

	fd = probe_open(o->dir, "seq", O_DIRECT);
	if (fd < 0)
		return fd;
	for (unsigned i = 0; i < PROBE_SEQ_DEPTH; i++) {
		if (posix_memalign(&bufs[i], PROBE_ALIGN, PROBE_SEQ_CHUNK)) {
			rc = -ENOMEM;
			goto out;
		}
		probe_stamp(bufs[i], PROBE_SEQ_CHUNK, i);
	}
	if ((rc = probe_prezero(fd, o->dir, zbuf, zlen, len)) < 0)
		goto out;
	t0 = probe_now_ns();
	while (done < len) {
		struct io_uring_cqe *cqe;

		while (inflight < PROBE_SEQ_DEPTH && next < len) {
			struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
			if (!sqe)
				break;
			io_uring_prep_write(sqe, fd, bufs[inflight],
					    PROBE_SEQ_CHUNK, next);
			sqe->rw_flags = RWF_DSYNC;
			next += PROBE_SEQ_CHUNK;
			inflight++;
		}
		if ((rc = io_uring_submit_and_wait(ring, 1)) < 0)
			goto out;
		rc = 0;
		while (io_uring_peek_cqe(ring, &cqe) == 0) {
			int res = cqe->res;
			io_uring_cqe_seen(ring, cqe);
			if (res < 0) {
				rc = res;
				goto out;
			}
			if ((unsigned)res != PROBE_SEQ_CHUNK) {
				rc = -EIO;
				goto out;
			}
			done += PROBE_SEQ_CHUNK;
			inflight--;
		}
	}
	*mb_s = (double)len / 1e6 /
		((double)(probe_now_ns() - t0) / 1e9);
out:
	/* Nothing in flight may point into a freed buffer. */
	while (inflight) {
		struct io_uring_cqe *cqe;
		if (io_uring_wait_cqe(ring, &cqe) < 0)
			break;
		io_uring_cqe_seen(ring, cqe);
		inflight--;
	}
	for (unsigned i = 0; i < PROBE_SEQ_DEPTH; i++)
		free(bufs[i]);
	close(fd);
	return rc;
}

static void
probe_usage(FILE *f)
{
	fprintf(f,
	        "usage: fd-diskprobe [--dir DIR] [--count N] [--size BYTES] "
	        "[--no-fallocate] [--seq-mib N] [--json]\n"
	        "\n"
	        "Measures durable-write latency on DIR's filesystem (put DIR "
	        "on "
	        "the spool's\nfilesystem), with io_uring, one request at a "
	        "time:\n"
	        "  overwrite  O_DIRECT + RWF_DSYNC over pre-zeroed blocks "
	        "(the physical floor)\n"
	        "  overwrite_fsync\n"
	        "             the same without RWF_DSYNC, with a linked "
	        "fdatasync (the spool's\n"
	        "             mode on disks without FUA); tools/bench takes "
	        "the faster of the\n"
	        "             two overwrites as the floor\n"
	        "  append     buffered appending write + linked fdatasync "
	        "(contrast)\n"
	        "  fallocate  O_DIRECT + RWF_DSYNC into fallocated blocks "
	        "(unless --no-fallocate)\n"
	        "\n"
	        "  --dir DIR       directory to probe (default .)\n"
	        "  --count N       measured writes per mode (default 2000), "
	        "after %d warm-up writes\n"
	        "  --size BYTES    bytes per write, a multiple of 4096 "
	        "(default 4096)\n"
	        "  --no-fallocate  skip the fallocate mode\n"
	        "  --seq-mib N     also the sequential durable bandwidth: N "
	        "MiB in 1 MiB\n"
	        "                  O_DIRECT + RWF_DSYNC writes, 4 in flight, "
	        "pre-zeroed file\n"
	        "  --json          one flat JSON object on stdout\n"
	        "  --help          this text\n"
	        "\n"
	        "Exit: 0 ok, 1 error, 2 usage, 77 skipped (no O_DIRECT, or a "
	        "RAM filesystem).\nTemporary files .fd-diskprobe.* in DIR are "
	        "removed.\n",
	        PROBE_WARMUP);
}

static int
probe_parse_uint(const char *s, unsigned *out)
{
	char *end;
	errno = 0;
	unsigned long v = strtoul(s, &end, 10);
	if (errno || end == s || *end || v == 0 || v > 100000000ul)
		return -1;
	*out = (unsigned)v;
	return 0;
}

static void
probe_print(const struct probe_opts *o, const char *fs,
            const struct probe_stats *st, size_t n, double seq_mb_s)
{
	if (o->json) {
		printf("{\"dir\":\"");
		for (const char *p = o->dir; *p; p++) {
			if (*p == '"' || *p == '\\')
				putchar('\\');
			if ((unsigned char)*p >= 0x20)
				putchar(*p);
		}
		printf("\",\"fs\":\"%s\",\"count\":%u,\"size\":%u", fs,
		       o->count, o->size);
		for (size_t i = 0; i < n; i++) {
			if (!st[i].done)
				continue;
			printf(",\"%s_p50_us\":%.1f,\"%s_p99_us\":%.1f,"
			       "\"%s_mean_us\":%.1f,\"%s_min_us\":%.1f,"
			       "\"%s_max_us\":%.1f",
			       st[i].mode, st[i].p50_us, st[i].mode,
			       st[i].p99_us, st[i].mode, st[i].mean_us,
			       st[i].mode, st[i].min_us, st[i].mode,
			       st[i].max_us);
		}
		if (o->seq_mib)
			printf(",\"seq_mib\":%u,\"seq_mb_s\":%.1f", o->seq_mib,
			       seq_mb_s);
		printf("}\n");
		return;
	}
	printf("fd-diskprobe: dir=%s fs=%s count=%u size=%u\n", o->dir, fs,
	       o->count, o->size);
	printf("%-15s %-36s %9s %9s %9s %9s %9s\n", "mode", "what", "p50 us",
	       "p99 us", "mean us", "min us", "max us");
	for (size_t i = 0; i < n; i++) {
		if (!st[i].done)
			continue;
		printf("%-15s %-36s %9.1f %9.1f %9.1f %9.1f %9.1f\n",
		       st[i].mode, st[i].what, st[i].p50_us, st[i].p99_us,
		       st[i].mean_us, st[i].min_us, st[i].max_us);
	}
	const struct probe_stats *ow = &st[PM_OVERWRITE], *ap = &st[PM_APPEND];
	if (ow->done && ap->done && ow->p50_us > 0)
		printf("append/overwrite p50 ratio: %.2f\n",
		       ap->p50_us / ow->p50_us);
	if (o->seq_mib)
		printf("seq: %u MiB in 1 MiB O_DIRECT+RWF_DSYNC writes, %u in "
		       "flight: %.1f MB/s\n", o->seq_mib, PROBE_SEQ_DEPTH,
		       seq_mb_s);
}

int
main(int argc, char **argv)
{
	struct probe_opts o = {
	        .dir = ".", .count = 2000, .size = 4096, .fallocate = true};
	static const struct option lopts[] = {
	        {"dir", required_argument, NULL, 'd'},
	        {"count", required_argument, NULL, 'n'},
	        {"size", required_argument, NULL, 's'},
	        {"json", no_argument, NULL, 'j'},
	        {"no-fallocate", no_argument, NULL, 'F'},
	        {"seq-mib", required_argument, NULL, 'S'},
	        {"help", no_argument, NULL, 'h'},
	        {NULL, 0, NULL, 0},
	};
	int c;
	while ((c = getopt_long(argc, argv, "d:n:s:jFS:h", lopts, NULL)) != -1) {
		switch (c) {
		case 'd':
			o.dir = optarg;
			break;
		case 'n':
			if (probe_parse_uint(optarg, &o.count) < 0) {
				fprintf(stderr, "fd-diskprobe: bad --count\n");
				return 2;
			}
			break;
		case 's':
			if (probe_parse_uint(optarg, &o.size) < 0 ||
			    o.size % PROBE_ALIGN != 0 || o.size > (64u << 20)) {
				fprintf(stderr, "fd-diskprobe: --size must be "
				                "a multiple of 4096, at most "
				                "64 MiB\n");
				return 2;
			}
			break;
		case 'j':
			o.json = true;
			break;
		case 'F':
			o.fallocate = false;
			break;
		case 'S':
			if (probe_parse_uint(optarg, &o.seq_mib) < 0 ||
			    o.seq_mib == 0 || o.seq_mib > 65536) {
				fprintf(stderr, "fd-diskprobe: --seq-mib must be "
				                "1..65536\n");
				return 2;
			}
			break;
		case 'h':
			probe_usage(stdout);
			return 0;
		default:
			probe_usage(stderr);
			return 2;
		}
	}
	if (optind != argc) {
		probe_usage(stderr);
		return 2;
	}

	struct statfs sfs;
	if (statfs(o.dir, &sfs) < 0) {
		fprintf(stderr, "fd-diskprobe: %s: %s\n", o.dir,
		        strerror(errno));
		return 1;
	}
	const char *fs = probe_fs_name(sfs.f_type);
	if ((unsigned long)sfs.f_type == TMPFS_MAGIC ||
	    (unsigned long)sfs.f_type == RAMFS_MAGIC) {
		printf("SKIP: %s is on %s: memory, not a durable disk\n", o.dir,
		       fs);
		return PROBE_EXIT_SKIP;
	}

	int rc = 1;
	size_t zlen = 1u << 20;
	void *buf = NULL, *zbuf = NULL;
	uint64_t *ns = calloc(o.count, sizeof(*ns));
	if (!ns || posix_memalign(&buf, PROBE_ALIGN, o.size) ||
	    posix_memalign(&zbuf, PROBE_ALIGN, zlen)) {
		fprintf(stderr, "fd-diskprobe: out of memory\n");
		goto out_free;
	}
	struct io_uring ring;
	int e = io_uring_queue_init(8, &ring, 0);
	if (e < 0) {
		fprintf(stderr, "fd-diskprobe: io_uring_queue_init: %s\n",
		        strerror(-e));
		if (e == -ENOSYS || e == -EPERM)
			rc = PROBE_EXIT_SKIP;
		goto out_free;
	}
	atexit(probe_cleanup);

	struct probe_stats st[4] = {
	        [PM_OVERWRITE] = {.mode = "overwrite",
	                          .what = "O_DIRECT+RWF_DSYNC, pre-zeroed"},
	        [PM_APPEND] = {.mode = "append",
	                       .what = "buffered append + fdatasync"},
	        [PM_FALLOC] = {.mode = "fallocate",
	                       .what = "O_DIRECT+RWF_DSYNC, fallocated"},
	        [PM_OVERWRITE_FSYNC] = {.mode = "overwrite_fsync",
	                       .what = "O_DIRECT pre-zeroed, linked fdatasync"},
	};
	for (int m = PM_OVERWRITE; m <= PM_OVERWRITE_FSYNC; m++) {
		if (m == PM_FALLOC && !o.fallocate)
			continue;
		e = probe_run(&o, &ring, (enum probe_mode)m, buf, zbuf, zlen,
		              ns, &st[m]);
		if (e == -EINVAL && m == PM_OVERWRITE) {
			/* refused at open(), or at the first aligned write */
			printf("SKIP: %s (%s) does not support O_DIRECT\n",
			       o.dir, fs);
			rc = PROBE_EXIT_SKIP;
			goto out_ring;
		}
		if (e == -EOPNOTSUPP && m == PM_FALLOC) {
			fprintf(stderr,
			        "fd-diskprobe: fallocate not "
			        "supported on %s, mode skipped\n",
			        fs);
			continue;
		}
		if (e < 0) {
			fprintf(stderr, "fd-diskprobe: %s: %s\n", st[m].mode,
			        strerror(-e));
			goto out_ring;
		}
	}
	double seq_mb_s = 0;
	if (o.seq_mib) {
		e = probe_seq(&o, &ring, zbuf, zlen, &seq_mb_s);
		if (e < 0) {
			fprintf(stderr, "fd-diskprobe: seq: %s\n", strerror(-e));
			goto out_ring;
		}
	}
	probe_print(&o, fs, st, 4, seq_mb_s);
	rc = 0;
out_ring:
	io_uring_queue_exit(&ring);
out_free:
	free(zbuf);
	free(buf);
	free(ns);
	return rc;
}
