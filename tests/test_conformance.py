"""The conformance kit over every discovered backend (unavailable ones are skips with their reason)."""

from hal.testing.suite import *  # noqa: F403  (the kit's ready-made tests, as a third party uses them)
