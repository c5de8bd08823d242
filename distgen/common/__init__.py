"""What every stage may use: errors, value checks, name tables (Registry), device names, processes and signals."""
