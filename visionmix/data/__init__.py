"""Small real datasets exported to timm's ImageFolder layout."""
from .digits import export_digits

__all__ = ['export_digits']
