;; A table the guest grows itself: growth past vm_table_elements returns -1, as memory.grow does.
(module
  (table 10 funcref)
  (func (export "grow") (param i32) (result i32) (table.grow 0 (ref.null func) (local.get 0)))
  (func (export "size") (result i32) (table.size 0))
)
