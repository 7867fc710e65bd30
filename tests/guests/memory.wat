;; A memory whose minimum is chosen by the test: PAGES pages of 64 KiB.
(module
  (memory (export "memory") PAGES)
  (func (export "pages") (result i32) (memory.size))
)
