"""Measurements of generated images: GLoD's CLIP alignment scores."""
