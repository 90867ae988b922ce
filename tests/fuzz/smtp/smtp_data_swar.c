/*
 * smtp_data.c built a second time with its portable word-at-a-time span
 * (FINALDOT_DATA_SWAR) and renamed, so that the differential fuzz target
 * and tools/scanbench run that path too on machines where the production
 * build picks SSE2. Including the .c is what makes it the same code rather
 * than a copy that could drift.
 */
#include "smtp_data_ref.h"

#define FINALDOT_DATA_SWAR 1
#define smtp_data_init smtp_data_init_swar
#define smtp_data_scan smtp_data_scan_swar
#include "smtp/smtp_data.c"
