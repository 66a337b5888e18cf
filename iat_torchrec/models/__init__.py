"""Models: the IAT source model (``source``), the SIF sample tokenizer (``hgaq``) and the
SIF-Mixer (``mixer``). Import from the submodules."""
