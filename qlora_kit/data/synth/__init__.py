"""Synthetic starter data (`qlora-kit data synth DOMAIN`): one generator per domain."""
