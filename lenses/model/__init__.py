"""A model as lenses reads it: loading, finding its parts (discovery), the adapter, its fingerprint and
interventions on its forward pass."""
