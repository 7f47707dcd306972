"""Placeholder: filled in by the group_softmax work."""
__all__: list[str] = []
