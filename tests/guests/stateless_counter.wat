;; A guest whose state shows which instance served a call: a global counter and a memory that
;; only grows. Stateless VMs may replace the instance between calls; stateful ones never do.
(module
  (import "sidecar" "host_call" (func $host_call (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $count (mut i32) (i32.const 0))
  (data (i32.const 0) "wait")                 ;; method name of `wait_host`, 4 bytes
  (data (i32.const 16) "{}")                  ;; its params, 2 bytes

  ;; calls served by this instance, this one included
  (func $bump_count (result i32)
    (global.set $count (i32.add (global.get $count) (i32.const 1)))
    (global.get $count))

  (func (export "count") (result i32) (call $bump_count))

  ;; memory.grow by `pages`: the previous size in pages, or -1 when the budget refused
  (func (export "grow") (param $pages i32) (result i32) (memory.grow (local.get $pages)))

  ;; grows by `pages`, then counts: the counter, or -1 when the budget refused the growth
  (func (export "bump") (param $pages i32) (result i32)
    (if (i32.lt_s (memory.grow (local.get $pages)) (i32.const 0)) (then (return (i32.const -1))))
    (call $bump_count))

  ;; grows by one page and writes all of it, so the page is resident (counts in the RSS);
  ;; returns the previous size in pages, or -1
  (func (export "grow_touch") (result i32)
    (local $old i32)
    (local.set $old (memory.grow (i32.const 1)))
    (if (i32.ge_s (local.get $old) (i32.const 0))
      (then (memory.fill (i32.mul (local.get $old) (i32.const 65536)) (i32.const 171) (i32.const 65536))))
    (local.get $old))

  ;; blocks in host_call("wait", {}) until the host answers (or the sidecar refuses: -3), then
  ;; counts. Straight-line code after the host call, no call and no loop: the guest returns
  ;; without passing another epoch check, so a cancel cannot trap it after the refusal.
  (func (export "wait_host") (result i32)
    (drop (call $host_call (i32.const 0) (i32.const 4) (i32.const 16) (i32.const 2)))
    (global.set $count (i32.add (global.get $count) (i32.const 1)))
    (global.get $count))

  (func (export "trap") (unreachable))
  (func (export "spin") (loop $forever (br $forever)))
)
