"""Batch generation: job rows -> images, grouped into UNet batches, each row seeded alone."""
