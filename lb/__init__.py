"""lb: the library under the control plane: struct mirrors, map access, Maglev, the loader."""
