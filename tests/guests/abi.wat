;; A guest of the sidecar ABI: input, output, host calls, bad pointers, state across calls.
(module
  (import "sidecar" "input_len" (func $input_len (result i32)))
  (import "sidecar" "input_read" (func $input_read (param i32)))
  (import "sidecar" "output_write" (func $output_write (param i32 i32)))
  (import "sidecar" "host_call" (func $host_call (param i32 i32 i32 i32) (result i32)))
  (import "sidecar" "response_read" (func $response_read (param i32)))
  (memory (export "memory") 1)
  (global $count (mut i32) (i32.const 0))
  (global $in_call (mut i32) (i32.const 0))
  (data (i32.const 0) "lookup")               ;; method name of `ask`, 6 bytes
  (data (i32.const 16) "pause")               ;; method name of `exclusive`, 5 bytes
  (data (i32.const 32) "\ff\fe\00binary")     ;; 9 bytes that are not UTF-8
  (data (i32.const 48) "{\"n\":1}")           ;; 7 bytes of JSON params
  (global $scratch i32 (i32.const 4096))      ;; where inputs and responses land

  (func $ensure (param $end i32)
    ;; grow memory until [0, end) fits
    (block $ok
      (loop $more
        (br_if $ok (i32.le_u (local.get $end) (i32.mul (memory.size) (i32.const 65536))))
        (if (i32.lt_s (memory.grow (i32.const 1)) (i32.const 0)) (then unreachable))
        (br $more))))

  (func (export "add") (param i32 i32) (result i32) (i32.add (local.get 0) (local.get 1)))

  ;; output := input; returns the input's length
  (func (export "echo") (result i32)
    (local $n i32)
    (local.set $n (call $input_len))
    (call $ensure (i32.add (global.get $scratch) (local.get $n)))
    (call $input_read (global.get $scratch))
    (call $output_write (global.get $scratch) (local.get $n))
    (local.get $n))

  ;; writes `len` bytes of memory `times` times
  (func (export "emit") (param $len i32) (param $times i32)
    (block $done
      (loop $again
        (br_if $done (i32.eqz (local.get $times)))
        (call $output_write (i32.const 0) (local.get $len))
        (local.set $times (i32.sub (local.get $times) (i32.const 1)))
        (br $again))))

  (func (export "emit_binary") (call $output_write (i32.const 32) (i32.const 9)))

  ;; copies the last response to the output; its length is `status` when >= 0, else found by
  ;; the first NUL (compact JSON never holds one) since an error's length is not returned
  (func $respond (param $status i32)
    (local $n i32)
    (memory.fill (global.get $scratch) (i32.const 0) (i32.const 16384))
    (call $response_read (global.get $scratch))
    (if (i32.ge_s (local.get $status) (i32.const 0))
      (then (local.set $n (local.get $status)))
      (else
        (block $end
          (loop $scan
            (br_if $end (i32.eqz (i32.load8_u (i32.add (global.get $scratch) (local.get $n)))))
            (local.set $n (i32.add (local.get $n) (i32.const 1)))
            (br $scan)))))
    (call $output_write (global.get $scratch) (local.get $n)))

  ;; host_call("lookup", input) -> status; the response (or error) becomes the output
  (func (export "ask") (result i32)
    (local $n i32) (local $status i32)
    (local.set $n (call $input_len))
    (call $ensure (i32.add (i32.add (global.get $scratch) (local.get $n)) (i32.const 16384)))
    (call $input_read (i32.add (global.get $scratch) (i32.const 16384)))
    (local.set $status
      (call $host_call (i32.const 0) (i32.const 6) (i32.add (global.get $scratch) (i32.const 16384)) (local.get $n)))
    (call $respond (local.get $status))
    (local.get $status))

  ;; `ask`, then spins: a cancel or a deadline must still stop it
  (func (export "ask_then_spin")
    (drop (call $host_call (i32.const 0) (i32.const 6) (i32.const 48) (i32.const 7)))
    (loop $forever (br $forever)))

  ;; one call at a time: a second call entering while the first waits on the host would trap
  (func (export "exclusive") (result i32)
    (if (global.get $in_call) (then unreachable))
    (global.set $in_call (i32.const 1))
    (drop (call $host_call (i32.const 16) (i32.const 5) (i32.const 48) (i32.const 7)))
    (global.set $in_call (i32.const 0))
    (global.set $count (i32.add (global.get $count) (i32.const 1)))
    (global.get $count))

  (func (export "count") (result i32)
    (global.set $count (i32.add (global.get $count) (i32.const 1)))
    (global.get $count))

  (func (export "spin") (loop $forever (br $forever)))
  (func (export "trap") (unreachable))

  ;; ABI contract breaches: each must trap this call only
  (func (export "bad_input_read") (call $input_read (i32.const -16)))
  (func (export "bad_output_write") (call $output_write (i32.const 65530) (i32.const 100)))
  (func (export "negative_output_len") (call $output_write (i32.const 0) (i32.const -1)))
  (func (export "bad_host_call") (result i32)
    (call $host_call (i32.const 0) (i32.const 6) (i32.const 65000) (i32.const 1000)))
  (func (export "bad_host_method") (result i32)
    (call $host_call (i32.const -8) (i32.const 6) (i32.const 48) (i32.const 7)))
  (func (export "bad_response_read")
    (drop (call $host_call (i32.const 0) (i32.const 6) (i32.const 48) (i32.const 7)))
    (call $response_read (i32.const 65530)))
)
