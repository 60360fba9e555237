"""Command lines: `equilibriumd` (the agent) and `equilibriumctl` (operators)."""
