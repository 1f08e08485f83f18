"""Neural-network modules: one tower per file."""
