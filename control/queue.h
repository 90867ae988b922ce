/*
 * The queue: the control plane's in-memory picture of every accepted
 * message that is not finished, and of the spool segments holding them
 * (private to the control plane: qmgr.c owns it, tail.c fills it, deliver.c
 * reads the immutable parts of a message while a job for it runs).
 *
 * Ownership and threads: one queue-manager thread owns every struct here
 * and is the only one that changes them. A delivery thread gets a job that
 * points at a message; while any job for a message is out (msg->jobs > 0)
 * the queue manager never frees the message, its envelope, its pieces or
 * the segment descriptors they name, and never changes them: the envelope,
 * pieces and body are immutable after the message is queued. Per-recipient
 * state is changed only by the queue manager, from job results.
 *
 * A segment (struct q_seg) is referenced by every queued message with a
 * record in it and by every partial message the tailer is assembling; it
 * goes back to its worker (reclaim) only when it is sealed (the worker
 * writes elsewhere and the tailer walked all of it) and nothing references
 * it, and only after the delivery log made every finished message's outcome
 * durable (the spool shrinks only behind the log).
 */
#ifndef FINALDOT_CONTROL_QUEUE_H
#define FINALDOT_CONTROL_QUEUE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "finaldot/envelope.h"

struct route_target;

enum q_rstate {
	QR_PENDING = 0,  /* to be delivered (first time or retry) */
	QR_DELIVERED,    /* next hop accepted it */
	QR_BOUNCED,      /* permanent failure: DSN due (NOTIFY permitting) */
	QR_EXPIRED,      /* queue lifetime over: DSN due */
	QR_DELETED,      /* operator deleted it */
	QR_SUPPRESSED,   /* resend of an in-doubt message (issue: RFC 1047) */
};
const char *q_rstate_name(enum q_rstate s);

struct q_seg {
	unsigned worker;
	uint64_t file_no;
	uint64_t use_seq;
	int fd;           /* O_RDONLY, for the bodies; -1 until opened */
	uint32_t refs;    /* queued messages + tailer partials with records */
	uint32_t msgs;    /* message objects naming it, released ones too */
	bool sealed;      /* the worker left it and the tailer walked it all */
	uint64_t sealed_us; /* when (monotonic), for moving what it holds */
	/* a message's own file in spool/moved/ (qmgr.c, "moved messages"):
	 * worker is Q_MOVED_WORKER, use_seq the message id; no reclaim: the
	 * file is deleted when nothing references it */
	bool moved;
	bool reclaim_sent;
	bool reclaimed;   /* RECLAIMED heard: its records are stale now */
	struct q_seg *hnext;
	char path[4200];
};

#define Q_MOVED_WORKER 0xffffffffu

struct q_piece {
	struct q_seg *seg;
	uint64_t file_off; /* of the payload in the segment file */
	uint32_t len;
};

struct q_dest;

/* A success DSN owed (RFC 3461 4.1, 6.2.6.3): delivered into a mailbox
 * (Maildir, or an LMTP server without DSN), or relayed to an SMTP next
 * hop without DSN. Also the DELIVERED record's aux. */
enum { Q_SUCCESS_NONE, Q_SUCCESS_DELIVERED, Q_SUCCESS_RELAYED };

struct q_rcpt {
	const char *addr;   /* in the message's arena */
	const char *orcpt;  /* ORCPT as received, or "" */
	uint8_t notify;     /* enum fd_dsn_notify bits; 0 = not given */
	uint8_t state;      /* enum q_rstate */
	bool busy;          /* in a job now */
	bool inflight;      /* that job is out to a delivery thread */
	bool dsn_done;      /* a DSN about it went out or is not wanted */
	uint8_t success;    /* DELIVERED with NOTIFY=SUCCESS and nobody
			     * further to report it: Q_SUCCESS_* */
	bool attempt_open;  /* replay: an ATTEMPT without an outcome */
	uint32_t attempts;
	uint64_t next_us;   /* earliest next attempt (PENDING) */
	uint64_t last_us;   /* last attempt */
	char *reason;       /* last reply or reason (malloc'd) or NULL */
	bool remote;        /* that is the next hop's reply (DLOG_AUX_REMOTE) */
	struct q_dest *dest;
};

