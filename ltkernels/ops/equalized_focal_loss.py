"""Placeholder: filled in by the equalized_focal_loss work."""
__all__: list[str] = []
