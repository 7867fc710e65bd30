;; Its start function never returns: vm.create is bounded by the call timeout.
(module
  (func $start (loop $forever (br $forever)))
  (start $start)
  (func (export "f") (result i32) (i32.const 1))
)
