/*
 * CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as used by iSCSI,
 * ext4 and NVMe: crc32c(0, "123456789", 9) == 0xE3069283.
 *
 * fd_crc32c() continues a running CRC: pass 0 to start, then the previous
 * result. Uses the SSE4.2 instruction when the CPU has it (checked once),
 * slicing-by-8 tables otherwise; both give the same result.
 */
#ifndef FINALDOT_CRC32C_H
#define FINALDOT_CRC32C_H

#include <stddef.h>
#include <stdint.h>

uint32_t fd_crc32c(uint32_t crc, const void *p, size_t n);
/* The portable path alone (tests compare it with the fast one). */
uint32_t fd_crc32c_sw(uint32_t crc, const void *p, size_t n);

#endif
