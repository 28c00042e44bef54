"""KV blocks outside the device pool: the KV connector interface and its tiers.

``connector`` is the interface an engine calls (scheduler side: what can be loaded; worker
side: copy blocks in and out of the device pool). ``tiered`` implements it over a host-memory
tier (``host_tier``) and an SSD tier (``disk_tier``, files in ``block_file`` format). Blocks
are named by the prefix-cache key chain of ``keys``, so any engine serving the same model and
cache layout (``fingerprint``) can reuse any other's blocks.
"""
