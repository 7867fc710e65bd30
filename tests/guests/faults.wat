;; Guest faults and budgets, no imports: traps, runaway loops, deep recursion, memory growth.
(module
  (memory (export "memory") 1)
  (func (export "trap") (unreachable))
  (func (export "div") (param i32 i32) (result i32) (i32.div_s (local.get 0) (local.get 1)))
  (func (export "load") (param i32) (result i32) (i32.load (local.get 0)))
  (func $recurse (export "recurse") (param i32) (result i32)
    (i32.add (call $recurse (i32.add (local.get 0) (i32.const 1))) (i32.const 1)))
  (func (export "spin") (loop $forever (br $forever)))
  ;; counts down from n; the result (n) proves the whole loop ran
  (func (export "burn") (param $n i64) (result i64)
    (local $i i64) (local $acc i64)
    (local.set $i (local.get $n))
    (block $done
      (loop $again
        (br_if $done (i64.eqz (local.get $i)))
        (local.set $acc (i64.add (local.get $acc) (i64.const 1)))
        (local.set $i (i64.sub (local.get $i) (i64.const 1)))
        (br $again)))
    (local.get $acc))
  (func (export "grow") (param i32) (result i32) (memory.grow (local.get 0)))
  (func (export "pages") (result i32) (memory.size))
  ;; writes at the last byte of memory: proves grown pages are usable
  (func (export "touch_last") (result i32)
    (local $end i32)
    (local.set $end (i32.sub (i32.mul (memory.size) (i32.const 65536)) (i32.const 1)))
    (i32.store8 (local.get $end) (i32.const 7))
    (i32.load8_u (local.get $end)))
)
