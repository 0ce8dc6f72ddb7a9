"""The command-line jobs, thin over the Python API: ``train`` (tuned lens), ``fit`` (Jacobian lens)
and ``analyze`` (views and the grid). ``lenses <job>`` (`lenses.__main__`), ``python -m lenses <job>``
and the top-level ``train_probes.py`` / ``analyze.py`` all run these same functions."""
