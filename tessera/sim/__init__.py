"""Discrete-event simulator and deployment planner for LLM serving.

Entry points: :func:`simulate` for one scenario, :func:`tessera.sim.planner.plan` for a search,
``tessera sim`` / ``tessera plan`` on the command line (:mod:`tessera.sim.cli`).
"""

from .deployment import Deployment
from .errors import SimError
from .result import SimResult
from .simulator import Scenario, simulate
from .workload import Workload

__all__ = ["Deployment", "Scenario", "SimError", "SimResult", "Workload", "simulate"]
