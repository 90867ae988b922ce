/*
 * The spool reader (contract in spool_reader.h; format in
 * finaldot/spool_format.h and docs/spool-format.md).
 *
 * Order of work: list wNN directories and their *.seg files; read each
 * header; sort the valid segments of a worker by use sequence (the order the
 * writer used them, whatever their file numbers); walk each with
 * spool_walk_segment(); feed every valid record to the message table; then
 * keep the messages that pass the commit rule. A message's DATA records
 * must arrive in body order (the writer emits them so, in increasing batch
 * sequence, in increasing segment use order); anything else marks it broken.
 * The body CRC is assembled from the records' payload CRCs with
 * spool_crc32c_combine(), so no body byte is read twice during a scan.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "finaldot/crc32c.h"
#include "finaldot/log.h"
#include "finaldot/spool_format.h"
#include "spool_reader.h"

#define WIN_LEN (1u << 20)

enum { MS_ENV = 1, MS_END = 2, MS_BROKEN = 4 };

struct mstate {
	uint64_t id;
	unsigned worker;
	unsigned flags;
	uint8_t *env_raw;
	size_t env_len;
	uint64_t next_off;
	uint32_t crc;
	uint64_t total;
	uint32_t end_crc;
	uint32_t env_seg, end_seg;
	uint64_t env_off, end_off;
	struct ctl_spool_piece *pieces;
	size_t n_pieces, cap_pieces;
};

struct segent {
	struct ctl_spool_seg pub;
	char *path;
	uint64_t epoch;
	uint64_t walk_size;
};

struct ctl_spool_scan {
	struct ctl_spool_summary sum;
	struct segent *segs;
	size_t nsegs, cap_segs;
	const uint8_t *mem; /* in-memory segment */
	size_t mem_len;

	struct mstate *ms;
	size_t nms, cap_ms;
	size_t *hash; /* index + 1, 0 empty */
	size_t hash_cap;

	struct ctl_spool_msg *out; /* committed, sorted by id */
	void **scratch;            /* their envelope storage */
	size_t nout;
	uint32_t cur_seg;
};

/* ---- message table ----------------------------------------------------- */

static size_t
hash_id(uint64_t id, size_t cap)
{
	id ^= id >> 33;
	id *= 0xff51afd7ed558ccdull;
	id ^= id >> 33;
	return (size_t)id & (cap - 1);
}

static int
hash_grow(struct ctl_spool_scan *s)
{
	size_t cap = s->hash_cap ? s->hash_cap * 2 : 1024;
	size_t *h = calloc(cap, sizeof(*h));

	if (!h)
		return -ENOMEM;
	for (size_t i = 0; i < s->nms; i++) {
		size_t j = hash_id(s->ms[i].id, cap);
		while (h[j])
			j = (j + 1) & (cap - 1);
		h[j] = i + 1;
	}
	free(s->hash);
	s->hash = h;
	s->hash_cap = cap;
	return 0;
}

static struct mstate *
mstate_get(struct ctl_spool_scan *s, uint64_t id, unsigned worker)
{
	size_t j;

	if ((s->nms + 1) * 2 > s->hash_cap && hash_grow(s) != 0)
		return NULL;
	j = hash_id(id, s->hash_cap);
	while (s->hash[j]) {
		struct mstate *m = &s->ms[s->hash[j] - 1];
		if (m->id == id)
			return m;
		j = (j + 1) & (s->hash_cap - 1);
	}
	if (s->nms == s->cap_ms) {
		size_t cap = s->cap_ms ? s->cap_ms * 2 : 256;
		struct mstate *n = realloc(s->ms, cap * sizeof(*n));
		if (!n)
			return NULL;
		s->ms = n;
		s->cap_ms = cap;
	}
	struct mstate *m = &s->ms[s->nms];
	memset(m, 0, sizeof(*m));
	m->id = id;
	m->worker = worker;
	s->hash[j] = ++s->nms;
	return m;
}

