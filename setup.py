"""Package discovery: ``lbopt`` from lbopt/, ``lbopt.integrations`` from integrations/ (see pyproject)."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["lbopt", "lbopt.*"])
    + ["lbopt.integrations"]
    + [f"lbopt.integrations.{p}" for p in find_packages("integrations")]
)
