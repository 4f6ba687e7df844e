"""apar-spec: APAR decoding + speculative decoding."""
