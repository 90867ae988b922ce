/*
 * A DURATION as the daemon's options and finaldotctl take it: digits, then
 * ms, s, m, h or d; no suffix is seconds ("30", "30s", "500ms", "2m").
 */
#ifndef FINALDOT_DURATION_H
#define FINALDOT_DURATION_H

#include <stdbool.h>
#include <stdint.h>

/* Milliseconds into *ms; false for anything else, or a value past
 * UINT64_MAX milliseconds (*ms unchanged). */
bool fd_parse_duration_ms(const char *v, uint64_t *ms);

#endif
