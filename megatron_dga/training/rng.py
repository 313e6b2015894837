"""The run's random streams: moved to :mod:`megatron_dga.rng` (mixing/ uses them and imports nothing from
training/); re-exported here for the checkpoint code and callers of the old path."""

from megatron_dga.rng import RNG_STATE_FORMAT, capture_rng_state, restore_rng_state  # noqa: F401 - re-exported
