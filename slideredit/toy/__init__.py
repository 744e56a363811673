"""A toy Kontext world: synthetic shape-editing data, attribute readers, and a tiny model family
trained on it on a CPU (see `recipe.py`). It shows SliderEdit working without FLUX's 12 B parameters."""
