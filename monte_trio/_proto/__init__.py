"""The sans-IO core: bytes in, events and bytes out. Nothing in this package imports trio."""
