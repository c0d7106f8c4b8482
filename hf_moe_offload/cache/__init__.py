"""The shared expert cache: slot pools per tier, leases, eviction policies and statistics."""

from .expert_cache import ExpertCache, Lease
from .policies import EvictionPolicy, LFUPolicy, LRUPolicy, list_policies, make_policy, register_policy
from .slots import SlotPool
from .stats import OffloadStats
from .timeline import Event, Timeline

__all__ = [
    "ExpertCache",
    "Lease",
    "SlotPool",
    "EvictionPolicy",
    "LFUPolicy",
    "LRUPolicy",
    "list_policies",
    "make_policy",
    "register_policy",
    "OffloadStats",
    "Event",
    "Timeline",
]