struct q_msg {
	uint64_t id;
	unsigned worker;
	uint64_t arrival_us;
	uint64_t body_len;
	uint32_t body_crc;
	uint32_t route_gen; /* cplane route_gen its next hops were taken at */
	const char *sender; /* "" = null sender */
	const char *envid;  /* "" none */
	const char *helo;
	const char *client;
	uint8_t ret;        /* enum fd_dsn_ret */
	uint8_t body_type;  /* enum fd_body_type */
	bool smtputf8;
	unsigned n_rcpts;
	struct q_rcpt *rcpts;
	size_t n_pieces;
	struct q_piece *pieces;
	unsigned n_segs;
	struct q_seg **segs; /* distinct segments with a record of it */
	/* moved (qmgr.c): the segments it was copied out of, no longer
	 * referenced but still holding its records until reclaimed: the
	 * message (and its delivery-log state) is kept until they are (an
	 * id, not a pointer: a reclaimed segment's object is freed) */
	unsigned n_old_segs;
	struct q_seg_id { unsigned worker; uint64_t use_seq; } *old_segs;

	/* RFC 1047 dedup (qmgr.c): SHA-256 over the envelope and the body
	 * after our Received header (struct q_fp); computed only when needed
	 * (qmgr.c msg_fp): fp_ok once computed, fp_tried once tried */
	uint8_t fp[32];
	bool fp_ok;
	bool fp_tried;
	bool indoubt;          /* its 250 may not have arrived */
	uint64_t settle_until; /* held for a resend to be matched */
	uint64_t dup_of;       /* suppressed as a resend of this message */

	/* queue manager only */
	bool held;
	bool moving;       /* a QJ_MOVE job is out: no other job meanwhile */
	bool finished;     /* every recipient final, DSN settled */
	bool released;     /* its segment references are dropped */
	unsigned jobs;     /* jobs out for it */
	bool bounce_busy;
	uint32_t bounce_attempts;
	uint64_t bounce_next_us;
	uint64_t next_us;  /* heap key: the earliest due recipient/bounce */
	size_t heap_idx;   /* + 1; 0 = not in the heap */
	uint64_t final_lsn;
	struct q_msg *hnext;
	uint64_t ekey;       /* env_key(): sender and recipients hashed */
	struct q_msg *enext; /* qmgr.c ekey_h chain */
	/* the pointer that points at m in that chain (the bucket or the
	 * previous one's enext): out of it in O(1), where a walk of the
	 * chain was O(messages with the same envelope) per message freed,
	 * quadratic in a backlog from one sender to one recipient */
	struct q_msg **eprev;
	struct q_msg *fnext; /* finished list */
	/* the arena (strings, arrays) follows the struct */
};

/*
 * A destination: one next hop (a route target; its text is the key), with
 * Postfix-style concurrency feedback (qmgr.c). The target is immutable;
 * the counters belong to the queue manager.
 */
