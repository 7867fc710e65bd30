;; Imports a sidecar function with the wrong signature.
(module
  (import "sidecar" "input_len" (func (param i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "f") (result i32) (i32.const 1))
)
