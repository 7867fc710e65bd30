/* Guest ABI v1 of wasm-sidecar: the `sidecar` import module (see protocol/SPEC.md, "Guest ABI v1"). */
#ifndef SIDECAR_H
#define SIDECAR_H

#include <stdint.h>

#define SIDECAR_IMPORT(name) __attribute__((import_module("sidecar"), import_name(name)))
#define SIDECAR_EXPORT(name) __attribute__((export_name(name)))

SIDECAR_IMPORT("input_len") int32_t sidecar_input_len(void);
SIDECAR_IMPORT("input_read") void sidecar_input_read(void *ptr);
SIDECAR_IMPORT("output_write") void sidecar_output_write(const void *ptr, int32_t len);
SIDECAR_IMPORT("host_call") int32_t sidecar_host_call(const char *method, int32_t method_len,
                                                      const char *params, int32_t params_len);
SIDECAR_IMPORT("response_read") void sidecar_response_read(void *ptr);
SIDECAR_IMPORT("host_call_async") int64_t sidecar_host_call_async(const char *method, int32_t method_len,
                                                                  const char *params, int32_t params_len);

#endif
