"""Options both commands take (here, not in ctl: the agent's process need not
import equilibriumctl's views)."""

from __future__ import annotations

import os

import click

from ..datapath import constants

PIN_DIR = click.option("--pin-dir", default=lambda: os.environ.get("EQUILIBRIUM_PIN_DIR", constants.DEFAULT_PIN_DIR),
                       show_default="$EQUILIBRIUM_PIN_DIR or %s" % constants.DEFAULT_PIN_DIR,
                       help="bpffs directory the datapath is pinned in")
