"""One module per quantizer family: its custom ops (``torch.library``, with fake
implementations for ``torch.compile``), its ``torch.autograd.Function`` and the dispatch
between the Triton kernels and the torch backend."""
