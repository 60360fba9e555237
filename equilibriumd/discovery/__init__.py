"""Kubernetes discovery: the only package that imports `kubernetes`.

* `KubernetesSource` (source.py): list/watch Services and EndpointSlices,
  deliver complete `config.Config` objects (debounced) to a callback.
* `build.build_config` (build.py): the pure mapping from API objects to a Config.
* `Reflector` (reflector.py): list, watch from the resourceVersion, bookmarks,
  relist on 410 Gone, backoff.
* `PodIdentity`, `cgroup_ids_for_pods` (pods.py): cgroup id -> "namespace/pod"
  for the pods on this node (caller identity).
* trim.py: what the reflectors keep of each object (no managedFields, status).
* admit.py: which discovered services get the maps' room (stable, fair;
  per-node rendezvous subsets beyond 256 endpoints).
* lease.py, channel.py: leader election on a Lease and the ConfigMap channel
  for the cross-node coordinator (issue 15: `equilibriumd coordinate`,
  agent/follow.py); localchannel.py: the same over a local directory and a
  flock (standalone); channel_types.py: the names and messages both share.

The agent applies a delivered Config through the same path as a SIGHUP
reload, on its own loop thread:

    src = KubernetesSource(node, on_change=agent.submit_config, base=file_config)
    src.start()
    first = src.wait_for_first(timeout=60)   # never apply an empty state at start

Imports of this package stay cheap: the kubernetes client is imported when a
source is constructed, so `equilibriumd run --config` never loads it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .build import ANNOTATION_ENABLED, ANNOTATION_POLICY, BuildResult, build_config, config_to_yaml
    from .pods import PodIdentity, cgroup_ids_for_pods
    from .source import KubernetesSource

#: the builder's names, imported when first used: an agent that only follows the
#: coordinator (agent.follow imports discovery.channel_types) loads no YAML and no OpenSSL
_BUILD = ("ANNOTATION_ENABLED", "ANNOTATION_POLICY", "BuildResult", "build_config", "config_to_yaml")

__all__ = ["ANNOTATION_ENABLED", "ANNOTATION_POLICY", "BuildResult", "KubernetesSource", "PodIdentity",
           "build_config", "cgroup_ids_for_pods", "config_to_yaml", "api_client_from_env"]


def __getattr__(name: str) -> Any:
    if name in _BUILD:
        from . import build
        return getattr(build, name)
    if name == "KubernetesSource":
        from .source import KubernetesSource
        return KubernetesSource
    if name in ("PodIdentity", "cgroup_ids_for_pods"):
        from . import pods
        return getattr(pods, name)
    if name == "api_client_from_env":
        from .client import api_client_from_env
        return api_client_from_env
    raise AttributeError(name)
