"""Messages that cross a package or a topic, each defined once and versioned; both sides import
them from here. See ``docs/explanation/architecture.md`` (Layers and contracts)."""
