"""Diagnostics that train or probe a model beside the optimizers (see :mod:`lbopt.diagnostics.perturbation`)."""
