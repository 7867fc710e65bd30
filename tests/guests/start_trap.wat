;; Its start function traps: instantiation (vm.create) fails, not the sidecar.
(module
  (memory (export "memory") 1)
  (func $start (unreachable))
  (start $start)
  (func (export "f") (result i32) (i32.const 1))
)
