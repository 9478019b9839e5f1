"""A fleet of engines behind one router: router.py (app) over proxy.py (one request: cache, choice, tries,
streaming), strategies.py, backend.py (breaker), pool.py (health probes), cache.py, supervisor.py (replica
processes), autoscaler.py, follow.py (roll to new checkpoints), models.py + replica.py (several models in
one engine process, LRU); fleet.py wires them for ``scaletrain serve --replicas`` and ``scaletrain router``."""