static int
on_record(void *ctx, const struct spool_walk_rec *r)
{
	struct ctl_spool_scan *s = ctx;
	struct segent *seg = &s->segs[s->cur_seg];
	unsigned w = seg->pub.worker;
	struct mstate *m = mstate_get(s, r->h.msgid, w);

	if (!m)
		return -ENOMEM;
	if (w < 256 && r->h.msgid > s->sum.max_msgid[w])
		s->sum.max_msgid[w] = r->h.msgid;
	switch ((enum spool_rec_type)r->h.type) {
	case SPOOL_REC_ENV:
		if (m->flags & (MS_ENV | MS_END) || m->n_pieces) {
			m->flags |= MS_BROKEN;
			break;
		}
		m->env_raw = malloc(r->h.len);
		if (!m->env_raw)
			return -ENOMEM;
		memcpy(m->env_raw, r->payload, r->h.len);
		m->env_len = r->h.len;
		m->flags |= MS_ENV;
		m->env_seg = s->cur_seg;
		m->env_off = r->off;
		break;
	case SPOOL_REC_DATA:
		if (m->flags & MS_END || r->h.offset != m->next_off) {
			m->flags |= MS_BROKEN;
			break;
		}
		if (m->n_pieces == m->cap_pieces) {
			size_t cap = m->cap_pieces ? m->cap_pieces * 2 : 2;
			struct ctl_spool_piece *n =
				realloc(m->pieces, cap * sizeof(*n));
			if (!n)
				return -ENOMEM;
			m->pieces = n;
			m->cap_pieces = cap;
		}
		m->pieces[m->n_pieces++] = (struct ctl_spool_piece){
			.seg = s->cur_seg,
			.len = r->h.len,
			.file_off = r->off + SPOOL_REC_HDR_LEN,
			.body_off = r->h.offset,
		};
		m->crc = spool_crc32c_combine(m->crc, r->payload_crc, r->h.len);
		m->next_off += r->h.len;
		break;
	case SPOOL_REC_END:
		if (m->flags & MS_END) {
			m->flags |= MS_BROKEN;
			break;
		}
		m->flags |= MS_END;
		m->total = r->h.offset;
		m->end_crc = r->h.aux;
		m->end_seg = s->cur_seg;
		m->end_off = r->off;
		break;
	}
	return 0;
}

/* ---- sources ----------------------------------------------------------- */

struct src {
	int fd;
	const uint8_t *mem;
	size_t mem_len;
};

static long
src_read(void *ctx, uint64_t off, void *buf, size_t n)
{
	struct src *sr = ctx;

	if (!sr->mem)
		return spool_read_fd(&sr->fd, off, buf, n);
	if (off >= sr->mem_len)
		return 0;
	if (n > sr->mem_len - off)
		n = (size_t)(sr->mem_len - off);
	memcpy(buf, sr->mem + off, n);
	return (long)n;
}

/* ---- scanning ---------------------------------------------------------- */

static struct segent *
seg_add(struct ctl_spool_scan *s)
{
	if (s->nsegs == s->cap_segs) {
		size_t cap = s->cap_segs ? s->cap_segs * 2 : 16;
		struct segent *n = realloc(s->segs, cap * sizeof(*n));
		if (!n)
			return NULL;
		s->segs = n;
		s->cap_segs = cap;
	}
	struct segent *e = &s->segs[s->nsegs++];
	memset(e, 0, sizeof(*e));
	return e;
}

/* Read and check one header; fills e. */
static void
seg_probe(struct segent *e, struct src *sr, uint64_t avail)
{
	uint8_t hb[SPOOL_SEG_HDR_LEN];
	struct spool_seg_hdr h;

	if (src_read(sr, 0, hb, sizeof(hb)) != (long)sizeof(hb) ||
	    spool_seg_hdr_decode(hb, sizeof(hb), &h) != SPOOL_DEC_OK)
		return;
	e->pub.header_ok = true;
	e->pub.file_no = h.file_no;
	e->pub.use_seq = h.use_seq;
	e->pub.size = h.size;
	e->pub.created_us = h.created_us;
	if (!e->path)
		e->pub.worker = h.worker;
	e->epoch = h.epoch;
	e->walk_size = h.size < avail ? h.size : avail;
}

