"""The local swarm (``covenant swarm``) and the run report (``covenant report``).

``supervisor`` starts miners and a validator as separate OS processes on one machine, all on the
embedded defaults (file storage in the run directory, the local SQLite chain on its wall clock),
watches them and drives a churn script; ``report`` turns a run directory into one
self-contained HTML file. Peers coordinate only through the chain and storage, never through
the supervisor: the same processes run unchanged on separate machines.
"""
