"""Utilities: metric events and writers (:mod:`.events`), the console progress bar
(:mod:`.progress`), the visualizer (:mod:`.visualizer`), the environment report
(:mod:`.env`) and the process-group helpers of distributed runs (:mod:`.comm`).

Kept import-light: sub-modules are imported where they are used.
"""
