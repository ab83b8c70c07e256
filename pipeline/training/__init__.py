"""Model training: NHANES cohort, semi-synthetic CT slices, teachers, KD student, evaluation, export.

Run with `osteoscreen train`. Imports torch; the service never imports this package.
"""