static int
list_worker(struct ctl_spool_scan *s, const char *root, const char *wname,
	    unsigned worker)
{
	char wdir[4096];
	DIR *d;
	struct dirent *e;

	snprintf(wdir, sizeof(wdir), "%s/%s", root, wname);
	d = opendir(wdir);
	if (!d)
		return 0;
	s->sum.workers++;
	while ((e = readdir(d))) {
		size_t l = strlen(e->d_name);
		char path[4400];
		struct segent *se;
		struct stat st;
		struct src sr = { .fd = -1 };

		if (l < 5 || strcmp(e->d_name + l - 4, ".seg") != 0)
			continue;
		snprintf(path, sizeof(path), "%s/%s", wdir, e->d_name);
		if (!(se = seg_add(s))) {
			closedir(d);
			return -ENOMEM;
		}
		se->path = strdup(path);
		se->pub.path = se->path;
		se->pub.worker = worker;
		sr.fd = open(path, O_RDONLY | O_CLOEXEC);
		if (sr.fd >= 0 && fstat(sr.fd, &st) == 0)
			seg_probe(se, &sr, (uint64_t)st.st_size);
		if (sr.fd >= 0)
			close(sr.fd);
		if (se->pub.header_ok && se->pub.worker != worker)
			se->pub.header_ok = false; /* misplaced file */
	}
	closedir(d);
	return 0;
}

static int
seg_cmp(const void *a, const void *b)
{
	const struct segent *x = a, *y = b;

	if (x->pub.header_ok != y->pub.header_ok)
		return x->pub.header_ok ? -1 : 1;
	if (x->pub.worker != y->pub.worker)
		return x->pub.worker < y->pub.worker ? -1 : 1;
	if (x->pub.use_seq != y->pub.use_seq)
		return x->pub.use_seq < y->pub.use_seq ? -1 : 1;
	return x->pub.file_no < y->pub.file_no	 ? -1
	       : x->pub.file_no > y->pub.file_no ? 1
						 : 0;
}

static int
msg_cmp(const void *a, const void *b)
{
	const struct ctl_spool_msg *x = a, *y = b;

	return x->id < y->id ? -1 : x->id > y->id ? 1 : 0;
}

static int
walk_all(struct ctl_spool_scan *s)
{
	uint8_t *win = malloc(WIN_LEN);
	int r = 0;

	if (!win)
		return -ENOMEM;
	if (s->nsegs > 1)
		qsort(s->segs, s->nsegs, sizeof(*s->segs), seg_cmp);
	for (size_t i = 0; i < s->nsegs; i++) {
		struct segent *e = &s->segs[i];
		struct src sr = { .fd = -1, .mem = s->mem, .mem_len = s->mem_len };
		struct spool_walk w;

		e->pub.path = e->path;
		s->sum.segments++;
		if (!e->pub.header_ok) {
			s->sum.segments_bad++;
			continue;
		}
		if (e->path && (sr.fd = open(e->path, O_RDONLY | O_CLOEXEC)) < 0) {
			s->sum.segments_bad++;
			continue;
		}
		memset(&w, 0, sizeof(w));
		w.read = src_read;
		w.read_ctx = &sr;
		w.size = e->walk_size;
		w.epoch = e->epoch;
		w.win = win;
		w.win_len = WIN_LEN;
		s->cur_seg = (uint32_t)i;
		r = spool_walk_segment(&w, on_record, s);
		if (sr.fd >= 0)
			close(sr.fd);
		e->pub.records_ok = w.records_ok;
		e->pub.records_bad = w.records_bad;
		e->pub.records_stale = w.records_stale;
		s->sum.records_ok += w.records_ok;
		s->sum.records_bad += w.records_bad;
		s->sum.records_stale += w.records_stale;
		if (w.records_ok == 0)
			s->sum.segments_empty++;
		if (r == -ENOMEM)
			break;
		if (r < 0) { /* read error: count the segment, go on */
			s->sum.segments_bad++;
			r = 0;
		}
	}
	free(win);
	return r;
}

static void
mark_seg(struct ctl_spool_scan *s, uint32_t seg, uint32_t *last)
{
	if (seg != *last) {
		s->segs[seg].pub.committed++;
		*last = seg;
	}
}

