"""Native kernels, registered with XLA through its FFI where the machine can run them."""
