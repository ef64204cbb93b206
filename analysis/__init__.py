"""Feature-richness analysis of a frozen concatenated encoder (library code: depends on util/ and models/; the
tools and, later, the probe import it)."""
