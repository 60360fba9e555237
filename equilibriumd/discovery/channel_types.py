"""The coordinator channel's names and message types, shared by its two
transports (ConfigMaps: channel.py; a local directory: localchannel.py) and
free of the kubernetes client (an agent on a directory channel never loads it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

LABEL_CHANNEL = "equilibrium.io/channel"  #: "summary" or "recommendation"
ANNOTATION_PUBLISHED = "equilibrium.io/published-at"  #: RFC 3339 UTC, the publisher's clock (for people)
DATA_KEY = "payload.json"
SUMMARY_PREFIX = "equilibrium-summary-"
RECOMMENDATION_PREFIX = "equilibrium-recommendation-"
#: what the API server accepts in a ConfigMap's data (validation: 1 MiB)
CONFIGMAP_DATA_LIMIT = 1024 * 1024
MAX_NAME = 253  #: a ConfigMap name is a DNS subdomain

Outcome = Literal["written", "rate_limited", "failed"]


class PayloadTooLarge(ValueError):
    """The encoded payload is over the channel's size bound; nothing was sent."""


def summary_name(node: str) -> str:
    """The summary ConfigMap of `node`."""
    return _per_node(SUMMARY_PREFIX, node)


def recommendation_name(node: str) -> str:
    """The ConfigMap holding the coordinator's recommendations for `node`."""
    return _per_node(RECOMMENDATION_PREFIX, node)


def _per_node(prefix: str, node: str) -> str:
    # A node name may itself be 253 characters long; one too long for the
    # prefix is cut and given a hash so two long names cannot collide.
    name = prefix + node
    if len(name) <= MAX_NAME:
        return name
    import hashlib  # only here: it loads OpenSSL (~6 MB of the agent's RSS), tests/test_packaging.py

    digest = hashlib.sha256(node.encode()).hexdigest()[:16]
    return name[:MAX_NAME - 17].rstrip(".-") + "-" + digest


@dataclass(frozen=True)
class Message:
    """One object read from the channel: a payload, or why there is none."""

    name: str
    payload: dict[str, Any] | None
    error: str | None = None  #: "not found", "malformed: ...", "api: ..."
    resource_version: str | None = None  #: unchanged between two reads = same content
    published_at: str | None = None  #: the publisher's annotation, not validated


@dataclass(frozen=True)
class Listing:
    messages: list[Message]
    error: str | None = None  #: the list call itself failed
