"""The building blocks of the hooked decoder."""
