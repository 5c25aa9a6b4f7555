"""workers room."""
