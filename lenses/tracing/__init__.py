"""Reading a model through lenses: traces over layers and positions, held-out evaluation, intervals."""
