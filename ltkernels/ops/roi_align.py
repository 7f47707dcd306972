"""Placeholder: filled in by the roi_align work."""
__all__: list[str] = []
