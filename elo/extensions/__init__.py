"""Beyond the paper: a fitted stand-in for the middle layers, layer scores that suggest which layers to train,
and hidden-state taps they both use."""
