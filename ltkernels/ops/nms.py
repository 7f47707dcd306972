"""Placeholder: filled in by the nms work."""
__all__: list[str] = []