struct q_dest {
	char key[600];
	int kind;           /* enum route_kind */
	char host[256];
	uint16_t port;
	char path[512];
	int tls;            /* enum route_tls, DEFAULT resolved at start */
	char tls_ca[256];   /* "" : the system CA store */
	/* scheduler (queue manager only) */
	unsigned active;    /* jobs out */
	/* concurrency window, 1..max: connections (delivery threads) at
	 * once, each with up to QJ_BATCH jobs */
	double limit;
	/* under the queue manager's mutex: jobs of this destination waiting
	 * in the hand-out list, delivery threads working for it, and the
	 * window as a whole number for them (copied from limit) */
	unsigned listed_jobs, conns, conn_cap;
	/* a fast next hop (a batch's wire time, QJ_BATCH * job_us, below
	 * COALESCE_US, qmgr.c): its jobs wait for a thread already working
	 * for it, in batches, rather than each waking a thread of its own;
	 * copied under the mutex by dispatch */
	bool coalesce;
	double job_us;   /* queue manager only: moving average of wire_us */
	uint64_t batches; /* queue manager only: batches taken (metrics) */
	unsigned fail_streak; /* connection-level failures in a row */
	unsigned cohort;      /* failures in a row that make it dead: its
			       * window when the streak began (at least 2) */
	uint64_t dead_until;  /* no attempt before this (dead destination) */
	char *dead_reason;
	struct q_job *fresh_head, *fresh_tail; /* first attempts */
	struct q_job *retry_head, *retry_tail; /* retries and bounces */
	bool flip;          /* alternate fresh/retry */
	bool listed;        /* on the ready list */
	struct q_dest *next_ready;
	struct q_dest *hnext;
	uint64_t delivered, deferred, bounced;
	uint64_t lat[18];   /* delivery latency (cplane.h cp_route_stats) */
	uint64_t lat_sum_ns;
	/* /metrics (queue manager only): 0 until it first has traffic, then
	 * 1 + the index of its own series, or CP_ROUTES_PUB + 1: counted in
	 * "other". Never changes after that: a counter that moved between
	 * series would go down in one of them. */
	unsigned pub;
};

/* QJ_MOVE: copy the message to its own file in spool/moved/ (qmgr.c,
 * "moved messages"); no recipients, no record in the delivery log. */
enum q_job_kind { QJ_DELIVER = 1, QJ_BOUNCE = 2, QJ_MOVE = 3 };
enum q_out { QO_DELIVERED = 1, QO_DEFERRED = 2, QO_BOUNCED = 3 };

struct q_outcome {
	uint8_t out;      /* enum q_out */
	bool remote;      /* text is the next hop's own reply */
	bool dsn_passed;  /* delivered to a next hop that offered DSN: the
			   * recipient's NOTIFY went with it (RFC 3461 4.3) */
	char enh[16];
	char text[512];
};

#define QJ_MAX_RCPTS 64u
/* Jobs a delivery thread takes at once for one next hop: their attempts go
 * on record with one wait for the delivery log, and SMTP/LMTP pipelines
 * them over one connection (smtpc_send_many). QJ_BATCH for a slow next
 * hop (and the unit of its window: jobs out <= window * QJ_BATCH);
 * QJ_BATCH_FAST for a fast one (q_dest.coalesce), where each batch's
 * fixed cost (wake-ups, the delivery log's wait, the reply round trip:
 * ~65 us here) is what is left to share out: 32 instead of 16 halved the
 * delivery threads' context switches. */
#define QJ_BATCH 16u
#define QJ_BATCH_FAST 32u

/* What a delivery thread found out. Only a job handed to a delivery thread
 * carries one (made by the queue manager when it hands the job out, freed
 * when it applies it): a queued job stays small, so a backlog of a million
 * due messages costs tens of megabytes of jobs, not tens of gigabytes
 * (an outcome is half a kilobyte and a job may have 64 recipients). */
struct q_result {
	char relay[256];        /* the peer that answered, for logs and DSNs */
	char tls[200];          /* how (smtpc_tls_desc), "" in the clear */
	/* the message's fingerprint, computed while its body streamed
	 * (q_job.want_fp): the queue manager then need not read it again */
	bool fp_ok;
	uint8_t fp[32];
	/* QJ_MOVE: 0 when spool/moved/ID.msg is durable, its body at
	 * move_body_off; else -errno */
	int move_err;
	uint64_t move_body_off;
	struct q_outcome out[]; /* the job's n (QJ_BOUNCE: one) */
};

/*
 * One delivery attempt: recipients of one message for one destination
 * (QJ_DELIVER), or the DSN about the recipients idx[] to the message's
 * sender (QJ_BOUNCE). The queue manager fills the first part; the delivery
 * thread fills the results; the job then goes back.
 */
