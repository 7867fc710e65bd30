;; The demo guest: greets a name through the guest ABI and asks the host for the time of day.
;; `greet` reads its input (a name), asks the host `clock.part_of_day` and writes
;; "Good <part>, <name>! (greeting #N)"; N is a global, so a stateful VM counts across calls.
(module
  (import "sidecar" "input_len" (func $input_len (result i32)))
  (import "sidecar" "input_read" (func $input_read (param i32)))
  (import "sidecar" "output_write" (func $output_write (param i32 i32)))
  (import "sidecar" "host_call" (func $host_call (param i32 i32 i32 i32) (result i32)))
  (import "sidecar" "response_read" (func $response_read (param i32)))
  (memory (export "memory") 1)
  (global $greetings (mut i32) (i32.const 0))
  (data (i32.const 0) "clock.part_of_day")   ;; 17 bytes
  (data (i32.const 32) "{}")                 ;; params: 2 bytes
  (data (i32.const 48) "Good ")              ;; 5 bytes
  (data (i32.const 64) "! (greeting #")      ;; 13 bytes
  (data (i32.const 80) ")")

  ;; Writes the decimal digits of $n (1..9999) and returns nothing.
  (func $write_number (param $n i32) (local $div i32) (local $started i32)
    (local.set $div (i32.const 1000))
    (block $done
      (loop $digits
        (if (i32.or (local.get $started) (i32.ge_u (local.get $n) (local.get $div)))
          (then
            (i32.store8 (i32.const 96) (i32.add (i32.const 48) (i32.div_u (local.get $n) (local.get $div))))
            (call $output_write (i32.const 96) (i32.const 1))
            (local.set $n (i32.rem_u (local.get $n) (local.get $div)))
            (local.set $started (i32.const 1))))
        (br_if $done (i32.eq (local.get $div) (i32.const 1)))
        (local.set $div (i32.div_u (local.get $div) (i32.const 10)))
        (br $digits))))

  (func (export "greet") (result i32) (local $name_len i32) (local $answer_len i32)
    (global.set $greetings (i32.add (global.get $greetings) (i32.const 1)))
    (local.set $name_len (call $input_len))
    (call $input_read (i32.const 1024))
    (local.set $answer_len (call $host_call (i32.const 0) (i32.const 17) (i32.const 32) (i32.const 2)))
    (call $output_write (i32.const 48) (i32.const 5))
    (if (i32.gt_s (local.get $answer_len) (i32.const 2))
      (then  ;; the answer is a JSON string: drop its quotes
        (call $response_read (i32.const 2048))
        (call $output_write (i32.const 2049) (i32.sub (local.get $answer_len) (i32.const 2)))))
    (i32.store8 (i32.const 97) (i32.const 44)) ;; ","
    (i32.store8 (i32.const 98) (i32.const 32)) ;; " "
    (call $output_write (i32.const 97) (i32.const 2))
    (call $output_write (i32.const 1024) (local.get $name_len))
    (call $output_write (i32.const 64) (i32.const 13))
    (call $write_number (global.get $greetings))
    (call $output_write (i32.const 80) (i32.const 1))
    (global.get $greetings))

  (func (export "add") (param i64 i64) (result i64) (i64.add (local.get 0) (local.get 1)))
  (func (export "spin") (loop $forever (br $forever)))
  (func (export "crash") unreachable))
