"""Utilities: metric events and writers (:mod:`.events`), the console progress bar
(:mod:`.progress`), the visualizer (:mod:`.visualizer`) and the environment report
(:mod:`.env`).

Kept import-light: sub-modules are imported where they are used.
"""
