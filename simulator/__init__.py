"""simulator room."""
