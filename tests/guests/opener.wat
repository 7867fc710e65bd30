;; A WASI reactor driven by vm.call: opens its input as a path under directory fd `dir` with
;; `oflags` and `rights` (both rights sets), returns the errno (0: it opened, and the first 4 KiB
;; of the file are the call's output).
(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_close" (func $close (param i32) (result i32)))
  (import "sidecar" "input_len" (func $input_len (result i32)))
  (import "sidecar" "input_read" (func $input_read (param i32)))
  (import "sidecar" "output_write" (func $output_write (param i32 i32)))
  (memory (export "memory") 1)
  (func (export "open") (param $dir i32) (param $oflags i32) (param $rights i64) (result i32)
    (local $errno i32) (local $fd i32)
    (if (i32.gt_u (call $input_len) (i32.const 2048)) (then unreachable))
    (call $input_read (i32.const 1024))
    (local.set $errno (call $open (local.get $dir) (i32.const 1) (i32.const 1024) (call $input_len)
      (local.get $oflags) (local.get $rights) (local.get $rights) (i32.const 0) (i32.const 512)))
    (if (local.get $errno) (then (return (local.get $errno))))
    (local.set $fd (i32.load (i32.const 512)))
    (i32.store (i32.const 16) (i32.const 4096))
    (i32.store (i32.const 20) (i32.const 4096))
    (drop (call $read (local.get $fd) (i32.const 16) (i32.const 1) (i32.const 24)))
    (call $output_write (i32.const 4096) (i32.load (i32.const 24)))
    (drop (call $close (local.get $fd)))
    (i32.const 0)))
