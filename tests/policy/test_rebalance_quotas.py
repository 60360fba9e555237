"""Rebalancing quotas (policy.rebalance): pure, no kernel."""

from __future__ import annotations

import numpy as np

from equilibriumd.policy.rebalance import excess_quota, shares

ALL = np.ones((1, 3), dtype=bool)


def test_a_backend_the_weights_left_gives_up_all_its_connections() -> None:
    share = shares(np.array([[0, 512, 512]]))
    q = excess_quota(np.array([[8, 8, 8]]), share, ALL)
    assert q.tolist() == [[8, 0, 0]]


def test_a_down_weighted_backend_gives_up_down_to_its_share() -> None:
    share = shares(np.array([[2, 511, 511]]))   # 0.2 % of new connections
    q = excess_quota(np.array([[8, 8, 8]]), share, ALL)
    assert q[0, 0] == 8 and q[0, 1:].sum() == 0   # 8 - 0.05 rounds to 8


def test_one_connection_on_a_backend_without_share_moves() -> None:
    q = excess_quota(np.array([[1, 1, 1]]), shares(np.array([[0, 1, 1]])), ALL)
    assert q.tolist() == [[1, 0, 0]]


def test_equal_backends_within_the_noise_keep_their_connections() -> None:
    share = shares(np.ones((1, 3)))
    for act in ([9, 8, 7], [10, 7, 7], [1, 0, 0], [2, 1, 0]):
        assert excess_quota(np.array([act]), share, ALL).sum() == 0, act
    # beyond the noise of a weighted draw: moved, down to the share
    assert excess_quota(np.array([[30, 3, 3]]), share, ALL).tolist() == [[18, 0, 0]]
    assert excess_quota(np.array([[3, 0, 0]]), share, ALL).tolist() == [[2, 0, 0]]


def test_steady_pools_stop_closing() -> None:
    """Connections placed at random over equal backends, then each tick's quota
    closed and reopened by the kernel's two-choice draw: closes die out (no
    churn from noise), far under the issue's 5 % of connections a second."""
    rng = np.random.default_rng(7)
    share = shares(np.ones((1, 3)))
    for n in (6, 24, 96, 384):
        act = rng.multinomial(n, [1 / 3] * 3)[None].astype(np.int64)
        closed = []
        for _ in range(40):   # 20 s at 2 ticks a second
            q = excess_quota(act, share, ALL)
            closed.append(int(q.sum()))
            act -= q
            for _ in range(int(q.sum())):   # p2c: two draws, the one holding fewer wins
                a, b = rng.integers(0, 3, size=2)
                act[0, a if act[0, a] <= act[0, b] else b] += 1
        assert sum(closed[10:]) == 0, (n, closed)
        assert sum(closed) / (n * 20) < 0.05, (n, closed)


def test_a_joining_backend_fills() -> None:
    """A new backend with no connection: the others give up their excess for it."""
    share = shares(np.ones((1, 4)))
    q = excess_quota(np.array([[8, 8, 8, 0]]), share, np.ones((1, 4), dtype=bool))
    assert q.tolist() == [[2, 2, 2, 0]]


def test_backends_taking_no_new_connections_get_no_quota() -> None:
    """Draining and quarantined backends are closed by state in the kernel, not by quota;
    their connections count in the total the others' shares apply to."""
    routable = np.array([[False, True, True]])
    q = excess_quota(np.array([[10, 7, 1]]), shares(np.array([[0, 1, 1]])), routable)
    assert q[0, 0] == 0
    assert q[0, 1] == 0   # 7 of 18 against a share of 9: not an excess
    assert q[0, 2] == 0


def test_rows_are_independent_and_shapes_kept() -> None:
    act = np.array([[8, 8, 8], [5, 5, 0]])
    held = np.array([[0, 1, 1], [1, 1, 0]])
    q = excess_quota(act, shares(held), np.ones((2, 3), dtype=bool))
    assert q.shape == (2, 3) and q.dtype == np.int64
    assert q.tolist() == [[8, 0, 0], [0, 0, 0]]
    assert shares(np.zeros((1, 3))).tolist() == [[0.0, 0.0, 0.0]]   # a row without slots: no share


def test_a_quota_counts_when_two_ticks_agree() -> None:
    from equilibriumd.policy.rebalance import confirmed

    q = np.array([[3, 0, 1]])
    assert confirmed(q, None).tolist() == [[0, 0, 0]]                  # the first tick: nothing yet
    assert confirmed(q, np.array([[5, 2, 0]])).tolist() == [[3, 0, 0]]  # what both saw
    assert confirmed(q, np.zeros((2, 3), dtype=np.int64)).tolist() == [[0, 0, 0]]   # a new layout
