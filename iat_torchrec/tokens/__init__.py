"""Token store, per-user time index, sequence assembly by timestamp, and FBGEMM token lookup."""
