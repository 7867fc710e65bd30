;; A WASI guest pre-initialized from a file: `init` reads `seed.txt` from the first preopen (fd 3),
;; `show` writes what it read as the call's output. Without the file `init` says so on stderr and
;; returns the errno as its failure status; `exits` calls proc_exit.
;; Memory: 32 the opened fd, 40 an iovec, 48 the bytes read, 4096 on the file's contents.
(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (import "sidecar" "output_write" (func $output_write (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "seed.txt")
  (data (i32.const 16) "no seed here\n")
  (func (export "init") (result i32)
    (local $errno i32)
    ;; rights: fd_read (1 << 1)
    (local.set $errno (call $path_open (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 8) (i32.const 0)
      (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 32)))
    (if (local.get $errno)
      (then
        (i32.store (i32.const 40) (i32.const 16))
        (i32.store (i32.const 44) (i32.const 13))
        (drop (call $fd_write (i32.const 2) (i32.const 40) (i32.const 1) (i32.const 48)))
        (return (local.get $errno))))
    (i32.store (i32.const 40) (i32.const 4096))
    (i32.store (i32.const 44) (i32.const 1024))
    (call $fd_read (i32.load (i32.const 32)) (i32.const 40) (i32.const 1) (i32.const 48)))
  (func (export "exits") (call $proc_exit (i32.const 7)))
  (func (export "show") (call $output_write (i32.const 4096) (i32.load (i32.const 48))))
)