static int
finish(struct ctl_spool_scan *s)
{
	s->out = calloc(s->nms ? s->nms : 1, sizeof(*s->out));
	s->scratch = calloc(s->nms ? s->nms : 1, sizeof(*s->scratch));
	if (!s->out || !s->scratch)
		return -ENOMEM;
	for (size_t i = 0; i < s->nms; i++) {
		struct mstate *m = &s->ms[i];
		struct ctl_spool_msg *o = &s->out[s->nout];
		size_t sl;
		void *scr;

		if (m->flags != (MS_ENV | MS_END) || m->next_off != m->total ||
		    m->crc != m->end_crc) {
			s->sum.msgs_incomplete++;
			continue;
		}
		sl = spool_env_scratch_len(m->env_len);
		scr = malloc(sl);
		if (!scr)
			return -ENOMEM;
		if (spool_env_decode(m->env_raw, m->env_len, &o->env, scr, sl) !=
		    SPOOL_DEC_OK) {
			free(scr);
			s->sum.msgs_incomplete++;
			continue;
		}
		s->scratch[s->nout] = scr;
		o->id = m->id;
		o->worker = m->worker;
		o->body_len = m->total;
		o->body_crc = m->crc;
		o->env_seg = m->env_seg;
		o->env_off = m->env_off;
		o->end_seg = m->end_seg;
		o->end_off = m->end_off;
		o->n_pieces = m->n_pieces;
		o->pieces = m->pieces;
		s->nout++;
		s->sum.msgs_committed++;
		s->sum.body_bytes += m->total;
		uint32_t last = UINT32_MAX;
		mark_seg(s, m->env_seg, &last);
		for (size_t k = 0; k < m->n_pieces; k++)
			mark_seg(s, m->pieces[k].seg, &last);
		mark_seg(s, m->end_seg, &last);
	}
	/* Keep the pieces of committed messages only (now owned via out). */
	for (size_t i = 0; i < s->nms; i++) {
		free(s->ms[i].env_raw);
		s->ms[i].env_raw = NULL;
	}
	if (s->nout > 1)
		qsort(s->out, s->nout, sizeof(*s->out), msg_cmp);
	/* scratch[] no longer lines up with out[] after the sort; it is only
	 * a list of blocks to free. */
	free(s->hash);
	s->hash = NULL;
	s->hash_cap = 0;
	return 0;
}

void
ctl_spool_scan_free(struct ctl_spool_scan *s)
{
	if (!s)
		return;
	for (size_t i = 0; i < s->nms; i++) {
		free(s->ms[i].env_raw);
		free(s->ms[i].pieces);
	}
	for (size_t i = 0; s->scratch && i < s->nout; i++)
		free(s->scratch[i]);
	for (size_t i = 0; i < s->nsegs; i++)
		free(s->segs[i].path);
	free(s->scratch);
	free(s->out);
	free(s->ms);
	free(s->hash);
	free(s->segs);
	free(s);
}

struct ctl_spool_scan *
ctl_spool_scan_dir(const char *root, int *err)
{
	struct ctl_spool_scan *s = calloc(1, sizeof(*s));
	DIR *d;
	struct dirent *e;
	int r = 0;

	if (!s) {
		*err = -ENOMEM;
		return NULL;
	}
	d = opendir(root);
	if (!d) {
		*err = -errno;
		free(s);
		return NULL;
	}
	while ((e = readdir(d))) {
		char *end;
		unsigned long w;

		if (e->d_name[0] != 'w' || strlen(e->d_name) != 3)
			continue;
		w = strtoul(e->d_name + 1, &end, 16);
		if (*end || w > 255)
			continue;
		if ((r = list_worker(s, root, e->d_name, (unsigned)w)) != 0)
			break;
	}
	closedir(d);
	if (r == 0)
		r = walk_all(s);
	if (r == 0)
		r = finish(s);
	if (r) {
		ctl_spool_scan_free(s);
		*err = r;
		return NULL;
	}
	return s;
}

