"""One module per paper; importing this package registers every method's components."""

from debiaslab.methods import cbdm, debias  # noqa: F401
