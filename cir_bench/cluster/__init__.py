"""Ray, locally or on a cluster: one place that the run, tune, serve and the CLI use to
connect (``connect``) and to check that every node shares the cache folder (``join``).
Imports nothing heavy: a wrong ``--address`` fails before torch is loaded."""
from cir_bench.cluster.connect import (ClusterConnectError, SharedCacheError, check_reachable, check_shared_folder,
                                       connect, join, token_source)

__all__ = ["ClusterConnectError", "SharedCacheError", "check_reachable", "check_shared_folder", "connect", "join",
           "token_source"]