struct ctl_spool_scan *
ctl_spool_scan_mem(const void *p, size_t n)
{
	struct ctl_spool_scan *s = calloc(1, sizeof(*s));
	struct segent *e;
	struct src sr = { .fd = -1, .mem = p, .mem_len = n };

	if (!s)
		return NULL;
	s->mem = p;
	s->mem_len = n;
	if (!(e = seg_add(s)))
		goto fail;
	seg_probe(e, &sr, n);
	s->sum.workers = 1;
	if (walk_all(s) != 0 || finish(s) != 0)
		goto fail;
	return s;
fail:
	ctl_spool_scan_free(s);
	return NULL;
}

/* ---- queries ----------------------------------------------------------- */

const struct ctl_spool_summary *
ctl_spool_scan_summary(const struct ctl_spool_scan *s)
{
	return &s->sum;
}

void
ctl_spool_scan_log(const struct ctl_spool_scan *s)
{
	const struct ctl_spool_summary *m = &s->sum;

	fd_log(FD_LOG_INFO, "spool",
	       "event=recovery workers=%u segments=%" PRIu64
	       " segments_bad=%" PRIu64 " segments_empty=%" PRIu64
	       " records_ok=%" PRIu64 " records_bad=%" PRIu64
	       " records_stale=%" PRIu64 " committed=%" PRIu64
	       " incomplete=%" PRIu64 " bytes=%" PRIu64,
	       m->workers, m->segments, m->segments_bad, m->segments_empty,
	       m->records_ok, m->records_bad, m->records_stale,
	       m->msgs_committed, m->msgs_incomplete, m->body_bytes);
}

size_t
ctl_spool_scan_count(const struct ctl_spool_scan *s)
{
	return s->nout;
}

const struct ctl_spool_msg *
ctl_spool_scan_msg(const struct ctl_spool_scan *s, size_t i)
{
	return i < s->nout ? &s->out[i] : NULL;
}

const struct ctl_spool_msg *
ctl_spool_scan_find(const struct ctl_spool_scan *s, uint64_t id)
{
	size_t lo = 0, hi = s->nout;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		if (s->out[mid].id == id)
			return &s->out[mid];
		if (s->out[mid].id < id)
			lo = mid + 1;
		else
			hi = mid;
	}
	return NULL;
}

size_t
ctl_spool_scan_nsegs(const struct ctl_spool_scan *s)
{
	return s->nsegs;
}

const struct ctl_spool_seg *
ctl_spool_scan_segment(const struct ctl_spool_scan *s, size_t i)
{
	return i < s->nsegs ? &s->segs[i].pub : NULL;
}

int
ctl_spool_read_body(const struct ctl_spool_scan *s,
		    const struct ctl_spool_msg *m, ctl_spool_body_fn fn,
		    void *ctx)
{
	uint8_t *buf = malloc(1u << 16);
	struct src sr = { .fd = -1, .mem = s->mem, .mem_len = s->mem_len };
	uint32_t open_seg = UINT32_MAX, crc = 0;
	int r = 0;

	if (!buf)
		return -ENOMEM;
	for (size_t i = 0; i < m->n_pieces && r == 0; i++) {
		const struct ctl_spool_piece *pc = &m->pieces[i];
		uint64_t off = pc->file_off, left = pc->len;

		if (!s->mem && pc->seg != open_seg) {
			if (sr.fd >= 0)
				close(sr.fd);
			sr.fd = open(s->segs[pc->seg].path, O_RDONLY | O_CLOEXEC);
			if (sr.fd < 0) {
				r = -errno;
				break;
			}
			open_seg = pc->seg;
		}
		while (left && r == 0) {
			size_t k = left < (1u << 16) ? (size_t)left : (1u << 16);
			long got = src_read(&sr, off, buf, k);
			if (got < 0) {
				r = (int)got;
				break;
			}
			if ((size_t)got != k) {
				r = -EIO;
				break;
			}
			crc = fd_crc32c(crc, buf, k);
			r = fn(ctx, buf, k);
			off += k;
			left -= k;
		}
	}
	if (sr.fd >= 0)
		close(sr.fd);
	free(buf);
	if (r == 0 && crc != m->body_crc)
		r = -EIO;
	return r;
}
