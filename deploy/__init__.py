"""Running StreamLens: the local stack (no Docker), and container files for those who use them."""
