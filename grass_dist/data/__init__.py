"""Built-in datasets; each implements `describe(i)` for the HTML report."""

from grass_dist.data.digits import DigitsDataset, digits

__all__ = ["DigitsDataset", "digits"]
