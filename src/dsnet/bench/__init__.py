"""Parameter, MAC and throughput measurement."""
