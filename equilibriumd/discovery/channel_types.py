"""The coordinator channel's names and message types, shared by its two
transports (ConfigMaps: channel.py; a local directory: localchannel.py) and
free of the kubernetes client (an agent on a directory channel never loads it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Literal

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


def encode(name: str, payload: dict[str, Any], max_bytes: int) -> str:
    """`payload` as compact JSON; PayloadTooLarge over `max_bytes`, ValueError if not JSON."""
    if not isinstance(payload, dict):
        raise ValueError("payload for %s must be a JSON object, not %s" % (name, type(payload).__name__))
    try:
        text = json.dumps(payload, separators=(",", ":"), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError("payload for %s is not JSON: %s" % (name, e)) from None
    size = len(text.encode())
    if size > max_bytes:
        raise PayloadTooLarge("payload for %s is %d bytes, over the channel's limit of %d bytes "
                              "(a ConfigMap holds at most %d): send less, or summarise it"
                              % (name, size, max_bytes, CONFIGMAP_DATA_LIMIT))
    return text


def run_callback(log: Any, fn: Callable[[], None] | None) -> None:
    """An elector's leadership callback: its bug is logged, never the end of the election."""
    if fn is None:
        return
    try:
        fn()
    except Exception:
        log.exception("leader_election_callback_failed")

