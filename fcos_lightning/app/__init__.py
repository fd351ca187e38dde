"""The entry-point layer: the only code that sees a Hydra ``DictConfig`` and calls ``instantiate``.

``train.py``, ``evaluate.py``, ``predict.py``, ``export.py``, ``convert.py`` and ``validate_data.py`` are thin
wrappers around the functions here; tests call the functions directly.
"""