struct q_job {
	enum q_job_kind kind;
	struct q_msg *m;
	struct q_dest *dest;
	bool fresh; /* first attempt of these recipients */
	/* results */
	bool conn_failed;  /* the next hop could not be reached/used */
	bool dup_risk;     /* the final dot went out, the reply was lost */
	bool damaged;      /* the body read back damaged (q_body.damaged) */
	/* one failure of a batch (a connection that could not be made) is
	 * one failure for the concurrency window, not one per job */
	bool no_feedback;
	bool want_fp;      /* compute the message's fingerprint on the way */
	unsigned n;        /* recipients in idx[] (1..QJ_MAX_RCPTS) */
	uint64_t attempt_lsn;
	uint64_t listed_us; /* handed out for the threads (monotonic) */
	uint64_t taken_us;  /* a delivery thread took it (monotonic) */
	bool batch_first;   /* the first job of the batch it was taken in */
	/* the batch's time with the next hop, the wait for the delivery log
	 * taken out, divided by its jobs (set by the delivery thread) */
	uint64_t wire_us;
	struct q_job *next;
	struct q_result *res; /* set when handed out, see struct q_result */
	/* bounce: what the DSN reports per idx[], copied when the job was
	 * made (in the job's own allocation); NULL for QJ_DELIVER */
	const char **reasons;
	/* and the host whose reply each reason is (DSN Remote-MTA), or NULL
	 * (a reason of ours, or a next hop without a host name) */
	const char **mtas;
	unsigned idx[]; /* n of them: indexes into m->rcpts */
};

/*
 * The RFC 1047 fingerprint of a message (qmgr.c: resends of a message whose
 * 250 may not have arrived): SHA-256 over the sender, the recipients in
 * order and the body after our own Received header (its first line and the
 * lines continuing it), which differs between copies. Streamed: begin,
 * feed the body in order in pieces of any size, end. Any thread.
 */
struct q_fp {
	void *ctx; /* EVP_MD_CTX; NULL: not started or given up */
	int st;    /* 0 in the first line, 1 after a CRLF in it, 2 hashing */
	bool cr;
};

int q_fp_begin(struct q_fp *f, const struct q_msg *m); /* 0 or -ENOMEM */
void q_fp_feed(struct q_fp *f, const uint8_t *p, size_t n);
int q_fp_end(struct q_fp *f, uint8_t *out32); /* 0 or -EIO; frees */
void q_fp_abort(struct q_fp *f);

/* A message's body, read from its segment pieces (pread), verifying the
 * body CRC32C as the last bytes are read: a mismatch is -EIO before the
 * last bytes are handed out, so a damaged message never completes a
 * transaction. Sequential reads only (the common case); a read at another
 * offset restarts the check. */
struct q_body {
	const struct q_msg *m;
	uint64_t pos;     /* next expected offset */
	uint32_t crc;
	size_t piece;     /* index of the piece holding pos */
	uint64_t piece_off; /* body offset where that piece starts */
	/* Called once, before the bytes that complete the body are handed
	 * out (the point of no return: the final dot follows): the ATTEMPT
	 * record must be durable by then. Non-zero fails the read. */
	int (*before_last)(void *ctx);
	void *before_last_ctx;
	bool last_done;
	bool unchecked; /* a read skipped bytes: the CRC cannot be checked */
	/* a moved message's file, opened by this reader (fd + 1; 0: none):
	 * the queue manager keeps no descriptor per moved message (a
	 * million deferred would be a million open files); q_body_fini()
	 * closes it */
	int own_fd1;
	bool damaged;   /* the body's CRC32C did not match: never sent */
	/* Optional: the fingerprint computed on the way (fp begun by the
	 * caller). fp_ok once the whole body was read in order and matched
	 * its CRC; a read out of order gives it up (a restart from 0 begins
	 * again). */
	struct q_fp *fp;
	bool fp_ok;
	uint8_t fp_out[32];
};
void q_body_init(struct q_body *b, const struct q_msg *m);
long q_body_read(void *ctx, uint64_t off, void *buf, size_t n);
/* Gives up a fingerprint still being computed (b->fp). */
void q_body_fini(struct q_body *b);

#endif
