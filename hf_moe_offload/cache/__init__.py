"""The shared expert cache: slot pools per tier, leases, eviction policies and statistics."""

from .expert_cache import ExpertCache, Lease, SlotPool
from .policies import EvictionPolicy, LFUPolicy, LRUPolicy, list_policies, make_policy, register_policy
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
