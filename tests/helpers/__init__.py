"""What the test modules share: synthetic shards (synthetic), gloo ranks (dist_utils), the float64
oracles (gradient_oracle, sampler_oracle), layout conversions (layouts), planted corpora (corpus).
Test modules import from here, never from each other."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
"""The repository root (tools/, scripts/, examples/ are under it)."""
