/*
 * The previous byte-at-a-time DATA scanner (smtp_data_ref.c), kept as the
 * oracle for the differential fuzz target and the scanner benchmark, and
 * the production scanner built with its portable span whatever the machine
 * (smtp_data_swar.c). Same state, same contract as smtp_data_scan() in
 * smtp_data.h.
 */
#ifndef FINALDOT_SMTP_DATA_REF_H
#define FINALDOT_SMTP_DATA_REF_H

#include "smtp/smtp_data.h"

enum smtp_data_result smtp_data_scan_ref(struct smtp_data *d,
					 const uint8_t *p, size_t n,
					 size_t budget,
					 struct smtp_data_run *run);

void smtp_data_init_swar(struct smtp_data *d);
enum smtp_data_result smtp_data_scan_swar(struct smtp_data *d,
					  const uint8_t *p, size_t n,
					  size_t budget,
					  struct smtp_data_run *run);

#endif
