"""Every message that crosses a process boundary, one module per boundary.

- ``common``: what every engine-hosting process takes and says (add, abort, shut down; ready,
  start-up failed), shared by both boundaries below.
- ``core``: the API process and its engine-core process (``tessera.serve``).
- ``workers``: an ``AFDEngine`` front and its attention and FFN workers (``tessera.afd``).

Messages are msgspec structs, msgpack-encoded; each direction of a boundary is one tagged
union, so a decoder knows every type it can receive. Only control travels in them: token ids,
small metadata, stats. Tensors travel on a data plane, never here.
"""
