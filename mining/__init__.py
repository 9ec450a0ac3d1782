"""mining: find images a person will love on Reddit and add them to their gallery."""

__version__ = "0.1.0"
