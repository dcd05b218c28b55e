"""Thin adapters that turn TokenCarve on inside model frameworks and serving engines (one module each)."""
