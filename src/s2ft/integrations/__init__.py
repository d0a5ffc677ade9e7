"""Optional integrations with other training libraries (each imports its library lazily)."""
