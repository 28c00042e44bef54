"""The simulator's local-machine lab: models and measurements that only the benchmarks use.

``tessera.sim`` holds the fleet simulator, the planner, validation and ``tessera sim
calibrate``; this package holds what checks the simulator against this machine beyond that:
the attention/FFN split on one host (``afd_local``), the data plane's message time
(``plane_latency``), machine-speed readings around runs (``gauge``), calibration rounds
interleaved with other work (``rounds``) and the grid search behind the catalog's efficiency
constants (``anchor_fit``). Nothing in ``tessera`` imports it.
"""
