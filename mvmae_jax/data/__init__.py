"""Data sources, preprocessing and the tfds builder of the bundled digits."""

from mvmae_jax.errors import need


def check_config(dataset) -> None:
    """Raises ConfigError for a `config.dataset` section that names no data."""
    need(bool(dataset.name), "config.dataset.name is empty; name a tfds data set, 'imagefolder' "
         "or 'digits'")
    need(bool(dataset.split), "config.dataset.split is empty (e.g. 'train')")
    need(dataset.name != "imagefolder" or bool(dataset.path), "config.dataset.path is empty; "
         "with config.dataset.name='imagefolder' it names the training folder")
