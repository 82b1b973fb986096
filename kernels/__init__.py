"""rotq.kernels: Triton kernels, each with a pure-PyTorch reference; see the kernels issue."""
