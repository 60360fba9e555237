"""The cross-node coordinator (`equilibriumd coordinate`, issue 15): rounds
(process.py) and its /metrics (metrics.py). The game and the messages are the
policy layer's (policy/coordination.py, policy/bundle.py); the transports are
discovery's (channel.py: ConfigMaps and a Lease; localchannel.py: a directory
and a flock)."""
