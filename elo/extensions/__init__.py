"""Beyond the paper: stand-ins for the middle layers (a fitted linear map, distilled decoder blocks), layer scores
that suggest which layers to train, and hidden-state taps they use."""
