/*
 * The segment list ("ledger") of a worker directory: which segment files
 * the writer made and has not deleted, so that recovery can say when one
 * is missing (issue 10: a deleted segment lost its messages without a
 * word). Written by the segment preparer (spool_seg.c), read by the spool
 * reader (control/spool_reader.c); docs/spool-format.md describes it.
 *
 * SPOOL_ROOT/wNN/segments, text, replaced atomically (written to
 * segments.tmp, fsynced, renamed, directory fsynced):
 *   finaldot segments 1
 *   FFFFFFFF USE            one line per file: number (8 hex digits, as in
 *                           its name) and the use sequence last known
 * A file is listed once it exists durably and delisted before it is
 * deleted, so a crash at any point leaves no file listed that the writer
 * itself removed.
 */
#ifndef FINALDOT_SPOOL_LEDGER_H
#define FINALDOT_SPOOL_LEDGER_H

#define SPOOL_LEDGER_NAME "segments"
#define SPOOL_LEDGER_TMP "segments.tmp"
#define SPOOL_LEDGER_MAGIC "finaldot segments 1"

#endif
