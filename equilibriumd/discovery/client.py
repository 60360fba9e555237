"""How the agent reaches the API server: the pod's service account inside the
cluster, else $KUBECONFIG / ~/.kube/config (running by hand on a node)."""

from __future__ import annotations

from typing import Any


def api_client_from_env() -> Any:
    """A `kubernetes.client.ApiClient`. ConnectionError (an OSError, which the
    CLI reports as a start failure) when there are no credentials at all."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call,unused-ignore]
    except config.ConfigException as in_cluster:
        try:
            config.load_kube_config()  # type: ignore[no-untyped-call,unused-ignore]
        except (config.ConfigException, OSError) as e:
            raise ConnectionError("no Kubernetes credentials: not in a pod (%s) and no usable kubeconfig (%s)"
                                  % (in_cluster, e)) from None
    return client.ApiClient()


def api_client_for(host: str) -> Any:
    """An ApiClient for a plain-HTTP endpoint (tests' loopback API server)."""
    from kubernetes import client

    conf = client.Configuration()
    conf.host = host
    return client.ApiClient(conf)
