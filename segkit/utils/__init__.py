"""Utilities: metric events and writers (:mod:`.events`), the visualizer, environment report.

Kept import-light: sub-modules are imported where they are used.
"""
