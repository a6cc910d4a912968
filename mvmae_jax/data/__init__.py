"""Data sources, preprocessing and the tfds builder of the bundled digits."""
