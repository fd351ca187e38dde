"""Evaluation that explains itself: COCO scoring with either scorer, and from the same ground truth and detections
the precision-recall and F1 curves, a confusion matrix, TIDE's error breakdown, their pictures and their JSON.

Plain NumPy and matplotlib: no Lightning, no Hydra. ``scoring`` -> ``boxset`` -> ``matching`` -> ``curves``,
``confusion``, ``errors`` -> ``report`` -> ``plots``.
"""
