"""Ready-made agents shipped with spoa-mp."""
