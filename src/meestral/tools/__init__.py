"""Tools over the library: the decode benchmark, kernel profiles, the demo."""
