;; Pre-initialization: exports that set up state once (`init*`), and readers of that state.
;; A start function counts its runs: a baked module must not run it again.
;; PAGES: how many pages `init_grows` asks for.
(module
  (import "sidecar" "host_call" (func $host_call (param i32 i32 i32 i32) (result i32)))
  (import "sidecar" "host_call_async" (func $host_call_async (param i32 i32 i32 i32) (result i64)))
  (import "sidecar" "output_write" (func $output_write (param i32 i32)))
  (memory (export "memory") 1)
  (global $counter (mut i32) (i32.const 0))
  (global $wide (mut i64) (i64.const 0))
  (global $ratio (mut f64) (f64.const 0))
  (global $starts (mut i32) (i32.const 0))
  (data (i32.const 0) "kv.get{}")
  (func $start (global.set $starts (i32.add (global.get $starts) (i32.const 1))))
  (start $start)

  ;; Two more pages, a word near the start and one at the very end of memory, every kind of global.
  (func $setup
    (drop (memory.grow (i32.const 2)))
    (i32.store (i32.const 1024) (i32.const 1234))
    (i32.store (i32.const 196604) (i32.const 777))
    (global.set $counter (i32.const 41))
    (global.set $wide (i64.const -5))
    (global.set $ratio (f64.const 0.1)))
  (func (export "init") (call $setup))
  (func (export "init_ok") (result i32) (call $setup) (i32.const 0))
  (func (export "init_fails") (result i32) (call $setup) (i32.const 3))
  (func (export "init_traps") (call $setup) unreachable)
  (func (export "init_spins") (loop $forever (br $forever)))
  (func (export "init_burns") (local $i i32)
    (loop $more
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $more (i32.lt_u (local.get $i) (i32.const 50000000))))
    (call $setup))
  (func (export "init_writes") (call $output_write (i32.const 0) (i32.const 8)))
  ;; What the host calls answered during the run, kept at 2048 and 2052.
  (func (export "init_asks")
    (i32.store (i32.const 2048) (call $host_call (i32.const 0) (i32.const 6) (i32.const 6) (i32.const 2)))
    (i32.store (i32.const 2052)
      (i32.wrap_i64 (call $host_call_async (i32.const 0) (i32.const 6) (i32.const 6) (i32.const 2)))))
  ;; Status 1 when the grow was refused.
  (func (export "init_grows") (result i32)
    (i32.eq (memory.grow (i32.const PAGES)) (i32.const -1)))
  (func (export "takes") (param i32))
  (func (export "gives") (result i64) (i64.const 0))

  (func (export "bump") (result i32)
    (global.set $counter (i32.add (global.get $counter) (i32.const 1)))
    (global.get $counter))
  (func (export "wide") (result i64) (global.get $wide))
  (func (export "ratio") (result f64) (global.get $ratio))
  (func (export "starts") (result i32) (global.get $starts))
  (func (export "load") (param i32) (result i32) (i32.load (local.get 0)))
  (func (export "pages") (result i32) (memory.size))
)
