"""The shared expert cache: slot pools per tier, leases, eviction policies and statistics."""

from .entries import Lease
from .expert_cache import ExpertCache
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
